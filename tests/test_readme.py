"""The README runs (issue 13): every fenced block marked ``<!-- runnable -->`` is executed, in README
order, with bash in one fresh directory (its own catalog, the built-in demo registry, ``examples/``
linked in), as a user would paste it; ``<!-- runnable expect: TEXT -->`` also requires TEXT in its
output; ``<!-- runnable scale … -->`` marks a block that needs the optional ``scale`` extra (skipped without
it, as tests/test_store.py is; ``.ci/run`` requires it). ``python`` and ``.venv/bin/python`` are this
interpreter. Blocks build on the ones before them
(the first discovery makes the runs the later ``runs`` commands read), so run the module as a whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SCALE_MODULES

MARK = re.compile(r"^<!-- runnable(?P<scale> scale)?(?: expect: (?P<expect>.*?))? -->$")
# the first command sets up the venv, then runs: the setup is what CI and a fresh clone check, so the
# test runs what follows it with this interpreter
SETUP = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install [^&]*&& ")


def runnable_blocks(readme: str) -> list[tuple[int, str, str | None, bool]]:
    """(line number, bash source, expected text, needs the scale extra) of each marked ```bash block."""
    lines, blocks = readme.splitlines(), []
    for i, line in enumerate(lines):
        match = MARK.match(line.strip())
        if not match:
            continue
        assert lines[i + 1].strip() == "```bash", f"README line {i + 1}: a runnable mark must precede a ```bash block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append((i + 2, SETUP.sub("", "\n".join(lines[i + 2:end])), match.group("expect"),
                       bool(match.group("scale"))))
    return blocks


BLOCKS = runnable_blocks((ROOT / "README.md").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's fresh directory: no catalog, no registry file (the demo is built in), the examples at hand."""
    work = tmp_path_factory.mktemp("readme")
    (work / "examples").symlink_to(ROOT / "examples")
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return work


def test_the_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 4
    assert all("..." not in src and "…" not in src for _, src, _, _ in BLOCKS)  # no placeholders left to fill in


@pytest.mark.parametrize(("line", "source", "expect", "scale"), BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(workdir, line, source, expect, scale):
    for name in SCALE_MODULES if scale else ():
        pytest.importorskip(name, reason=f"README block at line {line} needs the scale extra ({name})")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_DISCOVER_")}
    env.update(PATH=f"{workdir / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", source], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"README block at line {line} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if expect:
        assert expect in proc.stdout, f"README block at line {line}: {expect!r} not in its output:\n{proc.stdout}"
