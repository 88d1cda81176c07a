"""Hostile and careless inputs (issue 12), replayed through the real CLI (subprocess) and a real server:
each ends in one line naming the field (exit 2, or a 4xx with ``field``), no traceback, and the
catalog exactly as it was (row counts and sequences)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from catalog import sandbox
from catalog.errors import CatalogError
from ingest.errors import SAEError
from sae_discover.drift import drift_report
from sae_discover.errors import RequestError
from tests.conftest import ROOT, read_json, run_cli

TEXT = "Shares of Hooli fell 9% after the company missed on churn."
TABLES = ("models", "saes", "runs", "run_saes", "tokens", "activations", "labels", "calibrations", "feature_stats")


def snapshot(db: Path) -> dict:
    """Every table's row count and every sequence's last value: what a refused input must not change."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        seqs = dict(con.execute("SELECT sequence_name, last_value FROM duckdb_sequences()").fetchall())
    finally:
        con.close()
    return {**counts, **seqs}


def assert_refused(proc: subprocess.CompletedProcess, field: str, words: str = "") -> str:
    """Exit 2 and exactly one line on stderr, ``error: <field>: ...`` (holding ``words``), no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "\n" not in err and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert err.startswith(f"error: {field}: "), err
    assert words in err, err
    return err


@pytest.fixture(scope="module")
def stored(toy_registry, tmp_path_factory):
    """A catalog with the same text run on the toy model and on its finance tune (layer 1)."""
    tmp = tmp_path_factory.mktemp("hostile")
    db = tmp / "c.duckdb"
    ids = {}
    for model in ("toy", "toy-finance"):
        out = tmp / f"{model}.json"
        proc = run_cli("--registry", str(toy_registry), "--db", str(db), "--model", model, "--sae", "toy", "--text",
                       TEXT, "--layers", "1", "--min_coverage_pct", "0", "--return_top_x", "1000", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        ids[model] = read_json(out)
    return {"db": db, "tmp": tmp, "registry": toy_registry, "results": ids}


# -- 1. drift filters: one expression, evaluated in the sandbox -------------------------------------

ESCAPES = [  # (filter, words of the one-line error)
    ("model_id='toy-finance') UNION ALL SELECT 7, content, 'x', 'y', 'text', NULL, content, 1, now() "
     "FROM read_text('/etc/passwd') WHERE (1=1", "not a valid SQL filter"),
    ("(SELECT count(*) FROM glob('/*')) > 0", "subqueries are refused"),
    ("EXISTS (FROM read_text('/etc/passwd'))", "subqueries are refused"),
    ("run_key IN (SELECT run_key FROM runs)", "subqueries are refused"),
    ("current_setting('memory_limit') IS NOT NULL", "current_setting() is refused"),
    ("nextval('run_key_seq') > 0", "run_key_seq does not exist"),
    ("len(read_text('/etc/passwd')) > 0", "the filter failed"),
    ("true; DROP TABLE runs", "not a valid SQL filter"),
    ("   ", "empty"),
]


@pytest.mark.parametrize(("where", "words"), ESCAPES)
def test_drift_filters_cannot_escape_the_sandbox(stored, where, words):
    before = snapshot(stored["db"])
    base = stored["results"]["toy"]["run_id"]
    proc = run_cli("drift", "--db", str(stored["db"]), "--base_runs", base, "--tuned_runs", where, "--layers", "1")
    assert_refused(proc, "tuned_runs", words)
    assert "root:" not in proc.stdout + proc.stderr
    assert snapshot(stored["db"]) == before


def test_a_plain_filter_still_selects_runs_and_the_library_refuses_filters_by_default(stored):
    base = stored["results"]["toy"]["run_id"]
    proc = run_cli("drift", "--db", str(stored["db"]), "--base_runs", base, "--tuned_runs",
                   "model_id = 'toy-finance' AND length(text) > 10", "--layers", "1", "--top_k", "5")
    assert proc.returncode == 0, proc.stderr
    from catalog.db import Catalog

    cat = Catalog(stored["db"])
    try:
        with pytest.raises(RequestError, match="tuned_runs: SQL filters are disabled"):
            drift_report(cat, base_runs=[base], tuned_runs="model_id = 'toy-finance'")
        report = drift_report(cat, base_runs=[base], tuned_runs="model_id = 'toy-finance'", allow_sql_filter=True,
                              layers=[1], top_k=5)
        assert report["tuned"]["run_ids"] == [stored["results"]["toy-finance"]["run_id"]]
    finally:
        cat.close()


def test_a_filter_runs_under_the_sandbox_time_limit():
    import pyarrow as pa

    rows = pa.table({"run_key": list(range(3)), "model_id": ["a", "b", "c"]})
    assert sandbox.filter_rows(rows, "v_runs", "model_id <> 'b'", "base_runs", "run_key") == [0, 2]
    # minutes of work over many rows: DuckDB checks for the interrupt between vectors of rows, so the limit
    # stops it at once (one long evaluation of a single row would run to its end before stopping)
    many = pa.table({"run_key": pa.array(range(2_000_000)), "model_id": pa.array(["a"] * 2_000_000)})
    started = time.monotonic()
    with pytest.raises(CatalogError, match=r"base_runs: stopped after the time limit of 0\.2 s"):
        sandbox.filter_rows(many, "v_runs", "list_sum(list_transform(range(run_key % 1000 + 1000), lambda x: x % 7)) > 0",
                            "base_runs", "run_key", sandbox.Limits(timeout_s=0.2))
    assert time.monotonic() - started < 30
    with pytest.raises(CatalogError, match="memory_limit"):
        sandbox.Limits(memory_limit="1GB'; SET x = '1")


# -- 2. the sql command ---------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "field", "words"), [
    (("SELECT count(*) FROM range(100000) a, range(1000000) b", "--timeout_s", "1"), "query", "time limit of 1 s"),
    (("SELECT length(repeat('x', 3000000000))",), "query", "memory limit of 2GB"),
    # a small limit still leaves room for the time limit's thread (it failed to start under the cap once)
    (("SELECT length(repeat('x', 3000000000))", "--memory_limit", "100MB"), "query", "memory limit of 100MB"),
    (("SET memory_limit = '1TB'",), "query", "configuration has been locked"),
    (("",), "query", "expected a SQL statement"),
    (("-- hi",), "query", "expected a SQL statement"),
    (("PRAGMA profiling_output",), "query", ""),
    (("PRAGMA profiling_output = '/tmp/x'",), "query", ""),
    (("SELECT 1", "--memory_limit", "lots"), "memory_limit", "expected a size"),
    (("SELECT 1", "--timeout_s", "soon"), "timeout_s", "--help"),
    (("SELECT nextval('run_key_seq')",), "query", ""),
])
def test_sql_is_limited_and_says_why_in_one_line(stored, args, field, words):
    before = snapshot(stored["db"])
    assert_refused(run_cli("sql", *args, "--db", str(stored["db"])), field, words)
    assert snapshot(stored["db"]) == before


def test_sql_under_a_small_memory_limit_answers(stored):
    proc = run_cli("sql", "SELECT 41 + 1 AS x", "--memory_limit", "100MB", "--db", str(stored["db"]))
    assert proc.returncode == 0 and proc.stdout == "x\n42\n", proc.stderr


def test_sql_into_a_reader_that_stops_early_exits_quietly(stored):
    proc = subprocess.Popen([sys.executable, "-m", "sae_discover", "sql", "SELECT * FROM range(2000000)", "--db",
                             str(stored["db"])], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"range\n"
    proc.stdout.close()  # like `| head -1`
    assert proc.wait(timeout=120) == 0
    assert proc.stderr is not None and proc.stderr.read() == b""


# -- 3. repeated layers ---------------------------------------------------------------------------

def test_repeated_layers_make_the_same_run(stored):
    before = snapshot(stored["db"])
    out = stored["tmp"] / "again.json"
    proc = run_cli("--registry", str(stored["registry"]), "--db", str(stored["db"]), "--model", "toy", "--sae", "toy",
                   "--text", TEXT, "--layers", "1", "1", "1", "--min_coverage_pct", "0", "--return_top_x", "1000",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    again, first = read_json(out), stored["results"]["toy"]
    assert again["cached"] and again["run_id"] == first["run_id"]
    assert [f["scores"] for f in again["features"]] == [f["scores"] for f in first["features"]]
    assert all(f["scores"]["coverage"] <= 1 for f in again["features"])
    assert snapshot(stored["db"]) == before


# -- 5, 7. failed commands write nothing and name the field -----------------------------------------

def poison(weights_file: Path, name: str, value: float) -> None:
    """Rewrite one tensor of a safetensors file with ``value`` in its first element."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(weights_file))
    tensors[name].reshape(-1)[0] = value
    save_file(tensors, str(weights_file))


