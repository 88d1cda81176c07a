"""Every model family on a tiny random config: each captured stream equals an independent reference.

References: ``hidden_states`` from ``output_hidden_states=True`` for the residual, and each block's
sublayers recomputed by hand from ``hidden_states[L]`` with the block's own modules (the attention
module gets the mask / rotary inputs the model gave it; everything else — norms, residual adds,
post-norms, parallel residual, BERT's post-LN — is written out here). HF's last ``hidden_states``
entry has the final norm applied for most families, so the last layer's ``resid_post`` is checked
against the block output recomputed by hand, never against ``hidden_states[-1]``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

import ingest.run as ingest_run
from ingest.models import FAMILIES, STREAMS, ModelError, load_model, quiet_transformers, read_card
from ingest.saes import saelens
from ingest.saes.base import SAE, SAEConfig
from ingest.select import keep_top_k, norm_proxy
from ingest.tokens import encode_ids, token_pieces

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "and", "then", "it", "was", "red", "blue", "green",
         "big", "small"]
DEC_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
ENC_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 64
D = 32
N_LAYERS = 3
COMMON = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64)
DEC_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
CONFIGS = {
    "gpt2": dict(n_embd=D, n_layer=N_LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64, **DEC_IDS),
    "gpt_neox": dict(COMMON, rotary_pct=0.5, **DEC_IDS),  # parallel residual (Pythia)
    "gpt_neox-sequential": dict(COMMON, rotary_pct=0.5, use_parallel_residual=False, **DEC_IDS),
    "llama": dict(COMMON, num_key_value_heads=2, **DEC_IDS),
    "mistral": dict(COMMON, num_key_value_heads=2, sliding_window=4, **DEC_IDS),
    "qwen2": dict(COMMON, num_key_value_heads=2, **DEC_IDS),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=8, **DEC_IDS),
    "gemma": dict(COMMON, num_key_value_heads=2, head_dim=8, **DEC_IDS),
    "gemma2": dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4, **DEC_IDS),
    "gemma3_text": dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **DEC_IDS),
    "bert": dict(COMMON, pad_token_id=0),
    "roberta": dict(COMMON, pad_token_id=0, max_position_embeddings=66),
}
ENCODER_TYPES = ("bert", "roberta")


def tiny_tokenizer(encoder: bool) -> PreTrainedTokenizerFast:
    specials = ENC_SPECIALS if encoder else DEC_SPECIALS
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if encoder else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def model_type(name: str) -> str:
    return name.split("-")[0]


def build(name: str, folder) -> None:
    """A tiny random model of family ``name`` and a word-level tokenizer, saved as a HF directory."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type(name), **CONFIGS[name])
    encoder = model_type(name) in ENCODER_TYPES
    model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config)
    with torch.no_grad():  # make the norms non-trivial so a wrongly placed norm cannot go unnoticed
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or "ln" in pname.split(".")[-2]:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    tiny_tokenizer(encoder).save_pretrained(folder)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    quiet_transformers()  # no save/load progress bars in the test log
    root = tmp_path_factory.mktemp("families")
    for name in CONFIGS:
        build(name, root / name)
    return root


