"""Cross-model drift: the same SAE on the same prompts, two models (base vs tuned) — SQL over stored runs.

Definitions (every number below is computed in SQL; Python only shapes the rows):

- **Pairing.** A *prompt* is a (mode, text-or-prompt) pair; the base and tuned run sets are paired
  on it. Prompts with runs on one side only are left out of every figure and listed as ``unpaired``.
  Prompts are numbered by their first appearance in the base list, then the tuned list.
- **Per-run score** s_r(f): the score of ``catalog.ranking.scored_sql`` — exactly what ``discover``
  ranks by, with the same score_mode, τ, normalization (by default the calibration max) and coverage gate.
- **Per-prompt score** p(f) of a side: the mean of s_r(f) over that side's runs of the prompt (one
  run, unless the run lists hold several, e.g. seeds); a run where f is absent or gated out counts 0.
- **Aggregate score** A(f) of a side: the mean of p(f) over the P paired prompts, a prompt where f is
  absent counting 0 — i.e. sum over prompts / P. (With ``selectivity``, absent also counts 0.)
- **Features** of a scope (one prompt, or ``overall``): those present (scored, past the gate) in at
  least one of the scope's runs on either side. A side's features are those present on that side.
- **Rank** of a side: 1 = highest score, over the side's present features only (ties broken by layer,
  stream, feature id); null where the feature is absent on that side.
  ``rank_change = rank_base − rank_tuned`` (positive: the tuned model ranks it higher);
  ``score_change = A_tuned − A_base``.
- **Top-K** of a side: the features of rank ≤ K. **Jaccard@K** = |T_b ∩ T_t| / |T_b ∪ T_t| (null when
  both are empty).
- **Spearman** ρ: the Pearson correlation of the average ranks (ties share the mean of their
  positions) of A_base and A_tuned over U = T_b ∪ T_t, the union of both top-K — absent scores count
  0 there, as in the aggregate; equal to ``scipy.stats.spearmanr``. ``spearman_all`` is the same over
  every feature of the scope. Null when U has < 2 features or either ranking is constant; rounded to
  12 decimals (so identical rankings give exactly 1).
- **Flags** (features of U): ``gained`` — in the tuned top-K, not the base top-K, score_change >
  ``min_score_change`` and |score_change| ≥ ``min_relative_change`` × max(|A_base|, |A_tuned|)
  (default 0.5: the score at least doubled); ``lost`` — the mirror image; ``shifted`` — in both top-K
  with |rank_change| ≥ ``min_rank_shift`` (default max(1, ⌈K/5⌉)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from catalog import sandbox
from catalog.db import Catalog
from catalog.errors import CatalogError, hooks_text
from catalog.ranking import (
    ATTRIBUTION_MODES,
    MIN_COVERAGE_HELP,
    NORMALIZATION_HELP,
    PROTO_LABELS_HELP,
    SCORE_MODE_HELP,
    TAU_BASIS_HELP,
    TAU_HELP,
    TAU_QUANTILE_HELP,
    Normalization,
    RankOptions,
    ScoreMode,
    best_labels_sql,
    require_attributions,
    scored_sql,
)
from catalog.runs import resolve_run_id
from catalog.stats import TauBasis, calibration_for

RUN_FIELDS = "run_key, run_id, model_id, sae_id, mode, prompt, text, n_kept, created_at, attribution_target"


@dataclass
class DriftOptions:
    """Scoring (as in discovery) and the drift thresholds: the one definition of the drift options, each
    field's help text and inclusive bounds in its metadata (see :class:`~catalog.ranking.RankOptions`)."""

    score_mode: ScoreMode = field(default="mean×coverage", metadata={"help": SCORE_MODE_HELP})
    min_coverage_pct: float = field(default=0.5, metadata={"help": MIN_COVERAGE_HELP, "bounds": (0.0, 100.0)})
    tau: float | None = field(default=None, metadata={"help": TAU_HELP, "bounds": (0.0, 1e30)})
    tau_quantile: float | None = field(default=None, metadata={"help": TAU_QUANTILE_HELP, "bounds": (0.0, 1.0)})
    tau_basis: TauBasis = field(default="active", metadata={"help": TAU_BASIS_HELP})
    normalization: Normalization = field(default="calibration_max", metadata={"help": NORMALIZATION_HELP})
    top_k: int = field(default=50, metadata={
        "help": "size of each side's top-K feature set (Jaccard@K, Spearman, flags)", "bounds": (1, 100_000)})
    min_score_change: float = field(default=0.0, metadata={
        "help": "gained/lost need score_change above this", "bounds": (0.0, 1e30)})
    min_relative_change: float = field(default=0.5, metadata={
        "help": "gained/lost need |score_change| >= this × max(|A_base|, |A_tuned|) (0.5: the score at least doubled)",
        "bounds": (0.0, 2.0)})
    min_rank_shift: int | None = field(default=None, metadata={
        "help": "shifted needs |rank_change| >= this (default: max(1, ceil(top_k / 5)))", "bounds": (1, 2**31 - 1)})
    attach_proto_labels: bool = field(default=True, metadata={"help": PROTO_LABELS_HELP})
    calibration_id: int | None = field(default=None, metadata={
        "help": "pin the calibration that gives both sides τ and normalization (default: the base model's newest "
                "for each SAE); the report names the ones used", "bounds": (1, 2**31 - 1)})

    def rank_shift(self) -> int:
        return self.min_rank_shift if self.min_rank_shift is not None else max(1, math.ceil(self.top_k / 5))


