"""``scored_features`` recreated: its ``normalization`` column says ``none`` for the attribution modes.

Attribution scores are raw, in units of their target M (the first-order change of a log-probability or
a logit difference); only the activity modes are computed on activations divided by the calibration
max. The column said ``calibration_max`` for every mode of a calibrated run. Scores are unchanged.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02

Frozen history: no import of ``catalog``; the text is 0008's (read from that revision's file, which is
frozen too) with the one line changed. Downgrade restores 0008's text.
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

NORMALIZATION_0008 = "CASE WHEN g.all_calibrated THEN 'calibration_max' ELSE 'none' END AS normalization"
NORMALIZATION_0011 = ("CASE WHEN g.all_calibrated AND score_mode NOT IN ('attribution', 'attribution_abs')\n"
                      "                THEN 'calibration_max' ELSE 'none' END AS normalization")


def _revision_0008():
    """Revision 0008's module (its file name is no importable identifier)."""
    spec = importlib.util.spec_from_file_location("revision_0008",
                                                  Path(__file__).with_name("0008_context_correlation.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scored_features_0011() -> str:
    text = _revision_0008().SCORED_FEATURES_0008
    assert text.count(NORMALIZATION_0008) == 1
    return text.replace(NORMALIZATION_0008, NORMALIZATION_0011)


def upgrade() -> None:
    op.execute(scored_features_0011())


def downgrade() -> None:
    op.execute(_revision_0008().SCORED_FEATURES_0008)
