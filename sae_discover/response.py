"""The answer — the last step of the flow: a ranked stored run in the seed's response shape.

The structs below are the one definition of that shape: the service builds plain JSON-ready dicts with
:func:`discovery_response`, the API converts them to :class:`DiscoverResponse` (its OpenAPI schema),
and the CLI writes them as JSON, CSV or a table (``output.py``).
"""

from __future__ import annotations

from msgspec import UNSET, Struct, UnsetType

from sae_discover.request import DiscoverRequest

NO_CALIBRATION = ("no calibration for this SAE: τ = 0 (active means act > 0) and scores are not normalized; "
                  "run `python -m sae_discover calibrate` to fix both")


class Span(Struct, kw_only=True):
    """A window of tokens around one of the feature's highest activations; ``position`` is [start, end)."""

    text: str
    position: list[int]
    act: float


class Scores(Struct, kw_only=True):
    """Raw measurements over the analyzed tokens (``score`` is the chosen mode, normalized)."""

    mean: float
    coverage: float
    max: float
    selectivity: float | None


class Feature(Struct, kw_only=True, omit_defaults=True):
    feature_id: int
    layer: int
    stream: str
    score: float
    scores: Scores
    proto_label: str | UnsetType | None = UNSET
    top_spans: list[Span] | UnsetType = UNSET


class Analyzed(Struct, kw_only=True):
    mode: str
    tokens: int
    layers: list[int]
    streams: list[str]
    total_tokens: int


class DiscoverResponse(Struct, kw_only=True, omit_defaults=True):
    """The seed's response, plus run_id, cached, threshold_source, normalization, analyzed and timings."""

    model_id: str
    sae_id: str
    run_id: str
    cached: bool
    analyzed: Analyzed
    score_mode: str
    threshold_source: str
    normalization: str
    features: list[Feature]
    warnings: list[str]
    timings: dict[str, float] | UnsetType = UNSET
    id: str | UnsetType = UNSET


def feature_json(f: dict, req: DiscoverRequest) -> dict:
    """One ranked feature (a row of ``catalog.ranking``) in the seed's shape."""
    out = {"feature_id": int(f["feature_id"]), "layer": int(f["layer"]), "stream": f["stream"],
           "score": float(f["score"]),
           "scores": {"mean": float(f["mean"]), "coverage": float(f["coverage"]), "max": float(f["max"]),
                      "selectivity": None if f["selectivity"] is None else float(f["selectivity"])}}
    if req.attach_proto_labels:
        out["proto_label"] = f.get("proto_label")
    if req.attach_examples:
        out["top_spans"] = f.get("top_spans", [])
    return out


def discovery_response(req: DiscoverRequest, run_id: str, run: dict, layers: list[int], streams: list[str],
                       ranked: dict, notes: list[str], timings: dict[str, float] | None = None) -> dict:
    """The seed's response for a ranked stored run (``run``: its catalog row plus ``cached``)."""
    warnings = list(notes)
    if ranked["threshold_source"] == "none":
        warnings.append(NO_CALIBRATION)
    out = {"model_id": req.model_id, "sae_id": req.sae_id, "run_id": run_id, "cached": run["cached"],
           "analyzed": {"mode": run["mode"], "tokens": run["n_kept"], "layers": layers, "streams": streams,
                        "total_tokens": run["n_tokens"]},
           "score_mode": req.score_mode, "threshold_source": ranked["threshold_source"],
           "normalization": ranked["normalization"], "features": [feature_json(f, req) for f in ranked["features"]],
           "warnings": warnings}
    if timings is not None:
        out["timings"] = {k: round(v, 4) for k, v in timings.items()}
    if req.id is not None:
        out["id"] = req.id
    return out
