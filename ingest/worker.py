"""A run: text or prompt (+ generation) → tokens → captured streams → top-K tokens → sparse SAE codes.

The output is a :class:`RunBatch` of pyarrow tables (schema in ``catalog/store.py``); this module
never touches the catalog. Codes are computed in token chunks and only nonzeros are kept, so no
dense [tokens × d_sae] matrix exists for more than ``chunk`` tokens at a time.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ingest.generate import entropy, generate, keep_top_k, norm_proxy
from ingest.models import LoadedModel, ModelError
from ingest.saes.base import SAE, SAEError

ENCODE_CHUNK = 4096
LOGITS_BUDGET = 1 << 28  # elements of a micro-batch's [batch, width, vocab] logits (1 GiB in fp32)


@dataclass
class RunSpec:
    """Everything that fixes a run's activations (the ranking options are not here)."""

    prompt: str | None = None
    text: str | None = None
    generate: bool = True
    gen_tokens: int = 128
    seed: int = 42
    temperature: float = 1.0
    top_p: float = 1.0
    hooks: list[tuple[int, str]] = field(default_factory=lambda: [(22, "resid_pre")])
    token_proxy: str = "entropy"
    topk_tokens_per_seq: int = 64
    restrict_features: list[int] = field(default_factory=list)

    @property
    def mode(self) -> str:
        if self.text is not None:
            return "text"
        return "prompt+gen" if self.generate and self.gen_tokens > 0 else "prompt"


@dataclass
class RunBatch:
    tokens: pa.Table
    activations: pa.Table
    n_tokens: int
    n_kept: int
    timings: dict[str, float]


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (leading spaces kept, even for
    SentencePiece), so that the pieces join to the decoded text.

    Incremental detokenization (as LLM servers stream text): decode from a short left context and
    print what is new once it does not end in U+FFFD, so a character split over several tokens
    (byte-level BPE, byte fallback) is printed whole by the token that completes it and the others
    get "". With a byte-level decoder a token of whole characters after another reads the same in
    any context: its piece is its own decode, kept per tokenizer (most tokens take that path).
    """
    ids = [int(i) for i in ids]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    solo = _solo_decodes(tokenizer, backend, ids) if fast else {}
    byte_level = fast and type(backend.decoder).__name__ == "ByteLevel"

    def decode(seq: list[int]) -> str:
        if not seq:
            return ""
        return backend.decode(seq, skip_special_tokens=False) if fast else tokenizer.decode(seq, skip_special_tokens=False)

    pieces: list[str] = []
    start = read = 0  # ids[:read] are printed; decoding starts at ``start`` for context
    printed = ""  # decode(ids[start:read])
    for i, t in enumerate(ids):
        if byte_level and read == i and "\ufffd" not in solo[t] and (i == 0 or "\ufffd" not in solo[ids[i - 1]]):
            pieces.append(solo[t])
            start = read = i + 1
            printed = ""
            continue
        text = decode(ids[start: i + 1])
        # a UTF-8 character has at most 4 bytes: pending longer than that is garbage, printed as it is
        if len(text) > len(printed) and (not text.endswith("\ufffd") or i + 1 - read >= 4):
            pieces.append(text[len(printed):] if text.startswith(printed) else decode([t]))
            start, read = read, i + 1
            printed = decode(ids[start:read])
        else:
            pieces.append("")
    if read < len(ids) and pieces:  # the sequence ends inside a character: print what is left
        pieces[-1] += decode(ids[start:])[len(printed):]
    return pieces


_SOLO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → {token id: its decode alone}


def _solo_decodes(tokenizer, backend, ids: list[int]) -> dict[int, str]:
    """Each token decoded alone, kept per tokenizer (one Rust batch for the ids not seen before)."""
    cache = _SOLO.setdefault(tokenizer, {})
    missing = list({t for t in ids if t not in cache})
    cache.update(zip(missing, backend.decode_batch([[t] for t in missing], skip_special_tokens=False), strict=True))
    return cache


def encode_ids(loaded: LoadedModel, text: str, prepend_bos: bool) -> list[int]:
    """Tokenize without the tokenizer's own specials, then prepend BOS (as SAELens does) if asked and known.

    Encoders (BERT-style) are tokenized with their own specials ([CLS] … [SEP]), truncated to the
    context with the closing special kept; those positions are stored but never analysed.
    """
    tok = loaded.tokenizer
    if loaded.is_encoder:
        return list(tok(text, add_special_tokens=True, truncation=True, max_length=loaded.context_length)["input_ids"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if prepend_bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return ids


def sparse_codes(sae: SAE, x: torch.Tensor, positions: np.ndarray, features: tuple[int, ...] | None,
                 chunk: int = ENCODE_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonzero (position, feature_id, act) triples of ``sae.encode(x)``, computed ``chunk`` tokens at a time."""
    if x.shape[-1] != sae.cfg.d_in:
        raise SAEError(f"sae d_in: the SAE for {sae.cfg.hook_name} expects width {sae.cfg.d_in}, "
                       f"the hooked activation has width {x.shape[-1]}")
    out_pos, out_feat, out_act = [], [], []
    feature_ids = np.asarray(features, dtype=np.int32) if features is not None else None
    with torch.inference_mode():
        for start in range(0, x.shape[0], chunk):
            codes = sae.encode(x[start:start + chunk].to(sae.W_enc.device), features)
            rows, cols = torch.nonzero(codes, as_tuple=True)  # one pass; the gather below touches only nonzeros
            acts = codes[rows, cols].float().cpu().numpy()
            rows, cols = rows.cpu().numpy(), cols.cpu().numpy().astype(np.int32)
            out_pos.append(positions[start + rows])
            out_feat.append(feature_ids[cols] if feature_ids is not None else cols)
            out_act.append(acts)
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))  # noqa: E731
    return cat(out_pos, np.int32), cat(out_feat, np.int32), cat(out_act, np.float32)


