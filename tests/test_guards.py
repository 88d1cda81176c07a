"""Guards: bad requests refused before any model runs, per-model calibration, run identity, label re-imports."""

from __future__ import annotations

import pytest

from catalog.db import Catalog
from catalog.errors import CatalogError, LabelFileError
from sae_discover.registry import Registry
from sae_discover.request import RequestError, build_request
from sae_discover.service import Discovery
from tests.conftest import run_cli


def _runs(discovery) -> int:
    return discovery.catalog.raw().execute("SELECT count(*) FROM runs").fetchone()[0]


def test_restricting_to_features_beyond_the_sae_is_refused_before_the_model_runs(toy_discovery):
    req = build_request({"model_id": "toy", "sae_id": "toy", "text": "Revenue rose.", "layers": [1],
                         "restrict_features": [3, 99_999]})
    with pytest.raises(RequestError, match="restrict_features: feature 99999 is beyond the 64 features"):
        toy_discovery.discover(req)
    assert toy_discovery.model_calls == 0 and _runs(toy_discovery) == 0


def test_selectivity_without_any_background_is_refused_before_the_model_runs(toy_demo, tmp_path):
    registry = tmp_path / "reg.toml"  # no calibration corpus: nothing can provide a background
    registry.write_text(f'[models.bare]\npath = "{toy_demo / "model"}"\n[saes.toy]\npath = "{toy_demo / "saes"}"\n')
    cat = Catalog(tmp_path / "c.duckdb")
    disc = Discovery(cat, Registry.load(registry), device="cpu")
    req = build_request({"model_id": "bare", "sae_id": "toy", "text": "Revenue rose.", "layers": [1],
                         "score_mode": "selectivity"})
    with pytest.raises(RequestError, match="score_mode: selectivity needs a background"):
        disc.discover(req)
    assert disc.model_calls == 0 and _runs(disc) == 0
    with_background = disc.discover(build_request({**{k: v for k, v in req.to_dict().items() if v is not None},
                                                   "background_text": "The weather is mild."}))
    assert with_background["features"] and with_background["normalization"] == "none"
    cat.close()


def test_a_lone_batch_background_or_an_unusable_pinned_calibration_is_refused_before_the_model_runs(toy_discovery):
    """A single prompt ranked against a batch background has no other prompt to be contrasted with, and a
    pinned calibration that does not exist (or lacks the hook) cannot rank it: both refused naming their
    field before any run is made, stored or tagged — also when the run is stored already (its tags and
    batch id stay). In a batch, two prompts of the same model and SAEs contrast each other; a mean ranking
    (which does not use the background) of one prompt is not refused."""
    body = {"model_id": "toy", "sae_id": "toy", "layers": [1]}
    refused = [
        ({**body, "text": "Revenue rose.", "background": "batch", "score_mode": "lift"},
         "background: batch contrasts each prompt with the other prompts sent with it"),
        ({**body, "text": "Revenue rose.", "calibration_id": 99}, "calibration_id: no calibration 99 in the catalog"),
        ({**body, "text": "Revenue rose.", "layers": [0], "calibration_id": 1},
         "calibration_id: calibration 1 has no statistics for the SAE of layer 0 resid_pre"),
    ]
    first = toy_discovery.discover(build_request({**body, "text": "Stocks fell."}))  # calibrates layer 1: id 1
    assert first["calibration_id"] == 1 and toy_discovery.model_calls == 1
    for request, message in refused:
        for text in ("Revenue rose.", "Stocks fell."):  # a new run, and a stored one
            with pytest.raises((RequestError, CatalogError), match=message):
                toy_discovery.discover(build_request({**request, "text": text, "tags": {"refused": "yes"},
                                                      "id": "nope"}))
    con = toy_discovery.catalog.raw()
    assert con.execute("SELECT count(*), count(batch_id), count(*) FILTER (WHERE len(map_keys(tags)) > 0) "
                       "FROM v_runs").fetchone() == (1, 0, 0)
    con.close()
    assert toy_discovery.model_calls == 1
    assert toy_discovery.discover(build_request({**body, "text": "Revenue rose.", "background": "batch",
                                                 "score_mode": "mean"}))["features"]
    pair = toy_discovery.discover_many([build_request({**body, "text": t, "background": "batch", "score_mode": "lift"})
                                        for t in ("Revenue rose.", "The striker scored.")])
    assert all(isinstance(r, dict) and r["features"] for r in pair)
    calls = toy_discovery.model_calls
    same = toy_discovery.discover_many([build_request({**body, "text": "A brand new line.", "background": "batch",
                                                       "score_mode": mode}) for mode in ("lift", "selectivity")])
    assert all(isinstance(r, RequestError) and r.field == "background" for r in same)  # one prompt twice: one run
    assert toy_discovery.model_calls == calls


