"""Token ids and their text: tokenizing a run's input, each token's printed piece, which positions are
special, and right-padded micro-batches of several sequences."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ingest.models import LoadedModel


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


def unknown_piece(token_id: int) -> str:
    """What an id the tokenizer does not know prints as (a model whose embedding is padded past the
    tokenizer's vocabulary can generate or promote one)."""
    return f"<id {token_id}>"


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as :func:`_pieces` prints it; an id the tokenizer does not know prints as
    :func:`unknown_piece` and is left out of its neighbours' decoding context."""
    ids = [int(i) for i in ids]
    size = len(tokenizer)
    pieces: list[str] = []
    start = 0
    for i in [*(i for i, t in enumerate(ids) if not 0 <= t < size), len(ids)]:
        pieces += _pieces(tokenizer, ids[start:i])
        if i < len(ids):
            pieces.append(unknown_piece(ids[i]))
        start = i + 1
    return pieces


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (leading spaces kept, even for
    SentencePiece), so that the pieces join to the decoded text.

    Incremental detokenization (as LLM servers stream text): decode from a short left context and
    print what is new once it does not end in U+FFFD, so a character split over several tokens
    (byte-level BPE, byte fallback) is printed whole by the token that completes it and the others
    get "". With a byte-level decoder a token of whole characters after another reads the same in
    any context: its piece is its own decode, kept per tokenizer (most tokens take that path).
    """
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


def special_mask(loaded: LoadedModel, ids: list[int], prepend_bos: bool) -> torch.Tensor:
    """Special tokens (BOS, EOS, pads...) are stored but never analysed."""
    tok = loaded.tokenizer
    special_ids = set(getattr(tok, "all_special_ids", []) or [])
    mask = torch.tensor([i in special_ids for i in ids], dtype=torch.bool)
    if prepend_bos and tok.bos_token_id is not None and ids:
        mask[0] = True
    return mask


def pad_batch(loaded: LoadedModel, seqs: list[list[int]], special: list[torch.Tensor]
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
