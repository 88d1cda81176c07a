"""Batch mode: ``--prompts_file`` JSONL in, JSONL out in input order, a progress bar on stderr.

Each line is an object with ``prompt`` or ``text`` plus optional per-line overrides of any seed
option and an ``id``. A bad line yields ``{"id": ..., "error": ...}`` and the batch goes on.
Finished runs are in the catalog, so rerunning a half-done batch skips them (``cached: true``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from sae_discover.request import RequestError, build_request


def read_lines(path: str) -> list[tuple[int, dict | str]]:
    file = Path(path)
    if not file.exists():
        raise RequestError("prompts_file", f"{file} does not exist")
    out: list[tuple[int, dict | str]] = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append((number, obj if isinstance(obj, dict) else f"line {number}: expected a JSON object"))
        except json.JSONDecodeError as exc:
            out.append((number, f"line {number}: not JSON ({exc.msg})"))
    return out


def run_batch(ns: argparse.Namespace, defaults: dict) -> int:
    from sae_discover.cli import _discovery
    from sae_discover.service import USER_ERRORS

    lines = read_lines(ns.prompts_file)
    disc = _discovery(ns)
    base = {k: v for k, v in defaults.items() if k not in ("prompt", "text")}
    out_path = Path(ns.out or "results/discover_batch.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_err = 0
    with out_path.open("w") as out:
        for number, obj in tqdm(lines, desc="discover", unit="prompt", file=sys.stderr):
            line_id = obj.get("id", number) if isinstance(obj, dict) else number
            try:
                if isinstance(obj, str):
                    raise RequestError("prompts_file", obj)
                req = build_request({**base, **obj, "id": str(line_id)})
                result = disc.discover(req)
            except (*USER_ERRORS, ValueError) as exc:
                n_err += 1
                result = {"id": str(line_id), "error": str(exc)}
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
    print(f"wrote {out_path} ({len(lines)} lines, {n_err} errors)")
    return 0
