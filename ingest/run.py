"""A run: text or prompt (+ generation) → tokens → captured streams → top-K tokens → sparse SAE codes.

The six steps of a run's data flow, and where each lives:

1. tokenize: the text or prompt to token ids (``ingest/tokens.py``: :func:`~ingest.tokens.encode_ids`);
2. generate: the prompts of a micro-batch continued together, each by its own seed (``ingest/generate.py``);
3. capture: streams kept by hooks (``ingest/models.py``) — for prompt+gen by the generation passes
   themselves (:func:`~ingest.generate.capture_generation`), else one forward pass per micro-batch
   (:meth:`~ingest.models.LoadedModel.capture`);
4. select: token proxies and the top-K filter (``ingest/select.py``);
5. encode: the kept tokens' sparse SAE codes (:func:`sparse_codes` here, the encode math in ``ingest/saes/base.py``);
6. assemble: a :class:`RunBatch` of pyarrow tables (:func:`_assemble` here), in the catalog's column layout.

This module never touches the catalog. Codes are computed in token chunks and only nonzeros are
kept, so no dense [tokens × d_sae] matrix exists for more than ``chunk`` tokens at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ingest.attribution import LOGITS_BUDGET, Metric, attributions, capture_with_gradients, resolve_metric, vocab_size
from ingest.generate import Sampling, capture_generation, generate_batch
from ingest.models import LoadedModel, ModelError
from ingest.options import RunOptions, resolve_token_proxy
from ingest.saes.base import SAE, SAEError
from ingest.select import entropy, needs_logits, select_tokens
from ingest.tokens import encode_ids, pad_batch, special_mask, token_pieces

# Runs per forward micro-batch, and per group handed to the model (or a worker process) and committed
# to the catalog together: the forward pass and the catalog's per-statement cost are shared by the
# group's runs, while the padded batch stays small enough to hold in memory and a failed group loses few runs.
MICRO_BATCH = 16
ENCODE_CHUNK = 4096


@dataclass
class RunSpec(RunOptions):
    """A run to make: its input (``text``, or ``prompt`` + generation), its hooks, and the options
    that fix its activations."""

    prompt: str | None = None
    text: str | None = None
    hooks: list[tuple[int, str]] = field(default_factory=lambda: [(22, "resid_pre")])

    @property
    def mode(self) -> str:
        if self.text is not None:
            return "text"
        return "prompt+gen" if self.generate and self.gen_tokens > 0 else "prompt"


@dataclass
class RunBatch:
    """One run's output: its tokens (proxy, kept and special flags) and sparse codes, as Arrow tables."""

    tokens: pa.Table
    activations: pa.Table
    n_tokens: int
    n_kept: int
    timings: dict[str, float]


