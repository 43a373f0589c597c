"""Fuzz a running `jsnap serve` over raw sockets: nothing a client sends may hurt the server
or another client.

One real server (interop_util.JsnapServer: CLI-made pool, `python -m jsnap serve` on a unix
socket) serves volume "fuzz" (the target, with snapshot "fuzz@s" read-only) and volume "good".
Hypothesis generates, per example, either
  * a handshake byte stream: client flags, then options built from valid ones with mutated
    fields (magic, option number, declared length vs. real length, export names, info and
    meta-context payloads, random bytes), possibly truncated anywhere; or
  * a valid handshake (RawClient's, or one negotiating structured replies and
    base:allocation as qemu does) followed by transmission requests: half well-formed
    (real commands and flags, odd offsets and lengths inside the export), half wild
    (random or edge-case magic, flags, command types, offsets and lengths: out of range,
    misaligned, 2^32-1, 2^64-1), WRITE payloads possibly shorter than announced;
sent at once on a fresh connection, which is then half-closed (so every example ends at EOF
instead of a timeout). Afterwards:
  * the server must close that connection (it saw EOF) and still be running;
  * what it answered parses as whole replies, each to a request that was sent and not yet
    answered (READ data as long as asked; structured chunks inside the request's range);
  * a "good" connection held open across all examples still reads the pattern it wrote at
    the start (another volume: nothing leaks across), and a fresh connection can write and
    read back (jsnap.stores.nbd_client);
  * the server log shows no traceback or "internal error".
Reproducible: derandomize=True (examples derive from the test), no example database; any
failing input found is pinned below as an @example.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

# The server and raw-socket helpers live with the interop tests: import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
from interop_util import JsnapServer  # noqa: E402
from raw_nbd import IHAVEOPT, RawClient  # noqa: E402

from jsnap.nbd import constants as c  # noqa: E402
from jsnap.stores.nbd_client import NbdClient, NbdError  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB
PATTERN = random.Random(1).randbytes(256 * 1024)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def mostly(draw, common: st.SearchStrategy, rare: st.SearchStrategy):
    """Draw from `common` four times in five: most examples get deep into the protocol."""
    return draw(common) if draw(st.integers(0, 4)) else draw(rare)


names = st.sampled_from(["fuzz", "fuzz@s", "", "good", "nope", "fuzz@", "@s", "fuzz@nope",
                         "x" * 5000])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = JsnapServer(tmp_path_factory.mktemp("fuzz"))
    srv.init("4M", "writeback", "4K")
    srv.cli("volume", "create", "fuzz", "--size", str(SIZE))
    srv.cli("volume", "create", "good", "--size", str(SIZE))
    srv.start()
    try:
        with NbdClient(srv.socket, "fuzz") as fuzz:  # data here and there: reads meet data
            for off in range(0, SIZE, 4 * MiB):
                fuzz.pwrite(PATTERN, off + 123 * 512)
        srv.admin("POST", "/v1/volumes/fuzz/snapshots", {"name": "s"})
        with NbdClient(srv.socket, "good") as good:
            good.pwrite(PATTERN, 0)
            yield srv, good
    finally:
        srv.teardown()  # SIGTERM: must exit 0 after all that


def _still_fine(server, seed: int) -> None:
    srv, good = server
    assert srv.running, srv.log_text()
    assert good.pread(len(PATTERN), 0) == PATTERN, "another volume changed under the fuzzer"
    data = random.Random(seed).randbytes(65536)
    off = MiB + 512 * (seed % 20000)  # clear of PATTERN
    with NbdClient(srv.socket, "good") as fresh:
        fresh.pwrite(data, off)
        assert fresh.pread(len(data), off) == data
    log = srv.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]


def _send_and_drain(sock: socket.socket, data: bytes) -> bytes:
    """Send all (the server may close early), half-close, read until the server closes;
    return what it sent."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(got)
        except TimeoutError:
            pytest.fail("the server kept the connection open 10 s after the client's EOF")
        if not chunk:
            return bytes(got)
        got += chunk


