"""EleutherAI sparsify on-disk format: a folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Weights: ``encoder.weight`` [d_sae, d_in] and ``encoder.bias`` (an ``nn.Linear``), ``W_dec``
[d_sae, d_in], ``b_dec`` [d_in]. sparsify encodes a (non-transcoder) SAE as
``top_k(relu(encoder(x - b_dec)), k)`` (``SparseCoder.encode`` → ``fused_encoder``). That equals
SAELens' TopK encode ``relu(top_k(x @ W_enc + b_enc))`` with ``W_enc = encoder.weightᵀ`` and
``apply_b_dec_to_input``: when fewer than k pre-activations are positive, both keep exactly the
positive ones (the rest are 0 either way). So a sparsify SAE becomes a ``topk`` :class:`SAE`.

Which (layer, stream): a ``sae-discover.json`` sidecar if present, else the folder name, which is
sparsify's hookpoint (a module name of the base model, as ``AutoModel`` names it): ``layers.6`` /
``h.6`` / ``gpt_neox.layers.6`` → ``resid_post`` 6 (the block output); ``layers.6.mlp`` →
``mlp_out``; ``layers.6.self_attn`` / ``h.6.attn`` / ``layers.6.attention`` → ``attn_out``;
``layers.6.post_feedforward_layernorm`` → ``mlp_out``. Note that on Gemma-2/3 a ``.mlp`` /
``.self_attn`` hookpoint is *before* the post-norms, unlike our ``mlp_out``/``attn_out`` there.
Transcoders (``transcode``), skip connections and non-TopK activations are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from ingest.saes import layout
from ingest.saes.base import SAE, SAEConfig, SAEError
from ingest.saes.saelens import hook_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
REQUIRED = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
_HOOKPOINT_RE = re.compile(r"^(?:.*\.)?(?:layers|h|layer|blocks)\.(\d+)(?:\.(.+))?$")
_SUFFIX = {None: "resid_post", "mlp": "mlp_out", "post_feedforward_layernorm": "mlp_out",
           "self_attn": "attn_out", "attn": "attn_out", "attention": "attn_out"}


def is_folder(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / CFG_FILE).is_file()


def parse_hookpoint(name: str) -> tuple[int, str]:
    """sparsify hookpoint (module name) → (layer, stream)."""
    match = _HOOKPOINT_RE.match(name)
    if not match or match.group(2) not in _SUFFIX:
        raise SAEError("sae_id", f"sparsify hookpoint {name!r}: expected a block ('layers.N', 'h.N') or its "
                       "'.mlp' / '.self_attn' / '.attn' / '.attention' output, or a "
                       f"{layout.SIDECAR} naming the hook")
    return int(match.group(1)), _SUFFIX[match.group(2)]


def _raw_config(folder: Path) -> dict:
    return layout.read_json_object(folder / CFG_FILE)


def locate(folder: Path) -> tuple[int, str]:
    side, side_file = layout.read_sidecar(folder)
    layer, stream = layout.hook_from_sidecar(side, side_file)
    if layer is not None and stream is not None:
        return layer, stream
    parsed = parse_hookpoint(folder.resolve().name)
    return (parsed[0] if layer is None else layer), (stream or parsed[1])


def read_config(folder: Path) -> SAEConfig:
    """cfg.json + the safetensors header (shapes) → :class:`SAEConfig`; no weights loaded."""
    raw = _raw_config(folder)
    file = folder / CFG_FILE
    if raw.get("transcode"):
        raise SAEError("sae_id", f"{file}: a sparsify transcoder (transcode=true) reads the MLP input and predicts its "
                       "output; not supported")
    if raw.get("skip_connection"):
        raise SAEError("sae_id", f"{file}: skip_connection=true (a transcoder); not supported")
    if raw.get("normalize_io"):
        raise SAEError("sae_id", f"{file}: normalize_io=true is not supported")
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SAEError("sae_id", f"{file}: activation {activation!r} is not supported (only topk)")
    if not raw.get("k"):
        raise SAEError("sae_id", f"{file}: missing field 'k' (the TopK size)")
    shapes = layout.safetensors_shapes(folder / WEIGHTS_FILE)
    missing = [k for k in REQUIRED if k not in shapes]
    if missing:
        raise SAEError("sae_id", f"weights {folder / WEIGHTS_FILE}: missing tensors {missing} (has {sorted(shapes)})")
    d_sae, d_in = shapes["encoder.weight"]
    if raw.get("d_in") is not None and int(raw["d_in"]) != d_in:
        raise SAEError("sae_id", f"{file}: d_in={raw['d_in']} but encoder.weight has shape {shapes['encoder.weight']}")
    layer, stream = locate(folder)
    side, _ = layout.read_sidecar(folder)
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="topk", hook_name=hook_name(layer, stream),
                    layer=layer, stream=stream, apply_b_dec_to_input=True, k=int(raw["k"]),
                    prepend_bos=bool(side.get("prepend_bos", True)), model_name=str(side.get("model_name", "")),
                    extra={"format": "sparsify", "hookpoint": folder.resolve().name})
    cfg.check()
    return cfg


def load(folder: Path, source: str = "") -> SAE:
    """Load one sparsify SAE folder (safetensors only)."""
    cfg = read_config(folder)
    tensors = layout.load_safetensors(folder / WEIGHTS_FILE)
    return SAE(cfg=cfg, W_enc=tensors["encoder.weight"].float().T, b_enc=tensors["encoder.bias"],
               W_dec=tensors["W_dec"], b_dec=tensors["b_dec"], source=source or str(folder))


def files(folder: Path) -> list[Path]:
    _, side = layout.read_sidecar(folder)
    return [folder / CFG_FILE, folder / WEIGHTS_FILE] + ([side] if side else [])
