"""The CLI: real subprocesses, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
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
                     "allocated": 0, "device": None}]
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
        pytest.param(["-p", "{pool}", "volume", "delete", "nosuch"], "no volume named",
                     id="delete-unknown"),
        pytest.param(["-p", "{pool}", "serve", "--admin-listen", "127.0.0.1:0"],
                     "--admin-listen and --admin-token-file go together",
                     id="admin-listen-without-token"),
        pytest.param(["-p", "{pool}", "serve", "--admin-listen", "127.0.0.1:0",
                      "--admin-token-file", "{missing}"], "cannot read admin token file",
                     id="admin-token-file-missing"),
        pytest.param(["-p", "{pool}", "serve", "--log-format", "xml"], "invalid choice",
                     id="bad-log-format"),
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
    from jsnap.core.engine import Engine

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
    p = jsnap("-p", pool, "pool", "release")  # nothing grown ahead of need here
    assert p.stdout.startswith("released 0"), p.stdout
    p = jsnap("-p", pool, "check")
    assert "pool is consistent" in p.stdout, p.stdout
    text = jsnap("-p", pool, "status").stdout
    assert "capacity" in text and "thin" in text


def test_cli_stale_admin_socket_falls_back_to_the_pool(tmp_path):
    """admin.sock left by a killed server (a socket nobody listens on, or any file): the
    CLI opens the pool itself, no traceback; if someone else holds the pool, one line."""
    import socket

    from jsnap.core.engine import Engine

    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M")
    jsnap("-p", pool, "volume", "create", "v", "--size", "1M")
    sock_path = os.path.join(pool, "admin.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()  # bound, never listened: connect() is refused
    st = json.loads(jsnap("-p", pool, "status", "--json").stdout)
    assert st["serving"] is False and st["clients"] == []
    assert "no server running" in jsnap("-p", pool, "status").stdout
    os.unlink(sock_path)
    with open(sock_path, "w") as f:
        f.write("not a socket")
    assert "v" in jsnap("-p", pool, "volume", "list").stdout
    e = Engine.open(pool, start_destager=False)  # holds the lock, serves no admin socket
    try:
        p = jsnap("-p", pool, "volume", "list", check=False)
    finally:
        e.close()
    assert p.returncode == 1 and "in use by process" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_cli_file_where_a_directory_is_expected_is_one_line(tmp_path):
    """The root-proof stand-in for bad permissions: paths that cannot be opened at all."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M")
    os.mkdir(os.path.join(pool, "lock"))  # the lock file (made at first open) is a directory
    for args, needle in (
        (["-p", f"{afile}/pool", "status"], "is not a jsnap pool"),
        (["init", f"{afile}/pool"], "Not a directory"),
        (["-p", pool, "volume", "list"], "Is a directory"),
    ):
        p = jsnap(*args, check=False)
        assert p.returncode == 1 and needle in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_cli_permission_denied_is_one_line(tmp_path):
    """Real EACCES even as root: the command runs without CAP_DAC_OVERRIDE (setpriv drops
    it from the bounding set), so file modes apply to it as to any user."""
    drop: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux) to drop DAC override")
        drop = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M")
    jsnap("-p", pool, "volume", "list")  # makes POOL/lock

    def as_user(*args):
        return subprocess.run([*drop, sys.executable, "-m", "jsnap", *args],
                              capture_output=True, text=True)

    cases = [
        (pool, 0o000, ["-p", pool, "status"], "cannot open pool"),  # directory unreadable
        (os.path.join(pool, "pool.db"), 0o400, ["-p", pool, "volume", "list"],
         "readonly database"),  # catalog read-only
        (os.path.join(pool, "lock"), 0o400, ["-p", pool, "volume", "list"],
         "Permission denied"),
    ]
    for path, mode, args, needle in cases:
        old = os.stat(path).st_mode & 0o777
        os.chmod(path, mode)
        try:
            p = as_user(*args)
        finally:
            os.chmod(path, old)
        assert p.returncode == 1 and needle in p.stderr, (args, oct(mode), p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_cli_every_listing_command_has_json(tmp_path):
    pool = str(tmp_path / "p")
    jsnap("init", pool, "--journal-size", "4M")
    jsnap("-p", pool, "volume", "create", "v", "--size", "1M")
    jsnap("-p", pool, "snapshot", "create", "v", "s")
    jsnap("-p", pool, "acl", "set", "v", "--allow-address", "10.0.0.0/8")
    for args in (["volume", "list"], ["snapshot", "list"], ["snapshot", "list", "v"],
                 ["acl", "list"], ["status"]):
        out = json.loads(jsnap("-p", pool, *args, "--json").stdout)
        assert out, args

