"""A researcher's first hour (issue 13): options do what they say or are refused, `runs` lists and finds
runs like the API, outputs say what was analyzed, batches report failure, hooks come as pairs, the
table and help are readable, delphi names map to the right SAE. CLI runs as subprocesses on the toy."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from catalog.errors import LabelFileError
from catalog.ranking import word_window
from sae_discover.output import table
from sae_discover.request import RERANK_FIELDS, RequestError, build_request, options
from tests.conftest import ROOT, read_json, run_cli

TEXT = "Shares of Hooli fell 9% after the company missed on churn."
PROMPT = "The quarterly report of Globex says"


@pytest.fixture(scope="module")
def hour(toy_registry, tmp_path_factory):
    """A fresh catalog with a text run (layers 0 and 1) and a prompt+gen run over two hook pairs."""
    tmp = tmp_path_factory.mktemp("hour")
    db = tmp / "c.duckdb"
    base = ["--registry", str(toy_registry), "--db", str(db), "--model", "toy", "--sae", "toy", "--min_coverage_pct", "0"]
    a = run_cli(*base, "--text", TEXT, "--layers", "0", "1", "--return_top_x", "1000", "--out", str(tmp / "a.csv"))
    assert a.returncode == 0, a.stderr
    b = run_cli(*base, "--prompt", PROMPT, "--gen_tokens", "8", "--hooks", "0:resid_pre,1:mlp_out",
                "--merge_across_layers", "false", "--return_top_x", "3", "--out", str(tmp / "b.json"))
    assert b.returncode == 0, b.stderr
    a_json = run_cli("runs", "rank", "--db", str(db), "--min_coverage_pct", "0", "--return_top_x", "1000",
                     next(line.split()[-1] for line in a.stdout.splitlines() if "new run" in line),
                     "--out", str(tmp / "a.json"))
    assert a_json.returncode == 0, a_json.stderr
    return {"db": db, "tmp": tmp, "a": read_json(tmp / "a.json"), "b": read_json(tmp / "b.json"), "a_proc": a,
            "b_proc": b, "base": base}


def runs_cli(hour, *args: str):
    return run_cli("runs", *args, "--db", str(hour["db"]))


# -- item 3: options that were accepted and ignored -------------------------------------------------

def test_runs_list_formats_do_what_they_say(hour):
    page = json.loads(runs_cli(hour, "list", "--format", "json").stdout)
    assert page["total"] == 2 and [r["run_id"] for r in page["runs"]] == [hour["b"]["run_id"], hour["a"]["run_id"]]
    assert page["runs"][1]["layers"] == [0, 1] and page["runs"][0]["streams"] == ["resid_pre", "mlp_out"]
    printed = list(csv.DictReader(io.StringIO(runs_cli(hour, "list", "--format", "csv").stdout)))
    assert [r["run_id"] for r in printed] == [r["run_id"] for r in page["runs"]]
    assert printed[1]["layers"] == "0 1" and printed[1]["input"] == TEXT
    for name in ("l.json", "l.csv", "l.jsonl"):
        proc = runs_cli(hour, "list", "--out", str(hour["tmp"] / name))
        assert proc.returncode == 0, proc.stderr
    assert json.loads((hour["tmp"] / "l.json").read_text()) == page
    assert (hour["tmp"] / "l.csv").read_text() == runs_cli(hour, "list", "--format", "csv").stdout
    assert [json.loads(x)["run_id"] for x in (hour["tmp"] / "l.jsonl").read_text().splitlines()] == \
        [r["run_id"] for r in page["runs"]]
    bad = runs_cli(hour, "list", "--out", str(hour["tmp"] / "x.txt"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: out: expected a file ending in .json, .csv, .jsonl")
    assert not (hour["tmp"] / "x.txt").exists()
    clash = runs_cli(hour, "list", "--out", str(hour["tmp"] / "y.csv"), "--format", "json")
    assert clash.returncode == 2 and clash.stderr.startswith("error: format:")


def test_discover_refuses_an_out_file_it_would_not_write_before_running(hour):
    proc = run_cli(*hour["base"], "--text", "x y z", "--out", str(hour["tmp"] / "r.txt"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: out: expected a file ending in .json, .csv")
    rank = runs_cli(hour, "rank", hour["a"]["run_id"], "--out", str(hour["tmp"] / "r.txt"))
    assert rank.returncode == 2 and rank.stderr.startswith("error: out:")
    batch = run_cli(*hour["base"], "--prompts_file", str(hour["tmp"] / "none.jsonl"), "--out", str(hour["tmp"] / "r.json"))
    assert batch.returncode == 2 and batch.stderr.startswith("error: out: expected a file ending in .jsonl")


def test_runs_show_prints_real_json(hour):
    show = json.loads(runs_cli(hour, "show", hour["a"]["run_id"]).stdout)
    assert show["layers"] == [0, 1] and show["streams"] == ["resid_pre"] and show["restrict_features"] == []
    assert isinstance(show["timings"], dict) and show["timings"]["forward_s"] > 0


# -- item 7: runs list filters, run id prefixes, restrict_features on re-rank -----------------------

def test_runs_list_has_a_header_and_the_api_filters(hour):
    lines = runs_cli(hour, "list").stdout.splitlines()
    assert lines[0].split() == ["run_id", "model_id", "sae_id", "mode", "layers", "streams", "n_kept", "n_tokens",
                                "created_at", "input"]
    assert lines[-1] == "(2 of 2 runs)"

    def ids(*flags: str) -> list[str]:
        proc = runs_cli(hour, "list", "--format", "json", *flags)
        assert proc.returncode == 0, proc.stderr
        return [r["run_id"] for r in json.loads(proc.stdout)["runs"]]

    a, b = hour["a"]["run_id"], hour["b"]["run_id"]
    assert ids("--mode", "text") == [a] and ids("--mode", "prompt+gen") == [b] and ids("--mode", "prompt") == []
    assert ids("--model", "toy", "--sae", "toy") == [b, a] and ids("--model", "nobody") == []
    assert ids("--limit", "1") == [b] and ids("--limit", "1", "--offset", "1") == [a]
    bad = runs_cli(hour, "list", "--limit", "-1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: limit:")


def test_a_unique_run_id_prefix_is_accepted_everywhere(hour):
    a = hour["a"]["run_id"]
    assert json.loads(runs_cli(hour, "show", a[:6]).stdout)["run_id"] == a
    out = hour["tmp"] / "prefix.json"
    proc = runs_cli(hour, "rank", a[:8], "--score_mode", "max", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert read_json(out)["run_id"] == a
    short = runs_cli(hour, "show", a[:5])
    assert short.returncode == 2 and short.stderr.startswith("error: run_id: expected a run id or a unique prefix")
    unknown = runs_cli(hour, "show", "ffffff" if not a.startswith("ffffff") else "000000")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: run_id: no run")


def test_runs_rank_restricts_to_features_over_the_stored_rows(hour):
    stored = {f["feature_id"] for f in hour["a"]["features"] if f["layer"] == 1}
    keep = sorted(stored)[:2]
    out = hour["tmp"] / "restricted.json"
    proc = runs_cli(hour, "rank", hour["a"]["run_id"], "--restrict_features", *map(str, keep), "--min_coverage_pct",
                    "0", "--return_top_x", "100", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = read_json(out)
    assert r["run_id"] == hour["a"]["run_id"] and r["cached"]
    assert {f["feature_id"] for f in r["features"]} <= set(keep) and {f["feature_id"] for f in r["features"]} >= set(keep)
    same = {(f["layer"], f["feature_id"]): f["scores"] for f in hour["a"]["features"]}
    for f in r["features"]:  # a filter over the stored rows: the scores are the run's own
        assert f["scores"] == pytest.approx(same[(f["layer"], f["feature_id"])])
    assert json.loads(runs_cli(hour, "list", "--format", "json").stdout)["total"] == 2  # no new run


# -- item 2: what was analyzed ------------------------------------------------------------------------

def test_outputs_say_what_was_analyzed(hour):
    a, b = hour["a"]["analyzed"], hour["b"]["analyzed"]
    assert a["text"] == TEXT and a["continuation"] is None
    assert b["continuation"] and b["text"].endswith(b["continuation"]) and b["text"].startswith(PROMPT)
    assert f"generated: {json.dumps(b['continuation'], ensure_ascii=False)}"[:60] in hour["b_proc"].stdout
    assert "analyzed: " in hour["a_proc"].stdout
    side = read_json(hour["tmp"] / "a.csv.analyzed.json")
    assert side == {"run_id": hour["a"]["run_id"], "mode": "text", "text": TEXT, "continuation": None}
    assert (hour["tmp"] / "a.csv").read_text().splitlines()[0].startswith("feature_id,layer,stream")
    show = json.loads(runs_cli(hour, "show", hour["b"]["run_id"]).stdout)
    assert show["text"] is None and show["prompt"] == PROMPT  # the row: what the user sent
    assert (show["analyzed_text"], show["continuation"]) == (b["text"], b["continuation"])


# -- item 5: batch behaviour -----------------------------------------------------------------------

def test_first_use_calibration_is_announced_before_it_starts(hour):
    err = hour["a_proc"].stderr
    assert "calibrating 2 SAE(s) of 'toy' for 'toy'" in err and "first use" in err
    assert "calibrate" in err.split("calibrating", 1)[1]  # its progress bar follows the announcement
    assert "calibrating" not in hour["b_proc"].stderr or "1 SAE(s)" in hour["b_proc"].stderr  # mlp_out was new


def test_a_batch_whose_every_line_failed_exits_1(hour):
    prompts = hour["tmp"] / "bad.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "layers": [9]}) + "\n{nope\n")
    out = hour["tmp"] / "bad.jsonl.out.jsonl"
    proc = run_cli(*hour["base"], "--prompts_file", str(prompts), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    assert f"wrote {out} (2 lines, 0 ok, 2 failed)" in proc.stdout
    assert all("error" in json.loads(line) for line in out.read_text().splitlines())


def test_each_line_has_its_own_timings_and_progress_moves_per_prompt(toy_discovery):
    reqs = [build_request({"model_id": "toy", "sae_id": "toy", "prompt": f"Report {i}: revenue" + " and margin" * i,
                           "gen_tokens": 6, "seed": i, "layers": [1]}) for i in range(3)]
    told: list[int] = []
    results = toy_discovery.discover_many([*reqs, build_request({"model_id": "toy", "sae_id": "toy", "text": "x",
                                                                 "layers": [7]})], progress=told.append)
    assert isinstance(results[3], RequestError)
    assert sum(told) == 4 and 3 in told  # the prompts of a micro-batch generate together (the refused one at once)
    totals = []
    for r in results[:3]:
        t = r["timings"]
        own = sum(v for k, v in t.items() if k != "total_s")
        assert t["total_s"] == pytest.approx(own, abs=1e-3) and t["generate_s"] > 0
        totals.append(t["total_s"])
    assert len(set(totals)) == 3  # not the group's time repeated: its generation is shared by tokens
    again = toy_discovery.discover_many(reqs, progress=told.append)
    assert all(r["cached"] for r in again) and told[-1] == 3  # cached requests are done at once


# -- item 6: hooks as pairs --------------------------------------------------------------------------

def test_hooks_as_pairs(hour, toy_discovery):
    b = hour["b"]
    assert b["analyzed"]["layers"] == [0, 1] and b["analyzed"]["streams"] == ["resid_pre", "mlp_out"]
    assert {(f["layer"], f["stream"]) for f in b["features"]} == {(0, "resid_pre"), (1, "mlp_out")}
    show = json.loads(runs_cli(hour, "show", b["run_id"]).stdout)
    assert [(s["layer"], s["stream"]) for s in show["saes"]] == [(0, "resid_pre"), (1, "mlp_out")]
    assert show["layers"] == [0, 1] and show["streams"] == ["resid_pre", "mlp_out"]
    both = run_cli(*hour["base"], "--text", "x", "--hooks", "1:resid_pre", "--layers", "1")
    assert both.returncode == 2 and both.stderr.startswith("error: hooks: give hooks")
    bad = run_cli(*hour["base"], "--text", "x", "--hooks", "1-resid_pre")
    assert bad.returncode == 2 and bad.stderr.startswith("error: hooks: expected LAYER:STREAM")
    # the same SAEs by pairs or by layers × streams: the same run
    from sae_discover.plan import plan_run  # loads ingest (torch); only this test needs it

    by_pairs = plan_run(toy_discovery.loaders, build_request({"model_id": "toy", "sae_id": "toy", "text": "x",
                                                              "hooks": [[1, "resid_pre"], [0, "resid_pre"]]}))
    by_layers = plan_run(toy_discovery.loaders, build_request({"model_id": "toy", "sae_id": "toy", "text": "x",
                                                               "layers": [0, 1]}))
    assert by_pairs.run_id == by_layers.run_id and by_pairs.hooks == [(1, "resid_pre"), (0, "resid_pre")]


# -- item 8: help and output ---------------------------------------------------------------------------

def test_help_shows_every_default_and_choice_and_no_model_flags_where_none_runs():
    from sae_discover.cli import discover_parser, runs_parser

    def check(parser, names):
        actions = {a.dest: a for a in parser._actions}
        for opt in names:
            helped = actions[opt.name].help % {}  # argparse's own % formatting
            assert "(default:" in helped, opt.name
            assert all(choice in helped for choice in opt.choices), opt.name

    check(discover_parser(), [o for o in options(type(build_request({"text": "x"}))) if o.name != "id"])
    rank = next(a for a in runs_parser()._actions if a.dest == "action").choices["rank"]
    check(rank, [o for o in options(type(build_request({"text": "x"}))) if o.name in RERANK_FIELDS])
    shown = run_cli("--help").stdout
    assert shown.count("(default:") >= len(options(type(build_request({"text": "x"})))) - 1
    for sub in (["list", "--help"], ["show", "--help"], ["rank", "--help"]):
        assert "--device" not in run_cli("runs", *sub).stdout
    assert "--device" not in run_cli("labels", "--help").stdout
    rank_help = " ".join(run_cli("runs", "rank", "--help").stdout.split())
    assert "--restrict_features" in rank_help and "(default: mean×coverage)" in rank_help


def test_a_mistyped_or_shortened_flag_is_refused_with_the_flag_it_resembles(tmp_path):
    """argparse would take ``--layer 2`` for ``--layers 2`` (a prefix); a typo is refused before anything
    runs, naming the flag and the one it resembles (also a subcommand's)."""
    db = tmp_path / "none.duckdb"
    for args, said in ((["--layer", "2", "--text", "x"], "error: layer: not an option; did you mean --layers?"),
                       (["runs", "rank", "abc", "--db", str(db), "--score_mod", "max"],
                        "error: score_mod: not an option; did you mean --score_mode?"),
                       (["--zzz_unknown", "--text", "x"], "error: zzz_unknown: not an option (see"),
                       (["--db", str(db), "runs", "list", "--limit", "5"],  # the advice keeps the flags given
                        f"error: runs: a subcommand comes first, its flags after it: python -m sae_discover runs list "
                        f"--limit 5 --db {db} (see")):
        proc = run_cli(*args)
        assert proc.returncode == 2 and proc.stderr.startswith(said), proc.stderr
    assert not db.exists()

def test_table_groups_by_hook_shows_percent_coverage_and_the_marked_span(hour):
    out = hour["b_proc"].stdout
    assert "-- layer 0 · resid_pre --" in out and "-- layer 1 · mlp_out --" in out
    assert out.index("-- layer 0 · resid_pre --") < out.index("-- layer 1 · mlp_out --")
    assert "cover%" in out and "[[" in out and "]]" in out
    top = hour["a"]["features"][0]
    line = next(x for x in hour["a_proc"].stdout.splitlines() if x.startswith("1 "))
    assert f"{100 * top['scores']['coverage']:.1f}" in line.split()


def test_long_labels_are_truncated_not_the_span():
    span = {"text": " the Wonka factory", "marked": " the[[ Wonka]] factory", "position": [3, 6], "act": 2.0}
    result = {"model_id": "m", "sae_id": "s", "run_id": "r", "cached": True, "score_mode": "max",
              "threshold_source": "none", "warnings": [],
              "analyzed": {"mode": "text", "tokens": 3, "total_tokens": 3, "layers": [1], "streams": ["resid_pre"],
                           "text": "x", "continuation": None},
              "features": [{"feature_id": 1, "layer": 1, "stream": "resid_pre", "score": 1.0, "proto_label": "z" * 300,
                            "scores": {"mean": 1.0, "coverage": 0.25, "max": 2.0, "selectivity": None},
                            "top_spans": [span]}]}
    row = table(result).splitlines()[-1]
    assert "' the[[ Wonka]] factory'" in row and "25.0" in row.split() and "z" * 300 not in row


def test_spans_start_and_end_at_word_boundaries():
    text = ["", "Sum", "mar", "ize", " Q", "2", " earnings", " for", " W", "onka", ":", " revenue", ",", " EPS"]
    assert word_window(text, 9, 1) == (8, 11)  # " W" + "onka" + ":" (ends before " revenue")
    start, end = word_window(text, 6, 4)  # the raw window starts inside "Summarize": moved to " Q"
    assert (start, end) == (4, 11) and "".join(text[start:end]) == " Q2 earnings for Wonka:"
    assert word_window(text, 3, 1) == (1, 4)  # the peak's word reaches past the window: kept whole


# -- item 9: delphi file names ------------------------------------------------------------------------

def test_delphi_names_map_to_the_sae_that_reads_them_or_are_refused(toy_discovery, tmp_path):
    folder = tmp_path / "explanations"
    folder.mkdir()
    (folder / "layers.0_latent3.txt").write_text("block 0 output")  # = layer 1 resid_pre (the toy has no 0 resid_post)
    (folder / "blocks.1.hook_mlp_out_latent4.txt").write_text("TransformerLens name")
    (folder / "blocks.0.hook_resid_pre_latent5.txt").write_text("layer 0 input")
    info = toy_discovery.import_labels(folder, "toy")
    assert info == {"imported": 3, "replaced": 0, "hooks": [[0, "resid_pre"], [1, "mlp_out"], [1, "resid_pre"]]}
    rows = toy_discovery.catalog.raw().execute(
        "SELECT layer, stream, feature_id, label FROM v_labels WHERE source = 'delphi' ORDER BY layer, stream").fetchall()
    assert rows == [(0, "resid_pre", 5, "layer 0 input"), (1, "mlp_out", 4, "TransformerLens name"),
                    (1, "resid_pre", 3, "block 0 output")]
    other = tmp_path / "other"
    other.mkdir()
    (other / "layers.1_latent2.txt").write_text("block 1 output: no SAE reads it")
    with pytest.raises(LabelFileError) as exc:
        toy_discovery.import_labels(other, "toy")
    assert exc.value.field == "layer" and "layers.N.mlp" in exc.value.message and "blocks.N.hook_" in exc.value.message
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "encoder_latent2.txt").write_text("unknown module")
    with pytest.raises(RequestError, match=r"^layer: encoder_latent2\.txt: the file does not say .*delphi file names "
                                           r"read: layers\.N"):
        toy_discovery.import_labels(odd, "toy")
    with pytest.raises(LabelFileError, match=r"^layer: layers\.1_latent2\.txt: the file names layer 1 resid_post"):
        toy_discovery.import_labels(other, "toy")  # the file named (the row's), not only its hook
    # layer/stream place a row whose file hook the source lacks; they never move one it has
    placed = toy_discovery.import_labels(other, "toy", layer=0, stream="resid_pre")
    assert placed["hooks"] == [[0, "resid_pre"]]
    with pytest.raises(LabelFileError) as exc:
        toy_discovery.import_labels(folder, "toy", layer=0, stream="resid_pre")
    assert exc.value.field == "layer" and "and layer/stream say layer 0 resid_pre" in exc.value.message
    again = toy_discovery.import_labels(folder, "toy")  # the same file again: its labels replace the earlier ones
    assert again["imported"] == 3 and again["replaced"] == 3


