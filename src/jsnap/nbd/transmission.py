"""Transmission phase: ``Transmission`` (requests in, replies out) and its reply encoders.

Model: the handshake hands over an ``Agreement`` (the export, its transmission flags,
structured replies, the metadata contexts set for it); from then on ``Transmission`` parses
one request at a time out of the connection's ``ReceiveBuffer`` and builds the replies to the
application's answers.  Which command flags a request may carry depends only on the command
and on the transmission flags, so ``allowed_flags_table()`` computes it once, when
transmission starts, as a tuple indexed by command number -- the hot path then costs one
index and one AND per request.  The encoders turn an answer into wire buffers; they never
join payload data (a READ reply is a list of buffers for ``sendmsg``), and holes are sent as
views of one shared zero block.

Invariants:

1. No per-request state: a reply is built from the request event and the ``Agreement``
   alone, so replies can be produced in any order, any time later -- after NBD_CMD_DISC
   too ("The server MUST handle all outstanding requests").
2. What was agreed does not change during transmission.
3. A request the wire alone shows to be wrong (unknown command, a flag not allowed,
   BLOCK_STATUS without a metadata context, FLUSH with an offset or length) is a
   ``RejectedRequest`` and the connection goes on; only what leaves the byte stream unusable
   (bad magic, a WRITE payload above ``max_payload``) raises ``RemoteProtocolError``.
4. Every chunk of a structured reply carries the request's cookie and only the last chunk
   of a reply has NBD_REPLY_FLAG_DONE.
5. Hot path: ``next_request`` is one unpack, a few int tests and one event, and
   ``ServerConnection`` reaches it, and each ``reply_*`` method, with one call and no
   helper call on the way.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from typing import Final

from jsnap.nbd.buffer import ReceiveBuffer
from jsnap.nbd.constants import (
    COMMAND_NAMES,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_FLAG_SEND_DF,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FUA,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    nbd_error_from_errno,
)
from jsnap.nbd.errors import LocalProtocolError, RemoteProtocolError
from jsnap.nbd.events import (
    BlockStatus,
    Cache,
    Event,
    Flush,
    NeedData,
    Read,
    RejectedRequest,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from jsnap.nbd.negotiation import Agreement
from jsnap.nbd.wire import (
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS_HEAD,
    CHUNK_HEADER,
    ERROR_HEAD,
    ERROR_OFFSET_TAIL,
    OFFSET_DATA_HEAD,
    OFFSET_HOLE_CHUNK,
    REQUEST,
    SIMPLE_REPLY,
    encode_string,
)

#: Anything ``sendmsg`` accepts as one buffer.
BytesLike = bytes | bytearray | memoryview

#: Largest data length of one OFFSET_DATA chunk: the 32-bit chunk length also
#: covers the 8-byte offset ("a request for more than 2^32 - 8 bytes MUST be
#: split into at least two chunks").
MAX_CHUNK_DATA: Final = 0xFFFFFFFF - 8

#: Shared source of zero bytes for holes in replies that must carry data.
_ZERO_BLOCK: Final = memoryview(bytes(1 << 20))

#: Number of command slots in the flags table (NBD_CMD_READ .. NBD_CMD_BLOCK_STATUS).
COMMAND_SLOTS: Final = NBD_CMD_BLOCK_STATUS + 1


def allowed_flags_table(tflags: int) -> tuple[int, ...]:
    """Command flags each command may carry, indexed by command number.

    "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands, provided
    NBD_FLAG_SEND_FUA has been negotiated"; NO_HOLE and FAST_ZERO (the latter
    only if NBD_FLAG_SEND_FAST_ZERO) are valid during WRITE_ZEROES; DF (only if
    NBD_FLAG_SEND_DF) during READ; REQ_ONE during BLOCK_STATUS.  The slot for
    NBD_CMD_DISC is unused (a disconnect is honoured whatever its flags).
    """
    fua = NBD_CMD_FLAG_FUA if tflags & NBD_FLAG_SEND_FUA else 0
    table = [fua] * COMMAND_SLOTS
    if tflags & NBD_FLAG_SEND_DF:
        table[NBD_CMD_READ] |= NBD_CMD_FLAG_DF
    table[NBD_CMD_WRITE_ZEROES] |= NBD_CMD_FLAG_NO_HOLE
    if tflags & NBD_FLAG_SEND_FAST_ZERO:
        table[NBD_CMD_WRITE_ZEROES] |= NBD_CMD_FLAG_FAST_ZERO
    table[NBD_CMD_BLOCK_STATUS] |= NBD_CMD_FLAG_REQ_ONE
    return tuple(table)


def zeroes(length: int) -> list[memoryview]:
    """Views of the shared zero block that add up to ``length`` bytes."""
    out = []
    while length > 0:
        n = min(length, len(_ZERO_BLOCK))
        out.append(_ZERO_BLOCK[:n])
        length -= n
    return out


# --- Simple replies -------------------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    """Simple reply header: OK (error 0) or an NBD error, no data."""
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


# --- Structured reply chunks ------------------------------------------------------------


def none_chunk(cookie: int) -> bytes:
    """NBD_REPLY_TYPE_NONE: length 0, always with NBD_REPLY_FLAG_DONE."""
    return CHUNK_HEADER.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                             NBD_REPLY_TYPE_NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str, *, done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_ERROR: 32-bit error, 16-bit message length, message."""
    msg = encode_string(message)
    return ERROR_HEAD.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                           NBD_REPLY_TYPE_ERROR, cookie, 6 + len(msg), error, len(msg)) + msg