def _check_replies(got: bytes, requests: list[bytes]) -> int:
    """Whatever the server answered is a run of whole simple replies (no structured replies
    were negotiated), each to a distinct request that was sent, READ data exactly as long
    as asked."""
    sent = {}
    for r in requests:
        _, _, cmd, cookie, _, length = struct.unpack_from(">IHHQQI", r)
        sent[cookie] = (cmd, length)
    pos = 0
    while pos < len(got):
        assert len(got) - pos >= 16, f"partial reply header at byte {pos}"
        magic, error, cookie = struct.unpack_from(">IIQ", got, pos)
        assert magic == c.NBD_SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x} at byte {pos}"
        assert cookie in sent, f"reply to cookie {cookie}, never sent (or answered twice)"
        cmd, length = sent.pop(cookie)
        pos += 16 + (length if cmd == c.NBD_CMD_READ and not error else 0)
        assert pos <= len(got), f"READ reply cut short: {pos - len(got)} bytes missing"
    return len(requests) - len(sent)


def _structured_handshake(raw: RawClient, export: str) -> None:
    """Greeting, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT base:allocation, NBD_OPT_GO
    (sent at once, answered in order): transmission with structured replies and block
    status, which is how qemu talks."""
    raw.greeting()
    name, query = export.encode(), b"base:allocation"
    meta = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    opts = [(c.NBD_OPT_STRUCTURED_REPLY, b""), (c.NBD_OPT_SET_META_CONTEXT, meta),
            (c.NBD_OPT_GO, go)]
    raw.sock.sendall(struct.pack(">I", c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES)
                     + b"".join(IHAVEOPT + struct.pack(">II", o, len(d)) + d for o, d in opts))
    for opt, _ in opts:
        while True:
            _, ropt, rtype, length = struct.unpack(">QIII", raw.recv_exact(20))
            payload = raw.recv_exact(length)
            assert ropt == opt and not rtype & c.NBD_REP_FLAG_ERROR, (opt, rtype, payload)
            if rtype == c.NBD_REP_ACK:
                break


def _check_structured_replies(got: bytes, requests: list[bytes]) -> int:
    """Structured replies were negotiated: every reply is a simple reply (not for a READ that
    succeeded) or a run of structured chunks ending with NBD_REPLY_FLAG_DONE, for a request
    sent and not finished yet; READ chunks stay inside the request's range."""
    sent = {}
    for r in requests:
        _, _, cmd, cookie, off, length = struct.unpack_from(">IHHQQI", r)
        sent[cookie] = (cmd, off, length)
    finished = 0
    pos = 0
    while pos < len(got):
        (magic,) = struct.unpack_from(">I", got, pos)
        if magic == c.NBD_SIMPLE_REPLY_MAGIC:
            _, error, cookie = struct.unpack_from(">IIQ", got, pos)
            assert cookie in sent, f"simple reply to cookie {cookie}: not sent or finished"
            assert error or sent[cookie][0] != c.NBD_CMD_READ, "simple reply to a READ"
            del sent[cookie]
            finished += 1
            pos += 16
            continue
        assert magic == c.NBD_STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x} at {pos}"
        assert len(got) - pos >= 20, f"partial chunk header at byte {pos}"
        _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", got, pos)
        payload = got[pos + 20 : pos + 20 + length]
        assert len(payload) == length, f"chunk cut short at byte {pos}"
        assert cookie in sent, f"chunk for cookie {cookie}: not sent or finished"
        cmd, off, n = sent[cookie]
        if rtype in (c.NBD_REPLY_TYPE_OFFSET_DATA, c.NBD_REPLY_TYPE_OFFSET_HOLE):
            assert cmd == c.NBD_CMD_READ, f"data chunk for command {cmd}"
            (at,) = struct.unpack_from(">Q", payload)
            size = length - 8 if rtype == c.NBD_REPLY_TYPE_OFFSET_DATA else \
                struct.unpack_from(">I", payload, 8)[0]
            assert off <= at and at + size <= off + n, f"READ chunk {at}+{size} outside request"
        elif rtype == c.NBD_REPLY_TYPE_BLOCK_STATUS:
            assert cmd == c.NBD_CMD_BLOCK_STATUS and length >= 12 and (length - 4) % 8 == 0
        event(f"structured chunk type {rtype}")
        pos += 20 + length
        if flags & c.NBD_REPLY_FLAG_DONE:
            del sent[cookie]
            finished += 1
    return finished


