"""Shared fixtures: a toy demo built by the real build script, registries, catalogs, subprocess CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_demo(tmp_path_factory) -> Path:
    """The demo build script at toy scale: corpus, tokenizer, 2-layer GPT-2, SAEs (ReLU + TopK)."""
    from ingest.demo.build import build, write_readme

    out = tmp_path_factory.mktemp("toy-demo")
    figures = build(out, "toy")
    write_readme(out, figures)
    return out


@pytest.fixture(scope="session")
def toy_registry(toy_demo, tmp_path_factory) -> Path:
    reg = tmp_path_factory.mktemp("reg") / "sae-discover.toml"
    reg.write_text(f"""
[models.toy]
path = "{toy_demo / 'model'}"
default_layers = [1]
calibration_corpus = "{toy_demo / 'calibration.jsonl'}"

[models.toy-finance]
path = "{toy_demo / 'model-finance'}"
default_layers = [1]

[saes.toy]
path = "{toy_demo / 'saes'}"
""")
    return reg


@pytest.fixture()
def catalog(tmp_path):
    from catalog.db import Catalog

    cat = Catalog(tmp_path / "catalog.duckdb")
    yield cat
    cat.close()


@pytest.fixture()
def toy_discovery(toy_registry, catalog):
    from sae_discover.registry import Registry
    from sae_discover.service import Discovery

    return Discovery(catalog, Registry.load(toy_registry), device="cpu")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "sae_discover", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=600)


SCALE_MODULES = ("deltalake", "ray")  # the optional ``scale`` extra; tests/test_store.py skips without it


def pytest_configure(config) -> None:
    """``SAE_DISCOVER_REQUIRE_SCALE=1`` (set by ``.ci/run``): the scale extra must be installed, so CI
    never passes by skipping the store and Ray tests."""
    if os.environ.get("SAE_DISCOVER_REQUIRE_SCALE", "") in ("", "0"):
        return
    missing = [name for name in SCALE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"SAE_DISCOVER_REQUIRE_SCALE is set but {', '.join(missing)} is not installed: "
                                "pip install -c constraints.txt -e '.[dev,scale]'")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def held_catalog(path: Path) -> Iterator[None]:
    """Another process holding ``path`` open read-write (DuckDB's file lock) for the duration."""
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(path)!r}); "
                               "c.execute('CREATE TABLE x (i INT)'); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield
    finally:
        holder.kill()
        holder.wait()
