"""Reports in the browser: one self-contained HTML file per run, batch or drift report (no network).

- ``data.py``: a run section's data — the response plus the catalog's tokens, activations, calibration
  histograms and labels (SQL in ``catalog/report.py``);
- ``html.py``: the markup (every user string escaped, data embedded as JSON that cannot close its block);
- ``assets.py``: the inline stylesheet and script.
"""

from __future__ import annotations

from pathlib import Path

from catalog.db import Catalog
from sae_discover.errors import RequestError
from sae_discover.report.data import run_section, stored_section
from sae_discover.report.html import drift_page, run_page


def write_html(text: str, out: str | Path) -> Path:
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RequestError("out", f"{path} cannot be written ({exc.strerror or exc})") from exc
    return path


def run_report(catalog: Catalog, result: dict) -> str:
    """The HTML report of one discovery / re-rank response."""
    return run_page([run_section(catalog, result)])


def batch_report(catalog: Catalog, results: list[dict]) -> str:
    """The HTML report of a batch's results (its JSONL lines: responses, or ``{"id", "error"}``)."""
    ok = [run_section(catalog, r) for r in results if "error" not in r]
    failed = [(str(r.get("id", "")), str(r["error"])) for r in results if "error" in r]
    return run_page(ok, failed)


def stored_report(catalog: Catalog, run_id: str, options: dict | None = None) -> str:
    """The HTML report of a stored run, ranked with ``options`` (ranking options; default: the defaults)."""
    return run_page([stored_section(catalog, run_id, options)])


__all__ = ["batch_report", "drift_page", "run_report", "stored_report", "write_html"]