# -- handshake ----------------------------------------------------------------------------------


@st.composite
def option_data(draw, opt: int) -> bytes:
    name = draw(names).encode()
    kind = draw(st.sampled_from(["go", "meta", "raw", "empty"]))
    if kind == "go":  # NBD_OPT_GO / INFO layout: name, info requests
        infos = draw(st.lists(st.one_of(st.integers(0, 4), u16), max_size=4))
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))
    if kind == "meta":  # LIST/SET_META_CONTEXT layout: name, queries
        queries = draw(st.lists(st.sampled_from([b"base:allocation", b"base:", b"qemu:x",
                                                 b"", b"\xff" * 10]), max_size=3))
        return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
                + b"".join(struct.pack(">I", len(q)) + q for q in queries))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    return name if opt == c.NBD_OPT_EXPORT_NAME else b""


@st.composite
def option(draw) -> bytes:
    opt = mostly(draw, st.integers(1, 12), u32)
    data = draw(option_data(opt))
    length = mostly(draw, st.just(len(data)), st.one_of(st.integers(0, 80), u32))
    magic = mostly(draw, st.just(IHAVEOPT), st.sampled_from([b"IHAVEOPU", b"\0" * 8]))
    return magic + struct.pack(">II", opt, length) + data


@st.composite
def handshake_stream(draw) -> bytes:
    flags = mostly(draw, st.sampled_from([1, 3]), u32)
    stream = struct.pack(">I", flags) + b"".join(draw(st.lists(option(), min_size=1,
                                                                max_size=5)))
    if draw(st.booleans()):
        stream = stream[: draw(st.integers(0, len(stream)))]
    return stream


@FUZZ
@given(stream=handshake_stream())
@example(stream=struct.pack(">I", 3) + IHAVEOPT + struct.pack(">II", 7, 0xFFFFFFFF))
@example(stream=struct.pack(">I", 3) + IHAVEOPT + struct.pack(">II", c.NBD_OPT_EXPORT_NAME, 4)
         + b"fuzz" + b"\x25\x60\x95\x13" + b"\xff" * 24)
@example(stream=struct.pack(">I", 0xFFFFFFFF) + b"\0" * 100)
def test_fuzz_server_handshake(server, stream):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(server[0].socket)
    try:
        _send_and_drain(sock, stream)
    finally:
        sock.close()
    _still_fine(server, len(stream))


# -- transmission -------------------------------------------------------------------------------

_FLAGS = [0, c.NBD_CMD_FLAG_FUA, c.NBD_CMD_FLAG_NO_HOLE, c.NBD_CMD_FLAG_DF,
          c.NBD_CMD_FLAG_REQ_ONE, c.NBD_CMD_FLAG_FAST_ZERO, c.NBD_CMD_FLAG_PAYLOAD_LEN,
          c.NBD_CMD_FLAG_FUA | c.NBD_CMD_FLAG_NO_HOLE]
_OFFSETS = [0, 1, 511, 4096, SIZE - 4096, SIZE - 1, SIZE, SIZE + 1, (1 << 63) - 1, 1 << 63,
            (1 << 64) - 1]
_LENGTHS = [0, 1, 511, 512, 4096, 65536, 32 * MiB, 32 * MiB + 1, 1 << 31, (1 << 32) - 1]


_VALID = {  # command: the flags it may carry
    c.NBD_CMD_READ: [0, c.NBD_CMD_FLAG_DF],
    c.NBD_CMD_WRITE: [0, c.NBD_CMD_FLAG_FUA],
    c.NBD_CMD_FLUSH: [0],
    c.NBD_CMD_TRIM: [0, c.NBD_CMD_FLAG_FUA],
    c.NBD_CMD_CACHE: [0],
    c.NBD_CMD_WRITE_ZEROES: [0, c.NBD_CMD_FLAG_FUA, c.NBD_CMD_FLAG_NO_HOLE,
                             c.NBD_CMD_FLAG_FAST_ZERO],
    c.NBD_CMD_BLOCK_STATUS: [0, c.NBD_CMD_FLAG_REQ_ONE],
}


