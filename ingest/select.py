"""Token selection: a proxy of how informative each token is (entropy, norm) and the top-K filter.

Why a filter: on long generations most positions are predictable continuations; a run scores
only the K most "informative" tokens. Entropy = entropy of the model's next-token distribution at
that position (from the logits); norm = L2 norm of the hooked activation (averaged over the
selected hooks after dividing each by its mean over the candidates, so no hook dominates).
Encoders (BERT-style) have no next-token distribution: with ``token_proxy=entropy`` they fall back
to the norm proxy (their forward pass returns no logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ingest.options import TokenProxy


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


def needs_logits(token_proxy: TokenProxy, k: int, n_candidates: int) -> bool:
    """Whether a row's selection reads the logits: entropy asked for, and the filter drops something."""
    return token_proxy == "entropy" and k < n_candidates


def select_tokens(token_proxies: Sequence[TokenProxy], ks: Sequence[int], hooks: list[tuple[int, str]],
                  candidates: torch.Tensor, captured: dict, entropies: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's token proxies and kept masks ([batch, width], CPU), every row at once: the norm
    proxy from the captured streams, the next-token ``entropies`` [batch, width] where a row asks for
    them and they exist (none after an early stop, never for encoders); the top-``ks[row]`` filter per
    row, specials never kept."""
    by_entropy = torch.tensor([entropies is not None and p == "entropy" for p in token_proxies])
    if bool(by_entropy.all()):
        proxy = torch.zeros(candidates.shape, dtype=torch.float64)
    else:
        proxy = norm_proxy([captured[h] for h in hooks], candidates.to(captured[hooks[0]].device)).cpu()
    if entropies is not None and bool(by_entropy.any()):
        proxy = torch.where(by_entropy[:, None], entropies.double().cpu(), proxy)  # one copy to the host
    return proxy, keep_top_k(proxy, candidates, torch.tensor(list(ks)))
