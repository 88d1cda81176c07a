"""Seeded generation, a micro-batch of prompts at a time, with the hooked streams captured on the way.

Why our own loop and not HF ``generate``: every row must yield the tokens it yields alone, whatever
else is in its micro-batch. HF samples all rows from one global random stream, so a row's draws
depend on its neighbours. Here each row draws from its own ``torch.Generator`` seeded with its
``seed``, after HF's own temperature and top-p warpers, with ``torch.multinomial`` as HF does: a
prompt alone gets exactly the tokens ``model.generate`` gave it after ``torch.manual_seed(seed)``
(tested), so runs stored before batching keep their tokens.

Batching: prompts are left-padded to the longest (attention mask and explicit position ids, so every
real token sees exactly its own prefix at its own positions) and share one KV cache; each decode step
is one forward over the batch. A row stops at its budget or at EOS; after that it is fed padding that
nothing reads. What can still differ from a row run alone is float rounding in the batched matmuls
(the logits of a row are not bitwise batch-invariant on CPU, even between rows of equal length), so a
token could only flip where a draw falls within that rounding of a CDF boundary (or two logits tie
within it for greedy decoding); the tests check token-for-token equality.

Capture: with hooks, the streams of the prompt come from the prefill and those of each new token from
the decode step that feeds it (the last token is fed once more to capture it), so no second forward
over prompt + continuation is needed; next-token entropies come from the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ingest.models import LoadedModel
from ingest.select import entropy

EOS_CHECK_EVERY = 8  # decode steps between checks whether every row has finished (each check syncs a GPU)


@dataclass(frozen=True)
class Sampling:
    """How one row continues: up to ``budget`` new tokens, drawn with its own ``seed`` (temperature 0: greedy)."""

    budget: int
    seed: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Generation:
    """A micro-batch's sequences (prompt + continuation, EOS included) and, when hooks were given, what
    the generation passes saw: ``captured[hook]`` [batch, width, d_model] and ``entropies`` [batch, width]
    (fp32), on the model's device, right-padded (column = position) like :func:`ingest.tokens.pad_batch`."""

    sequences: list[list[int]]
    captured: dict[tuple[int, str], torch.Tensor]
    entropies: torch.Tensor | None


def _sample(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One row's next token [1] from its fp32 logits [1, vocab]: HF's temperature and top-p warpers (the
    same operations, in the same order), then one ``torch.multinomial`` draw from the row's generator."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # the most probable token always stays
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator)[:, 0]


def choose(logits: torch.Tensor, samplings: Sequence[Sampling], generators: Sequence[torch.Generator | None],
           sampled: torch.Tensor) -> torch.Tensor:
    """Each row's next token [batch] from its last logits [batch, vocab]: argmax for a greedy row, else
    (the rows in ``sampled``, on the logits' device) one draw from its own generator, drawn at every
    step, finished or not, so a row's k-th token always uses its k-th draw. Nothing here waits for the device."""
    logits = logits.float()
    picks = logits.argmax(-1)
    if len(sampled):
        draws = [_sample(logits[row:row + 1], samplings[row].temperature, samplings[row].top_p, generators[row])
                 for row, g in enumerate(generators) if g is not None]
        picks[sampled] = torch.cat(draws)
    return picks


@torch.inference_mode()
def generate_batch(loaded: LoadedModel, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling],
                   with_entropies: bool = False) -> tuple[list[list[int]], torch.Tensor | None, int]:
    """Continue every prompt (each at least one token) by its own sampling, all rows in each forward.

    Returns the sequences, the entropies of every column of the left-padded layout ([batch, columns],
    with ``with_entropies``) and the padded prompt width (row i's tokens start at column
    width − len(prompts[i])). Every forward runs inside this call, so hooks entered around it
    (:meth:`LoadedModel.hooked`) see the prefill and then one column per decode step."""
    model, device = loaded.model, loaded.device
    rows, width = len(prompts), max(len(p) for p in prompts)
    eos = loaded.tokenizer.eos_token_id
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    budgets = torch.tensor([s.budget for s in samplings], device=device)
    steps = max(s.budget for s in samplings)
    generators = [torch.Generator(device=device).manual_seed(s.seed) if s.temperature > 0 else None for s in samplings]
    sampled = torch.tensor([row for row, g in enumerate(generators) if g is not None], dtype=torch.long, device=device)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    entropies = [entropy(out.logits)] if with_entropies else []
    cache, last = out.cache, out.logits[:, -1]
    new = torch.full((rows, max(steps, 1)), pad, dtype=torch.long, device=device)
    done = budgets <= 0
    n_new = torch.zeros(rows, dtype=torch.long, device=device)
    top_position = loaded.context_length - 1
    for step in range(steps):
        alive = ~done & (step < budgets)
        token = torch.where(alive, choose(last, samplings, generators, sampled), pad)
        new[:, step] = token
        n_new += alive
        done = done | ~alive | (step + 1 >= budgets) | (token == eos if eos is not None else False)
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=-1)
        position = (lengths + step).clamp_max(top_position)[:, None]  # a finished row's padding: any position
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
        cache, last = out.cache, out.logits[:, -1]
        if with_entropies:
            entropies.append(entropy(out.logits))
        if (step + 1) % EOS_CHECK_EVERY == 0 and bool(done.all()):
            break
    new_rows, counts = new.cpu().tolist(), n_new.cpu().tolist()  # to the host once per micro-batch
    sequences = [list(p) + new_rows[row][: counts[row]] for row, p in enumerate(prompts)]
    return sequences, torch.cat(entropies, dim=-1) if with_entropies else None, width


def _right_aligned(x: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """Row i of left-padded ``x`` [batch, columns, ...] shifted left by ``offsets[i]``, ``width`` columns."""
    index = (torch.arange(width, device=x.device)[None] + offsets[:, None]).clamp_max(x.shape[1] - 1)
    if x.dim() == 3:
        index = index[..., None].expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)


def capture_generation(loaded: LoadedModel, prompts: Sequence[Sequence[int]], samplings: Sequence[Sampling],
                       hooks: list[tuple[int, str]]) -> Generation:
    """:func:`generate_batch` with ``hooks`` captured and the next-token entropy of every position, all
    from the generation passes, laid out as a right-padded analysis batch (column = position)."""
    columns: dict[tuple[int, str], list[torch.Tensor]] = {hook: [] for hook in dict.fromkeys(hooks)}

    def keep(key: tuple[int, str], x: torch.Tensor) -> None:
        columns[key].append(x.detach())

    loaded.check_hooks([layer for layer, _ in hooks], [stream for _, stream in hooks])
    with loaded.hooked(hooks, keep):
        sequences, entropies, prompt_width = generate_batch(loaded, prompts, samplings, with_entropies=True)
    width = max(len(s) for s in sequences)
    offsets = torch.tensor([prompt_width - len(p) for p in prompts], device=loaded.device)
    captured = {key: _right_aligned(torch.cat(parts, dim=1), offsets, width) for key, parts in columns.items()}
    assert entropies is not None
    return Generation(sequences, captured, _right_aligned(entropies, offsets, width))


def generate(loaded: LoadedModel, prompt: Sequence[int], gen_tokens: int, seed: int, temperature: float = 1.0,
             top_p: float = 1.0) -> list[int]:
    """One prompt's sequence (prompt + up to ``gen_tokens`` new tokens): a micro-batch of one."""
    return generate_batch(loaded, [prompt], [Sampling(gen_tokens, seed, temperature, top_p)])[0][0]
