"""Ranking, thresholds, spans and labels — SQL over the stored rows.

For one run, over its kept (analysed) tokens, n of them, and each feature f with a nonzero code:
- mean = sum(act) / n, max = max(act), coverage = #(act > τ_f) / n (a fraction, 0-1)
- selectivity = mean − background mean (the calibration's per-token mean), null without one
- lift = (mean + ε) / (background mean + ε), ε = ``LIFT_PRIOR`` × the calibration max: how many times
  its usual level the feature is active here (a ratio, so it needs no normalization; the score mode
  that put the most features of the prompt's own domain on top in ``tests/benchmarks/bench_quality.py``)
- score = the chosen mode on activations divided by the feature's calibration max
  (``normalization: "calibration_max"``; 1 where the calibration never saw the feature fire),
  or on raw activations when the SAE has no calibration (``normalization: "none"``)
- attribution = sum(attr): the first-order drop of the run's attribution target M were the feature removed
  at every analysed token (``ingest/attribution.py``), null for runs without a target; score modes
  ``attribution`` (what pushed M up) and ``attribution_abs`` (|sum|: what mattered either way) rank by it
  raw (no calibration normalization: it is in units of M)
- gate: coverage × 100 ≥ min_coverage_pct; ``restrict_features`` limits the candidates.
τ_f: a global ``tau``; else the calibration's P95 (or another ``tau_quantile``, computed exactly
like the P95) on ``tau_basis``: ``active`` (default) over the feature's nonzero activations, its
firing distribution — ``all`` over every calibration token, zeros included, which is 0 for nearly
every feature (most fire on a few % of tokens), so the gate would not gate; else 0
(``threshold_source: "none"``). A feature that never fired in calibration has τ = 0.

:class:`RankOptions` is the one definition of the ranking options: each field's help text and
inclusive bounds are in its metadata and its choices in its type, for the request model to compose.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import duckdb

from catalog.db import Catalog
from catalog.errors import CatalogError
from catalog.stats import P95_COLUMN, TauBasis, calibration_for, newest_stats_sql, quantile_sql

# lift's prior, a share of the feature's calibration max added to both means: it keeps a feature that
# (almost) never fired in calibration from an unbounded ratio, and leaves the score free of units
LIFT_PRIOR = 3e-4
ScoreMode = Literal["mean", "max", "mean×coverage", "selectivity", "lift", "attribution", "attribution_abs"]
SCORE_MODES: tuple[str, ...] = get_args(ScoreMode)
SCORE_EXPR = {
    "mean": "mean_n",
    "max": "max_n",
    "mean×coverage": "mean_n * coverage",
    "selectivity": "(mean - bg_mean) / divisor",
    "lift": f"(mean + {LIFT_PRIOR} * divisor) / (bg_mean + {LIFT_PRIOR} * divisor)",
    "attribution": "attribution",
    "attribution_abs": "abs(attribution)",
}
ATTRIBUTION_MODES = ("attribution", "attribution_abs")
SOURCE_PRIORITY = "CASE l.source WHEN 'lite' THEN 9 WHEN 'csv' THEN 3 WHEN 'delphi' THEN 2 " \
                  "WHEN 'neuronpedia' THEN 1 ELSE 5 END"

# help texts shared with DriftOptions (the same option means the same thing there)
SCORE_MODE_HELP = "ranking value"
MIN_COVERAGE_HELP = "coverage gate, a percentage 0-100 of analyzed tokens"
TAU_HELP = "global activity threshold instead of the calibrated per-feature P95"
TAU_QUANTILE_HELP = "another calibration quantile as threshold (on tau_basis)"
TAU_BASIS_HELP = ("what the calibrated quantile is taken over: active = the feature's nonzero activations "
                  "(its firing distribution), all = every calibration token, zeros included")
PROTO_LABELS_HELP = "attach the best catalog label"


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
    # selectivity's background: stored runs of background text (all tokens kept) instead of the
    # calibration mean; ``background_n`` is their total number of analysed tokens
    background_runs: list[int] = field(default_factory=list, metadata={"internal": True})
    background_n: int = field(default=0, metadata={"internal": True})
    # whose calibration gives τ, normalization and the background mean: this model's (rank_run sets
    # it to the run's model); None = the SAE's newest calibration of any model (drift shares one)
    model_key: int | None = field(default=None, metadata={"internal": True})


def _thresholds_sql(con: duckdb.DuckDBPyConnection, cals: dict[int, int | None], opts: RankOptions) -> tuple[str, str]:
    """A (τ per (sae_key, feature), threshold_source) pair: a SQL relation and its provenance
    (``calibration_p95`` / ``calibration_q<q>`` on the default basis, with ``_all`` appended on the
    all-token basis). ``cals``: each SAE key's calibration (None where there is none), as
    ``scored_sql`` found them."""
    if opts.tau is not None:
        return "SELECT NULL::INTEGER AS sae_key, NULL::INTEGER AS feature_id, NULL::DOUBLE AS tau WHERE false", "global"
    if not any(cals.values()):
        return "SELECT NULL::INTEGER AS sae_key, NULL::INTEGER AS feature_id, NULL::DOUBLE AS tau WHERE false", "none"
    suffix = "" if opts.tau_basis == "active" else f"_{opts.tau_basis}"
    q = opts.tau_quantile
    if q is None or q == 0.95:
        column = P95_COLUMN[opts.tau_basis]
        return (f"SELECT sae_key, feature_id, {column} AS tau FROM ({newest_stats_sql(cals)})",
                f"calibration_p95{suffix}")
    parts = [quantile_sql(con, cal, key, q, opts.tau_basis) for key, cal in cals.items() if cal is not None]
    return " UNION ALL ".join(parts), f"calibration_q{q:g}{suffix}"


@dataclass
class Scoring:
    """A per-(run, SAE, feature) scored relation: its SQL (one SELECT), parameters and provenance
    (``calibrations``: the calibration of each SAE key, None where there is none)."""

    sql: str
    params: dict
    threshold_source: str
    normalization: str
    has_background: bool
    calibrations: dict[int, int | None]


def calibrations_for(con, sae_keys: list[int], opts: RankOptions) -> dict[int, int | None]:
    """Each SAE key's calibration: the pinned ``calibration_id`` (which must hold statistics for every
    one of them), else the newest of ``opts.model_key``'s (:func:`catalog.stats.calibration_for`)."""
    if opts.calibration_id is None:
        return {k: calibration_for(con, k, opts.model_key) for k in sae_keys}
    held = {int(k) for (k,) in con.execute("SELECT DISTINCT sae_key FROM feature_stats WHERE calibration_id = ? "
                                           "AND list_contains(?, sae_key)", [opts.calibration_id, list(sae_keys)])
            .fetchall()}
    missing = [k for k in sae_keys if k not in held]
    if missing:
        hooks = con.execute("SELECT layer, stream FROM saes WHERE sae_key = ?", [missing[0]]).fetchone()
        raise CatalogError("calibration_id", f"calibration {opts.calibration_id} has no statistics for the SAE of "
                                             f"layer {hooks[0]} {hooks[1]}; calibrations that do: "
                                             f"{calibrations_of(con, missing[0]) or 'none'}")
    return {k: opts.calibration_id for k in sae_keys}


