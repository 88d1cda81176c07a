"""Which features the model *used*: gradient attribution to a metric M, and its check by ablation.

With a hooked activation written as x = decode(codes) + error and the error held fixed, removing feature
f at token t moves x_t by −code(t, f)·∂x/∂code_f, so to first order M drops by

    attr(t, f) = code(t, f) · ⟨∂M/∂x_t, ∂x/∂code_f⟩,

where ∂x/∂code_f is the SAE's own decode direction in model space (:meth:`ingest.saes.base.SAE.
decoder_rows` scaled by :meth:`~ingest.saes.base.SAE.output_scale`). ∂M/∂x_t is the total derivative
through the unmodified model (downstream hooks are not replaced by their SAEs), so one forward pass
with the graph recorded from the first hooked stream on and one backward pass give it for every hook
and every token at once. :func:`ablation_deltas` measures what the estimate predicts: M after the
feature's contribution is really subtracted at the analysed tokens of its hook.

M (``attribution_target``, parsed by :func:`ingest.options.parse_attribution_target`), per sequence:
``continuation`` Σ log p(generated token), ``next_tokens`` Σ log p(each next token), ``token:<text>``
log p(text) at the last position, ``logit_diff:<a>|<b>`` logit(a) − logit(b) at the last position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ingest.errors import ModelError
from ingest.models import LoadedModel
from ingest.options import AttributionTarget, parse_attribution_target
from ingest.saes.base import SAE

GATHER_CHUNK = 1 << 16  # nonzero codes per gathered [n, d_in] block of decoder rows


@dataclass(frozen=True)
class Metric:
    """A resolved target: the parsed option and its token ids (``token`` / ``logit_diff``)."""

    target: AttributionTarget
    token_ids: tuple[int, ...] = ()


def resolve_metric(tokenizer, value: str) -> Metric | None:
    """The metric of ``attribution_target`` for this tokenizer (None for ``none``); a ``token`` or
    ``logit_diff`` text that is not exactly one token is refused, naming the field."""
    try:
        target = parse_attribution_target(value)
    except ValueError as exc:
        raise ModelError("attribution_target", str(exc)) from None
    if not target.enabled:
        return None
    ids = []
    for text in target.texts:
        pieces = tokenizer.encode(text, add_special_tokens=False)
        if len(pieces) != 1:
            shown = ", ".join(map(str, pieces[:8])) + (", …" if len(pieces) > 8 else "")
            raise ModelError("attribution_target", f"{text!r} is {len(pieces)} tokens for this tokenizer, not one "
                                                   f"(ids {shown}); give the text of a single token")
        ids.append(int(pieces[0]))
    if target.kind == "logit_diff" and ids[0] == ids[1]:  # logit(a) − logit(a): zero, whatever the features do
        raise ModelError("attribution_target", f"logit_diff compares two different tokens; {target.texts[0]!r} and "
                                               f"{target.texts[1]!r} are the same token ({ids[0]})")
    return Metric(target, tuple(ids))


def metric_values(logits: torch.Tensor, ids: torch.Tensor, lengths: Sequence[int], n_prompts: Sequence[int],
                  metrics: Sequence[Metric | None]) -> torch.Tensor:
    """M per row [batch] from the logits [batch, width, vocab] of right-padded sequences ``ids``; rows
    without a metric give 0 (and no gradient). Computed in fp32 at least (fp64 for fp64 models)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = []
    for row, (n, n_prompt, metric) in enumerate(zip(lengths, n_prompts, metrics, strict=True)):
        if metric is None or n < 1:
            out.append(logits.new_zeros((), dtype=dtype))
            continue
        kind = metric.target.kind
        if kind in ("continuation", "next_tokens"):
            first = max(n_prompt, 1) if kind == "continuation" else 1
            if first >= n:
                out.append(logits.new_zeros((), dtype=dtype))
                continue
            scores = logits[row, first - 1:n - 1].to(dtype)  # position t predicts token t + 1
            targets = ids[row, first:n].to(scores.device)
            out.append((scores.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(scores, dim=-1)).sum())
        elif kind == "token":
            last = logits[row, n - 1].to(dtype)
            out.append(last[metric.token_ids[0]] - torch.logsumexp(last, dim=-1))
        else:  # logit_diff
            last = logits[row, n - 1].to(dtype)
            out.append(last[metric.token_ids[0]] - last[metric.token_ids[1]])
    return torch.stack(out)


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """No parameter requires grad inside: the graph then starts at the first hooked stream, and the
    backward pass computes no weight gradients (nor keeps what they would need)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def capture_with_gradients(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, hooks: list[tuple[int, str]],
                           lengths: Sequence[int], n_prompts: Sequence[int], metrics: Sequence[Metric | None]
                           ) -> tuple[dict, torch.Tensor, dict, torch.Tensor]:
    """One forward + one backward pass: the captured streams, the logits (both detached), ∂M/∂stream
    per hook [batch, width, d_model] and M per row. Rows are independent sequences, so the gradient of
    Σ_rows M is each row's own gradient."""
    with frozen_weights(loaded.model):
        captured, logits = loaded.capture(ids, hooks, attention_mask=mask, stop_early=False, grad=True)
        if logits is None:
            raise ModelError("attribution_target", f"{loaded.model_id} has no LM head: there is nothing to attribute")
        values = metric_values(logits, ids, lengths, n_prompts, metrics)
        keys = list(dict.fromkeys(hooks))
        inputs = [captured[k] for k in keys]
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True) if values.requires_grad \
            else (None,) * len(inputs)  # no row has a metric (or nothing to score)
    gradients = {k: (torch.zeros_like(x) if g is None else g).detach() for k, x, g in zip(keys, inputs, grads, strict=True)}
    return ({k: v.detach() for k, v in captured.items()}, logits.detach(), gradients, values.detach())


