"""Reading stored runs: look-ups by id, the one run listing (CLI ``runs list`` and ``GET /runs``), a
run's detail, model keys, and the health ping. Every read opens its own cursor (``Catalog.raw()``), so
concurrent readers never share a DuckDB connection."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import duckdb

from catalog.db import Catalog
from catalog.errors import CatalogError, UnknownRun

if TYPE_CHECKING:  # writes imports this module (its model look-up); the type alone is needed here
    from catalog.writes import SAEInfo

# what a run listing returns per run (GET /runs shows these; the CLI prints a few of them)
LIST_COLUMNS = ("run_id", "model_id", "sae_id", "mode", "prompt", "text", "generate", "gen_tokens", "seed",
                "created_at", "n_tokens", "n_kept", "layers", "streams", "attribution_target", "batch_id", "tags")
# columns stored as JSON text, and what an empty one reads as
JSON_COLUMNS = {"layers": "[]", "streams": "[]", "restrict_features": "[]", "timings": "{}"}
RUN_MODES = ("prompt+gen", "prompt", "text")
MIN_PREFIX = 6  # hex characters of a run id prefix (run ids are 24)
HEX = frozenset("0123456789abcdef")


def _decoded(row: dict) -> dict:
    """``row`` with its JSON text columns (:data:`JSON_COLUMNS`) as Python values."""
    for name, empty in JSON_COLUMNS.items():
        if name in row:
            row[name] = json.loads(row[name] or empty)
    return row


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def find_runs(catalog: Catalog, run_ids: Sequence[str]) -> dict[str, dict]:
    """The stored runs among ``run_ids`` (one query for a whole batch), by run_id."""
    if not run_ids:
        return {}
    con = catalog.raw()
    try:
        rows = _dicts(con.execute("SELECT * FROM runs WHERE list_contains(?, run_id)", [list(run_ids)]))
    finally:
        con.close()
    return {row["run_id"]: _decoded(row) for row in rows}


def find_run(catalog: Catalog, run_id: str) -> dict | None:
    return find_runs(catalog, [run_id]).get(run_id)


def run_saes(catalog: Catalog, run_key: int) -> list[dict]:
    """The ``saes`` rows a run was encoded with, by layer and stream."""
    con = catalog.raw()
    try:
        return _dicts(con.execute("SELECT s.* FROM run_saes rs JOIN saes s USING (sae_key) WHERE rs.run_key = ? "
                                  "ORDER BY s.layer, s.stream", [run_key]))
    finally:
        con.close()


def run_id_form(prefix: str) -> str | None:
    """``prefix`` as run ids are stored (lower-case hex), or None when it cannot be a run id or a prefix
    of one (fewer than :data:`MIN_PREFIX` characters, or not hex)."""
    value = str(prefix).strip().lower()
    return value if len(value) >= MIN_PREFIX and set(value) <= HEX else None


def resolve_run_id(catalog: Catalog, prefix: str) -> str:
    """The full id of the one stored run whose id starts with ``prefix`` (a whole id, or at least
    :data:`MIN_PREFIX` hex characters), so users can paste the short ids they see. No such run:
    :class:`UnknownRun`; no run id at all, or a prefix of several runs: :class:`CatalogError`."""
    value = run_id_form(prefix)
    if value is None:  # not a run id at all: a bad request, not a missing run
        raise CatalogError("run_id", f"expected a run id or a unique prefix of at least {MIN_PREFIX} hex characters, "
                                     f"got {prefix!r}")
    con = catalog.raw()
    try:
        found = [r[0] for r in con.execute("SELECT run_id FROM runs WHERE starts_with(run_id, ?) ORDER BY run_id "
                                           "LIMIT 3", [value]).fetchall()]
    finally:
        con.close()
    if not found:
        raise UnknownRun("run_id", f"no run {prefix!r} in {catalog.path}")
    if len(found) > 1:
        raise CatalogError("run_id", f"{prefix!r} is the prefix of several runs ({', '.join(found[:2])}, ...); "
                                     "give more characters")
    return found[0]


def run_texts(catalog: Catalog, run_keys: Sequence[int]) -> dict[int, dict]:
    """What each run analyzed, from its stored tokens (special tokens left out): ``text``, the whole
    sequence (prompt and continuation), and ``continuation``, the generated part (None when nothing
    was generated). One statement for a whole batch of runs."""
    if not run_keys:
        return {}
    con = catalog.raw()
    try:
        rows = con.execute(
            "SELECT run_key, string_agg(token, '' ORDER BY position) FILTER (WHERE NOT is_special), "
            "string_agg(token, '' ORDER BY position) FILTER (WHERE is_generated AND NOT is_special), "
            "bool_or(is_generated) FROM tokens WHERE list_contains(?, run_key) GROUP BY run_key",
            [list(run_keys)]).fetchall()
    finally:
        con.close()
    return {int(k): {"text": text or "", "continuation": (gen or "") if generated else None}
            for k, text, gen, generated in rows}


def _run_filter(model_id: str | None = None, sae_id: str | None = None, mode: str | None = None,
                tags: Sequence[tuple[str, str]] = (), batch_ids: Sequence[str] = ()) -> tuple[str, list]:
    """The WHERE clause (empty for no filter) and its parameters over ``v_runs`` for the filters of a
    listing, so that ``runs list`` and a selection of runs (:func:`select_run_ids`) mean the same runs."""
    if mode is not None and mode not in RUN_MODES:
        raise CatalogError("mode", f"expected one of {', '.join(RUN_MODES)}, got {mode!r}")
    where: list[str] = []
    params: list = []
    for name, value in (("model_id", model_id), ("sae_id", sae_id), ("mode", mode)):
        if value is not None:
            where.append(f"{name} = ?")
            params.append(value)
    for key, value in tags:
        where.append("tags[?] = ?")
        params.extend([key, value])
    if batch_ids:
        where.append("list_contains(?, batch_id)")
        params.append(list(batch_ids))
    return (f"WHERE {' AND '.join(where)}" if where else ""), params


def select_run_ids(catalog: Catalog, model_id: str | None = None, sae_id: str | None = None,
                   mode: str | None = None, tags: Sequence[tuple[str, str]] = (),
                   batch_ids: Sequence[str] = ()) -> list[str]:
    """The ids of every stored run that matches the filters of :func:`list_runs` (and ``batch_ids``: any
    of them), oldest first (a batch's runs in the order they were made): ``runs rank``'s selection."""
    clause, params = _run_filter(model_id, sae_id, mode, tags, batch_ids)
    con = catalog.raw()
    try:
        return [r[0] for r in con.execute(f"SELECT run_id FROM v_runs {clause} ORDER BY run_key", params).fetchall()]
    finally:
        con.close()


def list_runs(catalog: Catalog, limit: int, offset: int = 0, model_id: str | None = None,
              sae_id: str | None = None, mode: str | None = None,
              tags: Sequence[tuple[str, str]] = (), batch_ids: Sequence[str] = ()) -> tuple[list[dict], int]:
    """One page of stored runs, newest first (ties: the later run first), and the number of runs that
    match the filters (``tags``: (key, value) pairs the run must all carry; ``batch_ids``: any). Each row holds
    :data:`LIST_COLUMNS`; ``created_at`` names its time zone (the column is stored as a local
    TIMESTAMP), ``layers`` and ``streams`` are lists, ``tags`` a dict."""
    if limit < 0:
        raise CatalogError("limit", f"expected a non-negative integer, got {limit}")
    if offset < 0:
        raise CatalogError("offset", f"expected a non-negative integer, got {offset}")
    clause, params = _run_filter(model_id, sae_id, mode, tags, batch_ids)
    cols = ", ".join("created_at::TIMESTAMPTZ AS created_at" if c == "created_at" else c for c in LIST_COLUMNS)
    con = catalog.raw()
    try:
        (total,) = con.execute(f"SELECT count(*) FROM v_runs {clause}", params).fetchone()
        rows = _dicts(con.execute(f"SELECT {cols} FROM v_runs {clause} ORDER BY created_at DESC, run_key DESC "
                                  "LIMIT ? OFFSET ?", [*params, limit, offset]))
    finally:
        con.close()
    return [_decoded(r) for r in rows], int(total)


def run_detail(catalog: Catalog, run_id: str) -> dict | None:
    """A stored run's ``runs`` row plus its ``batch_id`` and ``tags`` — ``created_at`` with its time
    zone, the JSON columns (layers, streams, restrict_features, timings) decoded — plus ``saes``: the SAEs it was encoded with (as
    :func:`run_saes`), and ``analyzed_text`` / ``continuation`` (as :func:`run_texts`: the row's
    ``text`` is only the text a user sent); None when the catalog has no such run."""
    con = catalog.raw()
    try:
        rows = _dicts(con.execute("SELECT r.* REPLACE (r.created_at::TIMESTAMPTZ AS created_at), v.batch_id, v.tags "
                                  "FROM runs r JOIN v_runs v USING (run_key) WHERE r.run_id = ?", [run_id]))
    finally:
        con.close()
    if not rows:
        return None
    run = _decoded(rows[0])
    run["saes"] = run_saes(catalog, run["run_key"])
    analyzed = run_texts(catalog, [run["run_key"]]).get(run["run_key"], {"text": "", "continuation": None})
    run["analyzed_text"], run["continuation"] = analyzed["text"], analyzed["continuation"]
    return run


def model_key(source: Catalog | duckdb.DuckDBPyConnection, model_id: str, fingerprint: str) -> int | None:
    """The catalog key of a model (its id and weights fingerprint), or None when it has no row yet.
    ``source``: a catalog (a cursor of its own) or a cursor already open (e.g. inside a transaction)."""
    con = source.raw() if isinstance(source, Catalog) else source
    try:
        # fetchall, not fetchone: an unfinished result would block the cursor's next statement
        rows = con.execute("SELECT model_key FROM models WHERE model_id = ? AND fingerprint = ?",
                           [model_id, fingerprint]).fetchall()
    finally:
        if con is not source:
            con.close()
    return int(rows[0][0]) if rows else None


def held_sae_keys(con: duckdb.DuckDBPyConnection, saes: Sequence[SAEInfo]) -> list[int | None]:
    """The catalog key of each SAE (by id, hook and weights fingerprint; the first where several), None
    for one the catalog does not hold; a read, never a write."""
    found: dict[tuple, int] = {}
    for sae_id, layer, stream, fp, key in con.execute(
            "SELECT sae_id, layer, stream, fingerprint, sae_key FROM saes WHERE list_contains(?, sae_id) "
            "ORDER BY sae_key", [sorted({s.sae_id for s in saes})]).fetchall():
        found.setdefault((sae_id, layer, stream, fp), int(key))
    return [found.get((sae.sae_id, sae.layer, sae.stream, sae.fingerprint)) for sae in saes]


def sae_keys_of(catalog: Catalog, saes: Sequence[SAEInfo]) -> list[int]:
    """The catalog key of each SAE, all already stored (as they are for any stored run): :func:`held_sae_keys`,
    where an SAE the catalog does not hold is an error."""
    if not saes:
        return []
    con = catalog.raw()
    try:
        keys = held_sae_keys(con, saes)
    finally:
        con.close()
    for sae, key in zip(saes, keys, strict=True):
        if key is None:
            raise CatalogError("sae_id", f"no SAE {sae.sae_id!r} for layer {sae.layer} {sae.stream} with these "
                                         "weights in the catalog")
    return keys  # type: ignore[return-value]


def ping(catalog: Catalog) -> int:
    """A cheap read that fails when the catalog cannot answer (health checks); returns the number of runs."""
    con = catalog.raw()
    try:
        return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
    finally:
        con.close()