def calibrations_of(con, sae_key: int) -> str:
    """The ids of the calibrations holding statistics for an SAE key, as text for an error message."""
    ids = [str(c) for (c,) in con.execute("SELECT DISTINCT calibration_id FROM feature_stats WHERE sae_key = ? "
                                          "ORDER BY 1", [sae_key]).fetchall()]
    return ", ".join(ids)


def calibration_info(con, calibrations: dict[int, int | None]) -> dict | None:
    """The calibration a ranking used — the newest among its SAEs' — with its corpus, the corpus's hash
    and token count; None when no SAE was calibrated."""
    used = [c for c in calibrations.values() if c is not None]
    if not used:
        return None
    row = con.execute("SELECT calibration_id, corpus, corpus_hash, n_tokens FROM calibrations WHERE calibration_id = ?",
                      [max(used)]).fetchone()
    return dict(zip(("calibration_id", "corpus", "corpus_hash", "n_tokens"), row, strict=True))


def calibration_changes(con, run_keys: list[int], calibrations: dict[int, int | None]) -> dict[int, list[str]]:
    """Per run, a warning when its first ranking (``run_calibrations``) used another calibration than
    ``calibrations`` now does for one of its SAEs (scores, τ and lite labels may differ)."""
    rows = con.execute("""
        SELECT c.run_key, c.sae_key, c.calibration_id, s.layer, s.stream FROM run_calibrations c
        JOIN saes s USING (sae_key) WHERE list_contains(?, c.run_key) ORDER BY c.run_key, s.layer, s.stream""",
                       [list(run_keys)]).fetchall()
    out: dict[int, list[str]] = {}
    for run_key, sae_key, before, layer, stream in rows:
        now = calibrations.get(sae_key)
        if sae_key in calibrations and now != before:
            out.setdefault(run_key, []).append(
                f"calibration_id: this run was first ranked with calibration {before} (layer {layer} {stream}); "
                f"this ranking uses {now if now is not None else 'none'} — pass calibration_id {before} to "
                "reproduce the first ranking")
    return out


