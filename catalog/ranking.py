"""Ranking, thresholds, spans and labels — SQL over the stored rows.

For one run, over its kept (analysed) tokens, n of them, and each feature f with a nonzero code:
- mean = sum(act) / n, max = max(act), coverage = #(act > τ_f) / n (a fraction, 0-1)
- selectivity = mean − background mean (the calibration's per-token mean), null without one; with
  ``background: "batch"`` the background mean is the other runs ranked together instead (leave-one-out:
  (sum over the group − the run's own sum) / (the group's n − its own n), absent features 0): contrast
  against the rest of a batch, which no calibration corpus matches for prompts far from it
- lift = (mean + ε) / (background mean + ε), ε = ``LIFT_PRIOR`` × the calibration max: how many times
  its usual level the feature is active here (a ratio, so it needs no normalization)
- score = the chosen mode on activations divided by the feature's calibration max
  (``normalization: "calibration_max"``, the default; 1 where the calibration never saw the feature
  fire), or by one scale per SAE, the median of its features' calibration maxima
  (``"sae_median_max"``: layers still compare, and a feature is no longer measured against its own
  peak — the per-feature rule lifts weak, broad features over strong, specific ones; see the README's
  Discovery quality), or on raw activations (``"none"``, and always when the SAE has no calibration, as for
  the attribution modes). lift and context are ratios: no normalization changes them
- attribution = sum(attr): the first-order drop of the run's attribution target M were the feature removed
  at every analysed token (``ingest/attribution.py``), null for runs without a target; score modes
  ``attribution`` (what pushed M up) and ``attribution_abs`` (|sum|: what mattered either way) rank by it
  raw (no calibration normalization: it is in units of M)
- context = Σ_g lift_g · max(0, r(f, g)) / Σ_g lift_g over the run's other scored features g of the same
  SAE (the sum below over all of them), r the correlation of f's and g's activity over the documents of
  the calibration (Pearson's r of √ of each one's activation mass per document): how much the features
  this prompt lifts are usually active together with f. A feature of the prompt's topic is backed by
  the prompt's other features; a generic, positional or stray one (a word used in another sense than
  the corpus uses it) is not — the mode that put the most features of the prompt's own domain on top
  in ``tests/benchmarks/bench_quality.py``. Needs a calibration of every SAE; the lift weights use the
  chosen background
- gate: coverage × 100 ≥ min_coverage_pct; ``restrict_features`` limits the candidates (for context,
  the weighing features too).
τ_f: a global ``tau``; else the calibration's P95 (or another ``tau_quantile``, computed exactly
like the P95) on ``tau_basis``: ``active`` (default) over the feature's nonzero activations, its
firing distribution — ``all`` over every calibration token, zeros included, which is 0 for nearly
every feature (most fire on a few % of tokens), so the gate would not gate; else 0
(``threshold_source: "none"``). A feature that never fired in calibration has τ = 0.

These rules are implemented once, as the DuckDB table macros of :mod:`catalog.scoring` (stored in the
catalog by migrations 0005–0008 and 0011–0013, public as ``feature_scores``): this module checks the options, calls them,
cuts the top ``return_top_x`` and attaches labels and spans.

:class:`RankOptions` is the one definition of the ranking options: each field's help text and
inclusive bounds are in its metadata and its choices in its type, for the request model to compose.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import duckdb

from catalog.db import Catalog
from catalog.errors import CatalogError, listed
from catalog.runs import held_sae_keys
from catalog.scoring import (  # noqa: F401 (LIFT_PRIOR, ATTRIBUTION_MODES: re-exported)
    ATTRIBUTION_MODES,
    LIFT_PRIOR,
    NEEDS_BACKGROUND,
    NEEDS_CALIBRATION,
    PASSED,
    SCORE_EXPR,
    UNNORMALIZED_MODES,
    macro_call,
)
from catalog.stats import TAU_BASES, TauBasis
from catalog.writes import SAEInfo

ScoreMode = Literal["mean", "max", "mean×coverage", "selectivity", "lift", "attribution", "attribution_abs", "context"]
SCORE_MODES: tuple[str, ...] = get_args(ScoreMode)
assert tuple(SCORE_EXPR) == SCORE_MODES, "catalog/scoring.py scores exactly the score modes"
Background = Literal["calibration", "batch"]
BACKGROUNDS: tuple[str, ...] = get_args(Background)
Normalization = Literal["calibration_max", "sae_median_max", "none"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
SOURCE_PRIORITY = "CASE l.source WHEN 'lite' THEN 9 WHEN 'csv' THEN 3 WHEN 'delphi' THEN 2 " \
                  "WHEN 'neuronpedia' THEN 1 ELSE 5 END"

# help texts shared with DriftOptions (the same option means the same thing there)
SCORE_MODE_HELP = ("ranking value; context (with min_coverage_pct 0) puts the prompt's own topic first: it needs a "
                   "calibrated SAE (README: Discovery quality)")
MIN_COVERAGE_HELP = "coverage gate, a percentage 0-100 of analyzed tokens"
TAU_HELP = "global activity threshold instead of the calibrated per-feature P95"
TAU_QUANTILE_HELP = "another calibration quantile as threshold (on tau_basis)"
TAU_BASIS_HELP = ("what the calibrated quantile is taken over: active = the feature's nonzero activations "
                  "(its firing distribution), all = every calibration token, zeros included")
PROTO_LABELS_HELP = "attach the best catalog label"
NORMALIZATION_HELP = ("what activity scores are divided by, where the SAE is calibrated: calibration_max = each "
                      "feature's calibration max, sae_median_max = one scale per SAE (the median of its features' "
                      "maxima: layers compare, features keep their own strength; README: Discovery quality), "
                      "none = raw activations")
BACKGROUND_HELP = ("what selectivity, lift and context's weights compare a run with: calibration = the "
                   "calibration's per-token mean (or background_text / background_file), batch = the other runs "
                   "ranked with it (a batch's other prompts, leave-one-out; at least two runs)")


@dataclass
class RankOptions:
    """The ranking options of the seed (they never create a new run)."""

    score_mode: ScoreMode = field(default="mean×coverage", metadata={"help": SCORE_MODE_HELP})
    min_coverage_pct: float = field(default=0.5, metadata={"help": MIN_COVERAGE_HELP, "bounds": (0.0, 100.0)})
    return_top_x: int = field(default=25, metadata={
        "help": "features returned (per (layer, stream) when merge_across_layers is false)", "bounds": (1, 100_000)})
    merge_across_layers: bool = field(default=True, metadata={
        "help": "one ranking over all hooks, else the top return_top_x per hook"})
    restrict_features: list[int] = field(default_factory=list, metadata={"internal": True})
    tau: float | None = field(default=None, metadata={"help": TAU_HELP, "bounds": (0.0, 1e30)})
    tau_quantile: float | None = field(default=None, metadata={"help": TAU_QUANTILE_HELP, "bounds": (0.0, 1.0)})
    tau_basis: TauBasis = field(default="active", metadata={"help": TAU_BASIS_HELP})
    attach_examples: bool = field(default=True, metadata={"help": "attach top activating spans"})
    attach_proto_labels: bool = field(default=True, metadata={"help": PROTO_LABELS_HELP})
    spans_per_feature: int = field(default=3, metadata={"help": "evidence spans per feature", "bounds": (0, 100)})
    span_window: int = field(default=8, metadata={"help": "tokens each side of a span's peak", "bounds": (0, 1024)})
    calibration_id: int | None = field(default=None, metadata={
        "help": "pin the calibration that gives τ, normalization and the background mean (default: the newest "
                "of the run's model for each SAE); results name the one used", "bounds": (1, 2**31 - 1)})
    background: Background = field(default="calibration", metadata={"help": BACKGROUND_HELP})
    normalization: Normalization = field(default="calibration_max", metadata={"help": NORMALIZATION_HELP})
    # selectivity's background: stored runs of background text (all tokens kept) instead of the
    # calibration mean (the macro divides their activations by their own stored token counts)
    background_runs: list[int] = field(default_factory=list, metadata={"internal": True})
    # whose calibration gives τ, normalization and the background mean: this model's (rank_run sets
    # it to the run's model); None = the SAE's newest calibration of any model (drift shares one)
    model_key: int | None = field(default=None, metadata={"internal": True})


@dataclass
class Scoring:
    """The scoring of a set of runs by the macros of :mod:`catalog.scoring`: the named parameters of a
    call (``params``, for :func:`catalog.scoring.macro_call`) and each run's provenance, by run_key:
    its SAEs' calibrations (None where there is none), normalization, threshold source, the calibration
    results name (:func:`calibration_info`) and the warnings of :func:`calibration_changes`."""

    params: dict
    calibrations: dict[int, dict[int, int | None]]
    normalization: dict[int, str]
    threshold_source: dict[int, str]
    calibration: dict[int, dict | None]
    warnings: dict[int, list[str]]

    def relation(self) -> str:
        """One SELECT of the scored rows (run_key, sae_key, feature_id, mean, max, coverage,
        selectivity, attribution, score) with these parameters."""
        return ("SELECT run_key, sae_key, feature_id, mean, max, coverage, selectivity, attribution, score "
                f"FROM {macro_call('scored_features', self.params)}")


def check_options(opts: RankOptions) -> None:
    """Refuse an unknown choice before any SQL, naming its field (the macros would fail less clearly)."""
    for name, choices in (("score_mode", SCORE_MODES), ("tau_basis", TAU_BASES), ("background", BACKGROUNDS),
                          ("normalization", NORMALIZATIONS)):
        if getattr(opts, name) not in choices:
            raise CatalogError(name, f"expected one of {', '.join(choices)}, got {getattr(opts, name)!r}")
    if opts.background == "batch" and opts.background_runs:
        raise CatalogError("background", "batch contrasts the runs ranked together; give it or background_text / "
                                         "background_file, not both")


def check_pinned(con, sae_keys: list[int], calibration_id: int) -> None:
    """Refuse a pinned ``calibration_id`` that does not exist, or holds no statistics for one of the SAEs,
    naming the calibrations that do."""
    if not con.execute("SELECT 1 FROM calibrations WHERE calibration_id = ?", [calibration_id]).fetchall():
        ids = [c for (c,) in con.execute("SELECT calibration_id FROM calibrations ORDER BY 1").fetchall()]
        raise CatalogError("calibration_id", f"no calibration {calibration_id} in the catalog; its calibrations: "
                                             f"{listed(ids, 20) or 'none'}")
    held = {int(k) for (k,) in con.execute("SELECT DISTINCT sae_key FROM feature_stats WHERE calibration_id = ? "
                                           "AND list_contains(?, sae_key)", [calibration_id, list(sae_keys)])
            .fetchall()}
    missing = [k for k in sae_keys if k not in held]
    if missing:
        hooks = con.execute("SELECT layer, stream FROM saes WHERE sae_key = ?", [missing[0]]).fetchone()
        raise CatalogError("calibration_id", f"calibration {calibration_id} has no statistics for the SAE of "
                                             f"layer {hooks[0]} {hooks[1]}; calibrations that do: "
                                             f"{calibrations_of(con, missing[0]) or 'none'}")


def check_pinned_saes(catalog: Catalog, saes: Sequence[SAEInfo], calibration_id: int) -> None:
    """:func:`check_pinned` for a request whose run is not made yet (refused before any model runs): the
    SAEs by their identity (id, hook, weights fingerprint); one the catalog has never stored has no
    statistics in any calibration."""
    con = catalog.raw()
    try:
        keys = held_sae_keys(con, saes)
        unknown = next((sae for sae, key in zip(saes, keys, strict=True) if key is None), None)
        if unknown is not None:
            check_pinned(con, [], calibration_id)  # (a calibration that does not exist is said first)
            raise CatalogError("calibration_id", f"calibration {calibration_id} has no statistics for the SAE "
                                                 f"of layer {unknown.layer} {unknown.stream}; calibrations that do: none")
        check_pinned(con, keys, calibration_id)  # type: ignore[arg-type]
    finally:
        con.close()


def _threshold_source(opts: RankOptions, calibrated: bool) -> str:
    """Where τ came from: ``global``, ``none`` (no SAE calibrated: τ = 0), else ``calibration_p95`` /
    ``calibration_q<q>``, with ``_all`` appended on the all-token basis."""
    if opts.tau is not None:
        return "global"
    if not calibrated:
        return "none"
    suffix = "" if opts.tau_basis == "active" else f"_{opts.tau_basis}"
    q = opts.tau_quantile
    return f"calibration_p95{suffix}" if q is None or q == 0.95 else f"calibration_q{q:g}{suffix}"


def scoring(con, run_keys: list[int], sae_keys: list[int], opts: RankOptions, calibration_model: int | None) -> Scoring:
    """The macro parameters for scoring ``run_keys`` on ``sae_keys`` with ``opts`` (``calibration_model``:
    whose calibrations, as the macros take it), after refusing what cannot be scored, each with its field."""
    params = scoring_params(con, run_keys, sae_keys, opts, calibration_model)
    hook_params = {k: params[k] for k in HOOK_PARAMS}
    return provenance(run_keys, opts, params, _rows(con.execute(provenance_sql(params), hook_params)))


def scoring_params(con, run_keys: list[int], sae_keys: list[int], opts: RankOptions,
                   calibration_model: int | None) -> dict:
    """The named parameters of the macros for scoring ``run_keys`` on ``sae_keys`` with ``opts``, after
    refusing unknown choices and a pinned calibration that lacks an SAE."""
    check_options(opts)
    if opts.calibration_id is not None:
        check_pinned(con, sae_keys, opts.calibration_id)
    keys = list(dict.fromkeys([*run_keys, *opts.background_runs]))
    ids = dict(con.execute("SELECT run_key, run_id FROM runs WHERE list_contains(?, run_key)", [keys]).fetchall())
    return {"run_ids": [ids[k] for k in run_keys if k in ids], "score_mode": opts.score_mode,
            "min_coverage_pct": float(opts.min_coverage_pct), "tau": None if opts.tau is None else float(opts.tau),
            "tau_quantile": None if opts.tau_quantile is None else float(opts.tau_quantile),
            "tau_basis": opts.tau_basis, "calibration_id": opts.calibration_id, "background": opts.background,
            "normalization": opts.normalization, "restrict_features": [int(f) for f in opts.restrict_features] or None,
            "background_runs": [ids[k] for k in opts.background_runs if k in ids] or None,
            "sae_keys": [int(k) for k in sae_keys], "calibration_model": calibration_model}


HOOK_PARAMS = ("run_ids", "calibration_id", "sae_keys", "calibration_model")  # those scoring_hooks takes


def provenance_sql(params: dict) -> str:
    """:data:`PROVENANCE_SQL` for the macro parameters ``params`` (it binds those of :data:`HOOK_PARAMS`)."""
    return PROVENANCE_SQL.format(hooks=macro_call("scoring_hooks", {k: params[k] for k in HOOK_PARAMS}))


def provenance(run_keys: list[int], opts: RankOptions, params: dict, rows: list[dict]) -> Scoring:
    """The :class:`Scoring` of ``params`` from its :data:`PROVENANCE_SQL` rows, after refusing selectivity
    and lift without a background (each refusal naming its field)."""
    cals: dict[int, dict[int, int | None]] = {k: {} for k in run_keys}
    complete: dict[int, bool] = {}
    per_model: dict[int, set[int]] = {}
    for row in rows:
        cals[row["run_key"]][row["sae_key"]] = row["calibration_id"]
        complete[row["run_key"]] = row["all_calibrated"]
        per_model.setdefault(row["model_key"], set()).add(row["run_key"])
    if opts.score_mode in NEEDS_CALIBRATION and not all(complete.values()):
        raise CatalogError("score_mode", f"{opts.score_mode} weighs features by how they are active together in the "
                                         "calibration documents; calibrate the SAE first (python -m sae_discover "
                                         "calibrate --sae ...), or pick another score_mode")
    if opts.score_mode in NEEDS_BACKGROUND:
        _require_background(opts, complete, per_model)
    return Scoring(params, cals,
                   {k: opts.normalization if complete.get(k) and opts.score_mode not in UNNORMALIZED_MODES else "none"
                    for k in run_keys},
                   {k: _threshold_source(opts, any(c is not None for c in cals[k].values())) for k in run_keys},
                   _calibration_infos(run_keys, rows), calibration_changes(rows))


# A ranking's provenance, in the ranking's own statement (``_ranked_sql``: no statement of its own):
# each scored (run, SAE) of ``scoring_hooks`` with its hook, the calibration's corpus and the
# calibration of the run's first ranking (``run_calibrations``), in warning order.
PROVENANCE_SQL = """
    SELECT h.run_key, h.model_key, h.sae_key, h.calibration_id, h.all_calibrated, s.layer, s.stream,
           c.corpus, c.corpus_hash, c.n_tokens, rc.calibration_id AS first_calibration
    FROM {hooks} h
    JOIN saes s ON s.sae_key = h.sae_key
    LEFT JOIN calibrations c ON c.calibration_id = h.calibration_id
    LEFT JOIN run_calibrations rc ON rc.run_key = h.run_key AND rc.sae_key = h.sae_key
    ORDER BY h.run_key, s.layer, s.stream"""


def _require_background(opts: RankOptions, complete: dict[int, bool], per_model: dict[int, set[int]]) -> None:
    """Refuse selectivity / lift without a background: no calibration of every SAE and no background
    text, or a batch background over a model's lone run."""
    if opts.background == "batch":
        lone = min(per_model.values(), key=len, default=set())
        if len(lone) < 2:
            raise CatalogError("background", f"batch contrasts each run with the other runs ranked with it (of the same "
                                             f"model); {opts.score_mode} got {len(lone)} run — rank a batch, or use "
                                             "background calibration")
    elif not opts.background_runs and not all(complete.values()):
        raise CatalogError("score_mode", f"{opts.score_mode} needs a background; calibrate the SAE first "
                           "(python -m sae_discover calibrate --sae ...), give background_text / background_file, "
                           "or pick another score_mode")


