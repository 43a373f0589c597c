"""Thin volumes through real clients: ENOSPC on a full pool, reclaim, truthful maps."""

from __future__ import annotations

import json

import pytest
from interop_util import require_tool, run, wait_destaged

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _qemu_io(uri: str, *cmds: str):
    args = [require_tool("qemu-io"), "-f", "raw"] + (["-r"] if "@" in uri else [])
    for c in cmds:
        args += ["-c", c]
    return run([*args, uri], check=False)


def _ok(p) -> None:
    assert p.returncode == 0 and "failed" not in p.stdout.lower(), p.stdout + p.stderr


def test_full_pool_gives_enospc_and_loses_nothing(jsnap_server):
    """A 2 MiB pool of 64 KiB extents (32), a 16 MiB thin volume: fill it through a snapshot
    until a write gets ENOSPC; every acknowledged byte still reads back; deleting the
    snapshot, then trimming, make room for new writes."""
    srv = jsnap_server({"t": "16M"}, pool_size="2M")
    uri = srv.uri("t")
    _ok(_qemu_io(uri, "write -P 0x11 0 1M"))  # 16 extents
    srv.cli("snapshot", "create", "t", "s1")
    _ok(_qemu_io(uri, "write -P 0x22 0 1M"))  # 16 more: the old ones belong to s1
    p = _qemu_io(uri, "write -P 0x33 4M 64k")
    assert "No space left on device" in p.stdout + p.stderr, p.stdout + p.stderr
    st = json.loads(srv.cli("status", "--json").stdout)
    assert st["pool_available"] == 0 and st["state"] == "ok", st
    _ok(_qemu_io(uri, "read -P 0x22 0 1M", "read -P 0 1M 15M"))
    _ok(_qemu_io(srv.uri("t@s1"), "read -P 0x11 0 1M", "read -P 0 1M 15M"))
    srv.cli("snapshot", "delete", "t", "s1")
    wait_destaged(srv)
    _ok(_qemu_io(uri, "write -P 0x33 4M 1M"))
    p = _qemu_io(uri, "write -P 0x44 8M 64k")
    assert "No space left on device" in p.stdout + p.stderr, p.stdout + p.stderr
    _ok(_qemu_io(uri, "discard 0 1M"))
    wait_destaged(srv)
    _ok(_qemu_io(uri, "write -P 0x44 8M 1M"))
    _ok(_qemu_io(uri, "read -P 0 0 1M", "read -P 0x33 4M 1M", "read -P 0x44 8M 1M"))
    srv.stop()
    p = srv.cli("check")
    assert "pool is consistent" in p.stdout, p.stdout


def test_qemu_img_map_shows_only_written_chunks(jsnap_server):
    srv = jsnap_server({"t": "64M"})
    uri = srv.uri("t")
    _ok(_qemu_io(uri, "write -P 0x5a 1M 128k", "write -P 0x5b 40M 64k"))
    wait_destaged(srv)
    p = run([require_tool("qemu-img"), "map", "--output=json", "-f", "raw", uri])
    data = [(m["start"], m["length"]) for m in json.loads(p.stdout) if m["data"]]
    assert data == [(1 * MiB, 128 * 1024), (40 * MiB, 64 * 1024)], p.stdout
    _ok(_qemu_io(uri, "discard 1M 128k"))
    wait_destaged(srv)
    p = run([require_tool("qemu-img"), "map", "--output=json", "-f", "raw", uri])
    data = [(m["start"], m["length"]) for m in json.loads(p.stdout) if m["data"]]
    assert data == [(40 * MiB, 64 * 1024)], p.stdout
    st = json.loads(srv.cli("status", "--json").stdout)
    assert st["pool_mapped"] == 64 * 1024, st


def test_resize_and_pool_grow_while_serving(jsnap_server):
    """Grow a volume and the pool with a server running: new connections see the new size,
    and a write refused for lack of space lands once the pool has grown."""
    srv = jsnap_server({"t": "8M"}, pool_size="1M")
    img = require_tool("qemu-img")
    uri = srv.uri("t")
    _ok(_qemu_io(uri, "write -P 0x61 0 1M"))
    p = _qemu_io(uri, "write -P 0x62 1M 64k")
    assert "No space left on device" in p.stdout + p.stderr, p.stdout + p.stderr
    srv.cli("pool", "grow", "--size", "1M")
    srv.cli("volume", "resize", "t", "--size", "32M")
    info = json.loads(run([img, "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == 32 * MiB, info
    _ok(_qemu_io(uri, "write -P 0x62 24M 1M"))
    _ok(_qemu_io(uri, "read -P 0x61 0 1M", "read -P 0 1M 23M", "read -P 0x62 24M 1M"))
    st = json.loads(srv.cli("status", "--json").stdout)
    assert st["pool_capacity"] == 2 * MiB and st["pool_available"] == 0, st
    wait_destaged(srv)
    _ok(_qemu_io(uri, "discard 24M 1M"))  # free extents at the data file's end ...
    wait_destaged(srv)
    out = srv.cli("pool", "release").stdout  # ... go back to the file system, online
    assert out.startswith("released 1M") or out.startswith("released 1.0M"), out
    st = json.loads(srv.cli("status", "--json").stdout)
    assert st["pool_backed"] == 1 * MiB and st["pool_available"] == 1 * MiB, st
    _ok(_qemu_io(uri, "write -P 0x63 24M 1M", "read -P 0x63 24M 1M"))
