"""The scoring rules of ``catalog/ranking.py`` as DuckDB table macros: the one implementation of scoring.

Discovery's ranking, ``runs rank``, drift and a user's ``sql`` query all run these macros (stored in
the catalog by migrations 0005–0008 and 0011–0013, so plain ``duckdb`` sees them too):

- ``scoring_hooks(run_ids, calibration_id, sae_keys, calibration_model)``: one row per (run, SAE) to
  score, with the run's analysed-token count ``n`` (n_kept, at least 1), the calibration that gives τ,
  normalization and the background mean (``calibration_id``: the pinned one, else the newest
  calibration of the run's own model holding statistics for that SAE), ``all_calibrated`` (every SAE
  of the run has one: normalization by the calibration max, and a calibration background) and
  ``batch_n`` (the analysed tokens of the scored runs of the run's model, for ``background := 'batch'``);
- ``scored_features(run_ids, …)``: one row per (run, SAE, feature) with a nonzero code that passes the
  coverage gate: mean, max, coverage, selectivity, attribution, score, τ, calibration, normalization;
- ``feature_scores(run_ids, …)``: the same with run id, layer, stream, SAE id and the ranks within the
  run (``rank``: over all its hooks, ties by layer, stream, feature; ``hook_rank``: within its hook,
  ties by feature) — the public one, documented in the README.

Parameters (named, all optional but ``run_ids``, a list of run ids): ``score_mode``,
``min_coverage_pct``, ``tau``, ``tau_quantile``, ``tau_basis``, ``calibration_id``, ``background``
(``calibration`` | ``batch``), ``normalization`` (``calibration_max`` | ``sae_median_max`` | ``none``),
``restrict_features`` (feature ids), ``background_runs`` (run ids of
stored background text); internal, for the Python layer: ``sae_keys`` (the SAEs to score, default
each run's own) and ``calibration_model`` (whose calibrations: NULL = each run's model, 0 = any
model, else that model_key). Macro parameters shadow unqualified column names of the same name, so
every column below is qualified.

The macros refuse, with ``error('<argument>: …')``, what they cannot score — an unknown choice, a number
out of range, an attribution mode over a run without attributions, a batch background over a model's
lone run — in filters, not in the score column, so the refusal does not depend on the columns a query
selects (the Python layer checks the same first, with its own messages).

Migration texts are frozen: changing :data:`MACROS` needs a new migration that recreates the macros
with the new text (``tests/test_ranking_properties.py`` compares it with a freshly migrated catalog's).
"""

from __future__ import annotations

# lift's prior, a share of the feature's calibration max added to both means: it keeps a feature that
# (almost) never fired in calibration from an unbounded ratio, and leaves the score free of units
LIFT_PRIOR = 3e-4
SCORE_EXPR = {
    "mean": "g.mean_n",
    "max": "g.max_n",
    "mean×coverage": "g.mean_n * g.coverage",
    "selectivity": "g.selectivity / g.divisor",
    "lift": f"(g.mean + {LIFT_PRIOR} * g.fmax) / (g.bg_mean + {LIFT_PRIOR} * g.fmax)",
    "attribution": "g.attribution",
    "attribution_abs": "abs(g.attribution)",
    "context": "coalesce(cx.support, 0)",  # CONTEXT_CTES
}
def sql_items(values) -> str:
    """Values as the items of an SQL list or ``IN (…)``: ``'a', 'b'``."""
    return ", ".join(f"'{v}'" for v in values)


NEEDS_BACKGROUND = ("selectivity", "lift", "context")
ATTRIBUTION_MODES = ("attribution", "attribution_abs")  # scores in units of the target M: never normalized
# scores no divisor changes: attributions (units of M) and the ratios (lift's prior is a share of the
# feature's own calibration max whatever the normalization): their rows say normalization 'none'
UNNORMALIZED_MODES = (*ATTRIBUTION_MODES, "lift", "context")
NEEDS_CALIBRATION = ("context",)  # the calibration's documents say how features are active together
WHEN = " " * 21  # the indentation of the CASE's branches in the macro text
# (an unknown score_mode never gets here: scored_features' first CTE refuses it, whatever is selected)
SCORE_CASE = "CASE score_mode\n" + "".join(f"{WHEN}WHEN '{mode}' THEN {expr}\n" for mode, expr in SCORE_EXPR.items()) \
    + f"{WHEN[:-2]}END"