def calibrations_of(con, sae_key: int) -> str:
    """The ids of the calibrations holding statistics for an SAE key, as text for an error message."""
    ids = [str(c) for (c,) in con.execute("SELECT DISTINCT calibration_id FROM feature_stats WHERE sae_key = ? "
                                          "ORDER BY 1", [sae_key]).fetchall()]
    return ", ".join(ids)


def calibration_info(con, calibrations: dict[int, int | None]) -> dict | None:
    """The calibration a ranking used — the newest among its SAEs' — with its corpus, the corpus's hash
    and token count; None when no SAE was calibrated (a ranking reads them with its provenance:
    :func:`_calibration_infos`)."""
    used = [c for c in calibrations.values() if c is not None]
    if not used:
        return None
    row = con.execute("SELECT calibration_id, corpus, corpus_hash, n_tokens FROM calibrations WHERE calibration_id = ?",
                      [max(used)]).fetchone()
    return dict(zip(("calibration_id", "corpus", "corpus_hash", "n_tokens"), row, strict=True))


def _calibration_infos(run_keys: list[int], provenance: list[dict]) -> dict[int, dict | None]:
    """Per run, :func:`calibration_info` from the rows of :data:`PROVENANCE_SQL`."""
    newest: dict[int, dict] = {}
    for row in provenance:
        cal = row["calibration_id"]
        if cal is not None and cal > newest.get(row["run_key"], {}).get("calibration_id", -1):
            newest[row["run_key"]] = {k: row[k] for k in ("calibration_id", "corpus", "corpus_hash", "n_tokens")}
    return {k: newest.get(k) for k in run_keys}


