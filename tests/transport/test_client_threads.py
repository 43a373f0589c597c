"""What a client's thread holds goes with it: a connection that read a snapshot (its reads
query the catalog, on a SQLite connection of that thread) leaves no connection behind."""

from __future__ import annotations

import os
import time

from jsnap.core.engine import Engine
from jsnap.stores.nbd_client import NbdClient
from jsnap.transport.server import NbdServer


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_clients_that_read_snapshots_leave_no_catalog_connection_open(pool_path, tmp_path):
    with Engine.open(pool_path) as e:
        vol = e.volume_create("v", 1 << 20)
        e.write(vol, 0, b"a" * 8192)
        e.snapshot_create(vol, "s")
        e.write(vol, 0, b"b" * 8192)
        e.wait_destaged()  # the snapshot's chunk is a preserved copy: reads query the catalog
        sock = str(tmp_path / "nbd.sock")
        srv = NbdServer(e, unix=[sock])
        srv.start()
        try:
            def one_client() -> None:
                c = NbdClient(sock, "v@s")
                assert c.pread(8192, 0) == b"a" * 8192
                c.close()

            one_client()
            time.sleep(0.2)
            before = _fds()
            for _ in range(20):
                one_client()
            deadline = time.monotonic() + 5
            while _fds() > before + 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # the server's threads finish after the client closes
            # A kept SQLite connection is two descriptors (pool.db and its WAL): 40 here.
            # The slack is for the engine's own threads, which open theirs when they first
            # need one.
            assert _fds() <= before + 2, f"{_fds() - before} descriptors left by 20 clients"
        finally:
            srv.stop()