@pytest.fixture(scope="module")
def damaged(toy_demo, tmp_path_factory):
    """Copies of the toy model and SAEs, each damaged one way, and a registry naming them."""
    tmp = tmp_path_factory.mktemp("damaged")
    for name in ("sizes", "truncated"):
        shutil.copytree(toy_demo / "model", tmp / name)
    cfg = json.loads((tmp / "sizes" / "config.json").read_text())
    cfg["n_embd"] *= 2
    (tmp / "sizes" / "config.json").write_text(json.dumps(cfg))
    weights = tmp / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(toy_demo / "saes", tmp / "saes_list")
    for cfg_file in (tmp / "saes_list").rglob("cfg.json"):
        cfg_file.write_text("[1, 2]")
    shutil.copytree(toy_demo / "saes", tmp / "saes_nan")
    for weights_file in (tmp / "saes_nan").rglob("sae_weights.safetensors"):
        poison(weights_file, "W_enc", float("nan"))
    (tmp / "prompts_dir").mkdir()
    registry = tmp / "sae-discover.toml"
    registry.write_text(f"""
[models.toy]
path = "{toy_demo / 'model'}"
default_layers = [1]

[models.sizes]
path = "{tmp / 'sizes'}"

[models.truncated]
path = "{tmp / 'truncated'}"

[saes.toy]
path = "{toy_demo / 'saes'}"

[saes.listcfg]
path = "{tmp / 'saes_list'}"

[saes.nansae]
path = "{tmp / 'saes_nan'}"
""")
    return {"tmp": tmp, "registry": registry}


