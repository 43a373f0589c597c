"""The CLI: real subprocesses, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def jsnap(*args, env=None, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "jsnap", *args], capture_output=True, text=True, env=env
    )
    if check and p.returncode != 0:
        raise AssertionError(f"jsnap {args} failed: {p.stderr}")
    return p


def test_cli_volume_and_snapshot_lifecycle(tmp_path):
    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M", "--chunk-size", "4K")
    jsnap("-p", pool, "volume", "create", "disk0", "--size", "1M")
    jsnap("-p", pool, "snapshot", "create", "disk0", "s1")
    vols = json.loads(jsnap("-p", pool, "volume", "list", "--json").stdout)
    assert vols == [{"name": "disk0", "size": 1 << 20, "snapshots": 1, "thin": True,
                     "allocated": 0}]
    snaps = json.loads(jsnap("-p", pool, "snapshot", "list", "--json").stdout)
    assert [(s["volume"], s["name"]) for s in snaps] == [("disk0", "s1")]
    jsnap("-p", pool, "snapshot", "delete", "disk0", "s1")
    assert json.loads(jsnap("-p", pool, "snapshot", "list", "--json").stdout) == []
    jsnap("-p", pool, "volume", "delete", "disk0")
    assert json.loads(jsnap("-p", pool, "volume", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    "args, needle",
    [
        pytest.param(["volume", "list"], "no pool given", id="no-pool"),
        pytest.param(["-p", "{missing}", "volume", "list"], "is not a jsnap pool", id="not-a-pool"),
        pytest.param(["-p", "{pool}", "volume", "create", "v", "--size", "12Q"], "invalid size",
                     id="bad-size"),
        pytest.param(["-p", "{pool}", "snapshot", "create", "nosuch", "s"], "no volume named",
                     id="unknown-volume"),
        pytest.param(["init", "{pool}"], "already a jsnap pool", id="init-twice"),
        pytest.param(["-p", "{pool}", "serve", "--flush-interval", "soon"], "invalid interval",
                     id="bad-flush-interval"),
        pytest.param(["-p", "{pool}", "serve", "--listen", "nohost"], "invalid address",
                     id="bad-listen"),
        pytest.param(["-p", "{pool}", "volume", "create", "bad@name", "--size", "1M"],
                     "invalid volume name", id="bad-name"),
        pytest.param(["-p", "{pool}", "volume", "create", "v", "--size", "1M", "--preallocate"],
                     "--preallocate needs --raw", id="thin-preallocate"),
        pytest.param(["-p", "{pool}", "volume", "resize", "nosuch", "--size", "1M"],
                     "no volume named", id="resize-unknown"),
        pytest.param(["-p", "{pool}", "pool", "grow", "--size", "0"], "invalid size",
                     id="grow-zero"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M")
    args = [a.format(pool=pool, missing=str(tmp_path / "missing")) for a in args]
    p = jsnap(*args, check=False)
    assert p.returncode != 0
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_cli_second_opener_names_the_holder(tmp_path):
    from jsnap.engine import Engine

    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M")
    e = Engine.open(pool, start_destager=False)
    try:
        p = jsnap("-p", pool, "volume", "list", check=False)
        assert p.returncode == 1
        import os

        assert f"in use by process {os.getpid()}" in p.stderr
    finally:
        e.close()


def test_cli_thin_resize_grow_check(tmp_path):
    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M", "--chunk-size", "4K", "--pool-size", "1M")
    jsnap("-p", pool, "volume", "create", "t", "--size", "64M")  # over-provisioned: allowed
    jsnap("-p", pool, "volume", "create", "r", "--size", "1M", "--raw")
    p = jsnap("-p", pool, "volume", "resize", "t", "--size", "128M")
    assert "128M" in p.stdout or "128 MiB" in p.stdout, p.stdout
    p = jsnap("-p", pool, "volume", "resize", "t", "--size", "1M", check=False)
    assert p.returncode == 1 and "cannot shrink" in p.stderr
    vols = {v["name"]: v for v in json.loads(jsnap("-p", pool, "volume", "list", "--json").stdout)}
    assert vols["t"]["thin"] and vols["t"]["size"] == 128 << 20
    assert not vols["r"]["thin"]
    st = json.loads(jsnap("-p", pool, "status", "--json").stdout)
    assert st["pool_capacity"] == 1 << 20
    jsnap("-p", pool, "pool", "grow", "--size", "1M")
    jsnap("-p", pool, "pool", "grow", "--size", "2M", "--file", str(tmp_path / "more.dat"))
    st = json.loads(jsnap("-p", pool, "status", "--json").stdout)
    assert st["pool_capacity"] == 4 << 20, st
    p = jsnap("-p", pool, "check")
    assert "pool is consistent" in p.stdout, p.stdout
    text = jsnap("-p", pool, "status").stdout
    assert "capacity" in text and "thin" in text