KNOWN_MODES = "[" + sql_items(list(SCORE_EXPR)[:4]) + ",\n" + " " * 24 \
    + sql_items(list(SCORE_EXPR)[4:]) + "]"  # a list literal over two lines of the macro text
SCORING_PARAMS = """score_mode := 'mean×coverage', min_coverage_pct := 0.5, tau := NULL,
                  tau_quantile := NULL, tau_basis := 'active', calibration_id := NULL, background := 'calibration',
                  normalization := 'calibration_max', restrict_features := NULL, background_runs := NULL,
                  sae_keys := NULL, calibration_model := NULL"""
PASSED = ("score_mode", "min_coverage_pct", "tau", "tau_quantile", "tau_basis", "calibration_id", "background",
          "normalization", "restrict_features", "background_runs", "sae_keys", "calibration_model")
PASS_PARAMS = ",\n                         ".join(", ".join(f"{p} := {p}" for p in PASSED[i:i + 2])
                                                 for i in range(0, len(PASSED), 2))

# The one implementation of a calibration's per-feature quantiles, as CTEs a statement includes (writing a
# calibration stores its P95s with them, catalog/stats.py; scored_features computes another
# ``tau_quantile`` with them): the statement defines ``quantile_of(cal, sae_key, n)``, the (calibration,
# SAE) pairs to compute with the calibration's token count, and gets ``quantiles``: per feature that
# fired, both q-quantiles, exact (numpy's ``percentile``, DuckDB's quantile_cont), from its sparse
# nonzero rows — ``q_active`` over the nonzeros alone (its firing distribution), ``q_all`` over its dense
# column, zeros included — and its nonzero count ``k``, ``total`` and ``max``. With n tokens and k
# nonzeros (all codes are >= 0) the sorted dense column is n-k zeros then the nonzeros ascending, so
# dense index i holds the (i-(n-k))-th nonzero, or 0 when i < n-k; its q-quantile interpolates linearly
# between the dense indices lo = floor((n-1)q) and hi = lo+1 (numpy's default). ``{q}``: the quantile,
# a DOUBLE expression constant in the statement (quantile_cont needs one).
QUANTILES_CTES = """
    quantile_pairs AS (
        SELECT x.cal, x.sae_key, x.n, floor(x.h)::BIGINT AS lo, least(floor(x.h)::BIGINT + 1, x.n - 1) AS hi,
               x.h - floor(x.h)::BIGINT AS frac
        FROM (SELECT o.cal, o.sae_key, o.n, (o.n - 1) * {q} AS h
              FROM quantile_of o) x
    ),
    quantile_ranked AS (
        SELECT a.calibration_id AS cal, a.sae_key, a.feature_id, a.act,
               row_number() OVER (PARTITION BY a.calibration_id, a.sae_key, a.feature_id ORDER BY a.act) - 1 AS r,
               count(*) OVER (PARTITION BY a.calibration_id, a.sae_key, a.feature_id) AS k
        FROM calibration_activations a
        SEMI JOIN quantile_pairs p ON p.cal = a.calibration_id AND p.sae_key = a.sae_key
    ),
    quantiles AS (
        SELECT q.cal, q.sae_key, q.feature_id, any_value(q.k) AS k, sum(q.act) AS total, max(q.act) AS max,
               quantile_cont(q.act::DOUBLE, {q}) AS q_active,
               coalesce(max(q.act) FILTER (WHERE p.n - q.k + q.r = p.lo), 0)
                   + any_value(p.frac) * (coalesce(max(q.act) FILTER (WHERE p.n - q.k + q.r = p.hi), 0)
                                          - coalesce(max(q.act) FILTER (WHERE p.n - q.k + q.r = p.lo), 0)) AS q_all
        FROM quantile_ranked q JOIN quantile_pairs p ON p.cal = q.cal AND p.sae_key = q.sae_key
        GROUP BY q.cal, q.sae_key, q.feature_id
    )"""