def scored_sql(con, sae_keys: list[int], opts: RankOptions, runs_sql: str, run_filter: str = "") -> Scoring:
    """The scoring rules above as one SQL relation over several runs (ranking and drift share it).

    ``runs_sql`` is a relation ``(run_key, n)``: the runs to score and each one's number of analysed
    tokens (the divisor of mean and coverage); ``run_filter`` an optional extra predicate on the
    activation scan (``a``), for zone-map pruning. The result has one row per (run_key, sae_key,
    feature_id) with a nonzero code that passes the coverage gate: mean, max, coverage, selectivity
    (null without a background), score. Its named parameters (``$saes``, ``$min_cov``, ``$restrict``)
    are in ``params``.
    """
    if opts.score_mode not in SCORE_MODES:
        raise CatalogError("score_mode", f"expected one of {', '.join(SCORE_MODES)}, got {opts.score_mode!r}")
    if opts.tau_basis not in P95_COLUMN:
        raise CatalogError("tau_basis", f"expected one of {', '.join(P95_COLUMN)}, got {opts.tau_basis!r}")
    calibrated = calibrations_for(con, sae_keys, opts)
    all_calibrated = all(calibrated.values())
    has_background = bool(opts.background_runs) or all_calibrated
    if opts.score_mode in ("selectivity", "lift") and not has_background:
        raise CatalogError("score_mode", f"{opts.score_mode} needs a background; calibrate the SAE first "
                           "(python -m sae_discover calibrate --sae ...), give background_text / background_file, "
                           "or pick another score_mode")
    thresholds, threshold_source = _thresholds_sql(con, calibrated, opts)
    normalization = "calibration_max" if all_calibrated else "none"
    tau_expr = f"{float(opts.tau)!r}" if opts.tau is not None else "coalesce(t.tau, 0)"
    divisor = "coalesce(nullif(s.max, 0), 1)" if normalization == "calibration_max" else "1"
    restrict = "AND list_contains($restrict, a.feature_id)" if opts.restrict_features else ""
    selectivity = "mean - bg_mean" if has_background else "NULL::DOUBLE"
    if opts.background_runs:  # mean over the background text's tokens (absent features: 0)
        background = """SELECT sae_key, feature_id, sum(act) / $bg_n AS bg_mean FROM activations
                        WHERE list_contains($bg_runs, run_key) AND list_contains($saes, sae_key)
                        GROUP BY sae_key, feature_id"""
        bg_expr = "coalesce(any_value(bg.bg_mean), 0)"
    else:  # the calibration's per-token mean
        background = "SELECT NULL::INTEGER AS sae_key, NULL::INTEGER AS feature_id, NULL::DOUBLE AS bg_mean WHERE false"
        bg_expr = "any_value(s.mean)"
    sql = f"""
        WITH thresholds AS ({thresholds}),
        stats AS ({newest_stats_sql(calibrated)}),
        background AS ({background}),
        scoring_runs AS ({runs_sql}),
        agg AS (
            SELECT a.run_key, a.sae_key, a.feature_id,
                   sum(a.act) / sr.n AS mean,
                   max(a.act) AS max,
                   count(*) FILTER (WHERE a.act > {tau_expr}) / sr.n AS coverage,
                   {bg_expr} AS bg_mean,
                   any_value({divisor}) AS divisor,
                   sum(a.attr)::DOUBLE AS attribution
            FROM activations a
            JOIN scoring_runs sr ON sr.run_key = a.run_key
            LEFT JOIN thresholds t ON t.sae_key = a.sae_key AND t.feature_id = a.feature_id
            LEFT JOIN stats s ON s.sae_key = a.sae_key AND s.feature_id = a.feature_id
            LEFT JOIN background bg ON bg.sae_key = a.sae_key AND bg.feature_id = a.feature_id
            WHERE list_contains($saes, a.sae_key) {restrict} {f"AND {run_filter}" if run_filter else ""}
            GROUP BY a.run_key, sr.n, a.sae_key, a.feature_id
        ),
        gated AS (
            SELECT *, mean / divisor AS mean_n, max / divisor AS max_n FROM agg
            WHERE coverage * 100 >= $min_cov
        )
        SELECT run_key, sae_key, feature_id, mean, max, coverage, {selectivity} AS selectivity, attribution,
               {SCORE_EXPR[opts.score_mode]} AS score
        FROM gated"""
    params: dict = {"saes": list(sae_keys), "min_cov": opts.min_coverage_pct}
    if opts.restrict_features:
        params["restrict"] = list(opts.restrict_features)
    if opts.background_runs:
        params.update(bg_runs=list(opts.background_runs), bg_n=float(max(opts.background_n, 1)))
    return Scoring(sql, params, threshold_source, normalization, has_background, calibrated)


def rank_run(catalog: Catalog, run_key: int, n_kept: int, sae_keys: list[int], opts: RankOptions) -> dict:
    """Rank one stored run's features; returns features (with layer/stream), and provenance fields.
    τ, normalization and the calibration background come from the run's own model's calibration."""
    return rank_runs(catalog, [(run_key, n_kept)], sae_keys, opts)[0]


