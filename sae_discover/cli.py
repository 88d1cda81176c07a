"""``python -m sae_discover``: discovery by default (the seed's flags), catalog work as subcommands.

    python -m sae_discover --prompt "..." --generate true --gen_tokens 128 --layers 22 28 --out r.json
    python -m sae_discover --prompts_file prompts.jsonl --out results.jsonl
    python -m sae_discover calibrate [--corpus FILE] [--model M --sae S]
    python -m sae_discover runs [list | show RUN_ID | rank RUN_ID... [--tag K=V] --score_mode max ...]
    python -m sae_discover sql "SELECT ..."
    python -m sae_discover feature show --sae demo --layer 2 --feature 126 [--format json]

The option flags are generated from the request model (:func:`sae_discover.request.options`): names,
defaults, choices and help are written once, there. Errors print one line
(``error: <field>: <what was expected>``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import sys
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from catalog import runs, sandbox
from catalog.db import Catalog, default_path
from catalog.errors import CatalogError, CatalogWarning, hooks_text
from ingest.options import STREAMS
from ingest.threads import MAX_DEFAULT_THREADS, SMALL_MODEL_PARAMS, available_cores
from sae_discover.drift import drift_report, write_report
from sae_discover.drift import table as drift_table
from sae_discover.drift import to_csv as drift_csv
from sae_discover.drift.request import DRIFT_FIELDS, DriftRequest
from sae_discover.errors import USER_ERRORS, CatalogLocked, RequestError
from sae_discover.features import FEATURE_OPTIONS, feature_text, show_feature
from sae_discover.inputs import file_lines, read_lines
from sae_discover.output import (
    out_format,
    render,
    render_runs,
    results_csv,
    table,
    tables,
    to_csv,
    write_result,
    write_results,
    write_runs,
)
from sae_discover.registry import Registry
from sae_discover.report import batch_report, drift_page, run_report, stored_report, write_html
from sae_discover.request import (
    FIELD_NAMES,
    INT32_MAX,
    RERANK_FIELDS,
    RERANK_OPTIONS,
    DiscoverRequest,
    Option,
    build_request,
    check_value,
    options,
    parse_bool,
    parse_tag_filter,
)
from sae_discover.stored import rerank, rerank_runs, select_runs, show_run

SUBCOMMANDS = ("calibrate", "runs", "sql", "labels", "drift", "serve", "feature", "ingest", "store")
MAX_WORKERS = 64  # model worker processes in batch mode
RUN_ID = re.compile(r"^[0-9a-f]{6,64}$")  # a run id or a prefix of one (catalog.runs.resolve_run_id)
HEX_WORD = re.compile(r"^[0-9a-fA-F]+$")
LIST_FLAGS = {"restrict_features": "*"}  # other list options take one or more values
ARGPARSE_FLAG = re.compile(r"^argument (?:-\w+/)?(?:--?)?(\w+)(?:/[^:]*)?: (.*)$")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--flag`` a parser and its subcommands' parsers take (what a mistyped flag may have meant)."""
    flags = [o for o in parser._option_string_actions if o.startswith("--")]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            flags += [f for sub in action.choices.values() for f in _flags(sub)]
    return flags


class Parser(argparse.ArgumentParser):
    """argparse with the house error line: ``error: <field>: <message> (see <prog> --help)``, exit 2,
    instead of the whole usage block. Flags are never abbreviated: ``--layer 2`` is an error, not ``--layers``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # a typo (--score_mod) is refused, not guessed at
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        match = ARGPARSE_FLAG.match(message)
        line = f"{match.group(1)}: {match.group(2)}" if match else message
        stray = message.removeprefix("unrecognized arguments: ").split()
        if message.startswith("unrecognized arguments: ") and stray and stray[0] in SUBCOMMANDS:  # `--db X runs list`
            at = ARGV.index(stray[0]) if stray[0] in ARGV else None  # the command line main() parses
            advice = [*ARGV[at:], *ARGV[:at]] if at is not None else [*stray, "<flags>"]
            line = (f"{stray[0]}: a subcommand comes first, its flags after it: python -m sae_discover "
                    f"{' '.join(advice)}")
        elif message.startswith("unrecognized arguments: ") and stray and stray[0].startswith("--"):
            flag = stray[0].split("=", 1)[0]
            near = difflib.get_close_matches(flag, _flags(self), 1)
            line = f"{flag.removeprefix('--')}: not an option{f'; did you mean {near[0]}?' if near else ''}"
        self.exit(2, f"error: {line} (see {self.prog} --help)\n")


def one_line(exc: BaseException) -> str:
    """An error's text on one line (a library's message, such as transformers' hub error, may span
    several): the CLI's errors are one ``error: field: message`` line."""
    return " ".join(str(exc).split())


