"""One feature across the stored runs (issue 16, item 3): ``feature show`` and ``GET /v1/features/...``.

A few toy runs (tagged) in a real DuckDB file; every expected value comes from an independent read of
the public views (``v_activations``, ``v_tokens``, ``v_feature_stats``, ``v_labels``), never from the
code under test. Then the real CLI in a subprocess and the real server over HTTP on the same file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import httpx
import pytest

from catalog.db import Catalog
from catalog.errors import UnknownFeature
from catalog.features import feature_view
from sae_discover.registry import Registry
from sae_discover.request import build_request
from tests.conftest import run_cli
from tests.test_api import Server, assert_error

TEXTS = {"finance": ["Shares of Globex rose 12% after the earnings call.",
                     "The bank raised its interest rate forecast for next year."],
         "sports": ["The striker scored twice and the team won the cup final.", "Goal!"]}
LAYER, STREAM = 1, "resid_pre"


@pytest.fixture(scope="module")
def stored(toy_registry, tmp_path_factory) -> Path:
    """A catalog file holding four tagged toy runs (the first one calibrates the SAE: lite labels too)."""
    from sae_discover.service import Discovery  # loads torch: only this fixture runs the model

    db = tmp_path_factory.mktemp("features") / "c.duckdb"
    catalog = Catalog(db)
    disc = Discovery(catalog, Registry.load(toy_registry), device="cpu")
    for domain, texts in TEXTS.items():
        for text in texts:
            disc.discover(build_request({"model_id": "toy", "sae_id": "toy", "text": text, "layers": [LAYER],
                                         "streams": [STREAM], "tags": {"domain": domain}}))
    catalog.close()
    return db


def _read(db: Path):
    return duckdb.connect(str(db), read_only=True)


def _busiest_feature(db: Path) -> int:
    """The feature that fired in the most runs (ties: the highest activation), chosen independently."""
    with _read(db) as con:
        return con.execute("""
            SELECT feature_id FROM v_activations WHERE layer = ? AND stream = ?
            GROUP BY feature_id ORDER BY count(DISTINCT run_id) DESC, max(act) DESC LIMIT 1""",
                           [LAYER, STREAM]).fetchone()[0]


def _check_against_views(db: Path, view: dict) -> None:
    """Every part of a feature view against independent queries over the public views."""
    fid = view["feature_id"]
    con = _read(db)
    try:
        acts = con.execute("SELECT run_id, position, act FROM v_activations WHERE sae_id = 'toy' AND layer = ? "
                           "AND stream = ? AND feature_id = ?", [LAYER, STREAM, fid]).fetchall()
        tokens = {(r, p): t for r, p, t in con.execute("SELECT run_id, position, token FROM v_tokens").fetchall()}
        tags = {r: t for r, t in con.execute("SELECT run_id, tags FROM v_runs").fetchall()}
        per_run_totals = con.execute("""
            SELECT a.run_id, a.feature_id, sum(a.act) / any_value(r.n_kept), max(a.act) FROM v_activations a
            JOIN v_runs r USING (run_id) WHERE a.layer = ? AND a.stream = ? GROUP BY ALL""",
                                     [LAYER, STREAM]).fetchall()
        stats = con.execute("SELECT p95, p95_all, mean, max, density, n_tokens FROM v_feature_stats WHERE sae_id = "
                            "'toy' AND layer = ? AND stream = ? AND feature_id = ?", [LAYER, STREAM, fid]).fetchone()
        labels = sorted(con.execute("SELECT label, source FROM v_labels WHERE sae_id = 'toy' AND layer = ? "
                                    "AND stream = ? AND feature_id = ?", [LAYER, STREAM, fid]).fetchall())
    finally:
        con.close()
    peak_of_run = {}
    for run_id, pos, act in acts:
        if run_id not in peak_of_run or act > peak_of_run[run_id][1]:
            peak_of_run[run_id] = (pos, act)
    assert view["n_runs"] == len(peak_of_run) >= 2
    # contexts: one per run, highest peak first; the first holds the feature's maximum over all stored runs
    contexts = view["top_contexts"]
    assert len(contexts) == len(peak_of_run)
    assert contexts[0]["act"] == pytest.approx(max(a for _, _, a in acts))
    assert [c["act"] for c in contexts] == sorted((c["act"] for c in contexts), reverse=True)
    for rank, c in enumerate(contexts, 1):
        pos, act = peak_of_run[c["run_id"]]
        assert (c["rank"], c["peak"], c["act"]) == (rank, pos, pytest.approx(act))
        token = tokens[(c["run_id"], pos)]
        assert c["token"] == token
        assert f"[[{token}]]" in c["marked"]  # the peak token, marked, inside its window
        assert c["marked"].replace(f"[[{token}]]", token, 1) == c["text"]
        start, end = c["position"]
        assert start <= pos < end and end - start <= 2 * 2 * 8 + 1
        assert c["tags"] == tags[c["run_id"]] and c["tags"]["domain"] in TEXTS
    # top runs: its mean among the run's top 10 features of this SAE (ties by feature id)
    expected = []
    for run_id in {r for r, *_ in per_run_totals}:
        ranked = sorted((row for row in per_run_totals if row[0] == run_id), key=lambda row: (-row[2], row[1]))
        for rank, row in enumerate(ranked[:10], 1):
            if row[1] == fid:
                expected.append((run_id, rank, pytest.approx(row[2]), pytest.approx(row[3])))
    got = [(r["run_id"], r["rank"], r["mean"], r["max"]) for r in view["top_runs"]]
    assert sorted(got) == sorted(expected) and view["n_top_runs"] == len(expected)
    assert [r["rank"] for r in view["top_runs"]] == sorted(r["rank"] for r in view["top_runs"])
    # calibration: the stored statistics, and a histogram holding every calibration token
    cal = view["calibration"]
    assert stats is not None and cal is not None
    assert cal["model_id"] == "toy"  # the model whose activations gave the statistics
    assert [cal[k] for k in ("p95", "p95_all", "mean", "max", "density")] == [pytest.approx(x) for x in stats[:5]]
    assert cal["zeros"] + sum(b["count"] for b in cal["buckets"]) == stats[5] == cal["n_tokens"]
    assert cal["buckets"][-1]["hi"] == pytest.approx(stats[3])
    assert round(stats[4] * stats[5]) == sum(b["count"] for b in cal["buckets"])  # density × tokens = firings
    # labels: all of them; the lite label's tokens split out
    assert sorted((x["label"], x["source"]) for x in view["labels"]) == labels
    lite = next(label for label, source in labels if source == "lite")
    assert view["promotes"] and all(json.dumps(t, ensure_ascii=False) in lite for t in view["promotes"])
    assert view["fires_on"] is not None and view["suppresses"] is not None


def test_feature_view_matches_independent_queries(stored):
    fid = _busiest_feature(stored)
    with _read(stored) as con:  # a feature that never fired in a stored run (None when every one did)
        silent = con.execute("SELECT min(feature_id) FROM v_feature_stats WHERE sae_id = 'toy' AND layer = ? "
                             "AND stream = ? AND feature_id NOT IN (SELECT feature_id FROM v_activations "
                             "WHERE layer = ? AND stream = ?)", [LAYER, STREAM, LAYER, STREAM]).fetchone()[0]
    catalog = Catalog(stored, read_only=True)
    try:
        view = feature_view(catalog, "toy", LAYER, STREAM, fid, limit=10)
        # limit caps the contexts and the top runs; counts stay whole
        one = feature_view(catalog, "toy", LAYER, STREAM, fid, limit=1)
        quiet = feature_view(catalog, "toy", LAYER, STREAM, silent) if silent is not None else None
        for args, field in ((("nope", LAYER, STREAM, fid), "sae_id"), (("toy", 7, STREAM, fid), "layer"),
                            (("toy", LAYER, "attn_out", fid), "stream"), (("toy", LAYER, STREAM, 10**6), "feature_id")):
            with pytest.raises(UnknownFeature) as err:
                feature_view(catalog, *args)
            assert err.value.field == field
    finally:
        catalog.close()
    _check_against_views(stored, view)
    assert one["top_contexts"] == view["top_contexts"][:1] and len(one["top_runs"]) <= 1
    assert one["n_top_runs"] == view["n_top_runs"]
    if quiet is not None:  # no contexts, no runs; still its calibration row
        assert (quiet["n_runs"], quiet["top_contexts"], quiet["top_runs"]) == (0, [], [])
        assert quiet["calibration"] is not None


def test_v_top_contexts_is_each_runs_peak(stored):
    with _read(stored) as con:
        rows = con.execute("SELECT run_id, feature_id, position, act, token, rank FROM v_top_contexts "
                           "WHERE layer = ? AND stream = ?", [LAYER, STREAM]).fetchall()
        peaks = con.execute("SELECT run_id, feature_id, max(act), count(*) FROM v_activations WHERE layer = ? "
                            "AND stream = ? GROUP BY ALL", [LAYER, STREAM]).fetchall()
        at = {(r, f, p): a for r, f, p, a in con.execute(
            "SELECT run_id, feature_id, position, act FROM v_activations WHERE layer = ? AND stream = ?",
            [LAYER, STREAM]).fetchall()}
    assert len(rows) == len(peaks)
    best = {(r, f): a for r, f, a, _ in peaks}
    for run_id, fid, pos, act, _, _ in rows:
        assert at[(run_id, fid, pos)] == act == best[(run_id, fid)]
    for fid in {f for _, f, *_ in rows}:  # ranks 1..n per feature, by peak
        mine = sorted((rank, -act) for _, f, _, act, _, rank in rows if f == fid)
        assert [r for r, _ in mine] == list(range(1, len(mine) + 1))
        assert [a for _, a in mine] == sorted(a for _, a in mine)


def test_cli_feature_show(stored, toy_registry, tmp_path):
    db = tmp_path / "copy.duckdb"
    shutil.copy(stored, db)
    fid = _busiest_feature(db)
    common = ["--db", str(db), "--registry", str(toy_registry)]
    done = run_cli("feature", "show", "--sae", "toy", "--layer", str(LAYER), "--feature", str(fid), "--format", "json",
                   *common)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    _check_against_views(db, view)
    table = run_cli("feature", "show", "--sae", "toy", "--layer", str(LAYER), "--feature", str(fid), "--limit", "2",
                    *common)
    assert table.returncode == 0, table.stderr
    assert f"feature {fid} of toy layer {LAYER} {STREAM}" in table.stdout
    assert view["top_contexts"][0]["marked"] in table.stdout.replace("\\'", "'")  # shown with repr quoting
    assert "promotes:" in table.stdout and f"calibration {view['calibration']['calibration_id']}" in table.stdout
    bad = {("--sae", "nope"): "sae_id", ("--layer", "7"): "layer", ("--stream", "attn_out"): "stream",
           ("--feature", "100000"): "feature_id", ("--limit", "0"): "limit", ("--layer", "x"): "layer",
           ("--feature", "-1"): "feature_id", ("--stream", "resid"): "stream"}
    for (flag, value), field in bad.items():
        args = {"--sae": "toy", "--layer": str(LAYER), "--feature": str(fid), flag: value}
        done = run_cli("feature", "show", *[x for kv in args.items() for x in kv], *common)
        assert done.returncode == 2, (flag, done.stdout, done.stderr)
        assert re.match(rf"^error: {field}: ", done.stderr) and done.stderr.count("\n") == 1, done.stderr
    missing = run_cli("feature", "show", "--sae", "toy", "--feature", str(fid), *common)
    assert missing.returncode == 2 and missing.stderr.startswith("error: layer: required")


def test_api_feature_route(stored, toy_registry, tmp_path):
    db = tmp_path / "served.duckdb"
    shutil.copy(stored, db)
    fid = _busiest_feature(db)
    catalog = Catalog(db, read_only=True)
    expected = feature_view(catalog, "toy", LAYER, STREAM, fid, limit=3)
    catalog.close()
    srv = Server(db, toy_registry, tmp_path / "server.log")
    try:
        r = srv.client.get(f"/v1/features/toy/{LAYER}/{STREAM}/{fid}", params={"limit": 3})
        assert r.status_code == 200, r.text
        # as the library answers, but for the calibration corpus: its file name (the server's path stays there)
        assert r.json()["calibration"]["corpus"] == Path(expected["calibration"]["corpus"]).name
        expected["calibration"]["corpus"] = r.json()["calibration"]["corpus"]
        assert r.json() == json.loads(json.dumps(expected))
        assert r.json()["top_contexts"][0]["act"] == max(c["act"] for c in expected["top_contexts"])
        mine = srv.client.get(f"/v1/features/toy/{LAYER}/{STREAM}/{fid}", params={"limit": 3, "model_id": "toy"})
        assert mine.json() == r.json()  # the one calibration there is toy's
        whole = srv.client.get(f"/v1/features/toy/{LAYER}/{STREAM}/{fid}").json()  # default limit: 10
        assert whole["top_contexts"][:3] == r.json()["top_contexts"]
        assert len(whole["top_contexts"]) == min(10, whole["n_runs"])
        cases = [(f"/v1/features/nope/{LAYER}/{STREAM}/{fid}", 400, "sae_id"),  # not a registry id
                 (f"/v1/features/demo/{LAYER}/{STREAM}/{fid}", 404, "sae_id"),  # registered, not in this catalog
                 (f"/v1/features/toy/7/{STREAM}/{fid}", 404, "layer"),
                 (f"/v1/features/toy/{LAYER}/attn_out/{fid}", 404, "stream"),
                 (f"/v1/features/toy/{LAYER}/resid/{fid}", 400, "stream"),
                 (f"/v1/features/toy/{LAYER}/{STREAM}/100000", 404, "feature_id"),
                 (f"/v1/features/toy/{LAYER}/{STREAM}/{fid}?limit=0", 400, "limit"),
                 (f"/v1/features/toy/{LAYER}/{STREAM}/{fid}?limt=3", 400, "limt"),
                 (f"/v1/features/toy/{LAYER}/{STREAM}/{fid}?model_id=nope", 404, "model_id"),  # no such calibration
                 (f"/v1/features/toy/{LAYER}/{STREAM}/abc", 400, "feature_id"),  # not a bare 404: the field named
                 (f"/v1/features/toy/one/{STREAM}/{fid}", 400, "layer"),
                 (f"/v1/features/toy/{LAYER}/{STREAM}/-1", 400, "feature_id")]
        for url, status, field in cases:
            assert_error(srv.client.get(url), status, field)
        assert "/v1/features/{sae_id}/{layer}/{stream}/{feature_id}" in srv.client.get("/schema/openapi.json").json()[
            "paths"]
    finally:
        srv.stop()
    assert "unhandled error" not in srv.log.read_text()


def test_feature_route_on_a_catalog_without_runs(toy_registry, tmp_path):
    srv = Server(tmp_path / "empty.duckdb", toy_registry, tmp_path / "server.log")
    try:
        assert "toy" in httpx.get(srv.url + "/healthz").json()["saes"]  # registered, but no run stored it yet
        assert_error(srv.client.get("/v1/features/toy/1/resid_pre/3"), 404, "sae_id")
    finally:
        srv.stop()


def test_feature_show_picks_a_models_calibration(stored, toy_registry, tmp_path):
    """After a fine-tune calibrated the SAE too (as drift does), the newest calibration is the
    fine-tune's; ``--model`` shows the base model's statistics instead, equal to its feature_stats row."""
    db = tmp_path / "copy.duckdb"
    shutil.copy(stored, db)
    fid = _busiest_feature(db)
    corpus = Registry.load(toy_registry).models["toy"].calibration_corpus
    common = ["--db", str(db), "--registry", str(toy_registry)]
    done = run_cli("calibrate", "--model", "toy-finance", "--sae", "toy", "--layers", str(LAYER), "--streams", STREAM,
                   "--corpus", str(corpus), *common)
    assert done.returncode == 0, done.stderr
    show = ["feature", "show", "--sae", "toy", "--layer", str(LAYER), "--feature", str(fid), "--format", "json", *common]
    newest, base = (json.loads(run_cli(*show, *extra).stdout)["calibration"] for extra in ([], ["--model", "toy"]))
    assert (newest["model_id"], base["model_id"]) == ("toy-finance", "toy")
    with _read(db) as con:
        row = con.execute("SELECT f.calibration_id, f.mean, f.max, f.p95, f.density FROM feature_stats f "
                          "JOIN calibrations c USING (calibration_id) JOIN models m USING (model_key) "
                          "JOIN saes s ON s.sae_key = f.sae_key WHERE m.model_id = 'toy' AND s.layer = ? "
                          "AND f.feature_id = ?", [LAYER, fid]).fetchall()
    assert [(base["calibration_id"], base["mean"], base["max"], base["p95"], base["density"])] == \
        [tuple(pytest.approx(v) for v in r) for r in row]
    assert newest["calibration_id"] > base["calibration_id"]
    unknown = run_cli(*show, "--model", "nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: model_id: no calibration of 'nope'"), \
        unknown.stderr