def calibration_changes(provenance: list[dict]) -> dict[int, list[str]]:
    """Per run, a warning when its first ranking (``run_calibrations``) used another calibration than
    this one does for one of its SAEs (scores, τ and lite labels may differ), from the rows of
    :data:`PROVENANCE_SQL`."""
    out: dict[int, list[str]] = {}
    for row in provenance:
        before, now = row["first_calibration"], row["calibration_id"]
        if before is not None and now != before:
            out.setdefault(row["run_key"], []).append(
                f"calibration_id: this run was first ranked with calibration {before} (layer {row['layer']} "
                f"{row['stream']}); this ranking uses {now if now is not None else 'none'} — pass calibration_id "
                f"{before} to reproduce the first ranking")
    return out


def scored_sql(con, sae_keys: list[int], opts: RankOptions, run_keys: list[int]) -> Scoring:
    """The scoring rules over several runs as one relation (:meth:`Scoring.relation`, drift's per-run
    scores), every run on the same calibrations: ``opts.model_key``'s newest, else the SAE's newest of
    any model."""
    return scoring(con, run_keys, sae_keys, opts, opts.model_key if opts.model_key is not None else 0)


def rank_run(catalog: Catalog, run_key: int, sae_keys: list[int], opts: RankOptions) -> dict:
    """Rank one stored run's features; returns features (with layer/stream), and provenance fields.
    τ, normalization and the calibration background come from the run's own model's calibration."""
    return rank_runs(catalog, [run_key], sae_keys, opts)[0]


