"""The README's screenshots (on demand: ``.venv/bin/python tests/benchmarks/screenshots.py``): a run report and
a drift report on the demo, made in a fresh catalog and photographed in headless Chromium (the tests'
browser tooling, ``tests/browser.py``) as ``docs/report-run.png`` and ``docs/report-drift.png``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from catalog.db import Catalog
from sae_discover.drift import drift_report
from sae_discover.registry import Registry
from sae_discover.report import drift_page, run_report
from sae_discover.request import build_request
from sae_discover.service import Discovery
from tests.browser import open_browser

ROOT = Path(__file__).resolve().parents[2]

PROMPT = "Summarize Q2 earnings of ACME Corp and key KPIs."
FINANCE = ["ACME Corp reported second-quarter revenue of $4.2 billion, up 12% year over year, as margins widened.",
           "The central bank held rates steady and signalled two cuts later in the year as inflation cooled.",
           "Shares of Hooli fell 8% after the company cut its full-year guidance on weaker ad sales.",
           "Bond yields rose for a third week while investors weighed stronger payrolls against slowing retail sales."]


def shoot(html: str, out: Path, width: int, height: int, click_row: int | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html, encoding="utf-8")
        driver = open_browser(width, height)
        try:
            driver.get(page.as_uri())
            if click_row is not None:
                driver.execute_script(f"document.querySelectorAll('table.feats tbody tr')[{click_row}].click()")
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs"))
    ns = ap.parse_args()
    out = Path(ns.out)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(Path(tmp) / "shots.duckdb")
        disc = Discovery(catalog, Registry.builtin(), device="cpu")
        result = disc.discover(build_request({"model_id": "demo", "sae_id": "demo", "prompt": PROMPT, "generate": True,
                                              "gen_tokens": 40, "seed": 42, "return_top_x": 25}))
        shoot(run_report(catalog, result), out / "report-run.png", 1400, 1000, click_row=1)
        report = drift_report(disc, {"base": "demo", "tuned": "demo-finance", "sae_id": "demo", "top_k": 20,
                                     "prompts": [{"id": str(i + 1), "text": t} for i, t in enumerate(FINANCE)]})
        shoot(drift_page(report), out / "report-drift.png", 1400, 1000)
        catalog.close()
    print(f"wrote {out / 'report-run.png'} and {out / 'report-drift.png'}")


if __name__ == "__main__":
    main()
