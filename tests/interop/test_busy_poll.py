"""Busy polling (`serve --busy-poll`, jsnap.transport.connection): a lone QD1 client gets its
data right with polling on, off, or at its maximum; a client that goes quiet does not keep
the server spinning; a request split across the poll's deadline is not lost; bad values are
refused."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest
from raw_nbd import CMD_WRITE, RawClient

pytestmark = pytest.mark.interop


def _server_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _qd1_roundtrips(c: RawClient, n: int, seed: int) -> None:
    for i in range(n):
        block = struct.pack(">II", seed, i) * 512
        off = (i * 7919 % 4096) * 4096
        assert c.write(off, block) == 0
        assert c.read(off, 4096) == block


@pytest.mark.parametrize("poll_us", ["0", "50", "10000"])
def test_qd1_data_is_right_with_polling_off_on_and_at_its_maximum(jsnap_server, poll_us):
    srv = jsnap_server({"vol": "16M"}, start=False)
    srv.start("--busy-poll", poll_us)
    c = RawClient(srv.socket)
    c.handshake("vol")
    _qd1_roundtrips(c, 300, 1)
    c.close()


def test_a_client_that_goes_quiet_leaves_the_server_idle(jsnap_server):
    """After a burst of QD1 requests (polling on) the client sleeps: with a 10 ms poll, a
    server that kept polling would burn about a core; one poll, then a blocking wait."""
    srv = jsnap_server({"vol": "16M"}, start=False)
    srv.start("--busy-poll", "10000")
    c = RawClient(srv.socket)
    c.handshake("vol")
    _qd1_roundtrips(c, 200, 2)
    cpu0 = _server_cpu(srv.proc.pid)
    time.sleep(1.5)
    spent = _server_cpu(srv.proc.pid) - cpu0
    assert spent < 0.3, f"server used {spent:.2f} s of CPU while its only client slept"
    _qd1_roundtrips(c, 20, 3)  # and it still answers
    c.close()


def test_a_request_split_around_the_poll_deadline_arrives_whole(jsnap_server):
    """The header, then the payload after a pause longer than the poll: the server must
    go from polling to a blocking wait without losing the bytes in between."""
    srv = jsnap_server({"vol": "16M"}, start=False)
    srv.start("--busy-poll", "2000")
    c = RawClient(srv.socket)
    c.handshake("vol")
    _qd1_roundtrips(c, 50, 4)  # polling is on now
    data = b"\xa5" * 8192
    for pause in (0.0005, 0.005, 0.05):
        cookie = c.send_request(CMD_WRITE, 65536, len(data))
        time.sleep(pause)
        c.sock.sendall(data[:100])
        time.sleep(pause)
        c.sock.sendall(data[100:])
        error, rcookie, _ = c.reply()
        assert (error, rcookie) == (0, cookie)
        assert c.read(65536, len(data)) == data
        data = os.urandom(len(data))
    c.close()


@pytest.mark.parametrize("value", ["-1", "10001", "1.5", "fast"])
def test_a_bad_busy_poll_value_is_one_line_and_starts_nothing(tmp_path, value):
    cp = subprocess.run([sys.executable, "-m", "jsnap", "-p", str(tmp_path / "none"), "serve",
                         "--busy-poll", value], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2
    assert cp.stderr.count("\n") == 1 and "invalid busy poll" in cp.stderr, cp.stderr
