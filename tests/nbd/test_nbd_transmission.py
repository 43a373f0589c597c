"""Transmission phase of the server codec: request bytes <-> events, answers <-> reply bytes,
and the receive buffer."""

from __future__ import annotations

import errno
import struct

import pytest
from nbd_client import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    DONE,
    F_DF,
    F_FAST_ZERO,
    F_FUA,
    F_NO_HOLE,
    F_REQ_ONE,
    T_BLOCK_STATUS,
    T_DATA,
    T_ERROR,
    T_ERROR_OFFSET,
    T_HOLE,
    T_NONE,
    Chunk,
    SimpleReply,
    drain,
    handshake,
    join,
    parse_replies,
    request,
)

from jsnap.nbd import (
    NEED_DATA,
    BlockStatus,
    Cache,
    ConnectionClosed,
    Event,
    ExportInfo,
    Flush,
    LocalProtocolError,
    Read,
    RejectedRequest,
    RemoteProtocolError,
    Request,
    ServerConnection,
    State,
    Trim,
    Write,
    WriteZeroes,
)
from jsnap.nbd.constants import (
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_EXTENDED_REQUEST_MAGIC,
)
from jsnap.nbd.transmission import MAX_CHUNK_DATA, zeroes

PLAIN = ExportInfo("disk", 1 << 20, can_df=False)  # no optional feature at all


def conn_for(kind: str) -> ServerConnection:
    """'full': structured + base:allocation + every feature; 'simple': no structured
    replies; 'plain': structured, no meta context, no optional feature."""
    if kind == "full":
        return handshake()
    if kind == "simple":
        return handshake(structured=False, meta=())
    return handshake(meta=(), info=PLAIN)


def test_transmission_flags_of_the_full_connection() -> None:
    conn = conn_for("full")
    # bits: HAS_FLAGS 0, FLUSH 2, FUA 3, TRIM 5, WRITE_ZEROES 6, DF 7, MULTI_CONN 8,
    # CACHE 10, FAST_ZERO 11 (no READ_ONLY 1, ROTATIONAL 4, RESIZE 9)
    assert conn.transmission_flags == sum(1 << b for b in (0, 2, 3, 5, 6, 7, 8, 10, 11))
    assert conn.state is State.TRANSMISSION


# --- request bytes -> event ---------------------------------------------------------------

REQUESTS = [
    pytest.param("full", request(CMD_READ, 7, 4096, 512), Read(7, 4096, 512, 0), id="read"),
    pytest.param("full", request(CMD_READ, 7, 0, 512, F_FUA | F_DF),
                 Read(7, 0, 512, F_FUA | F_DF), id="read-fua-df"),
    pytest.param("full", request(CMD_WRITE, 2**64 - 1, 0, 3, F_FUA, b"abc"),
                 Write(2**64 - 1, 0, 3, F_FUA, memoryview(b"abc")), id="write-fua-max-cookie"),
    pytest.param("full", request(CMD_WRITE, 1, 0, 0), Write(1, 0, 0, 0, memoryview(b"")),
                 id="write-empty"),
    pytest.param("full", request(CMD_FLUSH, 3), Flush(3, 0, 0, 0), id="flush"),
    pytest.param("full", request(CMD_FLUSH, 3, flags=F_FUA), Flush(3, 0, 0, F_FUA),
                 id="flush-fua"),
    pytest.param("full", request(CMD_TRIM, 4, 512, 1024, F_FUA), Trim(4, 512, 1024, F_FUA),
                 id="trim-fua"),
    pytest.param("full", request(CMD_CACHE, 5, 0, 65536), Cache(5, 0, 65536, 0), id="cache"),
    pytest.param("full", request(CMD_WRITE_ZEROES, 6, 0, 4096, F_NO_HOLE | F_FAST_ZERO | F_FUA),
                 WriteZeroes(6, 0, 4096, F_NO_HOLE | F_FAST_ZERO | F_FUA),
                 id="write-zeroes-all-flags"),
    pytest.param("plain", request(CMD_WRITE_ZEROES, 6, 0, 4096, F_NO_HOLE),
                 WriteZeroes(6, 0, 4096, F_NO_HOLE), id="write-zeroes-no-hole-always-valid"),
    pytest.param("full", request(CMD_BLOCK_STATUS, 8, 0, 1 << 20, F_REQ_ONE),
                 BlockStatus(8, 0, 1 << 20, F_REQ_ONE), id="block-status-req-one"),
    pytest.param("simple", request(CMD_READ, 9, 0, 1), Read(9, 0, 1, 0), id="read-simple"),
    pytest.param("full", request(CMD_DISC), ConnectionClosed("disconnect"), id="disc"),
    pytest.param("plain", request(CMD_DISC, flags=0xFFFF, offset=1, length=2),
                 ConnectionClosed("disconnect"), id="disc-whatever-its-fields"),
]