def _call(module, args, kwargs, hidden):
    """Call ``module`` as the model did, with our own ``hidden`` as its hidden-states input."""
    if args:
        return module(hidden, *args[1:], **kwargs)
    return module(**{**kwargs, "hidden_states": hidden})


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def reference(loaded, input_ids) -> tuple[tuple[torch.Tensor, ...], dict[tuple[int, str], torch.Tensor]]:
    """``hidden_states`` and every stream recomputed by hand from ``hidden_states[L]``."""
    fmap = loaded.family_map
    blocks = loaded.blocks()
    attn_name = {"gpt2": "attn", "gpt_neox": "attention", "bert": "attention.self", "roberta": "attention.self"}.get(
        loaded.family, "self_attn")  # the attention module proper (its inputs: mask, rotary), named here, not by the map
    attn_inputs = {}
    handles = []
    for i, block in enumerate(blocks):
        module = block.get_submodule(attn_name)

        def record(_m, args, kwargs, i=i):
            attn_inputs[i] = (args, kwargs)
        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            kwargs = {"use_cache": False} if fmap.decoder else {}  # a cache would be extended again by our calls
            hs = loaded.model(input_ids=input_ids, output_hidden_states=True, **kwargs).hidden_states
    finally:
        for h in handles:
            h.remove()
    ref = {}
    family = loaded.family
    with torch.no_grad():
        for i, block in enumerate(blocks):
            x = hs[i]
            args, kwargs = attn_inputs[i]
            attn_mod = block.get_submodule(attn_name)
            if family == "gpt2":
                a = _first(_call(attn_mod, args, kwargs, block.ln_1(x)))
                m = block.mlp(block.ln_2(x + a))
                out = x + a + m
            elif family == "gpt_neox":
                a = _first(_call(attn_mod, args, kwargs, block.input_layernorm(x)))
                if block.use_parallel_residual:
                    m = block.mlp(block.post_attention_layernorm(x))  # parallel: both read the block input
                else:
                    m = block.mlp(block.post_attention_layernorm(x + a))
                out = x + a + m
            elif family in ("gemma2", "gemma3_text"):
                a = block.post_attention_layernorm(_first(_call(attn_mod, args, kwargs, block.input_layernorm(x))))
                m = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x + a)))
                out = x + a + m
            elif family in ENCODER_TYPES:  # post-LN: sublayer outputs before the residual add + LayerNorm
                ctx = _first(_call(attn_mod, args, kwargs, x))
                a = block.attention.output.dense(ctx)
                mid = block.attention.output.LayerNorm(a + x)
                m = block.output.dense(block.intermediate(mid))
                out = block.output.LayerNorm(m + mid)
            else:  # llama, mistral, qwen2, qwen3, gemma
                a = _first(_call(attn_mod, args, kwargs, block.input_layernorm(x)))
                m = block.mlp(block.post_attention_layernorm(x + a))
                out = x + a + m
            ref[(i, "resid_pre")], ref[(i, "attn_out")], ref[(i, "mlp_out")], ref[(i, "resid_post")] = x, a, m, out
    return hs, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_stream_equals_the_independent_reference(family_dirs, name):
    loaded = load_model(name, family_dirs / name, device="cpu")
    assert loaded.family == model_type(name)
    assert loaded.n_layers == N_LAYERS and loaded.d_model == D
    assert loaded.is_encoder == (loaded.family in ENCODER_TYPES)
    ids = encode_ids(loaded, "the cat sat on the mat and then it ran far", prepend_bos=True)
    if loaded.is_encoder:
        assert ids[0] == 2 and ids[-1] == 3  # [CLS] … [SEP], the encoder's own specials
    else:
        assert ids[0] == 1  # BOS prepended
    input_ids = torch.tensor([ids])
    hooks = [(layer, stream) for layer in range(N_LAYERS) for stream in STREAMS]
    captured, logits = loaded.capture(input_ids, hooks, stop_early=False)
    hs, ref = reference(loaded, input_ids)
    assert (logits is None) == loaded.is_encoder
    for layer in range(N_LAYERS):
        torch.testing.assert_close(captured[(layer, "resid_pre")], hs[layer], rtol=0, atol=0)
        if layer + 1 < N_LAYERS:
            torch.testing.assert_close(captured[(layer, "resid_post")], hs[layer + 1], rtol=0, atol=0)
        for stream in STREAMS:
            got = captured[(layer, stream)]
            assert got.shape == (1, len(ids), D), (layer, stream)
            torch.testing.assert_close(got, ref[(layer, stream)], rtol=1e-5, atol=1e-5, msg=f"{name} L{layer} {stream}")
        if not loaded.is_encoder:  # pre-norm residual: what the sublayers add is the whole block update
            torch.testing.assert_close(captured[(layer, "resid_post")] - captured[(layer, "resid_pre")],
                                       captured[(layer, "attn_out")] + captured[(layer, "mlp_out")], rtol=1e-5, atol=1e-5)
    # the streams are not trivially equal to each other (a wrong module would often give one of these)
    assert not torch.allclose(captured[(1, "attn_out")], captured[(1, "mlp_out")])
    assert not torch.allclose(captured[(2, "resid_post")], captured[(2, "resid_pre")])


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "gemma2", "bert"])
def test_early_stop_gives_the_same_tensors_and_no_logits(family_dirs, name):
    loaded = load_model(name, family_dirs / name, device="cpu")
    input_ids = torch.tensor([encode_ids(loaded, "a big red dog ran", prepend_bos=True)])
    hooks = [(0, "mlp_out"), (1, "resid_post"), (1, "attn_out")]
    calls = []
    handle = loaded.blocks()[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        early, no_logits = loaded.capture(input_ids, hooks, stop_early=True)
        assert calls == []  # block 2 (and the LM head) never ran
        full, logits = loaded.capture(input_ids, hooks, stop_early=False)
        assert calls == [1]
    finally:
        handle.remove()
    assert no_logits is None
    assert (logits is None) == loaded.is_encoder
    if logits is not None:
        assert logits.shape == (1, input_ids.shape[1], VOCAB)
    assert set(early) == set(full) == set(hooks)
    for hook in hooks:
        torch.testing.assert_close(early[hook], full[hook], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_resid_pre_alone_stops_before_its_own_block(family_dirs, name):
    loaded = load_model(name, family_dirs / name, device="cpu")
    input_ids = torch.tensor([encode_ids(loaded, "the dog sat", prepend_bos=True)])
    ran = []
    handles = [block.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, block in enumerate(loaded.blocks())]
    try:
        captured, logits = loaded.capture(input_ids, [(1, "resid_pre"), (0, "resid_pre")], stop_early=True)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0] and logits is None  # resid_pre 1 is the input of block 1: block 1 never ran
    with torch.no_grad():
        hs = loaded.model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(captured[(1, "resid_pre")], hs[1], rtol=0, atol=0)
    torch.testing.assert_close(captured[(0, "resid_pre")], hs[0], rtol=0, atol=0)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, ffn_dim=48,
                         num_attention_heads=4).save_pretrained(tmp_path / "opt")
    with pytest.raises(ModelError, match=r"architecture 'opt' is not supported; supported: bert, gemma, gemma2, "
                                         r"gemma3_text, gpt2, gpt_neox, llama, mistral, qwen2, qwen3, roberta"):
        read_card(str(tmp_path / "opt"))
    assert set(CONFIGS) - {"gpt_neox-sequential"} <= set(FAMILIES)


