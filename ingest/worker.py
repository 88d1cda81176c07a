"""A run: text or prompt (+ generation) → tokens → captured streams → top-K tokens → sparse SAE codes.

The output is a :class:`RunBatch` of pyarrow tables (schema in ``catalog/store.py``); this module
never touches the catalog. Codes are computed in token chunks and only nonzeros are kept, so no
dense [tokens × d_sae] matrix exists for more than ``chunk`` tokens at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ingest.generate import entropy, generate, keep_top_k, norm_proxy
from ingest.models import LoadedModel
from ingest.saes.base import SAE, SAEError

ENCODE_CHUNK = 4096


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
        return "prompt+gen" if self.generate else "prompt"


@dataclass
class RunBatch:
    tokens: pa.Table
    activations: pa.Table
    n_tokens: int
    n_kept: int
    timings: dict[str, float]


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (leading spaces kept, even for
    SentencePiece), by decoding a short left context with and without the token."""
    pieces = []
    for i in range(len(ids)):
        ctx = list(ids[max(0, i - 3): i])
        before = tokenizer.decode(ctx, skip_special_tokens=False) if ctx else ""
        after = tokenizer.decode([*ctx, ids[i]], skip_special_tokens=False)
        pieces.append(after[len(before):] if after.startswith(before) else tokenizer.decode([ids[i]]))
    return pieces


def encode_ids(loaded: LoadedModel, text: str, prepend_bos: bool) -> list[int]:
    """Tokenize without the tokenizer's own specials, then prepend BOS (as SAELens does) if asked and known."""
    tok = loaded.tokenizer
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
            rows, cols = torch.nonzero(codes, as_tuple=True)
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


