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


def run_batch(ns: argparse.Namespace, defaults: dict, chunk: int = 16) -> int:
    """Validate every line, then discover ``chunk`` lines at a time (micro-batched through the model),
    writing results in input order as each chunk finishes."""
    from sae_discover.cli import _discovery
    from sae_discover.service import USER_ERRORS

    lines = read_lines(ns.prompts_file)
    disc = _discovery(ns)
    base = {k: v for k, v in defaults.items() if k not in ("prompt", "text")}
    out_path = Path(ns.out or "results/discover_batch.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_err = 0
    with out_path.open("w") as out, tqdm(total=len(lines), desc="discover", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(lines), chunk):
            part = lines[start:start + chunk]
            ids, reqs, slots = [], [], []
            for number, obj in part:
                line_id = str(obj.get("id", number)) if isinstance(obj, dict) else str(number)
                ids.append(line_id)
                try:
                    if isinstance(obj, str):
                        raise RequestError("prompts_file", obj)
                    reqs.append(build_request({**base, **obj, "id": line_id}))
                    slots.append(None)
                except (*USER_ERRORS, ValueError) as exc:
                    slots.append(exc)
            done = iter(_discover_chunk(disc, reqs, getattr(ns, "workers", 1) or 1))
            for line_id, slot in zip(ids, slots, strict=True):
                result = slot if slot is not None else next(done)
                if isinstance(result, Exception):
                    n_err += 1
                    result = {"id": line_id, "error": str(result)}
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(part))
    print(f"wrote {out_path} ({len(lines)} lines, {n_err} errors)")
    return 0


def _discover_chunk(disc, reqs: list, workers: int) -> list:
    """A chunk at once; if something unexpected breaks it, line by line, so one bad line cannot stop the batch."""
    try:
        return disc.discover_many(reqs, workers=workers)
    except Exception:
        out = []
        for req in reqs:
            try:
                out.append(disc.discover(req))
            except Exception as exc:
                out.append(RuntimeError(f"internal error: {type(exc).__name__}: {exc}"))
        return out