def rank_runs(catalog: Catalog, run_keys: list[int], sae_keys: list[int], opts: RankOptions,
              contrast: Sequence[int] = ()) -> list[dict]:
    """Rank several stored runs (their run keys) with the same options and SAEs, as ``rank_run`` would
    one by one, in a handful of statements for all of them (batch mode ranks a group at once). Each run
    is scored by the ``feature_scores`` macro over its stored ``n_kept`` tokens (the macro reads them:
    callers pass no counts), on its own model's calibrations (``opts.model_key`` pins another model's).
    ``contrast``: more runs scored with them, for a batch background only (not for the attribution modes,
    which use none), and not returned (no spans or labels are read for them)."""
    con = catalog.raw()
    try:
        unique = list(dict.fromkeys(run_keys))  # a run listed twice is scored once
        # (an attribution ranking uses no background; its contrast runs may hold no attributions)
        extra = [k for k in dict.fromkeys(contrast) if k not in set(unique)] \
            if opts.background == "batch" and opts.score_mode not in ATTRIBUTION_MODES else []
        ranked = _rank_unique_runs(con, unique, sae_keys, opts, extra)
        seen: set[int] = set()
        out = []
        for run_key in run_keys:  # a repeated run gets its own copy: callers reshape their results in place
            out.append(copy.deepcopy(ranked[run_key]) if run_key in seen else ranked[run_key])
            seen.add(run_key)
        return out
    finally:
        con.close()


