"""Torch CPU threads vs generation and batch throughput — run on demand, never by the test command:

    .venv/bin/python tests/benchmarks/bench_threads.py [--rounds 3] [--batch 8] [--gpt2-batch 4] [--skip-gpt2] [--skip-demo]

For the shipped demo model and a GPT-2-small-sized random model (12 × 768, vocab 50,257, as in
``bench_ingest.py``), with 1 thread, 2 threads and torch's default (one per physical core):

- generation: ``ingest.generate.generate`` of 48 new tokens (greedy, EOS never stops it early) from the
  README's prompt;
- batch: ``ingest.run.run_many`` over ``--batch`` prompt+gen runs of 48 tokens at one hook with its SAE
  (what a ``--prompts_file`` batch does between reading the file and writing the catalog).

Rounds are paired: each round times every thread setting back to back (the order rotates per round),
and the ratio to the 1-thread time of the same round is taken before the median over rounds, so a
busy spell of the machine (other jobs on a shared box) weighs on the settings it overlapped alike.
The rule that picks the default thread count (``ingest/threads.py``) is chosen from these figures;
they are in README's Performance section.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import relu_sae  # noqa: E402

from ingest.generate import generate  # noqa: E402
from ingest.models import LoadedModel, load_model  # noqa: E402
from ingest.run import RunSpec, run_many  # noqa: E402
from ingest.saes.sources import open_source  # noqa: E402

GEN_TOKENS = 48
PROMPT = "Summarize Q2 earnings for ACME: revenue, EPS, guidance, and margin drivers."
PROMPTS = ["Summarize Q2 earnings for ACME", "The match ended in", "Preheat the oven and", "def parse(line):",
           "Tomorrow's forecast calls for", "The patient presented with", "Revenue for the quarter rose",
           "In the second half the striker"]


def gen_once(loaded: LoadedModel) -> None:
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    out = generate(loaded, ids, GEN_TOKENS, seed=0, temperature=0.0)
    assert len(ids) < len(out) <= len(ids) + GEN_TOKENS


def batch_once(loaded: LoadedModel, sae, hook: tuple[int, str], n: int) -> None:
    specs = [RunSpec(prompt=PROMPTS[i % len(PROMPTS)] + f" ({i})", generate=True, gen_tokens=GEN_TOKENS, seed=i,
                     hooks=[hook]) for i in range(n)]
    assert len(run_many(loaded, [sae], specs)) == n


def paired(name: str, fn, settings: dict[str, int], rounds: int) -> list[str]:
    """Markdown rows: per setting, median seconds and the paired median ratio to 1 thread."""
    times: dict[str, list[float]] = {s: [] for s in settings}
    labels = list(settings)
    for r in range(rounds + 1):  # round 0 warms up
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            torch.set_num_threads(settings[label])
            t = time.perf_counter()
            fn()
            if r:
                times[label].append(time.perf_counter() - t)
        print(f"  {name} round {r}: " + ", ".join(f"{s}={times[s][-1]:.2f}s" for s in labels if r), file=sys.stderr,
              flush=True)
    base = times[labels[0]]
    rows = []
    for label in labels:
        ratio = statistics.median(a / b for a, b in zip(times[label], base, strict=True))
        rows.append(f"| {name} | {label} | {statistics.median(times[label]):.2f} | {min(times[label]):.2f} | "
                    f"{max(times[label]):.2f} | {ratio:.2f}× |")
    return rows


def bench(title: str, loaded: LoadedModel, sae, hook, n_batch: int, settings: dict[str, int], rounds: int) -> str:
    n_params = sum(p.numel() for p in loaded.model.parameters())
    lines = [f"**{title}** ({n_params / 1e6:.1f} M parameters)", "",
             "| workload | threads | median s | min s | max s | × 1 thread (paired median) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += paired(f"generate {GEN_TOKENS} tokens", lambda: gen_once(loaded), settings, rounds)
    lines += paired(f"batch of {n_batch} prompt+gen runs", lambda: batch_once(loaded, sae, hook, n_batch), settings,
                    rounds)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="prompts in the demo's batch (the issue's was 31)")
    parser.add_argument("--gpt2-batch", type=int, default=4, help="prompts in the GPT-2-sized model's batch")
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    default = torch.get_num_threads()
    settings = {"1": 1, "2": 2, f"default ({default})": default}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} logical CPUs, torch default {default} thread(s), "
          f"load average {load:.1f} at start, {platform.processor() or platform.machine()}, fp32, CPU\n")
    torch.manual_seed(0)
    demo = load_model("demo", ROOT / "ingest/demo/model", device="cpu")
    hook = (2, "resid_pre")
    sae = open_source("demo", ROOT / "ingest/demo/saes").load(*hook)
    if not args.skip_demo:
        print(bench("demo model", demo, sae, hook, args.batch, settings, args.rounds), flush=True)
    if not args.skip_gpt2:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
        gpt2 = LoadedModel(model=model, tokenizer=demo.tokenizer, model_id="gpt2-small-random", family="gpt2",
                           fingerprint="random", n_layers=12, d_model=768, context_length=1024)
        hook = (8, "resid_pre")
        captured, _ = gpt2.capture(torch.randint(5, 2000, (4, 64)), [hook])
        sae = relu_sae(768, *hook, captured[hook].reshape(-1, 768))
        print(bench("GPT-2-small-sized random model (12 × 768), 24,576-feature ReLU SAE at layer 8", gpt2, sae, hook,
                    args.gpt2_batch, settings, args.rounds), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