CLI_FAILURES = [  # (extra arguments, field, words)
    (("--out", "/proc/nope/x.json"), "out", "cannot be written"),
    (("--out", "{tmp}/a_dir.json"), "out", "is a directory"),
    (("--score_mode", "selectivity", "--background_file", "/nonexistent.txt"), "background_file", "does not exist"),
    (("--prompts_file", "{tmp}/prompts_dir"), "prompts_file", ""),
    (("--prompts_file", "/proc/self/mem"), "prompts_file", ""),
    (("--prompts_file", "{tmp}/one.jsonl", "--workers", "0"), "workers", "[1, 64]"),
    (("--model", "sizes"), "model_id", "config.json do not match"),
    (("--model", "truncated"), "model_id", "cannot be loaded"),
    (("--sae", "listcfg"), "sae_id", "expected a JSON object"),
    (("--sae", "nansae"), "sae_id", "tensor W_enc holds NaN/inf"),
    (("--layers", "1", "--no_such_flag", "3"), "no_such_flag", "not an option"),
    (("--return_top_x", "many"), "return_top_x", ""),
    # a hub id that is neither local nor cached, offline: transformers' message spans lines; ours is one
    (("--model", "no-such-org/no-such-model"), "model_id", "cannot load 'no-such-org/no-such-model'"),
]


