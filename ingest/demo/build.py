"""Rebuild the shipped demo: corpus → BPE tokenizer → small GPT-2 → SAEs (SAELens v6 folders) → figures.

Deterministic (fixed seeds, single-threaded data order). Full scale takes well under 45 minutes
on 2 CPU cores; ``--scale toy`` runs the same code in seconds (the test suite does that).

    python -m ingest.demo.build                 # rebuild ingest/demo/{model,model-finance,saes,...}
    python -m ingest.demo.build --scale toy --out /tmp/demo-toy
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ingest.demo.corpus import DOMAINS, documents
from ingest.models import load_model
from ingest.saes import saelens
from ingest.saes.base import SAE, SAEConfig

HERE = Path(__file__).resolve().parent
BOS = "<|endoftext|>"


@dataclass(frozen=True)
class Scale:
    n_docs: int
    n_heldout: int
    vocab: int
    d_model: int
    n_layer: int
    n_head: int
    n_ctx: int
    steps: int
    batch: int
    finetune_steps: int
    sae_tokens: int
    d_sae: int
    sae_steps: int
    topk_k: int


SCALES = {
    "full": Scale(n_docs=17000, n_heldout=600, vocab=4096, d_model=128, n_layer=6, n_head=4, n_ctx=128, steps=700,
                  batch=32, finetune_steps=150, sae_tokens=200_000, d_sae=1024, sae_steps=2500, topk_k=24),
    "toy": Scale(n_docs=300, n_heldout=40, vocab=400, d_model=32, n_layer=2, n_head=2, n_ctx=64, steps=8,
                 batch=8, finetune_steps=2, sae_tokens=2_000, d_sae=64, sae_steps=20, topk_k=8),
}
MLP_LAYER = {"full": 3, "toy": 1}
TOPK_HOOKS = {"full": [(3, "mlp_out"), (4, "resid_pre")], "toy": [(1, "mlp_out")]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_corpus(out: Path, scale: Scale) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    docs = list(documents(seed=1234, n_docs=scale.n_docs + scale.n_heldout))
    train, heldout = docs[: scale.n_docs], docs[scale.n_docs:]
    with (out / "calibration.jsonl").open("w") as fh:
        for domain, text in heldout:
            fh.write(json.dumps({"text": text, "domain": domain}) + "\n")
    return train, heldout


def train_tokenizer(train: list[tuple[str, str]], out: Path, scale: Scale):
    from tokenizers import ByteLevelBPETokenizer  # deferred: heavy, and only the build steps need it
    from transformers import PreTrainedTokenizerFast  # deferred: heavy, and only the build steps need it

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((t for _, t in train), vocab_size=scale.vocab, min_frequency=2, special_tokens=[BOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=BOS, unk_token=BOS)
    tok.model_max_length = scale.n_ctx
    return tok


def encode_docs(tok, docs: list[tuple[str, str]], n_ctx: int) -> list[list[int]]:
    """One sequence per document, BOS first, truncated at the context length (as runs and calibration do)."""
    ids = tok([t for _, t in docs], add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id, *x][:n_ctx] for x in ids]


def packed_batches(seqs: list[list[int]], n_ctx: int, batch: int, rng: np.random.Generator):
    stream = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
    n = len(stream) // n_ctx
    chunks = torch.from_numpy(stream[: n * n_ctx].reshape(n, n_ctx))
    while True:
        for idx in np.array_split(rng.permutation(n), max(1, n // batch)):
            yield chunks[torch.from_numpy(idx)]


def train_lm(model, seqs, scale: Scale, steps: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    batches = packed_batches(seqs, scale.n_ctx, scale.batch, rng)
    model.train()
    losses = []
    for step in range(steps):
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step}/{steps} loss {np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses


@torch.inference_mode()
def heldout_loss(model, seqs: list[list[int]], domains: list[str]) -> dict[str, float]:
    """Mean next-token loss per domain on held-out documents (BOS excluded as a target)."""
    totals: dict[str, list[float]] = {d: [0.0, 0] for d in DOMAINS}
    for seq, domain in zip(seqs, domains, strict=True):
        x = torch.tensor([seq])
        logits = model(input_ids=x).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        totals[domain][0] += nll.item()
        totals[domain][1] += len(seq) - 1
    return {d: s / n for d, (s, n) in totals.items() if n}


@torch.inference_mode()
def collect(loaded, seqs: list[list[int]], hooks: list[tuple[int, str]], n_tokens: int) -> dict:
    """Activations of non-BOS tokens for every hook, up to ``n_tokens`` tokens."""
    out: dict = {h: [] for h in hooks}
    total = 0
    for seq in seqs:
        acts, _ = loaded.capture(torch.tensor([seq]), hooks)
        for h in hooks:
            out[h].append(acts[h][0, 1:].float())
        total += len(seq) - 1
        if total >= n_tokens:
            break
    return {h: torch.cat(v)[:n_tokens] for h, v in out.items()}


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def train_sae(x: torch.Tensor, layer: int, stream: str, arch: str, scale: Scale, seed: int,
              l1_coefficient: float = 1.0) -> SAE:
    """Train one SAE on activations x [n, d]: ReLU + L1 (scaled by decoder norm) or TopK.

    Inputs are scaled to mean norm sqrt(d_in) while training (as SAELens does) and the scale is
    folded back into the weights, so the saved SAE takes raw activations.
    """
    torch.manual_seed(seed)
    d_in, d_sae = x.shape[1], scale.d_sae
    s = float(x.norm(dim=1).mean()) / d_in ** 0.5
    xn = x / s
    W_dec = torch.randn(d_sae, d_in)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * 0.1
    params = {"W_enc": W_dec.t().clone(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
              "b_dec": xn.median(dim=0).values.clone()}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(scale.sae_steps):
        xb = xn[torch.randint(0, len(xn), (1024,), generator=g)]
        pre = (xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        if arch == "topk":
            top = torch.topk(pre, scale.topk_k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        else:
            f = torch.relu(pre)
        x_hat = f @ params["W_dec"] + params["b_dec"]
        loss = ((x_hat - xb) ** 2).sum(-1).mean()
        if arch != "topk":
            warm = min(1.0, step / (scale.sae_steps * 0.3))
            loss = loss + warm * l1_coefficient * (f * params["W_dec"].norm(dim=1)).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, layer=layer, stream=stream,
                    hook_name=saelens.hook_name(layer, stream), k=scale.topk_k if arch == "topk" else None,
                    model_name="sae-discover-demo")
    with torch.no_grad():
        return SAE(cfg=cfg, W_enc=params["W_enc"] / s, b_enc=params["b_enc"].detach(), W_dec=params["W_dec"] * s,
                   b_dec=params["b_dec"] * s)


def sae_figures(sae: SAE, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        codes = torch.cat([sae.encode(c) for c in x.split(4096)])
        x_hat = sae.decode(codes)
    return {"explained_variance": explained_variance(x, x_hat), "mean_l0": float((codes > 0).sum(-1).float().mean()),
            "dead_fraction": float(((codes > 0).sum(0) == 0).float().mean())}


def build_models(out: Path, scale: Scale, train, heldout, tok) -> dict:
    """Train the demo LM and its finance fine-tune; return their figures."""
    from transformers import GPT2Config, GPT2LMHeadModel  # deferred: transformers is heavy, only this step needs it

    train_seqs = encode_docs(tok, train, scale.n_ctx)
    held_seqs = encode_docs(tok, heldout, scale.n_ctx)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=scale.n_ctx, n_embd=scale.d_model, n_layer=scale.n_layer,
                        n_head=scale.n_head, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    log(f"model: GPT-2 {scale.n_layer} layers, d_model {scale.d_model}, "
        f"{sum(p.numel() for p in model.parameters())} params")
    losses = train_lm(model, train_seqs, scale, scale.steps, lr=3e-3, seed=0)
    domains = [d for d, _ in heldout]
    figures = {"train_tokens": sum(map(len, train_seqs)), "train_final_loss": float(np.mean(losses[-50:])),
               "heldout_loss": heldout_loss(model, held_seqs, domains)}
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    log(f"held-out loss per domain: {figures['heldout_loss']}")
    # a short fine-tune on finance only: the second model of the drift report
    finance = [s for s, (d, _) in zip(train_seqs, train, strict=True) if d == "finance"]
    tuned = GPT2LMHeadModel.from_pretrained(out / "model")
    train_lm(tuned, finance, scale, scale.finetune_steps, lr=1e-3, seed=1)
    figures["finance_heldout_loss"] = heldout_loss(tuned, held_seqs, domains)
    tuned.save_pretrained(out / "model-finance")
    tok.save_pretrained(out / "model-finance")
    return figures


def build_saes(out: Path, scale: Scale, scale_name: str, train, heldout) -> dict:
    """Train the SAEs on the saved demo model's activations; return their figures."""
    loaded = load_model("demo", out / "model", device="cpu")
    tok = loaded.tokenizer
    mid = MLP_LAYER[scale_name]
    hooks = [(layer, "resid_pre") for layer in range(scale.n_layer)] + [(mid, "mlp_out")]
    acts = collect(loaded, encode_docs(tok, train, scale.n_ctx), hooks, scale.sae_tokens)
    held = collect(loaded, encode_docs(tok, heldout, scale.n_ctx), hooks, scale.sae_tokens // 4)
    figures = {}
    for i, (layer, stream) in enumerate(hooks):
        arch = "topk" if (layer, stream) in TOPK_HOOKS[scale_name] else "standard"
        sae = train_sae(acts[(layer, stream)], layer, stream, arch, scale, seed=100 + i)
        name = saelens.hook_name(layer, stream)
        saelens.save(sae, out / "saes" / name,
                     metadata={"context_size": scale.n_ctx, "dataset_path": "sae-discover demo corpus"})
        figures[name] = {"architecture": arch, **sae_figures(sae, held[(layer, stream)])}
        log(f"sae {name} ({arch}): {figures[name]}")
    return figures


def build(out: Path, scale_name: str, stage: str = "all") -> dict:
    scale = SCALES[scale_name]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, heldout = write_corpus(out, scale)
    corpus_bytes = sum(len(t.encode()) for _, t in train + heldout)
    log(f"corpus: {len(train)} train + {len(heldout)} held-out documents, {corpus_bytes / 1e6:.1f} MB")
    figures_file = out / "figures.json"
    figures = json.loads(figures_file.read_text()) if stage == "saes" else {}
    figures["corpus_mb"] = corpus_bytes / 1e6
    if stage in ("all", "models"):
        tok = train_tokenizer(train, out, scale)
        figures.update(build_models(out, scale, train, heldout, tok))
        figures["models_seconds"] = time.time() - t0
    if stage in ("all", "saes"):
        t1 = time.time()
        figures["saes"] = build_saes(out, scale, scale_name, train, heldout)
        figures["saes_seconds"] = time.time() - t1
    figures["build_seconds"] = figures.get("models_seconds", 0) + figures.get("saes_seconds", 0)
    figures["scale"] = scale_name
    figures_file.write_text(json.dumps(figures, indent=2))
    return figures


def write_readme(out: Path, figures: dict) -> None:
    lines = ["# The shipped demo", "",
             "Built by `python -m ingest.demo.build` (deterministic; "
             f"{figures['build_seconds'] / 60:.1f} minutes on 2 CPU cores). Do not edit by hand.", "",
             "- `model/`: GPT-2 (transformers `GPT2LMHeadModel`) with a byte-level BPE tokenizer, trained on a "
             f"synthetic six-domain corpus of {figures['corpus_mb']:.1f} MB ({figures['train_tokens']:,} tokens).",
             "- `model-finance/`: the same model after a short fine-tune on finance documents only (for drift reports).",
             "- `saes/blocks.<L>.hook_<stream>/`: SAELens v6 folders (`cfg.json` + `sae_weights.safetensors`).",
             "- `calibration.jsonl`: the held-out documents (one JSON object per line, `text` + `domain`); the default "
             "calibration corpus.", "",
             "## Held-out LM loss per domain (nats/token)", "", "| domain | demo model | finance fine-tune |", "|---|---|---|"]
    for domain, loss in figures["heldout_loss"].items():
        lines.append(f"| {domain} | {loss:.3f} | {figures['finance_heldout_loss'][domain]:.3f} |")
    lines += ["", "## SAEs (held-out tokens, BOS excluded)", "",
              "| hook | architecture | explained variance | mean L0 | dead fraction |", "|---|---|---|---|---|"]
    for name, f in figures["saes"].items():
        lines.append(f"| {name} | {f['architecture']} | {f['explained_variance']:.3f} | {f['mean_l0']:.1f} | "
                     f"{f['dead_fraction']:.3f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--stage", choices=["all", "models", "saes"], default="all",
                        help="models: LM + fine-tune only; saes: retrain SAEs on the saved model")
    args = parser.parse_args()
    figures = build(args.out, args.scale, args.stage)
    if "saes" in figures and "heldout_loss" in figures:
        write_readme(args.out, figures)
    log(f"done in {figures['build_seconds']:.0f} s")


if __name__ == "__main__":
    main()