def _help(opt: Option) -> str:
    text = opt.help
    if opt.choices:
        text += f"; {'STREAM ' if opt.kind == 'hook_list' else ''}one of {', '.join(opt.choices)}"
    if "(default:" not in text:  # some help texts say what their default means
        text += f" (default: {opt.shown_default})"
    return text.replace("%", "%%")  # argparse formats help with %


def _metavar(opt: Option) -> str:
    if opt.kind == "bool":
        return "true|false"
    if opt.kind in ("choice", "choice_list"):
        return "{" + ",".join(opt.choices) + "}"
    return "LAYER:STREAM" if opt.kind == "hook_list" else opt.name.upper()


def add_options(parser: argparse.ArgumentParser, opts: list[Option], skip: tuple[str, ...] = ()) -> None:
    """One flag per option, generated from the request model. Values arrive as strings (validated by the
    request model, so a bad value is a one-line error naming the field); an absent flag is None."""
    for opt in opts:
        if opt.name in skip:
            continue
        if opt.kind == "tags":  # KEY=VALUE words, commas allowed, the flag repeatable
            parser.add_argument(opt.flag, dest=opt.name, nargs="+", action="extend", help=_help(opt),
                                metavar="KEY=VALUE")
            continue
        nargs = LIST_FLAGS.get(opt.name, "+") if opt.kind in ("int_list", "choice_list", "hook_list", "list") else None
        parser.add_argument(opt.flag, dest=opt.name, nargs=nargs, help=_help(opt), metavar=_metavar(opt))


def _common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    parser.add_argument("--db", help="catalog file (default: $SAE_DISCOVER_DB or ./sae_catalog.duckdb)")
    parser.add_argument("--registry", help="registry TOML (default: ./sae-discover.toml if present)")
    parser.add_argument("--read_only", action="store_true",
                        help="open the catalog read-only: stored runs are answered, anything that would write "
                             "(a new run, a calibration, labels) is refused (default: only when the file or its "
                             "folder is not writable)")
    if model:
        _model_flags(parser)


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --threads: how this process runs a model."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="model device (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model dtype; SAE math is always fp32 (default: float32)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads, split between the --workers of commands that have them "
                             f"(default: 1 for models under {SMALL_MODEL_PARAMS // 1_000_000}M parameters, else the "
                             f"idle cores up to {MAX_DEFAULT_THREADS})")


def check_threads(threads: int | None) -> int | None:
    """``--threads``: at least 1, at most the cores this process may use (more would only wait for a core)."""
    cores = available_cores()
    if threads is not None and not 1 <= threads <= cores:
        raise RequestError("threads", f"expected an integer in [1, {cores}] (the CPU cores this process may use), "
                                      f"got {threads}")
    return threads


def _output_flags(parser: argparse.ArgumentParser, what: str = "the result", batch: bool = False) -> None:
    batch_out = "; .jsonl or .html in batch mode, default results/discover_batch.jsonl" if batch else ""
    batch_format = " (batch mode: the output file's format, json meaning jsonl)" if batch else ""
    parser.add_argument("--out", help=f"write {what} here (.json, .csv, .html: a report for the browser{batch_out}); "
                                      "the extension gives the format")
    parser.add_argument("--format", choices=["json", "csv", "html"],
                        help="alone: print the result in this format instead of the table; with --out: must agree "
                             f"with its extension{batch_format}")


OUT_FORMATS = ("json", "csv", "html")


def _html_writer(catalog: Catalog, write: Any, html_of: Any, csv_of: Any) -> Any:
    """``write`` for JSON and CSV; for HTML, the report ``html_of(catalog, result)`` written to the file.
    With no file (``out`` None: ``--format`` alone) the writer returns the text for standard output."""
    def writer(result: dict, out: str | None, fmt: str | None) -> Path | str:
        if out_format(out, fmt, OUT_FORMATS) == "html":
            html = html_of(catalog, result)
            return html if out is None else write_html(html, out)
        return render(result, fmt, csv_of) if out is None else write(result, out, fmt)
    return writer


def discover_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sae_discover",
                                description="Find the SAE features a model used on a prompt or text.",
                                epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (python -m sae_discover SUB --help)")
    add_options(p, options(DiscoverRequest), skip=("id",))
    p.add_argument("--prompts_file", help="JSONL: one object per line with prompt or text (+ overrides, id)")
    p.add_argument("--workers", type=int, default=1, help="batch mode: model worker processes feeding one writer")
    _output_flags(p, batch=True)
    _common(p)
    return p


