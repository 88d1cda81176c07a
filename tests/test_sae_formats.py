"""Gemma Scope and EleutherAI sparsify SAEs written by the test (numpy / safetensors), loaded by us, and
encoded against the formulas computed independently in numpy; layouts, sidecars and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from ingest.run import sparse_codes
from ingest.saes import saelens
from ingest.saes.base import SAE, SAEConfig, SAEError
from ingest.saes.sources import open_source

D_IN, D_SAE, K = 16, 40, 6


def gemmascope_weights(seed: int = 0, lower: bool = False, d_in: int = D_IN) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"W_enc": rng.normal(size=(d_in, D_SAE)).astype(np.float32) * 0.4,
         "W_dec": rng.normal(size=(D_SAE, d_in)).astype(np.float32) * 0.4,
         "b_enc": rng.normal(size=D_SAE).astype(np.float32) * 0.2,
         "b_dec": rng.normal(size=d_in).astype(np.float32) * 0.5,
         "threshold": np.abs(rng.normal(size=D_SAE)).astype(np.float32) * 0.5}
    return {k.lower(): v for k, v in w.items()} if lower else w


def write_gemmascope(folder: Path, kind: str = "npz", seed: int = 0, lower: bool = False,
                     config: dict | None = None, d_in: int = D_IN) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    w = gemmascope_weights(seed, lower, d_in)
    if kind == "npz":
        np.savez(folder / "params.npz", **w)
    else:
        save_file(w, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return {k.lower(): v.astype(np.float64) for k, v in w.items()}


def jumprelu_numpy(w, x):
    """Gemma Scope's encode: no b_dec subtracted from the input."""
    pre = x.astype(np.float64) @ w["w_enc"] + w["b_enc"]
    return np.maximum(pre, 0) * (pre > w["threshold"])


def write_sparsify(folder: Path, seed: int = 0, cfg: dict | None = None, dtype=np.float32,
                   d_in: int = D_IN) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"encoder.weight": rng.normal(size=(D_SAE, d_in)).astype(dtype) * 0.4,
         "encoder.bias": rng.normal(size=D_SAE).astype(dtype) * 0.2,
         "W_dec": rng.normal(size=(D_SAE, d_in)).astype(dtype) * 0.4,
         "b_dec": rng.normal(size=d_in).astype(dtype) * 0.5}
    folder.mkdir(parents=True, exist_ok=True)
    body = {"expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K, "multi_topk": False,
            "skip_connection": False, "transcode": False, "d_in": d_in, **(cfg or {})}
    (folder / "cfg.json").write_text(json.dumps(body))
    save_file(w, str(folder / "sae.safetensors"))
    return {k: v.astype(np.float64) for k, v in w.items()}


def sparsify_numpy(w, x, k=K):
    """sparsify's SparseCoder.encode: top_k(relu(encoder(x - b_dec))), scattered into a dense row."""
    pre = np.maximum((x.astype(np.float64) - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=1)[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, 1), 1)
    return out


def inputs(seed: int = 1, n: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32) * 1.5


FEATS = (1, 4, 9, 22, 39)


