"""Attribution: ∂M/∂x from one backward pass, times the SAE's decode direction, against central finite
differences of M computed by independent forward passes with hand-written hooks (float64), and the
ablation deltas against an independent forward with the feature's contribution subtracted by hand."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

import ingest.run as ingest_run
from ingest.attribution import Ablation, ablation_deltas, attributions, capture_with_gradients, resolve_metric
from ingest.errors import ModelError
from ingest.models import load_model, quiet_transformers
from ingest.saes import saelens
from ingest.saes.base import SAE, SAEConfig
from ingest.tokens import pad_batch, special_mask
from sae_discover.registry import DEMO_DIR
from tests.conftest import run_cli
from tests.test_families import D, build

FAMILIES = ("gpt2", "llama", "gemma2")
HOOKS = [(0, "mlp_out"), (1, "resid_pre")]  # the second is downstream of the first: total derivatives
TARGETS = ("continuation", "next_tokens", "token:cat", "logit_diff:dog|mat")
PROMPT = "the cat sat on the mat and then"
EPS = 1e-5


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    quiet_transformers()
    root = tmp_path_factory.mktemp("attr-families")
    for name in FAMILIES:
        build(name, root / name)
    return root


def make_sae(arch: str, layer: int, stream: str, seed: int) -> SAE:
    """A random SAE of ``arch`` with a de-normalisation that makes the decode direction non-trivial:
    ReLU with expected_average_only_in, TopK rescaled by decoder norm with constant_norm_rescale,
    JumpReLU with layer_norm."""
    rng = np.random.default_rng(seed)
    d_sae = 40
    extra = {"relu": dict(architecture="standard", normalize_activations="expected_average_only_in",
                          scaling_factor=0.7),
             "topk": dict(architecture="topk", k=6, rescale_acts_by_decoder_norm=True,
                          normalize_activations="constant_norm_rescale"),
             "jumprelu": dict(architecture="jumprelu", normalize_activations="layer_norm")}[arch]
    cfg = SAEConfig(d_in=D, d_sae=d_sae, hook_name=saelens.hook_name(layer, stream), layer=layer, stream=stream, **extra)
    t = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    return SAE(cfg=cfg, W_enc=t(rng.normal(size=(D, d_sae)) * 0.5), b_enc=t(rng.normal(size=d_sae) * 0.1),
               W_dec=t(rng.normal(size=(d_sae, D)) * 0.3), b_dec=t(rng.normal(size=D) * 0.1),
               threshold=t(np.abs(rng.normal(size=d_sae)) * 0.2) if arch == "jumprelu" else None)


def _rms_llama(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rms_gemma2(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


@pytest.fixture()
def exact_fp64(monkeypatch):
    """transformers' RMSNorms compute in float32 whatever the model's dtype (and Gemma-2's eager attention
    takes its softmax in float32): float64 finite differences would measure that rounding. Here the
    norms are the same formulas without the casts, and a float64 softmax stays float64."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_llama)
    monkeypatch.setattr(Gemma2RMSNorm, "forward", _rms_gemma2)
    softmax = torch.nn.functional.softmax

    def softmax_in_input_dtype(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=x.dtype if x.dtype == torch.float64 else dtype)
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax_in_input_dtype)


def load64(folder):
    loaded = load_model("tiny", folder, device="cpu")
    loaded.model.double()
    return loaded


def sequence(loaded) -> tuple[list[int], int]:
    """The prompt plus four greedy tokens (ids, prompt length)."""
    spec = ingest_run.RunSpec(prompt=PROMPT, generate=True, gen_tokens=4, temperature=0.0, hooks=HOOKS)
    ids, n_prompt = ingest_run._sequence(loaded, spec, True, {})
    assert len(ids) > n_prompt
    return ids, n_prompt


