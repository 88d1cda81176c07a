"""The HTTP API on a real server: `python -m sae_discover serve` on 127.0.0.1 (free port), talked to with httpx.

One server for the module (the toy registry plus the built-in demo), with tight limits so that bounds
are easy to cross. The last test stops it and reads the catalog file directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from api.schemas import API_REFUSED
from sae_discover.registry import DEMO_DIR
from sae_discover.request import MAX_LAYER, RERANK_FIELDS, DiscoverRequest
from tests.conftest import ROOT, run_cli

LIMITS = {"max_gen_tokens": 32, "max_text_chars": 2000, "max_layers": 4, "max_return_top_x": 50,
          "max_body_bytes": 1_000_000}
SEED_BODY = {  # the seed's example body, with the demo's ids, layer and a short generation
    "model_id": "demo", "sae_id": "demo", "prompt": "Summarize Q2 earnings of ACME Corp and key KPIs.", "generate": True,
    "gen_tokens": 16, "layers": [2], "streams": ["resid_pre"], "topk_tokens_per_seq": 64, "return_top_x": 25,
    "score_mode": "mean×coverage", "min_coverage_pct": 0.5, "merge_across_layers": True, "attach_examples": True,
    "attach_proto_labels": True, "seed": 42}
RESPONSE_KEYS = {"model_id", "sae_id", "run_id", "cached", "analyzed", "score_mode", "background", "threshold_source",
                 "normalization", "min_coverage_pct", "merge_across_layers",
                 "features", "warnings", "calibration_id", "calibration", "timings"}
FEATURE_KEYS = {"feature_id", "layer", "stream", "score", "scores", "proto_label", "top_spans"}
DISCOVER = "/v1/sae/features/discover"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db: Path, registry: Path, log: Path, *extra: str) -> None:
        self.db, self.registry, self.log = db, registry, log
        self.url = f"http://127.0.0.1:{free_port()}"
        flags = [x for k, v in LIMITS.items() for x in (f"--{k}", str(v))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sae_discover", "serve", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
             "--db", str(db), "--registry", str(registry), "--device", "cpu", "--log_level", "warning", *flags, *extra],
            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not start:\n{log.read_text()}")
            time.sleep(0.3)
        self.client = httpx.Client(base_url=self.url, timeout=180)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # uvicorn shuts down cleanly on SIGTERM; the app closes the catalog
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(toy_registry, tmp_path_factory):
    """The toy registry, plus the demo model with a 60-document slice of its calibration corpus (first use
    calibrates: ~4× faster than on the whole corpus; same model, SAEs and thresholds source)."""
    tmp = tmp_path_factory.mktemp("api")
    corpus = tmp / "calibration.jsonl"
    corpus.write_text("".join((DEMO_DIR / "calibration.jsonl").read_text().splitlines(keepends=True)[:60]))
    registry = tmp / "sae-discover.toml"
    registry.write_text(toy_registry.read_text() + f"""
