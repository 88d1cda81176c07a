"""Outputs: the seed's JSON, its CSV columns, and a readable table for the terminal."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path

from sae_discover.errors import RequestError

CSV_COLUMNS = ["feature_id", "layer", "stream", "score", "mean", "coverage", "max", "selectivity", "attribution",
               "ablation_delta", "proto_label", "top_span_text"]


def csv_rows(result: dict) -> list[dict]:
    rows = []
    for f in result["features"]:
        spans = f.get("top_spans") or []
        rows.append({"feature_id": f["feature_id"], "layer": f["layer"], "stream": f["stream"], "score": f["score"],
                     "mean": f["scores"]["mean"], "coverage": f["scores"]["coverage"], "max": f["scores"]["max"],
                     "selectivity": "" if f["scores"]["selectivity"] is None else f["scores"]["selectivity"],
                     "attribution": f["scores"].get("attribution", ""),
                     "ablation_delta": f.get("ablation_delta", ""),  # verify_top: its measured change of M
                     "proto_label": f.get("proto_label") or "", "top_span_text": spans[0]["text"] if spans else ""})
    return rows


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(result))
    return buf.getvalue()


def out_format(out: str | Path | None, fmt: str | None, allowed: tuple[str, ...] = ("json", "csv")) -> str | None:
    """The format a result is written in: ``fmt`` when given, else the extension of ``out``. An
    extension that names no allowed format (``x.txt``), or one that contradicts ``fmt``, is refused
    naming the field — checked before any work, so nothing runs for a file that would not be written."""
    if fmt is not None and fmt not in allowed:
        raise RequestError("format", f"expected one of {', '.join(allowed)}, got {fmt!r}")
    if out is None:
        return fmt
    ext = Path(out).suffix.lower().lstrip(".")
    if ext not in allowed:
        raise RequestError("out", f"expected a file ending in {', '.join('.' + a for a in allowed)}, got {str(out)!r}")
    if fmt is not None and fmt != ext:
        raise RequestError("format", f"{fmt} contradicts the extension of --out {str(out)!r}")
    check_writable(out)
    return ext


def check_writable(out: str | Path) -> None:
    """Refuse (naming ``out``) a path that could not be written — a directory, a folder that cannot be
    made, no permission — by trying: a probe file (or folder) made next to it and removed at once, so
    a command fails before it computes and stores anything, and leaves nothing behind."""
    path = Path(out)
    if path.is_dir():
        raise RequestError("out", f"{path} is a directory; give a file name")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == Path(p.anchor))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        if existing == path.parent:
            with tempfile.TemporaryFile(dir=existing):
                pass
        else:  # the folders --out needs would be made inside ``existing``
            os.rmdir(tempfile.mkdtemp(dir=existing))
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as exc:
        raise RequestError("out", f"{path} cannot be written ({exc.strerror or exc})") from exc


def render(result: dict | list[dict], fmt: str | None, csv_of: Callable[..., str]) -> str:
    """A result's text as ``csv_of(result)`` for ``fmt`` csv, else as indented JSON."""
    return csv_of(result) if fmt == "csv" else json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n"


def write_file(result: dict | list[dict], out: str | Path, fmt: str | None, csv_of: Callable[..., str]) -> Path:
    """Write a result as JSON or as ``csv_of(result)`` (by ``fmt``, else by the file's extension)."""
    path = Path(out)
    text = render(result, out_format(path, fmt), csv_of)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:  # e.g. the disk filled up since the check before the work
        raise RequestError("out", f"{path} cannot be written ({exc.strerror or exc})") from exc
    return path


def write_result(result: dict, out: str | Path, fmt: str | None = None) -> Path:
    """Write one discovery result as JSON or CSV. The CSV keeps exactly the seed's columns, so what was
    analyzed (run id, text, generated continuation) goes to a side file, ``<out>.analyzed.json``."""
    path = write_file(result, out, fmt, to_csv)
    if out_format(path, fmt) == "csv":
        _write_analyzed(path, _analyzed(result))
    return path


