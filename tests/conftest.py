"""Shared fixtures: a fresh pool per test, and helpers to require external tools."""

from __future__ import annotations

import os
import shutil

import pytest
from backends import nbdkit  # noqa: F401 - a fixture for every test: NBD backends

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool


def require_tool(name: str) -> str:
    """Path of an external tool; skip (or fail in CI, JSNAP_REQUIRE_TOOLS=1) when missing."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("JSNAP_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is required in CI but not installed")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture
def pool_path(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=4 << 20, chunk_size=4096)
    return path


@pytest.fixture
def engine(pool_path):
    e = Engine.open(pool_path, start_destager=False)
    yield e
    if not e.closed:
        e.close()


@pytest.fixture
def reopen(pool_path):
    """reopen(e, **open_kwargs) closes `e` and returns the pool opened again (no destager);
    everything opened is closed at the end."""
    opened: list[Engine] = []

    def _reopen(e: Engine, **kw) -> Engine:
        e.close()
        e2 = Engine.open(pool_path, start_destager=False, **kw)
        opened.append(e2)
        return e2

    yield _reopen
    for e in opened:
        if not e.closed:
            e.close()