@pytest.mark.parametrize("kind,lower", [("npz", False), ("npz", True), ("safetensors", False), ("safetensors", True)])
def test_gemmascope_encode_equals_numpy_and_restrict_gives_its_columns(tmp_path, kind, lower):
    release = tmp_path / "gemma-scope-2b-pt-res"
    w = write_gemmascope(release / "layer_5" / "width_16k" / "average_l0_71", kind, lower=lower)
    for target in (release, release / "layer_5" / "width_16k" / "average_l0_71",
                   release / "layer_5" / "width_16k" / "average_l0_71" / f"params.{kind}"):
        src = open_source("gs", target)
        assert sorted(src.hooks) == [(5, "resid_post")]
    cfg = src.config(5, "resid_post")
    assert (cfg.d_in, cfg.d_sae, cfg.architecture, cfg.apply_b_dec_to_input) == (D_IN, D_SAE, "jumprelu", False)
    assert cfg.hook_name == "blocks.5.hook_resid_post"
    sae = src.load(5, "resid_post")
    x = inputs()
    expected = jumprelu_numpy(w, x)
    assert 0 < (expected > 0).sum() < expected.size  # the threshold matters: some, not all, fire
    full = sae.encode(torch.from_numpy(x))
    np.testing.assert_allclose(full.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x), FEATS).numpy(), full.numpy()[:, list(FEATS)],
                               rtol=1e-6, atol=1e-6)  # the same columns (to BLAS rounding)
    pos, feat, act = sparse_codes(sae, torch.from_numpy(x), np.arange(len(x), dtype=np.int32), FEATS, chunk=7)
    order = np.lexsort((feat, pos))
    rows, cols = np.nonzero(expected[:, list(FEATS)])  # row-major: sorted by (position, feature)
    np.testing.assert_array_equal(pos[order], rows)
    np.testing.assert_array_equal(feat[order], np.asarray(FEATS)[cols])
    np.testing.assert_allclose(act[order], expected[rows, np.asarray(FEATS)[cols]], rtol=1e-5, atol=1e-5)


