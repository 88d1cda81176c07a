"""``python -m sae_discover``: discovery by default (the seed's flags), catalog work as subcommands.

    python -m sae_discover --prompt "..." --generate true --gen_tokens 128 --layers 22 28 --out r.json
    python -m sae_discover --prompts_file prompts.jsonl --out results.jsonl
    python -m sae_discover calibrate [--corpus FILE] [--model M --sae S]
    python -m sae_discover runs [list | show RUN_ID | rank RUN_ID --score_mode max ...]
    python -m sae_discover sql "SELECT ..."

The option flags are generated from the request model (:func:`sae_discover.request.options`): names,
defaults, choices and help are written once, there. Errors print one line
(``error: <field>: <what was expected>``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

from catalog import runs, sandbox
from catalog.db import Catalog
from catalog.ranking import RankOptions
from sae_discover.drift import drift_report, write_report
from sae_discover.drift import table as drift_table
from sae_discover.drift.request import DRIFT_FIELDS, DriftRequest
from sae_discover.errors import USER_ERRORS, CatalogLocked, RequestError
from sae_discover.inputs import read_lines
from sae_discover.output import table, write_result
from sae_discover.registry import Registry
from sae_discover.request import FIELD_NAMES, DiscoverRequest, Option, build_request, options
from sae_discover.stored import rerank, show_run

SUBCOMMANDS = ("calibrate", "runs", "sql", "labels", "drift", "serve")
RUN_ID = re.compile(r"^[0-9a-f]{8,64}$")
LIST_FLAGS = {"restrict_features": "*"}  # other list options take one or more values


def _help(opt: Option) -> str:
    text = opt.help
    if opt.choices:
        text += f"; one of {', '.join(opt.choices)}"
    text += f" (default: {opt.shown_default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_options(parser: argparse.ArgumentParser, opts: list[Option], skip: tuple[str, ...] = ()) -> None:
    """One flag per option, generated from the request model. Values arrive as strings (validated by the
    request model, so a bad value is a one-line error naming the field); an absent flag is None."""
    for opt in opts:
        if opt.name in skip:
            continue
        nargs = LIST_FLAGS.get(opt.name, "+") if opt.kind in ("int_list", "choice_list", "list") else None
        parser.add_argument(opt.flag, dest=opt.name, nargs=nargs, help=_help(opt),
                            metavar=opt.name.upper() if opt.kind not in ("choice", "bool") else
                            ("true|false" if opt.kind == "bool" else "{" + ",".join(opt.choices) + "}"))


def _common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    parser.add_argument("--db", help="catalog file (default: $SAE_DISCOVER_DB or ./sae_catalog.duckdb)")
    parser.add_argument("--registry", help="registry TOML (default: ./sae-discover.toml if present)")
    if model:
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                            help="model device (default: auto)")
        parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                            help="model dtype; SAE math is always fp32 (default: float32)")


def _output_flags(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--out", help=f"write {what} here (.json, .csv; .jsonl in batch mode)")
    parser.add_argument("--format", choices=["json", "csv"], help="output format (default: by --out extension)")


def discover_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sae_discover",
                                description="Find the SAE features a model used on a prompt or text.",
                                epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (python -m sae_discover SUB --help)")
    add_options(p, options(DiscoverRequest), skip=("id",))
    p.add_argument("--prompts_file", help="JSONL: one object per line with prompt or text (+ overrides, id)")
    p.add_argument("--workers", type=int, default=1, help="batch mode: model worker processes feeding one writer")
    _output_flags(p)
    _common(p)
    return p


def _fields(ns: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def _discovery(ns: argparse.Namespace):
    from sae_discover.service import Discovery  # loads torch: only commands that run a model import it

    return Discovery(Catalog(ns.db), Registry.load(ns.registry), device=ns.device, dtype=ns.dtype)


def cmd_discover(argv: list[str]) -> int:
    ns = discover_parser().parse_args(argv)
    fields = _fields(ns, FIELD_NAMES)
    if ns.prompts_file:
        from sae_discover.batch import run_batch  # loads torch (the service)

        lines = read_lines(ns.prompts_file)
        out, n_err = run_batch(_discovery(ns), lines, fields, ns.out or "results/discover_batch.jsonl",
                               workers=ns.workers or 1)
        print(f"wrote {out} ({len(lines)} lines, {n_err} errors)")
        return 0
    req = build_request(fields)
    result = _discovery(ns).discover(req)
    print(table(result))
    if ns.out:
        print(f"wrote {write_result(result, ns.out, ns.format)}")
    return 0


def cmd_calibrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover calibrate",
                                description="Per-feature P95/mean/max/density over a calibration corpus, in the catalog.")
    p.add_argument("--model", dest="model_id", default="demo", help="model (default: demo)")
    p.add_argument("--sae", dest="sae_id", default="demo", help="SAE source (default: demo)")
    p.add_argument("--corpus", help="one document per line (text or JSONL with 'text'); default: the registry's")
    p.add_argument("--layers", nargs="+", type=int, help="only the SAEs of these layers (default: all)")
    p.add_argument("--streams", nargs="+", help="only the SAEs of these streams (default: all)")
    p.add_argument("--no_lite_labels", action="store_true", help="skip the lite proto-labels")
    _common(p)
    ns = p.parse_args(argv)
    disc = _discovery(ns)
    entry = disc.registry.model(ns.model_id, True)
    corpus = ns.corpus or entry.calibration_corpus
    if not corpus:
        raise RequestError("corpus", "this model has no default calibration corpus; pass --corpus FILE")
    source = disc.loaders.source(ns.sae_id)
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
    p.add_argument("--limit", type=int, default=50, help="runs listed (default: 50)")
    add_options(p, options(RankOptions))
    _output_flags(p)
    _common(p, model=False)
    ns = p.parse_args(argv)
    catalog = Catalog(ns.db)
    if ns.action == "list":
        rows, _ = runs.list_runs(catalog, ns.limit, 0)
        for r in rows:
            cells = [str(r[k]) for k in ("run_id", "model_id", "sae_id", "mode", "n_kept", "n_tokens", "created_at")]
            print("\t".join([*cells, json.dumps(str(r["prompt"] if r["prompt"] is not None else r["text"])[:60])]))
        return 0
    if not ns.run_id:
        raise RequestError("run_id", f"runs {ns.action} needs a RUN_ID")
    if ns.action == "show":
        print(json.dumps(show_run(catalog, ns.run_id), indent=2, default=str))
        return 0
    result = rerank(catalog, ns.run_id, _fields(ns, tuple(o.name for o in options(RankOptions))))
    print(table(result))
    if ns.out:
        print(f"wrote {write_result(result, ns.out, ns.format)}")
    return 0


def cmd_sql(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover sql", description="Read-only SQL over the catalog.")
    p.add_argument("query")
    p.add_argument("--db", help="catalog file (default: $SAE_DISCOVER_DB or ./sae_catalog.duckdb)")
    p.add_argument("--format", choices=["tsv", "json"], default="tsv", help="output format (default: tsv)")
    ns = p.parse_args(argv)
    columns, rows = sandbox.run_user_sql(ns.db, ns.query)
    if columns is None:
        return 0
    if ns.format == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str))
    else:
        print("\t".join(columns))
        for r in rows:
            print("\t".join("" if v is None else str(v) for v in r))
    return 0


def cmd_labels(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_discover labels",
                                description="Import AutoInterp label tables (Neuronpedia JSONL[.gz], delphi, CSV).")
    p.add_argument("action", choices=["import"])
    p.add_argument("file")
    p.add_argument("--sae", dest="sae_id", default="demo", help="the SAE source the labels belong to (default: demo)")
    p.add_argument("--format", choices=["neuronpedia", "delphi", "csv"], help="default: from the file name")
    p.add_argument("--layer", type=int, help="the hook the labels belong to (default: from the file)")
    p.add_argument("--stream", help="with --layer")
    _common(p, model=False)
    ns = p.parse_args(argv)
    from sae_discover.labels import import_labels  # reads SAE configs (ingest loads torch)
    from sae_discover.loaders import Loaders

    source = Loaders(Registry.load(ns.registry)).source(ns.sae_id)
    print(json.dumps(import_labels(Catalog(ns.db), source, ns.file, ns.format, ns.layer, ns.stream)))
    return 0


def drift_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_discover drift",
        description="Compare the SAE features of two models (base vs tuned) on the same prompts: aggregate scores, "
                    "ranks, Jaccard@K, Spearman and flagged features (gained, lost, shifted).")
    add_options(p, options(DriftRequest), skip=("prompts",))
    p.add_argument("--prompts_file", help="JSONL: one object per line with prompt or text (+ optional id, run options)")
    _output_flags(p, "the report")
    _common(p)
    return p


def _cli_runs(tokens: list[str] | None) -> list[str] | str | None:
    """Run ids, or the words of one SQL filter over v_runs."""
    if not tokens:
        return None
    if all(RUN_ID.match(t) for t in tokens):
        return tokens
    return " ".join(tokens)


def drift_fields(ns: argparse.Namespace) -> dict:
    """The request fields of a parsed ``drift`` command line (the prompts file read in)."""
    data = _fields(ns, tuple(n for n in DRIFT_FIELDS if n not in ("prompts", "base_runs", "tuned_runs")))
    data["base_runs"], data["tuned_runs"] = _cli_runs(ns.base_runs), _cli_runs(ns.tuned_runs)
    if ns.prompts_file:
        prompts = []
        for number, obj in read_lines(ns.prompts_file):
            if isinstance(obj, str):
                raise RequestError("prompts_file", obj)
            prompts.append({"id": str(number), **obj})
        if not prompts:
            raise RequestError("prompts_file", f"{ns.prompts_file} holds no prompts")
        data["prompts"] = prompts
    return {k: v for k, v in data.items() if v is not None}


def cmd_drift(argv: list[str]) -> int:
    ns = drift_parser().parse_args(argv)
    fields = drift_fields(ns)
    source = _discovery(ns) if "prompts" in fields else Catalog(ns.db)  # stored runs only: no model, no torch
    report = drift_report(source, fields, progress=True)
    print(drift_table(report))
    if ns.out:
        print(f"wrote {write_report(report, ns.out, ns.format)}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    from api.settings import ApiSettings  # the server's modules load only for this command

    p = argparse.ArgumentParser(prog="python -m sae_discover serve",
                                description="The HTTP API (Litestar + uvicorn, one worker process: it holds the catalog). "
                                            "Limits default to $SAE_DISCOVER_API_<NAME>, else api/settings.py.")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = ApiSettings.limit_types()
    for name, kind in limits.items():
        p.add_argument(f"--{name}", type=kind, help=f"(default: {getattr(ApiSettings(), name)})")
    _common(p)
    ns = p.parse_args(argv)
    import uvicorn  # the server's own dependencies, only for this command

    from api.app import create_app  # (as above)

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ApiSettings.from_env(**{k: getattr(ns, k) for k in (*limits, "device", "dtype")})
    app = create_app(ns.db, ns.registry, settings)  # opens (and holds) the catalog before binding the port
    uvicorn.run(app, host=ns.host, port=ns.port, workers=1, log_level=ns.log_level)
    return 0


COMMANDS = {"calibrate": cmd_calibrate, "runs": cmd_runs, "sql": cmd_sql, "labels": cmd_labels, "drift": cmd_drift,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = COMMANDS.get(argv[0]) if argv else None
    try:
        return handler(argv[1:]) if handler else cmd_discover(argv)
    except CatalogLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (*USER_ERRORS, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
