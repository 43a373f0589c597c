"""Lint and types are part of the test run (STYLE: ruff everywhere, mypy strict on the codec)."""

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


def test_lint_mypy_strict_on_the_codec_and_plain_on_the_rest():
    pytest.importorskip("mypy")
    p = _run("mypy", "--strict", "src/jsnap/nbd")
    assert p.returncode == 0, p.stdout + p.stderr
    # tools/ (fault injection, crash torture) in the same run: its `jsnap` is then src/jsnap.
    p = _run("mypy", "--ignore-missing-imports", "src/jsnap", "tools")
    assert p.returncode == 0, p.stdout + p.stderr