def test_the_fingerprint_is_the_weights_not_their_folder(family_dirs, tmp_path):
    """A model copied to another folder (another checkout) keeps its fingerprint, so its runs keep their
    ids; other weights in the same folder shape do not."""
    import shutil

    copy = shutil.copytree(family_dirs / "llama", tmp_path / "elsewhere" / "llama-copy")
    card = read_card(str(family_dirs / "llama"))
    assert read_card(str(copy)).fingerprint == card.fingerprint
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    assert read_card(str(copy)).fingerprint != card.fingerprint
    # the tokenizer's part of a run id: its files, never the folder's path, also for a WordPiece tokenizer
    # that has only vocab.txt
    from sae_discover.loaders import tokenizer_fingerprint

    wordpiece = [tmp_path / "a" / "bert", tmp_path / "b" / "bert"]
    for folder in wordpiece:
        folder.mkdir(parents=True)
        (folder / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    assert tokenizer_fingerprint(str(wordpiece[0])) == tokenizer_fingerprint(str(wordpiece[1]))
    (wordpiece[1] / "vocab.txt").write_text("[PAD]\n[UNK]\nworld\n")
    assert tokenizer_fingerprint(str(wordpiece[0])) != tokenizer_fingerprint(str(wordpiece[1]))
    assert tokenizer_fingerprint(str(copy)) == tokenizer_fingerprint(str(family_dirs / "llama"))


def test_bad_layers_and_streams_name_the_field(family_dirs):
    loaded = load_model("llama", family_dirs / "llama", device="cpu")
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ModelError, match=r"layers: layer 3 is out of range for llama \(3 layers: 0..2\)"):
        loaded.capture(ids, [(3, "resid_pre")])
    with pytest.raises(ModelError, match="streams: expected values in resid_pre, resid_post, mlp_out, attn_out"):
        loaded.capture(ids, [(0, "hook_z")])


