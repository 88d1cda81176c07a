"""SAE files written by the test in SAELens layout, loaded by us, encoded vs the formulas in numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from ingest.run import sparse_codes
from ingest.saes import saelens
from ingest.saes.base import SAEError
from ingest.saes.sources import open_source

D_IN, D_SAE = 16, 48


def write_sae(folder, arch: str, layout: str = "v6", seed: int = 0, apply_b_dec: bool = True,
              normalize: str = "none", scaling: float | None = None, center: bool = False, rescale: bool = False,
              layer: int = 3, stream: str = "resid_pre") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"W_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32) * 0.3,
         "b_enc": rng.normal(size=D_SAE).astype(np.float32) * 0.1,
         "W_dec": rng.normal(size=(D_SAE, D_IN)).astype(np.float32) * 0.3,
         "b_dec": rng.normal(size=D_IN).astype(np.float32) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = np.abs(rng.normal(size=D_SAE)).astype(np.float32) * 0.3
    if arch == "gated":
        del w["b_enc"]
        w.update(b_gate=rng.normal(size=D_SAE).astype(np.float32) * 0.1,
                 b_mag=rng.normal(size=D_SAE).astype(np.float32) * 0.1,
                 r_mag=rng.normal(size=D_SAE).astype(np.float32) * 0.1)
    hook = f"blocks.{layer}.hook_{stream}"
    model_ctx = {"model_name": "tiny", "hook_name": hook, "prepend_bos": True,
                 "model_from_pretrained_kwargs": {"center_writing_weights": center}}
    body = {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": apply_b_dec, "normalize_activations": normalize}
    if layout == "v6":
        cfg = {**body, "architecture": arch, "metadata": model_ctx}
        if arch == "topk":
            cfg.update(k=5, rescale_acts_by_decoder_norm=rescale)
    else:  # v5: flat, activation_fn_str
        cfg = {**body, **model_ctx, "hook_layer": layer, "architecture": "standard" if arch == "topk" else arch,
               "activation_fn_str": "topk" if arch == "topk" else "relu",
               "activation_fn_kwargs": {"k": 5} if arch == "topk" else {}}
    if scaling is not None:
        cfg["scaling_factor"] = scaling
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "sae_weights.safetensors"))
    return {k: v.astype(np.float64) for k, v in w.items()}


def numpy_encode(w, x, arch, apply_b_dec=True, normalize="none", scaling=None, center=False, rescale=False, k=5):
    x = x.astype(np.float64)
    if center:
        x = x - x.mean(-1, keepdims=True)
    if normalize == "expected_average_only_in":
        x = x * scaling
    elif normalize == "constant_norm_rescale":
        x = x * np.sqrt(D_IN) / np.linalg.norm(x, axis=-1, keepdims=True)
    elif normalize == "layer_norm":
        x = x - x.mean(-1, keepdims=True)
        x = x / (x.std(-1, ddof=1, keepdims=True) + 1e-5)
    if apply_b_dec:
        x = x - w["b_dec"]
    if arch == "gated":
        pre = x @ w["W_enc"]
        return (pre + w["b_gate"] > 0) * np.maximum(pre * np.exp(w["r_mag"]) + w["b_mag"], 0)
    pre = x @ w["W_enc"] + w["b_enc"]
    if arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > w["threshold"])
    if arch == "topk":
        if rescale:
            pre = pre * np.linalg.norm(w["W_dec"], axis=1)
        out = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, :k]
        np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
        return out
    return np.maximum(pre, 0)


CASES = [
    dict(arch="standard"), dict(arch="standard", layout="v5"), dict(arch="standard", apply_b_dec=False),
    dict(arch="topk"), dict(arch="topk", layout="v5"), dict(arch="topk", rescale=True),
    dict(arch="jumprelu"), dict(arch="gated"),
    dict(arch="standard", normalize="expected_average_only_in", scaling=1.7),
    dict(arch="standard", normalize="constant_norm_rescale"), dict(arch="jumprelu", normalize="layer_norm"),
    dict(arch="standard", center=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_encode_equals_the_numpy_formula(tmp_path, case):
    opts = {k: v for k, v in case.items() if k != "layout"}
    w = write_sae(tmp_path / "sae", case["arch"], layout=case.get("layout", "v6"),
                  **{k: v for k, v in opts.items() if k != "arch"})
    sae = saelens.load(tmp_path / "sae")
    assert (sae.cfg.layer, sae.cfg.stream) == (3, "resid_pre")
    x = np.random.default_rng(1).normal(size=(40, D_IN)).astype(np.float32) * 2
    got = sae.encode(torch.from_numpy(x)).numpy()
    expected = numpy_encode(w, x, **opts)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_restrict_gives_the_full_encode_columns_and_chunking_changes_nothing(tmp_path, arch):
    write_sae(tmp_path / "sae", arch)
    sae = saelens.load(tmp_path / "sae")
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(50, D_IN)).astype(np.float32))
    full = sae.encode(x)
    feats = (3, 7, 11, 40)
    torch.testing.assert_close(sae.encode(x, feats), full[:, list(feats)])
    positions = np.arange(100, 150, dtype=np.int32)
    one = sparse_codes(sae, x, positions, None, chunk=1000)
    many = sparse_codes(sae, x, positions, None, chunk=7)
    order = lambda t: np.lexsort((t[1], t[0]))  # noqa: E731
    for a, b in zip(one[:2], many[:2], strict=True):  # same nonzero (position, feature) set
        np.testing.assert_array_equal(a[order(one)], b[order(many)])
    np.testing.assert_allclose(one[2][order(one)], many[2][order(many)], rtol=1e-5, atol=1e-5)  # BLAS blocking only
    rows, cols = np.nonzero(full.numpy())
    assert sorted(zip(one[0].tolist(), one[1].tolist(), strict=True)) == sorted(
        zip((rows + 100).tolist(), cols.tolist(), strict=True))
    restricted = sparse_codes(sae, x, positions, feats, chunk=9)
    assert set(restricted[1].tolist()) <= set(feats)
    mask = np.isin(one[1], feats)
    assert sorted(zip(restricted[0], restricted[1], strict=True)) == sorted(zip(one[0][mask], one[1][mask], strict=True))


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_the_packed_cpu_encoder_equals_plain_addmm_and_numpy(tmp_path, arch):
    """The CPU fast path (oneDNN linear on a packed W_enc, ReLU fused) is taken on this torch build and
    gives the plain addmm path's codes; both match the numpy formula."""
    w = write_sae(tmp_path / "sae", arch)
    sae = saelens.load(tmp_path / "sae")
    x = np.random.default_rng(4).normal(size=(300, D_IN)).astype(np.float32) * 2
    packed = sae.encode(torch.from_numpy(x)).numpy()
    assert sae._packed is not None and sae._packed is not False  # the fast path really ran
    packed_once = sae._packed
    assert sae.to("cpu")._packed is packed_once  # moving to the device it is on keeps the packed copy
    sae._packed = None  # as on a build without oneDNN
    plain = sae.encode(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(packed, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(packed > 0, plain > 0)
    np.testing.assert_allclose(packed, numpy_encode(w, x, arch), rtol=1e-5, atol=1e-5)


def test_saelens_writer_round_trips(tmp_path):
    write_sae(tmp_path / "a", "topk", rescale=True)
    sae = saelens.load(tmp_path / "a")
    saelens.save(sae, tmp_path / "b")
    again = saelens.load(tmp_path / "b")
    x = torch.randn(10, D_IN)
    torch.testing.assert_close(again.encode(x), sae.encode(x))
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.3.hook_resid_pre"


def test_folder_of_saes_indexes_hooks_and_lists_them_when_one_is_missing(tmp_path):
    write_sae(tmp_path / "src" / "a", "standard", layer=2)
    write_sae(tmp_path / "src" / "b", "standard", layer=4, stream="mlp_out")
    src = open_source("mine", tmp_path / "src")
    assert sorted(src.hooks) == [(2, "resid_pre"), (4, "mlp_out")]
    with pytest.raises(SAEError, match=r"no SAE for layer 3 resid_pre; it has: layer 2 resid_pre, layer 4 mlp_out"):
        src.folder(3, "resid_pre")


def test_bad_files_are_clear_errors(tmp_path):
    write_sae(tmp_path / "sae", "standard")
    blob = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SAEError, match="not a readable safetensors"):
        saelens.load(tmp_path / "sae")
    write_sae(tmp_path / "odd", "standard")
    cfg = json.loads((tmp_path / "odd" / "cfg.json").read_text())
    (tmp_path / "odd" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "wavelet"}))
    with pytest.raises(SAEError, match="architecture: expected one of"):
        saelens.load(tmp_path / "odd")
    write_sae(tmp_path / "wide", "standard")
    sae = saelens.load(tmp_path / "wide")
    with pytest.raises(SAEError, match="expects width 16"):
        sparse_codes(sae, torch.randn(3, D_IN + 1), np.arange(3, dtype=np.int32), None)
