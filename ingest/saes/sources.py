"""An SAE *source* (what ``sae_id`` names): one or more SAEs, one per (layer, stream) hook.

Formats, detected from the files present (weights load with safetensors/numpy only, never pickle):
- a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``), or a folder of them (one per hook).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ingest.saes import saelens
from ingest.saes.base import SAE, SAEError


def file_fingerprint(*files: Path) -> str:
    """Hash of each file's bytes (small files) or size and both ends (large ones): cheap, no load."""
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


@dataclass
class SAESource:
    """The hooks a source offers, each loadable on demand (a 7B model's SAEs are large)."""

    sae_id: str
    root: Path
    hooks: dict[tuple[int, str], Path] = field(default_factory=dict)
    _loaded: dict[tuple[int, str], SAE] = field(default_factory=dict)

    def folder(self, layer: int, stream: str) -> Path:
        if (layer, stream) not in self.hooks:
            have = ", ".join(f"layer {lyr} {s}" for lyr, s in sorted(self.hooks)) or "none"
            raise SAEError(f"layers/streams: SAE source {self.sae_id!r} has no SAE for layer {layer} {stream}; "
                           f"it has: {have}")
        return self.hooks[(layer, stream)]

    def fingerprint(self, layer: int, stream: str) -> str:
        folder = self.folder(layer, stream)
        return file_fingerprint(folder / saelens.CFG_FILE, folder / saelens.WEIGHTS_FILE)

    def config(self, layer: int, stream: str):
        return saelens.read_config(self.folder(layer, stream))

    def load(self, layer: int, stream: str) -> SAE:
        key = (layer, stream)
        if key not in self._loaded:
            self._loaded[key] = saelens.load(self.folder(layer, stream), source=self.sae_id)
        return self._loaded[key]


def open_source(sae_id: str, path: str | Path) -> SAESource:
    """Find the SAEs under ``path`` and index them by (layer, stream), reading configs only."""
    root = Path(path)
    if not root.exists():
        raise SAEError(f"sae_id: {sae_id!r} → {root} does not exist")
    folders = [root] if (root / saelens.CFG_FILE).exists() else sorted(
        p.parent for p in root.glob(f"*/{saelens.CFG_FILE}"))
    if not folders:
        raise SAEError(f"sae_id: no SAE found in {root} (expected a SAELens folder with cfg.json + "
                       "sae_weights.safetensors, or a folder of them)")
    source = SAESource(sae_id=sae_id, root=root)
    for folder in folders:
        cfg = saelens.read_config(folder)
        source.hooks[(cfg.layer, cfg.stream)] = folder
    return source
