"""A run's attribution target: ``runs.attribution_target``.

A run made with ``attribution_target`` stores per (token, feature) attributions in units of its target
M (the continuation's log-probability, a token's, a logit difference). The target fixed the run's id
but was not stored, so a stored run's attributions could not be read back with their meaning, and a
drift by attribution could pair runs of different targets (different units) without a word. Now the
run row holds it (``none`` for a run without attributions), and ``v_runs`` shows it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

Existing runs: those without any attribution get ``none``; those with attributions keep NULL — their
target was never recorded (unknown). Downgrade drops the column and restores the 0004 ``v_runs``.

Frozen history: no import of ``catalog``; the view texts are this revision's.
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

V_RUNS_0004 = """
    SELECT r.run_id, r.model_id, r.sae_id, r.mode, r.prompt, r.text, r.generate, r.gen_tokens, r.seed,
           r.created_at, r.n_tokens, r.n_kept, r.layers, r.streams, r.run_key, b.batch_id,
           coalesce(t.tags, MAP {}::MAP(VARCHAR, VARCHAR)) AS tags
    FROM runs r
    LEFT JOIN run_batch_ids b USING (run_key)
    LEFT JOIN (SELECT run_key, map_from_entries(list({'key': key, 'value': value} ORDER BY key)) AS tags
               FROM run_tags GROUP BY run_key) t USING (run_key)"""

V_RUNS_0010 = """
    SELECT r.run_id, r.model_id, r.sae_id, r.mode, r.prompt, r.text, r.generate, r.gen_tokens, r.seed,
           r.created_at, r.n_tokens, r.n_kept, r.layers, r.streams, r.run_key, b.batch_id,
           coalesce(t.tags, MAP {}::MAP(VARCHAR, VARCHAR)) AS tags, r.attribution_target
    FROM runs r
    LEFT JOIN run_batch_ids b USING (run_key)
    LEFT JOIN (SELECT run_key, map_from_entries(list({'key': key, 'value': value} ORDER BY key)) AS tags
               FROM run_tags GROUP BY run_key) t USING (run_key)"""


def upgrade() -> None:
    op.execute("DROP VIEW v_runs")
    op.execute("ALTER TABLE runs ADD COLUMN attribution_target VARCHAR")
    op.execute("""
        UPDATE runs SET attribution_target = 'none'
        WHERE NOT EXISTS (SELECT 1 FROM activations a WHERE a.run_key = runs.run_key AND a.attr IS NOT NULL)""")
    op.execute(f"CREATE VIEW v_runs AS {V_RUNS_0010}")


def downgrade() -> None:
    # DuckDB refuses to drop a column of a table an index depends on: the run id's unique index is dropped
    # and made again from its own stored text
    indexes = op.get_bind().exec_driver_sql("SELECT index_name, sql FROM duckdb_indexes() WHERE table_name = 'runs'"
                                            ).fetchall()
    op.execute("DROP VIEW v_runs")
    for name, _ in indexes:
        op.execute(f'DROP INDEX "{name}"')
    op.execute("ALTER TABLE runs DROP COLUMN attribution_target")
    for _, sql in indexes:
        op.execute(sql)
    op.execute(f"CREATE VIEW v_runs AS {V_RUNS_0004}")
