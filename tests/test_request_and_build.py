"""The request model's validation, and the demo build script at toy scale."""

from __future__ import annotations

import json

import pytest

from ingest.saes.sources import open_source
from sae_discover.batch import line_request
from sae_discover.request import DiscoverRequest, RequestError, build_request


def test_seed_defaults():
    req = build_request({"prompt": "hi"})
    assert (req.generate, req.gen_tokens, req.streams, req.restrict_features, req.topk_tokens_per_seq,
            req.return_top_x, req.score_mode, req.min_coverage_pct, req.merge_across_layers, req.attach_examples,
            req.attach_proto_labels, req.seed) == (True, 128, ["resid_pre"], [], 64, 25, "mean×coverage", 0.5, True,
                                                   True, True, 42)
    assert DiscoverRequest().layers is None  # → registry default_layers, else the seed's [22]


@pytest.mark.parametrize("alias", ["mean×coverage", "mean_x_coverage", "mean*coverage", "MEAN_X_COVERAGE"])
def test_score_mode_aliases(alias):
    assert build_request({"prompt": "x", "score_mode": alias}).score_mode == "mean×coverage"


def test_cli_strings_are_parsed():
    req = build_request({"prompt": "x", "generate": "false", "gen_tokens": "16", "layers": ["2", "3"],
                         "restrict_features": ["5", "3", "5"], "merge_across_layers": "no", "min_coverage_pct": "1.5"})
    assert (req.generate, req.gen_tokens, req.layers, req.restrict_features, req.merge_across_layers,
            req.min_coverage_pct) == (False, 16, [2, 3], [3, 5], False, 1.5)


@pytest.mark.parametrize(("body", "field", "expect"), [
    ({}, "prompt", "give a prompt"),
    ({"prompt": "a", "text": "b"}, "text", "either prompt or text"),
    ({"prompt": "a", "gen_tokens": -1}, "gen_tokens", "in [0, 4096]"),
    ({"prompt": "a", "gen_tokens": 1.5}, "gen_tokens", "expected an integer"),
    ({"prompt": "a", "seed": 2**70}, "seed", "in [0,"),
    ({"prompt": "a", "min_coverage_pct": 101}, "min_coverage_pct", "in [0, 100]"),
    ({"prompt": "a", "min_coverage_pct": float("nan")}, "min_coverage_pct", "expected a number in"),
    ({"prompt": "a", "generate": "maybe"}, "generate", "true or false"),
    ({"prompt": "a", "streams": ["resid_mid"]}, "streams", "expected values in"),
    ({"prompt": "a", "layers": []}, "layers", "at least one layer"),
    ({"prompt": "a", "restrict_features": [-1]}, "restrict_features", "in [0,"),
    ({"prompt": "a", "tau": 0.1, "tau_quantile": 0.9}, "tau", "either tau or tau_quantile"),
    ({"text": "a", "background_text": "b", "background_file": "c.txt"}, "background_file",
     "either background_text or background_file"),
    ({"text": "a", "background_text": "b", "background": "batch"}, "background",
     "give it or background_text / background_file, not both"),
    ({"prompt": "a", "bogus": 1}, "bogus", "unknown field"),
    ({"prompt": "a" * 300_001}, "prompt", "at most"),
])
def test_bad_values_name_the_field(body, field, expect):
    with pytest.raises(RequestError) as err:
        build_request(body)
    assert err.value.field == field and expect in str(err.value)


def test_toy_build_produces_loadable_artifacts(toy_demo):
    assert (toy_demo / "model" / "config.json").exists() and (toy_demo / "model-finance" / "config.json").exists()
    docs = [json.loads(line) for line in (toy_demo / "calibration.jsonl").read_text().splitlines()]
    assert len(docs) == 40 and {"text", "domain"} <= set(docs[0])
    figures = json.loads((toy_demo / "figures.json").read_text())
    assert set(figures["heldout_loss"]) <= {"finance", "sports", "cooking", "programming", "weather", "medicine"}
    src = open_source("toy", toy_demo / "saes")
    assert sorted(src.hooks) == [(0, "resid_pre"), (1, "mlp_out"), (1, "resid_pre")]
    archs = {h: src.config(*h).architecture for h in src.hooks}
    assert archs[(1, "mlp_out")] == "topk" and archs[(0, "resid_pre")] == "standard"
    cfg = json.loads((toy_demo / "saes" / "blocks.1.hook_mlp_out" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_mlp_out"  # SAELens v6 layout
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")  # else SAELens 6 reads it as pre-6, dropping metadata
    readme = (toy_demo / "README.md").read_text()
    assert "explained variance" in readme and "blocks.1.hook_mlp_out" in readme


def test_shipped_demo_meets_its_targets():
    from sae_discover.registry import DEMO_DIR

    figures = json.loads((DEMO_DIR / "figures.json").read_text())
    assert figures["scale"] == "full" and figures["corpus_mb"] >= 5
    assert len(figures["saes"]) == 7
    archs = {f["architecture"] for f in figures["saes"].values()}
    assert {"standard", "topk"} <= archs
    for name, f in figures["saes"].items():
        assert f["explained_variance"] >= 0.8, name
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    # the finance fine-tune is better on finance and worse elsewhere: a real drift to report
    assert figures["finance_heldout_loss"]["finance"] < figures["heldout_loss"]["finance"]


def test_a_batch_lines_background_replaces_the_command_lines():
    """A line's background text or file takes the place of the command line's background (one background
    mean; a batch background too): giving both is refused only within one line."""
    req = line_request({"background_file": "bg.txt"}, {"text": "x", "background_text": "y"})
    assert (req.background_text, req.background_file) == ("y", None)
    req = line_request({"background_text": "y"}, {"text": "x", "background_file": "bg.txt"})
    assert (req.background_text, req.background_file) == (None, "bg.txt")
    assert line_request({"background_file": "bg.txt"}, {"text": "x"}).background_file == "bg.txt"
    req = line_request({"background": "batch"}, {"text": "x", "background_text": "y"})  # a text: not the batch
    assert (req.background, req.background_text) == ("calibration", "y")
    assert line_request({"background": "batch"}, {"text": "x"}).background == "batch"
    with pytest.raises(RequestError) as err:
        line_request({}, {"text": "x", "background_text": "y", "background_file": "bg.txt"})
    assert err.value.field == "background_file"