def _rank_unique_runs(con, run_keys: list[int], sae_keys: list[int], opts: RankOptions,
                      contrast: list[int]) -> dict[int, dict]:
    """``rank_runs`` for distinct runs (and distinct ``contrast`` runs, scored but not returned): run_key →
    ranked result."""
    scored_keys = [*run_keys, *contrast]
    if opts.score_mode in ATTRIBUTION_MODES:
        require_attributions(con, scored_keys)
    params = scoring_params(con, scored_keys, sae_keys, opts, opts.model_key)
    try:  # one statement: the provenance rows (feature_id NULL) first, then the top features
        rows = _ranked_rows(con, params, opts, run_keys)
    except duckdb.InvalidInputException as exc:  # a macro's refusal: said as the Python checks do, where they do
        scoring(con, scored_keys, sae_keys, opts, opts.model_key)
        refusal = macro_refusal(exc)
        if refusal is None:
            raise
        raise refusal from None
    n_hooks = next((i for i, r in enumerate(rows) if r["feature_id"] is not None), len(rows))
    scored = provenance(scored_keys, opts, params, rows[:n_hooks])
    features = [{c: r[c] for c in FEATURE_COLUMNS} for r in rows[n_hooks:]]
    if opts.attach_proto_labels:
        _attach_labels(con, features, [r["calibration_id"] for r in rows[n_hooks:]])
    if opts.attach_examples:
        _attach_spans(con, run_keys, features, opts.spans_per_feature, opts.span_window)
    out = {k: {"features": [], "threshold_source": scored.threshold_source[k], "normalization": scored.normalization[k],
               "calibration": scored.calibration[k], "calibrations": scored.calibrations[k],
               "warnings": scored.warnings.get(k, [])} for k in run_keys}
    for f in features:
        out[f.pop("run_key")]["features"].append(f)
    if not opts.merge_across_layers:
        _say_empty_hooks(out, rows[:n_hooks], opts)
    else:
        _say_empty_runs(out, opts)
    if opts.score_mode in ATTRIBUTION_MODES and opts.min_coverage_pct > 0:
        _say_gated_attributions(con, run_keys, sae_keys, opts, out)
    return out


