"""Models, tokenizers and SAE sources, resolved from registry ids and loaded once per process.

A long-lived process (the API server) keeps them across requests; ``max_models`` bounds how many
models stay loaded (least recently used dropped first; a run still using one keeps its reference).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ingest.models import LoadedModel, ModelCard, load_model, read_card, resolve_device
from ingest.saes.sources import SAESource, file_fingerprint, open_source
from ingest.threads import apply_threads
from sae_discover.registry import ModelEntry, Registry


class Loaders:
    """Registry lookups plus the model, card and SAE-source caches of one process and device.

    ``threads`` (``--threads``) is this process's torch CPU thread count; None: ``ingest.threads``' rule
    for the model in use. It changes no activation, so it is no part of a run's identity.
    """

    def __init__(self, registry: Registry, device: str = "auto", dtype: str = "float32", allow_paths: bool = True,
                 max_models: int | None = None, threads: int | None = None) -> None:
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.allow_paths = allow_paths
        self.max_models = max_models
        self._models: dict[str, LoadedModel] = {}
        self._cards: dict[str, ModelCard] = {}
        self._sources: dict[str, SAESource] = {}
        self._lock = threading.RLock()
        self._sized_for: str | None = None  # the model the torch thread count was last chosen for
        # told of each model card once, when first read (Discovery: a catalog adopts its new fingerprint)
        self.on_card: Callable[[ModelEntry, ModelCard], object] | None = None

    def entry(self, model_id: str) -> ModelEntry:
        return self.registry.model(model_id, self.allow_paths)

    def card(self, entry: ModelEntry) -> ModelCard:
        """The model's config facts (family, layers, weights fingerprint) without loading its weights."""
        with self._lock:
            if entry.source not in self._cards:
                card = read_card(entry.source)
                if self.on_card is not None:
                    self.on_card(entry, card)
                self._cards[entry.source] = card
            return self._cards[entry.source]

    def model(self, entry: ModelEntry) -> LoadedModel:
        with self._lock:
            if entry.source not in self._models:
                self._models[entry.source] = load_model(entry.id, entry.source, self.device, self.dtype)
            loaded = self._models.pop(entry.source)
            self._models[entry.source] = loaded  # most recently used last
            if self._sized_for != entry.source:  # the rule sizes by the model about to run: once per switch
                apply_threads(self.threads, loaded.model)
                self._sized_for = entry.source
            if self.max_models is not None and len(self._models) > self.max_models:
                while len(self._models) > self.max_models:
                    del self._models[next(iter(self._models))]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return loaded

    def loaded_models(self) -> list[str]:
        with self._lock:
            return [m.model_id for m in self._models.values()]

    def source(self, sae_id: str) -> SAESource:
        with self._lock:
            entry = self.registry.sae(sae_id, self.allow_paths)
            if entry.path not in self._sources:
                self._sources[entry.path] = open_source(sae_id, entry.path)
            return self._sources[entry.path]

    def precision(self) -> list[str]:
        """dtype and device type: bf16 activations (or another device's kernels) make another run."""
        return [self.dtype, resolve_device(self.device).type]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# tokenizers without those (WordPiece, SentencePiece under another name): their files instead of the
# folder's path, which would make run ids depend on where the model lies
OTHER_TOKENIZER_FILES = ("vocab.txt", "spiece.model", "sentencepiece.bpe.model", "merges.txt", "tokenizer_config.json",
                         "special_tokens_map.json")


def tokenizer_fingerprint(source: str) -> str:
    """A hash of the tokenizer files of a local model (the hub id itself for remote ones)."""
    path = Path(source)
    if not path.is_dir():
        return source
    for names in (TOKENIZER_FILES, OTHER_TOKENIZER_FILES):
        files = [path / name for name in names if (path / name).exists()]
        if files:
            return file_fingerprint(*files)
    return file_fingerprint()