def _fields(ns: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def _show(result: dict, ns: argparse.Namespace, as_table: Any, write: Any) -> int:
    """Print a result as a table; also write it to ``--out`` (as ``--format``) when given. ``--format``
    without ``--out`` prints the result in that format instead of the table (for a pipe or ``>``)."""
    if ns.format and not ns.out:
        text = write(result, None, ns.format)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    print(as_table(result))
    if ns.out:
        print(f"wrote {write(result, ns.out, ns.format)}")
    return 0


def _catalog(ns: argparse.Namespace, existing: bool = False) -> Catalog:
    """The catalog of ``--db``: read-only with ``--read_only``, else read-only only when it is not writable;
    with ``--store``, a pinned snapshot of that Delta store under the same relation names. ``existing``:
    for commands that only read stored runs, a file that is not there is an error naming ``db`` (a
    mistyped path would otherwise be created and read as an empty catalog)."""
    if getattr(ns, "store", None):
        from catalog.store import StoreCatalog  # deltalake (the scale extra): only --store imports it

        return StoreCatalog(ns.store)
    path = ns.db or default_path()
    if existing and path != ":memory:" and not Path(path).exists():
        raise CatalogError("db", f"{path} does not exist; a discovery or `calibrate` creates the catalog")
    return Catalog(ns.db, read_only=True if ns.read_only else None)


def port_number(value: str) -> int:
    """A ``--port`` value (argparse ``type``): a TCP port, refused before the server starts."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {value!r}")
    return port


# the optional dependencies of --store and --ray (pyproject's `scale` extra), imported only by them
SCALE_MODULES = ("deltalake", "ray")
def store_location(value: str) -> str:
    """A ``--store`` value (argparse ``type``): a folder or URI. Refused before anything runs: an empty
    one or the file system's root (the store's tables would be written at the top of the disk), and a
    local path that is a file or lies inside one."""
    text = value.strip()
    local = text.removeprefix("file://") if "://" not in text or text.startswith("file://") else None
    if not text or (local is not None and (not local or Path(local).resolve() == Path("/").resolve())):
        raise argparse.ArgumentTypeError(f"expected a folder or URI for the Delta store, got {value!r}")
    if local is not None:
        for path in (Path(local), *Path(local).parents):
            if path.exists() and not path.is_dir():
                raise argparse.ArgumentTypeError(f"{path} is a file, not a store folder")
    return text


STORE_HELP = "read a shared Delta store (path or URI, written by `ingest --store`) instead of --db"


def _discovery(ns: argparse.Namespace, catalog: Catalog | None = None):
    from sae_discover.service import Discovery  # loads torch: only commands that run a model import it

    return Discovery(catalog or _catalog(ns), Registry.load(ns.registry), device=ns.device, dtype=ns.dtype,
                     notify=lambda message: print(message, file=sys.stderr, flush=True), threads=check_threads(ns.threads))


def cmd_discover(argv: list[str]) -> int:
    ns = discover_parser().parse_args(argv)
    fields = _fields(ns, FIELD_NAMES)
    if ns.prompts_file:
        from sae_discover.batch import run_batch  # loads torch (the service)

        if not 1 <= ns.workers <= MAX_WORKERS:
            raise RequestError("workers", f"expected an integer in [1, {MAX_WORKERS}], got {ns.workers}")
        out = ns.out or f"results/discover_batch.{'html' if ns.format == 'html' else 'jsonl'}"
        if ns.format == "csv" or (ns.format == "json" and Path(out).suffix.lower() == ".html"):  # named as typed
            raise RequestError("format", f"a batch writes json (JSON Lines, .jsonl) or html; got {ns.format!r}"
                                         f"{' with --out ' + repr(out) if ns.format == 'json' else ''}")
        fmt = out_format(out, ns.format if ns.format != "json" else "jsonl", ("jsonl", "html"))
        # an HTML report of a batch is made from its JSONL, written next to it
        jsonl = Path(out).with_suffix(".jsonl") if fmt == "html" else out
        if Path(jsonl).resolve() == Path(ns.prompts_file).resolve():  # the results would replace the prompts
            raise RequestError("out", f"the results ({jsonl}{', written next to the HTML report' if fmt == 'html' else ''})"
                                      f" would replace the prompts file {ns.prompts_file}; give --out another name")
        lines = read_lines(ns.prompts_file)
        disc = _discovery(ns)
        out_path, n_err = run_batch(disc, lines, fields, jsonl, workers=ns.workers)
        print(f"wrote {out_path} ({len(lines)} lines, {len(lines) - n_err} ok, {n_err} failed)")
        if fmt == "html":
            results = [json.loads(line) for line in file_lines(Path(out_path).read_text()) if line.strip()]
            print(f"wrote {write_html(batch_report(disc.catalog, results), out)}")
        return 1 if n_err else 0  # any failed line: exit 1 (its error is in the output file)
    out_format(ns.out, ns.format, OUT_FORMATS)
    req = build_request(fields)
    disc = _discovery(ns)
    return _show(disc.discover(req), ns, functools.partial(table, by_hook=not req.merge_across_layers),
                 _html_writer(disc.catalog, write_result, run_report, to_csv))


def cmd_calibrate(argv: list[str]) -> int:
    p = Parser(prog="python -m sae_discover calibrate",
                                description="Per-feature P95 (of its nonzero activations, and of all tokens)/mean/max/density "
                                "over a calibration corpus, in the catalog.")
    p.add_argument("--model", dest="model_id", default="demo", help="model (default: demo)")
    p.add_argument("--sae", dest="sae_id", default="demo", help="SAE source (default: demo)")
    p.add_argument("--corpus", help="one document per line (text or JSONL with 'text'); default: the registry's")
    p.add_argument("--layers", nargs="+", type=int, help="only the SAEs of these layers (default: all)")
    p.add_argument("--streams", nargs="+", choices=STREAMS, help="only the SAEs of these streams (default: all)")
    p.add_argument("--no_lite_labels", action="store_true", help="skip the lite proto-labels")
    p.add_argument("--store", type=store_location,
                   help="calibrate into this shared Delta store instead of --db: corpus chunks computed by --workers "
                        "processes or --ray tasks, the statistics in SQL over the store")
    _scale_flags(p, "documents")
    _common(p)
    ns = p.parse_args(argv)
    _check_scale(ns)
    if ns.store:
        from sae_discover.loaders import Loaders  # loads torch: only commands that run a model import it

        loaders, disc = Loaders(Registry.load(ns.registry), ns.device, ns.dtype, threads=check_threads(ns.threads)), None
    else:
        disc = _discovery(ns)
        loaders = disc.loaders
    entry = loaders.registry.model(ns.model_id, True)
    corpus = ns.corpus or entry.calibration_corpus
    if not corpus:
        raise RequestError("corpus", "this model has no default calibration corpus; pass --corpus FILE")
    source = loaders.source(ns.sae_id)
    hooks = [h for h in sorted(source.hooks) if (ns.layers is None or h[0] in ns.layers)
             and (ns.streams is None or h[1] in ns.streams)]
    if not hooks:  # the flag to change: the streams when the layers alone would match
        layer_ok = ns.layers is None or any(layer in ns.layers for layer, _ in source.hooks)
        field = "streams" if ns.streams is not None and layer_ok else "layers"
        raise RequestError(field, f"no SAE of {ns.sae_id!r} matches; it has {hooks_text(source.hooks)}")
    if ns.layers is None and ns.streams is None:  # every SAE of the source: one deeper than the model says so
        from sae_discover.calibration import check_hooks  # loads torch (ingest): calibrate runs a model anyway

        check_hooks(ns.model_id, loaders.card(loaders.entry(ns.model_id)).n_layers, hooks, ns.sae_id)
    if disc is not None:
        info = disc.calibrate(ns.model_id, ns.sae_id, corpus, hooks, lite_labels=not ns.no_lite_labels, progress=True)
    else:
        from sae_discover.distributed import calibrate_store  # deltalake (the scale extra): only --store

        info = calibrate_store(ns.store, loaders, ns.model_id, ns.sae_id, corpus, hooks, _abs(ns.registry),
                               not ns.no_lite_labels, ns.workers, ns.ray, ns.chunk_size)
    for line in info["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print(json.dumps(info))
    return 0


def runs_parser() -> argparse.ArgumentParser:
    """``runs list | show | rank``: each action with its own flags (ranking options only where they apply)."""
    p = Parser(prog="python -m sae_discover runs", description="List, show or re-rank stored runs "
                                "(a run id may be shortened to a unique prefix of at least 6 hex characters).")
    sub = p.add_subparsers(dest="action", metavar="{list,show,rank,report}", required=True)
    ls = sub.add_parser("list", help="stored runs, newest first (default action)",
                        description="Stored runs, newest first, with the filters of GET /v1/runs.")
    _run_filters(ls)
    ls.add_argument("--limit", default="50", help="runs listed (default: 50)")
    ls.add_argument("--offset", default="0", help="runs skipped, newest first (default: 0)")
    ls.add_argument("--out", help="write the listing here (.json: the API's page, .csv, .jsonl: one run per line)")
    ls.add_argument("--format", choices=["json", "csv", "jsonl"],
                    help="print (or, with --out, write) in this format (default: a table; with --out, its extension)")
    show = sub.add_parser("show", help="one run as JSON: options, SAEs, timings, analyzed text",
                          description="One stored run as JSON (the API's GET /v1/runs/{run_id}).")
    show.add_argument("run_id", help="a run id or a unique prefix (at least 6 hex characters)")
    show.add_argument("--out", help="also write the JSON here (.json)")
    rank = sub.add_parser("rank", help="rank stored runs again (SQL only, no model, no new run)",
                          description="Rank stored runs again with other ranking options: SQL over their stored rows. "
                                      "Several runs (ids and/or the runs the filters select, as runs list does) are "
                                      "ranked together and print one result each (JSON: a list); background batch "
                                      "contrasts each with the others of its model and SAEs.")
    rank.add_argument("run_ids", nargs="*", metavar="RUN_ID",
                      help="run ids or unique prefixes (at least 6 hex characters)")
    _run_filters(rank, "also rank")
    add_options(rank, RERANK_OPTIONS)
    _output_flags(rank)
    report = sub.add_parser("report", help="a stored run as a self-contained HTML report (no model)",
                            description="A stored run as one HTML file for the browser: tokens with the selected "
                                        "feature's activations, the feature table, spans, calibration histograms, "
                                        "labels (the API's GET /v1/runs/{run_id}/report).")
    report.add_argument("run_id", help="a run id or a unique prefix (at least 6 hex characters)")
    add_options(report, RERANK_OPTIONS)
    report.add_argument("--out", required=True, help="the HTML file to write (.html)")
    for part in (ls, show, rank, report):
        _common(part, model=False)
        part.add_argument("--store", type=store_location, help=STORE_HELP)
    return p


def _run_filters(parser: argparse.ArgumentParser, verb: str = "only") -> None:
    """The filters of ``runs list``, also ``runs rank``'s selection (the same runs either way)."""
    parser.add_argument("--model", dest="model_id", help=f"{verb} runs of this model id (default: all)")
    parser.add_argument("--sae", dest="sae_id", help=f"{verb} runs of this SAE source id (default: all)")
    parser.add_argument("--mode", choices=runs.RUN_MODES, help=f"{verb} runs of this mode (default: all)")
    parser.add_argument("--tag", dest="tags", action="append", metavar="KEY=VALUE",
                        help=f"{verb} runs tagged KEY=VALUE (repeat: all of them; default: any)")
    parser.add_argument("--batch_id", dest="batch_ids", nargs="+", action="extend", metavar="ID",
                        help=f"{verb} runs whose batch_id (a batch line's or API body's id) is one of these")