def run(loaded: LoadedModel, saes: Sequence[SAE], spec: RunSpec) -> RunBatch:
    """Execute one run for ``saes`` (aligned with ``spec.hooks``)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tok = loaded.tokenizer
    prepend_bos = all(s.cfg.prepend_bos for s in saes)
    source = spec.text if spec.text is not None else spec.prompt
    ids = encode_ids(loaded, source or "", prepend_bos)
    ctx = loaded.context_length
    if len(ids) > ctx:
        ids = ids[:ctx]
    n_prompt = len(ids)
    device = loaded.device
    input_ids = torch.tensor([ids], device=device)
    if spec.text is None and spec.generate:
        budget = min(spec.gen_tokens, ctx - n_prompt)
        input_ids = generate(loaded.model, input_ids, budget, spec.seed, spec.temperature, spec.top_p,
                             eos_token_id=tok.eos_token_id)
        timings["generate_s"] = time.perf_counter() - t0
    all_ids = input_ids[0].tolist()
    n = len(all_ids)
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    is_special = torch.tensor([i in special_ids for i in all_ids], dtype=torch.bool)
    if prepend_bos and tok.bos_token_id is not None and n:
        is_special[0] = True  # the prepended BOS is never analysed
    candidates = ~is_special
    need_proxy = spec.topk_tokens_per_seq < int(candidates.sum())
    t1 = time.perf_counter()
    captured, logits = loaded.capture(input_ids, spec.hooks,
                                      stop_early=not (need_proxy and spec.token_proxy == "entropy"))
    timings["forward_s"] = time.perf_counter() - t1
    if spec.token_proxy == "entropy" and logits is not None:
        proxy = entropy(logits[0]).cpu()
    else:
        proxy = norm_proxy([captured[h][0] for h in spec.hooks], candidates)
    kept = keep_top_k(proxy, candidates, spec.topk_tokens_per_seq)
    kept_pos = torch.nonzero(kept).flatten()
    positions = kept_pos.numpy().astype(np.int32)
    t2 = time.perf_counter()
    features = tuple(sorted(set(spec.restrict_features))) or None
    parts = []
    for sae_index, (hook, sae) in enumerate(zip(spec.hooks, saes, strict=True)):
        x = captured[hook][0][kept_pos.to(captured[hook].device)]
        parts.append((sae_index, *sparse_codes(sae, x, positions, features)))
    timings["encode_s"] = time.perf_counter() - t2
    pieces = token_pieces(tok, all_ids)
    tokens = pa.table({
        "position": pa.array(np.arange(n, dtype=np.int32)),
        "token_id": pa.array(np.asarray(all_ids, dtype=np.int32)),
        "token": pieces,
        "is_generated": pa.array(np.arange(n) >= n_prompt),
        "is_special": pa.array(is_special.numpy()),
        "kept": pa.array(kept.numpy()),
        "proxy": pa.array(proxy.double().numpy()),
    })
    timings["total_ingest_s"] = time.perf_counter() - t0
    return RunBatch(tokens=tokens, activations=activation_table(parts), n_tokens=n, n_kept=len(positions),
                    timings=timings)


def calibration_batches(loaded: LoadedModel, saes: Sequence[SAE], hooks: list[tuple[int, str]],
                        docs: Sequence[str], batch_size: int = 16) -> tuple[pa.Table, pa.Table]:
    """Every non-special token of every document through model + SAEs (one sequence per document,
    BOS prepended, truncated at the context length). Right-padded micro-batches: causal models see
    the same prefix for every real token, so codes equal one-document-at-a-time runs."""
    tok = loaded.tokenizer
    prepend_bos = all(s.cfg.prepend_bos for s in saes)
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    seqs = [encode_ids(loaded, d, prepend_bos)[: loaded.context_length] for d in docs]
    token_cols: dict[str, list] = {"doc": [], "position": [], "token_id": [], "token": []}
    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    docs_col: list[np.ndarray] = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, : len(seqs[i])] = 1
        captured, _ = loaded.capture(ids.to(loaded.device), hooks, attention_mask=mask.to(loaded.device))
        rows, pos, doc_ids = [], [], []
        for row, i in enumerate(batch):
            p = [j for j, t in enumerate(seqs[i]) if t not in special_ids and not (j == 0 and prepend_bos)]
            rows += [row] * len(p)
            pos += p
            doc_ids += [i] * len(p)
            token_cols["doc"] += [i] * len(p)
            token_cols["position"] += p
            token_cols["token_id"] += [seqs[i][j] for j in p]
            pieces = token_pieces(tok, seqs[i])
            token_cols["token"] += [pieces[j] for j in p]
        r, c = torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
        flat = np.arange(len(rows), dtype=np.int32)  # index into this batch's token list
        doc_arr, pos_arr = np.asarray(doc_ids, np.int32), np.asarray(pos, np.int32)
        for sae_index, (hook, sae) in enumerate(zip(hooks, saes, strict=True)):
            x = captured[hook][r.to(captured[hook].device), c.to(captured[hook].device)]
            where, feat, act = sparse_codes(sae, x, flat, None)
            parts.append((sae_index, pos_arr[where], feat, act))
            docs_col.append(doc_arr[where])
    tokens = pa.table({"doc": pa.array(token_cols["doc"], pa.int32()),
                       "position": pa.array(token_cols["position"], pa.int32()),
                       "token_id": pa.array(token_cols["token_id"], pa.int32()), "token": token_cols["token"]})
    acts = activation_table(parts, {"doc": np.concatenate(docs_col) if docs_col else np.zeros(0, np.int32)})
    return tokens, acts


@torch.inference_mode()
def promoted_tokens(loaded: LoadedModel, sae: SAE, top: int = 5, chunk: int = 2048) -> dict[int, list[str]]:
    """The tokens each feature's decoder direction promotes most through the unembedding (logit lens)."""
    unembed = loaded.model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    out: dict[int, list[str]] = {}
    tok = loaded.tokenizer
    for start in range(0, sae.cfg.d_sae, chunk):
        logits = sae.W_dec[start:start + chunk].to(unembed.device) @ unembed.T
        best = torch.topk(logits, min(top, logits.shape[-1]), dim=-1).indices.cpu().tolist()
        for offset, ids in enumerate(best):
            out[start + offset] = [tok.decode([i]) for i in ids]
    return out