def oracle_metric(logits: torch.Tensor, ids: list[int], n_prompt: int, target: str, tok) -> float:
    """M written out from the logits [n, vocab] of one sequence."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if target == "continuation":
        return float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))))
    if target == "next_tokens":
        return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))
    if target.startswith("token:"):
        return float(logp[-1, tok.convert_tokens_to_ids(target[6:])])
    a, b = target.split(":", 1)[1].split("|")
    return float(logits[-1, tok.convert_tokens_to_ids(a)] - logits[-1, tok.convert_tokens_to_ids(b)])


def module_of(loaded, layer: int, stream: str):
    block = loaded.blocks()[layer]
    if stream in ("resid_pre", "resid_post"):
        return block
    return block.get_submodule(loaded.family_map.mlp if stream == "mlp_out" else loaded.family_map.attn)


def perturbed_metric(loaded, ids, n_prompt, target, hook, position, delta: torch.Tensor) -> float:
    """M with ``delta`` added to the hooked stream at ``position`` by a hand-written hook."""
    layer, stream = hook
    module = module_of(loaded, layer, stream)

    def add(x):
        x = x.clone()
        x[0, position] += delta.to(x.dtype)
        return x

    if stream == "resid_pre":
        handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: ((add(args[0]), *args[1:]), kwargs) if args
            else (args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}), with_kwargs=True)
    else:
        handle = module.register_forward_hook(
            lambda _m, _i, out: (add(out[0]), *out[1:]) if isinstance(out, tuple) else add(out))
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        handle.remove()
    return oracle_metric(logits, ids, n_prompt, target, loaded.tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_attribution_equals_central_finite_differences(tiny_dirs, family, arch, exact_fp64):
    loaded = load64(tiny_dirs / family)
    saes = [make_sae(arch, layer, stream, seed=i) for i, (layer, stream) in enumerate(HOOKS)]
    ids, n_prompt = sequence(loaded)
    batch, mask, _ = pad_batch(loaded, [ids], [special_mask(loaded, ids, True)])
    for target in TARGETS:
        metric = resolve_metric(loaded.tokenizer, target)
        captured, _, grads, values = capture_with_gradients(loaded, batch, mask, HOOKS, [len(ids)], [n_prompt], [metric])
        with torch.no_grad():
            full = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        assert float(values[0]) == pytest.approx(oracle_metric(full, ids, n_prompt, target, loaded.tokenizer), rel=1e-9)
        checked = 0
        for hook, sae in zip(HOOKS, saes, strict=True):
            x = captured[hook][0]
            pos, feat, act = ingest_run.sparse_codes(sae, x, np.arange(len(ids), dtype=np.int32), None)
            attr = attributions(sae, x, grads[hook][0], pos, feat, act)
            assert attr.dtype == np.float64
            picks = np.argsort(-np.abs(attr))[:5]  # the largest: well above the differences' float64 rounding
            codes = sae.encode(x)
            for i in picks:
                t, f = int(pos[i]), int(feat[i])
                unit = torch.zeros_like(codes[t:t + 1], dtype=torch.float64)
                unit[0, f] = 1.0
                base = codes[t:t + 1].double()
                direction = (sae.decode_model(base + unit, x[t:t + 1]) - sae.decode_model(base, x[t:t + 1]))[0]
                plus = perturbed_metric(loaded, ids, n_prompt, target, hook, t, EPS * direction)
                minus = perturbed_metric(loaded, ids, n_prompt, target, hook, t, -EPS * direction)
                expected = float(act[i]) * (plus - minus) / (2 * EPS)
                assert attr[i] == pytest.approx(expected, rel=1e-6, abs=1e-12), (target, hook, t, f)
                checked += 1
        assert checked == 10


def test_run_stores_attributions_of_kept_nonzero_codes(tiny_dirs):
    """The run path's attr column equals the direct computation (float32), for kept tokens and nonzero
    codes only; without a target there is no attr column at all."""
    loaded = load_model("tiny", tiny_dirs / "gpt2", device="cpu")
    saes = [make_sae("relu", layer, stream, seed=i) for i, (layer, stream) in enumerate(HOOKS)]
    spec = ingest_run.RunSpec(text="the cat sat on the mat and then it ran far", hooks=HOOKS, token_proxy="norm",
                              topk_tokens_per_seq=5, attribution_target="next_tokens")
    out = ingest_run.run(loaded, saes, spec)
    acts = out.activations.to_pydict()
    assert "attr" in acts and len(acts["attr"]) == len(acts["act"]) > 0
    kept = {p for p, k in enumerate(out.tokens.column("kept").to_pylist()) if k}
    assert set(acts["position"]) <= kept and all(a != 0 for a in acts["act"])
    ids = out.tokens.column("token_id").to_pylist()
    batch, mask, _ = pad_batch(loaded, [ids], [special_mask(loaded, ids, True)])
    captured, _, grads, _ = capture_with_gradients(loaded, batch, mask, HOOKS, [len(ids)], [0],
                                                   [resolve_metric(loaded.tokenizer, "next_tokens")])
    for index, (hook, sae) in enumerate(zip(HOOKS, saes, strict=True)):
        rows = [i for i, s in enumerate(acts["sae_index"]) if s == index]
        pos = np.asarray([acts["position"][i] for i in rows])
        feat = np.asarray([acts["feature_id"][i] for i in rows])
        act = np.asarray([acts["act"][i] for i in rows], dtype=np.float32)
        expected = attributions(sae, captured[hook][0], grads[hook][0], pos, feat, act)
        np.testing.assert_allclose([acts["attr"][i] for i in rows], expected, rtol=1e-4, atol=1e-6)
    plain = ingest_run.run(loaded, saes, ingest_run.RunSpec(text=spec.text, hooks=HOOKS, token_proxy="norm",
                                                            topk_tokens_per_seq=5))
    assert "attr" not in plain.activations.column_names
    assert plain.activations.column("act").to_pylist() == pytest.approx(acts["act"], rel=1e-5)


def test_ablation_delta_equals_an_independent_forward_with_a_hand_written_hook(tiny_dirs, exact_fp64):
    loaded = load64(tiny_dirs / "llama")
    sae = make_sae("topk", 1, "resid_pre", seed=3)
    ids, n_prompt = sequence(loaded)
    metric = resolve_metric(loaded.tokenizer, "continuation")
    with torch.no_grad():
        x = loaded.capture(torch.tensor([ids]), [(1, "resid_pre")])[0][(1, "resid_pre")][0]
    codes = sae.encode(x)
    positions = np.arange(1, len(ids))
    features = [int(f) for f in torch.nonzero(codes[positions].sum(0)).flatten()[:5]]
    ablations = [Ablation((1, "resid_pre"), sae, f, positions, codes[positions, f].numpy()) for f in features]
    base, deltas = ablation_deltas(loaded, ids, n_prompt, metric, ablations, batch_size=2)
    with torch.no_grad():
        plain = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    assert base == pytest.approx(oracle_metric(plain, ids, n_prompt, "continuation", loaded.tokenizer), rel=1e-9)
    for f, delta in zip(features, deltas, strict=True):
        removed = torch.zeros_like(codes, dtype=torch.float64)
        removed[positions, f] = codes[positions, f].double()
        contribution = sae.decode_model(removed, x) - sae.decode_model(torch.zeros_like(removed), x)
        module = loaded.blocks()[1]

        def subtract(_m, args, kwargs, contribution=contribution):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden - contribution[None].to(hidden.dtype)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = module.register_forward_pre_hook(subtract, with_kwargs=True)
        try:
            with torch.no_grad():
                ablated = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        finally:
            handle.remove()
        expected = oracle_metric(ablated, ids, n_prompt, "continuation", loaded.tokenizer) - base
        assert delta == pytest.approx(expected, rel=1e-7, abs=1e-10)
    assert any(abs(d) > 1e-6 for d in deltas)

    # under a logits budget smaller than two rows' logits: one row per forward pass, the same deltas
    import ingest.attribution as attribution_module

    rows = []
    forward = loaded.forward_edited
    loaded.forward_edited = lambda batch, edits: rows.append(len(batch)) or forward(batch, edits)
    budget = attribution_module.LOGITS_BUDGET
    attribution_module.LOGITS_BUDGET = len(ids) * attribution_module.vocab_size(loaded) + 1
    try:
        _, one_by_one = ablation_deltas(loaded, ids, n_prompt, metric, ablations, batch_size=4)
    finally:
        attribution_module.LOGITS_BUDGET = budget
        loaded.forward_edited = forward
    assert rows == [1] * len(ablations) and one_by_one == pytest.approx(deltas, rel=1e-9, abs=1e-12)


def test_targets_that_cannot_be_attributed_are_refused_naming_the_field(tiny_dirs):
    loaded = load_model("tiny", tiny_dirs / "gpt2", device="cpu")
    for bad, why in (("token:cat dog", "2 tokens"), ("logit_diff:cat|", "two token texts"),
                     ("loss", "expected none, continuation"), ("token:", "needs the token's text")):
        with pytest.raises(ModelError) as err:
            resolve_metric(loaded.tokenizer, bad)
        assert err.value.field == "attribution_target" and why in err.value.message
        assert "\n" not in str(err.value)
    assert resolve_metric(loaded.tokenizer, "none") is None


# -- stored, ranked, verified: the toy demo through the service, the CLI and the catalog ---------------------

def toy_request(**extra):
    from sae_discover.request import build_request

    return build_request({"model_id": "toy", "sae_id": "toy", "prompt": "Revenue rose because", "gen_tokens": 8,
                          "layers": [1], "min_coverage_pct": 0, "attach_examples": False, **extra})


def test_catalog_attributions_equal_the_in_memory_run_and_rank_as_the_sum(toy_discovery, catalog):
    from catalog import ranking
    from catalog.errors import CatalogError
    from sae_discover.plan import plan_run
    from sae_discover.stored import rerank

    req = toy_request(attribution_target="continuation", score_mode="attribution", return_top_x=1000)
    out = toy_discovery.discover(req)
    assert out["features"] and all("attribution" in f["scores"] for f in out["features"])
    plan = plan_run(toy_discovery.loaders, toy_request(attribution_target="continuation"))
    assert plan.run_id == out["run_id"] != plan_run(toy_discovery.loaders, toy_request()).run_id
    loaded = toy_discovery.loaders.model(plan.entry)
    saes = [plan.source.load(layer, stream) for layer, stream in plan.hooks]
    memory = ingest_run.run(loaded, saes, plan.spec).activations.to_pydict()
    con = catalog.raw()
    stored = con.execute("SELECT position, feature_id, act, attr FROM v_activations WHERE run_id = ? "
                         "ORDER BY position, feature_id", [out["run_id"]]).fetchall()
    order = sorted(range(len(memory["act"])), key=lambda i: (memory["position"][i], memory["feature_id"][i]))
    assert [(r[0], r[1]) for r in stored] == [(memory["position"][i], memory["feature_id"][i]) for i in order]
    np.testing.assert_allclose([r[3] for r in stored], [memory["attr"][i] for i in order], rtol=1e-5, atol=1e-6)
    sums: dict[int, float] = {}
    for _, fid, _, attr in stored:
        sums[fid] = sums.get(fid, 0.0) + attr
    expected = sorted(sums, key=lambda f: (-sums[f], f))
    assert [f["feature_id"] for f in out["features"]] == expected
    assert [f["scores"]["attribution"] for f in out["features"]] == pytest.approx([sums[f] for f in expected], rel=1e-6)
    by_abs = rerank(catalog, out["run_id"], {"score_mode": "attribution_abs", "return_top_x": 3})
    assert [f["feature_id"] for f in by_abs["features"]] == sorted(sums, key=lambda f: (-abs(sums[f]), f))[:3]
    plain = toy_discovery.discover(toy_request())
    assert all("attribution" not in f["scores"] for f in plain["features"])
    # attributions are scored raw (units of M), activity on the calibration's scale
    assert (out["normalization"], by_abs["normalization"], plain["normalization"]) == ("none", "none", "calibration_max")
    with pytest.raises(CatalogError) as err:
        rerank(catalog, plain["run_id"], {"score_mode": "attribution"})
    assert err.value.field == "score_mode" and "has no attributions" in err.value.message
    assert ranking.ATTRIBUTION_MODES == ("attribution", "attribution_abs")


def test_verify_top_measures_each_feature_and_compares_with_the_top_by_mean(toy_discovery):
    out = toy_discovery.discover(toy_request(attribution_target="next_tokens", score_mode="attribution_abs",
                                             verify_top=3))
    v = out["verification"]
    assert v["target"] == "next_tokens" and len(v["pairs"]) == 3
    assert [p["feature_id"] for p in v["pairs"]] == [f["feature_id"] for f in out["features"][:3]]
    assert all("ablation_delta" in f for f in out["features"][:3])
    assert all("ablation_delta" not in f for f in out["features"][3:])
    assert v["mean_abs_delta"] == pytest.approx(np.mean([abs(p["ablation_delta"]) for p in v["pairs"]]))
    t = out["timings"]  # the ablations have their own timing, inside the run's total
    assert t["verify_s"] > 0 and t["total_s"] == pytest.approx(sum(v for k, v in t.items() if k != "total_s"), abs=1e-3)
    assert not [w for w in out["warnings"] if w.startswith("verify_top:")]  # float32: no precision note
    import csv
    import io

    from sae_discover.output import to_csv

    rows = list(csv.DictReader(io.StringIO(to_csv(out))))  # the measured deltas travel in CSV too
    assert [r["ablation_delta"] for r in rows] == [repr(f["ablation_delta"]) if "ablation_delta" in f else ""
                                                   for f in out["features"]]
    assert (v["mean_abs_delta_top_mean"] >= 0 and v["pearson"] is None) or -1 <= v["pearson"] <= 1
    import msgspec

    from sae_discover.response import DiscoverResponse

    msgspec.convert(out, DiscoverResponse)  # the API's response schema holds it


def test_migration_0003_adds_and_drops_attr_on_a_catalog_with_runs(tmp_path):
    import duckdb
    from alembic import command

    from catalog import writes
    from catalog.db import Catalog, alembic_config
    from tests.test_catalog import MODEL, _acts, _run, _tokens, sae_info

    path = tmp_path / "old.duckdb"
    cfg = alembic_config(f"duckdb:///{path}")
    command.upgrade(cfg, "0002")
    old = Catalog(path, migrate=False)
    try:
        writes.write_run(old, _run("r1", 4), MODEL, [sae_info()], _tokens(4), _acts([(1, 0, 2, 0.5), (2, 0, 3, 2.5)]))
    finally:
        old.close()
    con = duckdb.connect(str(path))
    before = con.execute("SELECT * FROM v_activations ORDER BY ALL").fetchall()
    con.close()
    cat = Catalog(path)  # upgrade head
    try:
        con = cat.raw()
        rows = con.execute("SELECT * FROM v_activations ORDER BY ALL").fetchall()
        assert [r[:-1] for r in rows] == before and all(r[-1] is None for r in rows)
        assert [d[0] for d in con.execute("SELECT * FROM v_activations LIMIT 0").description][-1] == "attr"
        acts = _acts([(1, 0, 4, 1.5)]).append_column("attr", pa.array([-0.25], pa.float32()))
        writes.write_run(cat, _run("r2", 4), MODEL, [sae_info()], _tokens(4), acts)
        assert con.execute("SELECT act, attr FROM v_activations WHERE run_id = 'r2'").fetchall() == [(1.5, -0.25)]
    finally:
        cat.close()
    command.downgrade(cfg, "0002")
    con = duckdb.connect(str(path))
    assert "attr" not in [r[0] for r in con.execute("DESCRIBE activations").fetchall()]
    assert con.execute("SELECT * FROM v_activations WHERE run_id = 'r1' ORDER BY ALL").fetchall() == before
    assert len(con.execute("SELECT * FROM v_activations WHERE run_id = 'r2'").fetchall()) == 1
    con.close()
    command.upgrade(cfg, "head")
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*), count(attr) FROM v_activations").fetchone() == (3, 0)
    con.close()


@pytest.mark.parametrize(("args", "field", "says"), [
    (("--attribution_target", "loss"), "attribution_target", "expected none, continuation, next_tokens"),
    (("--attribution_target", "token:Revenue rose"), "attribution_target", "tokens for this tokenizer, not one"),
    (("--attribution_target", "logit_diff: the| the"), "attribution_target",
     "logit_diff compares two different tokens; ' the' and ' the' are the same token"),
    (("--attribution_target", "continuation", "--generate", "false"), "attribution_target", "generates none"),
    (("--verify_top", "3"), "verify_top", "give attribution_target"),
    (("--score_mode", "attribution"), "score_mode", "ranks by attributions, and this run has none"),
])
def test_bad_attribution_requests_are_one_line_errors_and_write_nothing(tmp_path, toy_registry, args, field, says):
    import duckdb

    from tests.conftest import run_cli

    db = tmp_path / "c.duckdb"
    proc = run_cli("--db", str(db), "--registry", str(toy_registry), "--model", "toy", "--sae", "toy",
                   "--prompt", "Revenue rose because", "--gen_tokens", "4", "--layers", "1", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {field}: ") and says in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    if db.exists():  # a refused request writes nothing
        con = duckdb.connect(str(db), read_only=True)
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        con.close()


def test_attribution_on_an_encoder_is_refused_naming_the_field(tmp_path, catalog):
    from sae_discover.registry import Registry
    from sae_discover.request import RequestError, build_request
    from sae_discover.service import Discovery
    from tests.test_families import _relu_sae

    folder = tmp_path / "bert"
    build("bert", folder)
    saelens.save(_relu_sae(1, "resid_post"), tmp_path / "sae")
    reg = tmp_path / "reg.toml"
    reg.write_text("")
    disc = Discovery(catalog, Registry.load(reg), device="cpu")
    with pytest.raises(RequestError) as err:
        disc.discover(build_request({"model_id": str(folder), "sae_id": str(tmp_path / "sae"), "text": "the cat sat",
                                     "layers": [1], "streams": ["resid_post"], "attribution_target": "next_tokens"}))
    assert err.value.field == "attribution_target" and "encoder" in err.value.message
    assert catalog.raw().execute("SELECT count(*) FROM runs").fetchone() == (0,)


DEMO_PROMPTS = ["The quarterly earnings report showed", "The striker scored in the final minute", "Preheat the oven and",
                "The function returns a list of", "Heavy rain is expected over", "The patient was prescribed",
                "Investors reacted to the interest rate", "The team won the championship after",
                "Whisk the eggs with", "A cold front will bring"]


@pytest.mark.skipif(not (DEMO_DIR / "saes" / "blocks.2.hook_resid_pre").exists(), reason="demo SAEs not built")
def test_on_the_demo_used_beats_active_on_at_least_8_of_10_prompts(tmp_path):
    """The README's claim: ablating the top 5 features by |attribution| changes the continuation's
    log-probability more than ablating the top 5 by mean activation (prompt+gen, layer 2)."""
    from catalog.db import Catalog
    from sae_discover.registry import Registry
    from sae_discover.request import build_request
    from sae_discover.service import Discovery

    disc = Discovery(Catalog(tmp_path / "c.duckdb"), Registry.load(), device="cpu")
    wins = 0
    for prompt in DEMO_PROMPTS:
        out = disc.discover(build_request({"model_id": "demo", "sae_id": "demo", "prompt": prompt, "layers": [2],
                                           "gen_tokens": 32, "attribution_target": "continuation",
                                           "score_mode": "attribution_abs", "verify_top": 5,
                                           "attach_examples": False}))
        v = out["verification"]
        wins += v["mean_abs_delta"] > v["mean_abs_delta_top_mean"]
    assert wins >= 8


def test_a_gate_that_hides_used_features_says_so(tmp_path):
    """Attribution modes under the default coverage gate (the README's example on the demo): the features
    of the ungated top by attribution that the gate left out are counted in a warning (the gate asks for
    unusually strong activity, not use); with the gate at 0 there is nothing to say."""
    base = ["--prompt", "Summarize Q2 earnings for ACME: revenue, EPS, guidance, and", "--layers", "2", "--gen_tokens",
            "32", "--attribution_target", "continuation", "--score_mode", "attribution_abs", "--return_top_x", "6",
            "--db", str(tmp_path / "c.duckdb"), "--threads", "1"]
    results = {}
    for gate in ("0.5", "0"):
        out = tmp_path / f"r{gate}.json"
        proc = run_cli(*base, "--min_coverage_pct", gate, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        results[gate] = json.loads(out.read_text())
    key = lambda f: (f["layer"], f["stream"], f["feature_id"])  # noqa: E731
    kept = {key(f) for f in results["0.5"]["features"]}
    left = [f for f in results["0"]["features"] if key(f) not in kept]
    assert left  # the README's example: most of the top 6 fire below their τ
    said = [w for w in results["0.5"]["warnings"] if w.startswith("min_coverage_pct: ")]
    assert len(said) == 1 and said[0].startswith(f"min_coverage_pct: {len(left)} of the top 6 features by "
                                                 "attribution_abs were left out by the gate")
    assert f"feature {left[0]['feature_id']} " in said[0]
    assert not [w for w in results["0"]["warnings"] if w.startswith("min_coverage_pct: ")]


def test_verifying_in_half_precision_says_so(toy_registry, catalog):
    from sae_discover.registry import Registry
    from sae_discover.service import Discovery

    half = Discovery(catalog, Registry.load(toy_registry), device="cpu", dtype="bfloat16")
    out = half.discover(toy_request(attribution_target="next_tokens", score_mode="attribution_abs", verify_top=2))
    said = [w for w in out["warnings"] if w.startswith("verify_top:")]
    assert len(said) == 1 and "ran in bfloat16" in said[0] and "--dtype float32" in said[0]



def test_a_target_with_nothing_to_score_says_so(toy_discovery):
    """A prompt that fills the context leaves nothing generated: the continuation's M has no terms, every
    attribution is 0, and the result says why (beside the context-length note)."""
    long_prompt = " ".join(["Revenue rose as margins expanded."] * 40)
    out = toy_discovery.discover(toy_request(prompt=long_prompt, attribution_target="continuation",
                                             score_mode="attribution_abs"))
    assert out["analyzed"]["continuation"] in ("", None)
    assert all(f["scores"]["attribution"] == 0 for f in out["features"])
    said = [w for w in out["warnings"] if w.startswith("attribution_target:")]
    assert said == ["attribution_target: continuation has nothing to score here (nothing was generated), so every "
                    "attribution is 0"]
    normal = toy_discovery.discover(toy_request(attribution_target="continuation"))
    assert not [w for w in normal["warnings"] if w.startswith("attribution_target:")]
