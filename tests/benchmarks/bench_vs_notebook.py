"""sae-discover against the notebook a researcher writes today — run on demand, never by the test command:

    .venv/bin/python tests/benchmarks/bench_vs_notebook.py [--texts 256] [--prompts 64] [--gen 48] [--rounds 3]
                                                           [--only equal|default|gen] [--notebook-python PATH]

The notebook side needs TransformerLens and SAELens, which are not dependencies of this project. Give it
an environment of its own (never this project's venv), with torch and sae-discover itself for its
tokenizer-free helpers — e.g.

    python -m venv /tmp/exp/tlvenv && /tmp/exp/tlvenv/bin/pip install transformer_lens sae_lens -e .

and pass its python as ``--notebook-python`` (default ``/tmp/exp/tlvenv/bin/python``). Without it the
benchmark says so and exits 0.

Setup (built once into ``--workdir``, then reused): a GPT-2-small-sized random-init model (12 × 768,
vocabulary 50,257, 128-token context, fp32) saved with ``save_pretrained`` with the demo's BPE tokenizer,
and a 24,576-feature ReLU SAE for layer 8 ``resid_pre`` saved in SAELens format (``bench_ingest.relu_sae``:
its bias gives an L0 of ~64–80 on the texts' tokens, a real SAE's order; the cost of the codes kept scales
with it), so both sides load the same weights from disk, offline. Texts: ``--texts`` consecutive windows of
the demo corpus (BOS + 127 tokens after truncation); prompts:
``--prompts`` short distinct prompts, seeded sampling at temperature 1.

Comparisons (each side a fresh process per round — imports, loading, work, writes — timed as the wall
time of that process; its peak RSS from ``os.wait4``'s rusage; rounds interleave the two sides, and
the figure is the median over rounds of the paired ratio script time / sae-discover time; the same
ratio of CPU times (user + system, one thread each) is printed too — on a loaded machine the work done):

- ``equal``: text mode, every token encoded (``--topk_tokens_per_seq 1000``) vs the notebook
  (TransformerLens ``run_with_cache(stop_at_layer=9, names_filter=hook)`` in batches of 16, SAELens
  ``encode``, per-text mean / max / coverage over the real tokens, top 25 by mean × coverage);
- ``default``: text mode, sae-discover's defaults (top 64 tokens per text, ``auto`` → norm) vs the same notebook;
- ``gen``: prompt + ``--gen`` new tokens, defaults, vs a notebook that generates one prompt at a time
  with HF ``generate`` (seeded), then re-reads prompt + continuation with ``run_with_cache`` and encodes.

sae-discover runs as ``python -m sae_discover --prompts_file … --out … --db <fresh file>`` (a fresh
catalog each round: nothing is cached), so its time includes the catalog writes and the ranking. Both
sides run one torch thread (``--threads 1`` / ``torch.set_num_threads(1)``): on a shared machine
a second thread mostly waits for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LAYER, STREAM, HOOK_NAME = 8, "resid_pre", "blocks.8.hook_resid_pre"
N_CTX, MICRO_BATCH, TOP_X = 128, 16, 25
PROMPTS = ["Summarize Q2 earnings for ACME", "The match ended in", "Preheat the oven and", "def parse(line):",
           "Tomorrow's forecast calls for", "The patient presented with", "Revenue for the quarter rose",
           "In the second half the striker", "The court ruled that the contract", "Whisk the eggs with"]
COMPARISONS = ("equal", "default", "gen")


# ---- setup (this project's venv) ---------------------------------------------------------------------------------

def prepare(workdir: Path, n_texts: int, n_prompts: int) -> dict[str, Path]:
    """The model folder, the SAE folder and the two input files, built once into ``workdir``."""
    paths = {"model": workdir / "model", "sae": workdir / "sae", "texts": workdir / f"texts_{n_texts}.jsonl",
             "prompts": workdir / f"prompts_{n_prompts}.jsonl"}
    if not (paths["model"] / "config.json").exists() or not (paths["sae"] / "cfg.json").exists():
        _build_weights(paths["model"], paths["sae"])
    if not paths["texts"].exists():
        texts = corpus_windows(paths["model"], n_texts)
        paths["texts"].write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    if not paths["prompts"].exists():
        paths["prompts"].write_text("".join(
            json.dumps({"id": f"p{i}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})", "seed": i}) + "\n"
            for i in range(n_prompts)))
    return paths


def corpus_windows(model_dir: Path, n: int) -> list[str]:
    """n distinct texts of ≥ 127 tokens: consecutive windows of the demo corpus (its ~38,000 tokens hold
    ~300; ``bench_ingest.texts_for``, one text per few whole documents, gives fewer than 256), each
    decoded with a few tokens to spare so that re-tokenizing still gives ≥ 127 before truncation."""
    # deferred: the bench's light parts (the notebook child, --help) need no tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line)["text"] for line in (ROOT / "ingest/demo/calibration.jsonl").read_text().splitlines()]
    ids = tokenizer(" ".join(docs), add_special_tokens=False)["input_ids"]
    stride, spare = N_CTX - 1, 8
    if n * stride + spare > len(ids):
        raise SystemExit(f"the demo corpus holds {(len(ids) - spare) // stride} windows of {stride} tokens, not {n}")
    return [tokenizer.decode(ids[k * stride:(k + 1) * stride + spare]) for k in range(n)]


def _build_weights(model_dir: Path, sae_dir: Path) -> None:
    """Save the random model (with the demo tokenizer) and an SAE biased on its activations over the texts."""
    sys.path[:0] = [str(ROOT), str(HERE)]
    # deferred: torch and the project are needed only to build the weights
    import torch
    from bench_ingest import relu_sae
    from transformers import GPT2Config, GPT2LMHeadModel

    from ingest.models import load_model
    from ingest.saes import saelens

    tokenizer = load_model("demo", ROOT / "ingest/demo/model", device="cpu").tokenizer  # the demo's GPT-2 BPE
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=N_CTX,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.n_ctx = N_CTX  # as in the Hub's gpt2 config.json, where TransformerLens reads it
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    loaded = load_model("gpt2-small-random", model_dir, device="cpu")
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:N_CTX] for text in corpus_windows(model_dir, 2)])
    sample = loaded.capture(ids, [(LAYER, STREAM)])[0][(LAYER, STREAM)][:, 1:].reshape(-1, 768)  # BOS left out
    sae = relu_sae(768, LAYER, STREAM, sample)  # its bias: an L0 of ~64 on these texts' tokens
    sae.cfg.model_name = "gpt2"
    saelens.save(sae, sae_dir, metadata={"context_size": N_CTX})


# ---- the notebook (run by --notebook-python: TransformerLens + SAELens) ---------------------------------------------

def _notebook_load(model_dir: Path, sae_dir: Path):
    """TransformerLens model + SAELens SAE from disk, as ``HookedTransformer.from_pretrained(name, hf_model=…,
    **sae.cfg.metadata.model_from_pretrained_kwargs)`` makes them. from_pretrained only takes official Hub
    names (it fetches their config), so this runs its steps on the local folder instead."""
    # deferred: these live only in the notebook's environment
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sae = SAE.load_from_disk(sae_dir, device="cpu")
    processing = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True,
                  **(sae.cfg.metadata.model_from_pretrained_kwargs or {})}  # from_pretrained's defaults, then the SAE's
    cfg = loading.get_pretrained_model_config(str(model_dir), fold_ln=processing["fold_ln"], device="cpu")
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(loading.get_pretrained_state_dict(str(model_dir), cfg, hf_model=hf), **processing)
    return hf, model.eval(), sae


def _top_features(feats) -> list[dict]:
    """Per-feature mean / max / coverage over one text's real tokens ([tokens, d_sae]); the top by mean × coverage."""
    mean, peak, coverage = feats.mean(0), feats.max(0).values, (feats > 0).float().mean(0)
    scores, ids = (mean * coverage).topk(TOP_X)
    return [{"feature_id": int(f), "score": float(s), "mean": float(mean[f]), "max": float(peak[f]),
             "coverage": float(coverage[f])} for s, f in zip(scores, ids, strict=True)]