# -- selecting runs -------------------------------------------------------------------------------

def _rows(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def runs_by_ids(catalog: Catalog, run_ids: list[str], field: str) -> list[dict]:
    """The stored runs with these ids (or unique prefixes of at least 6 hex characters), in the given
    order (duplicates dropped); unknown ids are an error."""
    full = []
    for run_id in run_ids:
        try:
            full.append(resolve_run_id(catalog, run_id))
        except CatalogError as exc:  # its kind kept (an unknown run is a 404 on the API)
            raise type(exc)(field, exc.message) from None
    run_ids = full
    con = catalog.raw()
    try:
        rows = _rows(con.execute(f"SELECT {RUN_FIELDS} FROM v_runs WHERE list_contains($ids, run_id)",
                                 {"ids": list(run_ids)}))
    finally:
        con.close()
    by_id = {r["run_id"]: r for r in rows}
    missing = [i for i in run_ids if i not in by_id]
    if missing:
        raise CatalogError(field, f"no run {missing[0]!r} in {catalog.path}"
                           + (f" (and {len(missing) - 1} more unknown ids)" if len(missing) > 1 else ""))
    return [by_id[i] for i in dict.fromkeys(run_ids)]


def runs_where(catalog: Catalog, where: str, field: str, limits: sandbox.Limits | None = None) -> list[dict]:
    """The stored runs matching a SQL boolean expression over ``v_runs`` columns, oldest first.

    The filter is user-written SQL: :func:`catalog.sandbox.filter_rows` parses it as one expression and
    evaluates it on a locked-down in-memory copy of the ``v_runs`` rows (no other table, no file, no
    sequence, within ``limits``); only the matching run keys come back to this catalog's connection.
    """
    con = catalog.raw()
    try:
        view = con.sql("SELECT * FROM v_runs").to_arrow_table()
    finally:
        con.close()
    keys = sandbox.filter_rows(view, "v_runs", where, field, "run_key", limits)
    if not keys:
        raise CatalogError(field, f"the filter {where!r} matches no run in {catalog.path}")
    con = catalog.raw()
    try:
        return _rows(con.execute(f"SELECT {RUN_FIELDS} FROM v_runs WHERE list_contains($keys, run_key) "
                                 "ORDER BY created_at, run_key", {"keys": [int(k) for k in keys]}))
    finally:
        con.close()


def common_saes(catalog: Catalog, runs: list[dict], layers: list[int] | None, streams: list[str] | None,
                sae_id: str | None = None) -> list[dict]:
    """The SAEs (sae_key, layer, stream) every run shares, restricted to ``layers`` × ``streams``.

    Every run must come from the same SAE source, and each selected hook must have been encoded by
    the same SAE weights in every run (else the scores would not compare).
    """
    ids = sorted({r["sae_id"] for r in runs})
    if sae_id is not None and ids != [sae_id]:
        raise CatalogError("sae_id", f"the runs used SAE source(s) {ids}, not {sae_id!r}")
    if len(ids) > 1:
        raise CatalogError("sae_id", f"the runs used different SAE sources {ids}; drift compares one SAE")
    con = catalog.raw()
    try:
        rows = _rows(con.execute("""
            SELECT rs.run_key, s.sae_key, s.layer, s.stream, s.fingerprint
            FROM run_saes rs JOIN saes s USING (sae_key) WHERE list_contains($keys, rs.run_key)""",
                                 {"keys": [r["run_key"] for r in runs]}))
    finally:
        con.close()
    hooks: dict[int, dict[tuple[int, str], int]] = {r["run_key"]: {} for r in runs}
    for row in rows:
        hooks[row["run_key"]][(row["layer"], row["stream"])] = row["sae_key"]
    run_id = {r["run_key"]: r["run_id"] for r in runs}

    def wanted(hook: tuple[int, str]) -> bool:
        return (layers is None or hook[0] in layers) and (streams is None or hook[1] in streams)

    if not hooks:
        raise CatalogError("base_runs", "no runs to compare")
    if layers is None and streams is None:  # every hook all the runs share
        selected = set.intersection(*(set(h) for h in hooks.values()))
    elif layers is not None and streams is not None:  # exactly these pairs
        selected = {(layer, stream) for layer in layers for stream in streams}
    else:  # the hooks of the given layers (or streams) that any run has; each must be in every run
        selected = {h for hs in hooks.values() for h in hs if wanted(h)}
    if not selected:
        have = sorted(set.union(*(set(h) for h in hooks.values())))
        among = " among the selected layers/streams" if layers or streams else ""
        field = "streams" if streams and not layers else "layers"  # the selection that left nothing
        raise CatalogError(field, f"the runs share no SAE hook{among}; they have {have}")
    out = []
    for hook in sorted(selected):
        keys = {}
        for run_key, hs in hooks.items():
            if hook not in hs:
                raise CatalogError("layers", f"run {run_id[run_key]} has no SAE for layer {hook[0]} {hook[1]} "
                                   f"(it has {hooks_text(hs)}); pick layers/streams every run has")
            keys.setdefault(hs[hook], run_id[run_key])
        if len(keys) > 1:
            raise CatalogError("sae_id", f"layer {hook[0]} {hook[1]} was encoded by different SAE weights across "
                               f"the runs (e.g. runs {' and '.join(sorted(keys.values())[:2])}); drift needs the same SAE")
        out.append({"sae_key": next(iter(keys)), "layer": hook[0], "stream": hook[1]})
    return out


# -- the drift SQL --------------------------------------------------------------------------------

PAIRING_CTES = """
    WITH side_list AS (
        SELECT 'base' AS side, i AS ord, $base[i] AS run_key FROM generate_series(1, len($base)) t(i)
        UNION ALL
        SELECT 'tuned' AS side, len($base) + i AS ord, $tuned[i] AS run_key FROM generate_series(1, len($tuned)) t(i)
    ),
    members AS (
        SELECT s.side, s.run_key, min(s.ord) AS ord, any_value(r.run_id) AS run_id, any_value(r.mode) AS mode,
               any_value(coalesce(r.text, r.prompt)) AS content, any_value(r.text IS NOT NULL) AS is_text,
               greatest(any_value(r.n_kept), 1)::DOUBLE AS n
        FROM side_list s JOIN runs r USING (run_key)
        GROUP BY s.side, s.run_key
    ),
    prompts AS (
        SELECT mode, content, any_value(is_text) AS is_text, row_number() OVER (ORDER BY min(ord)) AS prompt_idx,
               list(run_id ORDER BY ord) FILTER (WHERE side = 'base') AS base_run_ids,
               list(run_id ORDER BY ord) FILTER (WHERE side = 'tuned') AS tuned_run_ids
        FROM members GROUP BY mode, content
        HAVING bool_or(side = 'base') AND bool_or(side = 'tuned')
    )"""


def _prefix(scoring_sql: str) -> str:
    """The CTEs every drift query shares; ``compared`` holds one row per (scope, feature)."""
    return PAIRING_CTES + f""",
    pair_runs AS (
        SELECT m.side, m.run_key, m.n, p.prompt_idx, count(*) OVER (PARTITION BY m.side, p.prompt_idx) AS n_runs
        FROM members m JOIN prompts p USING (mode, content)
    ),
    scored AS ({scoring_sql}),
    prompt_scores AS (
        SELECT pr.side, pr.prompt_idx AS scope, s.sae_key, s.feature_id,
               sum(s.score ORDER BY pr.run_key) / any_value(pr.n_runs) AS score, 1 AS n_prompts
        FROM pair_runs pr JOIN scored s USING (run_key)
        GROUP BY pr.side, pr.prompt_idx, s.sae_key, s.feature_id
    ),
    scope_scores AS (
        SELECT side, scope, sae_key, feature_id, score, n_prompts FROM prompt_scores
        UNION ALL
        SELECT side, 0 AS scope, sae_key, feature_id,
               sum(score ORDER BY scope) / (SELECT count(*) FROM prompts) AS score, count(*) AS n_prompts
        FROM prompt_scores GROUP BY side, sae_key, feature_id
    ),
    universe AS (
        SELECT scope, sae_key, feature_id,
               coalesce(any_value(score) FILTER (WHERE side = 'base'), 0) AS score_base,
               coalesce(any_value(score) FILTER (WHERE side = 'tuned'), 0) AS score_tuned,
               bool_or(side = 'base') AS present_base, bool_or(side = 'tuned') AS present_tuned,
               coalesce(any_value(n_prompts) FILTER (WHERE side = 'base'), 0) AS prompts_base,
               coalesce(any_value(n_prompts) FILTER (WHERE side = 'tuned'), 0) AS prompts_tuned
        FROM scope_scores GROUP BY scope, sae_key, feature_id
    ),
    ranked AS (
        SELECT u.*, sa.layer, sa.stream,
               CASE WHEN present_base THEN row_number() OVER (PARTITION BY scope
                   ORDER BY present_base DESC, score_base DESC, sa.layer, sa.stream, u.feature_id) END AS rank_base,
               CASE WHEN present_tuned THEN row_number() OVER (PARTITION BY scope
                   ORDER BY present_tuned DESC, score_tuned DESC, sa.layer, sa.stream, u.feature_id) END AS rank_tuned
        FROM universe u JOIN saes sa USING (sae_key)
    ),
    tops AS (
        SELECT *, coalesce(rank_base <= $k, false) AS top_base, coalesce(rank_tuned <= $k, false) AS top_tuned,
               score_tuned - score_base AS score_change, rank_base - rank_tuned AS rank_change,
               abs(score_tuned - score_base) >= $min_rel * greatest(abs(score_base), abs(score_tuned)) AS big_change
        FROM ranked
    ),
    compared AS (
        SELECT *,
               CASE WHEN top_tuned AND NOT top_base AND score_change > $min_change AND big_change THEN 'gained'
                    WHEN top_base AND NOT top_tuned AND -score_change > $min_change AND big_change THEN 'lost'
                    WHEN top_base AND top_tuned AND abs(rank_change) >= $min_shift THEN 'shifted'
               END AS flag
        FROM tops
    )"""


METRICS_SQL = """,
    sets AS (
        SELECT 'union' AS cmp, scope, score_base, score_tuned FROM compared WHERE top_base OR top_tuned
        UNION ALL
        SELECT 'all' AS cmp, scope, score_base, score_tuned FROM compared
    ),
    avg_ranks AS (
        SELECT cmp, scope,
               rank() OVER (PARTITION BY cmp, scope ORDER BY score_base)
                   + (count(*) OVER (PARTITION BY cmp, scope, score_base) - 1) / 2.0 AS rb,
               rank() OVER (PARTITION BY cmp, scope ORDER BY score_tuned)
                   + (count(*) OVER (PARTITION BY cmp, scope, score_tuned) - 1) / 2.0 AS rt
        FROM sets
    ),
    rho AS (
        SELECT cmp, scope,
               CASE WHEN count(*) < 2 OR var_pop(rb) = 0 OR var_pop(rt) = 0 THEN NULL ELSE round(corr(rb, rt), 12) END AS rho
        FROM avg_ranks GROUP BY cmp, scope
    ),
    metrics AS (
        SELECT scope,
               count(*) FILTER (WHERE present_base) AS n_features_base,
               count(*) FILTER (WHERE present_tuned) AS n_features_tuned,
               count(*) FILTER (WHERE top_base AND top_tuned) AS n_top_both,
               count(*) FILTER (WHERE top_base OR top_tuned) AS n_top_union,
               count(*) FILTER (WHERE top_base AND top_tuned)
                   / nullif(count(*) FILTER (WHERE top_base OR top_tuned), 0) AS jaccard,
               count(*) FILTER (WHERE flag = 'gained') AS n_gained,
               count(*) FILTER (WHERE flag = 'lost') AS n_lost,
               count(*) FILTER (WHERE flag = 'shifted') AS n_shifted
        FROM compared GROUP BY scope
    ),
    scopes AS (
        SELECT 0 AS scope, NULL AS mode, NULL AS content, NULL AS is_text, NULL AS base_run_ids, NULL AS tuned_run_ids
        UNION ALL
        SELECT prompt_idx, mode, content, is_text, base_run_ids, tuned_run_ids FROM prompts
    )
    SELECT sc.*, coalesce(m.n_features_base, 0) AS n_features_base, coalesce(m.n_features_tuned, 0) AS n_features_tuned,
           coalesce(m.n_top_both, 0) AS n_top_both, coalesce(m.n_top_union, 0) AS n_top_union, m.jaccard,
           (SELECT rho FROM rho WHERE cmp = 'union' AND rho.scope = sc.scope) AS spearman,
           (SELECT rho FROM rho WHERE cmp = 'all' AND rho.scope = sc.scope) AS spearman_all,
           coalesce(m.n_gained, 0) AS n_gained, coalesce(m.n_lost, 0) AS n_lost, coalesce(m.n_shifted, 0) AS n_shifted
    FROM scopes sc LEFT JOIN metrics m USING (scope)
    ORDER BY sc.scope"""

FEATURE_COLUMNS = ("layer", "stream", "feature_id", "flag", "score_base", "score_tuned", "score_change", "rank_base",
                   "rank_tuned", "rank_change", "top_base", "top_tuned", "prompts_base", "prompts_tuned")


def _features_sql(labels: bool) -> str:
    """The flagged features; with ``labels``, each one's best label, lite labels from the calibration
    the comparison used for its SAE (``$label_keys`` → ``$label_cals``)."""
    label_join = f"""LEFT JOIN ({best_labels_sql(
        "SELECT DISTINCT c2.sae_key, c2.feature_id, h.cal FROM compared c2 "
        "JOIN (SELECT unnest($label_keys) AS sae_key, unnest($label_cals)::INTEGER AS cal) h USING (sae_key) "
        "WHERE c2.scope = 0 AND (c2.top_base OR c2.top_tuned)")}) bl
        ON bl.sae_key = c.sae_key AND bl.feature_id = c.feature_id""" if labels else ""
    return f"""
    SELECT c.sae_key, {", ".join(f"c.{name}" for name in FEATURE_COLUMNS)},
           {"bl.label" if labels else "NULL::VARCHAR"} AS proto_label
    FROM compared c {label_join}
    WHERE c.scope = 0 AND (c.top_base OR c.top_tuned)
    ORDER BY c.score_change DESC, c.layer, c.stream, c.feature_id"""


UNPAIRED_SQL = """
    SELECT m.side, m.run_id, m.mode, m.content FROM members m
    WHERE NOT EXISTS (SELECT 1 FROM prompts p WHERE p.mode = m.mode AND p.content = m.content)
    ORDER BY m.ord"""


def drift(catalog: Catalog, base_run_keys: list[int], tuned_run_keys: list[int], sae_keys: list[int],
          opts: DriftOptions) -> dict:
    """Compare two run sets over the given SAEs; see the module docstring for every definition."""
    if opts.top_k < 1:
        raise CatalogError("top_k", f"expected a positive integer, got {opts.top_k}")
    if not base_run_keys or not tuned_run_keys:
        raise CatalogError("base_runs" if not base_run_keys else "tuned_runs", "no runs to compare")
    con = catalog.raw()
    try:
        base_models = [r[0] for r in con.execute("SELECT DISTINCT model_key FROM runs WHERE list_contains(?, run_key)",
                                                 [base_run_keys]).fetchall()]
        shared = base_models[0] if len(base_models) == 1 else None  # the base model's calibration serves both
        if shared is not None and not all(calibration_for(con, k, shared) for k in sae_keys):
            shared = None  # else the SAE's newest calibration of any model
        if opts.score_mode in ATTRIBUTION_MODES:
            require_attributions(con, [*base_run_keys, *tuned_run_keys])
        rank_opts = RankOptions(score_mode=opts.score_mode, min_coverage_pct=opts.min_coverage_pct, tau=opts.tau,
                                tau_quantile=opts.tau_quantile, tau_basis=opts.tau_basis, model_key=shared,
                                calibration_id=opts.calibration_id, normalization=opts.normalization)
        scoring = scored_sql(con, sae_keys, rank_opts, list(dict.fromkeys([*base_run_keys, *tuned_run_keys])))
        prefix = _prefix(scoring.relation())  # every run on the same calibrations: one provenance for all
        params = {**scoring.params, "base": [int(k) for k in base_run_keys], "tuned": [int(k) for k in tuned_run_keys],
                  "k": int(opts.top_k), "min_change": float(opts.min_score_change),
                  "min_rel": float(opts.min_relative_change), "min_shift": int(opts.rank_shift())}
        unpaired = _rows(con.execute(PAIRING_CTES + UNPAIRED_SQL, {k: params[k] for k in ("base", "tuned")}))
        metrics = _rows(con.execute(prefix + METRICS_SQL, params))
        cals = next(iter(scoring.calibrations.values()))  # every run on the same calibrations
        features = _rows(con.execute(prefix + _features_sql(opts.attach_proto_labels),
                                     {**params, **({"label_keys": list(cals), "label_cals": list(cals.values())}
                                                   if opts.attach_proto_labels else {})}))
    finally:
        con.close()
    overall, *prompts = metrics
    if not prompts:
        raise CatalogError("base_runs", "no prompt has runs on both sides (runs are paired by mode and prompt/text)")
    for row in metrics:
        for name in ("spearman", "spearman_all", "jaccard"):
            row[name] = None if row[name] is None or math.isnan(row[name]) else float(row[name])
    for f in features:
        for name in ("score_base", "score_tuned", "score_change"):
            f[name] = float(f[name])
    flagged = {
        "gained": sorted((f for f in features if f["flag"] == "gained"), key=lambda f: -f["score_change"]),
        "lost": sorted((f for f in features if f["flag"] == "lost"), key=lambda f: f["score_change"]),
        "shifted": sorted((f for f in features if f["flag"] == "shifted"), key=lambda f: -abs(f["rank_change"])),
    }
    return {"threshold_source": next(iter(scoring.threshold_source.values())),
            "calibration_ids": sorted({c for c in cals.values() if c is not None}),
            "normalization": next(iter(scoring.normalization.values())),
            "overall": {k: v for k, v in overall.items() if k not in ("mode", "content", "is_text", "base_run_ids",
                                                                     "tuned_run_ids", "scope")} | {"n_prompts": len(prompts)},
            "prompts": prompts, "features": features, "flagged": flagged, "unpaired": unpaired}
