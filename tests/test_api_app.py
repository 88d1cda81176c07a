"""The API app in-process (Litestar's TestClient): paths a real client cannot trigger on purpose —
an unexpected exception, a request that runs past request_timeout_s — plus settings and the model cache."""

from __future__ import annotations

import logging
import time

import pytest
from litestar import get
from litestar.testing import TestClient

from api.app import create_app
from api.settings import ApiSettings


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_unexpected_errors_are_a_generic_500_logged_server_side(tmp_path, toy_registry):
    def broken_routes(_svc):
        @get("/v1/broken", sync_to_thread=False)
        def broken() -> dict:
            raise RuntimeError("secret detail at /srv/models/internal.py")

        return [broken]

    app = create_app(tmp_path / "c.duckdb", toy_registry, ApiSettings(), extra_routes=[broken_routes])
    records = Records()  # on the logger itself: Litestar's logging config replaces the root's handlers
    logger = logging.getLogger("sae_discover.api")
    logger.addHandler(records)
    try:
        with TestClient(app) as client:
            r = client.get("/v1/broken")
    finally:
        logger.removeHandler(records)
    assert r.status_code == 500
    assert r.json() == {"status_code": 500, "detail": "internal error; see the server log", "field": None}
    assert "secret" not in r.text and "Traceback" not in r.text
    (logged,) = records.records
    assert logged.exc_info and "secret detail" in str(logged.exc_info[1])  # the traceback stays server-side


def test_a_run_past_the_time_limit_answers_503_and_finishes_in_the_background(tmp_path, toy_registry):
    app = create_app(tmp_path / "c.duckdb", toy_registry, ApiSettings(request_timeout_s=0.01, device="cpu"))
    body = {"model_id": "toy", "sae_id": "toy", "prompt": "Revenue rose.", "gen_tokens": 8}
    with TestClient(app, timeout=60) as client:
        r = client.post("/v1/sae/features/discover", json=body)  # cold: model load + first-use calibration
        assert r.status_code == 503, r.text
        assert r.json()["field"] == "request" and "request_timeout_s" in r.json()["detail"]
        deadline = time.monotonic() + 60
        while client.get("/healthz").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        runs = client.get("/v1/runs").json()
        assert runs["total"] == 1 and runs["runs"][0]["prompt"] == "Revenue rose."  # stored whole


def test_settings_from_environment_and_flags(monkeypatch):
    monkeypatch.setenv("SAE_DISCOVER_API_MAX_GEN_TOKENS", "64")
    monkeypatch.setenv("SAE_DISCOVER_API_REQUEST_TIMEOUT_S", "2.5")
    s = ApiSettings.from_env(max_layers=3, max_text_chars=None)
    assert (s.max_gen_tokens, s.request_timeout_s, s.max_layers, s.max_text_chars) == (64, 2.5, 3, 20_000)
    assert ApiSettings(max_gen_tokens=10**9).max_gen_tokens == 4096  # capped by the request model's bound
    monkeypatch.setenv("SAE_DISCOVER_API_MAX_LAYERS", "many")
    with pytest.raises(ValueError, match="SAE_DISCOVER_API_MAX_LAYERS"):
        ApiSettings.from_env()
    with pytest.raises(ValueError, match="max_models"):
        ApiSettings(max_models=0)


def test_models_kept_are_bounded_least_recently_used_first(catalog, toy_registry):
    from sae_discover.loaders import Loaders
    from sae_discover.registry import Registry

    registry = Registry.load(toy_registry)
    disc = Loaders(registry, device="cpu", allow_paths=False, max_models=1)  # what the server's Discovery uses
    base, tuned = registry.models["toy"], registry.models["toy-finance"]
    first = disc.model(base)
    assert disc.model(base) is first and disc.loaded_models() == ["toy"]  # loaded once, kept
    disc.model(tuned)
    assert disc.loaded_models() == ["toy-finance"]
    assert disc.model(base) is not first and disc.loaded_models() == ["toy"]


def test_drift_route_uses_the_cli_request_model(tmp_path, toy_registry):
    app = create_app(tmp_path / "c.duckdb", toy_registry, ApiSettings(device="cpu"))
    prompts = [{"text": "Shares of Globex rose 12% after the earnings call."},
               {"text": "EPS came in at $1.32 versus a consensus of $1.25."}]
    body = {"base": "toy", "tuned": "toy-finance", "sae_id": "toy", "prompts": prompts, "layers": [1], "top_k": 5}
    with TestClient(app, timeout=120) as client:
        r = client.post("/v1/drift", json=body)
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["base"]["model_id"] == "toy" and report["tuned"]["model_id"] == "toy-finance"
        assert len(report["prompts"]) == 2 and 0 <= report["overall"]["jaccard"] <= 1
        again = client.post("/v1/drift", json={"base_runs": report["base"]["run_ids"],
                                               "tuned_runs": report["tuned"]["run_ids"], "top_k": 5})
        assert again.status_code == 200, again.text
        assert again.json()["overall"] == report["overall"]
        same = client.post("/v1/drift", json={"base_runs": report["base"]["run_ids"],
                                              "tuned_runs": report["base"]["run_ids"], "top_k": 5})
        assert same.status_code == 400 and same.json()["field"] == "tuned_runs", same.text  # a run on both sides
        for bad, field in [({**body, "base": "/etc/models"}, "base"), ({**body, "tuned": "/tmp"}, "tuned"),
                           ({**body, "top_k": 0}, "top_k"),
                           ({"base_runs": "model_id = 'toy'", "tuned_runs": ["ab12cd34"]}, "base_runs")]:
            r = client.post("/v1/drift", json=bad)
            assert r.status_code == 400 and r.json()["field"] == field, r.text


def test_a_catalog_named_by_the_environment_is_hidden_from_clients(tmp_path, toy_registry, monkeypatch):
    """serve without --db opens $SAE_DISCOVER_DB: that path is the server's too, and an unknown run's
    404 says "the catalog" instead (as with --db)."""
    db = tmp_path / "from-env.duckdb"
    monkeypatch.setenv("SAE_DISCOVER_DB", str(db))
    with TestClient(create_app(None, toy_registry, ApiSettings())) as client:
        r = client.post("/v1/runs/rank", json={"run_ids": ["abcdef12"]})
    assert r.status_code == 404 and r.json()["detail"] == "run_ids: no run 'abcdef12' in the catalog", r.text
    assert db.exists() and str(tmp_path) not in r.text
