"""Drift reports: which SAE features a fine-tune gained, lost or reweighted (base vs tuned, same SAE, same prompts).

- ``request.py``: what a report needs (:class:`DriftRequest`: the scoring and drift thresholds of
  ``catalog.drift.DriftOptions`` plus what to compare), validated by :func:`build_drift_request`;
- ``report.py``: :func:`drift_report` — make or reuse the runs, then SQL over them (``catalog/drift.py``
  states every definition);
- ``output.py``: the report as JSON, CSV and a terminal table.
"""

from sae_discover.drift.output import table, to_csv, write_report
from sae_discover.drift.report import drift_report
from sae_discover.drift.request import DriftRequest, build_drift_request

__all__ = ["DriftRequest", "build_drift_request", "drift_report", "table", "to_csv", "write_report"]
