"""Attribution: a nullable ``attr`` beside ``act`` in ``activations`` (float32, like ``act``), shown by
``v_activations`` as its last column.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

``attr`` is the first-order estimate of how much the run's attribution target M would drop if the
feature were removed at that token (``ingest/attribution.py``); NULL for runs made without an
attribution target, which is every run stored before this revision. Downgrade drops the column and
puts the view back as it was.

Frozen history: no import of ``catalog``; the view text is this revision's.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

VIEW_0001 = """
    SELECT r.run_id, a.position, s.layer, s.stream, s.sae_id, a.feature_id, a.act
    FROM activations a JOIN runs r USING (run_key) JOIN saes s USING (sae_key)"""

VIEW_0003 = """
    SELECT r.run_id, a.position, s.layer, s.stream, s.sae_id, a.feature_id, a.act, a.attr
    FROM activations a JOIN runs r USING (run_key) JOIN saes s USING (sae_key)"""


def upgrade() -> None:
    op.execute("DROP VIEW v_activations")
    op.execute("ALTER TABLE activations ADD COLUMN attr FLOAT")
    op.execute(f"CREATE VIEW v_activations AS {VIEW_0003}")


def downgrade() -> None:
    op.execute("DROP VIEW v_activations")
    op.execute("ALTER TABLE activations DROP COLUMN attr")
    op.execute(f"CREATE VIEW v_activations AS {VIEW_0001}")