def activation_table(parts: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                     extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Stack per-SAE triples into the activations batch (position, sae_index, feature_id, act)."""
    pos, idx, feat, act = [], [], [], []
    for sae_index, p, f, a in parts:
        pos.append(p)
        idx.append(np.full(len(p), sae_index, dtype=np.int16))
        feat.append(f)
        act.append(a)
    cols = {"position": np.concatenate(pos) if pos else np.zeros(0, np.int32),
            "sae_index": np.concatenate(idx) if idx else np.zeros(0, np.int16),
            "feature_id": np.concatenate(feat) if feat else np.zeros(0, np.int32),
            "act": np.concatenate(act) if act else np.zeros(0, np.float32)}
    return pa.table({**(extra or {}), **cols})


def _special_mask(loaded: LoadedModel, ids: list[int], prepend_bos: bool) -> torch.Tensor:
    """Special tokens (BOS, EOS, pads...) are stored but never analysed."""
    tok = loaded.tokenizer
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    mask = torch.tensor([i in special_ids for i in ids], dtype=torch.bool)
    if prepend_bos and tok.bos_token_id is not None and ids:
        mask[0] = True
    return mask


def _sequence(loaded: LoadedModel, spec: RunSpec, prepend_bos: bool, timings: dict) -> tuple[list[int], int]:
    """The run's token ids (prompt + seeded generation, or the text) and the prompt length."""
    t0 = time.perf_counter()
    source = spec.text if spec.text is not None else spec.prompt
    ids = encode_ids(loaded, source or "", prepend_bos)[: loaded.context_length]
    n_prompt = len(ids)
    if spec.text is None and spec.generate:
        if loaded.is_encoder:
            raise ModelError(f"generate: {loaded.model_id} is an encoder ({loaded.family}) and cannot generate; "
                             "send `text` (or generate=false)")
        budget = min(spec.gen_tokens, loaded.context_length - n_prompt)
        out = generate(loaded.model, torch.tensor([ids], device=loaded.device), budget, spec.seed, spec.temperature,
                       spec.top_p, eos_token_id=loaded.tokenizer.eos_token_id)
        ids = out[0].tolist()
        timings["generate_s"] = time.perf_counter() - t0
    return ids, n_prompt


def _needs_logits(spec: RunSpec, n_candidates: int) -> bool:
    return spec.token_proxy == "entropy" and spec.topk_tokens_per_seq < n_candidates


def _select(specs: Sequence[RunSpec], hooks: list[tuple[int, str]], candidates: torch.Tensor, captured: dict,
            logits: torch.Tensor | None, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's token proxies and kept masks ([batch, width], CPU), every row at once: the norm
    proxy from the captured streams, entropy from the logits where a row asks for it and they exist
    (not after an early stop, never for encoders); the top-K filter per row, specials never kept."""
    by_entropy = [logits is not None and spec.token_proxy == "entropy" for spec in specs]
    if all(by_entropy):
        proxy = torch.zeros(candidates.shape, dtype=torch.float64)
    else:
        proxy = norm_proxy([captured[h] for h in hooks], candidates.to(captured[hooks[0]].device)).cpu()
    for row, use in enumerate(by_entropy):
        if use:  # row by row: one [length, vocab] softmax at a time, not [batch, width, vocab]
            proxy[row, : lengths[row]] = entropy(logits[row, : lengths[row]]).double().cpu()
    ks = torch.tensor([spec.topk_tokens_per_seq for spec in specs])
    return proxy, keep_top_k(proxy, candidates, ks)


def _encode_kept(saes: Sequence[SAE], hooks: list[tuple[int, str]], captured: dict, kept: torch.Tensor,
                 restricts: list[tuple[int, ...] | None]) -> list[list[tuple]]:
    """Sparse codes of the kept tokens of a micro-batch (``kept`` [batch, width]): one encode per (hook,
    restrict set) over all its rows — one large GEMM, not one per sequence — split back into each
    row's ``(sae_index, position, feature_id, act)`` parts."""
    out: list[list[tuple]] = [[] for _ in restricts]
    groups: dict[tuple[int, ...] | None, list[int]] = {}
    for row, features in enumerate(restricts):
        groups.setdefault(features, []).append(row)
    for features, members in groups.items():
        mask = torch.zeros_like(kept)
        mask[members] = kept[members]
        owner, positions = (t.numpy() for t in torch.nonzero(mask, as_tuple=True))  # row-major: rows in order
        flat = np.arange(len(owner), dtype=np.int32)
        row_starts = np.searchsorted(owner, np.arange(len(restricts) + 1))  # each row's slice of ``flat``
        for sae_index, (hook, sae) in enumerate(zip(hooks, saes, strict=True)):
            where, feat, act = sparse_codes(sae, captured[hook][mask.to(captured[hook].device)], flat, features)
            cuts = np.searchsorted(where, row_starts)  # ``where`` ascends, so each row's triples are contiguous
            for row in members:
                part = slice(cuts[row], cuts[row + 1])
                out[row].append((sae_index, positions[where[part]].astype(np.int32), feat[part], act[part]))
    return out


def _assemble(loaded: LoadedModel, ids: list[int], n_prompt: int, is_special: torch.Tensor, proxy: torch.Tensor,
              kept: torch.Tensor, parts: list[tuple], timings: dict) -> RunBatch:
    """One sequence's columnar batch: its tokens (with proxy and kept flags) and its sparse codes."""
    n = len(ids)
    tokens = pa.table({
        "position": pa.array(np.arange(n, dtype=np.int32)),
        "token_id": pa.array(np.asarray(ids, dtype=np.int32)),
        "token": pa.array(token_pieces(loaded.tokenizer, ids), pa.string()),  # typed: no per-call dateutil probe
        "is_generated": pa.array(np.arange(n) >= n_prompt),
        "is_special": pa.array(is_special.numpy()),
        "kept": pa.array(kept.numpy()),
        "proxy": pa.array(proxy.double().numpy()),
    })
    return RunBatch(tokens=tokens, activations=activation_table(parts), n_tokens=n, n_kept=int(kept.sum()),
                    timings=timings)


def run_many(loaded: LoadedModel, saes: Sequence[SAE], specs: Sequence[RunSpec], batch_size: int = 16) -> list[RunBatch]:
    """Several runs over the same hooks: generation one prompt at a time (each has its own seed), then
    the analysis forward passes in right-padded micro-batches of similar length. Causal models see the
    same prefix for every real token, so each run's codes equal a one-at-a-time run (to float rounding).
    """
    if not specs:
        return []
    hooks = specs[0].hooks
    if any(s.hooks != hooks for s in specs):
        raise ValueError("run_many: every spec must use the same hooks")
    prepend_bos = all(s.cfg.prepend_bos for s in saes)
    timings = [{} for _ in specs]
    seqs = [_sequence(loaded, spec, prepend_bos, t) for spec, t in zip(specs, timings, strict=True)]
    special = [_special_mask(loaded, ids, prepend_bos) for ids, _ in seqs]
    wants_logits = [_needs_logits(spec, int((~m).sum())) for spec, m in zip(specs, special, strict=True)]
    results: list[RunBatch | None] = [None] * len(specs)
    vocab = loaded.model.config.get_text_config().vocab_size if hasattr(loaded.model, "config") else 0
    for logits_group in (False, True):
        order = sorted((i for i in range(len(specs)) if wants_logits[i] == logits_group), key=lambda i: len(seqs[i][0]))
        widths = [len(seqs[i][0]) * (vocab if logits_group else 1) for i in order]
        for chunk in _micro_batches(order, widths, batch_size, LOGITS_BUDGET if logits_group else None):
            ids, mask, candidates = _padded(loaded, [seqs[i][0] for i in chunk], [special[i] for i in chunk])
            t1 = time.perf_counter()
            captured, logits = loaded.capture(ids.to(loaded.device), hooks, attention_mask=mask.to(loaded.device),
                                              stop_early=not logits_group)
            forward_s = (time.perf_counter() - t1) / len(chunk)
            t2 = time.perf_counter()
            lengths = [len(seqs[i][0]) for i in chunk]
            proxy, kept = _select([specs[i] for i in chunk], hooks, candidates, captured, logits, lengths)
            restricts = [tuple(sorted(set(specs[i].restrict_features))) or None for i in chunk]
            parts = _encode_kept(saes, hooks, captured, kept, restricts)  # only kept tokens, the chunk's rows together
            encode_s = (time.perf_counter() - t2) / len(chunk)
            for row, (i, n) in enumerate(zip(chunk, lengths, strict=True)):
                timings[i].update(forward_s=forward_s, encode_s=encode_s)
                results[i] = _assemble(loaded, seqs[i][0], seqs[i][1], special[i], proxy[row, :n], kept[row, :n],
                                       parts[row], timings[i])
    return results  # type: ignore[return-value]


def _padded(loaded: LoadedModel, seqs: list[list[int]], special: list[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch right-padded to its longest sequence: ids, attention mask, and the candidate
    positions (real and not special) — the only ones ever analysed."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    candidates = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (seq, is_special) in enumerate(zip(seqs, special, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        candidates[row, : len(seq)] = ~is_special
    return ids, mask, candidates


def _micro_batches(order: list[int], sizes: list[int], batch_size: int, budget: int | None) -> Iterator[list[int]]:
    """Consecutive rows of ``order`` (sorted by length) in groups of at most ``batch_size`` whose
    rows × largest size stays within ``budget`` (the logits' [batch, width, vocab] elements), one row at least."""
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_size and (budget is None or (end - start + 1) * sizes[end] <= budget):
            end += 1
        yield order[start:end]
        start = end


def run(loaded: LoadedModel, saes: Sequence[SAE], spec: RunSpec) -> RunBatch:
    """Execute one run for ``saes`` (aligned with ``spec.hooks``)."""
    return run_many(loaded, saes, [spec])[0]


def calibration_batches(loaded: LoadedModel, saes: Sequence[SAE], hooks: list[tuple[int, str]],
                        docs: Sequence[str], batch_size: int = 16) -> tuple[pa.Table, pa.Table]:
    """Every non-special token of every document through model + SAEs (one sequence per document,
    BOS prepended, truncated at the context length): the run path with every candidate kept.
    Right-padded micro-batches: causal models see the same prefix for every real token, so codes
    equal one-document-at-a-time runs."""
    prepend_bos = all(s.cfg.prepend_bos for s in saes)
    seqs = [encode_ids(loaded, d, prepend_bos)[: loaded.context_length] for d in docs]
    token_cols: dict[str, list] = {"doc": [], "position": [], "token_id": [], "token": []}
    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    docs_col: list[np.ndarray] = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask, kept = _padded(loaded, [seqs[i] for i in batch],
                                  [_special_mask(loaded, seqs[i], prepend_bos) for i in batch])
        captured, _ = loaded.capture(ids.to(loaded.device), hooks, attention_mask=mask.to(loaded.device))
        for row, (i, row_parts) in enumerate(zip(batch, _encode_kept(saes, hooks, captured, kept, [None] * len(batch)),
                                                 strict=True)):
            positions = torch.nonzero(kept[row]).flatten().tolist()
            pieces = token_pieces(loaded.tokenizer, seqs[i])
            token_cols["doc"] += [i] * len(positions)
            token_cols["position"] += positions
            token_cols["token_id"] += [seqs[i][j] for j in positions]
            token_cols["token"] += [pieces[j] for j in positions]
            parts += row_parts
            docs_col += [np.full(len(part[1]), i, np.int32) for part in row_parts]
    tokens = pa.table({"doc": pa.array(token_cols["doc"], pa.int32()),
                       "position": pa.array(token_cols["position"], pa.int32()),
                       "token_id": pa.array(token_cols["token_id"], pa.int32()),
                       "token": pa.array(token_cols["token"], pa.string())})
    acts = activation_table(parts, {"doc": np.concatenate(docs_col) if docs_col else np.zeros(0, np.int32)})
    return tokens, acts


@torch.inference_mode()
def promoted_tokens(loaded: LoadedModel, sae: SAE, top: int = 5, chunk: int = 2048) -> dict[int, list[str]]:
    """The tokens each feature's decoder direction promotes most through the unembedding (logit lens).

    Encoders loaded without a head use the input embeddings (BERT ties its MLM decoder to them).
    """
    head = loaded.model.get_output_embeddings() or loaded.model.get_input_embeddings()
    unembed = head.weight.detach().float()  # [vocab, d_model]
    out: dict[int, list[str]] = {}
    tok = loaded.tokenizer
    for start in range(0, sae.cfg.d_sae, chunk):
        logits = sae.W_dec[start:start + chunk].to(unembed.device) @ unembed.T
        best = torch.topk(logits, min(top, logits.shape[-1]), dim=-1).indices.cpu().tolist()
        for offset, ids in enumerate(best):
            out[start + offset] = [tok.decode([i]) for i in ids]
    return out


# -- worker processes (batch mode with --workers N) ------------------------------------------------
_POOL_STATE: dict = {}


def init_worker_process(n_workers: int, device: str, dtype: str) -> None:
    """Split the CPU threads between workers; give each worker its own GPU where there are several."""
    import os

    from ingest.models import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        import multiprocessing

        ident = multiprocessing.current_process()._identity
        device = f"cuda:{(ident[0] - 1) % torch.cuda.device_count() if ident else 0}"
    _POOL_STATE.update(device=device, dtype=dtype)


def pool_run(model_id: str, model_source: str, sae_id: str, sae_root: str, hooks: list[tuple[int, str]],
             specs: list[RunSpec]) -> tuple[list[RunBatch], int]:
    """One micro-batch in a worker process: the model and SAEs are loaded once per process and kept."""
    from ingest.models import load_model
    from ingest.saes.sources import open_source

    key = (model_source, sae_root)
    if _POOL_STATE.get("key") != key:
        loaded = load_model(model_id, model_source, _POOL_STATE.get("device", "auto"), _POOL_STATE.get("dtype", "float32"))
        _POOL_STATE.update(key=key, loaded=loaded, source=open_source(sae_id, sae_root))
    loaded, source = _POOL_STATE["loaded"], _POOL_STATE["source"]
    saes = [source.load(layer, stream).to(loaded.device) for layer, stream in hooks]
    return run_many(loaded, saes, specs), loaded.d_model
