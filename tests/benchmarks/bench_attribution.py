"""Attribution benchmarks — run on demand, never by the test command (pytest ignores tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_attribution.py [--reps 3] [--threads N] [--clock wall|cpu]

On a GPT-2-small-sized random model (12 layers, d 768, fp32) with 24,576-feature ReLU SAEs (L0 ≈ 64),
8 × 128 tokens, ``attribution_target=next_tokens``:

(a) an attribution run (``run_many``: capture with the graph, M, one backward pass, encode, attributions)
    at one hook (layer 8 resid_post) and at three (layers 4, 8, 11 resid_post), against its floor: a bare
    forward + backward of the same model over the same tokens (gradient of the same M with respect to
    the embeddings; weights frozen). Target ≤ 1.3×.
(b) ``verify_top 10``: ten ablated forwards of one 128-token run in one batch (plus the baseline row),
    against ten bare forwards of that sequence. Target ≤ 1.5×.
(c) memory: peak RSS added by an attribution run over 1,024 tokens, each measured in a fresh process,
    for SAEs of 24,576 and of 49,152 features: what grows with d_sae is the SAE (weights), not a
    [tokens × d_sae] block.
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import bench_ingest as bi  # noqa: E402

from ingest import run as ingest_run  # noqa: E402
from ingest.attribution import Ablation, ablation_deltas, frozen_weights, metric_values, resolve_metric  # noqa: E402
from ingest.models import LoadedModel, load_model  # noqa: E402

BATCH, SEQ = bi.BATCH, bi.SEQ


def gpt2_small() -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    demo = load_model("demo", bi.ROOT / "ingest/demo/model", device="cpu")
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
    return LoadedModel(model=model, tokenizer=demo.tokenizer, model_id="gpt2-small-random", family="gpt2",
                       fingerprint="random", n_layers=12, d_model=768, context_length=SEQ)


def forward_backward(loaded: LoadedModel, ids: torch.Tensor, metric) -> None:
    """The floor: the plain model forward with the graph from the input embeddings on, the same M, one backward."""
    with frozen_weights(loaded.model), torch.enable_grad():
        embeds = loaded.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = loaded.model(inputs_embeds=embeds, use_cache=False).logits
        n = ids.shape[1]
        values = metric_values(logits, ids, [n] * len(ids), [1] * len(ids), [metric] * len(ids))
        torch.autograd.grad(values.sum(), [embeds])


def saes_for(loaded: LoadedModel, ids: torch.Tensor, hooks, d_sae: int = bi.D_SAE):
    bi.D_SAE = d_sae
    captured, _ = loaded.capture(ids, hooks)
    return [bi.relu_sae(768, layer, stream, captured[(layer, stream)].reshape(-1, 768), seed=i)
            for i, (layer, stream) in enumerate(hooks)]


def bench_run(loaded: LoadedModel, reps: int) -> str:
    texts = bi.texts_for(loaded.tokenizer, BATCH)
    metric = resolve_metric(loaded.tokenizer, "next_tokens")
    ids = torch.tensor([ingest_run.encode_ids(loaded, t, True)[:SEQ] for t in texts])
    rows = []
    for hooks in ([(8, "resid_post")], [(4, "resid_post"), (8, "resid_post"), (11, "resid_post")]):
        saes = saes_for(loaded, ids, hooks)
        specs = [ingest_run.RunSpec(text=t, hooks=hooks, token_proxy="norm", topk_tokens_per_seq=bi.K_PER_SEQ,
                                    attribution_target="next_tokens") for t in texts]
        plain = [ingest_run.RunSpec(text=t, hooks=hooks, token_proxy="norm", topk_tokens_per_seq=bi.K_PER_SEQ)
                 for t in texts]
        best, med, paired = bi.timeit({
            "floor": lambda: forward_backward(loaded, ids, metric),
            "attribution": lambda: ingest_run.run_many(loaded, saes, specs),  # noqa: B023
            "plain": lambda: ingest_run.run_many(loaded, saes, plain),  # noqa: B023
        }, reps)
        label = f"{len(hooks)} hook{'s' if len(hooks) > 1 else ''}"
        rows += [(f"{label}: bare forward + backward (floor)", best["floor"], 1.0, 1.0, med["floor"]),
                 (f"{label}: attribution run (run_many, top-{bi.K_PER_SEQ}/seq)", best["attribution"],
                  best["attribution"] / best["floor"], paired["attribution"], med["attribution"]),
                 (f"{label}: the same run without attribution", best["plain"], best["plain"] / best["floor"],
                  paired["plain"], med["plain"])]
    return bi.table(f"(a) attribution run vs bare forward + backward, GPT-2-small-sized, {BATCH} × {SEQ} tokens", rows)


def bench_verify(loaded: LoadedModel, reps: int) -> str:
    text = bi.texts_for(loaded.tokenizer, 1)[0]
    ids = ingest_run.encode_ids(loaded, text, True)[:SEQ]
    hook = (8, "resid_post")
    t = torch.tensor([ids])
    (sae,) = saes_for(loaded, t, [hook])
    metric = resolve_metric(loaded.tokenizer, "next_tokens")
    with torch.inference_mode():
        codes = sae.encode(loaded.capture(t, [hook])[0][hook][0])
    positions = np.arange(1, len(ids))
    features = torch.argsort(-codes[1:].sum(0))[:10].tolist()
    ablations = [Ablation(hook, sae, f, positions, codes[1:, f].numpy()) for f in features]

    def ten_forwards() -> None:
        with torch.inference_mode():
            for _ in range(10):
                loaded.model(input_ids=t, use_cache=False)

    best, med, paired = bi.timeit({"floor": ten_forwards,
                                   "verify": lambda: ablation_deltas(loaded, ids, 1, metric, ablations)}, reps)
    return bi.table(f"(b) verify_top 10 vs ten bare forwards, one {len(ids)}-token run",
                    [("ten bare forwards (floor)", best["floor"], 1.0, 1.0, med["floor"]),
                     ("verify_top 10 (baseline + 10 ablated rows, one batch)", best["verify"],
                      best["verify"] / best["floor"], paired["verify"], med["verify"])])


def _rss() -> int:
    """This process's resident set size in bytes, now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def memory_probe(d_sae: int, attribute: bool) -> None:
    """In a fresh process: peak RSS (MiB) above the RSS at the start of one run over BATCH × SEQ tokens,
    sampled every millisecond by a thread (the lifetime peak would hold the set-up's)."""
    import threading
    loaded = gpt2_small()
    texts = bi.texts_for(loaded.tokenizer, BATCH)
    ids = torch.tensor([ingest_run.encode_ids(loaded, t, True)[:SEQ] for t in texts])
    hooks = [(8, "resid_post")]
    saes = saes_for(loaded, ids, hooks, d_sae)
    specs = [ingest_run.RunSpec(text=t, hooks=hooks, token_proxy="norm", topk_tokens_per_seq=SEQ,
                                attribution_target="next_tokens" if attribute else "none") for t in texts]
    ingest_run.run_many(loaded, saes, specs[:1])  # warm-up: lazily allocated buffers of the first call
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.001)

    watcher = threading.Thread(target=sample)
    watcher.start()
    ingest_run.run_many(loaded, saes, specs)
    done.set()
    watcher.join()
    print((max(peak[0], _rss()) - before) / 2**20)


