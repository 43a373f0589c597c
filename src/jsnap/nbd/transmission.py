"""Transmission phase: the per-command rule table and reply encoders (pure functions).

Model: which command flags a request may carry depends only on the command
and on the transmission flags advertised for the export, so
``allowed_flags_table()`` computes it once, when transmission starts, as a
tuple indexed by command number -- the hot path then costs one index and one
AND per request.  The encoders turn an application's answer into wire buffers;
they never join payload data (a READ reply is a list of buffers for
``sendmsg``), and holes are sent as views of one shared zero block.

Invariants: nothing here keeps state or knows about other requests, so
replies can be produced in any order; every chunk of a structured reply
carries the request's cookie and only the last chunk of a reply has
NBD_REPLY_FLAG_DONE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from jsnap.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_READ,
    NBD_CMD_WRITE_ZEROES,
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
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
)
from jsnap.nbd.wire import (
    BLOCK_DESCRIPTOR,
    BLOCK_STATUS_HEAD,
    CHUNK_HEADER,
    ERROR_HEAD,
    ERROR_OFFSET_TAIL,
    OFFSET_DATA_HEAD,
    OFFSET_HOLE_CHUNK,
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
