"""Report benchmark (on demand: ``.venv/bin/python tests/benchmarks/bench_report.py``): the HTML report of
a 2,000-token text with 500 returned features — its file size, the time to build it, and the time headless
Chromium takes to reach DOMContentLoaded (and load) on it from disk, median of ``--repeat`` opens.

The section data is synthetic (no model: a report only renders what the catalog holds) but has a
report's shape and a busy run's density: every feature fires on 2-15% of the tokens, spans and a
calibration histogram and two labels per feature. Targets (issue 17): under 2 s and under 5 MB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from sae_discover.report.html import run_page
from tests.browser import open_browser

WORDS = ("revenue", " grew", " by", " 12", "%", " in", " the", " second", " quarter", ",", " while", " margins",
         " narrowed", " as", " costs", " rose", ".", "\n", " The", " board")


def section(n_tokens: int = 2000, n_features: int = 500, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = [{"position": i, "token_id": i % 400, "token": WORDS[i % len(WORDS)], "generated": i >= n_tokens - 200,
               "special": i == 0, "kept": i > 0} for i in range(n_tokens)]
    features, extra = [], []
    for rank in range(n_features):
        k = int(rng.integers(n_tokens // 50, n_tokens * 15 // 100))
        pos = np.sort(rng.choice(np.arange(1, n_tokens), size=k, replace=False))
        acts = rng.gamma(2.0, 0.6, size=k)
        peak = int(pos[int(np.argmax(acts))])
        features.append({"feature_id": int(rng.integers(0, 24576)), "layer": 8, "stream": "resid_pre",
                         "score": float(1 / (rank + 1)),
                         "scores": {"mean": float(acts.sum() / n_tokens), "coverage": k / n_tokens, "max": float(acts.max()),
                                    "selectivity": float(rng.normal(0.1, 0.05))},
                         "proto_label": f'fires on " revenue", " margins"; promotes " growth"; suppresses " losses" (#{rank})',
                         "top_spans": [{"text": "the second quarter, while margins", "position": [peak - 3, peak + 3],
                                        "act": float(acts.max()), "marked": "the second [[quarter]], while margins"}] * 3})
        extra.append({"p": [int(p) for p in pos], "a": [float(f"{a:.4g}") for a in acts], "t": None,
                      "h": {"calibration_id": 1, "max": 4.0, "p95": 2.5, "mean": 0.01, "density": 0.02,
                            "n_tokens": 100_000, "zeros": 98_000, "counts": [int(x) for x in rng.integers(0, 400, 24)]},
                      "l": [{"label": features[-1]["proto_label"], "source": "lite", "score": None},
                            {"label": "financial results", "source": "neuronpedia", "score": 0.8}],
                      "d": [" growth", " profit", " revenue", " sales", " gains"],
                      "s": [" losses", " decline", " fell", " weak", " cuts"]})
    text = "".join(t["token"] for t in tokens[1:])
    response = {"model_id": "bench", "sae_id": "bench", "run_id": "0" * 24, "cached": True,
                "analyzed": {"mode": "text", "tokens": n_tokens - 1, "layers": [8], "streams": ["resid_pre"],
                             "total_tokens": n_tokens, "text": text, "continuation": None},
                "score_mode": "mean×coverage", "threshold_source": "calibration_p95", "normalization": "calibration_max",
                "min_coverage_pct": 0.5, "merge_across_layers": True,
                "features": features, "warnings": []}
    return {"response": response, "run": {"prompt": None, "generate": False, "created_at": "2026-01-01",
                                          "timings": {"total_s": 1.0}},
            "saes": [{"sae_id": "bench", "layer": 8, "stream": "resid_pre", "hook_name": "blocks.8.hook_resid_pre",
                      "architecture": "standard", "d_sae": 24576}],
            "tokens": tokens, "features": extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--features", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    ns = ap.parse_args()
    data = section(ns.tokens, ns.features)
    t0 = time.perf_counter()
    text = run_page([data])
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.html"
        path.write_text(text, encoding="utf-8")
        driver = open_browser()
        try:
            dcl, load, select = [], [], []
            for _ in range(ns.repeat):
                driver.get("about:blank")
                driver.get(path.as_uri())
                nav = driver.execute_script("const n = performance.getEntriesByType('navigation')[0]; "
                                            "return [n.domContentLoadedEventEnd, n.loadEventEnd];")
                dcl.append(nav[0] / 1000)
                load.append(nav[1] / 1000)
                select.append(driver.execute_script(
                    "const r = document.querySelectorAll('table.feats tbody tr')[250]; const t = performance.now(); "
                    "r.click(); return (performance.now() - t) / 1000;"))
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        finally:
            driver.quit()
    print(json.dumps({"tokens": ns.tokens, "features": ns.features, "bytes": len(text.encode()),
                      "mb": round(len(text.encode()) / 1e6, 2), "build_s": round(build_s, 3),
                      "dom_content_loaded_s": round(statistics.median(dcl), 3), "load_s": round(statistics.median(load), 3),
                      "select_feature_s": round(statistics.median(select), 4), "console_errors": len(errors)}, indent=2))


if __name__ == "__main__":
    main()
