"""``scored_features`` recreated to refuse, naming the argument, what it returned NULL or nothing for: a
``min_coverage_pct`` outside [0, 100] (or NULL), a ``tau_quantile`` outside [0, 1], a negative ``tau``,
``background := 'batch'`` together with ``background_runs``, or for a score mode that uses it over a
run no other listed run shares the SAE with (its leave-one-out background had no tokens: NULL scores),
and an attribution score mode over a run stored without attributions (NULL scores). The checks are
filters, so they hold whatever columns a query selects. A batch background is now over the listed runs
of the model that have the SAE (0012 counted the tokens of a run without it, as if none of its
features had fired). The ``normalization`` column says ``none`` for lift and context too (as for the attribution
modes): no divisor changes their scores. Every accepted call returns 0012's scores.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02

Frozen history: no import of ``catalog``; the macro text is this revision's. Downgrade restores 0012's
``scored_features`` (read from that revision's file, frozen too); ``feature_scores`` is 0012's throughout.
"""

import importlib

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SCORED_FEATURES_0013 = """
CREATE OR REPLACE MACRO scored_features(run_ids, score_mode := 'mean×coverage', min_coverage_pct := 0.5, tau := NULL,
                  tau_quantile := NULL, tau_basis := 'active', calibration_id := NULL, background := 'calibration',
                  normalization := 'calibration_max', restrict_features := NULL, background_runs := NULL,
                  sae_keys := NULL, calibration_model := NULL) AS TABLE
    WITH hooks AS (  -- a batch background is over the scored runs of the model that have the SAE (sae_keys
                     -- pairs every run with every key: has_sae says which runs were encoded by it)
        SELECT h.*, coalesce(len(background_runs), 0) > 0 OR background = 'batch' OR h.all_calibrated AS has_bg
        FROM (SELECT s.* REPLACE (sum(CASE WHEN s.has_sae THEN s.n ELSE 0 END)
                                      OVER (PARTITION BY s.model_key, s.sae_key) AS batch_n)
              FROM (SELECT k.*, EXISTS (SELECT 1 FROM run_saes rs WHERE rs.run_key = k.run_key
                                                                    AND rs.sae_key = k.sae_key) AS has_sae
                    FROM scoring_hooks(run_ids, calibration_id := calibration_id, sae_keys := sae_keys,
                                       calibration_model := calibration_model) k) s) h
        WHERE CASE WHEN NOT coalesce(list_contains(['mean', 'max', 'mean×coverage', 'selectivity',
                        'lift', 'attribution', 'attribution_abs', 'context'], score_mode), false)
                   THEN error('score_mode: expected one of mean, max, mean×coverage, selectivity, '
                              || 'lift, attribution, attribution_abs, context, got ' || coalesce(score_mode, 'NULL'))
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
                   WHEN background = 'batch' AND score_mode IN ('selectivity', 'lift', 'context')
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
    ),
    quantile_pairs AS (
        SELECT x.cal, x.sae_key, x.n, floor(x.h)::BIGINT AS lo, least(floor(x.h)::BIGINT + 1, x.n - 1) AS hi,
               x.h - floor(x.h)::BIGINT AS frac
        FROM (SELECT o.cal, o.sae_key, o.n, (o.n - 1) * least(greatest(coalesce(tau_quantile, 0.95)::DOUBLE, 0), 1) AS h
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
               quantile_cont(q.act::DOUBLE, least(greatest(coalesce(tau_quantile, 0.95)::DOUBLE, 0), 1)) AS q_active,
               coalesce(max(q.act) FILTER (WHERE p.n - q.k + q.r = p.lo), 0)
                   + any_value(p.frac) * (coalesce(max(q.act) FILTER (WHERE p.n - q.k + q.r = p.hi), 0)
                                          - coalesce(max(q.act) FILTER (WHERE p.n - q.k + q.r = p.lo), 0)) AS q_all
        FROM quantile_ranked q JOIN quantile_pairs p ON p.cal = q.cal AND p.sae_key = q.sae_key
        GROUP BY q.cal, q.sae_key, q.feature_id
    ),
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
        WHERE CASE WHEN score_mode IN ('attribution', 'attribution_abs') AND g.attribution IS NULL
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
    ),
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
        SELECT g.run_key, g.sae_key, g.feature_id, g.cal, (g.mean + 0.0003 * g.fmax) / (g.bg_mean + 0.0003 * g.fmax) AS lift
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
    )
    SELECT g.run_key, g.run_id, g.sae_key, g.feature_id,
           CASE WHEN score_mode IN ('context') AND g.cal IS NULL
                THEN error('score_mode: ' || score_mode || ' weighs features by how they are active together in the '
                           || 'calibration documents; calibrate the SAE first, or pick another score_mode')
                WHEN score_mode IN ('selectivity', 'lift', 'context') AND NOT g.has_bg
                THEN error('score_mode: ' || score_mode || ' needs a background; calibrate the SAE first, give '
                           || 'background_runs, or pick another score_mode')
                ELSE CASE score_mode
                     WHEN 'mean' THEN g.mean_n
                     WHEN 'max' THEN g.max_n
                     WHEN 'mean×coverage' THEN g.mean_n * g.coverage
                     WHEN 'selectivity' THEN g.selectivity / g.divisor
                     WHEN 'lift' THEN (g.mean + 0.0003 * g.fmax) / (g.bg_mean + 0.0003 * g.fmax)
                     WHEN 'attribution' THEN g.attribution
                     WHEN 'attribution_abs' THEN abs(g.attribution)
                     WHEN 'context' THEN coalesce(cx.support, 0)
                   END END AS score,
           g.mean, g.max, g.coverage, g.selectivity, g.attribution, g.tau, g.cal AS calibration_id,
           CASE WHEN g.all_calibrated AND score_mode NOT IN ('attribution', 'attribution_abs', 'lift', 'context')
                THEN normalization ELSE 'none' END AS normalization
    FROM gated g LEFT JOIN context cx  -- (a constant false condition in the other modes: the join is pruned)
         ON score_mode = 'context' AND cx.run_key = g.run_key AND cx.sae_key = g.sae_key AND cx.feature_id = g.feature_id"""


def upgrade() -> None:
    op.execute(SCORED_FEATURES_0013)


def downgrade() -> None:
    op.execute(importlib.import_module("migrations.versions.0012_normalization").SCORED_FEATURES_0012)