def test_gemmascope2_config_json_names_the_hook(tmp_path):
    folder = tmp_path / "gemma-scope-2-1b-pt" / "mlp_out" / "layer_3_width_16k_l0_small"
    w = write_gemmascope(folder, "safetensors", lower=True, seed=3, config={
        "hf_hook_point_in": "model.layers.3.post_feedforward_layernorm.output", "width": D_SAE,
        "model_name": "google/gemma-3-1b-pt", "architecture": "jump_relu", "l0": 20, "type": "sae",
        "affine_connection": False})
    write_gemmascope(tmp_path / "gemma-scope-2-1b-pt" / "resid_post_all" / "layer_7_width_16k_l0_big", "safetensors",
                     lower=True, config={"hf_hook_point_in": "model.layers.7.output", "type": "sae"})
    src = open_source("gs2", tmp_path / "gemma-scope-2-1b-pt")
    assert sorted(src.hooks) == [(3, "mlp_out"), (7, "resid_post")]
    assert src.config(3, "mlp_out").model_name == "google/gemma-3-1b-pt"
    x = inputs(2)
    np.testing.assert_allclose(src.load(3, "mlp_out").encode(torch.from_numpy(x)).numpy(), jumprelu_numpy(w, x),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(SAEError, match=r"has no SAE for layer 4 mlp_out; it has: layer 3 mlp_out, layer 7 resid_post"):
        src.folder(4, "mlp_out")
    for layer, stream, missing in ((4, "mlp_out", "layers"), (3, "resid_pre", "streams")):  # the field to change
        with pytest.raises(SAEError) as err:
            src.folder(layer, stream)
        assert err.value.field == missing


def test_gemmascope_layout_words_sidecar_and_refusals(tmp_path):
    write_gemmascope(tmp_path / "gemma-scope-2b-pt-mlp-canonical" / "layer_2" / "width_16k" / "canonical")
    assert sorted(open_source("m", tmp_path / "gemma-scope-2b-pt-mlp-canonical").hooks) == [(2, "mlp_out")]
    write_gemmascope(tmp_path / "gemma-scope-2b-pt-att" / "layer_0" / "width_16k" / "average_l0_104")
    with pytest.raises(SAEError, match=r"Gemma Scope attention SAEs .*hook_z.* not supported"):
        open_source("a", tmp_path / "gemma-scope-2b-pt-att")
    write_gemmascope(tmp_path / "gs2-att" / "attn_out_all" / "layer_11_width_16k_l0_small", "safetensors", lower=True,
                     config={"hf_hook_point_in": "model.layers.11.self_attn.o_proj.input"})
    with pytest.raises(SAEError, match=r"hf_hook_point_in 'model.layers.11.self_attn.o_proj.input' is not one of"):
        open_source("a2", tmp_path / "gs2-att")
    write_gemmascope(tmp_path / "tc" / "transcoder_all" / "layer_5_width_16k_l0_big_affine", "safetensors", lower=True,
                     config={"hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output", "type": "transcoder"})
    with pytest.raises(SAEError, match="Gemma Scope transcoder is not an SAE"):
        open_source("t", tmp_path / "tc")
    # no layer in the layout: a clear error that names the sidecar; with the sidecar, its hook wins
    write_gemmascope(tmp_path / "mine" / "custom")
    with pytest.raises(SAEError, match=r"cannot tell which layer.*sae-discover.json"):
        open_source("c", tmp_path / "mine")
    (tmp_path / "mine" / "custom" / "sae-discover.json").write_text(json.dumps({"hook_name": "blocks.4.hook_resid_pre"}))
    src = open_source("c", tmp_path / "mine")
    assert sorted(src.hooks) == [(4, "resid_pre")]
    assert src.config(4, "resid_pre").hook_name == "blocks.4.hook_resid_pre"
    # a width with several L0s under one layer is ambiguous: both are named
    write_gemmascope(tmp_path / "gemma-scope-9b-pt-res" / "layer_1" / "width_16k" / "average_l0_10")
    write_gemmascope(tmp_path / "gemma-scope-9b-pt-res" / "layer_1" / "width_16k" / "average_l0_90")
    with pytest.raises(SAEError, match=r"several SAEs for layer 1 resid_post: .*average_l0_10 and .*average_l0_90"):
        open_source("dup", tmp_path / "gemma-scope-9b-pt-res")


def test_sparsify_encode_equals_numpy_and_hookpoints_name_the_hooks(tmp_path):
    run = tmp_path / "sparsify-run"
    w1 = write_sparsify(run / "layers.1", seed=1)
    w2 = write_sparsify(run / "layers.2.mlp", seed=2)
    write_sparsify(run / "h.3.attn", seed=3)
    (run / "config.json").write_text(json.dumps({"hookpoints": ["layers.1", "layers.2.mlp", "h.3.attn"]}))
    src = open_source("sp", run)
    assert sorted(src.hooks) == [(1, "resid_post"), (2, "mlp_out"), (3, "attn_out")]
    cfg = src.config(2, "mlp_out")
    assert (cfg.d_in, cfg.d_sae, cfg.architecture, cfg.k, cfg.apply_b_dec_to_input) == (D_IN, D_SAE, "topk", K, True)
    x = inputs(4)
    for key, w in (((1, "resid_post"), w1), ((2, "mlp_out"), w2)):
        sae = src.load(*key)
        full = sae.encode(torch.from_numpy(x)).numpy()
        expected = sparsify_numpy(w, x)
        np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-5)
        assert ((full > 0).sum(1) <= K).all() and (full > 0).sum() > 0
        # TopK: restrict selects columns of the full encode (the whole pre-activation is still computed)
        np.testing.assert_array_equal(sae.encode(torch.from_numpy(x), FEATS).numpy(), full[:, list(FEATS)])
    # fewer than k positive pre-activations: sparsify keeps the positive ones only, and so do we
    shifted = write_sparsify(tmp_path / "neg" / "layers.0", seed=5)
    sae = open_source("neg", tmp_path / "neg").load(0, "resid_post")
    with torch.no_grad():
        sae.b_enc -= 3.0
    shifted["encoder.bias"] = shifted["encoder.bias"] - 3.0
    got, expected = sae.encode(torch.from_numpy(x)).numpy(), sparsify_numpy(shifted, x)
    assert ((expected > 0).sum(1) < K).any()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # one SAE folder given directly; half-precision weights are read and encoded in fp32
    wb = write_sparsify(tmp_path / "bf" / "gpt_neox.layers.4", seed=6, dtype=np.float16)
    sae = open_source("one", tmp_path / "bf" / "gpt_neox.layers.4").load(4, "resid_post")
    assert sae.W_enc.dtype == torch.float32 and tuple(sae.W_enc.shape) == (D_IN, D_SAE)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), sparsify_numpy(wb, x), rtol=1e-5, atol=1e-5)


