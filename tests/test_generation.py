"""Batched seeded generation and capture while generating, on tiny random models of every decoder family.

Oracles: HF ``model.generate`` one prompt at a time after ``torch.manual_seed(seed)`` (the tokens runs
had before batching), each prompt generated alone by our loop, and an independent full forward pass
over prompt + continuation for the captured streams and next-token entropies (fp32 CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ingest.run as ingest_run
from ingest.generate import Sampling, capture_generation, generate_batch
from ingest.models import load_model
from ingest.select import entropy, keep_top_k
from ingest.tokens import special_mask
from tests.test_families import CONFIGS, ENCODER_TYPES, _relu_sae, build, model_type

DECODERS = [name for name in CONFIGS if model_type(name) not in ENCODER_TYPES]
EOS = 2
HOOKS = [(0, "resid_pre"), (1, "mlp_out"), (1, "attn_out"), (2, "resid_post")]
# fp32 KV-cache numerics: a decode step attends over cached keys in another order of float operations
# than one pass over the whole sequence; the streams agree to float rounding of their magnitude
ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name in DECODERS:
        build(name, root / name)
        out[name] = load_model(name, root / name, device="cpu")
    return out


def _prompts() -> list[list[int]]:
    """Mixed prompt lengths (BOS + 0..13 words), one of them a BOS alone."""
    g = torch.Generator().manual_seed(0)
    return [[1, *torch.randint(4, 22, (n,), generator=g).tolist()] for n in (3, 9, 0, 6, 9, 13, 2, 5, 11, 7)]


# greedy, tempered, nucleus, no budget; the hot rows (near-uniform over 64 tokens, 40 draws) meet EOS
SAMPLINGS = [Sampling(20, 3, 1.0, 1.0), Sampling(20, 5, 0.0), Sampling(12, 7, 0.7, 0.9), Sampling(24, 9, 2.0, 1.0),
             Sampling(0, 1), Sampling(30, 11, 1.5, 0.95)] + [Sampling(40, seed, 8.0) for seed in (20, 21, 22, 23)]


def _hf_generate(loaded, prompt: list[int], s: Sampling) -> list[int]:
    """What a run's tokens were before batching: HF ``generate`` after seeding the global generator."""
    torch.manual_seed(s.seed)
    kwargs = {"do_sample": s.temperature > 0, "max_new_tokens": s.budget, "pad_token_id": EOS, "eos_token_id": EOS}
    if s.temperature > 0:
        kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
    ids = torch.tensor([prompt])
    if s.budget == 0:
        return prompt
    return loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_batch_yields_each_prompts_tokens_alone_and_those_of_hf_generate(models, name):
    loaded = models[name]
    prompts = _prompts()
    together, _, _ = generate_batch(loaded, prompts, SAMPLINGS)
    alone = [generate_batch(loaded, [p], [s])[0][0] for p, s in zip(prompts, SAMPLINGS, strict=True)]
    hf = [_hf_generate(loaded, p, s) for p, s in zip(prompts, SAMPLINGS, strict=True)]
    assert together == alone == hf
    new = [len(seq) - len(p) for seq, p in zip(together, prompts, strict=True)]
    assert new[4] == 0 and new[1] == 20  # no budget: the prompt alone; greedy here meets no EOS
    # the batch is not vacuous: some row stops at EOS before its budget while others go on
    early = [row for row, (seq, s) in enumerate(zip(together, SAMPLINGS, strict=True)) if len(seq) - len(prompts[row]) < s.budget]
    assert early and all(together[row][-1] == EOS for row in early)
    assert any(len(seq) - len(p) == s.budget for seq, p, s in zip(together, prompts, SAMPLINGS, strict=True) if s.budget)


def test_rows_do_not_share_draws_a_seed_fixes_its_row_only(models):
    loaded = models["gpt2"]
    prompt = _prompts()[1]
    a = generate_batch(loaded, [prompt, prompt], [Sampling(16, 1, 1.5), Sampling(16, 2, 1.5)])[0]
    b = generate_batch(loaded, [prompt, prompt], [Sampling(16, 2, 1.5), Sampling(16, 1, 1.5)])[0]
    assert a[0] == b[1] and a[1] == b[0] and a[0] != a[1]