def error_offset_chunk(cookie: int, error: int, offset: int, message: str, *,
                       done: bool) -> bytes:
    """NBD_REPLY_TYPE_ERROR_OFFSET: error, message length, message, 64-bit offset."""
    msg = encode_string(message)
    return (ERROR_HEAD.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                            NBD_REPLY_TYPE_ERROR_OFFSET, cookie, 14 + len(msg), error, len(msg))
            + msg + ERROR_OFFSET_TAIL.pack(offset))


def offset_data_head(cookie: int, offset: int, data_length: int, *, done: bool) -> bytes:
    """Header of an NBD_REPLY_TYPE_OFFSET_DATA chunk; ``data_length`` bytes follow."""
    return OFFSET_DATA_HEAD.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                                 NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_length, offset)


def offset_hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """A whole NBD_REPLY_TYPE_OFFSET_HOLE chunk (12-byte payload)."""
    return OFFSET_HOLE_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                                  NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, length)


def block_status_chunk(cookie: int, context_id: int, extents: Sequence[tuple[int, int]], *,
                       done: bool) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS: context id then (length, flags) descriptors."""
    out = bytearray(BLOCK_STATUS_HEAD.size + BLOCK_DESCRIPTOR.size * len(extents))
    BLOCK_STATUS_HEAD.pack_into(out, 0, NBD_STRUCTURED_REPLY_MAGIC,
                                NBD_REPLY_FLAG_DONE if done else 0, NBD_REPLY_TYPE_BLOCK_STATUS,
                                cookie, 4 + BLOCK_DESCRIPTOR.size * len(extents), context_id)
    pos = BLOCK_STATUS_HEAD.size
    for length, flags in extents:
        BLOCK_DESCRIPTOR.pack_into(out, pos, length, flags)
        pos += BLOCK_DESCRIPTOR.size
    return bytes(out)


# --- The transmission phase of one connection ------------------------------------------

_REQUEST_SIZE = REQUEST.size
_unpack_request = REQUEST.unpack_from

#: Event class per command number.  Slot NBD_CMD_DISC is never used: a
#: disconnect becomes ``ConnectionClosed`` before this table is consulted.
_REQUEST_TYPES: tuple[type[Request], ...] = (
    Read, Write, Request, Flush, Trim, Cache, WriteZeroes, BlockStatus,
)
assert len(_REQUEST_TYPES) == COMMAND_SLOTS


def _command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"command {command}")


class Transmission:
    """Requests in, replies out, under one ``Agreement`` (see the module docstring).

    ``next_request`` reads from ``rx``: a request event, ``NEED_DATA``, or
    ``ConnectionClosed`` (NBD_CMD_DISC, or EOF between requests).  ``agreed`` is read-only.
    """

    __slots__ = ("agreed", "_rx", "_max_payload", "_allowed", "_structured", "_meta_contexts")

    def __init__(self, rx: ReceiveBuffer, agreed: Agreement, *, max_payload: int) -> None:
        self.agreed = agreed
        self._rx = rx
        self._max_payload = max_payload
        # Copies of what the per-request path reads: one attribute load each.
        self._allowed = allowed_flags_table(agreed.flags)
        self._structured = agreed.structured
        self._meta_contexts: Mapping[int, str] = agreed.meta_contexts

    # --- Requests in ---------------------------------------------------------------------

    def next_request(self) -> Event | NeedData:
        # Hot path: one unpack, a few int tests, one event.
        rx = self._rx
        start = rx.start
        if rx.end - start < _REQUEST_SIZE:
            return rx.need(_REQUEST_SIZE)
        magic, flags, command, cookie, offset, length = _unpack_request(rx.buf, start)
        if magic != NBD_REQUEST_MAGIC:
            if magic == NBD_EXTENDED_REQUEST_MAGIC:
                raise RemoteProtocolError("extended request header, but extended headers "
                                          "were not negotiated")
            raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
        if command == NBD_CMD_WRITE:
            if length > self._max_payload:
                # The payload cannot be skipped without reading it all: hang up
                # ("Block size constraints": a server MAY hard-disconnect on a
                # payload large enough to be a denial of service).
                raise RemoteProtocolError(f"NBD_CMD_WRITE payload of {length} bytes exceeds "
                                          f"the limit of {self._max_payload}")
            end = start + _REQUEST_SIZE + length
            if end > rx.end:
                return rx.need(_REQUEST_SIZE + length)
            rx.start = end
            if flags & ~self._allowed[NBD_CMD_WRITE]:
                return self._reject(cookie, offset, length, flags, command)
            return Write(cookie, offset, length, flags, rx.view[start + _REQUEST_SIZE:end])
        rx.start = start + _REQUEST_SIZE
        if command >= COMMAND_SLOTS:
            # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
            return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                                   f"unknown {_command_name(command)}")
        if command == NBD_CMD_DISC:
            return rx.close("disconnect")
        if flags & ~self._allowed[command]:
            return self._reject(cookie, offset, length, flags, command)
        if command == NBD_CMD_BLOCK_STATUS and not self._meta_contexts:
            # "Servers SHOULD reply with NBD_EINVAL to clients sending
            # NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
            return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                                   "NBD_CMD_BLOCK_STATUS without a metadata context")
        if command == NBD_CMD_FLUSH and (offset or length):
            # "For a flush request, length and offset are reserved, and MUST be
            # set to all-zero."
            return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                                   "NBD_CMD_FLUSH with nonzero offset or length")
        request: Request = _REQUEST_TYPES[command](cookie, offset, length, flags)
        return request

    def _reject(self, cookie: int, offset: int, length: int, flags: int,
                command: int) -> RejectedRequest:
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command
        # flag [or] a flag not explicitly documented as applicable".
        bad = flags & ~self._allowed[command]
        return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                               f"flags 0x{bad:04x} not allowed for {_command_name(command)}")

    # --- Replies out (contracts in ServerConnection's docstrings) ------------------------

    def reply_ok(self, request: Request) -> bytes:
        if isinstance(request, (Read, BlockStatus, RejectedRequest)):
            raise LocalProtocolError(f"reply_ok() cannot answer {type(request).__name__}; use "
                                     f"reply_read/reply_block_status/reply_error")
        return simple_reply(request.cookie)

    def reply_error(self, request: Request, error: int, message: str) -> bytes:
        if error == 0:
            raise LocalProtocolError("reply_error() needs a nonzero errno")
        nbd_error = nbd_error_from_errno(error)
        if self._structured:
            return error_chunk(request.cookie, nbd_error, message)
        return simple_reply(request.cookie, nbd_error)

    def reply_error_at(self, request: Request, error: int, offset: int, message: str,
                       done: bool) -> bytes:
        if not self._structured:
            raise LocalProtocolError("error offsets need structured replies")
        if not isinstance(request, (Read, Write, Trim, Cache, WriteZeroes, BlockStatus)):
            raise LocalProtocolError(f"NBD_REPLY_TYPE_ERROR_OFFSET is not valid for "
                                     f"{type(request).__name__}")
        if error == 0:
            raise LocalProtocolError("reply_error_at() needs a nonzero errno")
        if not request.offset <= offset < request.offset + request.length:
            raise LocalProtocolError(f"error offset {offset} outside the request")
        return error_offset_chunk(request.cookie, nbd_error_from_errno(error), offset, message,
                                  done=done)

    def reply_done(self, request: Request) -> bytes:
        if not self._structured:
            raise LocalProtocolError("reply_done() needs structured replies")
        if isinstance(request, RejectedRequest):
            raise LocalProtocolError("a RejectedRequest is answered with reply_error()")
        return none_chunk(request.cookie)

    def reply_read(self, request: Request,
                   pieces: Sequence[tuple[int, int, BytesLike | None]],
                   done: bool) -> list[BytesLike]:
        if not isinstance(request, Read):
            raise LocalProtocolError(f"reply_read() cannot answer {type(request).__name__}")
        structured = self._structured
        df = request.flags & NBD_CMD_FLAG_DF
        if not done and (not structured or df):
            raise LocalProtocolError("a partial read reply needs structured replies and no DF")
        pos = request.offset
        end = pos + request.length
        total = 0
        for offset, length, data in pieces:
            if offset < pos or (done and offset > pos):
                raise LocalProtocolError("read pieces must be in order, must not overlap "
                                         "and (with done=True) must leave no gap")
            if length <= 0 or offset + length > end:
                raise LocalProtocolError(f"read piece ({offset}, {length}) is empty or "
                                         f"outside the request")
            if length > MAX_CHUNK_DATA:
                raise LocalProtocolError(f"read piece of {length} bytes does not fit one chunk")
            if data is not None and len(data) != length:
                raise LocalProtocolError(f"read piece data is {len(data)} bytes, "
                                         f"expected {length}")
            pos = offset + length
            total += length
        if done and pos != end:
            raise LocalProtocolError("read pieces do not cover the request")
        cookie = request.cookie
        out: list[BytesLike]
        if not structured:
            out = [simple_reply(cookie)]
            for _, length, data in pieces:
                if data is None:
                    out.extend(zeroes(length))
                else:
                    out.append(data)
            return out
        if not pieces:
            return [none_chunk(cookie)] if done else []
        if df:
            if len(pieces) == 1 and pieces[0][2] is None:
                return [offset_hole_chunk(cookie, request.offset, total, done=True)]
            if total > MAX_CHUNK_DATA:
                raise LocalProtocolError("a DF read this large cannot be one chunk; "
                                         "reply EOVERFLOW instead")
            out = [offset_data_head(cookie, request.offset, total, done=True)]
            for _, length, data in pieces:
                if data is None:
                    out.extend(zeroes(length))
                else:
                    out.append(data)
            return out
        out = []
        last = len(pieces) - 1
        for i, (offset, length, data) in enumerate(pieces):
            final = done and i == last
            if data is None:
                out.append(offset_hole_chunk(cookie, offset, length, done=final))
            else:
                out.append(offset_data_head(cookie, offset, length, done=final))
                out.append(data)
        return out

    def reply_block_status(self, request: Request,
                           extents: Mapping[int, Sequence[tuple[int, int]]]) -> bytes:
        if not isinstance(request, BlockStatus):
            raise LocalProtocolError(f"reply_block_status() cannot answer "
                                     f"{type(request).__name__}")
        contexts = self._meta_contexts
        if (not extents or len(extents) != len(contexts)
                or any(ctx not in contexts for ctx in extents)):
            raise LocalProtocolError(f"block status needs exactly the contexts "
                                     f"{sorted(contexts)}, got {sorted(extents)}")
        req_one = request.flags & NBD_CMD_FLAG_REQ_ONE
        limit = request.length
        chunks = []
        last = len(extents) - 1
        for i, (ctx, ctx_extents) in enumerate(extents.items()):
            selected: list[tuple[int, int]] = []
            covered = 0
            for length, status in ctx_extents:
                if not 0 < length <= 0xFFFFFFFF or not 0 <= status <= 0xFFFFFFFF:
                    raise LocalProtocolError(f"bad extent ({length}, {status})")
                if req_one:
                    selected.append((min(length, limit), status))
                    break
                selected.append((length, status))
                covered += length
                if covered >= limit:
                    break
            if not selected or selected[0][0] == 0:
                raise LocalProtocolError(f"context {ctx}: at least one nonempty extent needed")
            chunks.append(block_status_chunk(request.cookie, ctx, selected, done=i == last))
        return b"".join(chunks)
