"""Label import from every format into a real catalog, and the best-label choice in results."""

from __future__ import annotations

import csv
import gzip
import json
import shutil

import numpy as np
import pytest

from catalog import ranking
from catalog.db import Catalog
from catalog.errors import CatalogError, LabelFileError
from sae_discover.registry import Registry
from sae_discover.request import RequestError, build_request
from sae_discover.service import Discovery
from sae_discover.stored import rerank


def _labels(discovery) -> dict:
    rows = discovery.catalog.raw().execute(
        "SELECT layer, stream, feature_id, label, source, score FROM v_labels WHERE source <> 'lite' "
        "ORDER BY layer, stream, feature_id, source").fetchall()
    return {(r[0], r[1], r[2], r[4]): (r[3], r[5]) for r in rows}


def test_neuronpedia_jsonl_gz(toy_discovery, tmp_path):
    path = tmp_path / "explanations.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for idx, desc in [(3, "finance terms"), (7, "sports scores")]:
            fh.write(json.dumps({"modelId": "toy", "layer": "1-res-jb", "index": str(idx), "description": desc,
                                 "explanationModelName": "gpt-4o"}) + "\n")
    info = toy_discovery.import_labels(path, "toy")
    assert info == {"imported": 2, "replaced": 0, "hooks": [[1, "resid_pre"]]}
    assert _labels(toy_discovery) == {(1, "resid_pre", 3, "neuronpedia"): ("finance terms", None),
                                      (1, "resid_pre", 7, "neuronpedia"): ("sports scores", None)}


