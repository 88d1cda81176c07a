"""τ basis: feature_stats keeps both P95s — ``p95`` over the feature's nonzero activations (the new
default τ, ``tau_basis = active``) and ``p95_all`` over every calibration token, zeros included
(``tau_basis = all``, what ``p95`` held before this revision).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Existing statistics: the old ``p95`` moves to ``p95_all``, and ``p95`` is recomputed exactly from the
calibration's stored nonzero activations (``calibration_activations`` holds every nonzero code of a
calibration, so no statistic is lost). A feature that never fired keeps 0. Downgrade puts the
all-token P95 back into ``p95`` and drops ``p95_all``.

Frozen history: no import of ``catalog``; the view text is this revision's.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEW_0001 = """
    SELECT s.sae_id, s.layer, s.stream, f.feature_id, f.p95, f.mean, f.max, f.density, f.n_tokens,
           m.model_id, f.calibration_id, f.sae_key
    FROM feature_stats f JOIN saes s USING (sae_key)
    JOIN calibrations c USING (calibration_id) JOIN models m USING (model_key)
    WHERE f.calibration_id = (SELECT max(f2.calibration_id) FROM feature_stats f2
                              JOIN calibrations c2 USING (calibration_id)
                              WHERE f2.sae_key = f.sae_key AND c2.model_key = c.model_key)"""

VIEW_0002 = """
    SELECT s.sae_id, s.layer, s.stream, f.feature_id, f.p95, f.mean, f.max, f.density, f.n_tokens, f.p95_all,
           m.model_id, f.calibration_id, f.sae_key
    FROM feature_stats f JOIN saes s USING (sae_key)
    JOIN calibrations c USING (calibration_id) JOIN models m USING (model_key)
    WHERE f.calibration_id = (SELECT max(f2.calibration_id) FROM feature_stats f2
                              JOIN calibrations c2 USING (calibration_id)
                              WHERE f2.sae_key = f.sae_key AND c2.model_key = c.model_key)"""

# quantile_cont = numpy's percentile (linear interpolation), here over each feature's nonzero codes
ACTIVE_P95 = """
    UPDATE feature_stats f SET p95 = q.p95
    FROM (SELECT calibration_id, sae_key, feature_id, quantile_cont(act::DOUBLE, 0.95) AS p95
          FROM calibration_activations GROUP BY calibration_id, sae_key, feature_id) q
    WHERE f.calibration_id = q.calibration_id AND f.sae_key = q.sae_key AND f.feature_id = q.feature_id"""


def upgrade() -> None:
    op.execute("DROP VIEW v_feature_stats")
    # DuckDB cannot add a NOT NULL column directly, nor set NOT NULL after an update in the same
    # transaction: add it with a default, constrain it, drop the default, then fill it
    op.execute("ALTER TABLE feature_stats ADD COLUMN p95_all DOUBLE DEFAULT 0")
    op.execute("ALTER TABLE feature_stats ALTER COLUMN p95_all SET NOT NULL")
    op.execute("ALTER TABLE feature_stats ALTER COLUMN p95_all DROP DEFAULT")
    op.execute("UPDATE feature_stats SET p95_all = p95")
    op.execute(ACTIVE_P95)
    op.execute(f"CREATE VIEW v_feature_stats AS {VIEW_0002}")


def downgrade() -> None:
    op.execute("DROP VIEW v_feature_stats")
    op.execute("UPDATE feature_stats SET p95 = p95_all")
    op.execute("ALTER TABLE feature_stats DROP COLUMN p95_all")
    op.execute(f"CREATE VIEW v_feature_stats AS {VIEW_0001}")