def _relu_sae(layer: int, stream: str, d_sae: int = 40, seed: int = 0) -> SAE:
    rng = np.random.default_rng(seed)
    cfg = SAEConfig(d_in=D, d_sae=d_sae, hook_name=saelens.hook_name(layer, stream), layer=layer, stream=stream)
    return SAE(cfg=cfg, W_enc=torch.from_numpy(rng.normal(size=(D, d_sae)).astype(np.float32)),
               b_enc=torch.from_numpy(rng.normal(size=d_sae).astype(np.float32) * 0.1),
               W_dec=torch.from_numpy(rng.normal(size=(d_sae, D)).astype(np.float32)),
               b_dec=torch.from_numpy(rng.normal(size=D).astype(np.float32) * 0.1))


def test_only_kept_tokens_are_encoded(family_dirs, monkeypatch):
    """The top-K filter runs before the SAE: the encoder sees exactly K rows, those of the kept tokens."""
    loaded = load_model("gpt2", family_dirs / "gpt2", device="cpu")
    sae = _relu_sae(1, "resid_post")
    seen = []
    original = SAE.encode

    def spy(self, x, features=None):
        seen.append(x.detach().clone())
        return original(self, x, features)
    monkeypatch.setattr(SAE, "encode", spy)
    text = "the cat sat on the mat and then it ran far and it was big"
    spec = ingest_run.RunSpec(text=text, hooks=[(1, "resid_post")], token_proxy="norm", topk_tokens_per_seq=4)
    batch = ingest_run.run(loaded, [sae], spec)
    kept = np.flatnonzero(batch.tokens.column("kept").to_numpy(zero_copy_only=False))
    assert len(kept) == 4 == batch.n_kept
    assert 0 not in kept  # BOS never analysed
    assert sum(len(x) for x in seen) == 4  # only the kept rows reached the SAE
    ids = torch.tensor([batch.tokens.column("token_id").to_pylist()])
    captured, _ = loaded.capture(ids, [(1, "resid_post")], stop_early=False)
    x = captured[(1, "resid_post")][0]
    norms = x.norm(dim=-1).numpy()
    expected = 1 + np.argsort(-norms[1:], kind="stable")[:4]  # the K non-BOS tokens with the largest norm
    np.testing.assert_array_equal(np.sort(kept), np.sort(expected))
    torch.testing.assert_close(torch.cat(seen), x[torch.from_numpy(np.sort(kept))], rtol=1e-6, atol=1e-6)
    positions = batch.activations.column("position").to_numpy()
    assert set(positions.tolist()) <= set(kept.tolist())


def test_run_many_encodes_the_chunk_together_and_equals_one_at_a_time(family_dirs):
    """Kept tokens of several runs are encoded in one GEMM per (hook, restrict set); each run's rows are the
    same as when it runs alone (mixed lengths, K and restrict sets)."""
    loaded = load_model("llama", family_dirs / "llama", device="cpu")
    hooks = [(0, "mlp_out"), (2, "resid_pre")]
    saes = [_relu_sae(0, "mlp_out", seed=1), _relu_sae(2, "resid_pre", seed=2)]
    texts = ["the cat sat on the mat", "a big red dog ran far and then it sat", "blue green small cat"]
    specs = [ingest_run.RunSpec(text=t, hooks=hooks, token_proxy="norm", topk_tokens_per_seq=k, restrict_features=r)
             for t, k, r in zip(texts, (3, 64, 2), ([], [], [5, 1, 30]), strict=True)]
    together = ingest_run.run_many(loaded, saes, specs)
    for spec, batch in zip(specs, together, strict=True):
        alone = ingest_run.run(loaded, saes, spec)
        assert batch.tokens.column("kept").to_pylist() == alone.tokens.column("kept").to_pylist()
        a, b = batch.activations.to_pydict(), alone.activations.to_pydict()
        assert (a["position"], a["sae_index"], a["feature_id"]) == (b["position"], b["sae_index"], b["feature_id"])
        np.testing.assert_allclose(a["act"], b["act"], rtol=1e-5, atol=1e-5)
        kept = {p for p, k in enumerate(batch.tokens.column("kept").to_pylist()) if k}
        assert set(a["position"]) <= kept and len(kept) == min(spec.topk_tokens_per_seq, batch.n_tokens - 1)
        if spec.restrict_features:
            assert set(a["feature_id"]) <= set(spec.restrict_features)
    assert together[1].activations.num_rows > 0