@pytest.mark.parametrize(("kind", "data", "expected"), REQUESTS)
def test_request_bytes_to_event(kind: str, data: bytes, expected: Event) -> None:
    conn = conn_for(kind)
    conn.receive_data(data)
    assert conn.next_event() == expected


REJECTED = [
    pytest.param("full", request(8, 1), "unknown", id="resize-unknown"),
    pytest.param("full", request(0xFFFF, 1, flags=F_FUA), "unknown", id="command-65535"),
    pytest.param("full", request(CMD_READ, 1, 0, 512, 1 << 15), "0x8000", id="unknown-flag"),
    pytest.param("full", request(CMD_READ, 1, 0, 512, F_REQ_ONE), "0x0008",
                 id="req-one-on-read"),
    pytest.param("simple", request(CMD_READ, 1, 0, 512, F_DF), "0x0004",
                 id="df-without-structured"),
    pytest.param("plain", request(CMD_READ, 1, 0, 512, F_DF), "0x0004", id="df-without-can-df"),
    pytest.param("plain", request(CMD_TRIM, 1, 0, 512, F_FUA), "0x0001", id="fua-not-advertised"),
    pytest.param("plain", request(CMD_WRITE_ZEROES, 1, 0, 512, F_FAST_ZERO), "0x0010",
                 id="fast-zero-not-advertised"),
    pytest.param("full", request(CMD_FLUSH, 1, 0, 0, F_NO_HOLE), "0x0002", id="no-hole-on-flush"),
    pytest.param("full", request(CMD_WRITE_ZEROES, 1, 0, 512, 1 << 5), "0x0020",
                 id="payload-len-flag"),
    pytest.param("full", request(CMD_FLUSH, 1, 0, 512), "nonzero", id="flush-with-length"),
    pytest.param("full", request(CMD_FLUSH, 1, 512, 0), "nonzero", id="flush-with-offset"),
    pytest.param("plain", request(CMD_BLOCK_STATUS, 1, 0, 512), "metadata context",
                 id="block-status-without-context"),
    pytest.param("simple", request(CMD_BLOCK_STATUS, 1, 0, 512), "metadata context",
                 id="block-status-without-structured"),
    pytest.param("full", request(CMD_WRITE, 1, 0, 2, F_DF, b"xy"), "0x0004",
                 id="write-bad-flag-payload-skipped"),
]


@pytest.mark.parametrize(("kind", "data", "reason"), REJECTED)
def test_rejected_requests_carry_einval_and_the_stream_goes_on(kind: str, data: bytes,
                                                               reason: str) -> None:
    conn = conn_for(kind)
    conn.receive_data(data + request(CMD_FLUSH, 99))
    ev = conn.next_event()
    assert isinstance(ev, RejectedRequest)
    assert ev.error == errno.EINVAL
    assert reason in ev.reason
    _, flags, command, cookie, offset, length = struct.unpack_from(">IHHQQI", data)
    assert (ev.cookie, ev.offset, ev.length, ev.flags, ev.command) == (
        cookie, offset, length, flags, command)
    assert conn.next_event() == Flush(99, 0, 0, 0)
    # and it is answered with an error, in the negotiated style
    replies = parse_replies(conn.reply_error(ev, ev.error, ev.reason))
    if kind == "simple":
        assert replies == [SimpleReply(ev.cookie, NBD_EINVAL)]
    else:
        assert isinstance(replies[0], Chunk)
        assert replies[0].error() == (NBD_EINVAL, ev.reason, None)


@pytest.mark.parametrize("data", [
    pytest.param(request(CMD_READ)[:3] + b"\0" + request(CMD_READ)[4:], id="bad-magic"),
    pytest.param(struct.pack(">IHHQQQI", NBD_EXTENDED_REQUEST_MAGIC, 0, 0, 1, 0, 0, 0),
                 id="extended-header"),
    pytest.param(request(CMD_WRITE, 1, 0, (32 << 20) + 1), id="write-over-32-mib"),
])
def test_request_protocol_errors(data: bytes) -> None:
    conn = conn_for("full")
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR


