"""Outputs: the seed's JSON, its CSV columns, and a readable table for the terminal."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

CSV_COLUMNS = ["feature_id", "layer", "stream", "score", "mean", "coverage", "max", "selectivity", "proto_label",
               "top_span_text"]


def csv_rows(result: dict) -> list[dict]:
    rows = []
    for f in result["features"]:
        spans = f.get("top_spans") or []
        rows.append({"feature_id": f["feature_id"], "layer": f["layer"], "stream": f["stream"], "score": f["score"],
                     "mean": f["scores"]["mean"], "coverage": f["scores"]["coverage"], "max": f["scores"]["max"],
                     "selectivity": "" if f["scores"]["selectivity"] is None else f["scores"]["selectivity"],
                     "proto_label": f.get("proto_label") or "", "top_span_text": spans[0]["text"] if spans else ""})
    return rows


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buf.getvalue()


def write_file(result: dict, out: str | Path, fmt: str | None, csv_of: Callable[[dict], str]) -> Path:
    """Write a result as JSON or as ``csv_of(result)`` (by ``fmt``, else by the file's extension)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "json")
    text = csv_of(result) if fmt == "csv" else json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"
    path.write_text(text)
    return path


def write_result(result: dict, out: str | Path, fmt: str | None = None) -> Path:
    """Write one discovery result as JSON or CSV."""
    return write_file(result, out, fmt, to_csv)


def clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(result: dict) -> str:
    """A plain aligned table of the ranked features, for stdout."""
    a = result["analyzed"]
    head = (f"{result['model_id']} · {result['sae_id']} · {a['mode']} · {a['tokens']} analyzed tokens "
            f"(of {a['total_tokens']}) · layers {a['layers']} · score {result['score_mode']} · "
            f"τ {result['threshold_source']} · {'cached' if result['cached'] else 'new run'} {result['run_id']}")
    lines = [head]
    cols = ["#", "feature", "layer", "stream", "score", "mean", "cover", "max", "select", "proto_label / top span"]
    rows = []
    for i, f in enumerate(result["features"], 1):
        s = f["scores"]
        spans = f.get("top_spans") or []
        label = f.get("proto_label") or ""
        span = spans[0]["text"] if spans else ""
        rows.append([str(i), str(f["feature_id"]), str(f["layer"]), f["stream"], f"{f['score']:.4f}",
                     f"{s['mean']:.4f}", f"{s['coverage']:.3f}", f"{s['max']:.3f}",
                     "-" if s["selectivity"] is None else f"{s['selectivity']:.4f}",
                     clip(" | ".join(x for x in (label, repr(span) if span else "") if x), 70)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    if not rows:
        lines.append("(no feature passed the gates; lower --min_coverage_pct or raise --topk_tokens_per_seq)")
    for w in result.get("warnings", []):
        lines.append(f"note: {w}")
    return "\n".join(lines)
