"""A drift report as JSON, CSV (one row per feature of the union of both top-K) and a terminal table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from sae_discover.output import clip, normalization_note, write_file

CSV_COLUMNS = ["feature_id", "layer", "stream", "flag", "score_base", "score_tuned", "score_change", "rank_base",
               "rank_tuned", "rank_change", "in_top_k_base", "in_top_k_tuned", "prompts_base", "prompts_tuned",
               "proto_label"]


def to_csv(report: dict) -> str:
    """One row per feature of the union of both top-K (the flagged ones included)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for f in report["features"]:
        writer.writerow({k: "" if f[k] is None else f[k] for k in CSV_COLUMNS})
    return buf.getvalue()


def write_report(report: dict, out: str | Path, fmt: str | None = None) -> Path:
    """Write a report as JSON or CSV (by ``fmt``, else by the file's extension)."""
    return write_file(report, out, fmt, to_csv)


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _grid(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()] + \
           ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _calibrations(report: dict) -> str:
    ids = report.get("calibration_ids") or []
    return f" (calibration{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))})" if ids else ""


def table(report: dict, max_rows: int = 20) -> str:
    """A readable report for the terminal: summary, per-prompt figures, flagged features."""
    o, k = report["overall"], report["top_k"]
    hooks = ", ".join(f"L{layer} {stream}" for layer, stream in report["hooks"])
    base = report["base"]["model_id"] or "/".join(report["base"]["model_ids"])
    tuned = report["tuned"]["model_id"] or "/".join(report["tuned"]["model_ids"])
    lines = [f"drift · base {base} → tuned {tuned} · SAE {report['sae_id']} ({hooks}) · score {report['score_mode']}"
             f"{normalization_note(report)} · "
             f"τ {report['threshold_source']}{_calibrations(report)} · K={k}",
             f"overall, {o['n_prompts']} prompt(s): Jaccard@{k} {_num(o['jaccard'])} · Spearman (top-{k} union, "
             f"{o['n_top_union']} features) {_num(o['spearman'])} · Spearman (all {o['n_features_base']}→"
             f"{o['n_features_tuned']} features) {_num(o['spearman_all'])} · gained {o['n_gained']} · lost {o['n_lost']} · "
             f"shifted {o['n_shifted']}"]
    if report.get("ingested"):
        lines.append(f"runs: {report['ingested']['new_runs']} new, {report['ingested']['cached_runs']} cached")
    lines += ["", "per prompt"]
    lines += _grid(["#", "id", f"jaccard@{k}", "spearman", "gained", "lost", "shifted", "prompt / text"],
                   [[str(p["index"]), str(p["id"] or ""), _num(p["jaccard"]), _num(p["spearman"]), str(p["n_gained"]),
                     str(p["n_lost"]), str(p["n_shifted"]), clip(p.get("text") or p.get("prompt"), 60)]
                    for p in report["prompts"]])
    t = report["thresholds"]
    titles = {"gained": f"gained (in the tuned top-{k}, not the base top-{k}; score up ≥ "
                        f"{t['min_relative_change']:g}× the larger score, by > {t['min_score_change']:g})",
              "lost": f"lost (in the base top-{k}, not the tuned top-{k}; score down by the same rule)",
              "shifted": f"shifted (in both top-{k}; |rank change| ≥ {t['min_rank_shift']})"}
    for name, title in titles.items():
        flagged = report["flagged"][name]
        lines += ["", f"{title}: {len(flagged)}"]
        if not flagged:
            continue
        rows = [[str(f["feature_id"]), str(f["layer"]), f["stream"],
                 f"{f['rank_base'] or '-'} → {f['rank_tuned'] or '-'}",
                 f"{f['score_base']:.4f} → {f['score_tuned']:.4f}", f"{f['score_change']:+.4f}",
                 f"{f['prompts_base']}/{f['prompts_tuned']}", clip(f["proto_label"] or "", 50)]
                for f in flagged[:max_rows]]
        lines += _grid(["feature", "layer", "stream", "rank base → tuned", "score base → tuned", "Δscore",
                        "prompts b/t", "proto_label"], rows)
        if len(flagged) > max_rows:
            lines.append(f"  … {len(flagged) - max_rows} more (see --out)")
    if not o["n_features_base"] and not o["n_features_tuned"]:
        lines.append("nothing to compare: no feature passed the coverage gate on either side")
    elif not any(report["flagged"].values()):
        lines.append("nothing flagged: the two rankings agree within the thresholds")
    for w in report.get("warnings", []):
        lines.append(f"note: {w}")
    return "\n".join(lines)