def test_write_cap_follows_max_payload() -> None:
    conn = handshake(ServerConnection(max_payload=1024),
                     info=ExportInfo("disk", 1 << 20, preferred_block_size=512,
                                     max_block_size=1024))
    conn.receive_data(request(CMD_WRITE, 1, 0, 1024, payload=bytes(1024)))
    assert isinstance(conn.next_event(), Write)
    conn.receive_data(request(CMD_WRITE, 1, 0, 1025))
    with pytest.raises(RemoteProtocolError, match="1025"):
        conn.next_event()


@pytest.mark.parametrize(("tail", "outcome"), [
    pytest.param(b"", "eof", id="at-boundary"),
    pytest.param(request(CMD_READ)[:27], "error", id="inside-header"),
    pytest.param(request(CMD_WRITE, 1, 0, 10, payload=b"12345"), "error", id="inside-payload"),
])
def test_eof_during_transmission(tail: bytes, outcome: str) -> None:
    conn = conn_for("full")
    conn.receive_data(tail)
    conn.receive_data(b"")
    if outcome == "eof":
        assert conn.next_event() == ConnectionClosed("eof")
    else:
        with pytest.raises(RemoteProtocolError, match="mid-message"):
            conn.next_event()


def test_many_requests_in_one_buffer_then_disc() -> None:
    conn = conn_for("full")
    conn.receive_data(request(CMD_WRITE, 1, 0, 4, payload=b"abcd")
                      + request(CMD_READ, 2, 0, 4) + request(CMD_WRITE, 3, 4, 2, payload=b"ef")
                      + request(CMD_DISC) + request(CMD_READ, 4))
    events = drain(conn)
    assert events == [Write(1, 0, 4, 0, memoryview(b"abcd")), Read(2, 0, 4, 0),
                      Write(3, 4, 2, 0, memoryview(b"ef")), ConnectionClosed("disconnect")]
    # Both payloads stay valid until the next get_buffer()/receive_data().
    first, third = events[0], events[2]
    assert isinstance(first, Write) and isinstance(third, Write)
    assert bytes(first.payload) == b"abcd" and bytes(third.payload) == b"ef"
    # Outstanding requests can still be answered after NBD_CMD_DISC.
    assert parse_replies(conn.reply_ok(first)) == [SimpleReply(1, 0)]
    assert conn.next_event() == ConnectionClosed("disconnect")


def test_request_properties() -> None:
    assert Read(1, 0, 1, F_DF | F_FUA).df and Read(1, 0, 1, F_FUA).fua
    assert not Read(1, 0, 1, 0).df
    wz = WriteZeroes(1, 0, 1, F_NO_HOLE)
    assert wz.no_hole and not wz.fast_zero
    assert BlockStatus(1, 0, 1, F_REQ_ONE).req_one


# --- the receive buffer ----------------------------------------------------------------------


