"""What one run section of a report holds: the discovery response (the JSON the CLI and API answer), the
run's stored row and SAEs, its tokens, and per returned feature its activations in the run, calibration
histogram, labels and decoder tokens (promoted and suppressed) — all from the catalog
(``catalog/report.py``), so a stored run's report needs no model."""

from __future__ import annotations

from catalog import runs
from catalog.db import Catalog
from catalog.report import run_report_data
from sae_discover.errors import RequestError
from sae_discover.stored import rerank

RUN_FIELDS = ("prompt", "text", "generate", "gen_tokens", "seed", "temperature", "top_p", "token_proxy",
              "topk_tokens_per_seq", "restrict_features", "created_at", "timings")


def _round(value: float) -> float:
    """Four significant digits: enough for a heatmap and a tooltip, and it keeps a large report small."""
    return float(f"{value:.4g}")


def run_section(catalog: Catalog, result: dict) -> dict:
    """One run's report data for ``result`` (a discovery or re-rank response of a stored run)."""
    run = runs.find_run(catalog, result["run_id"])
    if run is None:
        raise RequestError("run_id", f"no run {result['run_id']!r} in {catalog.path}")
    features = [(int(f["layer"]), f["stream"], int(f["feature_id"])) for f in result["features"]]
    data = run_report_data(catalog, run["run_key"], run["model_key"], features, result.get("calibration_id"))
    shown = []
    for f in data["features"]:
        attr = f["attr"]
        shown.append({"p": f["positions"], "a": [_round(a) for a in f["acts"]],
                      "t": None if attr is None else [None if x is None else _round(x) for x in attr],
                      "h": f["histogram"], "l": f["labels"], "d": f["promotes"],
                      "s": f["suppresses"]})
    return {"response": result, "run": {k: run.get(k) for k in RUN_FIELDS},
            "saes": [{k: s[k] for k in ("sae_id", "layer", "stream", "hook_name", "architecture", "d_sae")}
                     for s in runs.run_saes(catalog, run["run_key"])],
            "tokens": data["tokens"], "features": shown}


def stored_section(catalog: Catalog, run_id: str, options: dict | None = None) -> dict:
    """The report data of a stored run ranked (again) with ``options`` (ranking options only)."""
    return run_section(catalog, rerank(catalog, run_id, options or {}))