def test_sparsify_refusals_and_sidecar(tmp_path):
    write_sparsify(tmp_path / "tc" / "layers.1.mlp", cfg={"transcode": True})
    with pytest.raises(SAEError, match=r"transcoder \(transcode=true\)"):
        open_source("tc", tmp_path / "tc")
    write_sparsify(tmp_path / "gm" / "layers.1", cfg={"activation": "groupmax"})
    with pytest.raises(SAEError, match="activation 'groupmax' is not supported"):
        open_source("gm", tmp_path / "gm")
    write_sparsify(tmp_path / "emb" / "embed_tokens")
    with pytest.raises(SAEError, match=r"hookpoint 'embed_tokens'.*sae-discover.json"):
        open_source("emb", tmp_path / "emb")
    (tmp_path / "emb" / "embed_tokens" / "sae-discover.json").write_text(json.dumps({"layer": 0, "stream": "resid_pre"}))
    assert sorted(open_source("emb", tmp_path / "emb").hooks) == [(0, "resid_pre")]
    write_sparsify(tmp_path / "wrong" / "layers.1", cfg={"d_in": D_IN + 1})
    with pytest.raises(SAEError, match=r"d_in=17 but encoder.weight has shape \(40, 16\)"):
        open_source("wrong", tmp_path / "wrong")


