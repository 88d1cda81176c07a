"""One feature across the stored runs (``feature show``, ``GET /v1/features/{sae_id}/{layer}/{stream}/{feature_id}``):
the request's fields, checked once for both front doors, and the terminal view of the answer
(:func:`catalog.features.feature_view` has the SQL). Torch-free: it reads the catalog only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from catalog.db import Catalog
from catalog.features import feature_view
from ingest.options import Stream
from sae_discover.errors import RequestError
from sae_discover.request import ID_MAX_CHARS, INT32_MAX, MAX_LAYER, check_value, options

MAX_LIMIT = 100  # contexts and top runs listed


@dataclass
class FeatureQuery:
    """Which feature, and how many of its contexts and top runs to list."""

    sae_id: str = field(default="demo", metadata={"help": "the SAE source id as the catalog stores it", "flag": "--sae"})
    layer: int | None = field(default=None, metadata={"help": "the SAE's layer, required", "bounds": (0, MAX_LAYER)})
    stream: Stream = field(default="resid_pre", metadata={"help": "the SAE's stream"})
    feature_id: int | None = field(default=None, metadata={"help": "the feature id, required", "flag": "--feature",
                                                           "bounds": (0, INT32_MAX)})
    limit: int = field(default=10, metadata={"help": "top contexts and top runs listed", "bounds": (1, MAX_LIMIT)})
    model_id: str | None = field(default=None, metadata={
        "help": "whose calibration gives the statistics, histogram and lite label (default: the SAE's newest "
                "calibration, by any model — after a drift, perhaps the fine-tune's)", "flag": "--model"})


FEATURE_OPTIONS = options(FeatureQuery)
REQUIRED = ("layer", "feature_id")


def feature_query(values: dict[str, Any]) -> FeatureQuery:
    """The checked query (CLI strings converted); a missing layer or feature id is an error naming it."""
    out = {}
    for opt in FEATURE_OPTIONS:
        value = values.get(opt.name)
        if value is None:
            if opt.name in REQUIRED:
                raise RequestError(opt.name, f"required ({opt.flag})")
            out[opt.name] = opt.default
            continue
        if opt.kind == "id":
            if not isinstance(value, str) or not value or len(value) > ID_MAX_CHARS:
                raise RequestError(opt.name, f"expected an id of 1 to {ID_MAX_CHARS} characters, got {value!r}")
            out[opt.name] = value
        else:
            out[opt.name] = check_value(opt, value)
    return FeatureQuery(**out)


def show_feature(catalog: Catalog, values: dict[str, Any]) -> dict:
    """The feature view (:func:`catalog.features.feature_view`) of a checked query."""
    q = feature_query(values)
    return feature_view(catalog, q.sae_id, q.layer, q.stream, q.feature_id, limit=q.limit,  # type: ignore[arg-type]
                        model_id=q.model_id)


def _tokens(tokens: list[str] | None) -> str:
    return "(no lite label)" if tokens is None else ", ".join(repr(t) for t in tokens) or "-"


def feature_text(view: dict) -> str:
    """The feature view for the terminal: labels, calibration, decoder tokens, contexts, top runs."""
    lines = [f"feature {view['feature_id']} of {view['sae_id']} layer {view['layer']} {view['stream']}: "
             f"fired in {view['n_runs']} stored run(s)", "", "labels:"]
    lines += [f"  [{x['source']}" + ("" if x.get("calibration_id") is None else f", calibration {x['calibration_id']}")
              + f"] {x['label']}" + ("" if x["score"] is None else f" (score {x['score']:.3g})")
              for x in view["labels"]] or ["  (none)"]
    cal = view["calibration"]
    lines.append("")
    if cal is None:
        lines.append("calibration: none (python -m sae_discover calibrate)")
    else:
        lines.append(f"calibration {cal['calibration_id']} ({cal['model_id']} on {cal['corpus']}, {cal['n_tokens']} "
                     "tokens): "
                     f"density {cal['density']:.4g}  mean {cal['mean']:.4g}  max {cal['max']:.4g}  "
                     f"p95 {cal['p95']:.4g}  p95_all {cal['p95_all']:.4g}")
        peak = max([b["count"] for b in cal["buckets"]] + [1])
        lines += [f"  ({b['lo']:8.3f}, {b['hi']:8.3f}] {b['count']:7d} {'#' * round(30 * b['count'] / peak)}"
                  for b in cal["buckets"] if b["count"]]
        lines.append(f"  zeros {cal['zeros']}")
    lines += ["", f"fires on:   {_tokens(view['fires_on'])}", f"promotes:   {_tokens(view['promotes'])}",
              f"suppresses: {_tokens(view['suppresses'])}", "", "top contexts (peak per run, [[peak token]]):"]
    lines += [f"  {c['act']:8.3f}  {c['run_id'][:12]}  {c['marked']!r}"
              + (f"  {', '.join(f'{k}={v}' for k, v in c['tags'].items())}" if c["tags"] else "")
              for c in view["top_contexts"]] or ["  (none)"]
    lines += ["", f"runs where its mean is among the top {view['top_run_rank']} features of the SAE "
                  f"({view['n_top_runs']} in all):"]
    lines += [f"  #{r['rank']:<3d} mean {r['mean']:.4g}  max {r['max']:.4g}  {r['run_id'][:12]}"
              + (f"  {', '.join(f'{k}={v}' for k, v in r['tags'].items())}" if r["tags"] else "")
              for r in view["top_runs"]] or ["  (none)"]
    return "\n".join(lines) + "\n"
