"""Seeded generation: a prompt's continuation, the same tokens for the same seed on one device."""

from __future__ import annotations

import torch


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
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