def _say_gated_attributions(con, run_keys: list[int], sae_keys: list[int], opts: RankOptions,
                            out: dict[int, dict]) -> None:
    """Attribution modes under a coverage gate: a warning per run whose top features by attribution
    without the gate include some the gate left out. The gate asks for activations above τ (unusually
    strong activity); a feature can matter to the target while firing weakly, and users ask what was used."""
    ungated = replace(opts, min_coverage_pct=0.0, attach_proto_labels=False, attach_examples=False)
    params = scoring_params(con, run_keys, sae_keys, ungated, ungated.model_key)
    rows = _ranked_rows(con, params, opts, run_keys)
    for key, ranked in out.items():
        kept = {(f["layer"], f["stream"], f["feature_id"]) for f in ranked["features"]}
        left = [r for r in rows if r["run_key"] == key and r["feature_id"] is not None
                and (r["layer"], r["stream"], r["feature_id"]) not in kept]
        if left:
            ranked["warnings"].append(
                f"min_coverage_pct: {len(left)} of the top {opts.return_top_x} features by {opts.score_mode} were left "
                f"out by the gate (their activations stayed below τ), e.g. feature {left[0]['feature_id']} of layer "
                f"{left[0]['layer']} {left[0]['stream']} (attribution {left[0]['attribution']:+.4g}); "
                "min_coverage_pct 0 ranks every active feature by what it did to the target")


def _say_empty_hooks(out: dict[int, dict], hooks: list[dict], opts: RankOptions) -> None:
    """Per-hook rankings: a warning for each hook of a run where no feature passed the gates (its block
    would be missing without a word)."""
    for row in hooks:
        ranked = out.get(row["run_key"])  # (a batch background's contrast runs are not returned)
        if ranked is not None and not any(f["layer"] == row["layer"] and f["stream"] == row["stream"]
                                          for f in ranked["features"]):
            ranked["warnings"].append(_none_passed(f" of layer {row['layer']} {row['stream']}", opts))


def _say_empty_runs(out: dict[int, dict], opts: RankOptions) -> None:
    """A merged ranking with no feature at all: why (else an empty list comes without a word)."""
    for ranked in out.values():
        if not ranked["features"]:
            ranked["warnings"].append(_none_passed(" of restrict_features" if opts.restrict_features else "", opts))


def _none_passed(which: str, opts: RankOptions) -> str:
    """The warning for a ranking (or a hook's) that no feature passed the gates, with what to change; with
    no gate (0 %), none fired at all: no option changes that."""
    if opts.min_coverage_pct == 0:
        return f"min_coverage_pct: no feature{which} fired on the analyzed tokens"
    return (f"min_coverage_pct: no feature{which} passed the gates (active, above its τ on at least "
            f"{opts.min_coverage_pct:g}% of the analyzed tokens); lower min_coverage_pct or give tau")


FEATURE_COLUMNS = ("run_key", "sae_key", "feature_id", "mean", "max", "coverage", "selectivity", "attribution", "score",
                   "layer", "stream")


# the streams of a block in the order the model computes them: per-hook rankings list a layer's hooks so
STREAM_ORDER = ("resid_pre", "attn_out", "mlp_out", "resid_post")
STREAM_POSITION = f"list_position({list(STREAM_ORDER)!r}, stream)"


