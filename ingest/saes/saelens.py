"""SAELens on-disk format: ``cfg.json`` (v5 flat or v6 ``metadata`` layout) + ``sae_weights.safetensors``.

Reading uses safetensors only (never pickle). Writing produces the v6 layout, so the demo's SAEs
load in SAELens itself (``SAE.load_from_disk``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ingest.options import STREAMS
from ingest.saes import layout
from ingest.saes.base import SAE, SAEConfig, SAEError, numpy_weights

CFG_FILE = "cfg.json"
# the format version ``save`` writes: SAELens 6 reads a folder without a 6.x version as a pre-6 flat
# config and drops its metadata (hook name, model kwargs)
FORMAT_VERSION = "6.0.0"
WEIGHTS_FILE = "sae_weights.safetensors"


def parse_hook_name(hook_name: str) -> tuple[int, str]:
    """``blocks.8.hook_resid_pre`` → ``(8, "resid_pre")`` (TransformerLens names)."""
    match = layout.HOOK_RE.match(hook_name or "")
    if not match:
        raise SAEError("sae_id", f"hook_name: expected 'blocks.<layer>.hook_<{'|'.join(STREAMS)}>', got {hook_name!r}")
    return int(match.group(1)), match.group(2)


def hook_name(layer: int, stream: str) -> str:
    return f"blocks.{layer}.hook_{stream}"


def read_config(folder: Path) -> SAEConfig:
    """Parse cfg.json of either layout into an :class:`SAEConfig`."""
    raw = layout.read_json_object(folder / CFG_FILE)
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SAEError("sae_id", f"cfg.json in {folder}: metadata must be a JSON object")
    merged = {**raw, **meta}  # v6 keeps model context in metadata; v5 has it flat
    arch = merged.get("architecture")
    act_fn = merged.get("activation_fn_str") or merged.get("activation_fn")
    kwargs = merged.get("activation_fn_kwargs") or {}
    if act_fn == "topk":  # v5 kept "standard" as architecture and put TopK in the activation function
        arch = "topk"
    elif arch is None:
        arch = "standard"
    if arch == "batchtopk":
        arch = "jumprelu"
    k = merged.get("k", kwargs.get("k"))
    hook = merged.get("hook_name", "")
    layer, stream = parse_hook_name(hook)
    tl_kwargs = merged.get("model_from_pretrained_kwargs") or {}
    try:
        cfg = SAEConfig(
            d_in=int(merged["d_in"]), d_sae=int(merged["d_sae"]), architecture=str(arch), hook_name=hook,
            layer=layer, stream=stream, apply_b_dec_to_input=bool(merged.get("apply_b_dec_to_input", True)),
            normalize_activations=str(merged.get("normalize_activations") or "none"),
            k=int(k) if k is not None else None,
            rescale_acts_by_decoder_norm=bool(merged.get("rescale_acts_by_decoder_norm", False)),
            prepend_bos=bool(merged.get("prepend_bos", True)),
            center_writing_weights=bool(tl_kwargs.get("center_writing_weights", False)),
            scaling_factor=merged.get("scaling_factor"), model_name=str(merged.get("model_name", "")),
        )
    except KeyError as exc:
        raise SAEError("sae_id", f"cfg.json in {folder}: missing field {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:  # e.g. "d_in": "wide", or a list where an object goes
        raise SAEError("sae_id", f"cfg.json in {folder}: a field has the wrong type ({exc})") from exc
    cfg.check()
    return cfg


def load(folder: Path, source: str = "") -> SAE:
    """Load one SAELens SAE folder."""
    cfg = read_config(folder)
    tensors = layout.load_safetensors(folder / WEIGHTS_FILE)
    if cfg.normalize_activations == "expected_average_only_in" and cfg.scaling_factor is None:
        factor = tensors.get("scaling_factor")
        if factor is not None:
            cfg.scaling_factor = float(factor.reshape(-1)[0])
    missing = [n for n in ("W_enc", "W_dec", "b_dec") if n not in tensors]
    if cfg.architecture != "gated" and "b_enc" not in tensors:
        missing.append("b_enc")
    if missing:
        raise SAEError("sae_id", f"weights {folder / WEIGHTS_FILE}: missing tensors {missing}")
    b_enc = tensors.get("b_enc")
    if b_enc is None:  # gated SAEs have b_gate/b_mag instead
        b_enc = torch.zeros(cfg.d_sae)
    return SAE(cfg=cfg, W_enc=tensors["W_enc"], b_enc=b_enc, W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
               threshold=tensors.get("threshold"), b_gate=tensors.get("b_gate"), b_mag=tensors.get("b_mag"),
               r_mag=tensors.get("r_mag"), source=source or str(folder))


def save(sae: SAE, folder: Path, dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> None:
    """Write ``sae`` as a SAELens v6 folder (cfg.json with ``metadata`` + safetensors weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    body = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations, "reshape_activations": "none",
        "metadata": {"model_name": cfg.model_name, "hook_name": cfg.hook_name or hook_name(cfg.layer, cfg.stream),
                     "hook_head_index": None, "prepend_bos": cfg.prepend_bos, "model_class_name": "HookedTransformer",
                     "model_from_pretrained_kwargs": {"center_writing_weights": cfg.center_writing_weights},
                     "sae_lens_version": FORMAT_VERSION, **(metadata or {})},
    }
    if cfg.architecture == "topk":
        body["k"] = cfg.k
        body["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
    (folder / CFG_FILE).write_text(json.dumps(body, indent=2))
    save_file({n: torch.from_numpy(v).to(dtype).contiguous() for n, v in numpy_weights(sae).items()},
              str(folder / WEIGHTS_FILE))