def test_the_logits_budget_splits_micro_batches_without_changing_results(family_dirs, monkeypatch):
    """Entropy-filtered runs need the [batch, width, vocab] logits: a budget caps the rows per forward
    pass (long sequences, large vocabularies), and the runs come out the same."""
    assert list(ingest_run._micro_batches(list(range(6)), [10, 10, 20, 30, 40, 100], 16, 60)) == [[0, 1, 2], [3], [4], [5]]
    assert list(ingest_run._micro_batches(list(range(5)), [1] * 5, 2, None)) == [[0, 1], [2, 3], [4]]
    loaded = load_model("gpt2", family_dirs / "gpt2", device="cpu")
    hooks = [(1, "resid_post")]
    saes = [_relu_sae(1, "resid_post", seed=3)]
    texts = ["the cat sat on the mat and the dog", "a big red dog ran far", "blue green small cat sat on a mat"]
    specs = [ingest_run.RunSpec(text=t, hooks=hooks, token_proxy="entropy", topk_tokens_per_seq=2) for t in texts]
    together = ingest_run.run_many(loaded, saes, specs)
    calls = []
    capture = loaded.capture
    monkeypatch.setattr(loaded, "capture", lambda ids, *a, **k: calls.append(ids.shape[0]) or capture(ids, *a, **k))
    monkeypatch.setattr(ingest_run, "LOGITS_BUDGET", 1)  # one row per forward pass
    split = ingest_run.run_many(loaded, saes, specs)
    assert calls == [1, 1, 1]
    for a, b in zip(together, split, strict=True):
        assert a.tokens.column("kept").to_pylist() == b.tokens.column("kept").to_pylist() and a.n_kept == 2
        np.testing.assert_allclose(a.tokens.column("proxy").to_numpy(), b.tokens.column("proxy").to_numpy(), rtol=1e-5)
        assert a.activations.column("feature_id").to_pylist() == b.activations.column("feature_id").to_pylist()


def test_keep_top_k_keeps_the_highest_proxies_ties_to_the_earlier_position():
    rng = np.random.default_rng(0)
    for n, k in ((1, 1), (10, 3), (50, 7), (50, 60)):
        proxy = torch.from_numpy(rng.integers(0, 4, size=n).astype(np.float32))  # many ties
        candidates = torch.from_numpy(rng.random(n) < 0.8)
        cand = [i for i in range(n) if candidates[i]]
        expected = sorted(cand, key=lambda i: (-float(proxy[i]), i))[:k]
        got = keep_top_k(proxy, candidates, k)
        assert sorted(torch.nonzero(got).flatten().tolist()) == sorted(expected)
    # a NaN proxy (entropy of inf logits) ranks last, below every number, and still counts as a candidate
    nan = float("nan")
    proxy = torch.tensor([1.0, nan, 3.0, 2.0, 9.0])
    candidates = torch.tensor([True, True, True, True, False])
    assert torch.nonzero(keep_top_k(proxy, candidates, 1)).flatten().tolist() == [2]
    assert torch.nonzero(keep_top_k(proxy, candidates, 4)).flatten().tolist() == [0, 1, 2, 3]
    assert torch.nonzero(keep_top_k(torch.tensor([nan, 5.0, 7.0]), torch.tensor([True, True, False]), 2)
                         ).flatten().tolist() == [0, 1]
    # a micro-batch: one k per row, each row as if alone
    proxy = torch.from_numpy(rng.integers(0, 3, size=(4, 30)).astype(np.float64))
    candidates = torch.from_numpy(rng.random((4, 30)) < 0.7)
    ks = torch.tensor([0, 2, 9, 40])
    got = keep_top_k(proxy, candidates, ks)
    for row in range(4):
        cand = [i for i in range(30) if candidates[row, i]]
        expected = sorted(sorted(cand, key=lambda i: (-float(proxy[row, i]), i))[: int(ks[row])])
        assert torch.nonzero(got[row]).flatten().tolist() == expected


