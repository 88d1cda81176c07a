"""What fixes a run: its model, SAEs, hooks and run options — resolved and checked before any weights load.

The run id is a hash of everything that fixes the activations (SPEC.md "Runs and caching"); ranking
options never change it, so asking again with other ranking options reads the stored run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

from catalog.writes import ModelInfo, SAEInfo
from ingest.errors import SAEError
from ingest.models import ENCODERS, ModelCard
from ingest.options import RunOptions, parse_attribution_target, resolve_token_proxy
from ingest.run import RunSpec
from ingest.saes.sources import SAESource
from sae_discover.errors import RequestError
from sae_discover.loaders import Loaders, tokenizer_fingerprint
from sae_discover.registry import ModelEntry
from sae_discover.request import DiscoverRequest, check_restrict_features


@dataclass
class RunPlan:
    """A validated request with everything resolved that names its run."""

    req: DiscoverRequest
    entry: ModelEntry
    card: ModelCard
    source: SAESource
    layers: list[int]
    hooks: list[tuple[int, str]]
    saes: list[SAEInfo]
    run_id: str

    @property
    def streams(self) -> list[str]:
        """The distinct streams of the run's hooks, in order (what the runs row and the response list)."""
        return list(dict.fromkeys(stream for _, stream in self.hooks))

    def bos_notes(self) -> list[str]:
        """A warning when the run's SAEs disagree on ``prepend_bos``: ingest prepends BOS only when every
        one of them expects it, so those trained with it see inputs unlike their training."""
        without = [f"layer {layer} {stream}" for layer, stream in self.hooks
                   if not self.source.config(layer, stream).prepend_bos]
        if not without or len(without) == len(self.hooks):
            return []
        return [f"hooks: the SAEs disagree on prepend_bos ({', '.join(without)}: false; the others: true); the run "
                "prepends no BOS token, which the others were trained with — analyze them in separate runs"]

    @property
    def spec(self) -> RunSpec:
        """What ingest needs to make this run: the request's run options, its text and hooks."""
        r = self.req
        return RunSpec(prompt=r.prompt, text=r.text, hooks=self.hooks,
                       **{f.name: getattr(r, f.name) for f in fields(RunOptions)})

    def model_info(self, d_model: int) -> ModelInfo:
        return ModelInfo(self.req.model_id, self.card.fingerprint, self.card.family, self.card.n_layers, d_model)

    def run_row(self, n_tokens: int, n_kept: int, timings: dict) -> dict:
        """The run's row of the ``runs`` table."""
        r, mode = self.req, self.spec.mode
        return {"run_id": self.run_id, "model_id": r.model_id, "sae_id": r.sae_id, "mode": mode, "prompt": r.prompt,
                "text": r.text, "generate": mode == "prompt+gen", "gen_tokens": r.gen_tokens if mode == "prompt+gen" else 0,
                "seed": r.seed, "temperature": r.temperature, "top_p": r.top_p, "token_proxy": r.token_proxy,
                "topk_tokens_per_seq": r.topk_tokens_per_seq, "layers": self.layers, "streams": self.streams,
                "restrict_features": r.restrict_features, "n_tokens": n_tokens, "n_kept": n_kept, "timings": timings,
                "attribution_target": r.attribution_target}


def sae_infos(source: SAESource, hooks: list[tuple[int, str]]) -> list[SAEInfo]:
    """Catalog facts of the source's SAE at each hook (from its config; no weights loaded)."""
    infos = []
    for layer, stream in hooks:
        cfg = source.config(layer, stream)
        infos.append(SAEInfo(source.sae_id, layer, stream, source.fingerprint(layer, stream), cfg.hook_name,
                             cfg.architecture, cfg.d_in, cfg.d_sae))
    return infos