@st.composite
def request(draw) -> bytes:
    if draw(st.booleans()):
        # Well-formed: a real command inside the export, so requests reach the engine
        # (reads, writes, zeroes, extents of a thin volume) with odd offsets and lengths.
        magic, cmd = c.NBD_REQUEST_MAGIC, draw(st.sampled_from(sorted(_VALID)))
        flags = draw(st.sampled_from(_VALID[cmd]))
        offset = draw(st.integers(0, SIZE - 1))
        length = draw(st.integers(0, min(SIZE - offset, MiB)))
    else:
        # A bad magic ends the connection, so it is rare (one request in 16).
        magic = c.NBD_REQUEST_MAGIC if draw(st.integers(0, 15)) else draw(st.sampled_from(
            [c.NBD_EXTENDED_REQUEST_MAGIC, c.NBD_SIMPLE_REPLY_MAGIC, 0]))
        flags = mostly(draw, st.sampled_from(_FLAGS), u16)
        cmd = mostly(draw, st.integers(0, 9), u16)
        offset = mostly(draw, st.one_of(st.sampled_from(_OFFSETS), st.integers(0, SIZE)), u64)
        length = mostly(draw, st.one_of(st.sampled_from(_LENGTHS), st.integers(0, MiB)), u32)
    out = struct.pack(">IHHQQI", magic, flags, cmd, 0, offset, length)  # cookie: set later
    if cmd == c.NBD_CMD_WRITE:
        # The whole payload when small, sometimes less than announced (then EOF mid-payload).
        n = min(length, draw(st.sampled_from([length, 65536, 0, 100])))
        out += bytes([draw(st.integers(0, 255))]) * min(n, 65536)
    return out


@FUZZ
@given(export=st.sampled_from(["fuzz", "fuzz", "fuzz@s"]),
       requests=st.lists(request(), min_size=1, max_size=6),
       disc=st.booleans(), structured=st.booleans())
@example(export="fuzz", requests=[struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0,
                                              c.NBD_CMD_WRITE, 1, 0, 1 << 30)], disc=False,
         structured=False)
@example(export="fuzz@s", requests=[struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0,
                                                c.NBD_CMD_TRIM, 1, 0, SIZE)], disc=True,
         structured=False)
@example(export="fuzz", requests=[struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0,
                                              c.NBD_CMD_BLOCK_STATUS, 1, SIZE - 1, 2)],
         disc=True, structured=True)
def test_fuzz_server_transmission(server, export, requests, disc, structured):
    # Distinct cookies, so every reply can be matched to its request.
    requests = [r[:8] + struct.pack(">Q", i + 1) + r[16:] for i, r in enumerate(requests)]
    raw = RawClient(server[0].socket)
    try:
        if structured:
            _structured_handshake(raw, export)
        else:
            assert raw.handshake(export) == SIZE
        tail = struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0, 0, 0)
        got = _send_and_drain(raw.sock, b"".join(requests) + (tail if disc else b""))
    finally:
        raw.close()
    check = _check_structured_replies if structured else _check_replies
    answered = check(got, requests)
    event(f"answered {answered if answered < 3 else '3+'} of {len(requests)} requests"
          f"{' (structured)' if structured else ''}")
    _still_fine(server, sum(map(len, requests)))


def test_client_error_replies_carry_errno_and_keep_the_connection(server):
    """jsnap.stores.nbd_client, the well-behaved side above: an error reply is an NbdError with the
    errno, and the connection goes on."""
    srv, good = server
    with pytest.raises(NbdError) as e:
        good.pread(4096, SIZE - 512)  # past the end
    assert e.value.errno == errno.EINVAL and e.value.nbd_error == c.NBD_EINVAL
    with NbdClient(srv.socket, "fuzz@s") as ro:
        assert ro.read_only and ro.size == SIZE
        with pytest.raises(NbdError) as e:
            ro.pwrite(b"x" * 512, 0)
        assert e.value.errno == errno.EPERM
        ro.pread(512, 0)
    with pytest.raises(NbdError, match="no export named"):
        NbdClient(srv.socket, "nope")
    assert good.pread(len(PATTERN), 0) == PATTERN