@pytest.mark.parametrize("text", ["Shares of Globex rose 12% after the call.", "naïve café — 日本語 🙂🙂 ok", "€€ ∑x 😀"])
def test_token_pieces_are_the_text_each_token_adds_to_the_decoded_sequence(text):
    """Oracle (incremental detokenization over whole prefixes): after token i the text printed so far
    is the decode of ids[:i+1] without a trailing U+FFFD (a character still incomplete); a token's
    piece is what it adds. The pieces then join to the decoded text, multi-byte characters whole."""
    from transformers import AutoTokenizer

    from tests.conftest import ROOT

    tok = AutoTokenizer.from_pretrained(ROOT / "ingest/demo/model")
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    printed = [""] + [tok.decode(ids[: i + 1], skip_special_tokens=False).rstrip("\ufffd") for i in range(len(ids))]
    expected = [printed[i + 1][len(printed[i]):] for i in range(len(ids))]
    assert any(p == "" for p in expected) == (text != "Shares of Globex rose 12% after the call.")  # split chars
    got = token_pieces(tok, ids)
    assert got == expected
    assert "".join(got) == tok.decode(ids, skip_special_tokens=False)
    assert token_pieces(tok, ids) == got  # again, from the per-tokenizer cache


@pytest.mark.parametrize("text", ["hello world", "price € and ∑x 😀 ok", "€€😀😀", "x €"])
def test_token_pieces_with_sentencepiece_byte_fallback(text):
    """A Llama-2-style tokenizer (Metaspace, byte fallback: € is three byte tokens, decoded as a group):
    every character is printed once, whole, by the token completing it, leading spaces kept."""
    from tokenizers import decoders

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = [1, *tok(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) > len(text) + 1 or text == "hello world"  # multi-byte characters really are split
    got = token_pieces(tok, ids)
    assert len(got) == len(ids) and "".join(got) == tok.decode(ids, skip_special_tokens=False) == "<s> " + text
    assert [p for p in got if p] == ["<s>", *(" " + text)]  # one character per printing token, in order
    cut = token_pieces(tok, ids[:-1])  # ending inside a character (the last two texts): nothing is lost
    assert cut[:-1] == got[: len(cut) - 1] and cut[-1] != ""


def test_token_pieces_of_ids_past_the_tokenizers_vocabulary():
    """A model whose embedding is padded past its tokenizer's vocabulary can generate an id the
    tokenizer cannot decode: it prints as ``<id N>``, and the pieces around it are those of the known
    ids alone (a character split around it is still printed whole by its own tokens)."""
    from transformers import AutoTokenizer

    from tests.conftest import ROOT

    tok = AutoTokenizer.from_pretrained(ROOT / "ingest/demo/model")
    size = len(tok)
    left = [tok.bos_token_id, *tok("Shares rose", add_special_tokens=False)["input_ids"]]
    right = tok(" naïve 🙂 ok", add_special_tokens=False)["input_ids"]
    got = token_pieces(tok, [*left, size, *right, size + 7])
    assert got == [*token_pieces(tok, left), f"<id {size}>", *token_pieces(tok, right), f"<id {size + 7}>"]
    assert "".join(got) == tok.decode(left) + f"<id {size}>" + tok.decode(right) + f"<id {size + 7}>"


def test_norm_proxy_per_row_against_numpy():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(3, 12, 5)).astype(np.float32) * s for s in (1.0, 40.0)]  # two hooks, different scales
    candidates = rng.random((3, 12)) < 0.6
    candidates[2] = False  # a row without candidates must not divide by zero
    candidates[0, 0] = False
    xs[0][0, 0] = np.inf  # an overflowing non-candidate (a BOS in fp16) must not poison its row
    got = norm_proxy([torch.from_numpy(x) for x in xs], torch.from_numpy(candidates)).numpy()
    for row in range(3):
        parts = []
        for x in xs:
            norms = np.linalg.norm(x[row].astype(np.float64), axis=-1)
            scale = norms[candidates[row]].mean() if candidates[row].any() else 1.0
            parts.append(norms / scale)
        np.testing.assert_allclose(got[row], np.mean(parts, axis=0), rtol=1e-6)