[models.demo]
path = "{DEMO_DIR / 'model'}"
default_layers = [2]
calibration_corpus = "{corpus}"
""")
    srv = Server(tmp / "served.duckdb", registry, tmp / "server.log")
    yield srv
    srv.stop()
    assert "unhandled error" not in srv.log.read_text()  # no request ended in a 500


def toy(prompt: str, **extra) -> dict:
    return {"model_id": "toy", "sae_id": "toy", "prompt": prompt, "gen_tokens": 8, "layers": [1], **extra}


def assert_error(r: httpx.Response, status: int, field: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"status_code", "detail", "field"}, body
    assert body["status_code"] == status
    assert body["field"] == field, body
    if field:
        assert body["detail"].startswith(f"{field}"), body
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


# -- discovery ------------------------------------------------------------------------------------

@pytest.mark.skipif(not (DEMO_DIR / "saes" / "blocks.2.hook_resid_pre").exists(), reason="demo SAEs not built")
def test_seed_body_on_the_demo_then_cached(server):
    t0 = time.perf_counter()
    r = server.client.post(DISCOVER, json=SEED_BODY)
    first_s = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    first = r.json()
    assert set(first) == RESPONSE_KEYS
    assert (first["model_id"], first["sae_id"], first["cached"]) == ("demo", "demo", False)
    assert first["analyzed"]["mode"] == "prompt+gen" and first["analyzed"]["layers"] == [2]
    assert 0 < first["analyzed"]["tokens"] <= first["analyzed"]["total_tokens"]
    assert first["threshold_source"] == "calibration_p95" and first["score_mode"] == "mean×coverage"
    assert first["background"] == "calibration"
    assert 1 <= len(first["features"]) <= 25
    for f in first["features"]:
        assert set(f) == FEATURE_KEYS and set(f["scores"]) == {"mean", "coverage", "max", "selectivity"}
        assert (f["layer"], f["stream"]) == (2, "resid_pre")
        for span in f["top_spans"]:
            assert set(span) == {"text", "position", "act", "marked"} and span["position"][0] < span["position"][1]
    scores = [f["score"] for f in first["features"]]
    assert scores == sorted(scores, reverse=True)
    # the server's paths stay on it: the corpus by its file name, the first-use note without its folder
    assert first["calibration"]["corpus"] == "calibration.jsonl" and first["calibration"]["corpus_hash"]
    assert any(w.endswith("on calibration.jsonl (first use)") for w in first["warnings"]), first["warnings"]
    assert str(server.db.parent) not in r.text and str(DEMO_DIR) not in r.text
    missing = assert_error(server.client.post("/v1/runs/rank", json={"run_ids": ["ffffff"]}), 404, "run_ids")
    assert "no run 'ffffff' in the catalog" in missing["detail"] and str(server.db) not in missing["detail"]

    runs_before = server.client.get("/healthz").json()["forward_runs"]
    t0 = time.perf_counter()
    again = server.client.post(DISCOVER, json=SEED_BODY).json()
    again_s = time.perf_counter() - t0
    assert again["cached"] is True and again["run_id"] == first["run_id"]
    assert again["features"] == first["features"]
    assert again_s < first_s
    assert server.client.get("/healthz").json()["forward_runs"] == runs_before  # the model did not run

    # the seed's restrict_features: only those ids come back (a new run: the restrict set names the run)
    ids = [f["feature_id"] for f in first["features"][:3]]
    restricted = server.client.post(DISCOVER, json={**SEED_BODY, "restrict_features": ids}).json()
    assert restricted["features"] and {f["feature_id"] for f in restricted["features"]} <= set(ids)


def test_twenty_concurrent_requests_make_one_run_each(server):
    warm = [toy(f"Quarterly revenue, take {i}.") for i in range(3)]
    for body in warm:  # these are cached when the burst comes
        assert server.client.post(DISCOVER, json=body).status_code == 200
    before = server.client.get("/healthz").json()["forward_runs"]
    new = [toy(f"Margins and guidance, part {i}.") for i in range(5)]
    # ranking options differ between copies of one request: still one run
    bodies = [{**(warm + new)[i % 8], "return_top_x": 5 + i % 3} for i in range(20)]

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as client:
            return await asyncio.gather(*(client.post(DISCOVER, json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    by_prompt: dict[str, set[str]] = {}
    for body, r in zip(bodies, responses, strict=True):
        by_prompt.setdefault(body["prompt"], set()).add(r.json()["run_id"])
        assert len(r.json()["features"]) <= body["return_top_x"]
    assert all(len(ids) == 1 for ids in by_prompt.values())
    assert all(r.json()["cached"] for b, r in zip(bodies, responses, strict=True) if b["prompt"] in {w["prompt"] for w in warm})
    assert server.client.get("/healthz").json()["forward_runs"] - before == len(new)  # identical requests coalesced

    page = server.client.get("/v1/runs", params={"model_id": "toy", "limit": 50}).json()
    stored = [r["run_id"] for r in page["runs"]]
    run_ids = {next(iter(ids)) for ids in by_prompt.values()}
    assert run_ids <= set(stored) and len(stored) == len(set(stored)) == page["total"]
    assert sum(1 for r in page["runs"] if r["prompt"] in by_prompt) == len(by_prompt) == 8


def test_bad_bodies_are_4xx_naming_the_field(server):
    base = {"model_id": "toy", "sae_id": "toy", "prompt": "Revenue rose."}
    cases = [
        ({}, "prompt"),
        ({"model_id": "toy"}, "prompt"),
        ({**base, "prompt": 5}, "prompt"),
        ({**base, "prompt": "   "}, "prompt"),
        ({**base, "text": "also"}, "text"),
        ({**base, "gen_tokens": "many"}, "gen_tokens"),
        ({**base, "gen_tokens": -1}, "gen_tokens"),
        ({**base, "gen_tokens": 33}, "gen_tokens"),  # over this server's limit
        ({**base, "gen_tokens": 10**30}, "gen_tokens"),
        ({**base, "gen_tokens": 1.5}, "gen_tokens"),
        ({**base, "seed": 2**64}, "seed"),
        ({**base, "seed": -1}, "seed"),
        ({**base, "layers": [0, 1, 0, 1, 0]}, "layers"),  # more than max_layers
        ({**base, "layers": []}, "layers"),
        ({**base, "layers": [-1]}, "layers"),
        ({**base, "layers": [9]}, "layers"),  # the toy model has 2 layers
        ({**base, "layers": "one"}, "layers"),
        ({**base, "streams": ["resid_mid"]}, "streams"),
        ({**base, "streams": ["mlp_out"], "layers": [0]}, "streams"),  # no SAE at that hook, one at the layer
        ({**base, "hooks": [[0, "mlp_out"]]}, "hooks"),
        ({**base, "restrict_features": [2**40]}, "restrict_features"),
        ({**base, "topk_tokens_per_seq": 0}, "topk_tokens_per_seq"),
        ({**base, "return_top_x": 51}, "return_top_x"),
        ({**base, "min_coverage_pct": 101}, "min_coverage_pct"),
        ({**base, "temperature": "hot"}, "temperature"),
        ({**base, "top_p": 0}, "top_p"),
        ({**base, "score_mode": "median"}, "score_mode"),
        ({**base, "token_proxy": "loss"}, "token_proxy"),
        ({**base, "generate": "perhaps"}, "generate"),
        ({**base, "tau": 1.0, "tau_quantile": 0.5}, "tau"),
        ({**base, "tau_basis": "zeros"}, "tau_basis"),
        ({**base, "normalization": "zscore"}, "normalization"),
        ({**base, "span_window": 10**6}, "span_window"),
        ({**base, "surprise": 1}, "surprise"),
        ({**base, "prompt": "x" * 2001}, "prompt"),  # over max_text_chars
        ({**base, "model_id": "/etc/passwd"}, "model_id"),
        ({**base, "model_id": "../ingest/demo/model"}, "model_id"),
        ({**base, "model_id": str(DEMO_DIR / "model")}, "model_id"),
        ({**base, "model_id": "openai-community/gpt2"}, "model_id"),  # a hub id, not registered
        ({**base, "model_id": ""}, "model_id"),
        ({**base, "sae_id": ".."}, "sae_id"),
        ({**base, "sae_id": str(DEMO_DIR / "saes")}, "sae_id"),
        ({**base, "model_id": None}, "model_id"),
        ({**base, "background_file": "/etc/passwd"}, "background_file"),
        ({**base, "background_text": "y" * 2001}, "background_text"),
        # values Litestar's lenient conversion would take, of another JSON type than the schema's
        ({**base, "gen_tokens": "16"}, "gen_tokens"),
        ({**base, "gen_tokens": 16.0}, "gen_tokens"),
        ({**base, "generate": 1}, "generate"),
        ({**base, "merge_across_layers": "true"}, "merge_across_layers"),
        ({**base, "layers": ["0"]}, "layers"),
        ({**base, "restrict_features": ["5"]}, "restrict_features"),
        ({**base, "tau": "1"}, "tau"),
    ]
    for body, field in cases:
        assert_error(server.client.post(DISCOVER, json=body), 400, field)
    assert "expected int, got str" in server.client.post(DISCOVER, json={**base, "gen_tokens": "16"}).json()["detail"]
    # a value outside a fixed set is answered with the set, from the route's own types (body and query)
    for r, field, choices, got in (
            (server.client.post(DISCOVER, json={**base, "normalization": "zscore"}), "normalization",
             "calibration_max, none, sae_median_max", "zscore"),
            (server.client.post(DISCOVER, json={**base, "streams": ["resid_mid"]}), "streams",
             "attn_out, mlp_out, resid_post, resid_pre", "resid_mid"),
            (server.client.get("/v1/runs", params={"mode": "chat"}), "mode", "prompt, prompt+gen, text", "chat"),
            (server.client.post("/v1/labels/import", json={"sae_id": "toy", "format": "tsv", "content": "x"}),
             "format", "csv, delphi, neuronpedia", "tsv")):
        assert assert_error(r, 400, field)["detail"].endswith(f"expected one of {choices}, got '{got}'")
    # a body not sent as JSON is refused before anything runs: a web page's text/plain POST (no CORS preflight)
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = server.client.post(DISCOVER, content=json.dumps(base).encode(), headers=headers)
        assert_error(r, 415, "content-type")
    as_json = server.client.post(DISCOVER, content=json.dumps({**base, "gen_tokens": 33}).encode(),
                                 headers={"content-type": "application/json; charset=utf-8"})
    assert_error(as_json, 400, "gen_tokens")  # read as JSON: refused for its value, over this server's limit
    empty = server.client.post(DISCOVER, content=b"", headers={"content-type": "application/json"})
    assert empty.json()["detail"] == "body: expected a JSON object, got an empty body"
    r = server.client.post(DISCOVER, content=b'{"model_id": "toy", "prompt": "x", "tau": 1e400}',
                           headers={"content-type": "application/json"})
    assert_error(r, 400, "tau")
    for raw in (b"not json", b"[1, 2]", b'"a string"', b"", b"{\"prompt\": \"unterminated"):
        r = server.client.post(DISCOVER, content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400, "body")
    huge = server.client.post(DISCOVER, json={**base, "prompt": "x" * 1_200_000})  # over max_body_bytes
    assert_error(huge, 413, "body")
    assert server.client.get("/healthz").status_code == 200  # still serving


def test_openapi_documents_the_request_model_and_limits(server):
    spec = server.client.get("/schema/openapi.json").json()
    assert {"/v1/sae/features/discover", "/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/rank",
            "/v1/labels/import", "/healthz"} <= set(spec["paths"])
    body = spec["components"]["schemas"]["DiscoverBody"]["properties"]
    defaults = DiscoverRequest()
    # every option of the one request model, no other (but those that name server files)
    assert set(body) == set(defaults.to_dict()) - set(API_REFUSED)
    for name in ("topk_tokens_per_seq", "return_top_x", "score_mode", "min_coverage_pct", "seed"):
        assert body[name]["default"] == getattr(defaults, name), name
    assert body["gen_tokens"]["default"] == LIMITS["max_gen_tokens"]  # 128 capped by this server's limit
    assert body["gen_tokens"]["maximum"] == LIMITS["max_gen_tokens"]
    assert body["prompt"]["maxLength"] == LIMITS["max_text_chars"]
    assert body["layers"]["maxItems"] == LIMITS["max_layers"]
    # the constraints of nullable values, list items and tuple members (Litestar alone drops them)
    layers = next(m for m in body["layers"]["oneOf"] if m["type"] == "array")
    assert (layers["items"]["minimum"], layers["items"]["maximum"]) == (0, MAX_LAYER)
    assert next(m for m in body["tau"]["oneOf"] if m["type"] == "number")["minimum"] == 0
    assert body["restrict_features"]["items"]["minimum"] == 0
    pair = next(m for m in body["hooks"]["oneOf"] if m["type"] == "array")["items"]
    assert pair["prefixItems"][0]["maximum"] == MAX_LAYER and pair["minItems"] == pair["maxItems"] == 2
    # the report route reads its query string itself; its parameters are still stated: the ranking
    # options, with the rank body's constraints under this server's limits, lists comma-separated
    report = {p["name"]: p for p in spec["paths"]["/v1/runs/{run_id}/report"]["get"]["parameters"] if p["in"] == "query"}
    assert set(report) == set(RERANK_FIELDS) and not any(p["required"] for p in report.values())
    assert report["return_top_x"]["schema"]["maximum"] == LIMITS["max_return_top_x"]
    assert {"context", "mean×coverage"} <= set(report["score_mode"]["schema"]["enum"])
    assert report["tau"]["schema"] == {"type": "number", "minimum": 0, "maximum": 1e30}  # never null in a query
    assert report["restrict_features"]["schema"]["items"]["minimum"] == 0
    assert (report["restrict_features"]["style"], report["restrict_features"]["explode"]) == ("form", False)
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and {"demo", "toy"} <= set(health["models"])
    assert health["limits"]["max_gen_tokens"] == LIMITS["max_gen_tokens"]


# -- runs, re-ranking, labels ---------------------------------------------------------------------

def test_runs_show_and_rerank(server):
    first = server.client.post(DISCOVER, json=toy("EPS beat estimates; guidance raised.", return_top_x=10)).json()
    run_id = first["run_id"]
    total = server.client.get("/v1/runs").json()["total"]

    detail = server.client.get(f"/v1/runs/{run_id}").json()
    assert detail["run_id"] == run_id and detail["model_id"] == "toy" and detail["layers"] == [1]
    assert detail["saes"][0]["layer"] == 1 and detail["saes"][0]["stream"] == "resid_pre"
    assert detail["n_kept"] == first["analyzed"]["tokens"]

    ranked = server.client.post(f"/v1/runs/{run_id}/rank", json={"score_mode": "max", "return_top_x": 3,
                                                                  "min_coverage_pct": 0}).json()
    assert ranked["run_id"] == run_id and ranked["cached"] is True and ranked["score_mode"] == "max"
    assert 1 <= len(ranked["features"]) <= 3
    assert [f["score"] for f in ranked["features"]] == sorted((f["score"] for f in ranked["features"]), reverse=True)
    assert server.client.get("/v1/runs").json()["total"] == total  # re-ranking never makes a run
    every = server.client.post(f"/v1/runs/{run_id}/rank", json={"tau_basis": "all"}).json()
    assert every["threshold_source"] == "calibration_p95_all" and first["threshold_source"] == "calibration_p95"
    raw = server.client.post(f"/v1/runs/{run_id}/rank", json={"normalization": "none", "score_mode": "max",
                                                               "min_coverage_pct": 0}).json()
    assert raw["normalization"] == "none" and first["normalization"] == "calibration_max"
    assert all(f["score"] == pytest.approx(f["scores"]["max"]) for f in raw["features"])

    page = server.client.get("/v1/runs", params={"limit": 1, "offset": 1, "sae_id": "toy"}).json()
    assert len(page["runs"]) == 1 and page["limit"] == 1 and page["offset"] == 1
    assert page["runs"][0]["attribution_target"] == "none" and detail["attribution_target"] == "none"
    assert server.client.get("/v1/runs", params={"model_id": "nobody"}).json() == {
        "runs": [], "total": 0, "limit": 50, "offset": 0}

    assert_error(server.client.get("/v1/runs/not-a-run"), 404, "run_id")
    assert_error(server.client.post("/v1/runs/not-a-run/rank", json={}), 404, "run_id")
    assert_error(server.client.post(f"/v1/runs/{run_id}/rank", json={"gen_tokens": 5}), 400, "gen_tokens")
    assert_error(server.client.post(f"/v1/runs/{run_id}/rank", json={"return_top_x": 0}), 400, "return_top_x")
    for params, field in (({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"), ({"limit": "all"}, "limit"),
                          ({"offset": -1}, "offset"), ({"offset": 10**20}, "offset")):
        assert_error(server.client.get("/v1/runs", params=params), 400, field)


def test_hooks_pairs_analyzed_text_prefixes_mode_filter_and_restricted_rerank(server):
    """Issue 13 over HTTP: hooks as [[layer, stream]] pairs, the analyzed text and continuation, run id
    prefixes, GET /v1/runs?mode=, and restrict_features as a filter when re-ranking."""
    body = toy("Quarterly revenue of Initech rose", hooks=[[0, "resid_pre"], [1, "mlp_out"]], min_coverage_pct=0,
               return_top_x=50)
    del body["layers"]
    r = server.client.post(DISCOVER, json=body)
    assert r.status_code == 200, r.text
    first = r.json()
    a = first["analyzed"]
    assert a["layers"] == [0, 1] and a["streams"] == ["resid_pre", "mlp_out"]
    assert {(f["layer"], f["stream"]) for f in first["features"]} <= {(0, "resid_pre"), (1, "mlp_out")}
    assert a["continuation"] and a["text"].startswith("Quarterly revenue of Initech rose")
    assert a["text"].endswith(a["continuation"])
    assert_error(server.client.post(DISCOVER, json={**body, "layers": [1]}), 400, "hooks")
    assert_error(server.client.post(DISCOVER, json={**body, "hooks": [[1, "nowhere"]]}), 400, "hooks")

    run_id = first["run_id"]
    detail = server.client.get(f"/v1/runs/{run_id[:7]}").json()
    assert detail["run_id"] == run_id and detail["streams"] == ["resid_pre", "mlp_out"]
    assert (detail["analyzed_text"], detail["continuation"]) == (a["text"], a["continuation"])
    modes = {row["mode"] for row in server.client.get("/v1/runs", params={"mode": "prompt+gen", "limit": 500}).json()["runs"]}
    assert modes == {"prompt+gen"}
    assert_error(server.client.get("/v1/runs", params={"mode": "poem"}), 400, "mode")

    keep = sorted({f["feature_id"] for f in first["features"]})[:3]
    ranked = server.client.post(f"/v1/runs/{run_id[:8]}/rank", json={"restrict_features": keep, "min_coverage_pct": 0})
    assert ranked.status_code == 200, ranked.text
    got = ranked.json()
    assert got["run_id"] == run_id and {f["feature_id"] for f in got["features"]} <= set(keep)
    assert {f["feature_id"] for f in got["features"]} >= set(keep)
    short = assert_error(server.client.get("/v1/runs/abc"), 404, "run_id")  # no such resource, and why
    assert short["detail"] == "run_id: no run 'abc': a run id, or a unique prefix of it, has at least 6 hex characters"


def test_labels_import_from_content(server):
    first = server.client.post(DISCOVER, json=toy("Revenue and EPS, again.", return_top_x=3)).json()
    fid = first["features"][0]["feature_id"]
    csv = f"feature_id,label,score\n{fid},quarterly earnings talk,0.99\n"
    r = server.client.post("/v1/labels/import", json={"sae_id": "toy", "format": "csv", "content": csv,
                                                      "layer": 1, "stream": "resid_pre"})
    assert r.status_code == 200, r.text
    assert r.json() == {"imported": 1, "replaced": 0, "hooks": [[1, "resid_pre"]]}
    again = server.client.post("/v1/labels/import", json={"sae_id": "toy", "format": "csv", "content": csv,
                                                          "layer": 1, "stream": "resid_pre"})
    assert again.json() == {"imported": 1, "replaced": 1, "hooks": [[1, "resid_pre"]]}  # the csv source's, replaced
    ranked = server.client.post(f"/v1/runs/{first['run_id']}/rank", json={"return_top_x": 3}).json()
    assert ranked["features"][0]["proto_label"] == "quarterly earnings talk"

    delphi = {"layers.1_latent3.txt": "\"numbers and currency\""}
    r = server.client.post("/v1/labels/import", json={"sae_id": "toy", "format": "delphi", "files": delphi,
                                                      "layer": 1, "stream": "resid_pre"})
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text

    bad = [
        ({"sae_id": "toy", "format": "csv", "content": "feature,label\n1,x\n"}, "content"),
        ({"sae_id": "toy", "format": "neuronpedia", "content": "{not json"}, "content"),
        ({"sae_id": "toy", "format": "csv", "content": "feature_id,label\n999999,x\n", "layer": 1,
          "stream": "resid_pre"}, "content"),
        ({"sae_id": "toy", "format": "csv", "content": "feature_id,label\n1,x\n", "layer": 1}, "stream"),
        ({"sae_id": "toy", "format": "csv"}, "content"),
        ({"sae_id": "toy", "format": "delphi", "files": {"../../etc/x_latent1.txt": "x"}}, "files"),
        ({"sae_id": "toy", "format": "xml", "content": "<a/>"}, "format"),
        ({"sae_id": "/tmp", "format": "csv", "content": "feature_id,label\n1,x\n"}, "sae_id"),
        ({"sae_id": "toy", "format": "csv", "path": "/etc/passwd"}, "path"),
        ({"sae_id": "toy", "format": "neuronpedia", "content": json.dumps(
            {"layer": "1-res-jb", "index": 2, "description": "x", "scores": [
                {"explanationScoreTypeName": "eleuther_fuzz", "value": 0.5},
                {"explanationScoreTypeName": "recall_alt", "value": 0.7}]})}, "score_type"),
        ({"sae_id": "toy", "format": "csv", "content": "feature_id,label\n1,x\n", "layer": 1,
          "stream": "resid_pre", "score_type": "recall_alt"}, "score_type"),
    ]
    for body, field in bad:
        assert_error(server.client.post("/v1/labels/import", json=body), 400, field)
    # an error in the file's content names the body field that held it, and the column and line in its message
    for content, column, line in (("feature_id,label\n1,x\nseven,x\n", "feature_id", 3),
                                  ("feature_id,label,score\n1,x,high\n", "score", 2),
                                  ("feature_id,label\n999999,x\n", "feature_id", 2)):
        body = assert_error(server.client.post("/v1/labels/import", json={
            "sae_id": "toy", "format": "csv", "content": content, "layer": 1, "stream": "resid_pre"}), 400, "content")
        assert body["detail"].startswith(f"content: {column}: labels.csv:{line}: "), body


# -- schema fuzzing -------------------------------------------------------------------------------

def test_schemathesis_finds_no_server_error_or_schema_violation(server, tmp_path):
    """Every operation, positive and negative data, except positive discovery bodies (they run models:
    the tests above cover those); discovery gets the negative (schema-invalid) bodies."""
    pytest.importorskip("schemathesis")
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis CLI not found"
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    common = [st, "run", f"{server.url}/schema/openapi.json", "--checks", checks, "--seed", "7", "--workers", "1",
              "--suppress-health-check", "all", "--request-timeout", "60", "--no-shrink"]
    runs = [["--exclude-path", DISCOVER, "--max-examples", "25"],
            ["--include-path", DISCOVER, "--mode", "negative", "--max-examples", "40", "--phases", "coverage,fuzzing"]]
    for extra in runs:
        proc = subprocess.run([*common, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "NO_COLOR": "1"})
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# -- one writer -----------------------------------------------------------------------------------

def test_cli_on_a_served_catalog_says_so(server, toy_registry):
    for args in (("runs", "list"), ("sql", "SELECT count(*) FROM v_runs"),
                 ("--text", "Revenue rose.", "--model", "toy", "--sae", "toy", "--registry", str(toy_registry))):
        proc = run_cli(*args, "--db", str(server.db))
        assert proc.returncode == 3, (args, proc.stdout, proc.stderr)
        assert "held by another process" in proc.stderr
        assert "Traceback" not in proc.stderr
    # and a second server on the same file refuses to start, with the same message
    proc = run_cli("serve", "--db", str(server.db), "--port", str(free_port()))
    assert proc.returncode == 3 and "held by another process" in proc.stderr, proc.stderr


def test_attribution_over_http_and_its_bad_bodies(server):
    """attribution_target and verify_top in the body; scores.attribution and verification in the response;
    bad targets are 4xx naming the field (issue 15)."""
    r = server.client.post(DISCOVER, json=toy("Revenue rose because", attribution_target="next_tokens",
                                              score_mode="attribution_abs", verify_top=2, min_coverage_pct=0))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["features"] and all("attribution" in f["scores"] for f in body["features"])
    assert len(body["verification"]["pairs"]) == 2 and "ablation_delta" in body["features"][0]
    for extra, field in (({"attribution_target": "loss"}, "attribution_target"),
                         ({"attribution_target": "token:Revenue rose"}, "attribution_target"),
                         ({"verify_top": 2}, "verify_top"), ({"verify_top": 101}, "verify_top"),
                         ({"score_mode": "attribution"}, "score_mode")):
        assert_error(server.client.post(DISCOVER, json=toy("Costs fell sharply", **extra)), 400, field)


def test_tags_and_id_are_stored_merged_and_filterable(server):
    c = server.client
    body = toy("Tagged prompt about bonds", id="req-7", tags={"domain": "finance", "n": 3, "gold": True})
    first = c.post(DISCOVER, json=body)
    assert first.status_code == 200, first.text
    run_id = first.json()["run_id"]
    assert first.json()["id"] == "req-7" and "calibration_id" in first.json()
    again = c.post(DISCOVER, json={**body, "id": "req-8", "tags": {"split": "test"}})
    assert again.json()["run_id"] == run_id and again.json()["cached"] is True  # tags are not in the run id
    page = c.get("/v1/runs", params=[("tag", "domain:finance"), ("tag", "split:test")]).json()
    assert [r["run_id"] for r in page["runs"]] == [run_id] and page["total"] == 1
    assert page["runs"][0]["tags"] == {"domain": "finance", "n": "3", "gold": "true", "split": "test"}
    assert page["runs"][0]["batch_id"] == "req-8"
    by_id = c.get("/v1/runs", params=[("batch_id", "req-8"), ("batch_id", "no-such-id")]).json()  # any of them
    assert [r["run_id"] for r in by_id["runs"]] == [run_id] and by_id["total"] == 1
    assert c.get("/v1/runs", params={"batch_id": "req-7"}).json()["total"] == 0  # the newer id replaced it
    twice = assert_error(c.get("/v1/runs", params=[("limit", "5"), ("limit", "1")]), 400, "limit")  # not "last wins"
    assert twice["detail"] == "limit: given more than once; it takes one value"
    twice = assert_error(c.get(f"/v1/runs/{run_id}/report", params=[("score_mode", "max"), ("score_mode", "mean")]),
                         400, "score_mode")
    assert c.get("/v1/runs", params={"tag": "domain:sports"}).json()["total"] == 0
    assert c.get(f"/v1/runs/{run_id}").json()["tags"]["domain"] == "finance"
    assert_error(c.get("/v1/runs", params={"tag": "domain"}), 400, "tag")
    assert_error(c.post(DISCOVER, json={**body, "tags": {"a": {"b": 1}}}), 400, "tags")
    assert_error(c.post(DISCOVER, json={**body, "tags": {f"k{i}": i for i in range(65)}}), 400, "tags")


def test_after_shutdown_the_catalog_holds_one_run_per_distinct_request(server):
    listed = server.client.get("/v1/runs", params={"limit": 500}).json()
    server.stop()
    assert server.proc.returncode is not None
    con = duckdb.connect(str(server.db), read_only=True)  # the server let go of the file
    try:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT run_id) FROM v_runs").fetchone()
        orphans = con.execute("SELECT count(*) FROM tokens WHERE run_key NOT IN (SELECT run_key FROM runs)").fetchone()[0]
    finally:
        con.close()
    assert n == distinct == listed["total"]
    assert orphans == 0
