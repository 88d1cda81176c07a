"""The catalog's tables (SQLAlchemy Core) — the one place that names them, with the migrations.

Design notes (see ../STACK_NOTES in the project docs):
- integer surrogate keys from sequences (DuckDB has no SERIAL/IDENTITY);
- no foreign keys (DuckDB cannot add or drop them later, and they block column changes);
- ``activations`` is the big table: integer columns + float32, written in run order, so zone maps
  prune per-run reads and rows compress well (README, Performance).

The public SQL contract (SPEC.md: ``v_runs``, ``v_tokens``, ``v_activations``, ``v_feature_stats``,
``v_labels``; revision 0004: ``v_top_contexts``) is created by the migrations (``migrations/versions/``),
which keep it stable for users who query the file.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

model_key_seq = sa.Sequence("model_key_seq")
sae_key_seq = sa.Sequence("sae_key_seq")
run_key_seq = sa.Sequence("run_key_seq")
calibration_id_seq = sa.Sequence("calibration_id_seq")

models = sa.Table(
    "models", metadata,
    sa.Column("model_key", sa.Integer, model_key_seq, server_default=model_key_seq.next_value(), primary_key=True),
    sa.Column("model_id", sa.String, nullable=False),
    sa.Column("fingerprint", sa.String, nullable=False),
    sa.Column("family", sa.String),
    sa.Column("n_layers", sa.Integer),
    sa.Column("d_model", sa.Integer),
    sa.Column("created_at", sa.DateTime, server_default=sa.func.now()),
)

saes = sa.Table(
    "saes", metadata,
    sa.Column("sae_key", sa.Integer, sae_key_seq, server_default=sae_key_seq.next_value(), primary_key=True),
    sa.Column("sae_id", sa.String, nullable=False),  # the source id the user named (registry id or path)
    sa.Column("layer", sa.Integer, nullable=False),
    sa.Column("stream", sa.String, nullable=False),
    sa.Column("hook_name", sa.String),
    sa.Column("architecture", sa.String),
    sa.Column("d_in", sa.Integer),
    sa.Column("d_sae", sa.Integer),
    sa.Column("fingerprint", sa.String, nullable=False),
    sa.Column("created_at", sa.DateTime, server_default=sa.func.now()),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_key", sa.Integer, run_key_seq, server_default=run_key_seq.next_value(), primary_key=True),
    sa.Column("run_id", sa.String, nullable=False, unique=True),  # hash of everything that fixes the activations
    sa.Column("model_key", sa.Integer, nullable=False),
    sa.Column("model_id", sa.String, nullable=False),
    sa.Column("sae_id", sa.String, nullable=False),
    sa.Column("mode", sa.String, nullable=False),  # prompt+gen | prompt | text
    sa.Column("prompt", sa.String),
    sa.Column("text", sa.String),
    sa.Column("generate", sa.Boolean, nullable=False),
    sa.Column("gen_tokens", sa.Integer),
    sa.Column("seed", sa.BigInteger),
    sa.Column("temperature", sa.Double),
    sa.Column("top_p", sa.Double),
    sa.Column("token_proxy", sa.String),
    sa.Column("topk_tokens_per_seq", sa.Integer),
    sa.Column("layers", sa.String),  # JSON list
    sa.Column("streams", sa.String),  # JSON list
    sa.Column("restrict_features", sa.String),  # JSON list, [] = all
    sa.Column("n_tokens", sa.Integer, nullable=False),
    sa.Column("n_kept", sa.Integer, nullable=False),
    sa.Column("timings", sa.String),  # JSON
    sa.Column("created_at", sa.DateTime, server_default=sa.func.now()),
    # revision 0010: the target M of the run's attributions (none: no attributions; NULL: made before 0010)
    sa.Column("attribution_target", sa.String),
)

run_saes = sa.Table(
    "run_saes", metadata,
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("sae_key", sa.Integer, nullable=False),
)

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("token_id", sa.Integer, nullable=False),
    sa.Column("token", sa.String),
    sa.Column("is_generated", sa.Boolean, nullable=False),
    sa.Column("is_special", sa.Boolean, nullable=False),
    sa.Column("kept", sa.Boolean, nullable=False),
    sa.Column("proxy", sa.Double),
)

activations = sa.Table(
    "activations", metadata,
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("sae_key", sa.Integer, nullable=False),
    sa.Column("feature_id", sa.Integer, nullable=False),
    sa.Column("act", sa.Float, nullable=False),  # float32 in DuckDB
    sa.Column("attr", sa.Float),  # attribution to the run's target, NULL without one (revision 0003)
)

calibrations = sa.Table(
    "calibrations", metadata,
    sa.Column("calibration_id", sa.Integer, calibration_id_seq, server_default=calibration_id_seq.next_value(),
              primary_key=True),
    sa.Column("model_key", sa.Integer, nullable=False),
    sa.Column("corpus", sa.String),
    sa.Column("corpus_hash", sa.String),
    sa.Column("n_docs", sa.Integer),
    sa.Column("n_tokens", sa.Integer),
    sa.Column("created_at", sa.DateTime, server_default=sa.func.now()),
)

calibration_saes = sa.Table(
    "calibration_saes", metadata,
    sa.Column("calibration_id", sa.Integer, nullable=False),
    sa.Column("sae_key", sa.Integer, nullable=False),
)

calibration_tokens = sa.Table(
    "calibration_tokens", metadata,
    sa.Column("calibration_id", sa.Integer, nullable=False),
    sa.Column("doc", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("token_id", sa.Integer, nullable=False),
    sa.Column("token", sa.String),
)

calibration_activations = sa.Table(
    "calibration_activations", metadata,
    sa.Column("calibration_id", sa.Integer, nullable=False),
    sa.Column("sae_key", sa.Integer, nullable=False),
    sa.Column("doc", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("feature_id", sa.Integer, nullable=False),
    sa.Column("act", sa.Float, nullable=False),
)

feature_stats = sa.Table(
    "feature_stats", metadata,
    sa.Column("calibration_id", sa.Integer, nullable=False),
    sa.Column("sae_key", sa.Integer, nullable=False),
    sa.Column("feature_id", sa.Integer, nullable=False),
    sa.Column("p95", sa.Double, nullable=False),  # P95 of the feature's nonzero activations (default τ)
    sa.Column("mean", sa.Double, nullable=False),
    sa.Column("max", sa.Double, nullable=False),
    sa.Column("density", sa.Double, nullable=False),
    sa.Column("n_tokens", sa.Integer, nullable=False),
    sa.Column("p95_all", sa.Double, nullable=False),  # P95 over every token, zeros included (revision 0002)
)

labels = sa.Table(
    "labels", metadata,
    sa.Column("sae_key", sa.Integer, nullable=False),
    sa.Column("feature_id", sa.Integer, nullable=False),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("source", sa.String, nullable=False),  # neuronpedia | delphi | csv | lite | ...
    sa.Column("score", sa.Double),
    sa.Column("created_at", sa.DateTime, server_default=sa.func.now()),
    # revision 0009: the calibration a lite label was made from (its model's tokens); NULL for imported labels
    sa.Column("calibration_id", sa.Integer),
)

# revision 0004: tags and batch ids of runs (not part of the run id), and each run's first calibration per SAE
run_tags = sa.Table(
    "run_tags", metadata,
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("key", sa.String, nullable=False),
    sa.Column("value", sa.String, nullable=False),  # numbers and booleans as their JSON text
)

run_batch_ids = sa.Table(
    "run_batch_ids", metadata,
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("batch_id", sa.String, nullable=False),  # the id of the batch line / API body that last asked for it
)

run_calibrations = sa.Table(
    "run_calibrations", metadata,
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("sae_key", sa.Integer, nullable=False),
    sa.Column("calibration_id", sa.Integer, nullable=False),  # what the run's first ranking used for this SAE
)
