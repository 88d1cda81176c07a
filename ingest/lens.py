"""Logit lens: the tokens each SAE feature's decoder direction promotes and suppresses through the unembedding."""

from __future__ import annotations

import torch

from ingest.models import LoadedModel
from ingest.saes.base import SAE
from ingest.tokens import unknown_piece


@torch.inference_mode()
def decoder_tokens(loaded: LoadedModel, sae: SAE, top: int = 5, chunk: int = 2048
                   ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """The tokens each feature's decoder direction promotes most and suppresses most through the
    unembedding (logit lens: the largest and the most negative entries of ``W_dec[f] @ W_U^T``), as two
    dicts feature → tokens, strongest first.

    Encoders loaded without a head use the input embeddings (BERT ties its MLM decoder to them).
    """
    head = loaded.model.get_output_embeddings() or loaded.model.get_input_embeddings()
    unembed = head.weight.detach().float()  # [vocab, d_model]
    promotes: dict[int, list[str]] = {}
    suppresses: dict[int, list[str]] = {}
    tok = loaded.tokenizer
    size = len(tok)
    for start in range(0, sae.cfg.d_sae, chunk):
        logits = sae.W_dec[start:start + chunk].to(unembed.device) @ unembed.T
        k = min(top, logits.shape[-1])
        for out, ends in ((promotes, logits), (suppresses, -logits)):
            for offset, ids in enumerate(torch.topk(ends, k, dim=-1).indices.cpu().tolist()):
                out[start + offset] = [tok.decode([i]) if i < size else unknown_piece(i) for i in ids]
    return promotes, suppresses