def test_a_mixed_folder_indexes_every_format_and_lists_them(tmp_path):
    w = gemmascope_weights(7)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, hook_name="blocks.2.hook_resid_pre", layer=2, stream="resid_pre")
    saelens.save(SAE(cfg, *(torch.from_numpy(w[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))), tmp_path / "mix" / "lens")
    write_sparsify(tmp_path / "mix" / "layers.1")
    write_gemmascope(tmp_path / "mix" / "layer_3" / "width_16k" / "average_l0_7")
    src = open_source("mix", tmp_path / "mix")
    assert sorted(src.hooks) == [(1, "resid_post"), (2, "resid_pre"), (3, "resid_post")]
    assert {k: f.name for k, f in src.formats.items()} == {(1, "resid_post"): "sparsify", (2, "resid_pre"): "saelens",
                                                          (3, "resid_post"): "gemmascope"}
    with pytest.raises(SAEError, match=r"no SAE for layer 0 mlp_out; it has: layer 1 resid_post, layer 2 resid_pre, "
                                       r"layer 3 resid_post"):
        src.load(0, "mlp_out")
    fingerprints = {k: src.fingerprint(*k) for k in src.hooks}
    assert len(set(fingerprints.values())) == 3
    write_sparsify(tmp_path / "mix" / "layers.1", seed=9)  # retrained weights: a new fingerprint
    assert open_source("mix", tmp_path / "mix").fingerprint(1, "resid_post") != fingerprints[(1, "resid_post")]
    assert open_source("mix", tmp_path / "mix").fingerprint(2, "resid_pre") == fingerprints[(2, "resid_pre")]


def _truncate(file: Path) -> None:
    blob = file.read_bytes()
    file.write_bytes(blob[: len(blob) // 2])


def test_truncated_and_corrupt_files_are_errors_naming_the_file(tmp_path):
    write_gemmascope(tmp_path / "a" / "layer_1" / "w")
    _truncate(tmp_path / "a" / "layer_1" / "w" / "params.npz")
    with pytest.raises(SAEError, match=r"params\.npz: not a readable \.npz file"):
        open_source("a", tmp_path / "a").load(1, "resid_post")
    write_gemmascope(tmp_path / "b" / "layer_1" / "w", "safetensors")
    _truncate(tmp_path / "b" / "layer_1" / "w" / "params.safetensors")
    with pytest.raises(SAEError, match=r"params\.safetensors: not a readable safetensors file"):
        open_source("b", tmp_path / "b").load(1, "resid_post")
    write_sparsify(tmp_path / "c" / "layers.1")
    _truncate(tmp_path / "c" / "layers.1" / "sae.safetensors")
    with pytest.raises(SAEError, match=r"sae\.safetensors: not a readable safetensors file"):
        open_source("c", tmp_path / "c").load(1, "resid_post")
    write_sparsify(tmp_path / "d" / "layers.1")
    (tmp_path / "d" / "layers.1" / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match=r"layers\.1/cfg\.json: cannot read it"):
        open_source("d", tmp_path / "d")
    # an .npz holding a pickled object array is refused, never unpickled
    folder = tmp_path / "e" / "layer_1" / "w"
    folder.mkdir(parents=True)
    w = gemmascope_weights()
    np.savez(folder / "params.npz", **{**w, "threshold": np.array([{"x": 1}] * D_SAE, dtype=object)})
    with pytest.raises(SAEError, match=r"params\.npz: not a readable \.npz file .*allow_pickle"):
        open_source("e", tmp_path / "e").load(1, "resid_post")
    # missing arrays are listed
    folder = tmp_path / "f" / "layer_1" / "w"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v for k, v in w.items() if k != "threshold"})
    with pytest.raises(SAEError, match=r"params\.npz: missing arrays \['threshold'\]"):
        open_source("f", tmp_path / "f")


def test_sae_width_must_match_the_hook(tmp_path):
    write_gemmascope(tmp_path / "g" / "layer_1" / "w")
    sae = open_source("g", tmp_path / "g").load(1, "resid_post")
    with pytest.raises(SAEError, match=r"expects width 16, the hooked activation has width 32"):
        sparse_codes(sae, torch.randn(4, 32), np.arange(4, dtype=np.int32), None)


def test_discovery_runs_with_a_gemmascope_and_a_sparsify_folder(tmp_path, catalog):
    """``--sae <folder>`` for each format, end to end on the shipped demo model (d_model 128)."""
    from sae_discover.registry import Registry
    from sae_discover.request import DiscoverRequest, RequestError
    from sae_discover.service import Discovery

    model = Path(__file__).resolve().parent.parent / "ingest" / "demo" / "model"
    d_model = json.loads((model / "config.json").read_text())["n_embd"]
    write_gemmascope(tmp_path / "gemma-scope-demo-res" / "layer_1" / "width_40" / "average_l0_5", d_in=d_model)
    write_sparsify(tmp_path / "sparsify-demo" / "h.1.mlp", d_in=d_model)
    reg = tmp_path / "reg.toml"
    reg.write_text("")
    disc = Discovery(catalog, Registry.load(reg), device="cpu")
    for sae, stream in ((tmp_path / "gemma-scope-demo-res", "resid_post"), (tmp_path / "sparsify-demo", "mlp_out")):
        out = disc.discover(DiscoverRequest(model_id=str(model), sae_id=str(sae), text="the market rose and fell",
                                            layers=[1], streams=[stream], min_coverage_pct=0, return_top_x=5))
        assert out["analyzed"]["layers"] == [1] and out["analyzed"]["streams"] == [stream]
        assert out["analyzed"]["tokens"] > 0 and out["features"]
        assert all(f["stream"] == stream and 0 <= f["feature_id"] < D_SAE for f in out["features"])
    con = catalog.raw()
    try:
        n_runs = con.execute("SELECT count(*) FROM v_runs").fetchone()[0]
    finally:
        con.close()
    assert n_runs == 2
    # an SAE whose width is not the hook's, and a layer beyond the model: clear errors, nothing written
    write_gemmascope(tmp_path / "gemma-scope-narrow-res" / "layer_1" / "width_40" / "average_l0_5", d_in=16)
    with pytest.raises(SAEError, match=r"expects width 16, the hooked activation has width 128"):
        disc.discover(DiscoverRequest(model_id=str(model), sae_id=str(tmp_path / "gemma-scope-narrow-res"),
                                      text="the market rose", layers=[1], streams=["resid_post"]))
    with pytest.raises(RequestError, match=r"layer 40 is out of range") as err:
        disc.discover(DiscoverRequest(model_id=str(model), sae_id=str(tmp_path / "gemma-scope-demo-res"),
                                      text="the market rose", layers=[40], streams=["resid_post"]))
    assert err.value.field == "layers"
    con = catalog.raw()
    try:
        assert con.execute("SELECT count(*) FROM v_runs").fetchone()[0] == n_runs
    finally:
        con.close()