def cmd_rank(catalog: Catalog, ns: argparse.Namespace) -> int:
    """``runs rank``: one run id alone as before (one result); several, or a selection, ranked together."""
    out_format(ns.out, ns.format, OUT_FORMATS)
    options = _fields(ns, RERANK_FIELDS)
    by_hook = not parse_bool("merge_across_layers", options.get("merge_across_layers", True))
    selection = {"tags": [parse_tag_filter("tag", t, "=") for t in ns.tags or []], "batch_ids": ns.batch_ids or [],
                 "model_id": ns.model_id, "sae_id": ns.sae_id, "mode": ns.mode}
    if len(ns.run_ids) == 1 and not any(selection.values()):
        try:
            result = rerank(catalog, ns.run_ids[0], options)
        except CatalogError as exc:  # the argument is run_ids, one id or several (an unknown or ambiguous id)
            raise type(exc)("run_ids" if exc.field == "run_id" else exc.field, exc.message) from None
        return _show(result, ns, functools.partial(table, by_hook=by_hook),
                     _html_writer(catalog, write_result, run_report, to_csv))
    results = rerank_runs(catalog, select_runs(catalog, ns.run_ids, **selection), options)
    return _show(results, ns, functools.partial(tables, by_hook=by_hook),
                 _html_writer(catalog, write_results, batch_report, results_csv))


