"""Which (layer, stream) an SAE file reads, for formats that do not say it in TransformerLens terms.

Gemma Scope and EleutherAI sparsify store no ``hook_name``; their folder layout does (``layer_20/…``
under a ``…-res`` release, ``layers.6.mlp``). Where the layout is not enough, a small sidecar
``sae-discover.json`` in the SAE's folder (or up to four folders above it) says it outright::

    {"hook_name": "blocks.20.hook_resid_post"}        # or {"layer": 20, "stream": "resid_post"}

It may also set ``prepend_bos``, ``model_name`` and (Gemma Scope) ``apply_b_dec_to_input``.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ingest.options import STREAMS
from ingest.saes.base import SAEError

SIDECAR = "sae-discover.json"
SEARCH_LEVELS = 4  # folders above an SAE's own folder that may hold its sidecar or name its release
HOOK_RE = re.compile(rf"^blocks\.(\d+)\.hook_({'|'.join(STREAMS)})$")  # TransformerLens hook names


def ancestors(folder: Path, levels: int = SEARCH_LEVELS) -> list[Path]:
    """``folder`` and up to ``levels`` folders above it, nearest first."""
    folder = folder.resolve()
    return [folder, *list(folder.parents)[:levels]]


def read_sidecar(folder: Path) -> tuple[dict, Path | None]:
    """The nearest ``sae-discover.json`` at or above ``folder`` (and its path), or ``({}, None)``."""
    for place in ancestors(folder):
        file = place / SIDECAR
        if file.is_file():
            return read_json_object(file), file
    return {}, None


def hook_from_sidecar(data: dict, file: Path | None) -> tuple[int | None, str | None]:
    """(layer, stream) named by a sidecar; either may be None when the sidecar leaves it to the layout."""
    if "hook_name" in data:
        match = HOOK_RE.match(str(data["hook_name"]))
        if not match:
            raise SAEError("sae_id", f"{file}: hook_name must look like 'blocks.<layer>.hook_<{'|'.join(STREAMS)}>', "
                           f"got {data['hook_name']!r}")
        return int(match.group(1)), match.group(2)
    layer, stream = data.get("layer"), data.get("stream")
    if stream is not None and stream not in STREAMS:
        raise SAEError("sae_id", f"{file}: stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    if layer is not None and (not isinstance(layer, int) or layer < 0):
        raise SAEError("sae_id", f"{file}: layer must be a non-negative integer, got {layer!r}")
    return layer, stream


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object; anything else is an SAEError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEError("sae_id", f"{file}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SAEError("sae_id", f"{file}: expected a JSON object")
    return data


def load_safetensors(file: Path) -> dict:
    """All tensors of a safetensors file (no pickle involved); a bad file is an SAEError naming it."""
    try:
        return load_file(str(file))
    except (OSError, SafetensorError, ValueError) as exc:
        raise SAEError("sae_id", f"weights {file}: not a readable safetensors file ({exc})") from exc


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no tensor data is read)."""
    try:
        with safe_open(str(file), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as exc:
        raise SAEError("sae_id", f"weights {file}: not a readable safetensors file ({exc})") from exc


def npz_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Array names and shapes from an ``.npz`` (each member's .npy header only; nothing unpickled)."""
    try:
        with zipfile.ZipFile(file) as zf:
            shapes = {}
            for name in zf.namelist():
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(fh)
                shapes[name.removesuffix(".npy")] = tuple(shape)
            return shapes
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, struct.error) as exc:
        raise SAEError("sae_id", f"weights {file}: not a readable .npz file ({exc})") from exc


def load_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, with ``allow_pickle=False`` (an object array is refused, never unpickled)."""
    try:
        with np.load(file, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, KeyError, struct.error) as exc:
        raise SAEError("sae_id", f"weights {file}: not a readable .npz file ({exc})") from exc