def sparse_codes(sae: SAE, x: torch.Tensor, positions: np.ndarray, features: tuple[int, ...] | None,
                 chunk: int = ENCODE_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nonzero (position, feature_id, act) triples of ``sae.encode(x)``, computed ``chunk`` tokens at a time."""
    if x.shape[-1] != sae.cfg.d_in:
        raise SAEError("sae_id", f"d_in: the SAE for {sae.cfg.hook_name} expects width {sae.cfg.d_in}, "
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


def activation_table(parts: Iterable[tuple], extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Stack per-SAE parts ``(sae_index, position, feature_id, act[, attr])`` into the activations batch;
    the ``attr`` column is there when the parts carry attributions (float32, like ``act``)."""
    pos, idx, feat, act, attr = [], [], [], [], []
    for sae_index, p, f, a, *rest in parts:
        pos.append(p)
        idx.append(np.full(len(p), sae_index, dtype=np.int16))
        feat.append(f)
        act.append(a)
        if rest and rest[0] is not None:
            attr.append(np.asarray(rest[0], dtype=np.float32))
    cols = {"position": np.concatenate(pos) if pos else np.zeros(0, np.int32),
            "sae_index": np.concatenate(idx) if idx else np.zeros(0, np.int16),
            "feature_id": np.concatenate(feat) if feat else np.zeros(0, np.int32),
            "act": np.concatenate(act) if act else np.zeros(0, np.float32)}
    if attr:
        if len(attr) != len(pos):
            raise ValueError("activation_table: attributions for some SAE parts only")
        cols["attr"] = np.concatenate(attr)
    return pa.table({**(extra or {}), **cols})


def _input_ids(loaded: LoadedModel, spec: RunSpec, prepend_bos: bool) -> list[int]:
    """The run's text or prompt as token ids, truncated at the context length."""
    source = spec.text if spec.text is not None else spec.prompt
    return encode_ids(loaded, source or "", prepend_bos)[: loaded.context_length]


def _sampling(loaded: LoadedModel, spec: RunSpec, n_prompt: int) -> Sampling | None:
    """How the run's prompt continues (None: no generation); refused for an encoder."""
    if spec.text is not None or not spec.generate:
        return None
    if loaded.is_encoder:
        raise ModelError("generate", f"{loaded.model_id} is an encoder ({loaded.family}) and cannot generate; "
                                     "send `text` (or generate=false)")
    if spec.mode != "prompt+gen" or n_prompt == 0:
        return None
    return Sampling(min(spec.gen_tokens, loaded.context_length - n_prompt), spec.seed, spec.temperature, spec.top_p)


def _sequence(loaded: LoadedModel, spec: RunSpec, prepend_bos: bool, timings: dict) -> tuple[list[int], int]:
    """One run's token ids (prompt + seeded continuation, or the text) and prompt length, as :func:`run_many`
    makes them (a micro-batch of one gives every row's tokens)."""
    ids = _input_ids(loaded, spec, prepend_bos)
    sampling = _sampling(loaded, spec, len(ids))
    if sampling is None:
        return ids, len(ids)
    t0 = time.perf_counter()
    sequence = generate_batch(loaded, [ids], [sampling])[0][0]
    timings["generate_s"] = time.perf_counter() - t0
    return sequence, len(ids)


def _encode_kept(saes: Sequence[SAE], hooks: list[tuple[int, str]], captured: dict, kept: torch.Tensor,
                 restricts: list[tuple[int, ...] | None], grads: dict | None = None) -> list[list[tuple]]:
    """Sparse codes of the kept tokens of a micro-batch (``kept`` [batch, width]): one encode per (hook,
    restrict set) over all its rows — one large GEMM, not one per sequence — split back into each
    row's ``(sae_index, position, feature_id, act, attr)`` parts (``attr`` None without ``grads``,
    ∂M/∂stream per hook: :mod:`ingest.attribution`)."""
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
            x = captured[hook][mask.to(captured[hook].device)]
            where, feat, act = sparse_codes(sae, x, flat, features)
            attr = None if grads is None else attributions(sae, x, grads[hook][mask.to(grads[hook].device)], where,
                                                           feat, act)
            cuts = np.searchsorted(where, row_starts)  # ``where`` ascends, so each row's triples are contiguous
            for row in members:
                part = slice(cuts[row], cuts[row + 1])
                out[row].append((sae_index, positions[where[part]].astype(np.int32), feat[part], act[part],
                                 None if attr is None else attr[part]))
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


@dataclass
class _Runs:
    """What :func:`run_many` fills in for each run (indexed like its specs) as micro-batches finish."""

    specs: Sequence[RunSpec]
    seqs: list[tuple[list[int], int]]  # token ids (prompt + continuation, or the text) and prompt length
    special: list[torch.Tensor]  # never-analysed positions (BOS, specials), known once the tokens are
    timings: list[dict]
    results: list[RunBatch | None]


def run_many(loaded: LoadedModel, saes: Sequence[SAE], specs: Sequence[RunSpec],
             batch_size: int = MICRO_BATCH, on_sequence: Callable[[int], object] | None = None) -> list[RunBatch]:
    """Several runs over the same hooks, in micro-batches of similar length (every row gets what it
    gets alone: :mod:`ingest.generate` for the tokens; causal models see the same prefix for every real
    token, so codes equal a one-at-a-time run to float rounding).

    Prompts to continue generate together, and their streams and entropies are captured by the
    generation passes themselves (:func:`_generate`). Texts, prompts without generation and attribution
    runs (which need a backward over the whole sequence) get one analysis forward per micro-batch
    (:func:`_reread`). ``on_sequence(n)`` is told as n runs' sequences are ready.
    """
    if not specs:
        return []
    if any(s.hooks != specs[0].hooks for s in specs):
        raise ValueError("run_many: every spec must use the same hooks")
    prepend_bos = all(s.cfg.prepend_bos for s in saes)
    metrics = run_metrics(loaded, specs)  # before any generation: a refused target costs nothing
    prompts = [_input_ids(loaded, spec, prepend_bos) for spec in specs]
    samplings = [_sampling(loaded, spec, len(ids)) for spec, ids in zip(specs, prompts, strict=True)]
    runs = _Runs(specs, seqs=[(ids, len(ids)) for ids in prompts], special=[torch.zeros(0, dtype=torch.bool)] * len(specs),
                 timings=[{} for _ in specs], results=[None] * len(specs))
    continued = [i for i in range(len(specs)) if samplings[i] is not None]
    if on_sequence is not None and len(specs) > len(continued):
        on_sequence(len(specs) - len(continued))  # texts: ready once tokenized
    live = [i for i in continued if metrics[i] is None]  # captured while generating; the others are re-read
    _generate(loaded, saes, runs, prompts, samplings, live, [i for i in continued if metrics[i] is not None],
              prepend_bos, batch_size, on_sequence)
    captured = set(live)
    _reread(loaded, saes, runs, [i for i in range(len(specs)) if i not in captured], metrics, prepend_bos, batch_size)
    return runs.results  # type: ignore[return-value]


def _generate(loaded: LoadedModel, saes: Sequence[SAE], runs: _Runs, prompts: list[list[int]],
              samplings: list[Sampling | None], capture: list[int], plain: list[int], prepend_bos: bool,
              batch_size: int, on_sequence: Callable[[int], object] | None) -> None:
    """Continue the prompts of runs ``capture`` and ``plain`` in micro-batches by prompt length. Those of
    ``capture`` are captured by the generation passes (:func:`~ingest.generate.capture_generation`) and
    analysed at once; those of ``plain`` (attribution runs, re-read later with a backward pass) only
    get their tokens. Each run's ``generate_s`` is its share of its micro-batch's time, by tokens."""
    vocab = vocab_size(loaded)
    for capturing, indices in ((True, capture), (False, plain)):
        for chunk in _generation_batches(prompts, indices, vocab, batch_size):
            t0 = time.perf_counter()
            rows, row_samplings = [prompts[i] for i in chunk], [samplings[i] for i in chunk]
            if capturing:
                gen = capture_generation(loaded, rows, row_samplings, runs.specs[0].hooks)  # type: ignore[arg-type]
                sequences = gen.sequences
            else:
                sequences = generate_batch(loaded, rows, row_samplings)[0]  # type: ignore[arg-type]
            elapsed, fed = time.perf_counter() - t0, sum(len(ids) for ids in sequences)
            for i, ids in zip(chunk, sequences, strict=True):
                runs.seqs[i] = (ids, len(prompts[i]))
                runs.timings[i]["generate_s"] = elapsed * len(ids) / fed
            if capturing:
                for i in chunk:
                    runs.special[i] = special_mask(loaded, runs.seqs[i][0], prepend_bos)
                _, _, candidates = pad_batch(loaded, [runs.seqs[i][0] for i in chunk], [runs.special[i] for i in chunk])
                _analyse(loaded, saes, runs, chunk, candidates, gen.captured, gen.entropies, None)
            if on_sequence is not None:
                on_sequence(len(chunk))


def _reread(loaded: LoadedModel, saes: Sequence[SAE], runs: _Runs, rest: list[int], metrics: list[Metric | None],
            prepend_bos: bool, batch_size: int) -> None:
    """One analysis forward per micro-batch for the runs ``rest`` (texts, prompts without generation,
    attribution runs). The forward stops after the last hooked block unless the logits are needed (the
    entropy proxy, attribution): those runs get micro-batches of their own within ``LOGITS_BUDGET``, and
    attribution runs (M and a backward pass) yet others."""
    hooks = runs.specs[0].hooks
    for i in rest:
        runs.special[i] = special_mask(loaded, runs.seqs[i][0], prepend_bos)
    groups = {i: (needs_logits(resolve_token_proxy(runs.specs[i], runs.specs[i].text is not None),
                               runs.specs[i].topk_tokens_per_seq, int((~runs.special[i]).sum()))
                  or metrics[i] is not None, metrics[i] is not None) for i in rest}
    vocab = vocab_size(loaded)
    for group in ((False, False), (True, False), (True, True)):
        logits_group, attributing = group
        order = sorted((i for i in rest if groups[i] == group), key=lambda i: len(runs.seqs[i][0]))
        widths = [len(runs.seqs[i][0]) * (vocab if logits_group else 1) for i in order]
        for chunk in _micro_batches(order, widths, batch_size, LOGITS_BUDGET if logits_group else None):
            ids, mask, candidates = pad_batch(loaded, [runs.seqs[i][0] for i in chunk], [runs.special[i] for i in chunk])
            lengths = [len(runs.seqs[i][0]) for i in chunk]
            t1 = time.perf_counter()
            grads = None
            if attributing:
                captured, logits, grads, _ = capture_with_gradients(
                    loaded, ids.to(loaded.device), mask.to(loaded.device), hooks, lengths,
                    [runs.seqs[i][1] for i in chunk], [metrics[i] for i in chunk])
            else:
                captured, logits = loaded.capture(ids.to(loaded.device), hooks, attention_mask=mask.to(loaded.device),
                                                  stop_early=not logits_group)
            entropies = None if logits is None else _entropies(logits, lengths)
            for i in chunk:
                runs.timings[i]["forward_s"] = (time.perf_counter() - t1) / len(chunk)
            _analyse(loaded, saes, runs, chunk, candidates, captured, entropies, grads)


def _entropies(logits: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Next-token entropy of every real position [batch, width] (fp32): one [length, vocab] softmax at a
    time, not [batch, width, vocab]."""
    out = torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for row, n in enumerate(lengths):
        out[row, :n] = entropy(logits[row, :n])
    return out


def _analyse(loaded: LoadedModel, saes: Sequence[SAE], runs: _Runs, chunk: list[int], candidates: torch.Tensor,
             captured: dict, entropies: torch.Tensor | None, grads: dict | None) -> None:
    """A micro-batch's captured streams → token proxies and the top-K filter → sparse codes of the kept
    tokens → each run's :class:`RunBatch` (into ``runs.results``)."""
    t0 = time.perf_counter()
    specs, seqs = runs.specs, runs.seqs
    lengths = [len(seqs[i][0]) for i in chunk]
    proxies = [resolve_token_proxy(specs[i], specs[i].text is not None) for i in chunk]
    proxy, kept = select_tokens(proxies, [specs[i].topk_tokens_per_seq for i in chunk],
                                specs[chunk[0]].hooks, candidates, captured, entropies)
    restricts = [tuple(sorted(set(specs[i].restrict_features))) or None for i in chunk]
    parts = _encode_kept(saes, specs[chunk[0]].hooks, captured, kept, restricts, grads)  # the chunk's rows together
    encode_s = (time.perf_counter() - t0) / len(chunk)
    for row, (i, n) in enumerate(zip(chunk, lengths, strict=True)):
        runs.timings[i]["encode_s"] = encode_s
        runs.results[i] = _assemble(loaded, seqs[i][0], seqs[i][1], runs.special[i], proxy[row, :n], kept[row, :n],
                                    parts[row], runs.timings[i])


def _generation_batches(prompts: list[list[int]], indices: list[int], vocab: int, batch_size: int
                        ) -> Iterator[list[int]]:
    """Micro-batches of the runs to continue, by prompt length (little left padding), at most
    ``batch_size`` rows whose prefill logits ([batch, prompt width, vocab]) fit ``LOGITS_BUDGET``."""
    order = sorted(indices, key=lambda i: len(prompts[i]))
    yield from _micro_batches(order, [len(prompts[i]) * max(vocab, 1) for i in order], batch_size, LOGITS_BUDGET)


def run_metrics(loaded: LoadedModel, specs: Sequence[RunSpec]) -> list[Metric | None]:
    """Each run's attribution metric (None without one), refused for an encoder (no LM head) and for a
    ``token`` / ``logit_diff`` text that is not one token of this tokenizer."""
    metrics = [resolve_metric(loaded.tokenizer, spec.attribution_target) for spec in specs]
    if loaded.is_encoder and any(m is not None for m in metrics):
        raise ModelError("attribution_target", f"{loaded.model_id} is an encoder ({loaded.family}) with no LM head: "
                                               "there is no log-probability to attribute; use none")
    return metrics


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
                        docs: Sequence[str], batch_size: int = MICRO_BATCH,
                        on_batch: Callable[[int], object] | None = None) -> tuple[pa.Table, pa.Table]:
    """Every non-special token of every document through model + SAEs (one sequence per document,
    BOS prepended, truncated at the context length): the run path with every candidate kept.
    Right-padded micro-batches: causal models see the same prefix for every real token, so codes
    equal one-document-at-a-time runs. ``on_batch(n)`` is told after each micro-batch of n documents."""
    prepend_bos = all(s.cfg.prepend_bos for s in saes)
    seqs = [encode_ids(loaded, d, prepend_bos)[: loaded.context_length] for d in docs]
    token_cols: dict[str, list] = {"doc": [], "position": [], "token_id": [], "token": []}
    parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    docs_col: list[np.ndarray] = []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask, kept = pad_batch(loaded, [seqs[i] for i in batch],
                                    [special_mask(loaded, seqs[i], prepend_bos) for i in batch])
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
        if on_batch is not None:
            on_batch(len(batch))
    tokens = pa.table({"doc": pa.array(token_cols["doc"], pa.int32()),
                       "position": pa.array(token_cols["position"], pa.int32()),
                       "token_id": pa.array(token_cols["token_id"], pa.int32()),
                       "token": pa.array(token_cols["token"], pa.string())})
    acts = activation_table(parts, {"doc": np.concatenate(docs_col) if docs_col else np.zeros(0, np.int32)})
    return tokens, acts
