"""Connection limits (`serve --max-connections --handshake-timeout --max-inflight-requests
--max-inflight-bytes`): many idle clients, slow-loris clients and greedy clients must not
stop a busy client, and each limit does what it says.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from interop_util import make_image, require_tool, run
from raw_nbd import CMD_FLUSH, CMD_READ, REQUEST_MAGIC, RawClient
from test_robustness import Agent, _rss_kib

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _no_internal_errors(srv) -> None:
    log = srv.log_text()
    assert "internal error" not in log and "Traceback" not in log, log


def _closed_by_server(sock: socket.socket) -> bool:
    """Non-blocking check: has the server closed this connection?"""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        sock.setblocking(True)


def test_limits_200_idle_clients_and_slow_loris_do_not_stop_a_busy_client(jsnap_server):
    srv = jsnap_server({"vol": "64M", "idle": "4M"}, tcp=True, start=False)
    srv.start("--handshake-timeout", "3")
    addr = ("127.0.0.1", srv.port)
    idle = []
    for i in range(200):
        c = RawClient(addr)
        c.handshake("idle")
        assert c.write(i * 4096, struct.pack(">I", i) * 1024) == 0
        idle.append(c)
    busy = Agent(srv.uri("vol", tcp=True))

    # Slow loris #1 trickles a valid handshake, one byte every 0.3 s: it would need ~10 s.
    loris = RawClient(addr)
    loris.greeting()
    t0 = time.monotonic()
    trickle = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, 9) + b"\0\0\0\3vol\0\0"
    # Slow loris #2 finished its handshake, then stalls in the middle of a request header.
    stalled = RawClient(addr)
    stalled.handshake("idle")
    header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 77, 0, 4096)
    stalled.sock.sendall(header[:10])

    closed_after = None
    seed = 100
    for byte in trickle:
        try:
            loris.sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - t0
            break
        busy.roundtrip(seed)  # full-speed writes and verified reads meanwhile
        seed += 1
        if _closed_by_server(loris.sock):
            closed_after = time.monotonic() - t0
            break
        time.sleep(0.3)
    assert closed_after is not None, "the slow handshake was never cut off"
    assert 2.5 < closed_after < 8, f"closed after {closed_after:.1f} s, timeout is 3 s"
    assert "handshake not finished within 3 s" in srv.log_text()
    loris.close()

    # Transmission has no idle timeout: the stalled client finishes its request and is
    # answered; every idle client still reads its own data.
    busy.roundtrip(seed)
    stalled.sock.sendall(header[10:])
    error, cookie, data = stalled.reply(4096)
    assert (error, cookie, data) == (0, 77, struct.pack(">I", 0) * 1024)
    stalled.close()
    for i, c in enumerate(idle):
        assert c.read(i * 4096, 4096) == struct.pack(">I", i) * 1024
        c.close()
    busy.close()
    _no_internal_errors(srv)


def test_limits_max_connections_refuses_cleanly(jsnap_server):
    srv = jsnap_server({"vol": "8M"}, tcp=True, start=False)
    srv.start("--max-connections", "8")
    addr = ("127.0.0.1", srv.port)
    held = []
    for _ in range(8):
        c = RawClient(addr)
        c.handshake("vol")
        held.append(c)
    extra = RawClient(addr)  # accepted by the kernel, closed by the server: no greeting
    extra.sock.settimeout(10)
    assert extra.sock.recv(100) == b""
    extra.close()
    for i, c in enumerate(held):  # the 8 go on undisturbed
        assert c.write(i * 65536, bytes([i + 1]) * 65536) == 0
        assert c.read(i * 65536, 65536) == bytes([i + 1]) * 65536
    held.pop().close()
    deadline = time.monotonic() + 10  # the slot frees once the server sees the close
    while True:
        c = RawClient(addr)
        try:
            c.handshake("vol")
            break
        except (EOFError, ConnectionResetError, struct.error):
            c.close()
            assert time.monotonic() < deadline, "no slot after a client left"
            time.sleep(0.1)
    assert c.read(7 * 65536, 65536) == bytes([8]) * 65536  # what the client that left wrote
    c.close()
    for c in held:
        c.close()
    assert "too many connections" in srv.log_text()
    _no_internal_errors(srv)


def test_limits_inflight_bytes_bound_the_memory_a_client_that_does_not_read_costs(
        jsnap_server):
    """64 READs of 4 MiB sent at once and no reply read: without the limit one batch would
    build all 256 MiB of replies; with --max-inflight-bytes 8M the server stops at 8 MiB
    until the client reads. Then every reply arrives, in full and correct."""
    srv = jsnap_server({"vol": "64M"}, start=False)
    srv.start("--max-inflight-bytes", "8M")
    pattern = os.urandom(4 * MiB)
    writer = RawClient(srv.socket)
    writer.handshake("vol")
    assert writer.write(0, pattern) == 0
    writer.close()
    rss0 = _rss_kib(srv.proc.pid)
    raw = RawClient(srv.socket, timeout=30)
    raw.handshake("vol")
    reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, 0, 4 * MiB)
                    for cookie in range(1, 65))
    raw.sock.sendall(reqs)
    time.sleep(1.5)
    grown = _rss_kib(srv.proc.pid) - rss0
    assert grown < 64 * 1024, f"server grew {grown} KiB for a client that reads nothing"
    for cookie in range(1, 65):
        error, got_cookie, data = raw.reply(4 * MiB)
        assert error == 0 and got_cookie == cookie and data == pattern, cookie
    raw.close()
    _no_internal_errors(srv)


def test_limits_inflight_requests_stop_reading_while_durable_replies_pile_up(jsnap_server):
    """FLUSH after FLUSH and no reply read: their replies wait in the durable sender, which
    is blocked on the full socket. With --max-inflight-requests 16 the server stops reading,
    so the client's own send blocks after a few hundred KiB (socket buffers); nothing is
    refused, and once the client reads, every FLUSH is answered."""
    srv = jsnap_server({"vol": "8M"}, start=False)
    srv.start("--max-inflight-requests", "16")
    raw = RawClient(srv.socket, timeout=30)
    raw.handshake("vol")
    n = 400_000  # 11 MiB of requests
    reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, cookie, 0, 0)
                    for cookie in range(n))
    raw.sock.setblocking(False)
    sent, stuck_since = 0, None
    while sent < len(reqs):
        try:
            sent += raw.sock.send(reqs[sent:sent + 65536])
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 2:
                break
            time.sleep(0.01)
    raw.sock.setblocking(True)
    assert sent < 4 * MiB, f"the server kept reading: {sent} bytes of FLUSH requests taken"

    # Read the replies while the rest of the requests go out.
    sender = threading.Thread(target=raw.sock.sendall, args=(reqs[sent:],))
    sender.start()
    cookies = set()
    for _ in range(n):
        error, cookie, _ = raw.reply()
        assert error == 0
        cookies.add(cookie)
    sender.join(30)
    assert cookies == set(range(n))
    raw.close()
    _no_internal_errors(srv)


def test_limits_tight_inflight_limits_keep_data_correct(jsnap_server, tmp_path):
    """The batch loop stopping and resuming mid-buffer at every other request still
    answers every request right (qemu-img and nbdcopy, many requests in flight)."""
    img, nbdcopy = require_tool("qemu-img"), require_tool("nbdcopy")
    srv = jsnap_server({"vol": "16M"}, start=False)
    srv.start("--max-inflight-requests", "2", "--max-inflight-bytes", "64K")
    src = tmp_path / "src.raw"
    data = make_image(src, 16 * MiB, seed=77)
    run([nbdcopy, "--requests=32", "--flush", str(src), srv.uri("vol")], timeout=120)
    run([img, "compare", "-f", "raw", "-F", "raw", str(src), srv.uri("vol")], timeout=120)
    out = tmp_path / "out.raw"
    run([nbdcopy, "--requests=32", srv.uri("vol"), str(out)], timeout=120)
    assert out.read_bytes() == data
    _no_internal_errors(srv)
