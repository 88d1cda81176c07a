"""A drift report: make or reuse the runs of every prompt × model (or select stored runs), then the SQL
of ``catalog/drift.py`` over them, shaped as a JSON-ready dict."""

from __future__ import annotations

import sys
import time
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from catalog import drift as catalog_drift
from catalog.db import Catalog, CatalogError
from catalog.errors import CatalogReadOnly, UnknownRun
from catalog.ranking import ATTRIBUTION_MODES
from sae_discover.drift.request import DriftRequest, build_drift_request, discover_requests
from sae_discover.errors import USER_ERRORS, RequestError
from sae_discover.output import clip
from sae_discover.response import NO_CALIBRATION


def _as_request(request: DriftRequest | dict | None, extra: dict) -> DriftRequest:
    if isinstance(request, DriftRequest):
        request = {k: v for k, v in request.to_dict().items() if v is not None}
    return build_drift_request({**(request or {}), **extra})


def drift_report(source, request: DriftRequest | dict | None = None, *, progress: bool = False,
                 allow_sql_filter: bool = False, **fields_: Any) -> dict:
    """A drift report (a JSON-ready dict) for ``request`` (a :class:`DriftRequest`, a mapping, or keywords).

    ``source`` is a :class:`~sae_discover.service.Discovery` (needed to make missing runs), or a bare
    :class:`~catalog.db.Catalog` for ``base_runs``/``tuned_runs`` reports. SQL filters for
    ``base_runs``/``tuned_runs`` are refused (run ids only) unless ``allow_sql_filter`` — the CLI allows
    them (the user's own catalog); the API does not (a filter is code from a client).
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
            warnings += _repeated_prompts(req, base_ids)
            base_rows = catalog_drift.runs_by_ids(catalog, base_ids, "base")
            tuned_rows = catalog_drift.runs_by_ids(catalog, tuned_ids, "tuned")
        else:
            layers, streams = req.layers, req.streams
            base_rows = _select(catalog, "base_runs", req.base_runs, allow_sql_filter)
            tuned_rows = _select(catalog, "tuned_runs", req.tuned_runs, allow_sql_filter)
            _refuse_shared_runs(base_rows, tuned_rows)
        warnings += _check_targets(req, base_rows + tuned_rows)
        saes = catalog_drift.common_saes(catalog, base_rows + tuned_rows, layers, streams, req.sae_id)
        t_sql = time.perf_counter()
        opts = catalog_drift.DriftOptions(**{f.name: getattr(req, f.name) for f in fields(catalog_drift.DriftOptions)})
        out = catalog_drift.drift(catalog, [r["run_key"] for r in base_rows], [r["run_key"] for r in tuned_rows],
                                  [s["sae_key"] for s in saes], opts)
    except (CatalogReadOnly, UnknownRun):  # not a bad request: the catalog cannot store the runs it needs, or
        raise  # has no such run (the API's 404)
    except CatalogError as exc:  # the catalog names the field; here it is a field of this request
        raise RequestError(exc.field, exc.message) from exc
    timings = {"drift_sql_s": time.perf_counter() - t_sql}
    if out["threshold_source"] == "none":
        warnings.append(NO_CALIBRATION)
    for side in ("base", "tuned"):
        if out["overall"][f"n_features_{side}"] == 0:
            warnings.append(f"{side}: no feature passed the coverage gate (min_coverage_pct {req.min_coverage_pct:g}) "
                            "in any run, so there is nothing to compare on that side; lower min_coverage_pct")
    for u in out["unpaired"]:
        warnings.append(f"{u['side']} run {u['run_id']} has no counterpart on the other side "
                        f"({u['mode']} {clip(u['content'], 40)!r}); left out")
    models = {side: sorted({r["model_id"] for r in rows}) for side, rows in (("base", base_rows), ("tuned", tuned_rows))}
    for side, ids in models.items():
        if len(ids) > 1:
            warnings.append(f"{side} runs come from {len(ids)} models ({', '.join(ids)}): each side is usually one "
                            "model")
    timings["total_s"] = time.perf_counter() - t0
    return {
        "base": {"model_id": req.base or (models["base"][0] if len(models["base"]) == 1 else None),
                 "model_ids": models["base"], "run_ids": [r["run_id"] for r in base_rows]},
        "tuned": {"model_id": req.tuned or (models["tuned"][0] if len(models["tuned"]) == 1 else None),
                  "model_ids": models["tuned"], "run_ids": [r["run_id"] for r in tuned_rows]},
        "sae_id": base_rows[0]["sae_id"], "hooks": [[s["layer"], s["stream"]] for s in saes],
        "score_mode": req.score_mode, "min_coverage_pct": req.min_coverage_pct,
        "threshold_source": out["threshold_source"], "normalization": out["normalization"],
        "calibration_ids": out["calibration_ids"], "top_k": req.top_k,
        "thresholds": {"min_score_change": req.min_score_change, "min_relative_change": req.min_relative_change,
                       "min_rank_shift": opts.rank_shift()},
        "overall": out["overall"],
        "prompts": [_prompt_json(p, line_ids) for p in out["prompts"]],
        "features": [_feature_json(f) for f in out["features"]],
        "flagged": {k: [_feature_json(f) for f in v] for k, v in out["flagged"].items()},
        "unpaired": [{"side": u["side"], "run_id": u["run_id"], "mode": u["mode"]} for u in out["unpaired"]],
        "ingested": ingested, "warnings": warnings, "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def _check_targets(req: DriftRequest, rows: list[dict]) -> list[str]:
    """Attribution modes compare attributions, in units of each run's target M: runs of different targets
    are refused; runs whose target was never recorded (made before it was) are named in a warning."""
    if req.score_mode not in ATTRIBUTION_MODES:
        return []
    _refuse_mixed_targets([r["attribution_target"] for r in rows if r.get("attribution_target") is not None])
    unknown = [r["run_id"] for r in rows if r.get("attribution_target") is None]
    return [f"score_mode: {len(unknown)} run(s) were made before targets were recorded (e.g. {unknown[0]}); check "
            "they share the others' target"] if unknown else []


def _refuse_mixed_targets(targets: list[str]) -> None:
    """Attributions of different targets are in different units: one drift compares runs of one target."""
    known = sorted(set(targets))
    if len(known) > 1:
        raise RequestError("score_mode", f"the runs' attribution targets differ ({', '.join(known)}): attributions "
                                         "of different targets are in different units; compare runs of one target")


def _refuse_shared_runs(base_rows: list[dict], tuned_rows: list[dict]) -> None:
    """A run on both sides compares it with itself: a selection mistake (a filter matching every run)."""
    tuned = {r["run_key"] for r in tuned_rows}
    shared = [r["run_id"] for r in base_rows if r["run_key"] in tuned]
    if shared:
        raise RequestError("tuned_runs", f"run {shared[0]} is on both sides ({len(shared)} run(s) are): base_runs "
                                         "and tuned_runs must select different runs")


def _select(catalog: Catalog, name: str, spec: list[str] | str, allow_sql_filter: bool) -> list[dict]:
    if isinstance(spec, list):
        return catalog_drift.runs_by_ids(catalog, spec, name)
    if not allow_sql_filter:
        raise RequestError(name, "SQL filters are disabled here; give a list of run ids")
    return catalog_drift.runs_where(catalog, spec, name)


def _ingest(discovery, req: DriftRequest, progress: bool):
    """Make (or reuse) the run of every prompt × model; returns the run ids in prompt order."""
    entries = {}
    for side, model in (("base", req.base), ("tuned", req.tuned)):
        try:
            entries[side] = discovery.registry.model(model, discovery.allow_paths)
        except RequestError as exc:
            raise RequestError(side, exc.message) from exc
    layers = req.layers or list(entries["base"].default_layers)
    streams = req.streams or ["resid_pre"]
    plans = {side: discover_requests(req, model, layers, streams)
             for side, model in (("base", req.base), ("tuned", req.tuned))}
    if req.score_mode in ATTRIBUTION_MODES:  # the prompts' targets are known: before any run is made
        _refuse_mixed_targets([r.attribution_target for r in plans["base"]])
    for side in ("base", "tuned"):  # both models' configs, SAEs and hooks before any run is stored
        try:
            discovery.prepare(plans[side][0])
        except USER_ERRORS as exc:
            if getattr(exc, "field", None) != "model_id":
                raise
            raise RequestError(side, exc.message) from exc
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


def _repeated_prompts(req: DriftRequest, base_ids: list[str]) -> list[str]:
    """A warning per prompt that makes the same runs as an earlier one (same text and run options): it is
    compared once, under the first one's id."""
    first: dict[str, str] = {}
    notes = []
    for i, (item, run_id) in enumerate(zip(req.prompts or [], base_ids, strict=True)):
        name = str(item.get("id", i + 1))
        if run_id in first:
            notes.append(f"prompts: {name} makes the same runs as {first[run_id]} (same text and run options); "
                         "compared once")
        first.setdefault(run_id, name)
    return notes


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
