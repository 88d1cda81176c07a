"""Discovery quality on the demo: do the top features belong to the prompt's domain?

Shared by ``bench_quality.py`` (the full benchmark, figures in the README) and ``tests/test_quality.py``
(a smaller version that fails CI on a regression).

- **Held-out prompts**, labelled with their domain: in-distribution ones from templates written here
  (never used for training, SAEs or calibration) filled with the demo's slot vocabulary under a seed
  of their own, and out-of-distribution ones: natural sentences in the six domains with vocabulary the
  demo never saw.
- **The oracle**: each feature's domain, from a separate labelled corpus (the demo generator under
  another seed, minus every sentence that occurs in the demo's training or calibration data), encoded
  by an independent path — ``transformers`` hidden states and a dense numpy encode of the SAE weights
  read with safetensors; nothing from ``ingest`` or ``catalog``. A feature belongs to domain d when more
  than half of its per-domain mean activation is in d; else it is generic (never right).
- **precision@k**: the share of a prompt's top-k features whose oracle domain is the prompt's.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "ingest" / "demo"
TRAIN_SEED, TRAIN_DOCS = 1234, 17_600  # ingest/demo/build.py: documents(seed=1234, n_docs + n_heldout)
ORACLE_SEED, PROMPT_SEED = 20261201, 4242
DOMAIN_SHARE = 0.5  # a feature's domain holds more than this share of its per-domain mean activation

HELDOUT_TEMPLATES = {  # in-distribution: the demo's vocabulary, sentence shapes it never saw
    "finance": ["Investors cheered as {co} lifted its outlook for {kpi} on {driver}.",
                "{co} expects {kpi} to improve in {q} thanks to {driver}.",
                "In {q}, {co} grew {kpi2} by {pct}% while {kpi} declined."],
    "sports": ["{player} {act} and {team} held on to beat {team2} {s1}-{s2}.",
               "After {player} {act}, the crowd cheered for {team}.",
               "{team2} will face {team} on {day} in the playoffs."],
    "cooking": ["For the {dish}, {verb} the {ing} with {ing2} for {mins} minutes.",
                "Bake the {dish} at {temp} degrees until golden.",
                "Add {ing} to the {dish} and {verb} gently."],
    "programming": ["The {lang} {thing} failed after we tried to {cverb} it.",
                    "We {cverb} every {thing} in {lang} before each release.",
                    "A {thing} in {lang} can be hard to {cverb}."],
    "weather": ["{city} will see {wx} on {day}, followed by {wx2}.",
                "Expect {wx} in {city} with highs near {temp2} degrees.",
                "On {day}, {wx} moves over {city}."],
    "medicine": ["The patient with {cond} reported {sym} and {sym2}.",
                 "Doctors prescribed {drug} for {cond} after the patient had {sym}.",
                 "Blood pressure was {bp1} over {bp2}, and {drug} was started."],
}

OUT_OF_DISTRIBUTION = {  # natural sentences, vocabulary the demo never saw
    "finance": ["The central bank's surprise rate hike rattled bond traders, and treasury yields jumped.",
                "Our quarterly earnings call highlighted stronger profitability, dividends and shareholder returns.",
                "Hedge funds trimmed their equity exposure as inflation expectations climbed."],
    "sports": ["The striker curled a stunning free kick into the top corner in stoppage time.",
               "Fans packed the stadium to watch the championship match go into overtime.",
               "The goalkeeper's acrobatic saves kept the underdogs alive in the tournament."],
    "cooking": ["Knead the dough until it is smooth, then let it rise in a warm spot.",
                "Sprinkle paprika over the roasted potatoes and drizzle them with melted butter.",
                "Marinate the salmon in soy sauce, ginger and honey before grilling it."],
    "programming": ["The developer fixed a segmentation fault caused by a dangling pointer in the parser.",
                    "Our continuous integration pipeline runs the regression suite on every commit.",
                    "Rewriting the recursive algorithm as an iterative one removed the stack overflow."],
    "weather": ["Meteorologists warned that a powerful hurricane could make landfall by Thursday morning.",
                "A blizzard dumped two feet of snow overnight, closing highways across the region.",
                "Humidity will stay high, with a chance of afternoon thunderstorms and gusty winds."],
    "medicine": ["The cardiologist ordered an echocardiogram after the patient complained of palpitations.",
                 "Vaccination rates improved after the clinic extended its evening hours.",
                 "The surgeon removed the inflamed appendix, and the patient recovered quickly."],
}


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@cache
def demo_sentences() -> frozenset[str]:
    """Every sentence of the demo's training and calibration documents (both come from one generator run)."""
    from ingest.demo.corpus import documents

    seen = {s for _, text in documents(TRAIN_SEED, TRAIN_DOCS) for s in sentences(text)}
    for line in (DEMO / "calibration.jsonl").read_text().splitlines():
        seen.update(sentences(json.loads(line)["text"]))
    return frozenset(seen)


