"""The answer — the last step of the flow: a ranked stored run in the seed's response shape.

The structs below are the one definition of that shape: the service builds plain JSON-ready dicts with
:func:`discovery_response`, the API converts them to :class:`DiscoverResponse` (its OpenAPI schema),
and the CLI writes them as JSON, CSV or a table (``output.py``).
"""

from __future__ import annotations

from msgspec import UNSET, Struct, UnsetType

from sae_discover.request import DiscoverRequest

NO_CALIBRATION = ("no calibration for this SAE: τ = 0 (active means act > 0) and scores are not normalized; "
                  "run `python -m sae_discover calibrate` (with --store URI for a store) to fix both")


def context_notes(run: dict, context_length: int, continuation: str | None) -> list[str]:
    """Warnings for a run whose sequence reached the model's context length (``run``: its catalog row):
    a text or prompt cut there (the rest was not analyzed), or a generation that stopped there — the
    run's tokens say so whenever it is answered, made now or stored; and a run with no token analyzed
    at all (an input of special tokens only, which are never analyzed), whose empty list is not a ranking."""
    if run["n_kept"] == 0:
        field = "text" if run["mode"] == "text" else "prompt"
        return [f"{field}: no token was analyzed (special tokens such as <|endoftext|> never are), so no feature ranks"]
    if run["n_tokens"] < context_length:
        return []
    where = f"the model reads at most {context_length} tokens"
    if run["mode"] == "text":
        return [f"text: {where}; the text was cut there and its remaining tokens were not analyzed"]
    if run["mode"] == "prompt+gen" and continuation:
        return [f"gen_tokens: {where}; generation stopped there, before gen_tokens"]
    extra = "; nothing was generated" if run["mode"] == "prompt+gen" else ""
    return [f"prompt: {where}; the prompt was cut there and its remaining tokens were not analyzed{extra}"]


def attribution_notes(target: str, run: dict, continuation: str | None) -> list[str]:
    """A warning for a run whose attribution target M has no terms (every attribution is then 0): a
    continuation target where nothing was generated, next-token log-probabilities over a single token."""
    empty = (target == "continuation" and not continuation) or (target == "next_tokens" and run["n_tokens"] < 2)
    if not empty:
        return []
    what = "nothing was generated" if target == "continuation" else "the text has a single token: no next token"
    return [f"attribution_target: {target} has nothing to score here ({what}), so every attribution is 0"]


class Span(Struct, kw_only=True):
    """A window of tokens around one of the feature's highest activations, at word boundaries;
    ``position`` is [start, end), ``marked`` the text with the peak token in ``[[ ]]``."""

    text: str
    position: list[int]
    act: float
    marked: str


class Scores(Struct, kw_only=True, omit_defaults=True):
    """Raw measurements over the analyzed tokens (``score`` is the chosen mode, normalized);
    ``attribution`` (Σ attr, in units of the attribution target) only for runs that have attributions."""

    mean: float
    coverage: float
    max: float
    selectivity: float | None
    attribution: float | UnsetType = UNSET


class Feature(Struct, kw_only=True, omit_defaults=True):
    feature_id: int
    layer: int
    stream: str
    score: float
    scores: Scores
    proto_label: str | UnsetType | None = UNSET
    top_spans: list[Span] | UnsetType = UNSET
    ablation_delta: float | UnsetType = UNSET  # verify_top: M(feature removed) − M, measured


class VerifiedPair(Struct, kw_only=True):
    feature_id: int
    layer: int
    stream: str
    attribution: float
    ablation_delta: float


class Verification(Struct, kw_only=True):
    """``verify_top``: the top N returned features ablated one at a time. ``pearson`` / ``spearman``
    correlate −attribution (the predicted change) with the measured deltas (null with fewer than two
    pairs or no spread); ``mean_abs_delta`` is over these N, ``mean_abs_delta_top_mean`` over the top N
    by mean activation, ablated the same way: whether "used" beats "active"."""

    target: str
    metric: float
    pairs: list[VerifiedPair]
    pearson: float | None
    spearman: float | None
    mean_abs_delta: float
    mean_abs_delta_top_mean: float


class Analyzed(Struct, kw_only=True):
    """What was analyzed: ``text`` is the whole sequence (prompt and continuation, special tokens left
    out), ``continuation`` the generated part (null when nothing was generated)."""

    mode: str
    tokens: int
    layers: list[int]
    streams: list[str]
    total_tokens: int
    text: str
    continuation: str | None


