"""Misbehaving clients and signals: nothing one client does may disturb another or the server.

A well-behaved libnbd client (nbd_agent.py, one connection held open for the whole test)
writes and checks data before and after another client misbehaves on raw sockets
(raw_nbd.py). Afterwards the agent must still read what it wrote and write anew, the server
must still accept new connections, the misbehaving connection must have been closed (or
answered with an error), and the server log must not show an internal error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import time

import pytest
from interop_util import HERE, make_image, require_libnbd_python, require_tool, run, run_libnbd
from raw_nbd import CMD_READ, CMD_WRITE, RawClient
from test_snapshot_stream import StampWriter, read_stamps

pytestmark = pytest.mark.interop

MiB = 1 << 20
GiB = 1 << 30


class Agent:
    """nbd_agent.py: a libnbd connection kept open, driven by JSON lines."""

    def __init__(self, uri: str) -> None:
        self.proc = subprocess.Popen([require_libnbd_python(), str(HERE / "nbd_agent.py"), uri],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        hello = self._answer()
        assert hello["ok"], hello
        self.size = hello["size"]

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            pytest.fail(f"nbd agent exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return json.loads(line)

    def call(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def write(self, off: int, length: int, seed: int) -> None:
        r = self.call(op="write", off=off, len=length, seed=seed)
        assert r == {"ok": True}, f"agent write {off}+{length}: {r}"

    def check(self, off: int, length: int, seed: int) -> None:
        r = self.call(op="check", off=off, len=length, seed=seed)
        assert r == {"ok": True, "match": True}, f"agent check {off}+{length}: {r}"

    def roundtrip(self, seed: int) -> None:
        """Write a fresh range and read it back (the connection still works both ways)."""
        off = (seed * 1_000_003) % (self.size - 70000)
        self.write(off, 65536 + seed % 1000, seed)
        self.check(off, 65536 + seed % 1000, seed)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(op="quit")
            except (BrokenPipeError, OSError):
                pass
            self.proc.wait(10)


@pytest.fixture
def agent_factory():
    agents: list[Agent] = []

    def make(uri: str) -> Agent:
        a = Agent(uri)
        agents.append(a)
        return a

    yield make
    for a in agents:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def _server_still_serves(srv, seed: int) -> None:
    """A new connection works: write, flush, read back with a fresh libnbd client."""
    p = run_libnbd(r"""
