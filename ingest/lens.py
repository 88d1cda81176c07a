"""Logit lens: the tokens each SAE feature's decoder direction promotes through the unembedding."""

from __future__ import annotations

import torch

from ingest.models import LoadedModel
from ingest.saes.base import SAE


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
