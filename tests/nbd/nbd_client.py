"""A tiny test-only NBD client: encodes client messages, decodes server bytes.

Written from the spec independently of the codec (its own struct formats), so
a shared misreading of a layout would have to be made twice to go unnoticed.
Also: ``Driver``, which feeds a ``ServerConnection`` and collects events, and
``handshake()``, which takes a fresh connection into transmission.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from jsnap.nbd import (
    NEED_DATA,
    BadOption,
    ConnectionClosed,
    Event,
    ExportInfo,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStructuredReply,
    ServerConnection,
    Write,
)

# Spec values, typed in again on purpose (see module docstring).
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

C_FIXED = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK, OPT_STARTTLS = 1, 2, 3, 4, 5
OPT_INFO, OPT_GO, OPT_SR, OPT_LIST_META, OPT_SET_META, OPT_EXT_HDR = 6, 7, 8, 9, 10, 11

REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR | 1, ERR | 2, ERR | 3
REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_SHUTDOWN = ERR | 5, ERR | 6, ERR | 7

INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7

F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16

T_NONE, T_DATA, T_HOLE, T_BLOCK_STATUS = 0, 1, 2, 5
T_ERROR, T_ERROR_OFFSET = (1 << 15) | 1, (1 << 15) | 2
DONE = 1


# --- Client -> server ----------------------------------------------------------------


def client_flags(flags: int = C_FIXED | C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def go_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def meta_data(name: str, queries: tuple[str, ...] = ()) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


# --- Server -> client ----------------------------------------------------------------


def parse_greeting(data: bytes) -> int:
    assert len(data) == 18
    assert data[:16] == NBDMAGIC + IHAVEOPT
    (flags,) = struct.unpack(">H", data[16:])
    return int(flags)


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    payload: bytes


def parse_option_replies(data: bytes) -> list[OptionReply]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == REP_MAGIC
        pos += 20
        payload = data[pos:pos + length]
        assert len(payload) == length
        pos += length
        out.append(OptionReply(opt, rtype, payload))
    return out


def parse_info(payload: bytes) -> tuple[int, tuple[int | str, ...]]:
    (kind,) = struct.unpack_from(">H", payload)
    if kind == INFO_EXPORT:
        assert len(payload) == 12
        return kind, struct.unpack(">QH", payload[2:])
    if kind == INFO_BLOCK_SIZE:
        assert len(payload) == 14
        return kind, struct.unpack(">III", payload[2:])
    return kind, (payload[2:].decode(),)


@dataclass(frozen=True)
class SimpleReply:
    cookie: int
    error: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    cookie: int
    flags: int
    type: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & DONE)

    def offset_data(self) -> tuple[int, bytes]:
        assert self.type == T_DATA and len(self.payload) >= 9
        return struct.unpack_from(">Q", self.payload)[0], self.payload[8:]

    def offset_hole(self) -> tuple[int, int]:
        assert self.type == T_HOLE and len(self.payload) == 12
        offset, size = struct.unpack(">QI", self.payload)
        return offset, size

    def error(self) -> tuple[int, str, int | None]:
        """(error, message, offset or None)."""
        assert self.type in (T_ERROR, T_ERROR_OFFSET)
        err, mlen = struct.unpack_from(">IH", self.payload)
        msg = self.payload[6:6 + mlen].decode()
        rest = self.payload[6 + mlen:]
        if self.type == T_ERROR:
            assert rest == b""
            return err, msg, None
        assert len(rest) == 8
        return err, msg, struct.unpack(">Q", rest)[0]

    def block_status(self) -> tuple[int, list[tuple[int, int]]]:
        assert self.type == T_BLOCK_STATUS
        assert (len(self.payload) - 4) % 8 == 0 and len(self.payload) >= 12
        (ctx,) = struct.unpack_from(">I", self.payload)
        n = (len(self.payload) - 4) // 8
        flat = struct.unpack_from(f">{2 * n}I", self.payload, 4)
        return ctx, list(zip(flat[::2], flat[1::2], strict=True))


def parse_replies(data: bytes, read_lengths: dict[int, int] | None = None,
                  ) -> list[SimpleReply | Chunk]:
    """Decode transmission replies; ``read_lengths`` maps READ cookies to their
    lengths (a simple OK reply to a READ is followed by that much data)."""
    read_lengths = read_lengths or {}
    out: list[SimpleReply | Chunk] = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == SIMPLE_MAGIC:
            _, err, cookie = struct.unpack_from(">IIQ", data, pos)
            pos += 16
            payload = b""
            if err == 0 and cookie in read_lengths:
                payload = data[pos:pos + read_lengths[cookie]]
                pos += read_lengths[cookie]
            out.append(SimpleReply(cookie, err, payload))
        else:
            assert magic == STRUCTURED_MAGIC, hex(magic)
            _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
            pos += 20
            out.append(Chunk(cookie, flags, rtype, data[pos:pos + length]))
            pos += length
    assert pos == len(data)
    return out


def join(buffers: list[bytes | bytearray | memoryview] | bytes) -> bytes:
    if isinstance(buffers, bytes):
        return buffers
    return b"".join(bytes(b) for b in buffers)


# --- Driving a ServerConnection ----------------------------------------------------------

DISK = ExportInfo("disk", 1 << 20, description="test disk", can_flush=True, can_fua=True,
                  can_trim=True, can_write_zeroes=True, can_fast_zero=True, can_cache=True,
                  can_multi_conn=True)


def drain(conn: ServerConnection) -> list[Event]:
    """All events currently available (stops at NEED_DATA or ConnectionClosed)."""
    events: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        assert isinstance(ev, Event)
        events.append(ev)
        if isinstance(ev, ConnectionClosed):
            return events


def snapshot(ev: Event) -> Event:
    """An event safe to keep: a Write's payload view copied to bytes."""
    if isinstance(ev, Write):
        return Write(ev.cookie, ev.offset, ev.length, ev.flags, memoryview(bytes(ev.payload)))
    return ev


