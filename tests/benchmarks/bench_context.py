"""What score mode ``context`` costs at a realistic SAE size (run on demand:
``.venv/bin/python tests/benchmarks/bench_context.py [--d_sae 16384] [--docs 1000] [--per_token 60]``).

``context`` correlates, for each pair of a run's scored features, their activity over the calibration's
documents (a self-join of the calibration's per-document masses restricted to those features), so its cost
grows with the number of scored features and of calibration documents; ``lift`` reads one statistics
row per feature. A synthetic SAE of ``--d_sae`` features and a calibration of ``--docs`` documents of
64 tokens, ``--per_token`` codes per token (70 % from the document's topic, one of 50 pools of 800
features, 30 % anywhere: features co-fire within topics, as real ones do); one 64-token run of one
topic. Both modes are ranked alternately (paired rounds) at gate 0 (every active feature scored) and
at the default gate; the medians and the machine's load are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from catalog import ranking, stats, writes  # noqa: E402
from catalog.db import Catalog  # noqa: E402

MODEL = writes.ModelInfo("bench", "fp", "gpt2", 12, 768)
DOC_LEN, TOPICS, POOL, TOPIC_SHARE = 64, 50, 800, 0.7


def codes(rng: np.random.Generator, pools: list[np.ndarray], d_sae: int, per_token: int, topic: int,
          first_position: int) -> pa.Table:
    """One document's sparse codes (position, sae_index, feature_id, act): per token, ``per_token``
    distinct features, most from the topic's pool."""
    from_topic = int(per_token * TOPIC_SHARE)
    pos, feat = [], []
    for i in range(DOC_LEN):
        chosen = np.union1d(rng.choice(pools[topic], from_topic, replace=False),
                            rng.choice(d_sae, per_token - from_topic, replace=False))
        pos.append(np.full(len(chosen), first_position + i, np.int32))
        feat.append(chosen.astype(np.int32))
    p, f = np.concatenate(pos), np.concatenate(feat)
    return pa.table({"position": p, "sae_index": np.zeros(len(p), np.int16), "feature_id": f,
                     "act": rng.gamma(2.0, 0.5, size=len(p)).astype(np.float32)})


def build(path: Path, d_sae: int, n_docs: int, per_token: int, seed: int = 0) -> tuple[Catalog, int, list[int]]:
    """A catalog with the calibration and one run; returns it, the run key and the SAE keys."""
    rng = np.random.default_rng(seed)
    pools = [rng.choice(d_sae, POOL, replace=False) for _ in range(TOPICS)]
    info = [writes.SAEInfo("bench-sae", 8, "resid_pre", "fp", "blocks.8.hook_resid_pre", "standard", 768, d_sae)]
    cat = Catalog(path)
    docs = [codes(rng, pools, d_sae, per_token, int(rng.integers(TOPICS)), 1 + k * DOC_LEN) for k in range(n_docs)]
    acts = pa.concat_tables(docs)
    acts = acts.append_column("doc", pa.array(((acts["position"].to_numpy() - 1) // DOC_LEN).astype(np.int32)))
    positions = np.arange(1, n_docs * DOC_LEN + 1, dtype=np.int32)
    tokens = pa.table({"doc": pa.array((positions - 1) // DOC_LEN), "position": pa.array(positions),
                       "token_id": pa.array(np.zeros(len(positions), np.int32)), "token": ["x"] * len(positions)})
    stats.write_calibration(cat, MODEL, info, "synthetic", "h", n_docs, tokens, acts)
    run = codes(rng, pools, d_sae, per_token, 3, 1)
    n = DOC_LEN + 1
    run_tokens = pa.table({"position": pa.array(np.arange(n, dtype=np.int32)),
                           "token_id": pa.array(np.arange(n, dtype=np.int32)), "token": [f"t{i}" for i in range(n)],
                           "is_generated": [False] * n, "is_special": [i == 0 for i in range(n)],
                           "kept": [i > 0 for i in range(n)], "proxy": [0.0] * n})
    meta = {"run_id": "r", "model_id": "bench", "sae_id": "bench-sae", "mode": "text", "text": "x",
            "generate": False, "n_tokens": n, "n_kept": DOC_LEN}
    run_key, _ = writes.write_run(cat, meta, MODEL, info, run_tokens, run)
    con = cat.raw()
    keys = writes.sae_keys(con, info)
    con.close()
    return cat, run_key, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_sae", type=int, default=16_384)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--per_token", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cat, run_key, keys = build(Path(tmp) / "context.duckdb", ns.d_sae, ns.docs, ns.per_token)
        for gate in (0.0, 0.5):
            times: dict[str, list[float]] = {"lift": [], "context": []}
            scored = 0
            for _ in range(ns.rounds):
                for mode in times:
                    opts = ranking.RankOptions(score_mode=mode, min_coverage_pct=gate, return_top_x=25,
                                               attach_examples=False, attach_proto_labels=False)
                    t0 = time.perf_counter()
                    ranking.rank_run(cat, run_key, keys, opts)
                    times[mode].append(time.perf_counter() - t0)
            con = cat.raw()
            (scored,) = con.execute("SELECT count(*) FROM feature_scores(['r'], score_mode := 'lift', "
                                    "min_coverage_pct := ?)", [gate]).fetchone()
            con.close()
            lift, context = statistics.median(times["lift"]), statistics.median(times["context"])
            print(f"d_sae {ns.d_sae}, {ns.docs} calibration documents, {ns.per_token} codes/token, gate {gate:g}: "
                  f"{scored} scored features; lift {lift * 1000:.0f} ms, context {context * 1000:.0f} ms "
                  f"({context / lift:.0f}x); load {os.getloadavg()[0]:.1f}")
        cat.close()


if __name__ == "__main__":
    main()
