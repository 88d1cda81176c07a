"""Gemma Scope on-disk format: ``params.npz`` (Gemma Scope) or ``params.safetensors`` (Gemma Scope 2).

Weights ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``, ``threshold`` (Gemma
Scope 2 spells them in lower case: ``w_enc``, ``w_dec``). Architecture JumpReLU, encoded as the Gemma
Scope tutorial and SAELens' Gemma Scope loader do: ``pre = x @ W_enc + b_enc``,
``acts = relu(pre) * (pre > threshold)``, with **no** ``b_dec`` subtracted from the input
(``apply_b_dec_to_input = False``), no normalisation, BOS prepended.

Which (layer, stream): from, in this order,
1. a ``sae-discover.json`` sidecar (see :mod:`ingest.saes.layout`);
2. Gemma Scope 2's ``config.json`` next to the weights: ``hf_hook_point_in`` ``model.layers.N.output``
   → ``resid_post`` N, ``model.layers.N.post_feedforward_layernorm.output`` → ``mlp_out`` N;
3. the folder layout: the layer from a ``layer_N`` folder (``layer_20/width_16k/average_l0_71``,
   ``resid_post/layer_12_width_16k_l0_small``), the stream from the nearest folder naming one
   (``gemma-scope-2b-pt-res`` / ``resid_post`` → ``resid_post``; ``…-mlp`` / ``mlp_out`` → ``mlp_out``),
   looking up to four folders above the weights. With no stream named anywhere, ``resid_post``
   (the "res" releases, by far the most used).
Attention SAEs (``…-att``, ``attn_out_all``) read ``hook_z`` (per-head outputs before ``o_proj``) and
transcoders / crosscoders read other points: none is one of our four streams, so they are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ingest.saes import layout
from ingest.saes.base import SAE, SAEConfig, SAEError
from ingest.saes.saelens import hook_name

WEIGHT_FILES = ("params.safetensors", "params.npz")
CONFIG_FILE = "config.json"
REQUIRED = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
_LAYER_RE = re.compile(r"^layer_(\d+)(?:_|$)")
_HF_POINTS = {r"model\.layers\.(\d+)\.output": "resid_post",
              r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output": "mlp_out",
              r"model\.layers\.(\d+)\.post_attention_layernorm\.output": "attn_out"}
_STREAM_WORDS = {"res": "resid_post", "resid_post": "resid_post", "resid_post_all": "resid_post",
                 "mlp": "mlp_out", "mlp_out": "mlp_out", "mlp_out_all": "mlp_out",
                 "resid_pre": "resid_pre"}
_REFUSED_WORDS = {"att": "attention SAEs (they read hook_z, the per-head outputs before o_proj)",
                  "attn_out_all": "attention SAEs (they read hook_z, the per-head outputs before o_proj)",
                  "transcoder": "transcoders", "transcoders": "transcoders", "transcoder_all": "transcoders",
                  "clt": "cross-layer transcoders", "crosscoder": "crosscoders"}


def weights_file(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def is_folder(folder: Path) -> bool:
    return weights_file(folder) is not None


def _published_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError("sae_id", f"{file}: not readable JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _words(name: str) -> list[str]:
    """A folder name's candidate stream words: the whole name and its ``-``-separated parts."""
    return [name.lower(), *name.lower().split("-")]


