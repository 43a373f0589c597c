"""Lint and types are part of the test run (STYLE: ruff everywhere, mypy strict on the lower
layers: base, codec, stores, core)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT)


def test_lint_ruff_is_clean():
    pytest.importorskip("ruff")
    p = _run("ruff", "check", "src", "tests", "bench", "tools")
    assert p.returncode == 0, p.stdout + p.stderr


# The lower layers (README, "Design"): base, the codec, the stores, the core. pyproject's
# [tool.mypy] overrides name the same modules, so a plain `mypy` keeps them strict as well.
STRICT = ("src/jsnap/__init__.py", "src/jsnap/errors.py", "src/jsnap/units.py", "src/jsnap/nbd",
          "src/jsnap/stores", "src/jsnap/core")


def test_lint_mypy_strict_on_the_lower_layers_and_plain_on_the_rest():
    pytest.importorskip("mypy")
    p = _run("mypy", "--strict", *STRICT)
    assert p.returncode == 0, p.stdout + p.stderr
    # [tool.mypy] files: src/jsnap and tools/ (fault injection, crash torture) in one run,
    # so the `jsnap` tools/ imports is src/jsnap.
    p = _run("mypy")
    assert p.returncode == 0, p.stdout + p.stderr