def bench_memory() -> str:
    lines = [f"**(c) peak RSS above the start of one run over {BATCH * SEQ:,} tokens (every token kept), "
             "fresh process each**",
             "", "| SAE features | without attribution MiB | with attribution MiB |", "|---:|---:|---:|"]
    for d_sae in (bi.D_SAE, 2 * bi.D_SAE):
        got = [float(subprocess.run([sys.executable, __file__, "--memory-probe", str(d_sae), flag],
                                    capture_output=True, text=True, check=True).stdout.split()[-1])
               for flag in ("0", "1")]
        lines.append(f"| {d_sae:,} | {got[0]:,.0f} | {got[1]:,.0f} |")
    dense = BATCH * SEQ * bi.D_SAE * 4 / 2**20
    lines += ["", f"For scale: tokens × d_model × 4 B = {BATCH * SEQ * 768 * 4 / 2**20:.0f} MiB per stored stream, "
                  f"tokens × d_sae × 4 B = {dense:,.0f} MiB for 24,576 features."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--memory-probe", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe[0], bool(args.memory_probe[1]))
        return
    if args.clock == "cpu":
        bi.CLOCK = __import__("time").process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
          f"{platform.processor() or platform.machine()}, fp32, CPU\n")
    if args.only_memory:
        print(bench_memory())
        return
    loaded = gpt2_small()
    print(bench_run(loaded, args.reps))
    print(bench_verify(loaded, args.reps))
    if not args.skip_memory:
        print(bench_memory())


if __name__ == "__main__":
    main()
