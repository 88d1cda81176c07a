"""Tags and batch ids on runs, and the calibration each run was first ranked with.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

- ``run_tags(run_key, key, value)``: a run's tags (a flat string → string map; numbers and booleans
  as their JSON text). Tags are not part of the run id: the same prompt asked again with other tags
  reuses the run and merges the new tags in (a key given again takes the new value).
- ``run_batch_ids(run_key, batch_id)``: the ``id`` of the batch line or API body that last asked
  for the run.
- ``run_calibrations(run_key, sae_key, calibration_id)``: per SAE of a run, the calibration its
  first ranking used (so a later ranking on a newer calibration can say so).
- ``v_runs`` gains ``batch_id`` and ``tags`` (MAP(VARCHAR, VARCHAR), empty when none) as its last columns.
- ``v_top_contexts``: each feature's peak in each stored run (its highest activation there, the earliest
  position on a tie), the token at it, and ``rank``: 1 for the run where the feature peaks highest
  among the runs of that SAE (sae_id, layer, stream).

Plain tables beside ``runs`` (no column added to it: DuckDB cannot alter a table that has an index).
Frozen history: no import of ``catalog``; the view text is this revision's.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

V_RUNS_0001 = """
    SELECT r.run_id, r.model_id, r.sae_id, r.mode, r.prompt, r.text, r.generate, r.gen_tokens, r.seed,
           r.created_at, r.n_tokens, r.n_kept, r.layers, r.streams, r.run_key
    FROM runs r"""

V_RUNS_0004 = """
    SELECT r.run_id, r.model_id, r.sae_id, r.mode, r.prompt, r.text, r.generate, r.gen_tokens, r.seed,
           r.created_at, r.n_tokens, r.n_kept, r.layers, r.streams, r.run_key, b.batch_id,
           coalesce(t.tags, MAP {}::MAP(VARCHAR, VARCHAR)) AS tags
    FROM runs r
    LEFT JOIN run_batch_ids b USING (run_key)
    LEFT JOIN (SELECT run_key, map_from_entries(list({'key': key, 'value': value} ORDER BY key)) AS tags
               FROM run_tags GROUP BY run_key) t USING (run_key)"""

V_TOP_CONTEXTS_0004 = """
    WITH peaks AS (
        SELECT run_key, sae_key, feature_id, max(act) AS act, arg_max(position, (act, -position)) AS position,
               count(*) AS n_fired
        FROM activations GROUP BY run_key, sae_key, feature_id)
    SELECT r.run_id, s.layer, s.stream, s.sae_id, p.feature_id, p.position, p.act, t.token, p.n_fired,
           row_number() OVER (PARTITION BY s.sae_id, s.layer, s.stream, p.feature_id
                              ORDER BY p.act DESC, r.run_id, p.position) AS rank,
           p.run_key, p.sae_key
    FROM peaks p JOIN runs r USING (run_key) JOIN saes s USING (sae_key)
    JOIN tokens t ON t.run_key = p.run_key AND t.position = p.position"""

TABLES = {
    "run_tags": "run_key INTEGER NOT NULL, key VARCHAR NOT NULL, value VARCHAR NOT NULL",
    "run_batch_ids": "run_key INTEGER NOT NULL, batch_id VARCHAR NOT NULL",
    "run_calibrations": "run_key INTEGER NOT NULL, sae_key INTEGER NOT NULL, calibration_id INTEGER NOT NULL",
}


def upgrade() -> None:
    for name, columns in TABLES.items():
        op.execute(f"CREATE TABLE {name} ({columns})")
    op.execute("DROP VIEW v_runs")
    op.execute(f"CREATE VIEW v_runs AS {V_RUNS_0004}")
    op.execute(f"CREATE VIEW v_top_contexts AS {V_TOP_CONTEXTS_0004}")


def downgrade() -> None:
    op.execute("DROP VIEW v_top_contexts")
    op.execute("DROP VIEW v_runs")
    op.execute(f"CREATE VIEW v_runs AS {V_RUNS_0001}")
    for name in TABLES:
        op.execute(f"DROP TABLE {name}")
