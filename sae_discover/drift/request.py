"""What a drift report needs: the scoring and thresholds (``catalog.drift.DriftOptions``, declared once
there), what to compare, and the run options of the prompts — validated like a discovery request.

Two ways in:
- ``base`` + ``tuned`` + ``prompts``: each prompt × model goes through discovery (runs already in the
  catalog are reused, ``cached``), then the stored runs are compared;
- ``base_runs`` + ``tuned_runs``: historical runs only — a list of run ids, or a SQL filter over
  ``v_runs`` (a string) — without loading any model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from catalog.drift import DriftOptions
from catalog.ranking import ATTRIBUTION_MODES
from ingest.options import RunOptions, Stream, TokenProxy
from sae_discover.errors import RequestError
from sae_discover.request import (
    MAX_LAYER,
    DiscoverRequest,
    build_request,
    check_tau,
    field_names,
    fill,
    known_values,
)


def _run_option(name: str) -> Any:
    """A run option for the prompts, optional here (None → discovery's default); help and bounds from RunOptions."""
    (f,) = [f for f in dataclasses.fields(RunOptions) if f.name == name]
    return field(default=None, metadata=f.metadata)


@dataclass
class DriftTarget:
    """What to compare."""

    base: str | None = field(default=None, metadata={"help": "base model (registry id, local HF directory or hub id)"})
    tuned: str | None = field(default=None, metadata={"help": "tuned model"})
    sae_id: str | None = field(default=None, metadata={
        "help": "SAE source (default: demo; with base_runs: the runs' own)", "flag": "--sae"})
    prompts: list[dict] | None = field(default=None, metadata={
        "help": "objects with prompt or text (+ optional id and run options)"})
    base_runs: list[str] | str | None = field(default=None, metadata={
        "help": "stored runs only: run ids, or a SQL filter over v_runs (e.g. \"model_id = 'demo' AND mode = 'text'\")"})
    tuned_runs: list[str] | str | None = field(default=None, metadata={"help": "as base_runs, for the tuned side"})
    layers: list[int] | None = field(default=None, metadata={
        "help": "layers (default: the base model's default layers with prompts, every shared hook with runs)",
        "item_bounds": (0, MAX_LAYER)})
    streams: list[Stream] | None = field(default=None, metadata={
        "help": "streams (default: resid_pre with prompts, every shared hook with runs)"})


@dataclass
class DriftRunOptions:
    """Run options for the prompts (None → discovery's defaults); a prompts item may override them."""

    generate: bool | None = _run_option("generate")
    gen_tokens: int | None = _run_option("gen_tokens")
    seed: int | None = _run_option("seed")
    temperature: float | None = _run_option("temperature")
    top_p: float | None = _run_option("top_p")
    topk_tokens_per_seq: int | None = _run_option("topk_tokens_per_seq")
    token_proxy: TokenProxy | None = _run_option("token_proxy")
    attribution_target: str | None = _run_option("attribution_target")


@dataclass
class DriftRequest(DriftOptions, DriftRunOptions, DriftTarget):
    """A drift report's request; defaults as documented in the README ("Drift reports")."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RUN_FIELDS = field_names(DriftRunOptions)
DRIFT_FIELDS = tuple(f.name for f in dataclasses.fields(DriftRequest))


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


def _prompts(items: Any, max_prompts: int) -> list[dict]:
    if not isinstance(items, list | tuple) or not items:
        raise RequestError("prompts", "expected a non-empty list of objects with prompt or text")
    if len(items) > max_prompts:
        raise RequestError("prompts", f"expected at most {max_prompts} prompts, got {len(items)}")
    allowed = {"prompt", "text", "id", *RUN_FIELDS}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError("prompts", f"item {i}: expected an object with prompt or text, got {item!r}")
        bad = sorted(set(item) - allowed, key=str)
        if bad:
            raise RequestError("prompts", f"item {i}: unknown key {bad[0]!r}; an item takes prompt or text, id, "
                                          f"and run options ({', '.join(RUN_FIELDS)})")
    return [dict(item) for item in items]


def build_drift_request(data: dict[str, Any], max_prompts: int = 1000, max_text_chars: int = 200_000,
                        max_layers: int = 64) -> DriftRequest:
    """Validate a mapping (CLI namespace, JSON body) into a :class:`DriftRequest`; unknown keys are refused."""
    values = known_values(data, DRIFT_FIELDS)
    req = DriftRequest()
    fill(req, DriftRequest, values, max_text_chars, max_layers, skip=("prompts", "base_runs", "tuned_runs"))
    for name in ("base_runs", "tuned_runs"):
        if name in values:
            setattr(req, name, _runs_spec(name, values[name]))
    if "prompts" in values:
        req.prompts = _prompts(values["prompts"], max_prompts)
    by_model = req.base is not None or req.tuned is not None or req.prompts is not None
    by_runs = req.base_runs is not None or req.tuned_runs is not None
    if by_model and by_runs:
        raise RequestError("base_runs", "give either base + tuned + prompts (runs are made or reused), or "
                                        "base_runs + tuned_runs (stored runs only), not both")
    if by_runs:
        for name in ("base_runs", "tuned_runs"):
            if getattr(req, name) is None:
                raise RequestError(name, "give both base_runs and tuned_runs (run ids, or a SQL filter over v_runs)")
        given = [name for name in RUN_FIELDS if getattr(req, name) is not None]
        if given:  # stored runs keep the options they were made with
            raise RequestError(given[0], "run options apply only to runs made from prompts (base + tuned + prompts); "
                                         "stored runs keep the options they were made with")
    else:
        for name in ("base", "tuned", "prompts"):
            if getattr(req, name) is None:
                raise RequestError(name, "missing: a drift report needs base and tuned models and prompts "
                                         "(or base_runs and tuned_runs)")
    check_tau(req)
    if req.prompts is not None:  # each item must make a valid discovery request (checked before any model runs)
        list(discover_requests(req, req.base or "", req.layers or [0], req.streams, max_text_chars, max_layers))
        _require_targets(req)
    return req


def _item(i: int, item: dict) -> str:
    """A prompts item as an error names it: its place, and its id when it has one."""
    return f"item {i}" + (f" (id {item['id']!r})" if "id" in item else "")


def _require_targets(req: DriftRequest) -> None:
    """An attribution score mode over prompts needs every prompt's runs made with a target: refused before
    any run is made (a stored run without one would be found only after both models ran)."""
    if req.score_mode not in ATTRIBUTION_MODES:
        return
    for i, item in enumerate(req.prompts or []):
        if (item.get("attribution_target") or req.attribution_target or "none") == "none":
            raise RequestError("attribution_target", f"score_mode {req.score_mode} compares what each model used for a "
                                                     f"target, and prompts {_item(i, item)} has none: give attribution_target "
                                                     "(e.g. next_tokens), for all prompts or per prompt")


def discover_requests(req: DriftRequest, model_id: str, layers: list[int], streams: list[str] | None,
                      max_text_chars: int = 200_000, max_layers: int = 64) -> list[DiscoverRequest]:
    """One discovery request per prompts item for ``model_id`` (ranking kept minimal: only the run matters)."""
    shared = {name: getattr(req, name) for name in RUN_FIELDS if getattr(req, name) is not None}
    out = []
    for i, item in enumerate(req.prompts or []):
        fields_ = {**shared, **{k: v for k, v in item.items() if k != "id"}, "model_id": model_id,
                   "sae_id": req.sae_id or "demo", "layers": layers, "streams": streams, "score_mode": "mean",
                   "min_coverage_pct": 0, "return_top_x": 1, "attach_examples": False, "attach_proto_labels": False}
        if "id" in item:
            fields_["id"] = str(item["id"])
        try:
            out.append(build_request(fields_, max_text_chars, max_layers))
        except RequestError as exc:
            raise RequestError("prompts", f"{_item(i, item)}: {exc}") from exc
    return out