def feed_with_get_buffer(conn: ServerConnection, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        piece = data[i:i + chunk]
        view = conn.get_buffer(len(piece))
        assert len(view) >= len(piece)
        view[:len(piece)] = piece
        conn.buffer_updated(len(piece))


def test_write_payload_is_a_view_into_the_receive_buffer() -> None:
    conn = conn_for("full")
    feed_with_get_buffer(conn, request(CMD_WRITE, 1, 0, 3, payload=b"xyz"), 1000)
    ev = conn.next_event()
    assert isinstance(ev, Write)
    assert ev.payload.obj is conn._rx.buf  # noqa: SLF001  (zero copy)
    assert not ev.payload.readonly


def test_get_buffer_makes_room_for_the_rest_of_a_large_write() -> None:
    conn = handshake(ServerConnection(buffer_size=64))
    header = request(CMD_WRITE, 1, 0, 100_000)
    feed_with_get_buffer(conn, header + b"a" * 10, 64)
    assert conn.next_event() is NEED_DATA
    view = conn.get_buffer(1)
    assert len(view) >= 100_000 - 10
    view[:100_000 - 10] = b"b" * (100_000 - 10)
    conn.buffer_updated(100_000 - 10)
    ev = conn.next_event()
    assert isinstance(ev, Write)
    assert bytes(ev.payload) == b"a" * 10 + b"b" * (100_000 - 10)


def test_buffer_compacts_in_place_and_grows_without_breaking_old_views() -> None:
    conn = handshake(ServerConnection(buffer_size=100))
    conn.receive_data(request(CMD_WRITE, 1, 0, 8, payload=b"12345678") + b"\x25\x60")
    first = conn.next_event()
    assert isinstance(first, Write)
    assert conn.next_event() is NEED_DATA
    buf = conn._rx.buf  # noqa: SLF001
    # 38 of 100 bytes used, 2 unread: room for 90 needs a compaction, not a new buffer.
    conn.receive_data(request(CMD_WRITE, 2, 0, 60, payload=b"z" * 60)[2:])
    assert conn._rx.buf is buf  # noqa: SLF001
    second = conn.next_event()
    assert isinstance(second, Write) and bytes(second.payload) == b"z" * 60
    # Growing allocates a new buffer: `second` keeps the old one alive and intact.
    conn.receive_data(request(CMD_WRITE, 3, 0, 500, payload=b"q" * 500))
    assert conn._rx.buf is not buf  # noqa: SLF001
    assert bytes(second.payload) == b"z" * 60
    third = conn.next_event()
    assert isinstance(third, Write) and bytes(third.payload) == b"q" * 500


def test_buffer_rewinds_when_everything_was_read() -> None:
    conn = handshake(ServerConnection(buffer_size=1000))
    conn.receive_data(request(CMD_FLUSH, 1))
    conn.next_event()
    view = conn.get_buffer(1000)
    assert len(view) == 1000


@pytest.mark.parametrize("nbytes", [-1, 10**6])
def test_buffer_updated_beyond_the_buffer(nbytes: int) -> None:
    conn = ServerConnection()
    conn.get_buffer(10)
    with pytest.raises(LocalProtocolError):
        conn.buffer_updated(nbytes)


@pytest.mark.parametrize("how", ["receive_data", "buffer_updated"])
def test_data_after_eof_is_a_local_error(how: str) -> None:
    conn = ServerConnection()
    conn.get_buffer(4)
    conn.buffer_updated(0)
    with pytest.raises(LocalProtocolError, match="after end of stream"):
        if how == "receive_data":
            conn.receive_data(b"x")
        else:
            conn.get_buffer(1)
            conn.buffer_updated(1)


@pytest.mark.parametrize("kwargs", [{"max_payload": 0}, {"buffer_size": 0}])
def test_constructor_rejects_nonsense(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ServerConnection(**kwargs)


def test_data_after_a_protocol_error_is_dropped() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\xff" * 4)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn.get_buffer(4)
    conn.buffer_updated(4)
    assert conn._rx.end == 0  # noqa: SLF001


# --- answers -> reply bytes ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "simple"])
@pytest.mark.parametrize("req", [
    pytest.param(Write(1, 0, 1, 0, memoryview(b"x")), id="write"),
    pytest.param(Flush(2, 0, 0, 0), id="flush"),
    pytest.param(Trim(3, 0, 512, 0), id="trim"),
    pytest.param(Cache(4, 0, 512, 0), id="cache"),
    pytest.param(WriteZeroes(5, 0, 512, 0), id="write-zeroes"),
])
def test_reply_ok_is_a_simple_reply(kind: str, req: Request) -> None:
    assert parse_replies(conn_for(kind).reply_ok(req)) == [SimpleReply(req.cookie, 0)]


@pytest.mark.parametrize(("err", "nbd_err"), [
    pytest.param(errno.EIO, NBD_EIO, id="eio"),
    pytest.param(errno.EROFS, NBD_EPERM, id="erofs-as-eperm"),
    pytest.param(errno.EDQUOT, NBD_ENOSPC, id="edquot-as-enospc"),
    pytest.param(errno.ENOENT, NBD_EINVAL, id="other-as-einval"),
])
@pytest.mark.parametrize("kind", ["full", "simple"])
def test_reply_error(kind: str, err: int, nbd_err: int) -> None:
    conn = conn_for(kind)
    replies = parse_replies(conn.reply_error(Read(9, 0, 512, 0), err, "boom"))
    if kind == "simple":
        assert replies == [SimpleReply(9, nbd_err)]
    else:
        chunk = replies[0]
        assert isinstance(chunk, Chunk) and len(replies) == 1
        assert (chunk.cookie, chunk.done, chunk.type) == (9, True, T_ERROR)
        assert chunk.error() == (nbd_err, "boom", None)


@pytest.mark.parametrize(("done", "flags"), [(True, DONE), (False, 0)])
def test_reply_error_at(done: bool, flags: int) -> None:
    conn = conn_for("full")
    chunk = parse_replies(conn.reply_error_at(Read(9, 4096, 512, 0), errno.EIO, 4096 + 511,
                                              "bad sector", done=done))[0]
    assert isinstance(chunk, Chunk)
    assert (chunk.flags, chunk.type) == (flags, T_ERROR_OFFSET)
    assert chunk.error() == (NBD_EIO, "bad sector", 4096 + 511)


def test_reply_done() -> None:
    chunk = parse_replies(conn_for("full").reply_done(Trim(3, 0, 512, 0)))[0]
    assert chunk == Chunk(3, DONE, T_NONE, b"")


def test_replies_in_any_order() -> None:
    conn = conn_for("full")
    conn.receive_data(request(CMD_READ, 1, 0, 4) + request(CMD_FLUSH, 2)
                      + request(CMD_READ, 3, 4, 4))
    r1, f2, r3 = drain(conn)
    out = (join(conn.reply_read(r3, [(4, 4, b"3333")])) + conn.reply_ok(f2)
           + join(conn.reply_read(r1, [(0, 4, b"1111")])))
    replies = parse_replies(out)
    assert [r.cookie for r in replies] == [3, 2, 1]


@pytest.mark.parametrize(("call", "kind"), [
    pytest.param(lambda c: c.reply_ok(Read(1, 0, 1, 0)), "full", id="ok-for-read"),
    pytest.param(lambda c: c.reply_ok(BlockStatus(1, 0, 1, 0)), "full", id="ok-for-status"),
    pytest.param(lambda c: c.reply_ok(RejectedRequest(1, 0, 0, 0, 9, 22, "x")), "full",
                 id="ok-for-rejected"),
    pytest.param(lambda c: c.reply_error(Read(1, 0, 1, 0), 0), "full", id="error-zero"),
    pytest.param(lambda c: c.reply_error_at(Read(1, 0, 1, 0), 5, 0), "simple",
                 id="error-at-needs-structured"),
    pytest.param(lambda c: c.reply_error_at(Flush(1, 0, 0, 0), 5, 0), "full",
                 id="error-at-for-flush"),
    pytest.param(lambda c: c.reply_error_at(Read(1, 0, 1, 0), 0, 0), "full",
                 id="error-at-zero"),
    pytest.param(lambda c: c.reply_error_at(Read(1, 10, 5, 0), 5, 15), "full",
                 id="error-at-past-request"),
    pytest.param(lambda c: c.reply_error_at(Read(1, 10, 5, 0), 5, 9), "full",
                 id="error-at-before-request"),
    pytest.param(lambda c: c.reply_done(Trim(1, 0, 1, 0)), "simple", id="done-needs-structured"),
    pytest.param(lambda c: c.reply_done(RejectedRequest(1, 0, 0, 0, 9, 22, "x")), "full",
                 id="done-for-rejected"),
    pytest.param(lambda c: c.reply_read(Trim(1, 0, 1, 0), []), "full", id="read-for-trim"),
    pytest.param(lambda c: c.reply_block_status(Read(1, 0, 1, 0), {}), "full",
                 id="status-for-read"),
])
def test_reply_misuse(call: object, kind: str) -> None:
    with pytest.raises(LocalProtocolError):
        call(conn_for(kind))  # type: ignore[operator]


@pytest.mark.parametrize("call", [
    pytest.param(lambda c: c.reply_ok(Flush(1, 0, 0, 0)), id="ok"),
    pytest.param(lambda c: c.reply_error(Flush(1, 0, 0, 0), 5), id="error"),
    pytest.param(lambda c: c.reply_error_at(Trim(1, 0, 1, 0), 5, 0), id="error-at"),
    pytest.param(lambda c: c.reply_done(Flush(1, 0, 0, 0)), id="done"),
    pytest.param(lambda c: c.reply_read(Read(1, 0, 0, 0), []), id="read"),
    pytest.param(lambda c: c.reply_block_status(BlockStatus(1, 0, 1, 0), {1: [(1, 0)]}),
                 id="block-status"),
])
def test_no_transmission_reply_before_transmission(call: object) -> None:
    with pytest.raises(LocalProtocolError, match="before transmission"):
        call(ServerConnection())  # type: ignore[operator]


# --- READ replies ----------------------------------------------------------------------------

HOLEY = [(0, 4, b"abcd"), (4, 4, None), (8, 2, b"ef")]


def test_read_simple_reply_sends_holes_as_zeroes() -> None:
    conn = conn_for("simple")
    buffers = conn.reply_read(Read(5, 0, 10, 0), HOLEY)
    assert buffers[1] is HOLEY[0][2]  # data passed through, not copied
    assert parse_replies(join(buffers), {5: 10}) == [SimpleReply(5, 0, b"abcd\0\0\0\0ef")]


def test_read_structured_reply_one_chunk_per_piece() -> None:
    conn = conn_for("full")
    replies = parse_replies(join(conn.reply_read(Read(5, 0, 10, 0), HOLEY)))
    assert [(c.type, c.flags) for c in replies if isinstance(c, Chunk)] == [
        (T_DATA, 0), (T_HOLE, 0), (T_DATA, DONE)]
    a, hole, b = (c for c in replies if isinstance(c, Chunk))
    assert a.offset_data() == (0, b"abcd")
    assert hole.offset_hole() == (4, 4)
    assert b.offset_data() == (8, b"ef")


def test_read_structured_reply_ending_with_a_hole() -> None:
    conn = conn_for("full")
    replies = parse_replies(join(conn.reply_read(Read(5, 100, 8, 0),
                                                 [(100, 4, b"abcd"), (104, 4, None)])))
    assert [(c.type, c.flags) for c in replies if isinstance(c, Chunk)] == [
        (T_DATA, 0), (T_HOLE, DONE)]


def test_read_df_is_one_chunk_with_zeroes_present() -> None:
    conn = conn_for("full")
    replies = parse_replies(join(conn.reply_read(Read(5, 0, 10, F_DF), HOLEY)))
    assert len(replies) == 1
    chunk = replies[0]
    assert isinstance(chunk, Chunk) and chunk.done
    assert chunk.offset_data() == (0, b"abcd\0\0\0\0ef")


def test_read_df_all_hole_is_one_hole_chunk() -> None:
    conn = conn_for("full")
    replies = parse_replies(join(conn.reply_read(Read(5, 8, 4, F_DF), [(8, 4, None)])))
    assert replies == [Chunk(5, DONE, T_HOLE, struct.pack(">QI", 8, 4))]


@pytest.mark.parametrize("flags", [0, F_DF])
def test_zero_length_read(flags: int) -> None:
    conn = conn_for("full")
    assert parse_replies(join(conn.reply_read(Read(5, 0, 0, flags), []))) == [
        Chunk(5, DONE, T_NONE, b"")]
    assert parse_replies(join(conn_for("simple").reply_read(Read(5, 0, 0, 0), []))) == [
        SimpleReply(5, 0)]


def test_partial_read_then_error_offset_then_done() -> None:
    conn = conn_for("full")
    req = Read(5, 0, 8, 0)
    out = join(conn.reply_read(req, [(4, 4, b"late")], done=False))
    out += conn.reply_error_at(req, errno.EIO, 0, "first half failed", done=False)
    out += join(conn.reply_read(req, [], done=False))
    out += conn.reply_done(req)
    replies = parse_replies(out)
    assert [(c.type, c.done) for c in replies if isinstance(c, Chunk)] == [
        (T_DATA, False), (T_ERROR_OFFSET, False), (T_NONE, True)]


def test_large_hole_uses_several_views_of_the_zero_block() -> None:
    views = zeroes((1 << 20) * 2 + 5)
    assert [len(v) for v in views] == [1 << 20, 1 << 20, 5]
    assert zeroes(0) == []
    conn = conn_for("simple")
    n = (1 << 20) + 1
    buffers = conn.reply_read(Read(5, 0, n, 0), [(0, n, None)])
    assert sum(len(b) for b in buffers[1:]) == n


@pytest.mark.parametrize(("kind", "req", "pieces", "done"), [
    pytest.param("full", Read(1, 0, 8, 0), [(0, 4, b"abcd")], True, id="gap-at-end"),
    pytest.param("full", Read(1, 0, 8, 0), [(4, 4, b"abcd")], True, id="gap-at-start"),
    pytest.param("full", Read(1, 0, 8, 0), [(0, 4, None), (2, 4, None)], False, id="overlap"),
    pytest.param("full", Read(1, 0, 8, 0), [(4, 4, None), (0, 4, None)], False,
                 id="out-of-order"),
    pytest.param("full", Read(1, 0, 8, 0), [(0, 0, b"")], False, id="empty-piece"),
    pytest.param("full", Read(1, 0, 8, 0), [(4, 8, None)], False, id="past-request"),
    pytest.param("full", Read(1, 0, 8, 0), [(0, 8, b"short")], True, id="data-length-mismatch"),
    pytest.param("simple", Read(1, 0, 8, 0), [(0, 4, None)], False,
                 id="partial-needs-structured"),
    pytest.param("full", Read(1, 0, 8, F_DF), [(0, 4, None)], False, id="partial-with-df"),
    pytest.param("full", Read(1, 0, 0xFFFFFFFF, 0), [(0, MAX_CHUNK_DATA + 1, b"")], False,
                 id="piece-too-big-for-a-chunk"),
    pytest.param("full", Read(1, 0, 0xFFFFFFFF, F_DF),
                 [(0, 1 << 31, None), (1 << 31, (1 << 31) - 1, None)], True,
                 id="df-too-big-for-a-chunk"),
])
def test_read_reply_misuse(kind: str, req: Read, pieces: list[tuple[int, int, bytes | None]],
                           done: bool) -> None:
    with pytest.raises(LocalProtocolError):
        conn_for(kind).reply_read(req, pieces, done=done)


# --- BLOCK_STATUS replies --------------------------------------------------------------------


def two_context_conn() -> ServerConnection:
    return handshake(meta=("base:allocation", "qemu:dirty-bitmap:b"))


@pytest.mark.parametrize(("req", "extents", "expected"), [
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(512, 3), (3584, 0)], 2: [(4096, 1)]},
                 {1: [(512, 3), (3584, 0)], 2: [(4096, 1)]}, id="exact"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {2: [(8192, 1)], 1: [(1024, 3), (4096, 0),
                                                                 (512, 3)]},
                 {2: [(8192, 1)], 1: [(1024, 3), (4096, 0)]},
                 id="trailing-extents-dropped-last-may-overshoot"),
    pytest.param(BlockStatus(7, 0, 1024, F_REQ_ONE), {1: [(4096, 3), (512, 0)], 2: [(512, 0)]},
                 {1: [(1024, 3)], 2: [(512, 0)]}, id="req-one-first-extent-clamped"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(512, 0xFFFFFFFF)], 2: [(0xFFFFFFFF, 0)]},
                 {1: [(512, 0xFFFFFFFF)], 2: [(0xFFFFFFFF, 0)]}, id="short-reply-is-fine"),
])
def test_block_status_reply(req: BlockStatus, extents: dict[int, list[tuple[int, int]]],
                            expected: dict[int, list[tuple[int, int]]]) -> None:
    conn = two_context_conn()
    chunks = parse_replies(conn.reply_block_status(req, extents))
    assert all(isinstance(c, Chunk) and c.type == T_BLOCK_STATUS and c.cookie == 7
               for c in chunks)
    assert [c.done for c in chunks if isinstance(c, Chunk)] == [False, True]
    assert dict(c.block_status() for c in chunks if isinstance(c, Chunk)) == expected


@pytest.mark.parametrize(("req", "extents"), [
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(512, 0)]}, id="missing-context"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(512, 0)], 3: [(512, 0)]}, id="wrong-context"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {}, id="no-context"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [], 2: [(512, 0)]}, id="no-extent"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(0, 0)], 2: [(512, 0)]}, id="zero-length"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(1 << 32, 0)], 2: [(512, 0)]},
                 id="length-too-big"),
    pytest.param(BlockStatus(7, 0, 4096, 0), {1: [(512, -1)], 2: [(512, 0)]}, id="bad-flags"),
    pytest.param(BlockStatus(7, 0, 0, F_REQ_ONE), {1: [(512, 0)], 2: [(512, 0)]},
                 id="req-one-zero-length-request"),
])
def test_block_status_reply_misuse(req: BlockStatus,
                                   extents: dict[int, list[tuple[int, int]]]) -> None:
    with pytest.raises(LocalProtocolError):
        two_context_conn().reply_block_status(req, extents)