# score_mode 'context': the support a feature gets from the other scored features of its run and SAE,
# Σ_g lift_g · max(0, r(f, g)) / Σ_g lift_g over the run's scored features g ≠ f (the denominator over
# all of them, f too; the score is this × min(1, lift_f)), where r is the correlation of the two
# features' activity over the documents of the calibration that gives f its τ: Pearson's r of
# x_f = √(f's activation mass in the document), over all N documents (0 where f did not fire):
# r = (N·Σx_f·x_g − Σx_f·Σx_g) / √((N·Σx_f² − (Σx_f)²)(N·Σx_g² − (Σx_g)²)), NULL where undefined: the same
# mass in every document, or so nearly the same (x varying by less than ~0.1 %: N·Σx² − (Σx)² below
# 10⁻⁶·N·Σx²) that the difference of sums is float noise (its digits are lost) — a constant feature.
# The square root steadies the variance of a count-like mass (a few heavy documents would decide a
# plain r), and r of √(c·mass) is r of √mass: free of each feature's units.
# A feature the prompt's other lifted features are usually active with ranks high; a generic,
# positional or stray one (a word used in another sense than the corpus uses it) gets little support.
# Documents where one of the two is silent add 0 to Σx_f·x_g, so only pairs active in a same document
# are joined; every CTE is empty in the other modes.
# the quantile scored_features computes: clamped to [0, 1], as quantile_cont refuses others while binding
# the statement, before the hooks' check could name tau_quantile (which refuses them first)
CHECKED_QUANTILE = "least(greatest(coalesce(tau_quantile, 0.95)::DOUBLE, 0), 1)"

CONTEXT_CTES = f"""
    context_features AS (
        SELECT DISTINCT g.cal, g.sae_key, g.feature_id FROM gated g WHERE score_mode = 'context'
    ),
    context_mass AS (  -- x: √ of their activation mass in each calibration document they fired in
        SELECT a.calibration_id AS cal, a.sae_key, a.doc, a.feature_id, fsum(a.act::DOUBLE) AS mass,
               sqrt(fsum(a.act::DOUBLE)) AS x
        FROM calibration_activations a
        SEMI JOIN context_features c
             ON c.cal = a.calibration_id AND c.sae_key = a.sae_key AND c.feature_id = a.feature_id
        GROUP BY a.calibration_id, a.sae_key, a.doc, a.feature_id
    ),
    context_n AS (
        SELECT t.calibration_id AS cal, count(DISTINCT t.doc)::DOUBLE AS n
        FROM calibration_tokens t SEMI JOIN context_features c ON c.cal = t.calibration_id
        GROUP BY t.calibration_id
    ),
    context_sums AS (  -- spread: N·Σx² − (Σx)², NULL where x is (nearly) the same in every document
        SELECT s.cal, s.sae_key, s.feature_id, s.sx,
               CASE WHEN n.n * s.sxx - s.sx * s.sx > 1e-6 * n.n * s.sxx THEN n.n * s.sxx - s.sx * s.sx END AS spread
        FROM (SELECT m.cal, m.sae_key, m.feature_id, fsum(m.x) AS sx, fsum(m.mass) AS sxx FROM context_mass m
              GROUP BY m.cal, m.sae_key, m.feature_id) s
        JOIN context_n n ON n.cal = s.cal
    ),
    context_pairs AS (  -- each unordered pair once (f < g): r is symmetric
        SELECT p.cal, p.sae_key, p.feature_id AS f, q.feature_id AS g, fsum(p.x * q.x) AS sxy
        FROM context_mass p JOIN context_mass q
             ON q.cal = p.cal AND q.sae_key = p.sae_key AND q.doc = p.doc AND q.feature_id > p.feature_id
        GROUP BY p.cal, p.sae_key, p.feature_id, q.feature_id
    ),
    context_r AS (  -- NULL where undefined
        SELECT x.cal, x.sae_key, x.f, x.g, (n.n * x.sxy - cf.sx * cg.sx) / sqrt(cf.spread * cg.spread) AS r
        FROM context_pairs x JOIN context_n n ON n.cal = x.cal
        JOIN context_sums cf ON cf.cal = x.cal AND cf.sae_key = x.sae_key AND cf.feature_id = x.f
        JOIN context_sums cg ON cg.cal = x.cal AND cg.sae_key = x.sae_key AND cg.feature_id = x.g
    ),
    context_links AS (  -- both orientations of every pair more active together than by chance (r > 0)
        SELECT l.cal, l.sae_key, l.f, l.g, l.r FROM context_r l WHERE l.r > 0
        UNION ALL
        SELECT l.cal, l.sae_key, l.g, l.f, l.r FROM context_r l WHERE l.r > 0
    ),
    context_weights AS (
        SELECT g.run_key, g.sae_key, g.feature_id, g.cal, {SCORE_EXPR["lift"]} AS lift
        FROM gated g WHERE score_mode = 'context'
    ),
    context AS (
        SELECT x.run_key, x.sae_key, x.feature_id,  -- less active here than usual: not what the prompt used
               fsum(y.lift * p.r) / any_value(t.total) * least(1, any_value(x.lift)) AS support
        FROM context_weights x
        JOIN context_weights y ON y.run_key = x.run_key AND y.sae_key = x.sae_key
        JOIN context_links p ON p.cal = x.cal AND p.sae_key = x.sae_key AND p.f = x.feature_id AND p.g = y.feature_id
        JOIN (SELECT w.run_key, w.sae_key, fsum(w.lift) AS total FROM context_weights w
              GROUP BY w.run_key, w.sae_key) t ON t.run_key = x.run_key AND t.sae_key = x.sae_key
        GROUP BY x.run_key, x.sae_key, x.feature_id
    )"""

