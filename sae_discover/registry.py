"""The registry: short ids → models and SAE sources (``sae-discover.toml``; the demo is built in).

The HTTP API accepts registry ids only; the CLI also accepts paths and hub ids.

    [models.finance]
    path = "/models/Llama2-7b-Finance"      # or: hub = "cxllin/Llama2-7b-Finance"
    default_layers = [22]

    [saes.finance-l22]
    path = "/saes/llama2-finance"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sae_discover.request import RequestError

DEMO_DIR = Path(__file__).resolve().parent.parent / "ingest" / "demo"
DEFAULT_LAYERS = [22]  # the seed's default


@dataclass(frozen=True)
class ModelEntry:
    id: str
    source: str  # local path or hub id
    default_layers: list[int] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    calibration_corpus: str | None = None


@dataclass(frozen=True)
class SAEEntry:
    id: str
    path: str


@dataclass
class Registry:
    models: dict[str, ModelEntry] = field(default_factory=dict)
    saes: dict[str, SAEEntry] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Registry:
        reg = cls.builtin()
        file = Path(path or os.environ.get("SAE_DISCOVER_REGISTRY", "sae-discover.toml"))
        if path is not None and not file.exists():
            raise RequestError("registry", f"{file} does not exist")
        if file.exists():
            try:
                data = tomllib.loads(file.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise RequestError("registry", f"{file} is not valid TOML: {exc}") from exc
            base = file.resolve().parent
            for mid, entry in (data.get("models") or {}).items():
                src = entry.get("path") or entry.get("hub")
                if not src:
                    raise RequestError("registry", f"models.{mid} needs a path or a hub id")
                if entry.get("path"):
                    src = str((base / src).resolve())
                reg.models[mid] = ModelEntry(mid, src, list(entry.get("default_layers", DEFAULT_LAYERS)),
                                             str(base / entry["calibration_corpus"])
                                             if entry.get("calibration_corpus") else None)
            for sid, entry in (data.get("saes") or {}).items():
                if not entry.get("path"):
                    raise RequestError("registry", f"saes.{sid} needs a path")
                reg.saes[sid] = SAEEntry(sid, str((base / entry["path"]).resolve()))
        return reg

    @classmethod
    def builtin(cls) -> Registry:
        calib = str(DEMO_DIR / "calibration.jsonl")
        return cls(
            models={"demo": ModelEntry("demo", str(DEMO_DIR / "model"), [2], calib),
                    "demo-finance": ModelEntry("demo-finance", str(DEMO_DIR / "model-finance"), [2], calib)},
            saes={"demo": SAEEntry("demo", str(DEMO_DIR / "saes"))},
        )

    def model(self, model_id: str, allow_paths: bool) -> ModelEntry:
        if model_id in self.models:
            return self.models[model_id]
        if not allow_paths:
            raise RequestError("model_id", f"unknown model id {model_id!r}; registered: {', '.join(sorted(self.models))}")
        if _looks_like_path(model_id) and not Path(model_id).expanduser().is_dir():
            raise RequestError("model_id", f"{model_id!r} is neither a registered model id nor an existing "
                                           f"directory (registered: {', '.join(sorted(self.models))})")
        return ModelEntry(model_id, os.path.expanduser(model_id))  # a local directory or a hub id

    def sae(self, sae_id: str, allow_paths: bool) -> SAEEntry:
        if sae_id in self.saes:
            return self.saes[sae_id]
        if not allow_paths:
            raise RequestError("sae_id", f"unknown SAE id {sae_id!r}; registered: {', '.join(sorted(self.saes))}")
        if not Path(sae_id).exists():
            raise RequestError("sae_id", f"{sae_id!r} is neither a registered SAE id nor an existing path")
        return SAEEntry(sae_id, sae_id)


def _looks_like_path(model_id: str) -> bool:
    """A model id written as a path (absolute, ``./``, ``../``, ``~``) rather than a hub id (``org/name``):
    a missing one is said plainly, not as the hub's complaint about the id's form."""
    return model_id.startswith(("/", "./", "../", "~", ".\\")) or model_id in (".", "..")
