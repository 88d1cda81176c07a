"""Seeded generation, token proxies (entropy, norm) and the top-K token filter.

Why a filter: on long generations most positions are predictable continuations; the seed scores
only the K most "informative" tokens. Entropy = entropy of the model's next-token distribution at
that position (from the logits); norm = L2 norm of the hooked activation (averaged over the
selected hooks after dividing each by its mean over the candidates, so no hook dominates).
Encoders (BERT-style) have no next-token distribution: with ``token_proxy=entropy`` they fall back
to the norm proxy (the worker sees no logits from them).
"""

from __future__ import annotations

import torch

PROXIES = ("entropy", "norm")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, gen_tokens: int, seed: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_token_id: int | None = None) -> torch.Tensor:
    """Continue ``input_ids`` [1, n] by up to ``gen_tokens`` tokens; same seed → same tokens on one device.

    Temperature 0 is greedy decoding. Generation stops early at ``eos_token_id``.
    """
    if gen_tokens <= 0:
        return input_ids
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": gen_tokens, "pad_token_id": eos_token_id,
              "eos_token_id": eos_token_id}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) along the last dimension, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def norm_proxy(captured: list[torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
    """Per position, the mean over hooks of ||x|| / (mean of ||x|| over the row's candidates), in fp64.

    ``captured``: [..., seq, d] tensors (one per hook); ``candidates``: [..., seq] bool → [..., seq].
    """
    count = candidates.sum(-1, keepdim=True)
    total = torch.zeros(candidates.shape, dtype=torch.float64, device=candidates.device)
    for x in captured:
        norms = x.float().norm(dim=-1).double()
        summed = torch.where(candidates, norms, 0.0).sum(-1, keepdim=True)  # an inf BOS or pad stays out
        scale = torch.where(count > 0, summed / count.clamp_min(1), 1.0)
        total += norms / scale.clamp_min(1e-12)
    return total / len(captured)


def keep_top_k(proxy: torch.Tensor, candidates: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k`` candidate positions with the highest proxy (ties: the earlier position;
    a NaN proxy ranks last), per row of [..., seq] tensors; ``k`` is one number or one per row."""
    values = torch.nan_to_num(proxy.double(), nan=-torch.inf)
    # (candidate first, then proxy descending, then position): two stable sorts, the last key first
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    flags = torch.gather(candidates, -1, order).to(torch.int8)
    order = torch.gather(order, -1, torch.sort(flags, dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    k = torch.as_tensor(k)
    return candidates & (rank < (k[..., None] if k.dim() else k))