SCORING_HOOKS = """
CREATE OR REPLACE MACRO scoring_hooks(run_ids, calibration_id := NULL, sae_keys := NULL, calibration_model := NULL)
AS TABLE
    WITH scored_runs AS (
        SELECT r.run_key, r.run_id, r.model_key, greatest(r.n_kept, 1)::DOUBLE AS n,
               sum(greatest(r.n_kept, 1)::DOUBLE) OVER (PARTITION BY r.model_key) AS batch_n
        FROM runs r WHERE list_contains(run_ids, r.run_id)
    ),
    hooks AS (
        SELECT sr.*, k.sae_key FROM scored_runs sr
        CROSS JOIN (SELECT DISTINCT unnest(sae_keys)::INTEGER AS sae_key) k
        UNION ALL
        SELECT sr.*, rs.sae_key FROM scored_runs sr JOIN run_saes rs ON rs.run_key = sr.run_key
        WHERE sae_keys IS NULL
    ),
    held AS (
        SELECT cs.calibration_id AS cal, cs.sae_key, c.model_key
        FROM calibration_saes cs JOIN calibrations c ON c.calibration_id = cs.calibration_id
    ),
    chosen AS (
        SELECT h.run_key, h.run_id, h.model_key, h.n, h.batch_n, h.sae_key,
               CASE WHEN calibration_id IS NULL
                    THEN max(held.cal) FILTER (WHERE calibration_model = 0
                                               OR held.model_key = coalesce(calibration_model, h.model_key))
                    ELSE max(held.cal) FILTER (WHERE held.cal = calibration_id) END AS cal
        FROM hooks h LEFT JOIN held ON held.sae_key = h.sae_key
        GROUP BY h.run_key, h.run_id, h.model_key, h.n, h.batch_n, h.sae_key
    )
    SELECT c.run_key, c.run_id, c.model_key, c.n, c.batch_n, c.sae_key,
           CASE WHEN calibration_id IS NOT NULL AND c.cal IS NULL
                THEN error('calibration_id: calibration ' || calibration_id || ' has no statistics for sae_key '
                           || c.sae_key)
                ELSE c.cal END AS calibration_id,
           bool_and(c.cal IS NOT NULL) OVER (PARTITION BY c.run_key) AS all_calibrated
    FROM chosen c"""

