"""``python -m sae_discover``: discovery by default (the seed's flags), catalog work as subcommands.

    python -m sae_discover --prompt "..." --generate true --gen_tokens 128 --layers 22 28 --out r.json
    python -m sae_discover --prompts_file prompts.jsonl --out results.jsonl
    python -m sae_discover calibrate [--corpus FILE] [--model M --sae S]
    python -m sae_discover runs [list | show RUN_ID | rank RUN_ID --score_mode max ...]
    python -m sae_discover sql "SELECT ..."

Errors print one line (``error: <field>: <what was expected>``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from catalog.db import Catalog, CatalogError, CatalogLocked
from sae_discover.registry import Registry
from sae_discover.request import FIELD_NAMES, RequestError, build_request

SUBCOMMANDS = ("calibrate", "runs", "sql", "labels", "drift", "serve")


class CLIError(Exception):
    pass


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", help="catalog file (default: $SAE_DISCOVER_DB or ./sae_catalog.duckdb)")
    parser.add_argument("--registry", help="registry TOML (default: ./sae-discover.toml if present)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _ranking_flags(parser: argparse.ArgumentParser, background: bool = True) -> None:
    parser.add_argument("--return_top_x")
    parser.add_argument("--score_mode")
    parser.add_argument("--min_coverage_pct")
    parser.add_argument("--merge_across_layers")
    parser.add_argument("--attach_examples")
    parser.add_argument("--attach_proto_labels")
    parser.add_argument("--tau")
    parser.add_argument("--tau_quantile")
    if background:  # a background is a run of its own: discovery only, not `runs rank`
        parser.add_argument("--background_text", help="selectivity's background text (default: the calibration mean)")
        parser.add_argument("--background_file", help="selectivity's background: a file, one document per line")
    parser.add_argument("--spans_per_feature")
    parser.add_argument("--span_window")
    parser.add_argument("--out", help="write the result here (.json, .csv; .jsonl in batch mode)")
    parser.add_argument("--format", choices=["json", "csv"], help="output format (default: by --out extension)")


def discover_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae_discover",
                                description="Find the SAE features a model used on a prompt or text.",
                                epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (python -m sae_discover SUB --help)")
    p.add_argument("--model", dest="model_id", help="registry id, local HF directory or hub id (default: demo)")
    p.add_argument("--sae", dest="sae_id", help="registry id or SAE folder (default: demo)")
    p.add_argument("--prompt")
    p.add_argument("--text")
    p.add_argument("--prompts_file", help="JSONL: one object per line with prompt or text (+ overrides, id)")
    p.add_argument("--workers", type=int, default=1, help="batch mode: model worker processes feeding one writer")
    p.add_argument("--generate")
    p.add_argument("--gen_tokens")
    p.add_argument("--layers", nargs="+")
    p.add_argument("--streams", nargs="+")
    p.add_argument("--restrict_features", nargs="*")
    p.add_argument("--topk_tokens_per_seq")
    p.add_argument("--token_proxy")
    p.add_argument("--seed")
    p.add_argument("--temperature")
    p.add_argument("--top_p")
    _ranking_flags(p)
    _common(p)
    return p


def _request_fields(ns: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(ns).items() if k in FIELD_NAMES and v is not None}


def _open(ns: argparse.Namespace, read_only: bool = False) -> Catalog:
    return Catalog(ns.db, read_only=read_only)


def _discovery(ns: argparse.Namespace):
    from sae_discover.service import Discovery  # torch is imported only by commands that need it

    return Discovery(_open(ns), Registry.load(ns.registry), device=ns.device, dtype=ns.dtype)


def cmd_discover(argv: list[str]) -> int:
    from sae_discover.output import table, write_result

    ns = discover_parser().parse_args(argv)
    if ns.prompts_file:
        from sae_discover.batch import run_batch

        return run_batch(ns, _request_fields(ns))
    req = build_request(_request_fields(ns))
    result = _discovery(ns).discover(req)
    print(table(result))
    if ns.out:
        print(f"wrote {write_result(result, ns.out, ns.format)}")
    return 0


def cmd_calibrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover calibrate",
                                description="Per-feature P95/mean/max/density over a calibration corpus, in the catalog.")
    p.add_argument("--model", dest="model_id", default="demo")
    p.add_argument("--sae", dest="sae_id", default="demo")
    p.add_argument("--corpus", help="one document per line (text or JSONL with 'text'); default: the registry's")
    p.add_argument("--layers", nargs="+", type=int)
    p.add_argument("--streams", nargs="+")
    p.add_argument("--no_lite_labels", action="store_true")
    _common(p)
    ns = p.parse_args(argv)
    disc = _discovery(ns)
    entry = disc.registry.model(ns.model_id, True)
    corpus = ns.corpus or entry.calibration_corpus
    if not corpus:
        raise RequestError("corpus", "this model has no default calibration corpus; pass --corpus FILE")
    source = disc.source(ns.sae_id)
    hooks = [h for h in sorted(source.hooks) if (ns.layers is None or h[0] in ns.layers)
             and (ns.streams is None or h[1] in ns.streams)]
    if not hooks:
        raise RequestError("layers", f"no SAE of {ns.sae_id!r} matches; it has {sorted(source.hooks)}")
    info = disc.calibrate(ns.model_id, ns.sae_id, corpus, hooks, lite_labels=not ns.no_lite_labels)
    print(json.dumps(info))
    return 0


def cmd_runs(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover runs", description="List, show or re-rank stored runs.")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "rank"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    _ranking_flags(p, background=False)
    _common(p)
    ns = p.parse_args(argv)
    if ns.action == "list":
        cat = _open(ns)
        con = cat.raw()
        rows = con.execute("SELECT run_id, model_id, sae_id, mode, n_kept, n_tokens, created_at, "
                           "coalesce(prompt, text) FROM v_runs ORDER BY created_at DESC LIMIT ?", [ns.limit]).fetchall()
        for r in rows:
            print("\t".join(str(x) if i < 7 else json.dumps(str(x)[:60]) for i, x in enumerate(r)))
        return 0
    if not ns.run_id:
        raise RequestError("run_id", f"runs {ns.action} needs a RUN_ID")
    from sae_discover.rerank import rerank, show_run

    cat = _open(ns)
    if ns.action == "show":
        print(json.dumps(show_run(cat, ns.run_id), indent=2, default=str))
        return 0
    from sae_discover.output import table, write_result

    result = rerank(cat, ns.run_id, _request_fields(ns))
    print(table(result))
    if ns.out:
        print(f"wrote {write_result(result, ns.out, ns.format)}")
    return 0


def cmd_sql(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover sql", description="Read-only SQL over the catalog.")
    p.add_argument("query")
    p.add_argument("--db")
    p.add_argument("--format", choices=["tsv", "json"], default="tsv")
    ns = p.parse_args(argv)
    import duckdb

    from catalog.db import default_path

    path = ns.db or default_path()
    if not Path(path).exists():
        raise RequestError("db", f"{path} does not exist")
    try:
        # read-only, and no files outside the catalog (no COPY TO, no read_csv of arbitrary paths)
        con = duckdb.connect(path, read_only=True, config={"enable_external_access": False})
    except duckdb.IOException as exc:
        raise CatalogLocked(f"catalog {path} is held by another process for writing; query it through that "
                            f"process or stop it ({exc})") from exc
    try:
        cur = con.execute(ns.query)
    except duckdb.InvalidInputException as exc:
        if "read-only" in str(exc):
            raise RequestError("query", "write statements are refused: the sql command is read-only") from exc
        raise RequestError("query", str(exc).splitlines()[0]) from exc
    except duckdb.Error as exc:
        raise RequestError("query", str(exc).splitlines()[0]) from exc
    if cur.description is None:
        return 0
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    if ns.format == "json":
        print(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], default=str))
    else:
        print("\t".join(cols))
        for r in rows:
            print("\t".join("" if v is None else str(v) for v in r))
    return 0


def cmd_labels(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover labels",
                                description="Import AutoInterp label tables (Neuronpedia JSONL[.gz], delphi, CSV).")
    p.add_argument("action", choices=["import"])
    p.add_argument("file")
    p.add_argument("--sae", dest="sae_id", default="demo")
    p.add_argument("--format", choices=["neuronpedia", "delphi", "csv"], help="default: from the file name")
    p.add_argument("--layer", type=int, help="the hook the labels belong to (default: from the file)")
    p.add_argument("--stream")
    _common(p)
    ns = p.parse_args(argv)
    info = _discovery(ns).import_labels(ns.file, ns.sae_id, ns.format, ns.layer, ns.stream)
    print(json.dumps(info))
    return 0


def cmd_drift(argv: list[str]) -> int:
    from sae_discover import drift

    p = drift.cli_parser()
    _common(p)
    ns = p.parse_args(argv)
    fields = drift.cli_fields(ns)
    source = _discovery(ns) if "prompts" in fields else _open(ns)  # stored runs only: no model, no torch
    report = drift.drift_report(source, fields, progress=True)
    print(drift.table(report))
    if ns.out:
        print(f"wrote {drift.write_report(report, ns.out, ns.format)}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover serve",
                                description="The HTTP API (Litestar + uvicorn, one worker process: it holds the catalog). "
                                            "Limits default to $SAE_DISCOVER_API_<NAME>, else api/settings.py.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    for name, kind in (("max_text_chars", int), ("max_gen_tokens", int), ("max_layers", int), ("max_return_top_x", int),
                       ("request_timeout_s", float), ("max_models", int), ("max_body_bytes", int)):
        p.add_argument(f"--{name}", type=kind)
    _common(p)
    ns = p.parse_args(argv)
    import logging

    import uvicorn

    from api.app import create_app
    from api.settings import ApiSettings

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ApiSettings.from_env(**{k: getattr(ns, k) for k in ("max_text_chars", "max_gen_tokens", "max_layers",
                                                                    "max_return_top_x", "request_timeout_s",
                                                                    "max_models", "max_body_bytes", "device", "dtype")})
    app = create_app(ns.db, ns.registry, settings)  # opens (and holds) the catalog before binding the port
    uvicorn.run(app, host=ns.host, port=ns.port, workers=1, log_level=ns.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"calibrate": cmd_calibrate, "runs": cmd_runs, "sql": cmd_sql, "labels": cmd_labels, "drift": cmd_drift,
                "serve": cmd_serve}
    handler = commands.get(argv[0]) if argv else None
    try:
        return handler(argv[1:]) if handler else cmd_discover(argv)
    except CatalogLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (RequestError, CatalogError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