def notebook_text(model_dir: Path, sae_dir: Path, inputs: Path, out: Path) -> None:
    """Text mode: batches of 16 through ``run_with_cache(stop_at_layer=layer + 1)``, every real token encoded."""
    import torch  # deferred: the notebook's environment

    _, model, sae = _notebook_load(model_dir, sae_dir)
    texts = [json.loads(line)["text"] for line in inputs.read_text().splitlines()]
    with out.open("w") as f, torch.inference_mode():
        for start in range(0, len(texts), MICRO_BATCH):
            toks = model.to_tokens(texts[start:start + MICRO_BATCH], truncate=True)
            _, cache = model.run_with_cache(toks, stop_at_layer=LAYER + 1, names_filter=HOOK_NAME)
            feats = sae.encode(cache[HOOK_NAME])
            real = toks != model.tokenizer.pad_token_id
            real[:, 0] = False  # BOS
            for row in range(len(toks)):
                f.write(json.dumps({"features": _top_features(feats[row][real[row]])}) + "\n")


def notebook_gen(model_dir: Path, sae_dir: Path, inputs: Path, out: Path, gen_tokens: int) -> None:
    """Prompt + generation: HF ``generate`` one prompt at a time (seeded sampling), then ``run_with_cache``
    over prompt + continuation and the encode of every token after BOS."""
    import torch  # deferred: the notebook's environment

    hf, model, sae = _notebook_load(model_dir, sae_dir)
    with out.open("w") as f, torch.inference_mode():
        for line in inputs.read_text().splitlines():
            spec = json.loads(line)
            ids = model.to_tokens(spec["prompt"])
            torch.manual_seed(spec["seed"])
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                              max_new_tokens=gen_tokens, pad_token_id=hf.config.eos_token_id)
            _, cache = model.run_with_cache(seq, stop_at_layer=LAYER + 1, names_filter=HOOK_NAME)
            feats = sae.encode(cache[HOOK_NAME][0, 1:])
            f.write(json.dumps({"continuation": seq[0, ids.shape[1]:].tolist(), "features": _top_features(feats)}) + "\n")