def locate(folder: Path) -> tuple[int, str]:
    """(layer, stream) of the Gemma Scope SAE in ``folder`` (see the module docstring for the rules)."""
    side, side_file = layout.read_sidecar(folder)
    layer, stream = layout.hook_from_sidecar(side, side_file)
    published = _published_config(folder)
    kind = str(published.get("type", "sae")).lower()
    if kind != "sae" or published.get("affine_connection"):
        raise SAEError("sae_id", f"{folder}: a Gemma Scope {kind}{' with an affine skip' if kind == 'sae' else ''} "
                       "is not an SAE on one of the streams resid_pre/resid_post/mlp_out/attn_out; not supported")
    point = published.get("hf_hook_point_in")
    if point and (layer is None or stream is None):
        for pattern, name in _HF_POINTS.items():
            match = re.fullmatch(pattern, point)
            if match:
                layer = int(match.group(1)) if layer is None else layer
                stream = stream or name
                break
        else:
            raise SAEError("sae_id", f"{folder / CONFIG_FILE}: hf_hook_point_in {point!r} is not one of the supported "
                           "streams (model.layers.N.output = resid_post, "
                           "model.layers.N.post_feedforward_layernorm.output = mlp_out)")
    for place in layout.ancestors(folder):
        if layer is None:
            match = _LAYER_RE.match(place.name)
            if match:
                layer = int(match.group(1))
        if stream is None:
            for word in _words(place.name):
                if word in _REFUSED_WORDS:
                    raise SAEError("sae_id", f"{folder}: Gemma Scope {_REFUSED_WORDS[word]} (folder {place.name!r}) are not "
                                   "supported; only resid_post / mlp_out SAEs are, or say the hook in "
                                   f"{layout.SIDECAR}")
                if word in _STREAM_WORDS:
                    stream = _STREAM_WORDS[word]
                    break
    if layer is None:
        raise SAEError("sae_id", f"{folder}: cannot tell which layer this Gemma Scope SAE reads: no layer_N folder, "
                       f"no config.json hf_hook_point_in; add {layout.SIDECAR} with "
                       '{"hook_name": "blocks.<layer>.hook_<stream>"}')
    return layer, stream or "resid_post"


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    raw = layout.npz_shapes(file) if file.suffix == ".npz" else layout.safetensors_shapes(file)
    return {k.lower(): v for k, v in raw.items()}


def read_config(folder: Path) -> SAEConfig:
    """The config from the layout, sidecar and the weight shapes (headers only; no weights loaded)."""
    file = weights_file(folder)
    if file is None:
        raise SAEError("sae_id", f"{folder}: no {' or '.join(WEIGHT_FILES)}")
    shapes = _shapes(file)
    missing = [k for k in REQUIRED if k not in shapes]
    if missing:
        raise SAEError("sae_id", f"weights {file}: missing arrays {missing} (has {sorted(shapes)})")
    if any("skip" in k for k in shapes):
        raise SAEError("sae_id", f"weights {file}: has a skip connection ({[k for k in shapes if 'skip' in k]}): "
                       "a transcoder, not supported")
    if len(shapes["w_enc"]) != 2:
        raise SAEError("sae_id", f"weights {file}: W_enc must be 2-d [d_in, d_sae], got shape {shapes['w_enc']}")
    layer, stream = locate(folder)
    side, _ = layout.read_sidecar(folder)
    published = _published_config(folder)
    d_in, d_sae = shapes["w_enc"]
    cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", hook_name=hook_name(layer, stream),
                    layer=layer, stream=stream,
                    apply_b_dec_to_input=bool(side.get("apply_b_dec_to_input", False)),
                    prepend_bos=bool(side.get("prepend_bos", True)),
                    model_name=str(side.get("model_name") or published.get("model_name") or ""),
                    extra={"format": "gemmascope", "file": file.name})
    cfg.check()
    return cfg


def load(folder: Path, source: str = "") -> SAE:
    """Load one Gemma Scope SAE (numpy ``allow_pickle=False`` or safetensors; never unpickled)."""
    cfg = read_config(folder)
    file = weights_file(folder)
    assert file is not None
    if file.suffix == ".npz":
        arrays = {k.lower(): torch.from_numpy(np.ascontiguousarray(v)) for k, v in layout.load_npz(file).items()}
    else:
        arrays = {k.lower(): v for k, v in layout.load_safetensors(file).items()}
    for name, value in arrays.items():
        if not value.is_floating_point():
            raise SAEError("sae_id", f"weights {file}: array {name} has dtype {value.dtype}, expected floating point")
    return SAE(cfg=cfg, W_enc=arrays["w_enc"], b_enc=arrays["b_enc"], W_dec=arrays["w_dec"], b_dec=arrays["b_dec"],
               threshold=arrays["threshold"], source=source or str(folder))


def files(folder: Path) -> list[Path]:
    """The files that fix this SAE (for its fingerprint)."""
    out = [f for f in (weights_file(folder), folder / CONFIG_FILE) if f is not None and f.is_file()]
    _, side = layout.read_sidecar(folder)
    return out + ([side] if side else [])