def cmd_runs(argv: list[str]) -> int:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["list", *argv]  # ``runs`` alone lists
    ns = runs_parser().parse_args(argv)
    if ns.action == "list":  # the options checked first, then the catalog opened (each action below alike)
        fmt = out_format(ns.out, ns.format, ("json", "csv", "jsonl"))
        limit, offset = (check_value(Option(n, "int", 0, "", (low, INT32_MAX)), getattr(ns, n))
                         for n, low in (("limit", 1), ("offset", 0)))
        tags = [parse_tag_filter("tag", t, "=") for t in ns.tags or []]
        rows, total = runs.list_runs(_catalog(ns, existing=True), limit, offset, model_id=ns.model_id,
                                     sae_id=ns.sae_id, mode=ns.mode, tags=tags, batch_ids=ns.batch_ids or [])
        page = {"runs": rows, "total": total, "limit": limit, "offset": offset}
        if ns.out:
            print(f"wrote {write_runs(page, ns.out, fmt)}")
        else:
            sys.stdout.write(render_runs(page, fmt))
        return 0
    if ns.action == "show":
        out_format(ns.out, None, ("json",))
        text = json.dumps(show_run(_catalog(ns, existing=True), ns.run_id), indent=2, ensure_ascii=False, default=str)
        print(text)
        if ns.out:
            Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.out).write_text(text + "\n")
            print(f"wrote {ns.out}", file=sys.stderr)  # stdout stays one JSON document
        return 0
    if ns.action == "report":
        out_format(ns.out, None, ("html",))
        print(f"wrote {write_html(stored_report(_catalog(ns, existing=True), ns.run_id, _fields(ns, RERANK_FIELDS)), ns.out)}")
        return 0
    return cmd_rank(_catalog(ns, existing=True), ns)