@pytest.mark.parametrize(("extra", "field", "words"), CLI_FAILURES)
def test_failed_discovery_names_the_field_and_writes_nothing(stored, damaged, extra, field, words):
    (damaged["tmp"] / "a_dir.json").mkdir(exist_ok=True)
    (damaged["tmp"] / "one.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    before = snapshot(stored["db"])
    args = [a.format(tmp=damaged["tmp"]) for a in extra]
    defaults = {"--model": "toy", "--sae": "toy", "--text": "Costs rose.", "--layers": "1"}
    if any(a == "--prompts_file" for a in args):
        defaults.pop("--text")
    flags = [x for k, v in defaults.items() if k not in args for x in (k, v)]
    proc = run_cli("--registry", str(damaged["registry"]), "--db", str(stored["db"]), *flags, *args,
                   env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert_refused(proc, field, words)
    assert snapshot(stored["db"]) == before
    assert not Path("/proc/nope").exists()


@pytest.mark.parametrize(("fmt", "file", "tensor", "name", "value"), [
    ("saelens", "sae_weights.safetensors", "b_dec", "b_dec", float("inf")),
    ("saelens-jumprelu", "sae_weights.safetensors", "threshold", "threshold", float("nan")),
    ("gemmascope", "params.safetensors", "W_dec", "W_dec", -float("inf")),
    ("sparsify", "sae.safetensors", "encoder.weight", "W_enc", float("nan")),
])
def test_sae_weights_that_are_not_finite_are_refused_naming_the_tensor(tmp_path, fmt, file, tensor, name, value):
    from ingest.saes.sources import open_source
    from tests.test_sae_formats import write_gemmascope, write_sparsify
    from tests.test_saes import write_sae

    folder = tmp_path / "layer_1" / "sae"
    if fmt.startswith("saelens"):
        write_sae(folder, "jumprelu" if fmt.endswith("jumprelu") else "standard", layer=1)
    elif fmt == "gemmascope":
        write_gemmascope(folder, kind="safetensors")
        (folder / "sae-discover.json").write_text(json.dumps({"hook_name": "blocks.1.hook_resid_post"}))
    else:
        write_sparsify(folder)
        (folder / "sae-discover.json").write_text(json.dumps({"hook_name": "blocks.1.hook_resid_post"}))
    (layer, stream), = open_source("nan", folder).hooks
    open_source("nan", folder).load(layer, stream)  # finite weights load
    poison(folder / file, tensor, value)
    source = open_source("nan", folder)
    with pytest.raises(SAEError) as info:
        source.load(layer, stream)
    assert info.value.field == "sae_id" and f"tensor {name} holds NaN/inf (1 of " in info.value.message


def test_other_commands_refuse_bad_values_in_one_line(stored, tmp_path):
    before = snapshot(stored["db"])
    assert_refused(run_cli("runs", "list", "--limit", "-1", "--db", str(stored["db"])), "limit")
    assert_refused(run_cli("--db", "/proc/x/cat.duckdb", "--text", "hi"), "db", "cannot be made")
    assert_refused(run_cli("labels", "import", str(tmp_path / "l.csv"), "--sae", "demo", "--db", "/proc/x/cat.duckdb"),
                   "db", "/proc/x/cat.duckdb: its folder cannot be made")
    # commands that only read stored runs do not make a catalog where none is (a mistyped --db)
    for args in (("runs", "list"), ("runs", "show", "abcdef12"), ("runs", "rank", "abcdef12"),
                 ("drift", "--base_runs", "abcdef12", "--tuned_runs", "abcdef12"), ("sql", "SELECT 1"),
                 ("feature", "show", "--sae", "demo", "--layer", "2", "--feature", "1")):
        assert_refused(run_cli(*args, "--db", str(tmp_path / "typo.duckdb")), "db", "typo.duckdb does not exist")
    assert not (tmp_path / "typo.duckdb").exists()
    assert snapshot(stored["db"]) == before
    assert not (tmp_path / "x").exists()
    proc = run_cli("runs", "lst", "--db", str(stored["db"]))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "runs --help" in proc.stderr


@pytest.mark.parametrize(("name", "content", "words"), [
    ("big.csv", "feature_id,label\n1," + "x" * 200_000 + "\n", "field larger than field limit"),
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "is nested too deeply"),
    ("deep_label.jsonl", '{"index": 1, "description": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "is nested too deeply"),
    ("cut.jsonl.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03+I-.", "cut.jsonl.gz cannot be read"),
    ("latin.jsonl", '{"index": 1, "description": "caf\xe9"}\n'.encode("latin-1"), "not UTF-8 text (byte 32)"),
    ("layers.1_latent5.txt", "caf\xe9".encode("latin-1"), "not UTF-8 text (byte 3)"),
], ids=["csv-field-over-128KB", "nested-json", "nested-json-in-a-row", "gzip-cut-short", "neuronpedia-latin-1",
        "delphi-latin-1"])
def test_cli_label_files_that_cannot_be_read_are_one_line(stored, tmp_path, name, content, words):
    before = snapshot(stored["db"])
    if isinstance(content, bytes):
        (tmp_path / name).write_bytes(content)
    else:
        (tmp_path / name).write_text(content)
    proc = run_cli("labels", "import", str(tmp_path / name), "--registry", str(stored["registry"]), "--sae", "toy",
                   "--layer", "1", "--stream", "resid_pre", "--db", str(stored["db"]))
    assert_refused(proc, "file", words)
    assert snapshot(stored["db"]) == before


def test_files_as_editors_write_them_are_read_line_for_line(stored, tmp_path):
    """A byte-order mark (Windows editors, Excel), CRLF line ends and U+2028 written raw inside a JSON
    string (``json.dumps(ensure_ascii=False)`` does) are read; a line with a 5,000-digit integer or a
    lone surrogate is that line's error, the others' ids stay in place."""
    lines = [json.dumps({"id": "bom", "text": "Revenue rose."}),
             json.dumps({"id": "sep", "text": "Costs fell\u2028sharply."}, ensure_ascii=False),
             '{"id": "big", "text": "x", "return_top_x": ' + "9" * 5000 + "}",
             json.dumps({"id": "half", "text": "caf\ud800"}),
             json.dumps({"id": "last", "text": "Margins held."})]
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))
    out = tmp_path / "out.jsonl"
    proc = run_cli("--registry", str(stored["registry"]), "--db", str(stored["db"]), "--model", "toy", "--sae", "toy",
                   "--layers", "1", "--prompts_file", str(prompts), "--out", str(out))
    assert proc.returncode == 1, proc.stderr  # two lines failed, in place
    got = [json.loads(line) for line in out.read_text().split("\n") if line]  # U+2028 is written raw
    assert [g.get("id") for g in got] == ["bom", "sep", "3", "half", "last"]  # an unparsed line: its number
    assert [("error" in g) for g in got] == [False, False, True, True, False]
    assert "line 3: not JSON (Exceeds the limit" in got[2]["error"]
    assert got[3]["error"].startswith("text: expected UTF-8 text; character 3 is a lone surrogate")
    assert got[1]["analyzed"]["text"].startswith("Costs fell")
    # label files: a BOM before a CSV header; U+2028 inside a Neuronpedia description; a folder named
    # like a delphi file inside a delphi folder (skipped)
    (tmp_path / "bom.csv").write_bytes("feature_id,label\n3,with bom\n".encode("utf-8-sig"))
    (tmp_path / "np.jsonl").write_text(json.dumps({"index": 4, "description": "a\u2028b", "layer": "1-res"},
                                                  ensure_ascii=False) + "\n")
    (tmp_path / "delphi").mkdir()
    (tmp_path / "delphi" / "layers.1_latent5.txt").write_text("weather words")
    (tmp_path / "delphi" / "layers.1_latent6.txt").mkdir()
    for name in ("bom.csv", "np.jsonl", "delphi"):
        proc = run_cli("labels", "import", str(tmp_path / name), "--registry", str(stored["registry"]), "--sae", "toy",
                       "--layer", "1", "--stream", "resid_pre", "--db", str(stored["db"]))
        assert proc.returncode == 0 and json.loads(proc.stdout)["imported"] == 1, proc.stderr
    con = duckdb.connect(str(stored["db"]), read_only=True)
    try:
        got = dict(con.execute("SELECT feature_id, label FROM v_labels WHERE source <> 'lite' AND layer = 1 "
                               "AND feature_id IN (3, 4, 5)").fetchall())
    finally:
        con.close()
    assert got == {3: "with bom", 4: "a\u2028b", 5: "weather words"}