def results_csv(results: list[dict]) -> str:
    """Several results in one CSV: a ``run_id`` column, then the seed's columns."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run_id", *CSV_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerows({"run_id": result["run_id"], **row} for row in csv_rows(result))
    return buf.getvalue()


def write_results(results: list[dict], out: str | Path, fmt: str | None = None) -> Path:
    """Write several results (``runs rank`` over several runs) as a JSON list, or as one CSV
    (:func:`results_csv`) with what each run analyzed in ``<out>.analyzed.json``, a list."""
    path = write_file(results, out, fmt, results_csv)
    if out_format(path, fmt) == "csv":
        _write_analyzed(path, [_analyzed(r) for r in results])
    return path


def _analyzed(result: dict) -> dict:
    a = result["analyzed"]
    return {"run_id": result["run_id"], "mode": a["mode"], "text": a.get("text"), "continuation": a.get("continuation")}


def _write_analyzed(csv_path: Path, analyzed: dict | list[dict]) -> None:
    """The CSV's side file: what was analyzed (run id, text, generated continuation)."""
    side = csv_path.with_name(csv_path.name + ".analyzed.json")
    side.write_text(json.dumps(analyzed, indent=2, ensure_ascii=False) + "\n")


# characters a terminal acts on rather than shows: C0/C1 controls (ESC sequences clear the screen or set
# the title) and the bidirectional overrides that reorder what is printed after them
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _shown(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc" or ch in BIDI_CONTROLS \
        else ch


def clip(text: str, width: int) -> str:
    """``text`` on one line for the terminal, cut at ``width`` characters; control and bidi-override
    characters (from a label file, a prompt) shown escaped, never acted on."""
    text = "".join(_shown(ch) for ch in " ".join(str(text).split()))
    return text if len(text) <= width else text[: width - 1] + "…"


SPAN_WIDTH, LABEL_WIDTH = 48, 40  # the last column: the top span (peak in [[ ]]) first, then the label


def _evidence(f: dict) -> str:
    """The top span (kept whole up to SPAN_WIDTH) and the label (truncated first), for the last column."""
    spans = f.get("top_spans") or []
    span = clip(repr(spans[0].get("marked", spans[0]["text"])), SPAN_WIDTH) if spans else ""
    label = clip(f.get("proto_label") or "", LABEL_WIDTH)
    return " | ".join(x for x in (span, label) if x)


def _feature_rows(features: list[dict], first: int, attributed: bool = False) -> list[list[str]]:
    """One table row per feature; with ``attributed`` the attribution (and the measured ablation delta,
    where verify_top measured one) after the selectivity."""
    rows = []
    for i, f in enumerate(features, first):
        s = f["scores"]
        used = [f"{s['attribution']:+.4f}", f"{f['ablation_delta']:+.4f}" if "ablation_delta" in f else "-"] \
            if attributed else []
        rows.append([str(i), str(f["feature_id"]), str(f["layer"]), f["stream"], f"{f['score']:.4f}",
                     f"{s['mean']:.4f}", f"{100 * s['coverage']:.1f}", f"{s['max']:.3f}",
                     "-" if s["selectivity"] is None else f"{s['selectivity']:.4f}", *used, _evidence(f)])
    return rows


def verification_lines(v: dict) -> list[str]:
    """The verify_top summary under the table."""
    corr = lambda x: "n/a" if x is None else f"{x:+.3f}"  # noqa: E731
    return [f"verified ({v['target']}, M = {v['metric']:.4f}): {len(v['pairs'])} features ablated · "
            f"pearson(−attribution, Δ) {corr(v['pearson'])} · spearman {corr(v['spearman'])} · "
            f"mean |Δ| {v['mean_abs_delta']:.4f} vs {v['mean_abs_delta_top_mean']:.4f} for the top "
            f"{len(v['pairs'])} by mean activation"]


def normalization_note(result: dict) -> str:
    """The header's note on what the scores were divided by, unless it is the default per-feature
    calibration max: a per-SAE or raw score reads on another scale."""
    norm = result.get("normalization")
    return "" if norm in (None, "calibration_max") else f" (normalization {norm})"


def table(result: dict, by_hook: bool = False) -> str:
    """A plain aligned table of the ranked features, for stdout, under a header saying what was
    analyzed. ``by_hook`` (``merge_across_layers false``): one block per (layer, stream), each with
    its heading. Coverage is a percent, as ``min_coverage_pct`` is."""
    a = result["analyzed"]
    lines = [f"{result['model_id']} · {result['sae_id']} · {a['mode']} · {a['tokens']} analyzed tokens "
             f"(of {a['total_tokens']}) · layers {a['layers']} · score {result['score_mode']}{normalization_note(result)} · "
             f"τ {result['threshold_source']} · {'cached' if result['cached'] else 'new run'} {result['run_id']}"]
    if a.get("text"):
        lines.append(f"analyzed: {clip(json.dumps(a['text'], ensure_ascii=False), 160)}")
    if a.get("continuation") is not None:
        lines.append(f"generated: {clip(json.dumps(a['continuation'], ensure_ascii=False), 160)}")
    attributed = any("attribution" in f["scores"] for f in result["features"])
    cols = ["#", "feature", "layer", "stream", "score", "mean", "cover%", "max", "select",
            *(["attrib", "ablate Δ"] if attributed else []), "top span [[peak]] | label"]
    groups: dict[tuple, list[dict]] = {}
    for f in result["features"]:
        groups.setdefault((f["layer"], f["stream"]) if by_hook else (), []).append(f)
    blocks, first = [], 1
    for hook, members in groups.items():
        blocks.append((hook, _feature_rows(members, 1 if by_hook else first, attributed)))
        first += len(members)
    rows = [r for _, block in blocks for r in block]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for hook, block in blocks:
        if hook:
            lines.append(f"-- layer {hook[0]} · {hook[1]} --")
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in block]
    if not rows:
        lines.append("(no feature passed the gates; lower --min_coverage_pct or raise --topk_tokens_per_seq)")
    if result.get("verification"):
        lines += verification_lines(result["verification"])
    for w in result.get("warnings", []):
        lines.append(f"note: {w}")
    return "\n".join(lines)


