"""Generation and token-filter benchmarks — run on demand, never by the test command:

    .venv/bin/python tests/benchmarks/bench_generation.py [--prompts 64] [--gen 48] [--texts 32] [--rounds 1]
                                                          [--device cpu] [--dtype float32] [--only gen|text]

GPT-2-small-sized random model (12 × 768, vocabulary 50,257) with a 24,576-feature ReLU SAE at layer 8
``resid_pre`` (biased to a realistic L0), defaults otherwise (top-64 tokens). Each variant runs in its
own child process (so its peak memory is its own: max RSS on CPU, ``torch.cuda.max_memory_allocated``
on a GPU) and reports the wall time of the variant alone (model and SAE built before the clock starts);
rounds alternate the variants.

(a) prompt+gen, ``--prompts`` × ``--gen`` new tokens (seeded sampling, temperature 1):
    before — HF ``generate`` one prompt at a time, then one analysis forward per micro-batch of 16
    over prompt + continuation (the pipeline before batching); after — ``run_many`` (micro-batches of
    16 generate together and are captured by the generation passes).
(b) text mode, ``--texts`` × 128 tokens: the default (``auto`` → norm: the forward stops after block 8),
    ``token_proxy=entropy`` (all 12 blocks + the unembedding), and equal work (every token encoded,
    ``topk_tokens_per_seq`` 1000, the forward stopped early).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import relu_sae, texts_for  # noqa: E402

from ingest import run as ingest_run  # noqa: E402
from ingest.models import DTYPES, LoadedModel, load_model  # noqa: E402
from ingest.select import select_tokens  # noqa: E402
from ingest.tokens import pad_batch, special_mask  # noqa: E402

LAYER, HOOK = 8, (8, "resid_pre")
PROMPTS = ["Summarize Q2 earnings for ACME", "The match ended in", "Preheat the oven and", "def parse(line):",
           "Tomorrow's forecast calls for", "The patient presented with", "Revenue for the quarter rose",
           "In the second half the striker", "The court ruled that the contract", "Whisk the eggs with"]
VARIANTS = {"gen": ("before", "after"), "text": ("default", "entropy", "equal_work")}


def setup(device: str, dtype: str) -> tuple[LoadedModel, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    demo = load_model("demo", ROOT / "ingest/demo/model", device="cpu")  # its GPT-2 BPE tokenizer
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    model = model.eval().to(device=device, dtype=DTYPES[dtype])
    loaded = LoadedModel(model=model, tokenizer=demo.tokenizer, model_id="gpt2-small-random", family="gpt2",
                         fingerprint="random", n_layers=12, d_model=768, context_length=128)
    ids = torch.tensor([loaded.tokenizer(" ".join(PROMPTS * 4))["input_ids"][:128]], device=device)
    sample = loaded.capture(ids, [HOOK])[0][HOOK][0].float().cpu()
    return loaded, relu_sae(768, LAYER, "resid_pre", sample).to(loaded.device)


def prompt_specs(n: int, gen: int) -> list[ingest_run.RunSpec]:
    return [ingest_run.RunSpec(prompt=f"{PROMPTS[i % len(PROMPTS)]} ({i})", gen_tokens=gen, seed=i, hooks=[HOOK])
            for i in range(n)]


def before(loaded: LoadedModel, sae, specs: list[ingest_run.RunSpec]) -> None:
    """The pipeline before batching: HF generate per prompt (global seed), then a re-read forward."""
    seqs = []
    for spec in specs:
        ids = ingest_run._input_ids(loaded, spec, True)
        torch.manual_seed(spec.seed)
        x = torch.tensor([ids], device=loaded.device)
        out = loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0,
                                    max_new_tokens=spec.gen_tokens, pad_token_id=50256, eos_token_id=50256)
        seqs.append((out[0].tolist(), len(ids)))
    for start in range(0, len(specs), ingest_run.MICRO_BATCH):
        chunk = list(range(start, min(start + ingest_run.MICRO_BATCH, len(specs))))
        special = [special_mask(loaded, seqs[i][0], True) for i in chunk]
        ids, mask, candidates = pad_batch(loaded, [seqs[i][0] for i in chunk], special)
        captured, logits = loaded.capture(ids.to(loaded.device), [HOOK], attention_mask=mask.to(loaded.device),
                                          stop_early=False)
        entropies = ingest_run._entropies(logits, [len(seqs[i][0]) for i in chunk])
        _, kept = select_tokens(["entropy"] * len(chunk), [64] * len(chunk), [HOOK], candidates, captured, entropies)
        ingest_run._encode_kept([sae], [HOOK], captured, kept, [None] * len(chunk))


def child(variant: str, args) -> dict:
    """One variant in this process: its wall time and peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, sae = setup(args.device, args.dtype)
    if variant in VARIANTS["gen"]:
        specs = prompt_specs(args.prompts, args.gen)
        work = (lambda: before(loaded, sae, specs)) if variant == "before" else (
            lambda: ingest_run.run_many(loaded, [sae], specs))
    else:
        texts = texts_for(loaded.tokenizer, args.texts)
        options = {"default": {}, "entropy": {"token_proxy": "entropy"}, "equal_work": {"topk_tokens_per_seq": 1000}}
        specs = [ingest_run.RunSpec(text=t, hooks=[HOOK], **options[variant]) for t in texts]
        work = lambda: ingest_run.run_many(loaded, [sae], specs)  # noqa: E731
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t0 = clock()
    work()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    wall = clock() - t0
    peak = (torch.cuda.max_memory_allocated() if loaded.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "wall_s": wall, "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--gen", type=int, default=48)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the child's CPU time (with --threads 1 on a shared machine: the work done)")
    parser.add_argument("--only", choices=list(VARIANTS), default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--only") and a not in VARIANTS]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.device}, {args.dtype}, "
          f"{args.rounds} round(s), {args.clock} clock, threads {args.threads or 'default'}\n")
    for group in ([args.only] if args.only else list(VARIANTS)):
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS[group]}
        for _ in range(args.rounds):
            for variant in VARIANTS[group]:
                out = subprocess.run([sys.executable, __file__, *passthrough, "--child", variant], check=True,
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1]
                results[variant].append(json.loads(out))
        first = VARIANTS[group][0]
        what = (f"prompt+gen, {args.prompts} prompts × {args.gen} new tokens" if group == "gen"
                else f"text mode, {args.texts} texts × 128 tokens")
        print(f"{what}\n| variant | {args.clock} s (median) | speed vs {first} | peak MiB |\n|---|---:|---:|---:|")
        base = statistics.median(r["wall_s"] for r in results[first])
        for variant, rows in results.items():
            wall = statistics.median(r["wall_s"] for r in rows)
            print(f"| {variant} | {wall:.2f} | {base / wall:.2f}× | {max(r['peak_mib'] for r in rows):.0f} |")
        print()


if __name__ == "__main__":
    main()