def test_text_that_is_not_utf8_is_refused_before_any_run(stored, tmp_path):
    """Command-line bytes that are not UTF-8 (a lone surrogate in Python), in the text, a tag or a
    background document, are one line naming the field, refused before any run is stored."""
    before = snapshot(stored["db"])
    base = ["--registry", str(stored["registry"]), "--db", str(stored["db"]), "--model", "toy", "--sae", "toy",
            "--layers", "1"]
    assert_refused(run_cli(*base, "--text", "caf\udce9"), "text", "expected UTF-8 text; character 3")
    assert_refused(run_cli(*base, "--text", "ok", "--tags", "k\udce9=v"), "tags", "lone surrogate")
    background = tmp_path / "bg.jsonl"
    background.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "bad \ud800"}) + "\n")
    assert_refused(run_cli(*base, "--text", "Revenue rose again.", "--score_mode", "selectivity", "--background_file",
                           str(background)), "background_file", "bg.jsonl:2: expected UTF-8 text")
    assert snapshot(stored["db"]) == before


def test_the_terminal_table_shows_control_characters_escaped():
    """A label or text with ESC sequences (clear the screen, set the title) or a bidi override is
    shown escaped in the terminal table, not acted on."""
    from sae_discover.output import clip

    assert clip("a\x1b[2J\x1b]0;t\x07 \u202eb\x7f 👩\u200d💻", 80) == "a\\x1b[2J\\x1b]0;t\\x07 \\u202eb\\x7f 👩\u200d💻"


# -- 4. the API: 4xx naming the field, never a 500 -------------------------------------------------

@pytest.fixture(scope="module")
def server(stored, tmp_path_factory):
    from tests.test_api import Server

    tmp = tmp_path_factory.mktemp("hostile-api")
    srv = Server(tmp / "served.duckdb", stored["registry"], tmp / "server.log")
    yield srv
    srv.stop()
    assert "unhandled error" not in srv.log.read_text()  # no request ended in a 500


def api_error(r: httpx.Response, field: str) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:2000])
    body = r.json()
    assert body["field"] == field, body
    assert "Traceback" not in r.text and "\n" not in body["detail"]
    return body["detail"]


def test_api_refuses_drift_filters_and_repeated_layers_make_one_run(server):
    body = {"model_id": "toy", "sae_id": "toy", "text": TEXT, "layers": [1]}
    # special tokens only: nothing is analyzed, and the answer says so instead of an empty ranking alone
    special = server.client.post("/v1/sae/features/discover", json={**body, "text": "<|endoftext|><|endoftext|>"})
    assert special.status_code == 200 and special.json()["analyzed"]["tokens"] == 0 and not special.json()["features"]
    assert "text: no token was analyzed (special tokens such as <|endoftext|> never are), so no feature ranks" \
        in special.json()["warnings"], special.text
    one = server.client.post("/v1/sae/features/discover", json=body).json()
    again = server.client.post("/v1/sae/features/discover", json={**body, "layers": [1, 1, 1]}).json()
    assert again["cached"] and again["run_id"] == one["run_id"]
    assert all(f["scores"]["coverage"] <= 1 for f in again["features"])
    detail = api_error(server.client.post("/v1/drift", json={"base_runs": [one["run_id"]],
                                                             "tuned_runs": "model_id = 'toy'"}), "tuned_runs")
    assert "SQL filters are disabled" in detail
    unknown = server.client.post("/v1/drift", json={"base_runs": ["feedface00"], "tuned_runs": [one["run_id"]]})
    assert unknown.status_code == 404 and api_error(unknown, "base_runs").startswith("base_runs: no run 'feedface00'")
    # a filter inside the list is not a run id at all: a bad request (400) saying what an id looks like, not a 404
    for path, body, field in (("/v1/drift", {"base_runs": ["model_id = 'toy'"], "tuned_runs": [one["run_id"]]}, "base_runs"),
                              ("/v1/runs/rank", {"run_ids": ["not-a-run"]}, "run_ids")):
        r = server.client.post(path, json=body)
        assert r.status_code == 400 and "a unique prefix of at least 6 hex characters" in api_error(r, field), r.text