def tables(results: list[dict], by_hook: bool = False) -> str:
    """Several results as :func:`table` does one, a blank line between them."""
    return "\n\n".join(table(r, by_hook) for r in results) if results else "(no runs)"


# -- stored runs (``runs list``) ------------------------------------------------------------------

RUN_COLUMNS = ["run_id", "model_id", "sae_id", "mode", "layers", "streams", "n_kept", "n_tokens", "created_at", "input"]


def _run_cells(run: dict) -> dict:
    """A listed run's cells: lists joined with spaces, ``input`` the prompt (or the text) it was made from."""
    return {**{c: run.get(c) for c in RUN_COLUMNS}, "layers": " ".join(map(str, run["layers"])),
            "streams": " ".join(run["streams"]), "input": run["prompt"] if run["prompt"] is not None else run["text"]}


def runs_csv(page: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RUN_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_run_cells(r) for r in page["runs"])
    return buf.getvalue()


def runs_table(page: dict) -> str:
    """The listed runs as an aligned table with a header row, and how many more match."""
    rows = [[str(c["run_id"]), c["model_id"], c["sae_id"], c["mode"], c["layers"], c["streams"], str(c["n_kept"]),
             str(c["n_tokens"]), str(c["created_at"])[:19], clip(json.dumps(c["input"], ensure_ascii=False), 60)]
            for c in map(_run_cells, page["runs"])]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(RUN_COLUMNS)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [RUN_COLUMNS, *rows]]
    shown = page["offset"] + len(rows)
    lines.append(f"({len(rows)} of {page['total']} runs" + (f"; --offset {shown} for more)" if shown < page["total"]
                                                            else ")"))
    return "\n".join(lines)


def write_runs(page: dict, out: str | Path, fmt: str | None = None) -> Path:
    """A runs listing as JSON (the API's page), CSV (one row per run) or JSONL (one run per line)."""
    path = Path(out)
    fmt = out_format(path, fmt, ("json", "csv", "jsonl"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_runs(page, fmt))
    return path


def render_runs(page: dict, fmt: str | None) -> str:
    """A runs listing in ``fmt`` (json, csv, jsonl), or the table when None."""
    if fmt == "csv":
        return runs_csv(page)
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in page["runs"])
    if fmt == "json":
        return json.dumps(page, indent=2, ensure_ascii=False, default=str) + "\n"
    return runs_table(page) + "\n"
