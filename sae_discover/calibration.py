"""Calibration: every token of a corpus through model + SAEs → per-feature statistics (τ, mean, max,
density) and lite labels in the catalog, per (model, SAE).

Registry entries with a ``calibration_corpus`` (the demo) calibrate an SAE on its first use.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from catalog import stats
from catalog.db import Catalog
from catalog.writes import ModelInfo, SAEInfo
from ingest.lens import decoder_tokens
from ingest.run import calibration_batches
from ingest.saes.sources import SAESource, file_fingerprint
from sae_discover.errors import RequestError
from sae_discover.inputs import read_corpus
from sae_discover.loaders import Loaders
from sae_discover.plan import sae_infos
from sae_discover.registry import ModelEntry


class Calibrator:
    """Calibrations of one catalog; shares the forward lock of the process's discovery."""

    def __init__(self, catalog: Catalog, loaders: Loaders, forward_lock: threading.Lock,
                 notify: Callable[[str], None] | None = None) -> None:
        self.catalog = catalog
        self.loaders = loaders
        self.forward_lock = forward_lock
        self.notify = notify  # told before a first-use calibration starts (the CLI prints it on stderr)
        self._known: set[tuple] = set()  # (SAE, model id, fingerprint) with stats; calibrations are never deleted
        self._first_use = threading.Lock()  # two first requests must not both calibrate the same SAE

    def has_stats(self, info: SAEInfo, entry: ModelEntry) -> bool:
        """Whether this model has calibrated this SAE (thresholds are per model and SAE)."""
        fingerprint = self.loaders.card(entry).fingerprint
        key = (info, entry.id, fingerprint)
        if key not in self._known and stats.has_calibration(self.catalog, info, entry.id, fingerprint):
            self._known.add(key)
        return key in self._known

    def ensure(self, entry: ModelEntry, source: SAESource, hooks: list[tuple[int, str]]) -> list[str]:
        """Calibrate, on first use, the SAEs of a registry entry with a ``calibration_corpus``; returns notes."""
        if not entry.calibration_corpus:
            return []
        with self._first_use:
            missing = [h for h, info in zip(hooks, sae_infos(source, hooks), strict=True)
                       if not self.has_stats(info, entry)]
            if not missing:
                return []
            if self.notify is not None:
                self.notify(f"calibrating {len(missing)} SAE(s) of {source.sae_id!r} for {entry.id!r} on "
                            f"{entry.calibration_corpus} (first use; once per model and SAE)")
            self.calibrate(entry.id, source.sae_id, entry.calibration_corpus, missing,
                           progress=self.notify is not None, extend=True)
        return [f"calibrated {len(missing)} SAE(s) on {entry.calibration_corpus} (first use)"]

    def calibrate(self, model_id: str, sae_id: str, corpus: str | Path, hooks: list[tuple[int, str]] | None = None,
                  lite_labels: bool = True, progress: bool = False, extend: bool = False) -> dict:
        """Run every token of ``corpus`` through model + SAEs; store per-feature stats (and lite labels).
        ``extend`` (first use): add the SAEs to the model's newest calibration on this corpus, if any,
        rather than make another one — a ranking over SAEs calibrated one first use at a time then rests
        on one calibration, which ``calibration_id`` can pin."""
        self.catalog.require_writable("a calibration")  # refused before the model runs
        entry = self.loaders.entry(model_id)
        source = self.loaders.source(sae_id)
        card = self.loaders.card(entry)
        every = not hooks  # none asked for: every SAE of the source, which an error then names
        hooks = list(hooks or sorted(source.hooks))
        check_hooks(model_id, card.n_layers, hooks, sae_id if every else None)
        docs = read_corpus(corpus)
        loaded = self.loaders.model(entry)
        sae_objs = [source.load(layer, stream).to(loaded.device) for layer, stream in hooks]
        with self.forward_lock, tqdm(total=len(docs), desc="calibrate", unit="doc", file=sys.stderr,
                                     disable=not progress) as bar:
            tokens, acts = calibration_batches(loaded, sae_objs, hooks, docs, on_batch=bar.update)
        infos = sae_infos(source, hooks)
        model_info = ModelInfo(model_id, card.fingerprint, card.family, card.n_layers, loaded.d_model)
        corpus_hash = file_fingerprint(Path(corpus))
        into = stats.calibration_to_extend(self.catalog, model_id, card.fingerprint, corpus_hash) if extend else None
        cal_id = stats.write_calibration(self.catalog, model_info, infos, str(corpus), corpus_hash, len(docs), tokens,
                                         acts, extend=into)
        if lite_labels:
            for info, sae in zip(infos, sae_objs, strict=True):
                stats.write_lite_labels(self.catalog, cal_id, info, *decoder_tokens(loaded, sae))
        return {"calibration_id": cal_id, "n_docs": len(docs), "n_tokens": tokens.num_rows,
                "hooks": [list(h) for h in hooks], "activation_rows": acts.num_rows,
                "warnings": stability_warnings(stats.thin_features(self.catalog, cal_id), tokens.num_rows)}


def check_hooks(model_id: str, n_layers: int, hooks: list[tuple[int, str]], sae_id: str | None = None) -> None:
    """Every hook's layer exists in the model (before any weights load). ``sae_id``: the hooks were not
    asked for but are every hook of that SAE source, which the message says (and how to choose)."""
    for layer, _ in hooks:
        if not 0 <= layer < n_layers:
            origin = "" if sae_id is None else \
                f" (the SAE source {sae_id!r} has an SAE there; calibrate the others with --layers / --streams)"
            raise RequestError("layers", f"layer {layer} is out of range for {model_id} "
                                         f"({n_layers} layers: 0..{n_layers - 1}){origin}")


def stability_warnings(per_sae: list[dict], n_tokens: int) -> list[str]:
    """A warning per SAE whose calibration is too small for stable P95s: more than
    :data:`catalog.stats.THIN_SHARE` of the features that fired did so on fewer than
    :data:`catalog.stats.MIN_FIRINGS` tokens (their τ rests on one or two values)."""
    out = []
    for s in per_sae:
        if s["fired"] and s["thin"] / s["fired"] > stats.THIN_SHARE:
            out.append(f"corpus: {n_tokens} tokens are too few for a stable P95 at layer {s['layer']} {s['stream']}: "
                       f"{s['thin']} of the {s['fired']} features that fired ({s['thin'] / s['fired']:.0%}) did so on "
                       f"fewer than {stats.MIN_FIRINGS} tokens (rule: a feature's P95 needs at least "
                       f"{stats.MIN_FIRINGS} nonzero activations); calibrate on a larger corpus")
    return out
