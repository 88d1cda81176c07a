"""Discovery quality benchmark — run on demand, never by the test command (pytest ignores tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_quality.py [--layers 1 2 3] [--per_domain 4] [--oracle_docs 600]
                                                       [--normalization sae_median_max] [--prompt_seed 4242]

precision@5 and @10 of every score mode on held-out prompts of the demo (in-distribution and
out-of-distribution; see ``quality.py`` for the prompts and the independent oracle), per layer and for
the merged ranking over all the layers, at the default coverage gate and without one
(``min_coverage_pct 0``); selectivity, lift and context also against ``background batch`` (each prompt contrasted
with the set's other prompts, ranked together as one batch). Prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from catalog.db import Catalog  # noqa: E402
from catalog.ranking import NORMALIZATIONS, SCORE_MODES  # noqa: E402
from sae_discover.registry import Registry  # noqa: E402
from sae_discover.request import build_request  # noqa: E402
from sae_discover.service import Discovery  # noqa: E402
from tests.benchmarks import quality  # noqa: E402

COLUMNS = [(mode, {}) for mode in SCORE_MODES] + [(mode, {"background": "batch"})
                                                   for mode in ("selectivity", "lift", "context")]
GATES = [0.5, 0.0]  # the default min_coverage_pct, and none


def evaluate(disc: Discovery, prompts: list[tuple[str, str]], layers: list[int], mode: str,
             oracle: dict, options: dict) -> tuple[float, float]:
    extra = {"attribution_target": "next_tokens"} if mode.startswith("attribution") else {}  # what text mode "uses"
    extra.update(options)
    reqs = [build_request({"text": text, "layers": layers, "score_mode": mode, "return_top_x": 10, **extra})
            for _, text in prompts]
    results = disc.discover_many(reqs)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]
    domains = [d for d, _ in prompts]
    return quality.precision_at(results, domains, oracle, 5), quality.precision_at(results, domains, oracle, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3], help="the README's table: 1 2 3")
    parser.add_argument("--per_domain", type=int, default=4, help="in-distribution prompts per domain")
    parser.add_argument("--oracle_docs", type=int, default=600)
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="calibration_max",
                        help="what every column's activity scores are divided by")
    parser.add_argument("--prompt_seed", type=int, default=quality.PROMPT_SEED,
                        help="another seed: a second in-distribution prompt set")
    ns = parser.parse_args()
    t0 = time.perf_counter()
    oracle = quality.oracle_domains(ns.layers, ns.oracle_docs)
    print(f"oracle over {ns.oracle_docs} documents in {time.perf_counter() - t0:.0f} s; features with a domain: "
          + ", ".join(f"L{layer} {sum(v is not None for (lay, _), v in oracle.items() if lay == layer)}"
                      for layer in ns.layers), file=sys.stderr)
    sets = {"in-distribution": quality.in_distribution_prompts(ns.per_domain, ns.prompt_seed),
            "out-of-distribution": quality.out_of_distribution_prompts()}
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(Path(tmp) / "quality.duckdb")
        disc = Discovery(catalog, Registry.builtin(), device="cpu")
        print("| prompts | layers | gate | " + " | ".join(
            f"{m}{', batch' if o else ''} p@5 / p@10" for m, o in COLUMNS) + " |")
        print("|---|---|---:|" + "---:|" * len(COLUMNS))
        for name, prompts in sets.items():
            for layers in [[layer] for layer in ns.layers] + [ns.layers]:
                for gate in GATES:
                    cells = [evaluate(disc, prompts, layers, mode, oracle, {**options, "min_coverage_pct": gate,
                                                                          "normalization": ns.normalization})
                             for mode, options in COLUMNS]
                    label = "merged " + ",".join(map(str, layers)) if len(layers) > 1 else str(layers[0])
                    print(f"| {name} ({len(prompts)}) | {label} | {gate:g} | "
                          + " | ".join(f"{p5:.2f} / {p10:.2f}" for p5, p10 in cells) + " |", flush=True)
        catalog.close()
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
