"""Lite labels belong to the calibration they were made from: ``labels.calibration_id``.

A lite label says which tokens a feature fires on in a calibration corpus run through one model, and
which tokens its decoder promotes through that model's unembedding — both depend on the model. They
were stored per SAE, so calibrating an SAE with a second model (a fine-tune, for drift) replaced the
first model's lite labels, and that model's runs showed the other model's. Now each calibration keeps
its own lite labels (one row per feature, as its statistics) and a ranking shows those of the
calibration it used. Imported labels (Neuronpedia, Delphi, CSV) belong to the SAE: ``calibration_id``
NULL.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Existing lite labels: a calibration that made lite labels replaced all of its SAE's, and one made
without them (``--no_lite_labels``) left them alone, so the stored ones are those of the SAE's newest
calibration made no later than they were; they get its id (the SAE's newest, should the clock say
none). Downgrade
keeps, per SAE, the lite labels of its newest calibration only (one per feature, as before) and drops
the column.

Frozen history: no import of ``catalog``; the view texts are this revision's.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

VIEW_0001 = """
        SELECT s.sae_id, l.feature_id, l.label, l.source, l.score, s.layer, s.stream, l.sae_key
        FROM labels l JOIN saes s USING (sae_key)"""

VIEW_0009 = """
        SELECT s.sae_id, l.feature_id, l.label, l.source, l.score, s.layer, s.stream, l.sae_key, l.calibration_id
        FROM labels l JOIN saes s USING (sae_key)"""


def upgrade() -> None:
    op.execute("DROP VIEW v_labels")
    op.execute("ALTER TABLE labels ADD COLUMN calibration_id INTEGER")
    op.execute("""
        UPDATE labels l SET calibration_id = coalesce(
            (SELECT max(f.calibration_id) FROM feature_stats f JOIN calibrations c USING (calibration_id)
             WHERE f.sae_key = l.sae_key AND c.created_at <= l.created_at),
            (SELECT max(f.calibration_id) FROM feature_stats f WHERE f.sae_key = l.sae_key))
        WHERE l.source = 'lite'""")
    op.execute(f"CREATE VIEW v_labels AS {VIEW_0009}")


def downgrade() -> None:
    op.execute("DROP VIEW v_labels")
    op.execute("""
        DELETE FROM labels l
        WHERE l.source = 'lite'
          AND l.calibration_id IS DISTINCT FROM (SELECT max(l2.calibration_id) FROM labels l2
                                                  WHERE l2.sae_key = l.sae_key AND l2.source = 'lite')""")
    op.execute("ALTER TABLE labels DROP COLUMN calibration_id")
    op.execute(f"CREATE VIEW v_labels AS {VIEW_0001}")