def resolve_hooks(req: DiscoverRequest, entry: ModelEntry, card: ModelCard, source: SAESource
                  ) -> tuple[list[int], list[tuple[int, str]]]:
    """The request's ``hooks`` pairs as given, else its layers (else the registry default) × streams; each
    checked against model and source. Returns the distinct layers (in order) and the hooks."""
    field_name = "hooks" if req.hooks else "layers"
    if req.hooks:
        hooks = [(layer, stream) for layer, stream in req.hooks]
        layers = list(dict.fromkeys(layer for layer, _ in hooks))
    else:
        layers = req.layers or entry.default_layers
        hooks = [(layer, stream) for layer in layers for stream in req.streams]
    for layer in layers:
        if not 0 <= layer < card.n_layers:
            raise RequestError(field_name, f"layer {layer} is out of range for {req.model_id} "
                                           f"({card.n_layers} layers: 0..{card.n_layers - 1})")
    for layer, stream in hooks:
        try:
            source.folder(layer, stream)  # raises with the list of hooks the source has
        except SAEError as exc:
            raise SAEError("hooks", exc.message) if req.hooks else exc from None
    return layers, hooks


def run_id(req: DiscoverRequest, card: ModelCard, saes: list[SAEInfo], tokenizer_fp: str,
           precision: list[str] | None = None) -> str:
    """Hash of everything that fixes the activations (ranking options excluded)."""
    gen = req.text is None and req.generate
    key = {
        "model": [req.model_id, card.fingerprint, tokenizer_fp], "prompt": req.prompt, "text": req.text,
        "generate": gen, "gen_tokens": req.gen_tokens if gen else 0, "seed": req.seed if gen else None,
        "temperature": req.temperature if gen else None, "top_p": req.top_p if gen else None,
        "saes": sorted([s.sae_id, s.layer, s.stream, s.fingerprint] for s in saes),
        "token_proxy": req.token_proxy, "topk": req.topk_tokens_per_seq, "restrict": sorted(req.restrict_features),
        "precision": precision or ["float32", "cpu"],
    }
    if req.attribution_target != "none":  # only then: the ids of runs without attribution stay as they were
        key["attribution"] = req.attribution_target
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def check_attribution(req: DiscoverRequest, card: ModelCard) -> None:
    """Refuse an attribution target the run cannot have (its texts' tokenization is checked by ingest,
    which has the tokenizer, before anything is written); ``req.attribution_target`` is made canonical."""
    try:
        target = parse_attribution_target(req.attribution_target)
    except ValueError as exc:
        raise RequestError("attribution_target", str(exc)) from None
    req.attribution_target = target.canonical
    if target.enabled and card.family in ENCODERS:
        raise RequestError("attribution_target", f"{req.model_id} is an encoder ({card.family}) with no LM head: "
                                                 "there is no log-probability to attribute; use none")
    if target.kind == "continuation" and not (req.text is None and req.generate and req.gen_tokens > 0):
        raise RequestError("attribution_target", "continuation attributes the generated tokens, and this request "
                                                 "generates none; use next_tokens, token:<text> or logit_diff:<a>|<b>")
    if req.verify_top and not target.enabled:
        raise RequestError("verify_top", "verification measures the change of the attribution target: "
                                         "give attribution_target (e.g. continuation or next_tokens)")


def plan_run(loaders: Loaders, req: DiscoverRequest) -> RunPlan:
    """Resolve ids, hooks and the run id without loading any weights (validation happens here)."""
    entry = loaders.entry(req.model_id)
    card = loaders.card(entry)
    if card.family in ENCODERS and req.text is None and req.generate:
        raise RequestError("generate", f"{req.model_id} is an encoder ({card.family}) and cannot generate; "
                                       "send `text` (text mode) or set generate=false")
    check_attribution(req, card)
    req.token_proxy = resolve_token_proxy(req, req.text is not None)  # before the run id: auto is never hashed
    source = loaders.source(req.sae_id)
    layers, hooks = resolve_hooks(req, entry, card, source)
    saes = sae_infos(source, hooks)
    check_restrict_features(req.restrict_features, saes)
    return RunPlan(req, entry, card, source, layers, hooks, saes,
                   run_id(req, card, saes, tokenizer_fingerprint(entry.source), loaders.precision()))