def cmd_sql(argv: list[str]) -> int:
    p = Parser(prog="python -m sae_discover sql", description="Read-only SQL over the catalog.")
    p.add_argument("query")
    p.add_argument("--db", help="catalog file (default: $SAE_DISCOVER_DB or ./sae_catalog.duckdb)")
    p.add_argument("--store", type=store_location, help=STORE_HELP)
    p.add_argument("--format", choices=["tsv", "json"], default="tsv", help="output format (default: tsv)")
    p.add_argument("--memory_limit", default=sandbox.DEFAULT_MEMORY_LIMIT,
                   help=f"DuckDB memory limit for the query (default: {sandbox.DEFAULT_MEMORY_LIMIT})")
    p.add_argument("--timeout_s", type=float, default=sandbox.DEFAULT_TIMEOUT_S,
                   help=f"stop the query after this many seconds (default: {sandbox.DEFAULT_TIMEOUT_S:g})")
    ns = p.parse_args(argv)
    limits = sandbox.Limits(ns.memory_limit, ns.timeout_s)
    if ns.store:  # this process only runs the query: its memory is capped (cap_memory)
        from catalog.store import StoreCatalog  # deltalake (the scale extra): only --store imports it

        columns, rows = sandbox.run_user_sql(None, ns.query, limits, con=StoreCatalog(ns.store).raw(), cap_memory=True)
    else:
        columns, rows = sandbox.run_user_sql(ns.db, ns.query, limits, cap_memory=True)
    if columns is None:
        return 0
    if ns.format == "json":
        print(json.dumps([dict(zip(columns, map(sandbox.json_value, r), strict=True)) for r in rows]))
    else:
        print("\t".join(columns))
        for r in rows:
            print("\t".join(map(sandbox.text_value, r)))
    return 0


def cmd_feature(argv: list[str]) -> int:
    p = Parser(prog="python -m sae_discover feature",
               description="One feature across the stored runs (the API's GET /v1/features/{sae_id}/{layer}/{stream}/"
                           "{feature_id}): labels, calibration statistics and histogram, top contexts, the runs "
                           "where it was among the top features, the tokens its decoder promotes and suppresses.")
    p.add_argument("action", choices=["show"])
    add_options(p, FEATURE_OPTIONS)
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    _common(p, model=False)
    p.add_argument("--store", type=store_location, help=STORE_HELP)
    ns = p.parse_args(argv)
    view = show_feature(_catalog(ns, existing=True), _fields(ns, tuple(o.name for o in FEATURE_OPTIONS)))
    sys.stdout.write(json.dumps(view, ensure_ascii=False) + "\n" if ns.format == "json" else feature_text(view))
    return 0


def cmd_labels(argv: list[str]) -> int:
    p = Parser(prog="python -m sae_discover labels",
                                description="Import AutoInterp label tables (Neuronpedia JSONL[.gz], delphi, CSV).")
    p.add_argument("action", choices=["import"])
    p.add_argument("file")
    p.add_argument("--sae", dest="sae_id", default="demo", help="the SAE source the labels belong to (default: demo)")
    p.add_argument("--format", choices=["neuronpedia", "delphi", "csv"], help="default: from the file name")
    p.add_argument("--layer", type=int, help="the hook the labels belong to (default: from the file)")
    p.add_argument("--stream", help="with --layer")
    p.add_argument("--score_type", help="Neuronpedia: the score type (explanationScoreTypeName, e.g. eleuther_fuzz) "
                                        "whose values are a label's score; needed when explanations carry several")
    _common(p, model=False)
    ns = p.parse_args(argv)
    from sae_discover.labels import import_labels  # reads SAE configs (ingest loads torch)
    from sae_discover.loaders import Loaders

    source = Loaders(Registry.load(ns.registry)).source(ns.sae_id)
    print(json.dumps(import_labels(_catalog(ns), source, ns.file, ns.format, ns.layer, ns.stream, ns.score_type)))
    return 0


def drift_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sae_discover drift",
        description="Compare the SAE features of two models (base vs tuned) on the same prompts: aggregate scores, "
                    "ranks, Jaccard@K, Spearman and flagged features (gained, lost, shifted).")
    add_options(p, options(DriftRequest), skip=("prompts",))
    p.add_argument("--prompts_file", help="JSONL: one object per line with prompt or text (+ optional id, run options)")
    _output_flags(p, "the report")
    _common(p)
    p.add_argument("--store", type=store_location, help=f"{STORE_HELP} (stored runs: --base_runs/--tuned_runs)")
    return p