def macro_refusal(exc: duckdb.InvalidInputException) -> CatalogError | None:
    """A scoring macro's ``error('<argument>: …')`` as the catalog error naming that argument (a request
    field of the same name), None for another failure."""
    field, sep, message = str(exc).removeprefix("Invalid Input Error: ").partition(": ")
    return CatalogError(field, message) if sep and field in PASSED else None


def _ranked_rows(con, params: dict, opts: RankOptions, returned: list[int]) -> list[dict]:
    """The rows of :func:`_ranked_sql` for the runs of ``params`` and ``opts``' merge mode and top,
    features for the ``returned`` runs only."""
    return _rows(con.execute(_ranked_sql(params, opts.merge_across_layers),
                             {**params, "top": opts.return_top_x, "returned": returned}))


def _ranked_sql(params: dict, merge: bool) -> str:
    """A ranking's one statement: the rows of :data:`PROVENANCE_SQL`, then the top ``$top`` features of
    ``feature_scores`` of each run in ``$returned`` (over all its hooks when ``merge``, else per hook, the
    hooks in the model's order) in ranking order."""
    rank, order = ("rank", f"score DESC, layer, {STREAM_POSITION}, feature_id") if merge \
        else ("hook_rank", f"layer, {STREAM_POSITION}, score DESC, feature_id")
    return f"""
        WITH hooks AS ({provenance_sql(params)}),
        ranked AS (SELECT {', '.join(FEATURE_COLUMNS)}, calibration_id
                   FROM {macro_call('feature_scores', params)}
                   WHERE {rank} <= $top AND list_contains($returned, run_key))
        SELECT * FROM hooks UNION ALL BY NAME SELECT * FROM ranked
        ORDER BY feature_id IS NOT NULL, run_key, {order}"""