SCORED_FEATURES = f"""
CREATE OR REPLACE MACRO scored_features(run_ids, {SCORING_PARAMS}) AS TABLE
    WITH hooks AS (  -- a batch background is over the scored runs of the model that have the SAE (sae_keys
                     -- pairs every run with every key: has_sae says which runs were encoded by it)
        SELECT h.*, coalesce(len(background_runs), 0) > 0 OR background = 'batch' OR h.all_calibrated AS has_bg
        FROM (SELECT s.* REPLACE (sum(CASE WHEN s.has_sae THEN s.n ELSE 0 END)
                                      OVER (PARTITION BY s.model_key, s.sae_key) AS batch_n)
              FROM (SELECT k.*, EXISTS (SELECT 1 FROM run_saes rs WHERE rs.run_key = k.run_key
                                                                    AND rs.sae_key = k.sae_key) AS has_sae
                    FROM scoring_hooks(run_ids, calibration_id := calibration_id, sae_keys := sae_keys,
                                       calibration_model := calibration_model) k) s) h
        WHERE CASE WHEN NOT coalesce(list_contains({KNOWN_MODES}, score_mode), false)
                   THEN error('score_mode: expected one of {", ".join(list(SCORE_EXPR)[:4])}, '
                              || '{", ".join(list(SCORE_EXPR)[4:])}, got ' || coalesce(score_mode, 'NULL'))
                   WHEN coalesce(background NOT IN ('calibration', 'batch'), true)
                   THEN error('background: expected one of calibration, batch, got ' || coalesce(background, 'NULL'))
                   WHEN coalesce(tau_basis NOT IN ('active', 'all'), true)
                   THEN error('tau_basis: expected one of active, all, got ' || coalesce(tau_basis, 'NULL'))
                   WHEN coalesce(normalization NOT IN ('calibration_max', 'sae_median_max', 'none'), true)
                   THEN error('normalization: expected one of calibration_max, sae_median_max, none, got '
                              || coalesce(normalization, 'NULL'))
                   WHEN coalesce(NOT (min_coverage_pct::DOUBLE BETWEEN 0 AND 100), true)
                   THEN error('min_coverage_pct: expected a number in [0, 100], got '
                              || coalesce(min_coverage_pct::VARCHAR, 'NULL'))
                   WHEN coalesce(NOT (tau_quantile::DOUBLE BETWEEN 0 AND 1), false)
                   THEN error('tau_quantile: expected a number in [0, 1] or NULL, got ' || tau_quantile::VARCHAR)
                   WHEN coalesce(NOT (tau::DOUBLE >= 0) OR isnan(tau::DOUBLE), false)
                   THEN error('tau: expected a number >= 0 or NULL, got ' || tau::VARCHAR)
                   WHEN tau IS NOT NULL AND tau_quantile IS NOT NULL
                   THEN error('tau: give either tau or tau_quantile, not both')
                   WHEN coalesce(len(background_runs), 0) > 0
                        AND len(list_distinct(background_runs)) > (SELECT count(*) FROM runs b
                                                                   WHERE list_contains(background_runs, b.run_id))
                   THEN error('background_runs: no run '
                              || (SELECT min(x.id) FROM unnest(coalesce(background_runs, []::VARCHAR[])) x(id)
                                  WHERE x.id NOT IN (SELECT b.run_id FROM runs b)))
                   WHEN background = 'batch' AND coalesce(len(background_runs), 0) > 0
                   THEN error('background: batch contrasts the runs ranked together; give it or background_runs, '
                              || 'not both')
                   WHEN background = 'batch' AND score_mode IN {NEEDS_BACKGROUND}
                        AND h.has_sae AND h.batch_n = h.n
                   THEN error('background: batch contrasts each run with the other runs ranked with it (of the '
                              || 'same model, with the same SAE); run ' || h.run_id || ' is the only one in run_ids '
                              || 'with sae_key ' || h.sae_key || ' — list more runs like it, or use background '
                              || '''calibration''')
                   ELSE true END  -- each argument checked whatever columns are selected
    ),
    used AS (SELECT DISTINCT h.calibration_id AS cal, h.sae_key FROM hooks h WHERE h.calibration_id IS NOT NULL),
    stats AS (
        SELECT f.calibration_id AS cal, f.sae_key, f.feature_id, f.mean, f.max,
               CASE tau_basis WHEN 'active' THEN f.p95 ELSE f.p95_all END AS p95
        FROM feature_stats f SEMI JOIN used u ON u.cal = f.calibration_id AND u.sae_key = f.sae_key
    ),
    sae_scales AS (  -- normalization 'sae_median_max': one divisor per SAE, the median of its features' maxima
        SELECT s.cal, s.sae_key, median(s.max) FILTER (WHERE s.max > 0) AS scale FROM stats s
        WHERE normalization = 'sae_median_max'
        GROUP BY s.cal, s.sae_key
    ),
    quantile_of AS (  -- another quantile than the stored P95s: computed as writing the calibration computed those
        SELECT u.cal, u.sae_key, c.n_tokens AS n FROM used u JOIN calibrations c ON c.calibration_id = u.cal
        WHERE tau IS NULL AND coalesce(tau_quantile, 0.95)::DOUBLE <> 0.95
    ),{QUANTILES_CTES.format(q=CHECKED_QUANTILE)},
    quantile_taus AS (
        SELECT q.cal, q.sae_key, q.feature_id, CASE tau_basis WHEN 'active' THEN q.q_active ELSE q.q_all END AS tau
        FROM quantiles q
    ),
    thresholds AS (
        SELECT s.cal, s.sae_key, s.feature_id, s.mean, s.max,
               CASE WHEN coalesce(tau_quantile, 0.95)::DOUBLE = 0.95 THEN s.p95 ELSE coalesce(qt.tau, 0) END AS tau
        FROM stats s LEFT JOIN quantile_taus qt ON qt.cal = s.cal AND qt.sae_key = s.sae_key
                                                AND qt.feature_id = s.feature_id
    ),
    background_means AS (
        SELECT a.sae_key, a.feature_id,
               sum(a.act) / (SELECT greatest(sum(b.n_kept), 1)::DOUBLE FROM runs b
                             WHERE list_contains(background_runs, b.run_id)) AS bg_mean
        FROM activations a JOIN runs b ON b.run_key = a.run_key
        WHERE coalesce(len(background_runs), 0) > 0 AND list_contains(background_runs, b.run_id)
        GROUP BY a.sae_key, a.feature_id
    ),
    agg AS (
        SELECT a.run_key, a.sae_key, a.feature_id,
               sum(a.act) AS total,
               sum(a.act) / any_value(h.n) AS mean,
               max(a.act) AS max,
               count(*) FILTER (WHERE a.act > coalesce(tau::DOUBLE, t.tau, 0)) / any_value(h.n) AS coverage,
               coalesce(tau::DOUBLE, any_value(t.tau), 0) AS tau,
               any_value(t.mean) AS cal_mean,
               any_value(CASE WHEN h.all_calibrated THEN coalesce(nullif(t.max, 0), 1) ELSE 1 END) AS fmax,
               any_value(CASE WHEN NOT h.all_calibrated OR normalization = 'none' THEN 1
                              WHEN normalization = 'sae_median_max' THEN coalesce(sc.scale, 1)
                              ELSE coalesce(nullif(t.max, 0), 1) END) AS divisor,
               coalesce(any_value(bg.bg_mean), 0) AS runs_mean,
               sum(a.attr)::DOUBLE AS attribution,
               any_value(h.run_id) AS run_id, any_value(h.model_key) AS model_key, any_value(h.n) AS n,
               any_value(h.batch_n) AS batch_n, any_value(h.calibration_id) AS cal,
               any_value(h.all_calibrated) AS all_calibrated, any_value(h.has_bg) AS has_bg
        FROM activations a
        JOIN hooks h ON h.run_key = a.run_key AND h.sae_key = a.sae_key
        LEFT JOIN thresholds t ON t.cal = h.calibration_id AND t.sae_key = a.sae_key AND t.feature_id = a.feature_id
        LEFT JOIN background_means bg ON bg.sae_key = a.sae_key AND bg.feature_id = a.feature_id
        LEFT JOIN sae_scales sc ON sc.cal = h.calibration_id AND sc.sae_key = a.sae_key
        WHERE coalesce(len(restrict_features), 0) = 0 OR list_contains(restrict_features, a.feature_id)
        GROUP BY a.run_key, a.sae_key, a.feature_id
    ),
    batch_totals AS (
        SELECT g.model_key, g.sae_key, g.feature_id, sum(g.total) AS total
        FROM agg g WHERE background = 'batch'
        GROUP BY g.model_key, g.sae_key, g.feature_id
    ),
    measured AS (
        SELECT g.*,
               CASE WHEN coalesce(len(background_runs), 0) > 0 THEN g.runs_mean
                    WHEN background = 'batch' THEN (b.total - g.total) / nullif(g.batch_n - g.n, 0)
                    ELSE g.cal_mean END AS bg_mean
        FROM agg g LEFT JOIN batch_totals b
             ON b.model_key = g.model_key AND b.sae_key = g.sae_key AND b.feature_id = g.feature_id
        WHERE CASE WHEN score_mode IN ({sql_items(ATTRIBUTION_MODES)}) AND g.attribution IS NULL
                   THEN error('score_mode: run ' || g.run_id || ' has no attributions (it was made with '
                              || 'attribution_target=none); rank it by another score_mode, or run it again with an '
                              || 'attribution_target')
                   ELSE true END
    ),
    gated AS (
        SELECT m.*, m.mean / m.divisor AS mean_n, m.max / m.divisor AS max_n,
               CASE WHEN m.has_bg THEN m.mean - m.bg_mean END AS selectivity
        FROM measured m
        WHERE m.coverage * 100 >= coalesce(min_coverage_pct::DOUBLE, 0)  -- (NULL: refused above; a NULL here would prune it)
    ),{CONTEXT_CTES}
    SELECT g.run_key, g.run_id, g.sae_key, g.feature_id,
           CASE WHEN score_mode IN ({sql_items(NEEDS_CALIBRATION)}) AND g.cal IS NULL
                THEN error('score_mode: ' || score_mode || ' weighs features by how they are active together in the '
                           || 'calibration documents; calibrate the SAE first, or pick another score_mode')
                WHEN score_mode IN {NEEDS_BACKGROUND} AND NOT g.has_bg
                THEN error('score_mode: ' || score_mode || ' needs a background; calibrate the SAE first, give '
                           || 'background_runs, or pick another score_mode')
                ELSE {SCORE_CASE} END AS score,
           g.mean, g.max, g.coverage, g.selectivity, g.attribution, g.tau, g.cal AS calibration_id,
           CASE WHEN g.all_calibrated AND score_mode NOT IN ({sql_items(UNNORMALIZED_MODES)})
                THEN normalization ELSE 'none' END AS normalization
    FROM gated g LEFT JOIN context cx  -- (a constant false condition in the other modes: the join is pruned)
         ON score_mode = 'context' AND cx.run_key = g.run_key AND cx.sae_key = g.sae_key AND cx.feature_id = g.feature_id"""

