"""Load a Hugging Face model and capture TransformerLens-named streams with forward hooks.

Streams (TransformerLens names, HF modules):
- ``resid_pre`` L  = input of block L (HF ``hidden_states[L]``)
- ``resid_post`` L = output of block L
- ``mlp_out`` / ``attn_out`` L = what the MLP / attention adds to the residual (Gemma-2/3: after
  their post-norms, which is what is added).

All requested (layer, stream) pairs are captured in one forward pass; with ``stop_early`` the pass
ends after the last block needed (the LM head and later blocks are not run; for ``resid_pre`` L,
block L itself is not run).

Families (one :class:`FamilyMap` each, tested on tiny random configs in ``tests/test_families.py``):
GPT-2 (sequential pre-LN), GPT-NeoX/Pythia (parallel residual by default: both sublayers read the
block input), Llama/Mistral/Qwen2/Qwen3/Gemma (sequential pre-norm), Gemma-2/Gemma-3 text (sandwich
norms: ``attn_out``/``mlp_out`` are the outputs of ``post_attention_layernorm`` /
``post_feedforward_layernorm``, the tensors actually added to the residual), and BERT-style
encoders (``bert``, ``roberta``, ``xlm-roberta``), loaded with ``AutoModel`` for text mode only.

BERT is post-LN: a block computes ``mid = LN1(x + attn(x))`` and ``out = LN2(mid + mlp(mid))``, so
no sublayer output is added to a residual that survives unnormalised. We follow TransformerLens'
``HookedEncoder``: ``attn_out`` = the attention output projection (``attention.output.dense``) and
``mlp_out`` = the MLP down-projection (``output.dense``), each *before* the residual add and the
LayerNorm; ``resid_pre``/``resid_post`` are the block input/output (``hidden_states[L]`` and
``hidden_states[L+1]``). Hence for BERT ``resid_post != resid_pre + attn_out + mlp_out``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ingest.errors import ModelError
from ingest.options import STREAMS


@dataclass(frozen=True)
class FamilyMap:
    """Where a family keeps its blocks and the modules whose outputs are added to the residual."""

    blocks: str  # dotted path from the top model to the ModuleList of blocks
    attn: str  # module inside a block whose output is attn_out
    mlp: str  # module inside a block whose output is mlp_out
    decoder: bool = True  # False: a bidirectional encoder (AutoModel, no LM head, no generation)


_LLAMA = FamilyMap("model.layers", "self_attn", "mlp")
_GEMMA2 = FamilyMap("model.layers", "post_attention_layernorm", "post_feedforward_layernorm")
_BERT = FamilyMap("encoder.layer", "attention.output.dense", "output.dense", decoder=False)
FAMILIES: dict[str, FamilyMap] = {
    "gpt2": FamilyMap("transformer.h", "attn", "mlp"),
    "gpt_neox": FamilyMap("gpt_neox.layers", "attention", "mlp"),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
}
ENCODERS = frozenset(name for name, fmap in FAMILIES.items() if not fmap.decoder)


def unsupported(family: str) -> ModelError:
    """The error for an architecture without a module map; it lists the supported ones."""
    hint = ""
    if family == "gemma3":
        hint = " (a multimodal Gemma 3 checkpoint: use its text-only variant, model_type gemma3_text)"
    return ModelError("model_id", f"architecture {family!r} is not supported{hint}; supported: {', '.join(sorted(FAMILIES))}")


class _StopForward(Exception):
    """Raised by a pre-hook on the first block not needed, to end the forward pass early."""


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


@dataclass
class LoadedModel:
    """A model ready for capture, with the facts a run needs to name it."""

    model: nn.Module
    tokenizer: object
    model_id: str
    family: str
    fingerprint: str
    n_layers: int
    d_model: int
    context_length: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family_map(self) -> FamilyMap:
        return FAMILIES[self.family]

    @property
    def is_encoder(self) -> bool:
        """A bidirectional encoder (BERT-style): text mode only, no logits (the entropy proxy falls back to norm)."""
        return not self.family_map.decoder

    def blocks(self) -> nn.ModuleList:
        return _resolve(self.model, self.family_map.blocks)  # type: ignore[return-value]

    def check_hooks(self, layers: list[int], streams: list[str]) -> None:
        for stream in streams:
            if stream not in STREAMS:
                raise ModelError("streams", f"expected values in {', '.join(STREAMS)}, got {stream!r}")
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ModelError("layers", f"layer {layer} is out of range for {self.model_id} "
                                 f"({self.n_layers} layers: 0..{self.n_layers - 1})")

    def capture(self, input_ids: torch.Tensor, hooks: list[tuple[int, str]], attention_mask: torch.Tensor | None = None,
                stop_early: bool = True, grad: bool = False
                ) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor | None]:
        """Run one forward pass; return ``{(layer, stream): [batch, seq, d_model]}`` and the logits.

        Logits are ``None`` when the pass stopped early (no LM head was run) and always for encoders
        (loaded without an LM head). With ``grad`` the pass records the autograd graph from the hooked
        streams on (each becomes a tensor that requires grad, same values), so one backward pass gives
        ∂M/∂stream for every hook at once; the captured tensors and logits are then not detached.
        """
        self.check_hooks([layer for layer, _ in hooks], [stream for _, stream in hooks])
        captured: dict[tuple[int, str], torch.Tensor] = {}

        def keep(key: tuple[int, str], x: torch.Tensor) -> torch.Tensor | None:
            if not grad:
                captured[key] = x.detach()
                return None
            if not x.requires_grad:  # the first hooked stream: the graph starts here
                x = x.detach().requires_grad_(True)
            captured[key] = x
            return x

        logits = self._hooked_forward(input_ids, hooks, keep, attention_mask, stop_early, grad)
        return captured, logits

    def forward_edited(self, input_ids: torch.Tensor, edits: dict[tuple[int, str], Callable[[torch.Tensor], torch.Tensor]],
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of a forward pass in which each hooked stream is replaced by ``edits[hook](stream)``
        (ablation: the model downstream of the edit runs as usual)."""
        self.check_hooks([layer for layer, _ in edits], [stream for _, stream in edits])
        logits = self._hooked_forward(input_ids, list(edits), lambda key, x: edits[key](x), attention_mask,
                                      stop_early=False, grad=False)
        assert logits is not None
        return logits

    def _hooked_forward(self, input_ids: torch.Tensor, hooks: list[tuple[int, str]],
                        on_stream: Callable[[tuple[int, str], torch.Tensor], torch.Tensor | None],
                        attention_mask: torch.Tensor | None, stop_early: bool, grad: bool) -> torch.Tensor | None:
        """One forward pass with ``on_stream(key, tensor)`` called at each hook; a tensor it returns
        replaces the stream. Returns the logits (None when stopped early, and for encoders)."""
        blocks = self.blocks()

        def stop(_module, _args, _kwargs):
            raise _StopForward

        # the first block not needed: resid_pre L is the input of block L (captured by its pre-hook,
        # which runs before the stop hook registered after it); every other stream needs block L to run
        stop_at = max(layer if stream == "resid_pre" else layer + 1 for layer, stream in hooks)
        with self.hooked(hooks, on_stream):
            handle = None
            if stop_early and stop_at < len(blocks):
                handle = blocks[stop_at].register_forward_pre_hook(stop, with_kwargs=True)
            logits = None
            kwargs = {"use_cache": False} if self.family_map.decoder else {}
            try:
                with torch.enable_grad() if grad else torch.inference_mode():
                    try:
                        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                        logits = getattr(out, "logits", None) if self.family_map.decoder else None
                    except _StopForward:
                        pass
            finally:
                if handle is not None:
                    handle.remove()
        return logits

    @contextmanager
    def hooked(self, hooks: list[tuple[int, str]],
               on_stream: Callable[[tuple[int, str], torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
        """Inside, every forward pass of the model calls ``on_stream(key, tensor)`` at each hook (a
        tensor it returns replaces the stream): one pass (:meth:`capture`) or every pass of a
        generation loop (:func:`ingest.generate.capture_generation`)."""
        blocks = self.blocks()
        fmap = self.family_map
        handles = []

        def keep(key: tuple[int, str]):
            def hook(_module, _inputs, output):
                new = on_stream(key, _first(output))
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return hook

        def keep_input(key: tuple[int, str]):
            def hook(_module, args, kwargs):
                new = on_stream(key, args[0] if args else kwargs["hidden_states"])
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
            return hook

        try:
            for layer, stream in dict.fromkeys(hooks):
                block = blocks[layer]
                if stream == "resid_pre":
                    handles.append(block.register_forward_pre_hook(keep_input((layer, stream)), with_kwargs=True))
                elif stream == "resid_post":
                    handles.append(block.register_forward_hook(keep((layer, stream))))
                else:
                    target = _resolve(block, fmap.attn if stream == "attn_out" else fmap.mlp)
                    handles.append(target.register_forward_hook(keep((layer, stream))))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _fingerprints(path: Path | None, *configs: dict) -> list[str]:
    """Weights fingerprints without reading a 7B model whole: a config + each weight file's size and
    ends (read once for every config given)."""
    parts: list[bytes] = []
    if path is not None and path.is_dir():
        for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            size = file.stat().st_size
            parts.append(f"{file.name}:{size}".encode())
            with file.open("rb") as fh:
                parts.append(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                parts.append(fh.read(1 << 20))
    out = []
    for config in configs:
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for part in parts:
            h.update(part)
        out.append(h.hexdigest()[:16])
    return out


def quiet_transformers() -> None:
    """No progress bars or length warnings from transformers on our stdout/stderr (we report ourselves)."""
    from transformers.utils import logging as hf_logging  # deferred: transformers is heavy, needed only with a model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("device", "cuda was asked for but no CUDA device is available")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelCard:
    """What a run's identity and validation need, read from the config alone (no weights loaded)."""

    source: str
    family: str
    fingerprint: str
    n_layers: int
    config: object
    d_model: int  # the residual width, from the config (what the catalog records with the model)
    context_length: int  # the longest sequence it reads (what a run's tokens are truncated at)
    # the fingerprint as earlier versions computed it (config path and transformers version included):
    # a catalog that knows the model by it adopts the new one (catalog.runs.adopt_fingerprint)
    legacy_fingerprint: str = ""


def read_card(source: str) -> ModelCard:
    from transformers import AutoConfig  # deferred: transformers is heavy, needed only with a model

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError("model_id", f"cannot load {source!r} as a local Hugging Face directory or a cached/hub id "
                         f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}") from exc
    family = config.model_type
    if family not in FAMILIES:
        raise unsupported(family)
    text_cfg = getattr(config, "text_config", config)
    n_layers = getattr(text_cfg, "num_hidden_layers", None) or text_cfg.n_layer
    d_model = getattr(text_cfg, "hidden_size", None) or text_cfg.n_embd
    local = Path(source) if Path(source).is_dir() else None
    legacy_cfg = {**config.to_dict(), "_commit_hash": getattr(config, "_commit_hash", None)}
    # what the weights are, not where they lie or which library reads them: the same model in two
    # checkouts (or after a transformers upgrade) keeps its fingerprint, so its runs and their ids
    cfg_dict = {k: v for k, v in legacy_cfg.items() if k not in ("_name_or_path", "transformers_version")}
    fingerprint, legacy = _fingerprints(local, cfg_dict, legacy_cfg)
    n_ctx = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", 2048)
    if family in ("roberta", "xlm-roberta"):  # positions start after padding_idx: two fewer usable slots
        n_ctx -= int(getattr(text_cfg, "pad_token_id", 1) or 0) + 1
    return ModelCard(source, family, fingerprint, int(n_layers), config, int(d_model), int(n_ctx), legacy)


def load_model(model_id: str, path: str | Path | None = None, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Load a model from a local directory or a hub id (transformers' cache; HF_HUB_OFFLINE honoured).

    Decoders load as causal LMs (logits for the entropy proxy and generation); BERT-style encoders
    load with ``AutoModel`` (no head: text mode only).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # deferred: heavy, needed only here

    quiet_transformers()
    source = str(path or model_id)
    if dtype not in DTYPES:
        raise ModelError("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    card = read_card(source)
    family = card.family
    fmap = FAMILIES[family]
    auto = AutoModelForCausalLM if fmap.decoder else AutoModel
    try:  # safetensors only: a pytorch_model.bin would be unpickled
        model = auto.from_pretrained(source, dtype=DTYPES[dtype], use_safetensors=True)
    except OSError as exc:
        raise ModelError("model_id", f"{source!r} has no safetensors weights (pickled .bin weights are never loaded; "
                         f"convert them with `save_pretrained(..., safe_serialization=True)`): {exc}") from exc
    except (RuntimeError, ValueError, SafetensorError) as exc:  # truncated weights, sizes not those of config.json
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "mismatched_sizes" in first:  # transformers' line points at a report it logged; say what it found
            first = "the tensor sizes in config.json do not match those of the weights"
        raise ModelError("model_id", f"{source!r}: its weights cannot be loaded ({first})") from exc
    model.eval().to(resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=model_id, family=family,
        fingerprint=card.fingerprint, n_layers=len(_resolve(model, FAMILIES[family].blocks)),
        d_model=card.d_model, context_length=card.context_length,
    )