def _rows(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def require_attributions(con, run_keys: list[int]) -> None:
    """Refuse an attribution score mode over runs stored without an attribution target (their ``attr``
    is NULL: the ranking would be empty or meaningless), naming score_mode. A run with no nonzero code
    at all has nothing to rank either way (an empty ranking, not an error)."""
    missing = con.execute(f"""
        SELECT r.run_id FROM runs r WHERE list_contains($runs, r.run_key)
          AND EXISTS (SELECT 1 FROM activations a WHERE {_runs_filter("a")} AND a.run_key = r.run_key)
          AND NOT EXISTS (SELECT 1 FROM activations a WHERE {_runs_filter("a")} AND a.run_key = r.run_key
                          AND a.attr IS NOT NULL)
        ORDER BY r.run_key LIMIT 1""", _runs_params(run_keys)).fetchall()
    if missing:
        raise CatalogError("score_mode", f"run {missing[0][0]} has no attributions (it was made with "
                                         "attribution_target=none); rank it by another score_mode, or run it again "
                                         "with an attribution_target")


def _runs_filter(alias: str) -> str:
    """A predicate selecting ``$runs`` on a table with run_key: the BETWEEN lets zone maps skip the row
    groups of other runs (a group's runs were written together, so their keys are close)."""
    return f"{alias}.run_key BETWEEN $run_lo AND $run_hi AND list_contains($runs, {alias}.run_key)"


def _runs_params(run_keys: list[int]) -> dict:
    return {"runs": list(run_keys), "run_lo": min(run_keys), "run_hi": max(run_keys)}


def best_labels_sql(wanted: str) -> str:
    """The best label of each row of ``wanted``, a relation (sae_key, feature_id, cal): highest score
    (unscored last), then source priority (imported before lite), then the label text; as a relation
    (sae_key, feature_id, cal, label). Imported labels (``calibration_id`` NULL) belong to the SAE; a
    lite label only to its calibration ``cal`` (it names its model's tokens; ``cal`` NULL: none)."""
    return f"""
        SELECT w.sae_key, w.feature_id, w.cal,
               arg_min(l.label, (-coalesce(l.score, -1e300), {SOURCE_PRIORITY}, l.label)) AS label
        FROM ({wanted}) w
        JOIN labels l ON l.sae_key = w.sae_key AND l.feature_id = w.feature_id
                     AND (l.calibration_id IS NULL OR l.calibration_id = w.cal)
        GROUP BY w.sae_key, w.feature_id, w.cal"""


def _attach_labels(con, features: list[dict], cals: list[int | None]) -> None:
    """The best label per feature (:func:`best_labels_sql`), lite labels from the calibration its score
    used (``cals``, one per feature)."""
    if not features:
        return
    wanted = sorted({(f["sae_key"], f["feature_id"], cal) for f, cal in zip(features, cals, strict=True)},
                    key=lambda w: (w[0], w[1], -1 if w[2] is None else w[2]))
    rows = con.execute(best_labels_sql("SELECT unnest($keys) AS sae_key, unnest($fids) AS feature_id, "
                                       "unnest($cals)::INTEGER AS cal"),
                       {"keys": [w[0] for w in wanted], "fids": [w[1] for w in wanted],
                        "cals": [w[2] for w in wanted]}).fetchall()
    best = {(k, f, cal): label for k, f, cal, label in rows}
    for f, cal in zip(features, cals, strict=True):
        f["proto_label"] = best.get((f["sae_key"], f["feature_id"], cal))


def _attach_spans(con, run_keys: list[int], features: list[dict], per_feature: int, window: int) -> None:
    """Up to ``per_feature`` non-overlapping ±window token spans around each feature's top activations
    in its run (``features`` carry ``run_key``; all runs in two statements)."""
    for f in features:
        f["top_spans"] = []
    if not features:
        return
    acts = con.execute(f"""
        SELECT a.run_key, a.sae_key, a.feature_id, a.position, a.act FROM activations a
        SEMI JOIN (SELECT unnest($f_runs) AS run_key, unnest($keys) AS sae_key, unnest($fids) AS feature_id) p
             ON p.run_key = a.run_key AND p.sae_key = a.sae_key AND p.feature_id = a.feature_id
        WHERE {_runs_filter("a")} AND list_contains($key_set, a.sae_key)
        ORDER BY a.run_key, a.sae_key, a.feature_id, a.act DESC, a.position""",
        {**_runs_params(run_keys), "f_runs": [f["run_key"] for f in features],
         "keys": [f["sae_key"] for f in features], "fids": [f["feature_id"] for f in features],
         "key_set": sorted({f["sae_key"] for f in features})}).fetchall()
    texts = token_texts(con, run_keys)
    by_feature: dict[tuple[int, int, int], list[tuple[int, float]]] = {}
    for run_key, key, fid, pos, act in acts:
        by_feature.setdefault((run_key, key, fid), []).append((pos, act))
    for f in features:
        text = texts.get(f["run_key"], [])
        chosen: list[tuple[int, int]] = []
        for pos, act in by_feature.get((f["run_key"], f["sae_key"], f["feature_id"]), []):
            start, end = word_window(text, pos, window)
            if any(start < e and s < end for s, e in chosen):
                continue
            chosen.append((start, end))
            f["top_spans"].append(marked(text, pos, start, end, act))
            if len(chosen) >= per_feature:
                break


def token_texts(con, run_keys: list[int]) -> dict[int, list[str]]:
    """Each run's token pieces in position order (index = position), special tokens as "" so that a
    span never shows them: what :func:`word_window` and :func:`marked` take."""
    texts: dict[int, list[str]] = {}
    if not run_keys:
        return texts
    for run_key, _, tok, special in con.execute(
            f"SELECT run_key, position, token, is_special FROM tokens t WHERE {_runs_filter('t')} "
            "ORDER BY run_key, position", _runs_params(run_keys)).fetchall():
        texts.setdefault(run_key, []).append("" if special else (tok or ""))
    return texts


def marked(text: list[str], peak: int, start: int, end: int, act: float) -> dict:
    """An evidence span as results show it: the tokens ``[start, end)`` of a run's pieces as ``text``,
    its ``position``, the peak's ``act``, and the text with the peak token in ``[[ ]]`` (``marked``)."""
    return {"text": "".join(text[start:end]), "position": [start, end], "act": float(act),
            "marked": "".join(text[start:peak]) + f"[[{text[peak] if peak < len(text) else ''}]]"
                      + "".join(text[peak + 1:end])}


def _word_start(text: list[str], i: int) -> bool:
    """Whether token ``i`` begins a word: the first token or the end, after a left-out special token or
    whitespace, or itself starting with whitespace or punctuation that is not inside a word."""
    if i <= 0 or i >= len(text):
        return True
    prev, tok = text[i - 1], text[i]
    return not prev or not tok or prev[-1].isspace() or tok[0].isspace() or not (tok[0].isalnum() and prev[-1].isalnum())


def word_window(text: list[str], peak: int, window: int) -> tuple[int, int]:
    """The token span ``[start, end)`` of about ``window`` tokens each side of ``peak``, moved to word
    boundaries (no span starts or ends inside a word): shrunk towards the peak, or, when the peak's own
    word reaches past the window, grown to hold that word (at most ``window`` more tokens each side)."""
    n = len(text)
    start, end = max(0, peak - window), min(n, peak + window + 1)
    while start < peak and not _word_start(text, start):
        start += 1
    while start > max(0, peak - 2 * window) and not _word_start(text, start):
        start -= 1
    while end > peak + 1 and not _word_start(text, end):
        end -= 1
    while end < min(n, peak + 1 + 2 * window) and not _word_start(text, end):
        end += 1
    return start, end