def in_distribution_prompts(per_domain: int, seed: int = PROMPT_SEED) -> list[tuple[str, str]]:
    """``(domain, text)``: two or three held-out-template sentences of one domain each."""
    from ingest.demo.corpus import _fill

    rng = random.Random(seed)
    out = []
    for domain, templates in HELDOUT_TEMPLATES.items():
        for _ in range(per_domain):
            chosen = rng.sample(templates, rng.randint(2, 3))
            out.append((domain, " ".join(_fill(rng, t) for t in chosen)))
    return out


def out_of_distribution_prompts() -> list[tuple[str, str]]:
    return [(domain, text) for domain, texts in OUT_OF_DISTRIBUTION.items() for text in texts]


def oracle_corpus(n_docs: int) -> list[tuple[str, str]]:
    """Domain-labelled documents from the generator under a seed of their own, with every sentence
    that the demo's training or calibration data holds removed."""
    from ingest.demo.corpus import documents

    seen = demo_sentences()
    out = []
    for domain, text in documents(ORACLE_SEED, n_docs):
        kept = [s for s in sentences(text) if s not in seen]
        if kept:
            out.append((domain, " ".join(kept)))
    return out


def _sae(layer: int, stream: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    folder = DEMO / "saes" / f"blocks.{layer}.hook_{stream}"
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg["architecture"] not in ("standard", "topk") or not cfg.get("apply_b_dec_to_input", True) \
            or cfg.get("normalize_activations", "none") != "none" or cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"the oracle encodes plain ReLU / TopK SAEs with apply_b_dec_to_input; {folder} is not one")
    return cfg, load_file(str(folder / "sae_weights.safetensors"))


def dense_codes(cfg: dict, w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """SAELens' encode of a standard (ReLU) or TopK SAE, in float64 numpy: [tokens, d_sae]."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        return np.maximum(pre, 0.0)
    keep = np.argpartition(-pre, cfg["k"] - 1, axis=1)[:, : cfg["k"]]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, keep, np.maximum(np.take_along_axis(pre, keep, axis=1), 0.0), axis=1)
    return codes


def oracle_domains(layers: Iterable[int], n_docs: int = 600) -> dict[tuple[int, int], str | None]:
    """(layer, feature) → its domain (resid_pre SAEs of the demo), or None for generic/never-firing features."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO / "model")
    model = AutoModelForCausalLM.from_pretrained(DEMO / "model").eval()
    docs = oracle_corpus(n_docs)
    names = sorted({d for d, _ in docs})
    layers = list(layers)
    saes = {layer: _sae(layer, "resid_pre") for layer in layers}
    sums = {layer: np.zeros((len(names), saes[layer][1]["W_enc"].shape[1])) for layer in layers}
    counts = np.zeros(len(names))
    with torch.no_grad():
        for domain, text in docs:
            ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]][: model.config.n_positions]
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            d = names.index(domain)
            counts[d] += len(ids) - 1
            for layer in layers:
                x = hidden[layer][0, 1:].numpy().astype(np.float64)  # resid_pre of block L; BOS left out
                sums[layer][d] += dense_codes(*saes[layer], x).sum(axis=0)
    out: dict[tuple[int, int], str | None] = {}
    for layer in layers:
        means = sums[layer] / counts[:, None]  # [domain, feature]: mean activation per token of the domain
        total = means.sum(axis=0)
        best = means.argmax(axis=0)
        share = np.divide(means.max(axis=0), total, out=np.zeros_like(total), where=total > 0)
        for f in range(means.shape[1]):
            out[(layer, f)] = names[best[f]] if share[f] > DOMAIN_SHARE else None
    return out


def precision_at(results: list[dict], domains: list[str], oracle: dict[tuple[int, int], str | None], k: int) -> float:
    """Mean over prompts of the share of their top-k features whose oracle domain is the prompt's."""
    scores = []
    for result, domain in zip(results, domains, strict=True):
        top = result["features"][:k]
        scores.append(sum(oracle.get((f["layer"], f["feature_id"])) == domain for f in top) / k)
    return float(np.mean(scores)) if scores else 0.0