def test_a_pretty_printed_neuronpedia_object_and_array_are_read_whole(toy_discovery, tmp_path):
    """A ``.json`` file holding one explanation object written over several lines (``json.dump(...,
    indent=2)``) is one label, not a "line 1 is not JSON" error; an indented array gives one label per
    object; a broken object still names the line where reading stopped."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"modelId": "toy", "layer": "1-res-jb", "index": 5, "description": "kitchen verbs",
                               "score": 0.4}, indent=2))
    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"modelId": "toy", "layer": "1-res-jb", "index": i, "description": f"label {i}"}
                                for i in (8, 9)], indent=2))
    assert toy_discovery.import_labels(one, "toy")["imported"] == 1
    assert _labels(toy_discovery) == {(1, "resid_pre", 5, "neuronpedia"): ("kitchen verbs", 0.4)}
    assert toy_discovery.import_labels(many, "toy")["imported"] == 2  # (an import replaces the hook's labels)
    assert _labels(toy_discovery) == {(1, "resid_pre", 8, "neuronpedia"): ("label 8", None),
                                      (1, "resid_pre", 9, "neuronpedia"): ("label 9", None)}
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "index": 5,\n  "description": "x"\n')
    with pytest.raises(CatalogError, match=r"broken.json:1 is not JSON"):
        toy_discovery.import_labels(broken, "toy")

def test_neuronpedia_feature_records_and_typed_scores(toy_discovery, tmp_path):
    """The explanation-scores export (one line per feature, its ``explanations`` each with ``scores`` of
    typed entries): one label per explanation, scored by the mean value of the chosen ``score_type``'s
    entries (two scorer models of one type here); entries of several types
    without ``score_type`` are refused naming it and the types; a plain ``score`` still reads as before."""
    def entry(kind, model, value):
        return {"explanationScoreTypeName": kind, "explanationScoreModelName": model, "value": value}

    records = [
        {"modelId": "toy", "layer": "1-res-jb", "index": "4", "explanations": [
            {"description": "currency symbols", "explanationModelName": "gpt-4o",
             "scores": [entry("eleuther_fuzz", "a", 0.6), entry("eleuther_fuzz", "b", 0.8),
                        entry("recall_alt", "a", 0.1)]},
            {"description": "money words", "scores": [entry("eleuther_fuzz", "a", 0.9), entry("recall_alt", "a", 0.95)]},
            {"description": "unscored guess", "scores": []}]},
        {"modelId": "toy", "layer": "1-res-jb", "index": 6, "explanations": []},  # a feature not explained yet
        {"modelId": "toy", "layer": "1-res-jb", "index": 7, "description": "plain", "score": 0.3}]
    path = tmp_path / "explanation-scores.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(LabelFileError, match=r"score_type: .*explanation-scores.jsonl:1: scores of several types "
                                             r"\(eleuther_fuzz, recall_alt\); choose .* with score_type") as refused:
        toy_discovery.import_labels(path, "toy")
    assert refused.value.field == "score_type"
    assert _labels(toy_discovery) == {}  # nothing written
    assert toy_discovery.import_labels(path, "toy", score_type="eleuther_fuzz")["imported"] == 4
    def stored():
        con = toy_discovery.catalog.raw()
        try:
            return sorted(con.execute("SELECT feature_id, label, score FROM v_labels WHERE source = 'neuronpedia'")
                          .fetchall(), key=lambda r: (r[0], r[1]))
        finally:
            con.close()

    assert stored() == [(4, "currency symbols", pytest.approx(0.7)), (4, "money words", pytest.approx(0.9)),
                        (4, "unscored guess", None), (7, "plain", None)]  # a plain score has no type: not chosen
    assert toy_discovery.import_labels(path, "toy", score_type="recall_alt")["replaced"] == 4
    assert stored() == [(4, "currency symbols", pytest.approx(0.1)), (4, "money words", pytest.approx(0.95)),
                        (4, "unscored guess", None), (7, "plain", None)]
    split = tmp_path / "split.jsonl"  # each explanation of one type, the file of two: refused as well
    split.write_text(json.dumps({"layer": "1-res-jb", "index": 3, "explanations": [
        {"description": "a", "scores": [entry("eleuther_fuzz", "a", 0.9)]},
        {"description": "b", "scores": [entry("recall_alt", "a", 0.2), 0.3]}]}) + "\n")
    with pytest.raises(LabelFileError, match=r"score_type: split.jsonl:1: scores of several types \(recall_alt, "
                                             r"untyped numbers\)"):
        toy_discovery.import_labels(split, "toy")
    split.write_text(json.dumps({"layer": "1-res-jb", "index": 3, "explanations": [
        {"description": "a", "scores": [entry("eleuther_fuzz", "a", 0.9)]},
        {"description": "b", "scores": [entry("recall_alt", "a", 0.2)]}]}) + "\n")
    with pytest.raises(LabelFileError, match=r"score_type: split.jsonl: its explanations are scored by several "
                                             r"types \(eleuther_fuzz, recall_alt\)"):
        toy_discovery.import_labels(split, "toy")
    one_type = tmp_path / "one-type.jsonl"  # entries of one type need no score_type: their mean
    one_type.write_text(json.dumps({"layer": "1-res-jb", "index": 2, "description": "d", "scores": [
        entry("eleuther_fuzz", "a", 0.2), entry("eleuther_fuzz", "b", 0.5)]}) + "\n")
    toy_discovery.import_labels(one_type, "toy")
    assert stored() == [(2, "d", pytest.approx(0.35))]
    with pytest.raises(LabelFileError, match=r"score_type: one-type.jsonl has no score of type 'eleuther_fuz'; its "
                                             r"score types: eleuther_fuzz"):
        toy_discovery.import_labels(one_type, "toy", score_type="eleuther_fuz")  # a typo: nothing replaced
    assert stored() == [(2, "d", pytest.approx(0.35))]
    with pytest.raises(CatalogError, match="score_type: only Neuronpedia files"):
        csv_file = tmp_path / "l.csv"
        csv_file.write_text("feature_id,label\n1,x\n")
        toy_discovery.import_labels(csv_file, "toy", layer=1, stream="resid_pre", score_type="recall_alt")

def test_delphi_folder(toy_discovery, tmp_path):
    folder = tmp_path / "explanations"
    folder.mkdir()
    (folder / "layers.1.mlp_latent5.txt").write_text(json.dumps("cooking verbs"))
    (folder / "layers.1.mlp_latent9.txt").write_text("weather words")
    info = toy_discovery.import_labels(folder, "toy")
    assert info["hooks"] == [[1, "mlp_out"]]
    assert _labels(toy_discovery) == {(1, "mlp_out", 5, "delphi"): ("cooking verbs", None),
                                      (1, "mlp_out", 9, "delphi"): ("weather words", None)}


def test_csv_and_the_best_label_wins(toy_discovery, tmp_path):
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["feature_id", "label", "score", "source"])
        w.writerows([[4, "weak guess", 0.2, "autointerp-lite"], [4, "strong label", 0.9, "autointerp-full"],
                     [6, "unscored", "", ""]])
    toy_discovery.import_labels(path, "toy", layer=0, stream="resid_pre")
    labels = _labels(toy_discovery)
    assert labels[(0, "resid_pre", 4, "autointerp-full")] == ("strong label", 0.9)
    assert labels[(0, "resid_pre", 6, "csv")] == ("unscored", None)
    toy_discovery.discover(build_request({  # first use of layer 0 calibrates it and builds lite labels
        "model_id": "toy", "sae_id": "toy", "text": "Revenue rose and EPS beat estimates.", "layers": [0]}))
    con = toy_discovery.catalog.raw()
    key = con.execute("SELECT sae_key FROM saes WHERE layer = 0").fetchone()[0]
    lite = dict(con.execute("SELECT feature_id, label FROM labels WHERE source = 'lite' AND sae_key = ?", [key]).fetchall())
    assert 4 in lite and 6 in lite and lite[4].startswith(("fires on", "promotes"))
    (cal,) = con.execute("SELECT DISTINCT calibration_id FROM labels WHERE source = 'lite' AND sae_key = ?",
                         [key]).fetchone()
    assert cal == con.execute("SELECT max(calibration_id) FROM feature_stats WHERE sae_key = ?", [key]).fetchone()[0]
    other = next(f for f in sorted(lite) if f not in (4, 6))
    features = [{"sae_key": key, "feature_id": f} for f in (4, 6, other)]
    ranking._attach_labels(con, features, [cal] * 3)
    assert [f["proto_label"] for f in features] == ["strong label", "unscored", lite[other]]
    assert all(set(f) == {"sae_key", "feature_id", "proto_label"} for f in features)
    # a lite label belongs to its calibration: ranked on another one (or none), the feature has none
    for other_cal in (cal + 1, None):
        features = [{"sae_key": key, "feature_id": f} for f in (4, other)]
        ranking._attach_labels(con, features, [other_cal] * 2)
        assert [f["proto_label"] for f in features] == ["strong label", None]


def test_bad_label_files_write_nothing(toy_discovery, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("feature_id,label\n1,ok\nx,broken\n")
    with pytest.raises(CatalogError, match=r"feature_id: bad\.csv:3"):
        toy_discovery.import_labels(path, "toy", layer=0, stream="resid_pre")
    big = tmp_path / "big.csv"
    big.write_text("feature_id,label\n1,ok\n100000,too big\n")
    with pytest.raises(LabelFileError, match=r"feature_id: big\.csv:3: 100000 is beyond"):
        toy_discovery.import_labels(big, "toy", layer=0, stream="resid_pre")
    nohook = tmp_path / "nohook.csv"
    nohook.write_text("feature_id,label\n1,ok\n")
    with pytest.raises(RequestError, match=r"give layer and stream \(--layer, --stream\)"):
        toy_discovery.import_labels(nohook, "toy")
    # a hook the SAE lacks, given as layer and stream, names the one of the two that is wrong
    for layer, stream, field in ((0, "mlp_out", "stream"), (99, "resid_pre", "layer")):
        with pytest.raises(RequestError, match=rf"no SAE for layer {layer} {stream}; it has layer 0 resid_pre") as exc:
            toy_discovery.import_labels(nohook, "toy", layer=layer, stream=stream)
        assert exc.value.field == field
    assert toy_discovery.catalog.raw().execute("SELECT count(*) FROM labels").fetchone()[0] == 0


def test_lite_labels_belong_to_their_calibration(toy_discovery, toy_demo):
    """Calibrating the SAE with a second model (a fine-tune, as drift does) adds that calibration's lite
    labels and leaves the first model's runs with their own: a ranking shows the lite labels of the
    calibration it used."""
    from catalog.report import feature_labels

    req = {"sae_id": "toy", "text": "Revenue rose and EPS beat estimates.", "layers": [1], "min_coverage_pct": 0,
           "return_top_x": 1000}
    base = toy_discovery.discover(build_request({**req, "model_id": "toy"}))  # first use: calibrates with toy
    toy_discovery.calibrate("toy-finance", "toy", toy_demo / "calibration.jsonl", hooks=[(1, "resid_pre")])
    tuned = toy_discovery.discover(build_request({**req, "model_id": "toy-finance"}))
    again = toy_discovery.discover(build_request({**req, "model_id": "toy"}))
    assert again["cached"] and base["calibration_id"] != tuned["calibration_id"]
    con = toy_discovery.catalog.raw()
    key = con.execute("SELECT sae_key FROM saes WHERE layer = 1 AND stream = 'resid_pre'").fetchone()[0]
    lite: dict[int, dict[int, str]] = {}
    for cal, fid, label in con.execute("SELECT calibration_id, feature_id, label FROM v_labels WHERE source = 'lite' "
                                       "AND sae_key = ?", [key]).fetchall():
        lite.setdefault(cal, {})[fid] = label
    assert set(lite) == {base["calibration_id"], tuned["calibration_id"]}
    for result in (base, again, tuned):
        shown = {f["feature_id"]: f["proto_label"] for f in result["features"]}
        assert len(shown) > 10 and shown == {f: lite[result["calibration_id"]].get(f) for f in shown}
    common = set(lite[base["calibration_id"]]) & set(lite[tuned["calibration_id"]])
    assert any(lite[base["calibration_id"]][f] != lite[tuned["calibration_id"]][f] for f in common)
    # a run's report lists only its calibration's lite label; feature show lists both, each with its calibration
    fid = next(iter(sorted(common)))
    mine = feature_labels(con, [(key, fid)], {key: base["calibration_id"]})[(key, fid)]
    assert [(x["label"], x["calibration_id"]) for x in mine] == [(lite[base["calibration_id"]][fid], base["calibration_id"])]
    every = feature_labels(con, [(key, fid)])[(key, fid)]
    assert sorted(x["calibration_id"] for x in every) == sorted(lite)
    # a report of the base run ranked on the fine-tune's calibration (pinned): its labels, decoder tokens
    # and histograms are that calibration's, as the table's proto_label
    from sae_discover.report.data import stored_section

    pinned = tuned["calibration_id"]
    for options, cal in (({}, base["calibration_id"]), ({"calibration_id": pinned}, pinned)):
        section = stored_section(toy_discovery.catalog, base["run_id"], {**options, "min_coverage_pct": 0})
        assert section["response"]["calibration_id"] == cal and len(section["features"]) > 5
        for shown, data in zip(section["response"]["features"], section["features"], strict=True):
            lite_of = [x for x in data["l"] if x["source"] == "lite"]
            assert [x["calibration_id"] for x in lite_of] == [cal]
            assert shown["proto_label"] == lite_of[0]["label"] == lite[cal][shown["feature_id"]]
            assert data["h"]["calibration_id"] == cal


def test_a_csv_row_with_a_layer_and_no_stream_is_refused_naming_its_line(toy_discovery, tmp_path):
    path = tmp_path / "half.csv"
    path.write_text("feature_id,label,layer,stream\n1,ok,1,resid_pre\n2,half,1,\n")
    with pytest.raises(CatalogError) as err:
        toy_discovery.import_labels(path, "toy")
    assert err.value.field == "stream" and err.value.message.startswith("half.csv:3: give layer and stream together")



def test_first_use_adds_more_saes_to_the_models_calibration_on_that_corpus(toy_discovery, toy_registry, tmp_path):
    """Layer 0 first, then layers 0 and 1: the second first use adds layer 1 to calibration 1 (the same
    model and corpus: the same tokens, stored once) instead of making a calibration 2, so one calibration
    covers the ranking and ``calibration_id`` pins it; layer 1's statistics equal those of a calibration
    of both layers at once in another catalog."""
    text = {"model_id": "toy", "sae_id": "toy", "text": "Revenue rose as margins widened."}
    first = toy_discovery.discover(build_request({**text, "layers": [0]}))
    both = toy_discovery.discover(build_request({**text, "layers": [0, 1], "min_coverage_pct": 0}))
    assert first["calibration_id"] == both["calibration_id"] == 1
    con = toy_discovery.catalog.raw()
    try:
        (n_cal,), (n_saes,) = (con.execute(q).fetchone() for q in (
            "SELECT count(*) FROM calibrations", "SELECT count(*) FROM calibration_saes WHERE calibration_id = 1"))
        (n_tokens, stored_tokens) = con.execute("SELECT n_tokens, (SELECT count(*) FROM calibration_tokens) "
                                                "FROM calibrations").fetchone()
        mine = con.execute("SELECT f.feature_id, f.p95, f.p95_all, f.mean, f.max, f.density FROM feature_stats f "
                           "JOIN saes s USING (sae_key) WHERE s.layer = 1 ORDER BY 1").fetchall()
    finally:
        con.close()
    assert (n_cal, n_saes) == (1, 2) and stored_tokens == n_tokens  # the corpus' tokens once
    pinned = rerank(toy_discovery.catalog, both["run_id"], {"calibration_id": 1, "min_coverage_pct": 0})
    assert [(f["layer"], f["feature_id"], f["score"]) for f in pinned["features"]] == \
        [(f["layer"], f["feature_id"], f["score"]) for f in both["features"]]
    other = Catalog(tmp_path / "other.duckdb")
    try:
        corpus = Registry.load(toy_registry).models["toy"].calibration_corpus
        Discovery(other, Registry.load(toy_registry), device="cpu").calibrator.calibrate(
            "toy", "toy", corpus, [(0, "resid_pre"), (1, "resid_pre")])
        con = other.raw()
        at_once = con.execute("SELECT f.feature_id, f.p95, f.p95_all, f.mean, f.max, f.density FROM feature_stats f "
                              "JOIN saes s USING (sae_key) WHERE s.layer = 1 ORDER BY 1").fetchall()
        con.close()
    finally:
        other.close()
    assert len(mine) == len(at_once) > 0
    assert np.allclose(np.array(mine, float), np.array(at_once, float), rtol=1e-5, atol=1e-6)


def test_first_use_makes_its_own_calibration_when_its_tokens_differ(toy_demo, tmp_path):
    """An SAE that prepends no BOS sees the same documents at positions shifted by one: as many tokens
    (no document reaches the context length here), other (doc, position)s. It gets a calibration of its
    own, whose activations all sit on its own tokens — not the first SAE's calibration."""
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "Revenue grew and margins widened.", "The striker scored twice.", "Bake the pie for an hour.",
        "The patient had a fever.", "Rain is expected tomorrow.", "The function returns a list.") * 3))
    no_bos = tmp_path / "saes-no-bos" / "blocks.0.hook_resid_pre"
    shutil.copytree(toy_demo / "saes" / "blocks.0.hook_resid_pre", no_bos)
    cfg = json.loads((no_bos / "cfg.json").read_text())
    cfg["metadata"]["prepend_bos"] = False
    (no_bos / "cfg.json").write_text(json.dumps(cfg))
    registry = tmp_path / "reg.toml"
    registry.write_text(f'[models.toy]\npath = "{toy_demo / "model"}"\ncalibration_corpus = "{corpus}"\n'
                        f'[saes.toy]\npath = "{toy_demo / "saes"}"\n[saes.nobos]\npath = "{no_bos.parent}"\n')
    disc = Discovery(Catalog(tmp_path / "c.duckdb"), Registry.load(registry), device="cpu")
    try:
        ids = [disc.discover(build_request({"model_id": "toy", "sae_id": sae, "text": "Revenue grew.", "layers": [0]}))[
            "calibration_id"] for sae in ("toy", "nobos")]
        con = disc.catalog.raw()
        try:
            counts = con.execute("SELECT calibration_id, n_tokens, (SELECT count(*) FROM calibration_tokens t "
                                 "WHERE t.calibration_id = c.calibration_id) FROM calibrations c ORDER BY 1").fetchall()
            (orphans,) = con.execute("SELECT count(*) FROM calibration_activations a ANTI JOIN calibration_tokens t "
                                     "USING (calibration_id, doc, position)").fetchone()
        finally:
            con.close()
    finally:
        disc.catalog.close()
    assert ids == [1, 2]
    assert counts[0][1] == counts[1][1]  # as many tokens: a count alone would not tell the two apart
    assert all(n == stored for _, n, stored in counts) and orphans == 0