# ---- the comparison --------------------------------------------------------------------------------------------------

def measure(cmd: list[str], cwd: Path) -> dict:
    """Wall time, CPU time (user + system) and peak RSS (MiB) of one process, from start to exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{output[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def commands(comparison: str, paths: dict[str, Path], notebook_python: str, gen: int, scratch: Path,
             round_: int) -> tuple[list[str], list[str]]:
    """(sae-discover's command, the notebook's command) for one round of a comparison."""
    inputs = paths["prompts"] if comparison == "gen" else paths["texts"]
    ours = [sys.executable, "-m", "sae_discover", "--prompts_file", str(inputs), "--out",
            str(scratch / f"ours_{comparison}_{round_}.jsonl"), "--db", str(scratch / f"catalog_{comparison}_{round_}.duckdb"),
            "--model", str(paths["model"]), "--sae", str(paths["sae"]), "--layers", str(LAYER), "--streams", STREAM,
            "--threads", "1", "--device", "cpu"]
    ours += {"equal": ["--topk_tokens_per_seq", "1000"], "default": [], "gen": ["--gen_tokens", str(gen)]}[comparison]
    script = [notebook_python, __file__, "--notebook", "gen" if comparison == "gen" else "text", "--model-dir",
              str(paths["model"]), "--sae-dir", str(paths["sae"]), "--inputs", str(inputs), "--gen", str(gen),
              "--out", str(scratch / f"script_{comparison}_{round_}.jsonl")]
    return ours, script


def compare(comparison: str, paths: dict[str, Path], args, scratch: Path) -> dict:
    """Paired interleaved rounds (sae-discover, then the notebook); the paired ratios and the peaks."""
    rows: dict[str, list[dict]] = {"ours": [], "script": []}
    for round_ in range(args.rounds):
        ours, script = commands(comparison, paths, args.notebook_python, args.gen, scratch, round_)
        rows["ours"].append(measure(ours, scratch))
        rows["script"].append(measure(script, scratch))
        print(f"  {comparison} round {round_ + 1}: sae-discover {rows['ours'][-1]['wall_s']:.1f} s, "
              f"script {rows['script'][-1]['wall_s']:.1f} s (CPU {rows['ours'][-1]['cpu_s']:.1f} / "
              f"{rows['script'][-1]['cpu_s']:.1f} s), load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    ratios = [s["wall_s"] / o["wall_s"] for o, s in zip(rows["ours"], rows["script"], strict=True)]
    cpu_ratios = [s["cpu_s"] / o["cpu_s"] for o, s in zip(rows["ours"], rows["script"], strict=True)]
    ours_out, script_out = (scratch / f"{side}_{comparison}_0.jsonl" for side in ("ours", "script"))
    return {"comparison": comparison, "ratios": ratios, "speed": statistics.median(ratios),
            "same_top": same_top(ours_out, script_out), "cpu_speed": statistics.median(cpu_ratios),
            **{f"{side}_s": statistics.median(r["wall_s"] for r in rs) for side, rs in rows.items()},
            **{f"{side}_mib": max(r["peak_mib"] for r in rs) for side, rs in rows.items()}}


def same_top(ours: Path, script: Path) -> float:
    """The fraction of inputs whose top features (ids, in order) are the same on both sides."""
    pairs = zip(ours.read_text().splitlines(), script.read_text().splitlines(), strict=True)
    same = [[f["feature_id"] for f in json.loads(a)["features"]] == [f["feature_id"] for f in json.loads(b)["features"]]
            for a, b in pairs]
    return sum(same) / len(same)


TARGETS = {"equal": 1.0, "default": 1.3, "gen": 3.0}


def report(results: list[dict], args) -> str:
    what = {"equal": f"text, {args.texts} × 127 tokens, equal work (`--topk_tokens_per_seq 1000`)",
            "default": f"text, {args.texts} × 127 tokens, defaults (top-64, `auto` → norm)",
            "gen": f"prompt+gen, {args.prompts} prompts × {args.gen} new tokens, defaults"}
    lines = ["| comparison | sae-discover s | script s | speed (paired median) | paired range | peak MiB ours / script "
             "| same top 25 | CPU-time speed | target |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {what[r['comparison']]} | {r['ours_s']:.1f} | {r['script_s']:.1f} | **{r['speed']:.2f}×** | "
                     f"{min(r['ratios']):.2f}–{max(r['ratios']):.2f}× | {r['ours_mib']:,.0f} / {r['script_mib']:,.0f} | "
                     f"{r['same_top']:.0%} | {r['cpu_speed']:.2f}× | "
                     f"≥ {TARGETS[r['comparison']]}× |")
    return "\n".join(lines)


def has_notebook(python: str) -> bool:
    if not Path(python).exists():
        return False
    probe = subprocess.run([python, "-c", "import transformer_lens, sae_lens"], capture_output=True)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--gen", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=COMPARISONS, action="append", help="one comparison (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sae-discover-bench-vs-notebook")
    parser.add_argument("--notebook-python", default="/tmp/exp/tlvenv/bin/python",
                        help="a python with transformer_lens and sae_lens (see the module docstring)")
    parser.add_argument("--notebook", choices=("text", "gen"), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--sae-dir", "--inputs", "--out"):
        parser.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.notebook == "text":
        return notebook_text(args.model_dir, args.sae_dir, args.inputs, args.out)
    if args.notebook == "gen":
        return notebook_gen(args.model_dir, args.sae_dir, args.inputs, args.out, args.gen)
    if not has_notebook(args.notebook_python):
        print(f"skipped: {args.notebook_python} cannot import transformer_lens and sae_lens. Create a separate "
              "environment (never this project's venv): python -m venv /tmp/exp/tlvenv && "
              "/tmp/exp/tlvenv/bin/pip install transformer_lens sae_lens -e . — then pass --notebook-python.")
        return None
    paths = prepare(args.workdir, args.texts, args.prompts)
    scratch = Path(tempfile.mkdtemp(prefix="rounds-", dir=args.workdir))
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; one torch thread each side; "
          f"{args.rounds} paired round(s)", file=sys.stderr)
    results = [compare(c, paths, args, scratch) for c in (args.only or COMPARISONS)]
    print(report(results, args))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return None


if __name__ == "__main__":
    main()