def answer(conn: ServerConnection, ev: Event, info: ExportInfo = DISK) -> bytes:
    """A fixed, deterministic application: accept everything it can."""
    if isinstance(ev, (OptExportName, OptGo, OptInfo)):
        return conn.reply_export(info)
    if isinstance(ev, OptList):
        return conn.reply_list([(info.name, info.description)])
    if isinstance(ev, (OptStructuredReply, OptAbort)):
        return conn.reply_ack()
    if isinstance(ev, (OptListMetaContext, OptSetMetaContext)):
        return conn.reply_meta_contexts(["base:allocation"] if ev.queries else [])
    if isinstance(ev, BadOption):
        return conn.reply_option_error(ev.error, ev.message)
    return b""


def handshake(conn: ServerConnection | None = None, *, structured: bool = True,
              meta: tuple[str, ...] = ("base:allocation",), info: ExportInfo = DISK,
              export_name: str = "disk") -> ServerConnection:
    """Take a connection through flags, STRUCTURED_REPLY, SET_META_CONTEXT and GO."""
    conn = conn or ServerConnection()
    parse_greeting(conn.greeting())
    conn.receive_data(client_flags())
    if structured:
        conn.receive_data(option(OPT_SR))
        assert isinstance(conn.next_event(), OptStructuredReply)
        conn.reply_ack()
    if meta:
        conn.receive_data(option(OPT_SET_META, meta_data(export_name, meta)))
        ev = conn.next_event()
        assert isinstance(ev, OptSetMetaContext)
        conn.reply_meta_contexts(list(meta))
    conn.receive_data(option(OPT_GO, go_data(export_name)))
    assert isinstance(conn.next_event(), OptGo)
    conn.reply_export(info)
    return conn
