"""On the shipped demo: lite labels name plausible tokens, and the seed's troubleshooting advice holds."""

from __future__ import annotations

import json

import pytest

from catalog.db import Catalog
from sae_discover.registry import Registry
from sae_discover.request import build_request
from sae_discover.service import Discovery

FINANCE = ("ACME Corp reported Q2 revenue of $4.2 billion, up 18% year over year. EPS came in at $1.32 versus a "
           "consensus of $1.25. Management raised full-year guidance, citing pricing power and cost discipline.")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cat = Catalog(tmp_path_factory.mktemp("demo") / "c.duckdb")
    disc = Discovery(cat, Registry.builtin(), device="cpu")
    yield disc
    cat.close()


def test_lite_labels_name_the_tokens_a_feature_fires_on(demo):
    demo.discover(build_request({"text": FINANCE, "layers": [2]}))  # first use calibrates layer 2
    con = demo.catalog.raw()
    # the feature most specific to " EPS" in the calibration corpus (share of its activation mass)
    feature, share = con.execute("""
        WITH per AS (
            SELECT a.feature_id, sum(a.act) FILTER (WHERE t.token = ' EPS') AS on_eps, sum(a.act) AS total
            FROM calibration_activations a JOIN calibration_tokens t USING (calibration_id, doc, position)
            JOIN saes s USING (sae_key) WHERE s.layer = 2 AND s.stream = 'resid_pre' GROUP BY a.feature_id)
        SELECT feature_id, on_eps / total FROM per WHERE on_eps > 0 ORDER BY on_eps / total DESC LIMIT 1""").fetchone()
    assert share > 0.3
    label = con.execute("SELECT label FROM v_labels WHERE layer = 2 AND stream = 'resid_pre' AND source = 'lite' "
                        "AND feature_id = ?", [feature]).fetchone()[0]
    fires_on = label.split(";")[0]
    assert fires_on.startswith("fires on") and json.dumps(" EPS") in fires_on


def test_selectivity_pushes_generic_features_down(demo):
    """Troubleshooting: 'too many generic features at top: switch score_mode to selectivity'."""
    base = {"text": FINANCE, "layers": [2, 3], "return_top_x": 10, "min_coverage_pct": 0, "topk_tokens_per_seq": 1000}
    by_mean = demo.discover(build_request({**base, "score_mode": "mean"}))
    by_sel = demo.discover(build_request({**base, "score_mode": "selectivity"}))
    assert by_sel["run_id"] == by_mean["run_id"] and by_sel["cached"]  # ranking options never make a new run
    con = demo.catalog.raw()
    density = {(r[0], r[1]): r[2] for r in con.execute(
        "SELECT layer, feature_id, density FROM v_feature_stats WHERE stream = 'resid_pre'").fetchall()}

    def generic(result):  # mean calibration density (share of all tokens a feature fires on) of the top features
        return sum(density[(f["layer"], f["feature_id"])] for f in result["features"]) / len(result["features"])

    assert generic(by_sel) < 0.75 * generic(by_mean)