def test_encoder_text_mode_never_analyses_its_specials_and_uses_the_norm_proxy(family_dirs):
    loaded = load_model("bert", family_dirs / "bert", device="cpu")
    sae = _relu_sae(1, "resid_pre")
    text = "the cat sat on the mat"
    spec = ingest_run.RunSpec(text=text, hooks=[(1, "resid_pre")], token_proxy="entropy", topk_tokens_per_seq=3)
    batch = ingest_run.run(loaded, [sae], spec)
    tokens = batch.tokens.to_pydict()
    assert tokens["token_id"][0] == 2 and tokens["token_id"][-1] == 3  # [CLS] … [SEP]
    assert tokens["is_special"][0] and tokens["is_special"][-1] and not any(tokens["is_special"][1:-1])
    assert not tokens["kept"][0] and not tokens["kept"][-1] and sum(tokens["kept"]) == 3
    # no logits from an encoder: entropy falls back to the norm proxy, computed here independently
    captured, logits = loaded.capture(torch.tensor([tokens["token_id"]]), [(1, "resid_pre")], stop_early=False)
    assert logits is None
    candidates = ~np.array(tokens["is_special"])
    norms = np.linalg.norm(captured[(1, "resid_pre")][0].double().numpy(), axis=-1)
    np.testing.assert_allclose(tokens["proxy"], norms / norms[candidates].mean(), rtol=1e-6)
    assert set(batch.activations.column("position").to_pylist()) <= {i for i, k in enumerate(tokens["kept"]) if k}
    with pytest.raises(ModelError, match=r"generate: bert is an encoder \(bert\) and cannot generate"):
        ingest_run.run(loaded, [sae], ingest_run.RunSpec(prompt=text, generate=True, hooks=[(1, "resid_pre")]))


def test_discovery_refuses_generation_on_an_encoder_and_runs_text_mode(family_dirs, tmp_path, catalog):
    from sae_discover.registry import Registry
    from sae_discover.request import DiscoverRequest, RequestError
    from sae_discover.service import Discovery

    saelens.save(_relu_sae(1, "resid_post"), tmp_path / "sae")
    reg = tmp_path / "reg.toml"
    reg.write_text("")
    disc = Discovery(catalog, Registry.load(reg), device="cpu")
    model, sae = str(family_dirs / "bert"), str(tmp_path / "sae")
    with pytest.raises(RequestError) as err:
        disc.discover(DiscoverRequest(model_id=model, sae_id=sae, prompt="the cat", generate=True, layers=[1],
                                      streams=["resid_post"]))
    assert err.value.field == "generate"
    assert "encoder" in str(err.value)
    out = disc.discover(DiscoverRequest(model_id=model, sae_id=sae, text="the cat sat on the mat", layers=[1],
                                        streams=["resid_post"], min_coverage_pct=0))
    assert out["analyzed"]["mode"] == "text"
    assert out["analyzed"]["total_tokens"] == 8 and out["analyzed"]["tokens"] == 6  # [CLS] and [SEP] not analysed
    assert json.dumps(out)  # serialisable
    # calibration and lite labels work for an encoder too (its specials are not calibration tokens)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\na big dog ran far\n")
    cal = disc.calibrate(model, sae, corpus, hooks=[(1, "resid_post")])
    assert cal["n_docs"] == 2 and cal["n_tokens"] == 6 + 5  # words only: no [CLS] / [SEP]