@pytest.mark.parametrize("name", DECODERS)
def test_streams_and_entropies_captured_while_generating_equal_a_full_forward(models, name):
    loaded = models[name]
    prompts = _prompts()
    gen = capture_generation(loaded, prompts, SAMPLINGS, HOOKS)
    assert gen.sequences == generate_batch(loaded, prompts, SAMPLINGS)[0]
    for row, seq in enumerate(gen.sequences):
        captured, logits = loaded.capture(torch.tensor([seq]), HOOKS, stop_early=False)
        for hook in HOOKS:
            torch.testing.assert_close(gen.captured[hook][row, : len(seq)], captured[hook][0], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(gen.entropies[row, : len(seq)], entropy(logits[0]), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("proxy", ["entropy", "norm"])
def test_a_prompt_gen_run_equals_its_sequence_read_again_in_one_forward(models, proxy):
    """run_many's capture-while-generating path against the pipeline written out here over one full
    forward of prompt + continuation: same tokens, same kept positions, same codes (to fp32 rounding)."""
    loaded = models["llama"]
    hooks = [(1, "resid_post")]
    sae = _relu_sae(1, "resid_post", seed=3)
    texts = ["the cat sat on the mat", "a dog", "big red dog ran far and then it was blue"]
    specs = [ingest_run.RunSpec(prompt=t, gen_tokens=10 + i, seed=i, hooks=hooks, token_proxy=proxy, topk_tokens_per_seq=4)
             for i, t in enumerate(texts)]
    calls = []
    capture = loaded.capture
    loaded.capture = lambda *a, **k: calls.append(1) or capture(*a, **k)  # type: ignore[method-assign]
    try:
        out = ingest_run.run_many(loaded, [sae], specs)
    finally:
        del loaded.capture
    assert calls == []  # no second forward
    for spec, batch in zip(specs, out, strict=True):
        ids, n_prompt = ingest_run._sequence(loaded, spec, True, {})
        assert batch.tokens.column("token_id").to_pylist() == ids and len(ids) > n_prompt
        captured, logits = loaded.capture(torch.tensor([ids]), hooks, stop_early=False)
        x = captured[hooks[0]][0]
        candidates = ~special_mask(loaded, ids, True)
        ref_proxy = entropy(logits[0]).double() if proxy == "entropy" else x.norm(dim=-1).double() / x.norm(dim=-1)[
            candidates].double().mean()
        kept = keep_top_k(ref_proxy, candidates, 4)
        assert batch.tokens.column("kept").to_pylist() == kept.tolist()
        np.testing.assert_allclose(batch.tokens.column("proxy").to_numpy()[candidates.numpy()],
                                   ref_proxy[candidates].numpy(), rtol=1e-5, atol=1e-6)
        codes = sae.encode(x[kept])
        rows, cols = torch.nonzero(codes, as_tuple=True)
        positions = torch.nonzero(kept).flatten()[rows]
        assert batch.activations.column("position").to_pylist() == positions.tolist()
        assert batch.activations.column("feature_id").to_pylist() == cols.tolist()
        np.testing.assert_allclose(batch.activations.column("act").to_numpy(), codes[rows, cols].numpy(), rtol=1e-4,
                                   atol=1e-6)


def test_auto_proxy_is_entropy_where_logits_are_free_and_names_the_same_run(toy_registry, catalog):
    """``token_proxy=auto`` (the default) is resolved before the run id: a text run is the norm run, a
    prompt+gen run the entropy run (the same ids as when entropy was the default), and the catalog
    stores the proxy used."""
    from sae_discover.registry import Registry
    from sae_discover.request import build_request
    from sae_discover.service import Discovery

    disc = Discovery(catalog, Registry.load(toy_registry), device="cpu")
    base = {"model_id": "toy", "sae_id": "toy", "min_coverage_pct": 0, "topk_tokens_per_seq": 3}
    for line, resolved in (({"text": "Shares of Globex rose 12% after the earnings call."}, "norm"),
                           ({"prompt": "The forecast for Boston calls for", "gen_tokens": 6}, "entropy"),
                           ({"text": "The patient presented with fever.", "attribution_target": "next_tokens"}, "entropy")):
        auto = disc.discover(build_request({**base, **line}))
        explicit = disc.discover(build_request({**base, **line, "token_proxy": resolved}))
        other = disc.discover(build_request({**base, **line, "token_proxy": "entropy" if resolved == "norm" else "norm"}))
        assert auto["run_id"] == explicit["run_id"] != other["run_id"]
        stored = catalog.raw().execute("SELECT token_proxy FROM runs WHERE run_id = ?", [auto["run_id"]]).fetchone()
        assert stored == (resolved,)


def test_the_decode_loop_waits_for_the_device_once_per_eight_steps_not_per_token(models, monkeypatch):
    """GPU readiness: our loop's host reads (``item``, ``tolist``, ``cpu``, truth values) in a generation
    of 24 steps over 6 rows are the EOS checks every ``EOS_CHECK_EVERY`` steps and the final copy, not
    one per token (the model's own forward is HF's code and not counted)."""
    import sys

    import ingest.generate as gen_mod

    loaded = models["llama"]
    reads = []

    def counted(name, original):
        def read(self, *a, **k):
            if sys._getframe(1).f_code.co_filename == gen_mod.__file__:
                reads.append(name)
            return original(self, *a, **k)
        return read

    for name in ("item", "tolist", "cpu", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    prompts = _prompts()[:6]
    samplings = [Sampling(24, seed, 1.0 if seed % 2 else 0.0) for seed in range(6)]
    generate_batch(loaded, prompts, samplings)
    monkeypatch.undo()
    assert reads.count("__bool__") <= 24 // gen_mod.EOS_CHECK_EVERY
    assert reads.count("cpu") == 2 and reads.count("item") == 0


def test_a_bfloat16_model_generates_captures_and_encodes_in_fp32(tmp_path):
    build("llama", tmp_path / "llama")
    loaded = load_model("llama", tmp_path / "llama", device="cpu", dtype="bfloat16")
    hooks = [(1, "resid_post")]
    specs = [ingest_run.RunSpec(prompt=t, gen_tokens=8, seed=i, hooks=hooks, topk_tokens_per_seq=3)
             for i, t in enumerate(["the cat sat", "a big red dog ran far"])]
    gen = capture_generation(loaded, [ingest_run._input_ids(loaded, s, True) for s in specs],
                             [Sampling(8, s.seed) for s in specs], hooks)
    assert gen.captured[hooks[0]].dtype == torch.bfloat16 and gen.entropies.dtype == torch.float32
    for batch in ingest_run.run_many(loaded, [_relu_sae(1, "resid_post", seed=3)], specs):
        acts = batch.activations.column("act").to_numpy()
        assert batch.n_kept == 3 and acts.dtype == np.float32 and np.isfinite(acts).all() and len(acts) > 0
        assert np.isfinite(batch.tokens.column("proxy").to_numpy()).all()


def test_a_sequence_that_reaches_the_context_length_says_so(toy_registry, catalog, toy_demo):
    """A text or prompt longer than the model's context is cut there, and a continuation stops there:
    the answer warns, naming the field, whether the run is made now or read back from the catalog."""
    import json

    from sae_discover.registry import Registry
    from sae_discover.request import build_request
    from sae_discover.service import Discovery

    context = json.loads((toy_demo / "model" / "config.json").read_text())["n_positions"]
    disc = Discovery(catalog, Registry.load(toy_registry), device="cpu")
    long = " ".join(["Revenue rose and margins held."] * context)
    base = {"model_id": "toy", "sae_id": "toy", "min_coverage_pct": 0}
    tokens = len(disc.loaders.model(disc.loaders.entry("toy")).tokenizer(long)["input_ids"])
    assert tokens > context
    words = long.split()
    short = " ".join(words[: len(words) * (context - 6) // tokens])  # leaves a few positions to generate into
    cases = [({"text": long}, "text: ", "the text was cut there"),
             ({"prompt": long, "gen_tokens": 4}, "prompt: ", "nothing was generated"),
             ({"prompt": long, "generate": False}, "prompt: ", "the prompt was cut there"),
             ({"prompt": short, "gen_tokens": 64}, "gen_tokens: ", "generation stopped there"),
             ({"text": "Revenue rose."}, None, None)]
    for line, field, words_ in cases:
        for _ in range(2):  # made, then answered from the catalog
            result = disc.discover(build_request({**base, **line}))
            said = [w for w in result["warnings"] if "tokens; " in w]
            if field is None:
                assert said == [] and result["analyzed"]["total_tokens"] < context
            else:
                assert result["analyzed"]["total_tokens"] == context
                assert len(said) == 1 and said[0].startswith(field) and words_ in said[0], said
                assert f"at most {context} tokens" in said[0]
        assert result["cached"]
