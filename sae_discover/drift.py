"""Drift reports: which SAE features a fine-tune gained, lost or reweighted (base vs tuned, same SAE, same prompts).

Two ways in, one request model (:class:`DriftRequest`, validated by :func:`build_drift_request`):

- ``base`` + ``tuned`` + ``prompts``: each prompt × model goes through :meth:`Discovery.discover`
  (runs already in the catalog are reused, ``cached``), then the stored runs are compared;
- ``base_runs`` + ``tuned_runs``: historical runs only — a list of run ids, or a SQL filter over
  ``v_runs`` (a string) — without loading any model.

The figures are SQL over the stored runs (``catalog/drift.py`` states every definition); this module
validates, ingests, and shapes the result as JSON, CSV and a terminal table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from catalog import drift as catalog_drift
from catalog.db import Catalog
from sae_discover.request import (
    FLOAT_BOUNDS,
    INT32_MAX,
    INT_BOUNDS,
    RequestError,
    build_request,
    known_values,
    parse_layers,
    parse_score_mode,
    parse_streams,
    set_ids,
    set_proxy_and_tau,
    set_scalars,
)

# per-prompt options that fix a run (passed on to discovery); a prompts item may override them
RUN_FIELDS = ("generate", "gen_tokens", "seed", "temperature", "top_p", "topk_tokens_per_seq", "token_proxy")
RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")


@dataclass
class DriftRequest(catalog_drift.DriftOptions):
    """What a drift report needs: the scoring and drift thresholds (:class:`DriftOptions`, declared once
    in catalog) plus what to compare; defaults as documented in the README ("Drift reports")."""

    base: str | None = None  # model ids (registry id, or a path/hub id from the CLI)
    tuned: str | None = None
    sae_id: str | None = None  # None → "demo" with prompts; the runs' own SAE source with base_runs/tuned_runs
    prompts: list[dict] | None = None  # [{"prompt": ...} | {"text": ...}, optional "id" and run options]
    base_runs: list[str] | str | None = None  # run ids, or a SQL filter over v_runs
    tuned_runs: list[str] | str | None = None
    layers: list[int] | None = None  # None → the base model's default layers (prompts) / every shared hook (runs)
    streams: list[str] | None = None  # None → ["resid_pre"] (prompts) / every shared hook (runs)
    # run options for the prompts (None → discovery's defaults)
    generate: bool | None = None
    gen_tokens: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    topk_tokens_per_seq: int | None = None
    token_proxy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DRIFT_FIELDS = tuple(f.name for f in fields(DriftRequest))
DRIFT_FLOAT_BOUNDS = {"min_coverage_pct": (0.0, 100.0), "tau": FLOAT_BOUNDS["tau"],
                      "tau_quantile": FLOAT_BOUNDS["tau_quantile"], "min_score_change": (0.0, 1e30),
                      "min_relative_change": (0.0, 2.0), "temperature": FLOAT_BOUNDS["temperature"],
                      "top_p": FLOAT_BOUNDS["top_p"]}
DRIFT_INT_BOUNDS = {"top_k": (1, 100_000), "min_rank_shift": (1, INT32_MAX), "gen_tokens": INT_BOUNDS["gen_tokens"],
                    "seed": INT_BOUNDS["seed"], "topk_tokens_per_seq": INT_BOUNDS["topk_tokens_per_seq"]}


def _runs_spec(name: str, value: Any) -> list[str] | str:
    if isinstance(value, str):
        if not value.strip():
            raise RequestError(name, "expected run ids or a SQL filter over v_runs, got an empty string")
        if len(value) > 10_000:
            raise RequestError(name, "the SQL filter is longer than 10000 characters")
        return value.strip()
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v.strip() for v in value):
        if len(value) > 100_000:
            raise RequestError(name, f"expected at most 100000 run ids, got {len(value)}")
        return [v.strip() for v in value]
    raise RequestError(name, f"expected a list of run ids or a SQL filter string over v_runs, got {value!r}")


def build_drift_request(data: dict[str, Any], max_prompts: int = 1000, max_text_chars: int = 200_000,
                        max_layers: int = 64) -> DriftRequest:
    """Validate a mapping (CLI namespace, JSON body) into a :class:`DriftRequest`; unknown keys are refused."""
    if not isinstance(data, dict):
        raise RequestError("body", "expected an object")
    values = known_values(data, DRIFT_FIELDS)
    req = DriftRequest()
    set_ids(req, values, ("base", "tuned", "sae_id"))
    for name in ("base_runs", "tuned_runs"):
        if name in values:
            setattr(req, name, _runs_spec(name, values[name]))
    if "prompts" in values:
        items = values["prompts"]
        if not isinstance(items, list | tuple) or not items:
            raise RequestError("prompts", "expected a non-empty list of objects with prompt or text")
        if len(items) > max_prompts:
            raise RequestError("prompts", f"expected at most {max_prompts} prompts, got {len(items)}")
        allowed = {"prompt", "text", "id", *RUN_FIELDS}
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestError("prompts", f"item {i}: expected an object with prompt or text, got {item!r}")
            bad = sorted(set(item) - allowed)
            if bad:
                raise RequestError("prompts", f"item {i}: unknown key {bad[0]!r}; an item takes prompt or text, id, "
                                              f"and run options ({', '.join(RUN_FIELDS)})")
        req.prompts = [dict(item) for item in items]
    by_model, by_runs = req.base is not None or req.tuned is not None or req.prompts is not None, \
        req.base_runs is not None or req.tuned_runs is not None
    if by_model and by_runs:
        raise RequestError("base_runs", "give either base + tuned + prompts (runs are made or reused), or "
                                        "base_runs + tuned_runs (stored runs only), not both")
    if by_runs:
        for name in ("base_runs", "tuned_runs"):
            if getattr(req, name) is None:
                raise RequestError(name, "give both base_runs and tuned_runs (run ids, or a SQL filter over v_runs)")
    else:
        for name in ("base", "tuned", "prompts"):
            if getattr(req, name) is None:
                raise RequestError(name, "missing: a drift report needs base and tuned models and prompts "
                                         "(or base_runs and tuned_runs)")
    set_scalars(req, values, ("attach_proto_labels", "generate"), DRIFT_INT_BOUNDS, DRIFT_FLOAT_BOUNDS)
    if "score_mode" in values:
        req.score_mode = parse_score_mode(values["score_mode"])
    if "layers" in values:
        req.layers = parse_layers(values["layers"], max_layers)
    if "streams" in values:
        req.streams = parse_streams(values["streams"])
    set_proxy_and_tau(req, values)
    if req.prompts is not None:  # each item must make a valid discovery request (checked before any model runs)
        list(_discover_requests(req, req.base or "", req.layers or [0], req.streams, max_text_chars, max_layers))
    return req


def _discover_requests(req: DriftRequest, model_id: str, layers: list[int], streams: list[str] | None,
                       max_text_chars: int = 200_000, max_layers: int = 64):
    """One discovery request per prompts item for ``model_id`` (ranking kept minimal: only the run matters)."""
    shared = {name: getattr(req, name) for name in RUN_FIELDS if getattr(req, name) is not None}
    for i, item in enumerate(req.prompts or []):
        fields_ = {**shared, **{k: v for k, v in item.items() if k != "id"}, "model_id": model_id,
                   "sae_id": req.sae_id or "demo", "layers": layers, "streams": streams, "score_mode": "mean",
                   "min_coverage_pct": 0, "return_top_x": 1, "attach_examples": False, "attach_proto_labels": False}
        if "id" in item:
            fields_["id"] = str(item["id"])
        try:
            yield build_request(fields_, max_text_chars, max_layers)
        except RequestError as exc:
            label = f"item {i}" + (f" (id {item['id']!r})" if "id" in item else "")
            raise RequestError("prompts", f"{label}: {exc}") from exc


def _as_request(request: DriftRequest | dict | None, extra: dict) -> DriftRequest:
    if isinstance(request, DriftRequest):
        request = {k: v for k, v in request.to_dict().items() if v is not None}
    return build_drift_request({**(request or {}), **extra})


def drift_report(source, request: DriftRequest | dict | None = None, *, progress: bool = False,
                 allow_sql_filter: bool = True, **fields_: Any) -> dict:
    """A drift report (a JSON-ready dict) for ``request`` (a :class:`DriftRequest`, a mapping, or keywords).

    ``source`` is a :class:`~sae_discover.service.Discovery` (needed to make missing runs), or a bare
    :class:`~catalog.db.Catalog` for ``base_runs``/``tuned_runs`` reports. ``allow_sql_filter=False``
    refuses SQL filters (run ids only), e.g. for a server exposed to untrusted clients.
    """
    t0 = time.perf_counter()
    req = _as_request(request, fields_)
    catalog: Catalog = getattr(source, "catalog", source)
    warnings: list[str] = []
    ingested = None
    line_ids: dict[str, str] = {}
    try:
        if req.prompts is not None:
            if not hasattr(source, "discover"):
                raise RequestError("prompts", "making runs needs a model: use base_runs/tuned_runs with a bare catalog")
            base_ids, tuned_ids, ingested, line_ids, layers, streams = _ingest(source, req, progress)
            base_rows = catalog_drift.runs_by_ids(catalog, base_ids, "base")
            tuned_rows = catalog_drift.runs_by_ids(catalog, tuned_ids, "tuned")
        else:
            layers, streams = req.layers, req.streams
            base_rows = _select(catalog, "base_runs", req.base_runs, allow_sql_filter)
            tuned_rows = _select(catalog, "tuned_runs", req.tuned_runs, allow_sql_filter)
        saes = catalog_drift.common_saes(catalog, base_rows + tuned_rows, layers, streams, req.sae_id)
        t_sql = time.perf_counter()
        opts = catalog_drift.DriftOptions(**{f.name: getattr(req, f.name) for f in fields(catalog_drift.DriftOptions)})
        out = catalog_drift.drift(catalog, [r["run_key"] for r in base_rows], [r["run_key"] for r in tuned_rows],
                                  [s["sae_key"] for s in saes], opts)
    except RequestError:
        raise
    except ValueError as exc:  # CatalogError and friends name their field
        raise RequestError.of(exc, "drift") from exc
    timings = {"drift_sql_s": time.perf_counter() - t_sql}
    if out["threshold_source"] == "none":
        warnings.append("no calibration for this SAE: τ = 0 (active means act > 0) and scores are not normalized; "
                        "run `python -m sae_discover calibrate` to fix both")
    for u in out["unpaired"]:
        warnings.append(f"{u['side']} run {u['run_id']} has no counterpart on the other side "
                        f"({u['mode']} {_clip(u['content'], 40)!r}); left out")
    models = {side: sorted({r["model_id"] for r in rows}) for side, rows in (("base", base_rows), ("tuned", tuned_rows))}
    timings["total_s"] = time.perf_counter() - t0
    return {
        "base": {"model_id": req.base or (models["base"][0] if len(models["base"]) == 1 else None),
                 "model_ids": models["base"], "run_ids": [r["run_id"] for r in base_rows]},
        "tuned": {"model_id": req.tuned or (models["tuned"][0] if len(models["tuned"]) == 1 else None),
                  "model_ids": models["tuned"], "run_ids": [r["run_id"] for r in tuned_rows]},
        "sae_id": base_rows[0]["sae_id"], "hooks": [[s["layer"], s["stream"]] for s in saes],
        "score_mode": req.score_mode, "min_coverage_pct": req.min_coverage_pct,
        "threshold_source": out["threshold_source"], "normalization": out["normalization"], "top_k": req.top_k,
        "thresholds": {"min_score_change": req.min_score_change, "min_relative_change": req.min_relative_change,
                       "min_rank_shift": opts.rank_shift()},
        "overall": out["overall"],
        "prompts": [_prompt_json(p, line_ids) for p in out["prompts"]],
        "features": [_feature_json(f) for f in out["features"]],
        "flagged": {k: [_feature_json(f) for f in v] for k, v in out["flagged"].items()},
        "unpaired": [{"side": u["side"], "run_id": u["run_id"], "mode": u["mode"]} for u in out["unpaired"]],
        "ingested": ingested, "warnings": warnings, "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def _select(catalog: Catalog, name: str, spec: list[str] | str, allow_sql_filter: bool) -> list[dict]:
    if isinstance(spec, list):
        return catalog_drift.runs_by_ids(catalog, spec, name)
    if not allow_sql_filter:
        raise RequestError(name, "SQL filters are disabled here; give a list of run ids")
    return catalog_drift.runs_where(catalog, spec, name)


def _ingest(discovery, req: DriftRequest, progress: bool):
    """Make (or reuse) the run of every prompt × model; returns the run ids in prompt order."""
    from tqdm import tqdm

    entries = {}
    for side, model in (("base", req.base), ("tuned", req.tuned)):
        try:
            entries[side] = discovery.registry.model(model, discovery.allow_paths)
        except RequestError as exc:
            raise RequestError(side, str(exc).split(": ", 1)[-1]) from exc
    layers = req.layers or list(entries["base"].default_layers)
    streams = req.streams or ["resid_pre"]
    plans = {side: list(_discover_requests(req, model, layers, streams))
             for side, model in (("base", req.base), ("tuned", req.tuned))}
    ids: dict[str, list[str]] = {"base": [], "tuned": []}
    line_ids: dict[str, str] = {}
    counts = {"new_runs": 0, "cached_runs": 0}
    with tqdm(total=2 * len(req.prompts or []), desc="drift", unit="run", file=sys.stderr,
              disable=not progress) as bar:
        for i in range(len(req.prompts or [])):
            for side in ("base", "tuned"):
                result = discovery.discover(plans[side][i])
                counts["cached_runs" if result["cached"] else "new_runs"] += 1
                ids[side].append(result["run_id"])
                bar.update(1)
            item = (req.prompts or [])[i]
            line_ids.setdefault(ids["base"][-1], str(item.get("id", i + 1)))
    return ids["base"], ids["tuned"], counts, line_ids, layers, streams


def _prompt_json(p: dict, line_ids: dict[str, str]) -> dict:
    key = "text" if p["is_text"] else "prompt"
    return {"index": int(p["scope"]), "id": next((line_ids[r] for r in p["base_run_ids"] if r in line_ids), None),
            "mode": p["mode"], key: p["content"], "base_run_ids": p["base_run_ids"], "tuned_run_ids": p["tuned_run_ids"],
            **{k: p[k] for k in ("jaccard", "spearman", "spearman_all", "n_features_base", "n_features_tuned",
                                 "n_top_both", "n_top_union", "n_gained", "n_lost", "n_shifted")}}


def _feature_json(f: dict) -> dict:
    return {"feature_id": int(f["feature_id"]), "layer": int(f["layer"]), "stream": f["stream"], "flag": f["flag"],
            "score_base": f["score_base"], "score_tuned": f["score_tuned"], "score_change": f["score_change"],
            "rank_base": f["rank_base"], "rank_tuned": f["rank_tuned"], "rank_change": f["rank_change"],
            "in_top_k_base": bool(f["top_base"]), "in_top_k_tuned": bool(f["top_tuned"]),
            "prompts_base": int(f["prompts_base"]), "prompts_tuned": int(f["prompts_tuned"]),
            "proto_label": f["proto_label"]}


# -- outputs --------------------------------------------------------------------------------------

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
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "json")
    path.write_text(to_csv(report) if fmt == "csv" else json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def _clip(text: Any, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _grid(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()] + \
           ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def table(report: dict, max_rows: int = 20) -> str:
    """A readable report for the terminal: summary, per-prompt figures, flagged features."""
    o, k = report["overall"], report["top_k"]
    hooks = ", ".join(f"L{layer} {stream}" for layer, stream in report["hooks"])
    base = report["base"]["model_id"] or "/".join(report["base"]["model_ids"])
    tuned = report["tuned"]["model_id"] or "/".join(report["tuned"]["model_ids"])
    lines = [f"drift · base {base} → tuned {tuned} · SAE {report['sae_id']} ({hooks}) · score {report['score_mode']} · "
             f"τ {report['threshold_source']} · K={k}",
             f"overall, {o['n_prompts']} prompt(s): Jaccard@{k} {_num(o['jaccard'])} · Spearman (top-{k} union, "
             f"{o['n_top_union']} features) {_num(o['spearman'])} · Spearman (all {o['n_features_base']}→"
             f"{o['n_features_tuned']} features) {_num(o['spearman_all'])} · gained {o['n_gained']} · lost {o['n_lost']} · "
             f"shifted {o['n_shifted']}"]
    if report.get("ingested"):
        lines.append(f"runs: {report['ingested']['new_runs']} new, {report['ingested']['cached_runs']} cached")
    lines += ["", "per prompt"]
    lines += _grid(["#", "id", f"jaccard@{k}", "spearman", "gained", "lost", "shifted", "prompt / text"],
                   [[str(p["index"]), str(p["id"] or ""), _num(p["jaccard"]), _num(p["spearman"]), str(p["n_gained"]),
                     str(p["n_lost"]), str(p["n_shifted"]), _clip(p.get("text") or p.get("prompt"), 60)]
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
                 f"{f['prompts_base']}/{f['prompts_tuned']}", _clip(f["proto_label"] or "", 50)]
                for f in flagged[:max_rows]]
        lines += _grid(["feature", "layer", "stream", "rank base → tuned", "score base → tuned", "Δscore",
                        "prompts b/t", "proto_label"], rows)
        if len(flagged) > max_rows:
            lines.append(f"  … {len(flagged) - max_rows} more (see --out)")
    if not any(report["flagged"].values()):
        lines.append("nothing flagged: the two rankings agree within the thresholds")
    for w in report.get("warnings", []):
        lines.append(f"note: {w}")
    return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------------------

def cli_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_discover drift",
        description="Compare the SAE features of two models (base vs tuned) on the same prompts: aggregate scores, "
                    "ranks, Jaccard@K, Spearman and flagged features (gained, lost, shifted).")
    p.add_argument("--base", help="base model (registry id, local HF directory or hub id)")
    p.add_argument("--tuned", help="tuned model")
    p.add_argument("--sae", dest="sae_id", help="SAE source (default: demo; with --base_runs: the runs' own)")
    p.add_argument("--prompts_file", help="JSONL: one object per line with prompt or text (+ optional id, run options)")
    p.add_argument("--base_runs", nargs="+", help="stored runs only: run ids, or a SQL filter over v_runs "
                                                  "(e.g. \"model_id = 'demo' AND mode = 'text'\")")
    p.add_argument("--tuned_runs", nargs="+", help="as --base_runs, for the tuned side")
    p.add_argument("--layers", nargs="+")
    p.add_argument("--streams", nargs="+")
    for name in ("score_mode", "min_coverage_pct", "tau", "tau_quantile"):
        p.add_argument(f"--{name}")
    p.add_argument("--top_k", help="size of each model's top set (default 50)")
    p.add_argument("--min_score_change", help="gained/lost: absolute score change above this (default 0)")
    p.add_argument("--min_relative_change", help="gained/lost: |change| ≥ this × the larger score (default 0.5)")
    p.add_argument("--min_rank_shift", help="shifted: |rank change| at least this (default max(1, ceil(top_k/5)))")
    p.add_argument("--attach_proto_labels")
    for name in RUN_FIELDS:
        p.add_argument(f"--{name}")
    p.add_argument("--out", help="write the report here (.json or .csv)")
    p.add_argument("--format", choices=["json", "csv"], help="output format (default: by --out extension)")
    return p


def _cli_runs(tokens: list[str] | None) -> list[str] | str | None:
    if not tokens:
        return None
    if all(RUN_ID.match(t) for t in tokens):
        return tokens
    return " ".join(tokens)


def cli_fields(ns: argparse.Namespace) -> dict:
    """The request fields of a parsed ``drift`` command line (the prompts file read in)."""
    from sae_discover.batch import read_lines

    data = {name: getattr(ns, name, None) for name in DRIFT_FIELDS if name not in ("prompts", "base_runs", "tuned_runs")}
    data["base_runs"], data["tuned_runs"] = _cli_runs(ns.base_runs), _cli_runs(ns.tuned_runs)
    if ns.prompts_file:
        prompts = []
        for number, obj in read_lines(ns.prompts_file):
            if isinstance(obj, str):
                raise RequestError("prompts_file", obj)
            prompts.append({"id": str(number), **obj})
        if not prompts:
            raise RequestError("prompts_file", f"{ns.prompts_file} holds no prompts")
        data["prompts"] = prompts
    return {k: v for k, v in data.items() if v is not None}