LABELS = "/v1/labels/import"
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(("path", "raw", "field"), [
    ("/v1/sae/features/discover", b'{"model_id": "toy", "prompt": ' + DEEP.encode() + b"}", "body"),
    ("/v1/drift", b'{"base_runs": ' + DEEP.encode() + b"}", "body"),
    (LABELS, b'{"sae_id": "toy", "format": "csv", "content": ' + DEEP.encode() + b"}", "body"),
    ("/v1/sae/features/discover", b'{"model_id": "toy", "sae_id": "toy", "prompt": "caf\xe9"}', "body"),
    (LABELS, b'{"sae_id": "toy", "format": "csv", "content": "\xff\xfe"}', "body"),
], ids=["deep-discover", "deep-drift", "deep-labels", "latin1-discover", "bytes-labels"])
def test_api_refuses_unparseable_bodies(server, path, raw, field):
    r = server.client.post(path, content=raw, headers={"content-type": "application/json"})
    api_error(r, field)


@pytest.mark.parametrize(("body", "field"), [
    ({"format": "csv", "content": "feature_id,label,layer,stream\n1,x,²,resid_pre\n"}, "layer"),
    ({"format": "csv", "content": "feature_id,label\n1," + "x" * 200_000 + "\n"}, "content"),
    ({"format": "csv", "content": "feature_id,label\n" + "9" * 5000 + ",x\n", "layer": 1, "stream": "resid_pre"},
     "feature_id"),
    ({"format": "csv", "content": "feature_id,label,layer,stream\n1,x," + "9" * 5000 + ",resid_pre\n"}, "layer"),
    ({"format": "neuronpedia", "content": '{"index": ' + "9" * 5000 + ', "description": "x"}\n'}, "content"),
    ({"format": "neuronpedia", "content": '{"index": 1, "description": "x", "layer": ' + "9" * 5000 + "}\n"},
     "content"),
    ({"format": "neuronpedia", "content": '{"index": 1, "description": "bad \\ud800 text"}\n', "layer": 1,
      "stream": "resid_pre"}, "label"),
    ({"format": "neuronpedia", "content": DEEP + "\n"}, "content"),
    ({"format": "csv", "content": "feature_id,label\n٥,x\n", "layer": 1, "stream": "resid_pre"}, "feature_id"),
    ({"format": "csv", "content": "feature_id,label\n1_0,x\n", "layer": 1, "stream": "resid_pre"}, "feature_id"),
    ({"format": "csv", "content": "feature_id,label,score\n1,x,nan\n", "layer": 1, "stream": "resid_pre"}, "score"),
    ({"format": "csv", "content": "feature_id,label,score\n1,x,inf\n", "layer": 1, "stream": "resid_pre"}, "score"),
    ({"format": "csv", "content": "feature_id,label,source\n1,x,lite\n", "layer": 1, "stream": "resid_pre"}, "source"),
])
def test_api_label_imports_refuse_bad_fields(server, body, field):
    """The body field holding the file (content) is named; the file's column, when it is one, opens the message."""
    detail = api_error(server.client.post(LABELS, json={"sae_id": "toy", **body}), "content")
    assert detail.startswith("content: " if field == "content" else f"content: {field}: "), detail


HUGE = "9" * 5000  # a 5,000-digit integer, spliced into a JSON body (Python's int() refuses it as text)


@pytest.mark.parametrize(("path", "body", "field"), [
    (LABELS, '{"sae_id": "toy", "format": "csv", "content": "feature_id,label\\n1,x\\n", "layer": HUGE, '
             '"stream": "resid_pre"}', "layer"),
    (LABELS, '{"sae_id": "toy", "format": "neuronpedia", "layer": 1, "stream": "resid_pre", '
             '"content": "{\\"index\\": HUGE, \\"description\\": \\"x\\"}\\n"}', "content"),
    ("/v1/sae/features/discover", '{"model_id": "toy", "sae_id": "toy", "text": "hi", "layers": [HUGE]}', "layers"),
    ("/v1/sae/features/discover", '{"model_id": "toy", "sae_id": "toy", "text": "hi", "return_top_x": HUGE}',
     "return_top_x"),
    ("/v1/drift", '{"base_runs": ["abcdef12"], "tuned_runs": ["abcdef12"], "top_k": HUGE}', "top_k"),
], ids=["labels-layer", "labels-index", "discover-layers", "discover-top-x", "drift-top-k"])
def test_api_refuses_huge_integers_naming_the_field(server, path, body, field):
    before = server.client.get("/v1/runs").json()["total"]
    r = server.client.post(path, content=body.replace("HUGE", HUGE), headers={"content-type": "application/json"})
    api_error(r, field)
    assert server.client.get("/v1/runs").json()["total"] == before


