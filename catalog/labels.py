"""AutoInterp label tables → rows for the ``labels`` table (imported, never hand-typed), and their write.

Formats:
- Neuronpedia explanation exports: JSONL or JSONL.gz (or a JSON array, or one pretty-printed object) of
  objects with ``modelId``, ``layer`` (the SAE id, e.g. ``"6-res-jb"``), ``index`` (feature id) and either
  ``description`` (one explanation) or ``explanations`` (a feature's list of them, each with its
  ``description``: one label each, the best-scored one shown). An explanation's score: its ``score``, or
  the mean ``value`` of its ``scores`` entries (``{explanationScoreTypeName, value}`` objects or numbers) —
  of the entries of ``score_type`` when given, which a list of several score types needs (a fuzz score and
  a recall score are not on one scale).
- delphi explanation files: a folder (or one file) of ``<module>_latent<N>.txt`` files whose content is
  the explanation (a JSON string or plain text), e.g. ``layers.6_latent123.txt``.
- CSV with a header: ``feature_id,label`` (+ optional ``score``, ``source``, ``sae``, ``layer``, ``stream``).

Each parser yields :class:`LabelRow` values; ``hook`` is the (layer, stream) a row names when the
format says (Neuronpedia's ``layer`` field, delphi's module name, CSV columns), else None.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa

from catalog.db import Catalog
from catalog.errors import CatalogError, LabelFileError
from catalog.writes import SAEInfo, append_rows, sae_keys, transaction

FORMATS = ("neuronpedia", "delphi", "csv")
STREAMS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
DELPHI_NAME = re.compile(r"^(?P<module>.+)_latent(?P<index>[0-9]+)\.txt$")


@dataclass(frozen=True)
class LabelRow:
    feature_id: int
    label: str
    source: str
    score: float | None = None
    hook: tuple[int, str] | None = None
    sae: str | None = None  # the SAE a CSV row names (its ``sae`` column), checked against the import's SAE
    where: str = ""  # where the row is: file:line, or a delphi file's name (for messages)


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir() or DELPHI_NAME.match(path.name):
        return "delphi"
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return "neuronpedia"
    if name.endswith(".csv"):
        return "csv"
    raise CatalogError("format", f"cannot tell the label format of {path.name}; pass --format one of {', '.join(FORMATS)}")


ASCII_INT = re.compile(r"[0-9]{1,10}")  # Python's int() also reads "٥", "²" and "1_0": a file's ids must not
RESERVED_SOURCES = ("lite",)  # labels the catalog makes itself (calibrate): an import must not replace them


def _index(value: object, where: str, field: str, what: str) -> int:
    """A non-negative integer below 2^31 written in ASCII digits (an int, or its decimal text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < 2**31:
            return value
        text = "a number out of range"  # str() of a 5,000-digit int raises: do not print it
    else:
        text = value.strip() if isinstance(value, str) else repr(value)
        if ASCII_INT.fullmatch(text) and int(text) < 2**31:
            return int(text)
        text = repr(text if len(text) <= 40 else text[:40] + "…")
    raise CatalogError(field, f"{where}: expected {what}, an integer in [0, 2^31) in ASCII digits, got {text}")


def _feature(value: object, where: str) -> int:
    return _index(value, where, "feature_id", "a feature index")


def _score(value: object, where: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise CatalogError("score", f"{where}: expected a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(score):
        raise CatalogError("score", f"{where}: expected a finite number, got {value!r}")
    return score


def _label(value: object, where: str) -> str:
    """A label's text: non-empty and encodable (no lone surrogate from a JSON ``\\ud800`` escape)."""
    label = (value or "").strip() if isinstance(value, str) else ""
    if not label:
        raise CatalogError("label", f"{where}: empty label")
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        raise CatalogError("label", f"{where}: not valid Unicode text (a lone surrogate)") from None
    return label


def _source(value: object, where: str, default: str) -> str:
    source = (value or "").strip() if isinstance(value, str) else ""
    if source in RESERVED_SOURCES:
        raise CatalogError("source", f"{where}: source {source!r} is reserved for the labels calibrate makes")
    return source or default


def neuronpedia_hook(sae_name: str) -> tuple[int, str] | None:
    """Neuronpedia SAE ids look like ``6-res-jb``, ``8-att-kk``, ``20-gemmascope-res-16k``."""
    match = re.match(r"^(\d+)-(.*)$", sae_name or "")
    if not match:
        return None
    rest = match.group(2)
    stream = ("attn_out" if re.search(r"\batt", rest) else "mlp_out" if "mlp" in rest
              else "resid_post" if "resid_post" in rest or "res_post" in rest else "resid_pre")
    return int(match.group(1)), stream


DELPHI_MODULES = ("layers.N (block N's output: resid_post of N, the same as resid_pre of N+1)", "layers.N.mlp",
                  "layers.N.self_attn (or .attn, .attention)",
                  "blocks.N.hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out (TransformerLens)")
TL_MODULE = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)$")


def delphi_hook(module: str) -> tuple[int, str] | None:
    """The hook a delphi/sparsify module name reads (:data:`DELPHI_MODULES`); None for another name."""
    tl = TL_MODULE.search(module)
    if tl:
        return int(tl.group(1)), tl.group(2)
    match = re.search(r"(?:layers|h|layer)\.(\d+)(?:\.(\w+))?$", module)
    if not match:
        return None
    sub = match.group(2) or ""
    stream = "mlp_out" if "mlp" in sub else "attn_out" if "attn" in sub or "attention" in sub else "resid_post"
    return int(match.group(1)), stream


def _sae_name(value: object, where: str) -> str:
    """Neuronpedia's ``layer`` field (the SAE id, e.g. ``6-res-jb``); a bare number names no hook, as before."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(_index(value, where, 'layer', 'a layer'))
    raise CatalogError("layer", f"{where}: expected an SAE id such as '6-res-jb', got {type(value).__name__}")


def _json(text: str, where: str, what: str) -> object:
    """``text`` parsed as JSON, or a one-line error naming the file and place."""
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number of more digits than int() takes
        raise CatalogError("file", f"{where} is not {what} ({getattr(exc, 'msg', exc)})") from None
    except RecursionError:
        raise CatalogError("file", f"{where} is nested too deeply") from None


def _read(path: Path, opener: Callable[..., IO[str]] = open) -> str:
    """A label file's text (UTF-8; a byte-order mark dropped), or a one-line error naming ``file``: not
    UTF-8, a damaged gzip file, unreadable."""
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise CatalogError("file", f"{path.name}: not UTF-8 text (byte {exc.start})") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a cut file: EOFError
        raise CatalogError("file", f"{path.name} cannot be read ({exc})") from None


def parse_neuronpedia(path: Path, score_type: str | None = None) -> list[LabelRow]:
    rows: list[LabelRow] = []
    types: set[str] = set()
    text = _read(path, gzip.open if path.name.endswith(".gz") else open)
    # newlines only: JSON writes U+2028 and other line breaks str.splitlines knows raw inside strings
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if text.lstrip().startswith("["):  # a JSON array export
        lines = [json.dumps(o) for o in _json(text, path.name, "a JSON array")]
    elif (whole := _one_object(text)) is not None:  # one object over several lines (pretty-printed), not JSONL
        lines = [json.dumps(whole)]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        obj = _json(line, where, "JSON")
        explanations = [obj] if isinstance(obj, dict) and "description" in obj else \
            obj.get("explanations") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or "index" not in obj or not isinstance(explanations, list) or not all(
                isinstance(e, dict) and isinstance(e.get("description"), str) for e in explanations):
            raise CatalogError("file", f"{where}: expected Neuronpedia fields index and description (an "
                                       "explanation), or index and explanations (a feature's list of them)")
        feature, hook = _feature(obj["index"], where), neuronpedia_hook(_sae_name(obj.get("layer"), where))
        rows.extend(LabelRow(feature, _label(e["description"], where), "neuronpedia",
                             _explanation_score(e, where, score_type), hook, where=where) for e in explanations)
        types.update(_score_types(explanations))
    if score_type is not None and score_type not in types:  # a typo would import every label unscored
        raise CatalogError("score_type", f"{path.name} has no score of type {score_type!r}; its score types: "
                                         f"{', '.join(sorted(types)) or 'none'}")
    if score_type is None and len(types) > 1:  # explanations scored on other scales: "the best" means nothing
        raise CatalogError("score_type", f"{path.name}: its explanations are scored by several types "
                                         f"({', '.join(sorted(types))}); choose the one a label's score is read "
                                         "from with score_type")
    return rows


def _score_types(explanations: list[dict]) -> set[str]:
    """The score types (``explanationScoreTypeName``) of explanations' ``scores`` entries."""
    return {e[SCORE_TYPE_KEY] for x in explanations if isinstance(x.get("scores"), list)
            for e in x["scores"] if isinstance(e, dict) and isinstance(e.get(SCORE_TYPE_KEY), str)}


SCORE_TYPE_KEY = "explanationScoreTypeName"  # a Neuronpedia score entry's scorer (eleuther_fuzz, recall_alt, …)


def _explanation_score(explanation: dict, where: str, score_type: str | None) -> float | None:
    """A Neuronpedia explanation's score: its ``score``, else the mean value of its ``scores`` entries —
    only those of ``score_type`` when given (None when it has none). Entries of several types without
    ``score_type`` are refused, naming the types: averaging scorers of other scales means nothing."""
    if score_type is None and explanation.get("score") not in (None, ""):
        return _score(explanation["score"], where)
    entries = explanation.get("scores")
    if not isinstance(entries, list):
        return None
    typed = [(e.get(SCORE_TYPE_KEY), e.get("value")) if isinstance(e, dict) else (None, e) for e in entries]
    if score_type is not None:
        typed = [(t, v) for t, v in typed if t == score_type]
    elif len({t for t, _ in typed}) > 1:
        names = ", ".join(sorted({str(t) if t is not None else "untyped numbers" for t, _ in typed}))
        raise CatalogError("score_type", f"{where}: scores of several types ({names}); choose the one a label's "
                                         "score is read from with score_type")
    values = [s for s in (_score(v, where) for _, v in typed) if s is not None]
    return math.fsum(values) / len(values) if values else None


def _one_object(text: str) -> dict | None:
    """A Neuronpedia file's whole text as one JSON object, where it is one written over several lines (a
    pretty-printed explanation: read line by line as JSONL, its first line alone is "not JSON"); else None."""
    body = text.strip()
    if not body.startswith("{") or "\n" not in body:
        return None
    try:
        whole = json.loads(body)
    except (ValueError, RecursionError):  # JSONL (several objects), or broken: the line reader says where
        return None
    return whole if isinstance(whole, dict) else None


def parse_delphi(path: Path) -> list[LabelRow]:
    files = sorted(f for f in path.glob("*.txt") if f.is_file()) if path.is_dir() else [path]
    rows = []
    for file in files:
        match = DELPHI_NAME.match(file.name)
        if not match:
            continue
        raw = _read(file).strip()
        try:
            label = json.loads(raw)
        except (ValueError, RecursionError):  # not a JSON string: the text itself
            label = raw
        if not isinstance(label, str) or not label.strip():
            raise CatalogError("file", f"{file.name}: expected an explanation string")
        rows.append(LabelRow(_feature(match.group("index"), file.name), _label(label, file.name), "delphi", None,
                             delphi_hook(match.group("module")), where=file.name))
    if not rows:
        raise CatalogError("file", f"no delphi explanation files (<module>_latent<N>.txt) in {path}")
    return rows


def parse_csv(path: Path) -> list[LabelRow]:
    try:
        return _parse_csv(path)
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
        raise CatalogError("file", f"{path.name}: not a readable CSV table ({exc})") from None
    except UnicodeDecodeError as exc:
        raise CatalogError("file", f"{path.name}: not UTF-8 text (byte {exc.start})") from None


def _parse_csv(path: Path) -> list[LabelRow]:
    with path.open(newline="", encoding="utf-8-sig") as fh:  # a byte-order mark (Excel writes one) dropped
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"feature_id", "label"} <= set(reader.fieldnames):
            raise CatalogError("file", f"{path.name}: expected a header with feature_id,label[,score,source,sae,layer,"
                                       "stream]; "
                               f"got {', '.join(reader.fieldnames) if reader.fieldnames else 'an empty file'}")
        rows = []
        for number, rec in enumerate(reader, 2):
            where = f"{path.name}:{number}"
            hook = None
            has_layer, has_stream = rec.get("layer") not in (None, ""), bool(rec.get("stream"))
            if has_layer != has_stream:
                raise CatalogError("stream" if has_layer else "layer", f"{where}: give layer and stream together "
                                                                       "(or neither: then --layer and --stream)")
            if has_layer and has_stream:
                layer_index = _index(rec["layer"], where, "layer", "a layer")
                if rec["stream"] not in STREAMS:
                    raise CatalogError("stream", f"{where}: expected one of {', '.join(STREAMS)}, got {rec['stream']!r}")
                hook = (layer_index, rec["stream"])
            rows.append(LabelRow(_feature(rec["feature_id"], where), _label(rec.get("label"), where),
                                 _source(rec.get("source"), where, "csv"), _score(rec.get("score"), where), hook,
                                 (rec.get("sae") or "").strip() or None, where))
    return rows


def parse(path: str | Path, fmt: str | None = None, score_type: str | None = None) -> list[LabelRow]:
    file = Path(path)
    if not file.exists():
        raise CatalogError("file", f"{file} does not exist")
    fmt = fmt or detect_format(file)
    if fmt not in FORMATS:
        raise CatalogError("format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if score_type is not None and fmt != "neuronpedia":
        raise CatalogError("score_type", f"only Neuronpedia files have typed scores; a {fmt} file's score is its own")
    try:
        if fmt == "neuronpedia":
            return parse_neuronpedia(file, score_type)
        return {"delphi": parse_delphi, "csv": parse_csv}[fmt](file)
    except LabelFileError:
        raise
    except CatalogError as exc:  # every parser error is about the file's content
        raise LabelFileError(exc.field, exc.message) from None


def write_labels(catalog: Catalog, groups: Sequence[tuple[SAEInfo, pa.Table]], replace: Sequence[str] | None = None,
                 calibration_id: int | None = None) -> tuple[int, int]:
    """Import labels (feature_id int, label str, source str, score float|null) for one or more SAEs,
    all in one transaction (a bad group leaves nothing behind). Importing a source again replaces that
    source's labels for the SAE rather than adding duplicates: ``replace`` names the sources to clear
    (default: the sources present in the rows). ``calibration_id``: the calibration the labels were
    made from (lite labels: they depend on its model), whose labels of those sources they replace;
    None for imported labels, which belong to the SAE. Returns the labels written and those replaced."""
    total = replaced = 0
    with transaction(catalog, "importing labels") as con:
        for sae, rows in groups:
            (key,) = sae_keys(con, [sae])
            sources = list(replace) if replace is not None else sorted(set(rows.column("source").to_pylist()))
            if sources:
                (gone,) = con.execute("DELETE FROM labels WHERE sae_key = ? AND list_contains(?, source) "
                                      "AND calibration_id IS NOT DISTINCT FROM ?", [key, sources, calibration_id]
                                      ).fetchone()
                replaced += gone
            cal = {} if calibration_id is None else {"calibration_id": calibration_id}
            append_rows(con, "labels", rows.select(["feature_id", "label", "source", "score"]), sae_key=key, **cal)
            total += rows.num_rows
    return total, replaced