def _cli_runs(name: str, tokens: list[str] | None) -> list[str] | str | None:
    """Run ids, or the words of one SQL filter over v_runs. Words that are all hex digits are meant as
    run ids: one shorter than a run id prefix is refused (as a filter, ``4`` would select every run)."""
    if not tokens:
        return None
    if all(RUN_ID.match(t) for t in tokens):
        return tokens
    short = [t for t in tokens if HEX_WORD.match(t) and not RUN_ID.match(t)]
    if short and all(HEX_WORD.match(t) for t in tokens):
        raise RequestError(name, f"expected run ids or unique prefixes of at least 6 hex characters (or a SQL filter "
                                 f"over v_runs), got {short[0]!r}")
    return " ".join(tokens)


def drift_fields(ns: argparse.Namespace) -> dict:
    """The request fields of a parsed ``drift`` command line (the prompts file read in)."""
    data = _fields(ns, tuple(n for n in DRIFT_FIELDS if n not in ("prompts", "base_runs", "tuned_runs")))
    data["base_runs"], data["tuned_runs"] = _cli_runs("base_runs", ns.base_runs), _cli_runs("tuned_runs", ns.tuned_runs)
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
    out_format(ns.out, ns.format, OUT_FORMATS)
    source = _discovery(ns) if "prompts" in fields else _catalog(ns, existing=True)  # stored runs: no model, no torch
    return _show(drift_report(source, fields, progress=True, allow_sql_filter=True), ns, drift_table,
                 _html_writer(getattr(source, "catalog", source), write_report, lambda _, report: drift_page(report),
                              drift_csv))


def cmd_serve(argv: list[str]) -> int:
    from api.settings import ApiSettings  # the server's modules load only for this command

    p = Parser(prog="python -m sae_discover serve",
                                description="The HTTP API (Litestar + uvicorn, one worker process: it holds the catalog). "
                                            "Limits default to $SAE_DISCOVER_API_<NAME>, else api/settings.py.")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default: 8000)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    limits = ApiSettings.limit_types()
    for name, kind in limits.items():
        p.add_argument(f"--{name}", type=kind, help=f"(default: {getattr(ApiSettings(), name)})")
    p.add_argument("--enable_sql", action="store_true", default=None,
                   help="answer POST /v1/sql: read-only SQL over the catalog from any client that can reach the "
                        "server, in the sandbox of the sql command (off by default: README, SQL over HTTP)")
    _common(p)
    p.add_argument("--store", type=store_location,
                   help=f"{STORE_HELP}: a snapshot pinned at start, read-only (requests that would write answer 409 "
                        "naming store; restart to serve newer commits)")
    ns = p.parse_args(argv)
    import uvicorn  # the server's own dependencies, only for this command

    from api.app import create_app  # (as above)

    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_threads(ns.threads)
    settings = ApiSettings.from_env(**{k: getattr(ns, k) for k in (*limits, "device", "dtype", "threads",
                                                                   "enable_sql")})
    # opens (and holds) the catalog before binding the port
    app = create_app(ns.db, ns.registry, settings, read_only=True if ns.read_only else None, store=ns.store)
    uvicorn.run(app, host=ns.host, port=ns.port, workers=1, log_level=ns.log_level)
    return 0


def _scale_flags(parser: argparse.ArgumentParser, unit: str) -> None:
    """--ray, --workers, --chunk_size: how a store's job is cut and run (ingest, calibrate --store)."""
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run chunks on Ray workers (actors that keep the model loaded): on a cluster at ADDRESS, "
                             "or a local Ray with the flag alone"
                             + ("" if unit == "runs" else " (with --store)"))
    parser.add_argument("--workers", type=int, default=1, help="CPU tasks at once (Ray or local processes; default: 1)")
    default = "the runs over 2 chunks per worker, at most 64" if unit == "runs" else "64"
    parser.add_argument("--chunk_size", type=int, help=f"{unit} per chunk, one commit per table each (default: "
                                                       f"{default}; sae_discover.distributed)")


def _check_scale(ns: argparse.Namespace) -> None:
    """The --workers and --chunk_size bounds; --ray and --workers > 1 only where a store is written."""
    for name, top in (("workers", MAX_WORKERS), ("chunk_size", 100_000)):
        value = getattr(ns, name)
        if value is not None and not 1 <= value <= top:
            raise RequestError(name, f"expected an integer in [1, {top}], got {value}")
    if not getattr(ns, "store", None) and (ns.ray or ns.workers > 1 or ns.chunk_size):
        name = "ray" if ns.ray else "workers" if ns.workers > 1 else "chunk_size"
        raise RequestError(name, "only with --store (a local calibration runs in this process)")


def _abs(path: str | None) -> str | None:
    """A path workers can open wherever they start (a Ray worker's folder is not this one)."""
    return str(Path(path).resolve()) if path else None


