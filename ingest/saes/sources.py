"""An SAE *source* (what ``sae_id`` names): one or more SAEs, one per (layer, stream) hook.

Formats, detected from the files present in each folder (weights load with safetensors/numpy only,
never pickle):
- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (v5 flat or v6 ``metadata`` cfg);
- EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors``, the folder named by its hookpoint (``layers.6``);
- Gemma Scope: ``params.npz`` or ``params.safetensors`` (layer/stream from the layout or ``config.json``).

``sae_id`` may point at one SAE folder (or its weights file), or at a folder holding several (searched
up to four levels down, e.g. a sparsify run folder or a Gemma Scope ``layer_N/width_…/…`` tree). Each
(layer, stream) must resolve to exactly one SAE; two candidates for one hook is an error naming both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingest.saes import gemmascope, saelens, sparsify
from ingest.saes.base import SAE, SAEConfig, SAEError

MAX_DEPTH = 4


_FINGERPRINTS: dict[tuple, str] = {}


def _stat_key(files: tuple[Path, ...]) -> tuple:
    """Files by path, size and modification time: a cache key that changes when any file is rewritten
    (stat follows symlinks, so a re-pointed HF cache snapshot changes it too; abspath costs no syscall)."""
    return tuple((os.path.abspath(f), (st := os.stat(f)).st_size, st.st_mtime_ns) for f in files)


def file_fingerprint(*files: Path) -> str:
    """Hash of each file's bytes (small files) or size and both ends (large ones): cheap, no load.
    Kept per process until a file changes (every request names its SAEs and tokenizer by it)."""
    key = _stat_key(files)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _hash_files(files)
    return _FINGERPRINTS[key]


def _hash_files(files: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Format:
    """One on-disk format: how to recognise a folder, read its config cheaply, load it, fingerprint it."""

    name: str
    is_folder: Callable[[Path], bool]
    read_config: Callable[[Path], SAEConfig]
    load: Callable[..., SAE]
    files: Callable[[Path], list[Path]]


SAELENS = Format("saelens", lambda f: (f / saelens.CFG_FILE).is_file(), saelens.read_config, saelens.load,
                 lambda f: [f / saelens.CFG_FILE, f / saelens.WEIGHTS_FILE])
SPARSIFY = Format("sparsify", sparsify.is_folder, sparsify.read_config, sparsify.load, sparsify.files)
GEMMASCOPE = Format("gemmascope", gemmascope.is_folder, gemmascope.read_config, gemmascope.load, gemmascope.files)
FORMATS = (SPARSIFY, GEMMASCOPE, SAELENS)  # sparsify before SAELens: both have a cfg.json
WEIGHT_FILES = {saelens.WEIGHTS_FILE, sparsify.WEIGHTS_FILE, *gemmascope.WEIGHT_FILES}


def detect(folder: Path) -> Format | None:
    for fmt in FORMATS:
        if fmt.is_folder(folder):
            return fmt
    return None


@dataclass
class SAESource:
    """The hooks a source offers, each loadable on demand (a 7B model's SAEs are large)."""

    sae_id: str
    root: Path
    hooks: dict[tuple[int, str], Path] = field(default_factory=dict)
    formats: dict[tuple[int, str], Format] = field(default_factory=dict)
    _loaded: dict[tuple[int, str], SAE] = field(default_factory=dict)
    _configs: dict[tuple, SAEConfig] = field(default_factory=dict)

    def folder(self, layer: int, stream: str) -> Path:
        if (layer, stream) not in self.hooks:
            have = ", ".join(f"layer {lyr} {s}" for lyr, s in sorted(self.hooks)) or "none"
            # the stream is what is missing where the source has other streams of that layer
            missing = "streams" if any(lyr == layer for lyr, _ in self.hooks) else "layers"
            raise SAEError(missing, f"SAE source {self.sae_id!r} has no SAE for layer {layer} {stream}; "
                           f"it has: {have}")
        return self.hooks[(layer, stream)]

    def format(self, layer: int, stream: str) -> Format:
        folder = self.folder(layer, stream)
        return self.formats.get((layer, stream)) or detect(folder) or SAELENS

    def fingerprint(self, layer: int, stream: str) -> str:
        folder = self.folder(layer, stream)
        return file_fingerprint(*self.format(layer, stream).files(folder))

    def config(self, layer: int, stream: str) -> SAEConfig:
        """The SAE's config, read once per process until its files change."""
        folder = self.folder(layer, stream)
        fmt = self.format(layer, stream)
        key = (layer, stream, _stat_key(tuple(fmt.files(folder))))
        if key not in self._configs:
            self._configs[key] = fmt.read_config(folder)
        return self._configs[key]

    def load(self, layer: int, stream: str) -> SAE:
        key = (layer, stream)
        if key not in self._loaded:
            self._loaded[key] = self.format(layer, stream).load(self.folder(layer, stream), source=self.sae_id)
        return self._loaded[key]


def _candidates(root: Path) -> list[Path]:
    """SAE folders at ``root`` or below it (up to MAX_DEPTH levels), without descending into an SAE folder."""
    if detect(root):
        return [root]
    found = []
    for here, dirs, _files in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        dirs.sort()
        keep = []
        for name in dirs:
            sub = Path(here) / name
            if detect(sub):
                found.append(sub)
            elif depth + 1 < MAX_DEPTH and not name.startswith("."):
                keep.append(name)
        dirs[:] = keep
    return sorted(found)


def open_source(sae_id: str, path: str | Path) -> SAESource:
    """Find the SAEs under ``path`` and index them by (layer, stream), reading configs and headers only."""
    root = Path(path)
    if not root.exists():
        raise SAEError("sae_id", f"{sae_id!r} → {root} does not exist")
    if root.is_file():
        if root.name not in WEIGHT_FILES:
            raise SAEError("sae_id", f"{root} is a file but not an SAE weights file ({', '.join(sorted(WEIGHT_FILES))})")
        root = root.parent
    folders = _candidates(root)
    if not folders:
        raise SAEError("sae_id", f"no SAE found in {root} (expected a SAELens folder with cfg.json + "
                       "sae_weights.safetensors, a sparsify folder with cfg.json + sae.safetensors, Gemma Scope "
                       "params.npz / params.safetensors, or a folder of those)")
    source = SAESource(sae_id=sae_id, root=root)
    for folder in folders:
        fmt = detect(folder) or SAELENS
        cfg = fmt.read_config(folder)
        key = (cfg.layer, cfg.stream)
        if key in source.hooks:
            raise SAEError("sae_id", f"{sae_id!r} holds several SAEs for layer {cfg.layer} {cfg.stream}: "
                           f"{source.hooks[key]} and {folder}; point sae_id at one of them (or a folder with one per hook)")
        source.hooks[key] = folder
        source.formats[key] = fmt
    return source
