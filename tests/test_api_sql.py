"""SQL over HTTP (issue 16, item 4): `POST /v1/sql` on a real `serve --enable_sql` on 127.0.0.1.

The catalog is made by the real CLI, queried by the `sql` command (a subprocess) before the server
takes the file, then served: the API must answer what the CLI answered, refuse the hostile queries of
the hardening issue (tests/test_hostile_inputs.py) with a 400 naming `query`, stop a runaway query
within its time limit, cap huge results, and keep serving discoveries afterwards. A plain `serve`
answers 403 naming the flag.
"""

from __future__ import annotations

import csv
import io
import json
import time

import httpx
import pytest

from tests.conftest import read_json, run_cli
from tests.test_api import Server

TEXT = "Shares of Hooli fell 9% after the company missed on churn."
TIMEOUT_S = 2.0
QUERIES = [  # what the CLI and the API must answer alike (values of many types, a join, an aggregate)
    "SELECT run_id, model_id, sae_id, mode, text, n_tokens, n_kept, created_at, layers, tags FROM v_runs ORDER BY run_id",
    "SELECT layer, stream, count(*) AS codes, round(sum(act), 4) AS total, max(act) AS top FROM v_activations "
    "GROUP BY ALL ORDER BY ALL",
    "SELECT r.model_id, a.feature_id, a.position, a.act FROM v_activations a JOIN v_runs r USING (run_id) "
    "ORDER BY a.act DESC, a.feature_id, a.position, r.model_id LIMIT 40",
    "SELECT 1.5::DECIMAL(4,2) AS d, DATE '2024-02-29' AS day, [1, 2] AS l, {'k': 'v'} AS s, NULL AS n, "
    "'nan'::DOUBLE AS nan, 'a,b\"c' AS tricky",
    "SHOW TABLES",
]
# (query, words of the 400's detail): the hardening issue's hostile SQL, over HTTP
HOSTILE = [
    ("COPY (SELECT * FROM v_runs) TO '{out}'", "write statements are refused (COPY)"),
    ("ATTACH '{out}.duckdb' AS other", "write statements are refused (ATTACH)"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_text('/etc/hostname')", "file system operations are disabled"),
    ("SELECT count(*) FROM glob('/*')", "file system operations are disabled"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "file system operations are disabled"),
    ("SELECT * FROM '{out}'", "file system operations are disabled"),
    ("INSTALL httpfs", "write statements are refused (LOAD)"),
    ("LOAD httpfs", "write statements are refused (LOAD)"),
    ("SET memory_limit = '1TB'", "configuration has been locked"),
    ("SET enable_external_access = true", "configuration has been locked"),
    ("SELECT * FROM enable_logging()", "configuration has been locked"),
    ("PRAGMA profiling_output = '{out}'", "configuration has been locked"),  # DuckDB parses it as a SET
    ("PRAGMA show_tables", "PRAGMA statements are refused"),
    ("CALL checkpoint()", "CALL statements are refused"),
    ("DELETE FROM runs", "write statements are refused (DELETE)"),
    ("CREATE TABLE t AS SELECT 1", "write statements are refused (CREATE)"),
    ("DROP VIEW v_runs", "write statements are refused (DROP)"),
    ("UPDATE runs SET text = 'x'", "write statements are refused (UPDATE)"),
    ("SELECT nextval('run_key_seq')", "read-only mode"),
    ("SELECT 1; COMMIT; DELETE FROM runs", "transaction statements are refused"),
    ("ROLLBACK; DELETE FROM runs", "transaction statements are refused"),
    ("SELECT * FROM runs; DROP TABLE runs", "write statements are refused (DROP)"),
    ("SELEC 1", "syntax error"),
    ("-- nothing", "expected a SQL statement"),
    # a message over several lines keeps them all (the reason is on the second), not the query's echo
    ("SELECT * FROM sqlite_scan('x.db', 't')", "file system operations are disabled by configuration"),
    ("SELECT * FROM v_runz", 'does not exist! Did you mean "v_runs"?'),
    ("SELECT '1 day'::INTERVAL * 1e9 AS v", "cannot be read back"),  # Python's timedelta cannot hold it
]
COUNTS = ("SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM activations) AS acts, "
          "(SELECT count(*) FROM tokens) AS tokens, (SELECT count(*) FROM duckdb_tables()) AS tables, "
          "(SELECT max(last_value) FROM duckdb_sequences()) AS seq")


@pytest.fixture(scope="module")
def served(toy_registry, tmp_path_factory):
    """Two toy runs stored by the CLI; the CLI's `sql` answers (JSON and TSV); then the server, with SQL on."""
    tmp = tmp_path_factory.mktemp("api-sql")
    db = tmp / "c.duckdb"
    for model in ("toy", "toy-finance"):
        proc = run_cli("--registry", str(toy_registry), "--db", str(db), "--model", model, "--sae", "toy", "--text",
                       TEXT, "--layers", "1", "--min_coverage_pct", "0", "--out", str(tmp / f"{model}.json"))
        assert proc.returncode == 0, proc.stderr
    cli = {}
    for query in QUERIES:
        as_json = run_cli("sql", query, "--db", str(db), "--format", "json")
        as_tsv = run_cli("sql", query, "--db", str(db))
        assert as_json.returncode == as_tsv.returncode == 0, as_json.stderr + as_tsv.stderr
        cli[query] = (json.loads(as_json.stdout), as_tsv.stdout)
    srv = Server(db, toy_registry, tmp / "server.log", "--enable_sql", "--sql_timeout_s", str(TIMEOUT_S),
                 "--sql_memory_limit", "512MB", "--max_sql_rows", "500", "--max_sql_bytes", "200000")
    yield {"server": srv, "cli": cli, "tmp": tmp, "runs": [read_json(tmp / f"{m}.json") for m in ("toy", "toy-finance")]}
    srv.stop()
    assert "unhandled error" not in srv.log.read_text()  # no request ended in a 500


def sql(srv: Server, query: str, **extra) -> httpx.Response:
    return srv.client.post("/v1/sql", json={"query": query, **extra})


def refused(r: httpx.Response, field: str = "query") -> str:
    assert r.status_code == 400, (r.status_code, r.text[:2000])
    body = r.json()
    assert set(body) == {"status_code", "detail", "field"} and body["field"] == field, body
    assert body["detail"].startswith(f"{field}: ") and "\n" not in body["detail"] and "Traceback" not in r.text
    return body["detail"]


@pytest.mark.parametrize("query", QUERIES)
def test_answers_equal_the_sql_command(served, query):
    srv, (cli_json, cli_tsv) = served["server"], served["cli"][query]
    r = sql(srv, query)
    assert r.status_code == 200, r.text
    body = r.json()
    names = [c["name"] for c in body["columns"]]
    assert [dict(zip(names, row, strict=True)) for row in body["rows"]] == cli_json
    assert body["row_count"] == len(cli_json) and body["truncated"] is False and body["limit"] == 500
    assert all(c["type"] for c in body["columns"])

    as_csv = srv.client.post("/v1/sql", json={"query": query}, headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200 and as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["x-row-count"] == str(len(cli_json)) and as_csv.headers["x-truncated"] == "false"
    tsv_rows = [line.split("\t") for line in cli_tsv.splitlines()]
    assert list(csv.reader(io.StringIO(as_csv.text))) == tsv_rows  # the same cells as the sql command's table
    assert sql(srv, query, format="csv").text == as_csv.text
    ok = srv.client.get("/schema/openapi.json").json()["paths"]["/v1/sql"]["post"]["responses"]["200"]
    assert {"application/json", "text/csv"} <= set(ok["content"])  # the schema states both answers
    assert {h.lower() for h in ok["headers"]} == {"x-row-count", "x-truncated", "x-truncated-by"}


def test_the_runs_and_types_are_what_was_stored(served):
    body = sql(served["server"], "SELECT run_id, model_id FROM v_runs ORDER BY model_id").json()
    assert body["rows"] == [[r["run_id"], r["model_id"]] for r in served["runs"]]
    typed = sql(served["server"], QUERIES[3]).json()
    assert [c["type"] for c in typed["columns"]] == ["DECIMAL(4,2)", "DATE", "INTEGER[]", "STRUCT(k VARCHAR)",
                                                     '"NULL"', "DOUBLE", "VARCHAR"]
    assert typed["rows"] == [["1.50", "2024-02-29", [1, 2], {"k": "v"}, None, None, 'a,b"c']]
    as_csv = list(csv.reader(io.StringIO(sql(served["server"], QUERIES[3], format="csv").text)))
    assert as_csv[1] == ["1.50", "2024-02-29", "[1, 2]", '{"k": "v"}', "", "nan", 'a,b"c']  # lists, structs: JSON


@pytest.mark.parametrize(("query", "words"), HOSTILE)
def test_hostile_queries_are_refused_and_change_nothing(served, query, words):
    srv, out = served["server"], served["tmp"] / "stolen.csv"
    before = sql(srv, COUNTS).json()["rows"]
    detail = refused(sql(srv, query.format(out=out)))
    assert words in detail, detail
    assert "root:" not in detail and "LINE 1" not in detail
    assert sql(srv, COUNTS).json()["rows"] == before
    assert not out.exists() and not (served["tmp"] / "stolen.csv.duckdb").exists()


def test_the_limits_are_the_servers(served):
    srv = served["server"]
    rows = sql(srv, "SELECT current_setting('memory_limit') AS m, current_setting('enable_external_access') AS x, "
                    "current_setting('lock_configuration') AS locked").json()["rows"]
    assert rows == [["488.2 MiB", False, True]]  # 512MB
    t0 = time.perf_counter()
    detail = refused(sql(srv, "SELECT count(*) FROM range(100000) a, range(1000000) b"))
    elapsed = time.perf_counter() - t0
    assert f"time limit of {TIMEOUT_S:g} s" in detail and "serve --sql_timeout_s" in detail
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 5, elapsed

    t0 = time.perf_counter()
    huge = sql(srv, "SELECT i, repeat('x', 50) AS s FROM range(10000000000) t(i)", limit=7)
    assert huge.status_code == 200 and time.perf_counter() - t0 < TIMEOUT_S  # the rest is never computed
    assert huge.json()["rows"] == [[i, "x" * 50] for i in range(7)] and huge.json()["truncated"] is True
    assert len(sql(srv, "SELECT * FROM range(100000)").json()["rows"]) == 500  # the default (1000) capped by max_sql_rows
    as_csv = sql(srv, "SELECT * FROM range(100000)", limit=3, format="csv")
    assert as_csv.text == "range\n0\n1\n2\n" and as_csv.headers["x-truncated"] == "true"


def test_an_answer_is_capped_in_bytes_too(served):
    """Rows of long text stop at the server's max_sql_bytes (200,000 here), whatever the row limit."""
    srv = served["server"]
    body = sql(srv, "SELECT i, repeat('y', 30000) AS s FROM range(100) t(i)", limit=50).json()
    # each row takes 30,002 (the text in JSON's quotes) + 8 (the integer): 6 rows fit in 200,000, the 7th not
    assert [r[0] for r in body["rows"]] == list(range(6)) and body["rows"][0][1] == "y" * 30000
    assert body["truncated"] is True and body["truncated_by"] == "bytes" and body["row_count"] == 6
    by_rows = sql(srv, "SELECT * FROM range(10)", limit=4).json()
    assert by_rows["truncated_by"] == "rows" and by_rows["row_count"] == 4
    whole = sql(srv, "SELECT * FROM range(4)", limit=4).json()
    assert whole["truncated"] is False and whole["truncated_by"] is None and whole["row_count"] == 4
    as_csv = sql(srv, "SELECT repeat('z', 90000) AS s FROM range(5)", format="csv")
    assert as_csv.text == "s\n" + ("z" * 90000 + "\n") * 2
    assert as_csv.headers["x-truncated"] == "true" and as_csv.headers["x-truncated-by"] == "bytes"
    # counted as JSON writes it: a control character escaped takes 6 bytes, so 20,000 of them 120,002
    escaped = sql(srv, "SELECT repeat(chr(1), 20000) AS s FROM range(3)").json()
    assert escaped["row_count"] == 1 and escaped["truncated_by"] == "bytes"
    detail = refused(sql(srv, "SELECT repeat('x', 300000) AS s"))
    assert detail.startswith("query: the result's first row alone takes more than the limit of 200,000 bytes")
    assert "cast it to VARCHAR" not in detail  # said once, not wrapped in the advice for unreadable values


@pytest.mark.parametrize(("body", "field"), [
    ({"query": "SELECT 1", "limit": 501}, "limit"),  # over this server's max_sql_rows
    ({"query": "SELECT 1", "limit": 0}, "limit"),
    ({"query": "SELECT 1", "limit": 10**30}, "limit"),
    ({"query": "SELECT 1", "format": "xml"}, "format"),
    ({"query": "SELECT 1", "colour": "red"}, "colour"),
    ({"query": ""}, "query"),
    ({"query": 7}, "query"),
    ({"query": "SELECT 1" + " " * 100_000}, "query"),
    ({}, "body"),  # a missing field, as on every route
])
def test_bad_bodies_name_the_field(served, body, field):
    refused(served["server"].client.post("/v1/sql", json=body), field)


def test_the_server_keeps_working_after_hostile_queries(served):
    srv = served["server"]
    for query, _ in HOSTILE[:6]:
        refused(sql(srv, query.format(out=served["tmp"] / "x")))
    refused(sql(srv, "SELECT count(*) FROM range(100000) a, range(1000000) b"))
    before = sql(srv, "SELECT count(*) FROM v_runs").json()["rows"][0][0]
    r = srv.client.post("/v1/sae/features/discover", json={"model_id": "toy", "sae_id": "toy", "layers": [1],
                                                           "text": "Margins widened as churn fell.",
                                                           "tags": {"domain": "finance"}})
    assert r.status_code == 200 and r.json()["cached"] is False, r.text  # a new run, written to the catalog
    run_id = r.json()["run_id"]
    assert sql(srv, "SELECT count(*) FROM v_runs").json()["rows"] == [[before + 1]]
    stored = sql(srv, f"SELECT count(*) FROM v_activations WHERE run_id = '{run_id}'").json()["rows"][0][0]
    assert stored > 0
    assert srv.client.get("/v1/runs", params={"tag": "domain:finance"}).json()["total"] == 1
    assert srv.client.post(f"/v1/runs/{run_id}/rank", json={"score_mode": "max"}).status_code == 200


def test_feature_scores_over_http_equals_the_rank_route(served):
    """The ranking macro answers over /v1/sql with the scores and order of the server's own ranking."""
    srv = served["server"]
    run_id = served["runs"][0]["run_id"]
    r = sql(srv, f"SELECT layer, stream, feature_id, score FROM feature_scores(['{run_id}']) WHERE rank <= 5 "
                 "ORDER BY rank")
    assert r.status_code == 200, r.text
    ranked = srv.client.post(f"/v1/runs/{run_id}/rank", json={"return_top_x": 5})
    assert ranked.status_code == 200, ranked.text
    expected = [[f["layer"], f["stream"], f["feature_id"], f["score"]] for f in ranked.json()["features"]]
    rows = r.json()["rows"]
    assert expected and [row[:3] for row in rows] == [e[:3] for e in expected]
    assert [row[3] for row in rows] == pytest.approx([e[3] for e in expected], rel=1e-6)


def test_sql_is_off_unless_the_server_is_started_with_the_flag(toy_registry, tmp_path):
    srv = Server(tmp_path / "plain.duckdb", toy_registry, tmp_path / "server.log")
    try:
        for body in ({"query": "SELECT 1"}, {"query": "DELETE FROM runs"}, {}, {"bogus": True}):
            r = sql(srv, **body) if "query" in body else srv.client.post("/v1/sql", json=body)
            assert r.status_code == 403, r.text
            assert r.json()["field"] == "enable_sql" and "serve --enable_sql" in r.json()["detail"]
        health = srv.client.get("/healthz").json()
        assert health["limits"]["enable_sql"] is False
        assert "/v1/sql" in srv.client.get("/schema/openapi.json").json()["paths"]  # documented, and says it is off
    finally:
        srv.stop()