def cmd_ingest(argv: list[str]) -> int:
    p = Parser(prog="python -m sae_discover ingest",
               description="Distributed ingest: a prompts file into a shared Delta store, in chunks committed "
                           "once each (rerun the same command to resume a job).")
    add_options(p, options(DiscoverRequest), skip=("id",))
    p.add_argument("--prompts_file", required=True, help="JSONL: one object per line with prompt or text (+ overrides, id)")
    p.add_argument("--store", type=store_location, required=True, help="the Delta store: a folder or URI (created if missing)")
    _scale_flags(p, "runs")
    p.add_argument("--job", help="job id (default: a hash of the job's run ids: the same command resumes the job)")
    p.add_argument("--registry", help="registry TOML (default: ./sae-discover.toml if present)")
    _model_flags(p)
    ns = p.parse_args(argv)
    _check_scale(ns)
    from sae_discover.distributed import ingest_file  # loads torch: only commands that run a model import it

    summary = ingest_file(ns.prompts_file, ns.store, _fields(ns, FIELD_NAMES), registry=ns.registry, device=ns.device,
                          dtype=ns.dtype, threads=check_threads(ns.threads), workers=ns.workers,
                          chunk_size=ns.chunk_size, job_id=ns.job, ray_address=ns.ray)
    for number, error in summary.pop("line_errors").items():  # an error may name its line already
        print(f"error: {error}" if f"line {number}:" in error else f"line {number}: error: {error}", file=sys.stderr)
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(summary))
    return 1 if summary["failed_lines"] else 0


def cmd_store(argv: list[str]) -> int:
    p = Parser(prog="python -m sae_discover store", description="Maintain a shared Delta store.")
    sub = p.add_subparsers(dest="action", metavar="{import,compact}", required=True)
    imp = sub.add_parser("import", help="copy a store's runs into a local catalog file (the fastest reader)")
    imp.add_argument("store", type=store_location, help="the Delta store (folder or URI)")
    imp.add_argument("--db", help="the local catalog file (default: $SAE_DISCOVER_DB or ./sae_catalog.duckdb)")
    imp.add_argument("--where", help="only the runs matching this filter on v_runs' columns (e.g. \"model_id = 'demo'\")")
    comp = sub.add_parser("compact", help="compact small files (row groups stay run-ordered), vacuum leftovers")
    comp.add_argument("store", type=store_location, help="the Delta store (folder or URI)")
    comp.add_argument("--retention_hours", type=int, default=168,
                      help="keep files that versions younger than this need (readers pinned to them; default: 168)")
    ns = p.parse_args(argv)
    if ns.action == "compact" and not 0 <= ns.retention_hours <= 100_000:
        raise RequestError("retention_hours", f"expected hours in [0, 100000], got {ns.retention_hours}")
    from catalog import store  # deltalake (the scale extra): only store commands import it

    if ns.action == "compact":
        print(json.dumps(store.compact(ns.store, ns.retention_hours)))
        return 0
    snapshot = store.StoreCatalog(ns.store)
    keys = store.select_runs(snapshot, ns.where)  # the store and the filter checked before the local file opens
    local = Catalog(ns.db)
    try:
        print(json.dumps(store.import_store(snapshot, local, keys)))
    finally:
        local.close()
    return 0


COMMANDS = {"calibrate": cmd_calibrate, "runs": cmd_runs, "sql": cmd_sql, "labels": cmd_labels, "drift": cmd_drift,
            "serve": cmd_serve, "feature": cmd_feature, "ingest": cmd_ingest, "store": cmd_store}


PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message, category, *args, **kwargs) -> None:
    """Catalog warnings (e.g. a WAL cut short by a crash) as one ``warning: ...`` line; others as Python shows them."""
    if issubclass(category, CatalogWarning):
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        PYTHON_SHOWWARNING(message, category, *args, **kwargs)


ARGV: list[str] = []  # the command line main() is parsing (for advice that repeats it)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ARGV[:] = argv
    warnings.showwarning = _show_warning
    handler = COMMANDS.get(argv[0]) if argv else None
    try:
        status = handler(argv[1:]) if handler else cmd_discover(argv)
        sys.stdout.flush()  # inside the try: a reader that stopped early (``| head``) is handled below
        return status
    except BrokenPipeError:  # the reader of stdout stopped reading (``| head``): what it took is enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except BrokenProcessPool:  # a --workers process was killed (by a user, or the kernel out of memory)
        print("error: workers: a worker process died (killed, or out of memory?); what was stored stays whole: run "
              "the same command again to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: every write is one transaction (or a chunk's commits), so nothing is half-written
        print("error: interrupted; what was stored stays whole (a batch or ingest resumes when the same command is "
              "run again)", file=sys.stderr)
        return 130
    except CatalogLocked as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 3
    except (*USER_ERRORS, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in SCALE_MODULES:
            raise
        field = "ray" if exc.name == "ray" else "store"
        print(f"error: {field}: needs the optional scale extra (no module {exc.name!r}): "
              "pip install -c constraints.txt -e '.[scale]'", file=sys.stderr)
        return 2