def test_api_refuses_a_lone_surrogate_in_label_content(server):
    raw = b'{"sae_id": "toy", "format": "csv", "layer": 1, "stream": "resid_pre", "content": "feature_id,label\\n1,\\ud800\\n"}'
    r = server.client.post(LABELS, content=raw, headers={"content-type": "application/json"})
    api_error(r, "body")  # the JSON decoder refuses it; a surrogate inside the file's own JSON: see above


# -- 9. the OpenAPI schema tells the truth ---------------------------------------------------------

def test_schema_declares_refused_fields_and_types_drift(server):
    spec = server.client.get("/schema/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("DiscoverBody", "RankBody", "LabelsImportBody", "DriftBody", "DriftPrompt"):
        assert schemas[name]["additionalProperties"] is False, name
    drift = spec["paths"]["/v1/drift"]["post"]
    assert drift["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/DriftBody"}
    assert drift["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DriftResponse"}
    body = schemas["DriftBody"]["properties"]
    assert {"base", "tuned", "prompts", "base_runs", "tuned_runs", "top_k", "min_relative_change"} <= set(body)
    assert {alt["type"] for alt in body["base_runs"]["oneOf"]} == {"array", "null"}  # run ids only, no SQL filter
    assert {"overall", "prompts", "features", "flagged", "thresholds"} <= set(schemas["DriftResponse"]["properties"])


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"base_runs": "model_id = 'toy'", "tuned_runs": ["abcdef12"]}, "base_runs", "SQL filters are disabled"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "hi", "colour": 1}]}, "prompts", "prompts[0].colour"),
    ({"base": "toy", "tuned": "toy", "prompts": [{"text": "hi"}], "top_k": "many"}, "top_k", ""),
    ({"base_runs": ["abcdef12"], "tuned_runs": ["abcdef12"], "bogus": 1}, "bogus", "unknown field"),
])
def test_drift_bodies_are_checked_against_the_typed_schema(server, body, field, words):
    assert words in api_error(server.client.post("/v1/drift", json=body), field)


def test_unknown_query_parameters_are_refused_and_405_says_allow(server):
    assert "unknown query parameter" in api_error(server.client.get("/v1/runs", params={"bogus": 1}), "bogus")
    api_error(server.client.get("/v1/runs", params={"limit": 5, "limt": 5}), "limt")
    api_error(server.client.get("/healthz", params={"verbose": 1}), "verbose")
    assert server.client.get("/v1/runs", params={"limit": 5, "sae_id": "toy"}).status_code == 200
    for method, path, allowed in (("DELETE", "/v1/runs", {"GET"}), ("GET", "/v1/drift", {"POST"}),
                                  ("PUT", "/healthz", {"GET"})):
        r = server.client.request(method, path)
        assert r.status_code == 405 and allowed <= {m.strip() for m in r.headers["allow"].split(",")}, r.headers


def test_interactive_docs_load_nothing_from_another_host(server):
    page = server.client.get("/schema")
    assert page.status_code == 200 and "swagger-ui" in page.text.lower()
    links = re.findall(r"""(?:src|href)=["']([^"']*)["']""", page.text)
    assert links and not [u for u in links if "//" in u], links
    for url in links:
        asset = server.client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_interactive_docs_render_in_a_browser_without_network(server):
    from tests.browser import browser_for_test

    driver = browser_for_test()
    try:
        driver.get(server.url + "/schema")
        deadline = time.monotonic() + 30
        ops: list = []
        while time.monotonic() < deadline and not ops:
            ops = driver.find_elements("css selector", ".opblock-summary-path")
            time.sleep(0.2)
        paths = {o.get_attribute("data-path") for o in ops}
        assert {"/v1/drift", "/v1/runs", "/v1/sae/features/discover"} <= paths, paths
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(u.startswith(server.url + "/") for u in fetched), fetched
    finally:
        driver.quit()


# -- fault tests: a SIGKILL inside a group commit ----------------------------------------------------

GROUP_WRITER = """
import sys
import numpy as np, pyarrow as pa
from catalog import writes
from catalog.db import Catalog

path, log, group, runs_per_group, tokens, feats = sys.argv[1], sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:])
cat = Catalog(path)
model = writes.ModelInfo("m", "fp-m", "gpt2", 2, 8)
saes = [writes.SAEInfo("s", 0, "resid_pre", "fp-s", "blocks.0.hook_resid_pre", "standard", 8, feats)]
tok = pa.table({"position": pa.array(range(tokens), pa.int32()), "token_id": pa.array(range(tokens), pa.int32()),
                "token": [f"t{i}" for i in range(tokens)], "is_generated": [False] * tokens,
                "is_special": [False] * tokens, "kept": [True] * tokens, "proxy": [0.0] * tokens})
acts = pa.table({"position": pa.array(np.repeat(np.arange(tokens), feats), pa.int32()),
                 "sae_index": pa.array(np.zeros(tokens * feats), pa.int16()),
                 "feature_id": pa.array(np.tile(np.arange(feats), tokens), pa.int32()),
                 "act": pa.array(np.random.default_rng(0).random(tokens * feats), pa.float32())})
with open(log, "a") as fh:
    while True:
        rows = [writes.RunRows({"run_id": f"g{group}-{i}", "model_id": "m", "sae_id": "s", "mode": "text", "prompt": None,
                                "text": f"group {group} run {i}", "generate": False, "gen_tokens": 0, "seed": 0,
                                "layers": [0], "streams": ["resid_pre"], "restrict_features": [], "n_tokens": tokens,
                                "n_kept": tokens, "timings": {}}, model, saes, tok, acts)
                for i in range(runs_per_group)]
        fh.write(f"begin {group}\\n"); fh.flush()
        writes.write_runs(cat, rows)
        fh.write(f"end {group}\\n"); fh.flush()
        group += 1
"""


