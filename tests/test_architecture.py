"""Layering rules, enforced by reading the source with `ast` (the project's modules are never imported for the
static checks; only the torch-free start-up check runs a subprocess).

1. catalog/ imports none of torch, transformers, ingest, sae_discover, api.
2. ingest/ imports none of catalog, sae_discover, api.
3. Only sae_discover/cli.py (the serve command), api/ and tests/ import api.
4. SQL lives only in catalog/ and migrations/ (string literals elsewhere carry no SQL).
5. A function-level import carries a comment (on its line or the line above) saying why it is deferred.
6. `import catalog` does not load torch.
7. sae_discover/ has no import cycles, and its core never imports sae_discover.cli.

Every import statement counts, wherever it sits (module level, functions, `if TYPE_CHECKING:` blocks).
"""

from __future__ import annotations

import ast
import functools
import io
import itertools
import re
import subprocess
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SCALE_MODULES

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("sae_discover", "api", "catalog", "ingest", "migrations")


# ---------------------------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Import:
    """One import statement, with its target resolved to an absolute module name."""

    path: Path
    lineno: int
    end_lineno: int
    module: str  # `import a.b` -> "a.b"; `from .x import y` -> "<pkg>.x" (relative imports resolved)
    names: tuple[str, ...]  # the imported names of a `from` import; () for `import a.b`
    in_function: bool
    text: str = ""  # the statement as written (for messages)

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.lineno}"

    @property
    def candidates(self) -> tuple[str, ...]:
        """Every module this statement may load: the module itself, plus `module.name` for each `from` name
        (which is a submodule when `name` is one, e.g. `from sae_discover import cli`)."""
        return (self.module, *(f"{self.module}.{n}" for n in self.names if n != "*"))

    def hits(self, *prefixes: str) -> list[str]:
        """The candidates that are one of `prefixes` or inside one of them (`torch` matches `torch.nn`)."""
        return [c for c in self.candidates if any(c == p or c.startswith(p + ".") for p in prefixes)]

    def __str__(self) -> str:
        if self.text:
            return self.text
        if self.names:
            return f"from {self.module} import {', '.join(self.names)}"
        return f"import {self.module}"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    """`sae_discover/cli.py` -> `sae_discover.cli`; `catalog/__init__.py` -> `catalog`."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: Path) -> str:
    """The package a relative import in `path` is relative to (the module itself for an `__init__.py`)."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def resolve_relative(path: Path, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    parts = package_of(path).split(".") if package_of(path) else []
    if level - 1 > len(parts) or (level - 1 == len(parts) and not module):
        raise ValueError(f"{rel(path)}: relative import beyond the top-level package (level {level}, {module!r})")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def py_files(*dirs: str) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        out.extend(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(out)


@functools.cache
def source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@functools.cache
def tree(path: Path) -> ast.Module:
    return ast.parse(source(path), filename=str(path))


@functools.cache
def imports(path: Path) -> tuple[Import, ...]:
    """Every import statement in `path`, relative ones resolved, each marked whether it sits in a function."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(path, node.lineno, node.end_lineno or node.lineno, alias.name, (), in_function,
                                    ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            module = resolve_relative(path, node.module, node.level)
            names = tuple(a.name for a in node.names)
            found.append(Import(path, node.lineno, node.end_lineno or node.lineno, module, names, in_function,
                                ast.unparse(node)))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree(path), False)
    return tuple(found)


def comment_lines(path: Path) -> set[int]:
    """Line numbers holding a `#` comment (real comments, found by the tokenizer: not `#` inside strings)."""
    toks = tokenize.generate_tokens(io.StringIO(source(path)).readline)
    return {tok.start[0] for tok in toks if tok.type == tokenize.COMMENT}


def _by_location(line: str) -> tuple:
    """Sort key: file, then line number as a number (`x.py:9` before `x.py:10`)."""
    m = re.match(r"([^:\s]+):(\d+)", line)
    return (m.group(1), int(m.group(2)), line) if m else (line, 0, line)


def report(title: str, violations: Iterable[str]) -> str:
    lines = sorted(set(violations), key=_by_location)
    return f"{title} ({len(lines)} violation{'s' if len(lines) != 1 else ''}):\n  " + "\n  ".join(lines)


def fail_on(title: str, violations: list[str]) -> None:
    if violations:
        pytest.fail(report(title, violations), pytrace=False)


def forbidden_imports(dirs: Iterable[str], banned: tuple[str, ...]) -> list[str]:
    return [
        f"{imp.where}: {imp}  (-> {', '.join(sorted({h.split('.')[0] for h in imp.hits(*banned)}))})"
        for f in py_files(*dirs)
        for imp in imports(f)
        if imp.hits(*banned)
    ]


def test_helpers_resolve_relative_imports():
    """The collector resolves relative imports against the file's package (guards the rules against a blind spot)."""
    cli, init = ROOT / "sae_discover" / "cli.py", ROOT / "sae_discover" / "__init__.py"
    assert resolve_relative(cli, "service", 1) == "sae_discover.service"
    assert resolve_relative(cli, None, 1) == "sae_discover"
    assert resolve_relative(init, "cli", 1) == "sae_discover.cli"
    assert resolve_relative(ROOT / "ingest" / "saes" / "base.py", "models", 2) == "ingest.models"
    assert resolve_relative(ROOT / "ingest" / "saes" / "base.py", None, 2) == "ingest"
    assert resolve_relative(cli, "os.path", 0) == "os.path"
    imp = Import(cli, 1, 1, "sae_discover", ("cli", "drift"), True)
    assert imp.hits("sae_discover.cli") == ["sae_discover.cli"]
    assert Import(cli, 1, 1, "sae_discover.cli_util", (), False).hits("sae_discover.cli") == []
    for pkg in SOURCE_PACKAGES:
        assert py_files(pkg), f"no .py files found under {pkg}/ — the architecture rules would pass vacuously"


# ---------------------------------------------------------------------------------------------------------------
# 1-3: who may import whom


def test_catalog_imports_no_torch_transformers_ingest_sae_discover_or_api():
    bad = forbidden_imports(["catalog"], ("torch", "transformers", "ingest", "sae_discover", "api"))
    fail_on("catalog/ must not import torch, transformers, ingest, sae_discover or api", bad)


def test_ingest_imports_no_catalog_sae_discover_or_api():
    bad = forbidden_imports(["ingest"], ("catalog", "sae_discover", "api"))
    fail_on("ingest/ must not import catalog, sae_discover or api", bad)


def test_only_cli_api_and_tests_import_api():
    allowed = {ROOT / "sae_discover" / "cli.py"}
    files = [p for p in py_files(*(d for d in SOURCE_PACKAGES if d != "api")) if p not in allowed]
    files += sorted(p for p in ROOT.glob("*.py"))  # stray top-level scripts, if any
    bad = [f"{imp.where}: {imp}" for f in files for imp in imports(f) if imp.hits("api")]
    fail_on("only sae_discover/cli.py (serve), api/ and tests/ may import api", bad)


# ---------------------------------------------------------------------------------------------------------------
# 4: SQL only in catalog/ and migrations/

SQL_PATTERNS = [
    re.compile(p, re.DOTALL)
    for p in (
        r"\bSELECT\b.+\bFROM\b",
        r"\bINSERT\s+(OR\s+\w+\s+)?INTO\b",
        r"\bUPDATE\b\s+\w+\s+\bSET\b",
        r"\bDELETE\s+FROM\b",
        r"\bCREATE\s+(OR\s+REPLACE\s+)?((TEMP|TEMPORARY|UNIQUE)\s+)?(TABLE|VIEW|INDEX|MACRO|SEQUENCE|SCHEMA)\b",
        r"\bDROP\s+(TABLE|VIEW|INDEX|MACRO|SEQUENCE|SCHEMA)\b",
        r"\bALTER\s+TABLE\b",
    )
]


def docstring_nodes(module: ast.Module) -> set[int]:
    """ids of the module/class/function docstring constants (prose, not SQL)."""
    out: set[int] = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def string_literals(module: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of every string literal except docstrings. An f-string is one literal: its constant pieces
    joined with `{}` where the formatted values go, so f"SELECT {cols} FROM t" is still seen as SQL."""
    skip = docstring_nodes(module)
    for node in ast.walk(module):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            yield node.lineno, text
    for node in ast.walk(module):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_no_sql_outside_catalog_and_migrations():
    bad = []
    for f in py_files("sae_discover", "api", "ingest"):
        for line, text in string_literals(tree(f)):
            for pat in SQL_PATTERNS:
                if m := pat.search(text):
                    snippet = " ".join(m.group(0).split())
                    bad.append(f"{rel(f)}:{line}: {snippet[:80]!r}")
                    break
    fail_on("SQL belongs in catalog/ (or migrations/); found SQL in a string literal", bad)


# ---------------------------------------------------------------------------------------------------------------
# 5: function-level imports say why they are deferred


def test_function_level_imports_are_commented():
    bad = []
    for f in py_files("sae_discover", "api", "catalog", "ingest"):
        comments = None
        for imp in imports(f):
            if not imp.in_function:
                continue
            comments = comments if comments is not None else comment_lines(f)
            if not comments & set(range(imp.lineno - 1, imp.end_lineno + 1)):
                bad.append(f"{imp.where}: {imp}")
    fail_on(
        "a function-level import is allowed only to defer a torch-heavy/optional module, and needs a `#` comment "
        "saying so on its line or the line just above (otherwise move it to the top of the module)",
        bad,
    )


# ---------------------------------------------------------------------------------------------------------------
# 6: the catalog starts without torch


def test_import_catalog_does_not_load_torch():
    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)

    proc = run("import catalog, sys; assert 'torch' not in sys.modules")
    assert proc.returncode == 0, f"`import catalog` loads torch (or fails):\n{proc.stderr[-3000:]}"
    # and so does every catalog submodule (`import catalog` alone only runs catalog/__init__.py)
    # (a module needing the optional scale extra is checked only where it is installed, as in CI)
    mods = [module_name(p) for p in py_files("catalog")]
    proc = run(
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError as exc:\n"
        f"        if exc.name not in {SCALE_MODULES!r}:\n"
        "            raise\n"
        "    assert 'torch' not in sys.modules, f'importing {m} loaded torch'\n"
    )
    assert proc.returncode == 0, f"a catalog submodule loads torch (or fails to import):\n{proc.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------------------------
# 7: sae_discover has no import cycles, and its core does not reach back into the CLI


def sae_discover_graph() -> dict[str, dict[str, Import]]:
    """module -> {imported sae_discover module -> the (first) import statement making that edge}."""
    files = {module_name(p): p for p in py_files("sae_discover")}
    graph: dict[str, dict[str, Import]] = {m: {} for m in files}
    for mod, path in files.items():
        for imp in imports(path):
            if imp.names:  # `from pkg import sub` loads pkg.sub when sub is a module, else it reads pkg
                targets = {f"{imp.module}.{n}" if f"{imp.module}.{n}" in files else imp.module for n in imp.names}
            else:  # `import a.b.c`: the deepest module of it we know
                parts = imp.module.split(".")
                targets = {next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in files),
                                "")}
            for t in targets:
                if t in files and t != mod:
                    graph[mod].setdefault(t, imp)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (each distinct cycle once, up to rotation)."""
    cycles: dict[tuple[str, ...], list[str]] = {}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cyc = stack[stack.index(nxt):]
                k = min(range(len(cyc)), key=lambda i: cyc[i])
                canon = tuple(cyc[k:] + cyc[:k])
                cycles.setdefault(canon, [*canon, canon[0]])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    return list(cycles.values())


def test_sae_discover_has_no_import_cycles():
    graph = sae_discover_graph()
    bad = []
    for cyc in find_cycles(graph):
        edges = "; ".join(f"{graph[a][b].where} ({a} -> {b})" for a, b in itertools.pairwise(cyc))
        bad.append(f"{' -> '.join(cyc)}  [{edges}]")
    fail_on("import cycle(s) between sae_discover modules", bad)


def test_sae_discover_core_does_not_import_cli():
    entry = {ROOT / "sae_discover" / "cli.py", ROOT / "sae_discover" / "__main__.py"}
    bad = [
        f"{imp.where}: {imp}"
        for f in py_files("sae_discover")
        if f not in entry
        for imp in imports(f)
        if imp.hits("sae_discover.cli")
    ]
    fail_on("sae_discover's core (everything but cli.py/__main__.py) must not import sae_discover.cli", bad)