class Calibration(Struct, kw_only=True):
    """The calibration a ranking used (τ, normalization, background mean): its id, corpus, the corpus
    file's hash and its token count (the newest among the run's SAEs when they differ)."""

    calibration_id: int
    corpus: str | None
    corpus_hash: str | None
    n_tokens: int | None


class DiscoverResponse(Struct, kw_only=True, omit_defaults=True):
    """The seed's response, plus run_id, cached, threshold_source, normalization, the gate and merge that
    made the list, analyzed, timings and the calibration used (``calibration_id`` null, and ``calibration``
    null, when none was)."""

    model_id: str
    sae_id: str
    run_id: str
    cached: bool
    analyzed: Analyzed
    score_mode: str
    background: str  # what selectivity, lift and context compare with: calibration, batch or text
    threshold_source: str
    normalization: str
    min_coverage_pct: float  # the coverage gate the features passed
    merge_across_layers: bool  # false: the top return_top_x of each (layer, stream), grouped by hook
    features: list[Feature]
    warnings: list[str]
    calibration_id: int | None
    calibration: Calibration | None
    timings: dict[str, float] | UnsetType = UNSET
    id: str | UnsetType = UNSET
    verification: Verification | UnsetType = UNSET


def feature_json(f: dict, req: DiscoverRequest) -> dict:
    """One ranked feature (a row of ``catalog.ranking``) in the seed's shape."""
    out = {"feature_id": int(f["feature_id"]), "layer": int(f["layer"]), "stream": f["stream"],
           "score": float(f["score"]),
           "scores": {"mean": float(f["mean"]), "coverage": float(f["coverage"]), "max": float(f["max"]),
                      "selectivity": None if f["selectivity"] is None else float(f["selectivity"])}}
    if f.get("attribution") is not None:
        out["scores"]["attribution"] = float(f["attribution"])
    if "ablation_delta" in f:
        out["ablation_delta"] = float(f["ablation_delta"])
    if req.attach_proto_labels:
        out["proto_label"] = f.get("proto_label")
    if req.attach_examples:
        out["top_spans"] = f.get("top_spans", [])
    return out


def background_used(req: DiscoverRequest) -> str:
    """What a ranking's background mean was: ``batch`` (the other runs ranked together), ``text``
    (background_text / background_file) or ``calibration`` (the corpus' per-token mean)."""
    if req.background == "batch":
        return "batch"
    return "text" if req.background_text is not None or req.background_file is not None else "calibration"


def discovery_response(req: DiscoverRequest, run_id: str, run: dict, layers: list[int], streams: list[str],
                       ranked: dict, notes: list[str], timings: dict[str, float] | None = None,
                       analyzed: dict | None = None) -> dict:
    """The seed's response for a ranked stored run (``run``: its catalog row plus ``cached``;
    ``analyzed``: its text and continuation, as :func:`catalog.runs.run_texts` reads them)."""
    analyzed = analyzed or {"text": "", "continuation": None}
    warnings = list(notes)
    if ranked["threshold_source"] == "none":
        warnings.append(NO_CALIBRATION)
    warnings += ranked.get("warnings", [])
    calibration = ranked.get("calibration")
    out = {"model_id": req.model_id, "sae_id": req.sae_id, "run_id": run_id, "cached": run["cached"],
           "analyzed": {"mode": run["mode"], "tokens": run["n_kept"], "layers": layers, "streams": streams,
                        "total_tokens": run["n_tokens"], "text": analyzed["text"],
                        "continuation": analyzed["continuation"]},
           "score_mode": req.score_mode, "background": background_used(req),
           "threshold_source": ranked["threshold_source"],
           "normalization": ranked["normalization"], "min_coverage_pct": req.min_coverage_pct,
           "merge_across_layers": req.merge_across_layers,
           "features": [feature_json(f, req) for f in ranked["features"]],
           "warnings": warnings,
           "calibration_id": None if calibration is None else calibration["calibration_id"],
           "calibration": calibration}
    if timings is not None:
        out["timings"] = {k: round(v, 4) for k, v in timings.items()}
    if req.id is not None:
        out["id"] = req.id
    if ranked.get("verification") is not None:
        out["verification"] = ranked["verification"]
    return out
