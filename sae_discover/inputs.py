"""Input files a user names: batch prompts (JSONL) and corpora (one document per line). Torch-free.

Each reader refuses what it cannot read with a :class:`RequestError` naming the option that named the
file (``prompts_file``, ``corpus``, ``background_file``), never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sae_discover.errors import RequestError

MAX_INPUT_BYTES = 1 << 30  # a larger input file is refused before it is read


def check_file(path: str | Path, field: str) -> Path:
    """``path`` as a readable regular file, or a one-line error naming ``field``: cheap enough to run
    before any work, so a request that would fail on its file fails before it computes or stores."""
    file = Path(path)
    if not file.exists():
        raise RequestError(field, f"{file} does not exist")
    if not file.is_file():
        raise RequestError(field, f"{file} is not a regular file")
    if not os.access(file, os.R_OK):
        raise RequestError(field, f"{file} cannot be read (permission denied)")
    return file


def utf8_problem(text: str) -> str | None:
    """Why ``text`` is not UTF-8 text — a lone surrogate, from a JSON escape (``"\\ud800"``) or from
    command-line bytes that are not UTF-8 — or None. A tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"expected UTF-8 text; character {exc.start} is a lone surrogate ({text[exc.start]!a})"
    return None


def file_lines(text: str) -> list[str]:
    """A file's lines: split at newlines only (``str.splitlines`` also splits at U+2028, U+0085 and
    other characters that JSON writes raw inside strings), a CRLF's CR dropped."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def json_reason(exc: ValueError | RecursionError) -> str:
    """Why a line is not JSON, in a few words: the decoder's message, nesting too deep, or (any other
    ValueError) an integer of more digits than Python converts."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]


def read_text_file(path: str | Path, field: str) -> tuple[Path, str]:
    """The file's text (UTF-8; a leading byte-order mark, as Windows editors write, dropped), or a
    one-line error naming ``field``."""
    file = check_file(path, field)
    try:
        if file.stat().st_size > MAX_INPUT_BYTES:
            raise RequestError(field, f"{file} is larger than {MAX_INPUT_BYTES} bytes")
        return file, file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestError(field, f"{file} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise RequestError(field, f"{file} cannot be read ({exc.strerror or exc})") from None


def read_lines(path: str | Path, field: str = "prompts_file") -> list[tuple[int, dict | str]]:
    """Batch lines: ``(line number, object)``, or ``(line number, error text)`` for a line that is not a
    JSON object (the batch reports it in place and goes on). Blank lines are skipped."""
    _, text = read_text_file(path, field)
    out: list[tuple[int, dict | str]] = []
    for number, line in enumerate(file_lines(text), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append((number, obj if isinstance(obj, dict) else f"line {number}: expected a JSON object"))
        except (ValueError, RecursionError) as exc:
            out.append((number, f"line {number}: not JSON ({json_reason(exc)})"))
    if not out:  # nothing to run: refused before anything is written (a batch would replace its results file)
        raise RequestError(field, f"{path} holds no lines; expected one JSON object per line (prompt or text, "
                                  "plus per-line options)")
    return out


def read_corpus(path: str | Path, field: str = "corpus") -> list[str]:
    """One document per line: plain text, or JSONL with a ``text`` field (SPEC.md)."""
    file, text = read_text_file(path, field)
    docs = []
    for number, line in enumerate(file_lines(text), 1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except RecursionError:
                raise RequestError(field, f"{file}:{number} is nested too deeply") from None
            except ValueError as exc:
                raise RequestError(field, f"{file}:{number} is not JSON ({json_reason(exc)})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RequestError(field, f"{file}:{number} has no string field 'text'")
            problem = utf8_problem(obj["text"])
            if problem:
                raise RequestError(field, f"{file}:{number}: {problem}")
            docs.append(obj["text"])
        else:
            docs.append(line)
    if not docs:
        raise RequestError(field, f"{file} holds no documents")
    return docs