def rank_runs(catalog: Catalog, runs: list[tuple[int, int]], sae_keys: list[int], opts: RankOptions) -> list[dict]:
    """Rank several stored runs ``(run_key, n_kept)`` with the same options and SAEs, as ``rank_run``
    would one by one, in a handful of statements for all of them (batch mode ranks a group at once)."""
    con = catalog.raw()
    try:
        model_of = dict(con.execute("SELECT run_key, model_key FROM runs WHERE list_contains(?, run_key)",
                                    [[k for k, _ in runs]]).fetchall())
        by_model: dict[int | None, list[tuple[int, int]]] = {}
        for run_key, n_kept in runs:
            by_model.setdefault(opts.model_key if opts.model_key is not None else model_of.get(run_key), []).append(
                (run_key, n_kept))
        ranked: dict[int, dict] = {}
        for model_key, members in by_model.items():
            unique = list(dict.fromkeys(members))  # a run listed twice is scored once (and not counted twice)
            ranked.update(_rank_model_runs(con, unique, sae_keys, replace(opts, model_key=model_key)))
        seen: set[int] = set()
        out = []
        for run_key, _ in runs:  # a repeated run gets its own copy: callers reshape their results in place
            out.append(copy.deepcopy(ranked[run_key]) if run_key in seen else ranked[run_key])
            seen.add(run_key)
        return out
    finally:
        con.close()


def _rank_model_runs(con, runs: list[tuple[int, int]], sae_keys: list[int], opts: RankOptions) -> dict[int, dict]:
    """``rank_runs`` for runs of one model (one calibration per SAE): run_key → ranked result."""
    run_keys = [k for k, _ in runs]
    if opts.score_mode in ATTRIBUTION_MODES:
        require_attributions(con, run_keys)
    scoring = scored_sql(con, sae_keys, opts, "SELECT unnest($runs)::INTEGER AS run_key, unnest($ns)::DOUBLE AS n",
                         run_filter=_runs_filter("a"))
    order = "score DESC, layer, stream, feature_id" if opts.merge_across_layers else "score DESC, feature_id"
    per = "run_key" if opts.merge_across_layers else "run_key, sae_key"
    sql = f"""
        WITH scored AS ({scoring.sql})
        SELECT r.run_key, r.sae_key, r.feature_id, r.mean, r.max, r.coverage, r.selectivity, r.attribution, r.score,
               sa.layer, sa.stream
        FROM scored r JOIN saes sa USING (sae_key)
        QUALIFY row_number() OVER (PARTITION BY {per} ORDER BY {order}) <= $top
        ORDER BY r.run_key, {"r.score DESC, sa.layer, sa.stream, r.feature_id" if opts.merge_across_layers
                             else "sa.layer, sa.stream, r.score DESC, r.feature_id"}
    """
    params = {**scoring.params, **_runs_params(run_keys), "ns": [float(max(n, 1)) for _, n in runs],
              "top": opts.return_top_x}
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    features = [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]
    if opts.attach_proto_labels:
        _attach_labels(con, features)
    if opts.attach_examples:
        _attach_spans(con, run_keys, features, opts.spans_per_feature, opts.span_window)
    info = calibration_info(con, scoring.calibrations)
    changes = calibration_changes(con, run_keys, scoring.calibrations)
    out = {k: {"features": [], "threshold_source": scoring.threshold_source, "normalization": scoring.normalization,
               "calibration": info, "calibrations": scoring.calibrations, "warnings": changes.get(k, [])}
           for k in run_keys}
    for f in features:
        out[f.pop("run_key")]["features"].append(f)
    return out


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


def best_labels_sql(where: str = "") -> str:
    """The best label per (sae_key, feature_id) as a relation (sae_key, feature_id, label): highest
    score (unscored last), then source priority (imported before lite), then the label text.
    ``where`` is an optional predicate over the labels table ``l``."""
    return f"""
        SELECT l.sae_key, l.feature_id,
               arg_min(l.label, (-coalesce(l.score, -1e300), {SOURCE_PRIORITY}, l.label)) AS label
        FROM labels l
        {f"WHERE {where}" if where else ""}
        GROUP BY l.sae_key, l.feature_id"""


def _attach_labels(con, features: list[dict]) -> None:
    """The best label per feature: highest score (unscored last), then source priority (imported before lite)."""
    if not features:
        return
    rows = con.execute(best_labels_sql("list_contains($keys, l.sae_key) AND list_contains($fids, l.feature_id)"),
                       {"keys": sorted({f["sae_key"] for f in features}),
                        "fids": sorted({f["feature_id"] for f in features})}).fetchall()
    best = {(k, f): label for k, f, label in rows}
    for f in features:
        f["proto_label"] = best.get((f["sae_key"], f["feature_id"]))


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