import os, sys, random, nbd
h = nbd.NBD(); h.connect_uri(sys.argv[1])
data = random.Random(int(sys.argv[2])).randbytes(100000)
h.pwrite(data, 3 << 20); h.flush()
assert h.pread(100000, 3 << 20) == data
print("ok")
""", srv.uri("vol"), str(seed))
    assert p.stdout.strip() == "ok"
    assert srv.running


def _no_internal_errors(srv) -> None:
    log = srv.log_text()
    assert "internal error" not in log and "Traceback" not in log, log


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    assert m
    return int(m.group(1))


@pytest.mark.parametrize("where", ["instead_of_client_flags", "after_client_flags"])
def test_robustness_junk_after_greeting_closes_only_that_client(jsnap_server, agent_factory,
                                                                 where):
    srv = jsnap_server({"vol": "16M"})
    agent = agent_factory(srv.uri("vol"))
    agent.write(0, 200000, seed=1)
    for round_ in range(3):
        raw = RawClient(srv.socket)
        raw.greeting()
        if where == "after_client_flags":
            raw.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        junk = os.urandom(65536)
        if where == "instead_of_client_flags":
            junk = b"\xff\xff\xff\xff" + junk  # unknown client flags, whatever follows
        try:
            raw.sock.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before reading it all
        assert raw.wait_closed(10), "server kept a connection that sent junk open"
        raw.close()
        agent.check(0, 200000, seed=1)
        agent.roundtrip(seed=10 + round_)
    _server_still_serves(srv, seed=2)
    assert "protocol error" in srv.log_text()
    _no_internal_errors(srv)


def test_robustness_bad_request_magic_closes_only_that_client(jsnap_server, agent_factory):
    srv = jsnap_server({"vol": "16M"})
    agent = agent_factory(srv.uri("vol"))
    agent.write(MiB, 300000, seed=3)
    raw = RawClient(srv.socket)
    assert raw.handshake("vol") == 16 * MiB
    assert raw.write(8 * MiB, b"r" * 4096) == 0  # a valid request first
    assert raw.read(8 * MiB, 4096) == b"r" * 4096
    raw.send_request(CMD_READ, 0, 4096, magic=0xDEADBEEF)
    assert raw.wait_closed(10), "server kept a connection with a bad request magic open"
    raw.close()
    # The same with junk that is not even a whole request header.
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    raw.sock.sendall(b"\x00" * 16 + os.urandom(3))
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.wait_closed(10)
    raw.close()
    agent.check(MiB, 300000, seed=3)
    agent.roundtrip(seed=4)
    _server_still_serves(srv, seed=5)
    _no_internal_errors(srv)


def test_robustness_write_header_announcing_1gib_payload(jsnap_server, agent_factory):
    srv = jsnap_server({"vol": "16M"})
    agent = agent_factory(srv.uri("vol"))
    agent.write(0, 100000, seed=6)
    rss0 = _rss_kib(srv.proc.pid)
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    raw.send_request(CMD_WRITE, 0, GiB)
    try:
        for _ in range(64):  # 4 MiB of the announced payload, then stop sending
            raw.sock.sendall(os.urandom(65536))
    except (BrokenPipeError, ConnectionResetError):
        pass
    # The server must not wait for (or buffer) a gigabyte: it answers with an error or closes.
    raw.sock.settimeout(10)
    try:
        head = raw.sock.recv(16)
    except (ConnectionResetError, TimeoutError) as e:
        head = b"" if isinstance(e, ConnectionResetError) else None
    assert head is not None, "server neither answered nor closed a 1 GiB WRITE"
    if head:
        magic, error, _ = struct.unpack(">IIQ", head.ljust(16, b"\0"))
        assert error != 0, "server acknowledged a 1 GiB WRITE it cannot have received"
    raw.close()
    assert _rss_kib(srv.proc.pid) - rss0 < 256 * 1024, "server buffered the huge payload"
    agent.check(0, 100000, seed=6)  # nothing of the junk payload landed
    agent.roundtrip(seed=7)
    _server_still_serves(srv, seed=8)
    _no_internal_errors(srv)


def test_robustness_read_of_1gib_is_einval_and_connection_survives(jsnap_server):
    srv = jsnap_server({"vol": "16M"})
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    raw.write(4096, b"q" * 4096)
    raw.send_request(CMD_READ, 0, GiB)  # beyond the export and the maximum block size
    error, _, _ = raw.reply()
    assert error == 22  # NBD_EINVAL
    raw.send_request(CMD_READ, 0, 64 * MiB)  # within 32 bits, above the 32 MiB maximum
    error, _, _ = raw.reply()
    assert error == 22
    assert raw.read(4096, 4096) == b"q" * 4096
    raw.close()
    _no_internal_errors(srv)


def test_robustness_disconnect_mid_request_does_not_disturb_others(jsnap_server,
                                                                  agent_factory):
    srv = jsnap_server({"vol": "64M"})
    agent = agent_factory(srv.uri("vol"))
    agent.write(0, 1 * MiB, seed=9)
    # 1. Half a WRITE payload, then gone: nothing of it may land.
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    raw.send_request(CMD_WRITE, 0, 1 * MiB)
    raw.sock.sendall(b"\xee" * (MiB // 2))
    raw.close()
    # 2. A 32 MiB READ, gone before the reply (the server's send fails).
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    for _ in range(4):
        raw.send_request(CMD_READ, 0, 32 * MiB)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST
    # 3. Gone mid-handshake: after the greeting, mid option header.
    for cut in (0, 4, 11):
        raw = RawClient(srv.socket)
        raw.greeting()
        raw.sock.sendall((struct.pack(">I", 3) + b"IHAVEOPT" + b"\0" * 8)[:cut])
        raw.close()
    time.sleep(0.3)
    agent.check(0, 1 * MiB, seed=9)
    agent.roundtrip(seed=11)
    # A real client killed mid-transfer (qemu-img writing 32 MiB).
    img = require_tool("qemu-img")
    src = srv.base / "big.raw"
    src.write_bytes(os.urandom(32 * MiB))
    p = subprocess.Popen([img, "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                          srv.uri("vol")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    p.kill()
    p.wait()
    agent.roundtrip(seed=12)
    _server_still_serves(srv, seed=13)
    _no_internal_errors(srv)


def test_robustness_stalled_reader_does_not_block_others(jsnap_server, agent_factory):
    """A client that sends big READs and never reads the replies stalls only itself."""
    srv = jsnap_server({"vol": "64M"})
    agent = agent_factory(srv.uri("vol"))
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    for _ in range(8):
        raw.send_request(CMD_READ, 0, 32 * MiB)
    time.sleep(0.3)
    for seed in range(20, 25):
        agent.roundtrip(seed=seed)
    _server_still_serves(srv, seed=26)
    raw.close()  # now its thread's send fails and it goes
    agent.roundtrip(seed=27)
    _no_internal_errors(srv)


# -- signals ----------------------------------------------------------------------------------


def _wait_for_data(uri: str, start: int, end: int, timeout: float = 20.0) -> None:
    """Poll `nbdinfo --map` until some of [start, end) of a fresh volume is data."""
    nbdinfo = require_tool("nbdinfo")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in json.loads(run([nbdinfo, "--map", "--json", uri]).stdout):
            if e["type"] & 1 == 0 and e["offset"] < end and e["offset"] + e["length"] > start:
                return
        time.sleep(0.05)
    pytest.fail(f"no data written in [{start}, {end}) after {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_signal_during_fio_exits_0_and_keeps_flushed_data(jsnap_server, tmp_path, sig):
    """fio writes region A (16 MiB) and finishes (its FLUSH acknowledged); then, while fio
    writes region B (32 MiB) and a libnbd writer streams stamped blocks into region C
    (64 MiB), flushing every 64 blocks, the server gets the signal. It must exit 0 promptly;
    after a restart region A verifies (fio verify_only), and every block of C acknowledged
    before the last acknowledged FLUSH is there (in fact every acknowledged block: a clean
    stop makes the whole journal durable)."""
    fio = require_tool("fio")
    srv = jsnap_server({"vol": "128M"})
    uri = srv.uri("vol")
    common = ["--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=32",
              "--verify=crc32c", "--offset=0", "--size=16M", "--randseed=1234",
              "--verify_state_save=0"]
    run([fio, "--name=a", *common, "--do_verify=0", "--end_fsync=1"], timeout=120,
        cwd=tmp_path)

    c_first, c_count = 64 * MiB // 4096, 64 * MiB // 4096
    writer = StampWriter(uri, c_first, c_count, flush_every=64)
    assert writer.ready.wait(30)
    b = subprocess.Popen([fio, "--name=b", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                          "--bssplit=4k/50:64k/50", "--iodepth=32", "--offset=16M",
                          "--size=32M", "--time_based", "--runtime=30"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=tmp_path)
    try:
        writer.wait_for(lambda: len(writer.flushes) >= 3)
        _wait_for_data(uri, 16 * MiB, 48 * MiB)  # fio B is writing
        time.sleep(0.2)
        assert b.poll() is None, b.stdout.read() if b.stdout else ""
        t_sig = time.monotonic()
        rc = srv.stop(sig=sig, expect_rc=None)
        stop_time = time.monotonic() - t_sig
    finally:
        b.kill()
        b.wait()
        writer.stop()
    assert rc == 0, f"jsnap serve exited {rc} on {sig.name}\n{srv.log_text()}"
    assert stop_time < 15, f"stopping took {stop_time:.1f} s"
    assert "stopped; journal is durable" in srv.log_text()
    assert not writer.completed, "the stamp writer finished before the signal"
    assert writer.error is not None, "the stamp writer saw no end of the server"

    srv.start()
    run([fio, "--name=a", *common, "--verify_only=1", "--verify_fatal=1"], timeout=120,
        cwd=tmp_path)
    got = read_stamps(uri, c_first + c_count)[c_first:]
    assert writer.flushes, "no FLUSH was acknowledged"
    last_flushed = writer.flushes[-1][0] - c_first
    assert got[:last_flushed + 1] == [1] * (last_flushed + 1), (
        "blocks written before the last acknowledged FLUSH are missing after restart")
    last_acked = max(writer.acks) - c_first
    assert got[:last_acked + 1] == [1] * (last_acked + 1), (
        "acknowledged blocks lost across a clean stop")
    assert all(v in (1, "z") for v in got), "torn or foreign blocks in region C"


def test_serve_restart_keeps_volume_and_snapshot_images(jsnap_server, tmp_path):
    """qemu-img writes an image, a snapshot is taken, part of the volume is overwritten; after
    SIGTERM and a restart (journal replay) the snapshot still equals the image and the
    volume holds the overwrite."""
    img = require_tool("qemu-img")
    srv = jsnap_server({"vol": "16M"})
    orig = tmp_path / "orig.raw"
    data = make_image(orig, 16 * MiB, seed=21)
    run([img, "convert", "-n", "-f", "raw", "-O", "raw", str(orig), srv.uri("vol")])
    srv.cli("snapshot", "create", "vol", "s")
    run([require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x77 100000 3000000",
         srv.uri("vol")])
    srv.restart()
    assert srv.returncodes == [0]
    run([img, "compare", "-f", "raw", "-F", "raw", str(orig), srv.uri("vol@s")])
    new = tmp_path / "new.raw"
    new.write_bytes(data[:100000] + b"\x77" * 3000000 + data[3100000:])
    run([img, "compare", "-f", "raw", "-F", "raw", str(new), srv.uri("vol")])


def test_robustness_delete_under_connected_clients(jsnap_server, agent_factory):
    """Deleting a snapshot (and a volume) whose export a client has open: that client's
    requests fail with an error (never stale or foreign data, never a crash), other clients
    and exports carry on, and the deleted names are gone from the export list."""
    srv = jsnap_server({"vol": "8M", "other": "8M"})
    agent = agent_factory(srv.uri("vol"))
    agent.write(0, 100000, seed=30)
    srv.cli("snapshot", "create", "vol", "s")
    snap_reader = agent_factory(srv.uri("vol@s"))
    snap_reader.check(0, 100000, seed=30)
    other = agent_factory(srv.uri("other"))
    other.write(0, 50000, seed=31)

    srv.cli("snapshot", "delete", "vol", "s")
    r = snap_reader.call(op="check", off=0, len=100000, seed=30)
    assert r["ok"] is False, f"read of a deleted snapshot succeeded: {r}"
    agent.check(0, 100000, seed=30)

    srv.cli("volume", "delete", "vol")
    r = agent.call(op="check", off=0, len=100000, seed=30)
    assert r["ok"] is False, f"read of a deleted volume succeeded: {r}"
    r = agent.call(op="write", off=0, len=4096, seed=32)
    assert r["ok"] is False, f"write to a deleted volume succeeded: {r}"
    other.check(0, 50000, seed=31)
    other.roundtrip(seed=33)
    p = run([require_tool("nbdinfo"), "--list", "--json", srv.uri()])
    assert {e["export-name"] for e in json.loads(p.stdout)["exports"]} == {"other"}
    # A volume created again under the same name is a new, empty volume, and the old
    # connections do not silently switch to the new volume or snapshot.
    srv.cli("volume", "create", "vol", "--size", "8M")
    srv.cli("snapshot", "create", "vol", "s")
    fresh = agent_factory(srv.uri("vol"))
    r = fresh.call(op="check", off=0, len=100000, seed=30)
    assert r == {"ok": True, "match": False}
    fresh.write(0, 4096, seed=34)
    r = agent.call(op="check", off=0, len=4096, seed=34)
    assert r["ok"] is False, f"old connection reads the new volume: {r}"
    r = snap_reader.call(op="check", off=0, len=4096, seed=34)
    assert r["ok"] is False, f"old snapshot connection reads the new snapshot: {r}"
    assert srv.running
    _no_internal_errors(srv)


def test_serve_sigkill_mid_stream_replays_acknowledged_writes(jsnap_server):
    """SIGKILL (no clean stop) while a libnbd writer streams stamped blocks and right after a
    snapshot: the journal file survives a process crash, so after a restart (journal replay)
    every acknowledged block is there, and the snapshot exists and holds every block
    acknowledged before it was taken and none issued after it returned."""
    srv = jsnap_server({"vol": "64M"}, journal_size="4M")  # the writer wraps the journal
    uri = srv.uri("vol")
    count = 64 * MiB // 4096
    writer = StampWriter(uri, 0, count)
    try:
        assert writer.ready.wait(30)
        writer.wait_for(lambda: len(writer.acks) >= 1500)
        t0 = time.monotonic()
        srv.admin("POST", "/v1/volumes/vol/snapshots", {"name": "s"})
        t1 = time.monotonic()
        writer.wait_for(lambda: sum(ti > t1 for ti, _ in writer.acks.values()) >= 1500)
        srv.kill()
    finally:
        writer.stop()
    assert not writer.completed and writer.error is not None
    acked = sorted(writer.acks)
    assert acked == list(range(len(acked)))

    srv.start()
    assert "replayed" in srv.log_text()
    got = read_stamps(uri, count)
    n = len(acked)
    assert got[:n] == [1] * n, (
        f"acknowledged blocks lost by a crash: {[i for i in range(n) if got[i] != 1][:10]}")
    assert all(v in (1, "z") for v in got), "torn or foreign blocks after replay"
    assert got[n + 1:] == ["z"] * (count - n - 1)  # block n may have been in flight
    snap = read_stamps(srv.uri("vol@s"), count)
    before = [i for i, (_, ta) in writer.acks.items() if ta < t0]
    after = [i for i, (ti, _) in writer.acks.items() if ti > t1]
    assert all(snap[i] == 1 for i in before), "snapshot lost blocks acknowledged before it"
    assert all(snap[i] == "z" for i in after), "snapshot holds blocks written after it"