def test_attribution_and_plain_requests_go_together(toy_discovery):
    """A request with attributions and one without, of the same model, SAE and hooks, share a micro-batch
    (their activations tables differ by the attr column) and a batch background: each is answered, the
    attribution ranking without needing attributions of its contrast runs."""
    body = {"model_id": "toy", "sae_id": "toy", "layers": [1]}
    for extra in ({}, {"background": "batch"}):
        got = toy_discovery.discover_many([
            build_request({**body, **extra, "text": f"Revenue rose {bool(extra)}.", "score_mode": "attribution",
                           "attribution_target": "next_tokens"}),
            build_request({**body, **extra, "text": f"The striker scored {bool(extra)}.", "score_mode": "mean"})])
        assert all(isinstance(r, dict) and r["features"] for r in got), got
        con = toy_discovery.catalog.raw()
        counts = dict(con.execute("SELECT run_id, count(attr) FROM v_activations WHERE list_contains(?, run_id) "
                                  "GROUP BY run_id", [[r["run_id"] for r in got]]).fetchall())
        con.close()
        assert counts[got[0]["run_id"]] > 0 and counts[got[1]["run_id"]] == 0

def test_calibrations_belong_to_their_model(toy_discovery):
    body = {"sae_id": "toy", "text": "Shares of Hooli fell.", "layers": [1]}
    calibrated = toy_discovery.discover(build_request({**body, "model_id": "toy"}))
    assert calibrated["threshold_source"] == "calibration_p95"
    other = toy_discovery.discover(build_request({**body, "model_id": "toy-finance"}))
    assert other["threshold_source"] == "none"  # toy's calibration does not serve the fine-tune
    assert other["normalization"] == "none"


def test_precision_is_part_of_the_run_identity(toy_registry, tmp_path):
    cat = Catalog(tmp_path / "c.duckdb")
    req = build_request({"model_id": "toy", "sae_id": "toy", "text": "Revenue rose.", "layers": [1]})
    ids = {dtype: Discovery(cat, Registry.load(toy_registry), device="cpu", dtype=dtype).prepare(req).run_id
           for dtype in ("float32", "bfloat16")}
    assert ids["float32"] != ids["bfloat16"]
    cat.close()


def test_label_files_with_bad_rows_name_the_problem_and_reimports_replace(toy_discovery, tmp_path):
    bad = {"layer.csv": ("feature_id,label,layer,stream\n3,x,two,resid_pre\n", CatalogError, "layer: layer.csv:2"),
           "stream.csv": ("feature_id,label,layer,stream\n3,x,1,resid_mid\n", CatalogError, "stream: stream.csv:2"),
           "other.csv": ("sae,feature_id,label\nsomeone-else,3,x\n", LabelFileError,
                         "sae: other.csv:2: a row of the file names SAE"),
           "rows.jsonl": ("5\n", CatalogError, "expected Neuronpedia fields"),
           "array.json": ("[1,2", CatalogError, "is not a JSON array")}
    for name, (content, error, message) in bad.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(error, match=message):
            toy_discovery.import_labels(path, "toy", layer=1, stream="resid_pre")
    good = tmp_path / "good.csv"
    good.write_text("sae,feature_id,label\ntoy,3,revenue words\ntoy,4,sports words\n")
    for _ in range(2):
        toy_discovery.import_labels(good, "toy", layer=1, stream="resid_pre")
    rows = toy_discovery.catalog.raw().execute("SELECT feature_id, label FROM v_labels WHERE source = 'csv' "
                                               "ORDER BY feature_id").fetchall()
    assert rows == [(3, "revenue words"), (4, "sports words")]  # the second import replaced the first


