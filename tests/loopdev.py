"""Loop devices for tests of block-device stores: a sparse file attached with losetup, and
always detached. Needs root and losetup: required in CI (JSNAP_REQUIRE_TOOLS), skipped
elsewhere."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def need(what: str) -> None:
    if os.environ.get("JSNAP_REQUIRE_TOOLS"):
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what)


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """A loop device over a new sparse file `backing` of `size` bytes."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        need("loop devices need root and losetup")
    with open(backing, "wb") as f:
        f.truncate(size)
    p = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        need(f"no loop device to be had: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
