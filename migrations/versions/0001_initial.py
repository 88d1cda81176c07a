"""Initial catalog: models, SAEs, runs, tokens, sparse activations, calibrations, stats, labels + public views.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Frozen history: this file describes the schema as of revision 0001 and must not import
``catalog.schema`` (which moves on with later revisions). The public views are created from
their text as of this revision.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SEQUENCES = ("model_key_seq", "sae_key_seq", "run_key_seq", "calibration_id_seq")


def _key(name: str, seq: str) -> sa.Column:
    return sa.Column(name, sa.Integer, server_default=sa.text(f"nextval('{seq}')"), primary_key=True)


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime, server_default=sa.func.now())


def _cols(spec: str) -> list[sa.Column]:
    """'name:type[!]' items; ! = NOT NULL. Keeps the table list below readable."""
    types = {"int": sa.Integer, "big": sa.BigInteger, "str": sa.String, "bool": sa.Boolean, "dbl": sa.Double,
             "f32": sa.Float}
    out = []
    for item in spec.split():
        name, typ = item.split(":")
        out.append(sa.Column(name, types[typ.rstrip("!")], nullable=not typ.endswith("!")))
    return out


TABLES = {
    "models": ("model_key", "model_key_seq", "model_id:str! fingerprint:str! family:str n_layers:int d_model:int"),
    "saes": ("sae_key", "sae_key_seq", "sae_id:str! layer:int! stream:str! hook_name:str architecture:str d_in:int "
             "d_sae:int fingerprint:str!"),
    "runs": ("run_key", "run_key_seq", "run_id:str! model_key:int! model_id:str! sae_id:str! mode:str! prompt:str "
             "text:str generate:bool! gen_tokens:int seed:big temperature:dbl top_p:dbl token_proxy:str "
             "topk_tokens_per_seq:int layers:str streams:str restrict_features:str n_tokens:int! n_kept:int! "
             "timings:str"),
    "calibrations": ("calibration_id", "calibration_id_seq", "model_key:int! corpus:str corpus_hash:str n_docs:int "
                     "n_tokens:int"),
}
PLAIN_TABLES = {
    "run_saes": "run_key:int! sae_key:int!",
    "tokens": "run_key:int! position:int! token_id:int! token:str is_generated:bool! is_special:bool! kept:bool! "
              "proxy:dbl",
    "activations": "run_key:int! position:int! sae_key:int! feature_id:int! act:f32!",
    "calibration_saes": "calibration_id:int! sae_key:int!",
    "calibration_tokens": "calibration_id:int! doc:int! position:int! token_id:int! token:str",
    "calibration_activations": "calibration_id:int! sae_key:int! doc:int! position:int! feature_id:int! act:f32!",
    "feature_stats": "calibration_id:int! sae_key:int! feature_id:int! p95:dbl! mean:dbl! max:dbl! density:dbl! "
                     "n_tokens:int!",
}

VIEWS = {
    "v_runs": """
        SELECT r.run_id, r.model_id, r.sae_id, r.mode, r.prompt, r.text, r.generate, r.gen_tokens, r.seed,
               r.created_at, r.n_tokens, r.n_kept, r.layers, r.streams, r.run_key
        FROM runs r""",
    "v_tokens": """
        SELECT r.run_id, t.position, t.token_id, t.token, t.is_generated, t.kept, t.is_special, t.proxy
        FROM tokens t JOIN runs r USING (run_key)""",
    "v_activations": """
        SELECT r.run_id, a.position, s.layer, s.stream, s.sae_id, a.feature_id, a.act
        FROM activations a JOIN runs r USING (run_key) JOIN saes s USING (sae_key)""",
    "v_feature_stats": """
        SELECT s.sae_id, s.layer, s.stream, f.feature_id, f.p95, f.mean, f.max, f.density, f.n_tokens,
               m.model_id, f.calibration_id, f.sae_key
        FROM feature_stats f JOIN saes s USING (sae_key)
        JOIN calibrations c USING (calibration_id) JOIN models m USING (model_key)
        WHERE f.calibration_id = (SELECT max(f2.calibration_id) FROM feature_stats f2
                                  JOIN calibrations c2 USING (calibration_id)
                                  WHERE f2.sae_key = f.sae_key AND c2.model_key = c.model_key)""",
    "v_labels": """
        SELECT s.sae_id, l.feature_id, l.label, l.source, l.score, s.layer, s.stream, l.sae_key
        FROM labels l JOIN saes s USING (sae_key)""",
}


def upgrade() -> None:
    for seq in SEQUENCES:
        op.execute(f"CREATE SEQUENCE {seq}")
    for name, (key, seq, spec) in TABLES.items():
        op.create_table(name, _key(key, seq), *_cols(spec), _created())
    for name, spec in PLAIN_TABLES.items():
        op.create_table(name, *_cols(spec))
    op.create_table("labels", *_cols("sae_key:int! feature_id:int! label:str! source:str! score:dbl"), _created())
    op.create_index("ix_runs_run_id", "runs", ["run_id"], unique=True)
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_runs_run_id", "runs")
    for name in [*TABLES, *PLAIN_TABLES, "labels"]:
        op.drop_table(name)
    for seq in SEQUENCES:
        op.execute(f"DROP SEQUENCE {seq}")
