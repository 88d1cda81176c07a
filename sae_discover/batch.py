"""Batch mode: ``--prompts_file`` JSONL in, JSONL out in input order, a progress bar on stderr.

Each line is an object with ``prompt`` or ``text`` plus optional per-line overrides of any seed
option and an ``id``. A bad line yields ``{"id": ..., "error": ...}`` and the batch goes on.
Finished runs are in the catalog, so rerunning a half-done batch skips them (``cached: true``).
The bar advances per prompt (as each one's run is made or found); the CLI exits 1 when any line failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ingest.run import MICRO_BATCH
from sae_discover.errors import USER_ERRORS, RequestError
from sae_discover.request import DiscoverRequest, build_request, parse_tags
from sae_discover.service import Discovery


def run_batch(discovery: Discovery, lines: list[tuple[int, dict | str]], defaults: dict[str, Any], out: str | Path,
              workers: int = 1, chunk: int = MICRO_BATCH) -> tuple[Path, int]:
    """Validate every line, then discover ``chunk`` lines at a time (micro-batched through the model),
    writing results in input order as each chunk finishes. Returns the output path and the error count."""
    base = {k: v for k, v in defaults.items() if k not in ("prompt", "text")}
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_err = 0
    if any(_batch_background(base, obj) for _, obj in lines):  # the contrast set is the whole file: one chunk
        chunk = max(len(lines), 1)
    with out_path.open("w") as sink, tqdm(total=len(lines), desc="discover", unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(lines), chunk):
            part = lines[start:start + chunk]
            ids, reqs, slots = [], [], []
            for number, obj in part:
                line_id = _echo(obj, number)
                ids.append(line_id)
                try:
                    reqs.append(line_request(base, obj))
                    slots.append(None)
                except USER_ERRORS as exc:
                    slots.append(exc)
            bar.update(len(part) - len(reqs))  # refused lines are done
            done = iter(_discover_chunk(discovery, reqs, workers, bar.update))
            for line_id, slot in zip(ids, slots, strict=True):
                result = slot if slot is not None else next(done)
                if isinstance(result, Exception):
                    n_err += 1
                    result = {"id": line_id, "error": str(result)}
                elif "id" not in result:
                    result = {**result, "id": line_id}
                sink.write(json.dumps(result, ensure_ascii=False) + "\n")
            sink.flush()
            bar.update(start + len(part) - bar.n)  # settle at the chunk's end (a retried chunk told twice)
    return out_path, n_err


BACKGROUNDS = ("background_text", "background_file")


def line_request(base: dict, obj: dict | str) -> DiscoverRequest:
    """The request of one prompts-file line (``base``: the command line's options, without prompt/text);
    a line that is not an object raises :class:`RequestError` naming ``prompts_file``."""
    if isinstance(obj, str):
        raise RequestError("prompts_file", obj)
    # a line's background text or file replaces the command line's background (either one, or batch)
    base = {k: v for k, v in base.items()
            if not ((k in BACKGROUNDS or k == "background") and any(b in obj for b in BACKGROUNDS))}
    # only an id the line gives is stored with its run (the line number stands in for the echo)
    return build_request({**base, **obj, **({"id": _line_id(obj["id"])} if obj.get("id") is not None else {}),
                          **_merged_tags(base, obj)})


def _echo(obj: dict | str, number: int) -> str:
    """The id a line's result is echoed with: its own ``id`` when it is one, else its line number."""
    try:
        return _line_id(obj["id"]) if isinstance(obj, dict) and obj.get("id") is not None else str(number)
    except RequestError:  # the line's error names the id; the echo is the line number
        return str(number)


def _line_id(value: object) -> str:
    """A line's ``id`` as its run's batch id: a string, or an integer written as one (a JSON object or
    list would be stored as Python's text of it)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        kind = {dict: "an object", list: "an array", float: "a number", bool: "a boolean"}.get(type(value), "a value")
        raise RequestError("id", f"expected a string or an integer, got {kind} {json.dumps(value)[:40]}")
    return str(value)


def _batch_background(base: dict, line: dict | str) -> bool:
    """Whether a line asks for ``background: batch`` (its own value, else the command line's)."""
    return isinstance(line, dict) and line.get("background", base.get("background")) == "batch"


def _merged_tags(base: dict, line: dict) -> dict:
    """The command line's ``--tags`` under the line's own (a key in both: the line's value)."""
    if not base.get("tags") or not isinstance(line.get("tags"), dict):
        return {}
    return {"tags": {**parse_tags(base["tags"]), **line["tags"]}}


def _discover_chunk(discovery: Discovery, reqs: list, workers: int, progress: Callable[[int], object]) -> list:
    """A chunk at once; if something unexpected breaks it, line by line, so one bad line cannot stop the batch."""
    try:
        return discovery.discover_many(reqs, workers=workers, progress=progress)
    except Exception:
        out = []
        for req in reqs:
            try:
                out.append(discovery.discover(req))
            except Exception as exc:
                out.append(RuntimeError(f"internal error: {type(exc).__name__}: {exc}"))
        return out