@pytest.mark.parametrize(("blocked", "args", "field"), [
    ("deltalake", ("runs", "list", "--store", "unused-store"), "store"),
    ("ray", ("ingest", "--prompts_file", "p.jsonl", "--store", "s", "--ray"), "ray"),
])
def test_store_and_ray_without_the_scale_extra_say_how_to_install_it(tmp_path, blocked, args, field):
    """Without the optional ``scale`` extra, ``--store``/``--ray`` give one line naming the flag and the
    install command, not a traceback (the module is made unimportable in a real CLI process)."""
    (tmp_path / "p.jsonl").write_text('{"text": "Shares rose."}\n')
    if importlib.util.find_spec("deltalake") is None:  # no scale extra at all: --store's deltalake is missed first
        blocked, field = "deltalake", "store"
    code = (f"import sys; sys.modules[{blocked!r}] = None; from sae_discover.cli import main; "
            f"sys.exit(main({list(args)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {field}: needs the optional scale extra (no module {blocked!r})"), lines
    assert "'.[scale]'" in lines[-1] and "Traceback" not in proc.stderr


def test_ctrl_c_in_a_batch_is_one_line_and_leaves_whole_runs(toy_registry, tmp_path):
    """SIGINT mid-batch: exit 130 with one line (no traceback); every stored run is whole (its tokens all
    there), and the same command then completes the batch from where it stopped."""
    import re
    import signal
    import threading
    import time

    import duckdb

    prompts, db, out = tmp_path / "p.jsonl", tmp_path / "c.duckdb", tmp_path / "o.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"Revenue rose {i} percent at company {i}."}) + "\n"
                               for i in range(2000)))
    cmd = [sys.executable, "-m", "sae_discover", "--registry", str(toy_registry), "--db", str(db), "--model", "toy",
           "--sae", "toy", "--layers", "1", "--prompts_file", str(prompts), "--out", str(out), "--threads", "1"]
    # as from a terminal: SIGINT handled (a runner started in the background passes it on ignored)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []  # stderr as it comes: the progress bar says when runs are being stored
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not re.search(r"discover:\s+\d+%\|[^|]*\| [1-9]\d*/2000", "".join(seen)) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(60):  # again while it runs on: one landing inside a DuckDB statement interrupts only that one
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            if "error: interrupted" in "".join(seen):  # heard: it is closing the catalog
                break
    proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(seen)
    assert proc.returncode == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1].startswith("error: interrupted;") and "Traceback" not in err
    con = duckdb.connect(str(db), read_only=True)
    try:
        stored, whole = con.execute("SELECT count(*), count(*) FILTER (WHERE n_tokens = (SELECT count(*) FROM tokens t "
                                    "WHERE t.run_key = r.run_key)) FROM runs r").fetchone()
    finally:
        con.close()
    assert 0 < stored < 2000 and whole == stored
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 2000