def attributions(sae: SAE, x: torch.Tensor, grad: torch.Tensor, rows: np.ndarray, features: np.ndarray,
                 codes: np.ndarray) -> np.ndarray:
    """attr for nonzero codes ``codes`` at (row of ``x``/``grad``, feature id): code · output_scale(x_row)
    · ⟨grad_row, decoder_rows(f)⟩. Only the nonzeros' decoder rows are gathered (GATHER_CHUNK at a time),
    never a [tokens, d_sae] block; fp32, fp64 when the model's gradient is fp64."""
    out = np.zeros(len(codes), dtype=np.float64)
    if not len(codes):
        return out.astype(np.float32)
    device = sae.W_dec.device
    dtype = torch.promote_types(grad.dtype, torch.float32)
    rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)
    feats_t = torch.from_numpy(np.asarray(features, dtype=np.int64)).to(device)
    scale = sae.output_scale(x.to(device)).to(dtype)
    g = grad.to(device=device, dtype=dtype)
    for start in range(0, len(codes), GATHER_CHUNK):
        part = slice(start, start + GATHER_CHUNK)
        r, f = rows_t[part], feats_t[part]
        dots = (g[r] * sae.decoder_rows(f).to(dtype)).sum(-1) * scale[r]
        out[part] = (dots.cpu().double().numpy() * np.asarray(codes[part], dtype=np.float64))
    return out.astype(np.float32) if dtype != torch.float64 else out


@dataclass(frozen=True)
class Ablation:
    """One feature to remove: at ``hook`` (its SAE ``sae``), ``codes`` at token ``positions``."""

    hook: tuple[int, str]
    sae: SAE
    feature_id: int
    positions: np.ndarray
    codes: np.ndarray


LOGITS_BUDGET = 1 << 28  # elements of a forward pass's [batch, width, vocab] logits (1 GiB in fp32)


def vocab_size(loaded: LoadedModel) -> int:
    """The model's vocabulary size (the logits' last dimension; 0 where the model has no config)."""
    return loaded.model.config.get_text_config().vocab_size if hasattr(loaded.model, "config") else 0


def ablation_deltas(loaded: LoadedModel, token_ids: Sequence[int], n_prompt: int, metric: Metric,
                    ablations: Sequence[Ablation], batch_size: int = 16) -> tuple[float, list[float]]:
    """M of the unmodified sequence and, per ablation, M(ablated) − M: the forward pass rerun with
    x_t ← x_t − code(t, f)·∂x/∂code_f at the ablation's positions (the model downstream runs as usual).
    Ablations are run up to ``batch_size`` rows per forward pass (the same sequence repeated), fewer where
    their logits would pass :data:`LOGITS_BUDGET` (a long text over a large vocabulary: one row)."""
    n = len(token_ids)
    ids = torch.tensor([list(token_ids)], device=loaded.device)
    base = float(metric_values(_plain_logits(loaded, ids), ids, [n], [n_prompt], [metric])[0])
    deltas: list[float] = []
    batch_size = max(1, min(batch_size, LOGITS_BUDGET // max(n * vocab_size(loaded), 1)))
    for start in range(0, len(ablations), batch_size):
        group = ablations[start:start + batch_size]
        batch_ids = ids.expand(len(group), n)
        edits = {hook: _subtract(loaded, [(row, a) for row, a in enumerate(group) if a.hook == hook])
                 for hook in dict.fromkeys(a.hook for a in group)}
        logits = loaded.forward_edited(batch_ids, edits)
        values = metric_values(logits, batch_ids, [n] * len(group), [n_prompt] * len(group), [metric] * len(group))
        deltas += [float(v) - base for v in values]
    return base, deltas


def _plain_logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The unmodified forward pass's logits (one unpadded row)."""
    with torch.inference_mode():
        return loaded.model(input_ids=ids, use_cache=False).logits


def _subtract(loaded: LoadedModel, rows: list[tuple[int, Ablation]]):
    """The edit of one hook: each listed row loses its feature's contribution at its positions."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for row, a in rows:
            pos = torch.from_numpy(np.asarray(a.positions, dtype=np.int64)).to(x.device)
            sae = a.sae
            scale = sae.output_scale(x[row, pos].to(sae.W_dec.device))
            direction = sae.decoder_rows(torch.tensor([a.feature_id], device=sae.W_dec.device))[0]
            codes = torch.from_numpy(np.asarray(a.codes, dtype=np.float64)).to(sae.W_dec.device)
            delta = (codes.to(scale.dtype) * scale)[:, None] * direction.to(scale.dtype)
            x[row, pos] = (x[row, pos].to(delta.dtype) - delta.to(x.device)).to(x.dtype)
        return x
    return edit