def test_sigkill_inside_group_commits_leaves_whole_groups(tmp_path):
    """A writer that does nothing but group commits (16 runs each), killed at random moments: the kills
    land inside write_runs' transaction, and after each one every group is stored whole or not at all,
    and every group whose commit returned is there (the WAL replays it)."""
    import random
    import signal

    db, log = tmp_path / "c.duckdb", tmp_path / "log.txt"
    runs_per_group, tokens, feats = 16, 64, 256
    rng = random.Random(12)
    inside, group = 0, 0
    committed: set[int] = set()  # groups whose write_runs returned, over every writer so far
    cut: set[int] = set()  # groups whose write_runs was running when its writer was killed
    for _attempt in range(12):
        log.write_text("")
        proc = subprocess.Popen([sys.executable, "-c", GROUP_WRITER, str(db), str(log), str(group), str(runs_per_group),
                                 str(tokens), str(feats)], cwd=ROOT, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while "begin" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        lines = log.read_text().split()
        begun = [int(g) for kind, g in zip(lines[::2], lines[1::2], strict=True) if kind == "begin"]
        ended = {int(g) for kind, g in zip(lines[::2], lines[1::2], strict=True) if kind == "end"}
        committed |= ended
        if begun and begun[-1] not in ended:
            cut.add(begun[-1])
            inside += 1
        con = duckdb.connect(str(db))
        try:
            per_run = con.execute(
                "SELECT r.run_id, r.n_tokens, (SELECT count(*) FROM tokens t WHERE t.run_key = r.run_key), "
                "(SELECT count(*) FROM activations a WHERE a.run_key = r.run_key) FROM runs r").fetchall()
            orphans = con.execute("SELECT (SELECT count(*) FROM tokens WHERE run_key NOT IN (SELECT run_key FROM runs)) "
                                  "+ (SELECT count(*) FROM activations WHERE run_key NOT IN (SELECT run_key FROM runs))"
                                  ).fetchone()[0]
        finally:
            con.close()
        assert orphans == 0
        assert all((n, t, a) == (tokens, tokens, tokens * feats) for _, n, t, a in per_run), per_run[:5]
        stored: dict[int, int] = {}
        for run_id, *_ in per_run:
            g = int(run_id.split("-")[0][1:])
            stored[g] = stored.get(g, 0) + 1
        assert all(count == runs_per_group for count in stored.values()), stored  # whole groups only
        assert committed <= set(stored), sorted(committed - set(stored))  # every commit that returned survived
        assert set(stored) <= committed | cut
        group = max([*stored, *begun, group]) + 1
        if inside >= 3:
            break
    assert inside >= 3, f"only {inside} kills landed inside a group commit"


# -- store locations: refused before anything runs -------------------------------------------------

@pytest.mark.parametrize("args", [
    ("ingest", "--prompts_file", "p.jsonl", "--store", ""),
    ("ingest", "--prompts_file", "p.jsonl", "--store", "/"),
    ("ingest", "--prompts_file", "p.jsonl", "--store", "{file}"),
    ("ingest", "--prompts_file", "p.jsonl", "--store", "{file}/sub"),
    ("calibrate", "--store", "file://"),
    ("runs", "list", "--store", "  "),
    ("sql", "SELECT 1", "--store", "{file}"),
    ("store", "compact", ""),
    ("store", "import", "{file}"),
])
def test_a_store_location_that_cannot_be_a_store_is_refused(tmp_path, args):
    """An empty location or the root would put the store's tables at the top of the disk; a file
    cannot hold one. One line naming store, exit 2, before any model or store is touched."""
    afile = tmp_path / "afile"
    afile.write_text("not a store")
    proc = run_cli(*(a.format(file=afile) for a in args))
    assert proc.returncode == 2 and proc.stderr.startswith("error: store: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_compact_refuses_a_negative_retention_before_touching_the_store(tmp_path):
    proc = run_cli("store", "compact", str(tmp_path / "s"), "--retention_hours", "-1")
    assert proc.returncode == 2 and proc.stderr.startswith("error: retention_hours: "), proc.stderr
    assert not (tmp_path / "s").exists()