def test_listing_and_calibrate_selections_name_the_flag_to_change(toy_registry, tmp_path):
    db = tmp_path / "c.duckdb"
    for args, field in ((("runs", "list", "--limit", "0"), "limit"),
                        (("calibrate", "--model", "toy", "--sae", "toy", "--layers", "0", "--streams", "mlp_out"),
                         "streams"),  # layer 0 has an SAE, of another stream
                        (("calibrate", "--model", "toy", "--sae", "toy", "--layers", "7"), "layers"),
                        (("calibrate", "--model", "toy", "--sae", "toy", "--streams", "resid"), "streams")):
        proc = run_cli(*args, "--db", str(db), "--registry", str(toy_registry)) if args[0] == "calibrate" \
            else run_cli(*args, "--db", str(db))
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {field}: "), proc.stderr


@pytest.mark.parametrize("out", ["p.html", "p.jsonl", "./sub/../p.jsonl"])
def test_batch_results_never_replace_the_prompts_file(tmp_path, out):
    """--out x.html writes its JSONL next to it (x.jsonl): when that, or --out itself, is the prompts
    file, the batch is refused before anything runs and the prompts stay as they were."""
    prompts = tmp_path / "p.jsonl"
    text = '{"id": "a", "text": "ACME revenue rose."}\n'
    prompts.write_text(text)
    (tmp_path / "sub").mkdir()
    proc = subprocess.run([sys.executable, "-m", "sae_discover", "--prompts_file", "p.jsonl", "--out", out,
                           "--db", "c.duckdb"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: out: ") and "would replace the prompts file" \
        in proc.stderr, proc.stderr
    assert prompts.read_text() == text and not (tmp_path / "c.duckdb").exists()