def test_registry_paths_are_relative_to_the_registry_file(toy_demo, tmp_path):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "corpus.txt").write_text("Revenue rose.\n")
    (folder / "sae-discover.toml").write_text(f'[models.m]\npath = "{toy_demo / "model"}"\n'
                                              'calibration_corpus = "corpus.txt"\n')
    entry = Registry.load(folder / "sae-discover.toml").model("m", allow_paths=False)
    assert entry.calibration_corpus == str(folder / "corpus.txt")


def test_sql_cannot_touch_files_outside_the_catalog(toy_discovery, tmp_path):
    db = toy_discovery.catalog.path
    toy_discovery.catalog.close()
    out = tmp_path / "leak.csv"
    proc = run_cli("sql", f"COPY (SELECT 1) TO '{out}'", "--db", db)
    assert proc.returncode == 2 and not out.exists()
    proc = run_cli("sql", "SELECT count(*) FROM v_runs", "--db", db)
    assert proc.returncode == 0 and proc.stdout.splitlines()[1] == "0"


def test_calibrating_an_sae_source_with_a_hook_beyond_the_model_says_where_it_comes_from(toy_demo, tmp_path):
    """``calibrate`` without --layers calibrates every SAE of the source: one deeper than the model is
    refused naming the source and how to pick the others (nothing written); given --layers, it runs."""
    import json
    import shutil

    saes = tmp_path / "saes"
    shutil.copytree(toy_demo / "saes" / "blocks.1.hook_resid_pre", saes / "blocks.1.hook_resid_pre")
    shutil.copytree(toy_demo / "saes" / "blocks.1.hook_resid_pre", saes / "blocks.5.hook_resid_pre")
    cfg = json.loads((saes / "blocks.5.hook_resid_pre" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.5.hook_resid_pre"
    (saes / "blocks.5.hook_resid_pre" / "cfg.json").write_text(json.dumps(cfg))
    registry = tmp_path / "reg.toml"
    registry.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\n[saes.deep]\npath = "{saes}"\n')
    db = tmp_path / "c.duckdb"
    args = ["calibrate", "--model", "toy", "--sae", "deep", "--corpus", str(toy_demo / "calibration.jsonl"),
            "--registry", str(registry), "--db", str(db), "--device", "cpu"]
    refused = run_cli(*args)
    err = refused.stderr.strip()
    assert refused.returncode == 2 and "\n" not in err, refused.stderr
    assert err.startswith("error: layers: layer 5 is out of range for toy (2 layers: 0..1) (the SAE source 'deep' ")
    assert "--layers" in err
    done = run_cli(*args, "--layers", "1")
    assert done.returncode == 0, done.stderr
    cat = Catalog(db, read_only=True)
    try:
        assert cat.raw().execute("SELECT count(DISTINCT calibration_id) FROM feature_stats").fetchone() == (1,)
    finally:
        cat.close()


def test_saes_that_disagree_on_prepend_bos_are_said_in_the_warnings(toy_demo, tmp_path):
    """Ingest prepends BOS only when every SAE of a run expects it: a run over SAEs that disagree says so
    (naming the hooks), made or read back; SAEs that agree get no such warning."""
    import json
    import shutil

    saes = tmp_path / "saes"
    shutil.copytree(toy_demo / "saes", saes)
    cfg_path = saes / "blocks.1.hook_mlp_out" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["prepend_bos"] = False
    cfg_path.write_text(json.dumps(cfg))
    registry = tmp_path / "reg.toml"
    registry.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\n[saes.mixed]\npath = "{saes}"\n')
    cat = Catalog(tmp_path / "c.duckdb")
    disc = Discovery(cat, Registry.load(registry), device="cpu")
    base = {"model_id": "toy", "sae_id": "mixed", "text": "Revenue rose and margins held.", "layers": [1],
            "min_coverage_pct": 0}
    alone = disc.discover(build_request({**base, "streams": ["resid_pre"]}))
    for _ in range(2):
        mixed = disc.discover(build_request({**base, "streams": ["resid_pre", "mlp_out"]}))
        said = [w for w in mixed["warnings"] if w.startswith("hooks: ")]
        assert len(said) == 1 and "layer 1 mlp_out: false" in said[0] and "no BOS" in said[0]
        assert mixed["analyzed"]["total_tokens"] == alone["analyzed"]["total_tokens"] - 1  # no BOS
    assert mixed["cached"] and not [w for w in alone["warnings"] if w.startswith("hooks: ")]
    cat.close()
