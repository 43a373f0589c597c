"""Two owners of one pool served by two `jsnap serve` processes at once (README "Ownership"):
real clients write to both, one is SIGKILLed while the other keeps serving, and after its
restart every acknowledged write and its snapshot are there."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from interop_util import JsnapServer, require_tool, run

from jsnap.stores.nbd_client import NbdClient, NbdError


def test_two_servers_own_the_volumes_of_one_pool_and_one_dies_alone(jsnap_server, tmp_path):
    qemu_io = require_tool("qemu-io")
    nbdinfo = require_tool("nbdinfo")
    a = jsnap_server({"va": "32M"})
    # An owner is added beside a running server: nothing of the default owner is locked.
    a.cli("owner", "create", "b", "--journal-size", "16M")
    base = tmp_path / "owner-b"
    base.mkdir()
    b = JsnapServer(base, pool=a.pool, owner="b")
    try:
        b.cli("volume", "create", "vb", "--size", "32M")  # offline: b is not serving yet
        b.start()
        run([qemu_io, "-f", "raw", "-c", "write -P 0xa1 0 4M", a.uri("va")])
        run([qemu_io, "-f", "raw", "-c", "write -P 0xb1 0 4M", b.uri("vb")])
        b.cli("snapshot", "create", "vb", "s1")  # through b's own admin socket
        # Both write at once, each to its own journal; b's writes stay journaled.
        pa = subprocess.Popen([qemu_io, "-f", "raw", "-c", "write -P 0xa2 1M 8M", a.uri("va")],
                              stdout=subprocess.DEVNULL)
        run([qemu_io, "-f", "raw", "-c", "write -P 0xb2 2M 8M", "-c", "flush", b.uri("vb")])
        assert pa.wait(60) == 0

        # Each server refuses the other's volumes, and its message names their owner
        # (libnbd shows only the error code; jsnap's own client shows the message).
        assert run([nbdinfo, a.uri("vb")], check=False).returncode != 0
        for srv, export, owner in ((a, "vb", "'b'"), (b, "va", "'(default)'")):
            with pytest.raises(NbdError, match=f"served by owner {re.escape(owner)}"):
                NbdClient(srv.socket, export)
        owners = {o["name"]: o for o in json.loads(a.cli("owner", "list", "--json").stdout)}
        assert owners["b"]["volumes"] == 1 and owners["b"]["pid"] == str(b.proc.pid)
        assert owners[""]["pid"] == str(a.proc.pid)
        st = json.loads(b.cli("status", "--json").stdout)
        assert [v["name"] for v in st["volumes"]] == ["vb"], st["volumes"]

        b.kill()  # SIGKILL: b's journal holds what it acknowledged
        run([qemu_io, "-f", "raw", "-c", "read -P 0xa1 0 1M", "-c", "read -P 0xa2 1M 8M",
             a.uri("va")])  # a serves on, untouched
        b.start()
        run([qemu_io, "-f", "raw", "-c", "read -P 0xb1 0 2M", "-c", "read -P 0xb2 2M 8M",
             b.uri("vb")])
        run([qemu_io, "-f", "raw", "-r", "-c", "read -P 0xb1 0 4M", "-c", "read -P 0 4M 4M",
             b.uri("vb@s1")])
        b.stop()
        a.stop()
        for srv in (a, b):  # each owner's journal, maps and slots, offline
            assert "pool is consistent" in srv.cli("check").stdout
    finally:
        b.teardown()