FEATURE_SCORES = f"""
CREATE OR REPLACE MACRO feature_scores(run_ids, {SCORING_PARAMS}) AS TABLE
    SELECT f.run_id, sa.layer, sa.stream, sa.sae_id, f.feature_id, f.score, f.mean, f.max, f.coverage,
           f.selectivity, f.attribution,
           row_number() OVER (PARTITION BY f.run_key ORDER BY f.score DESC, sa.layer, sa.stream, f.feature_id) AS rank,
           row_number() OVER (PARTITION BY f.run_key, f.sae_key ORDER BY f.score DESC, f.feature_id) AS hook_rank,
           f.tau, f.calibration_id, f.normalization, f.run_key, f.sae_key
    FROM scored_features(run_ids, {PASS_PARAMS}) f
    JOIN saes sa ON sa.sae_key = f.sae_key"""

# in creation order (each macro may use the ones before it)
MACROS = {"scoring_hooks": SCORING_HOOKS, "scored_features": SCORED_FEATURES, "feature_scores": FEATURE_SCORES}


def macro_call(name: str, params: dict) -> str:
    """``name($run_ids, p := $p, …)``: a call of one of :data:`MACROS` with its arguments bound as the
    named parameters of ``params`` (``run_ids`` first; DuckDB binds them as constants, so the calls
    plan as if written out)."""
    named = ", ".join(f"{p} := ${p}" for p in params if p != "run_ids")
    return f"{name}($run_ids{', ' + named if named else ''})"
