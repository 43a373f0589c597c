"""Wire layouts of NBD messages as precompiled ``struct.Struct`` objects.

Model: every fixed-size piece of an NBD message is one ``Struct`` here, in
network byte order, with a comment giving its layout in the spec's own
notation (``C:`` client to server, ``S:`` server to client) and an
``assert`` on its size so a typo in a format string cannot go unnoticed.
Where a message has a fixed head followed by a variable tail, the head is one
``Struct`` (one ``pack``/``unpack_from`` call on the hot path) and the tail is
appended as separate buffers by the encoder.

Invariant: nothing here allocates beyond what ``struct`` itself returns; the
helpers are thin and pure.
"""

from __future__ import annotations

import struct
from typing import Final

from jsnap.nbd.constants import NBD_MAX_STRING_SIZE, NBD_REP_MAGIC

# --- Handshake ("Newstyle negotiation", "Fixed newstyle negotiation") ---------

# S: 64 bits, NBDMAGIC
# S: 64 bits, IHAVEOPT
# S: 16 bits, handshake flags
GREETING: Final = struct.Struct(">QQH")
assert GREETING.size == 18

# C: 32 bits, client flags
CLIENT_FLAGS: Final = struct.Struct(">I")
assert CLIENT_FLAGS.size == 4

# C: 64 bits, IHAVEOPT
# C: 32 bits, option
# C: 32 bits, length of option data (unsigned)
# C: (length bytes of option data follow)
OPTION_HEADER: Final = struct.Struct(">QII")
assert OPTION_HEADER.size == 16

# S: 64 bits, 0x3e889045565a9 (NBD_REP_MAGIC)
# S: 32 bits, the option as sent by the client to which this is a reply
# S: 32 bits, reply type
# S: 32 bits, length of the reply (the data follows)
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
assert OPTION_REPLY_HEADER.size == 20

# Reply to NBD_OPT_EXPORT_NAME:
# S: 64 bits, size of the export in bytes (unsigned)
# S: 16 bits, transmission flags
# S: 124 bytes, zeroes (unless NBD_FLAG_C_NO_ZEROES was negotiated)
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
assert EXPORT_NAME_REPLY.size == 10
EXPORT_NAME_ZEROES: Final = bytes(124)

# NBD_REP_INFO payload, NBD_INFO_EXPORT:
# 16 bits, NBD_INFO_EXPORT; 64 bits, size of the export; 16 bits, transmission flags
INFO_EXPORT: Final = struct.Struct(">HQH")
assert INFO_EXPORT.size == 12

# NBD_REP_INFO payload, NBD_INFO_BLOCK_SIZE:
# 16 bits, NBD_INFO_BLOCK_SIZE; 32 bits, minimum; 32 bits, preferred; 32 bits, maximum
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
assert INFO_BLOCK_SIZE.size == 14

# NBD_REP_INFO payload head for NBD_INFO_NAME / NBD_INFO_DESCRIPTION:
# 16 bits, information type; (length - 2 bytes of string follow)
INFO_TYPE: Final = struct.Struct(">H")
assert INFO_TYPE.size == 2

# Generic big-endian integers used inside option payloads:
# NBD_OPT_GO/INFO: 32 bits name length, 16 bits count, 16 bits x n info requests;
# NBD_OPT_*_META_CONTEXT: 32 bits lengths and counts; NBD_REP_SERVER: 32 bits
# name length; NBD_REP_META_CONTEXT: 32 bits context id.
U16: Final = struct.Struct(">H")
assert U16.size == 2
U32: Final = struct.Struct(">I")
assert U32.size == 4

# --- Transmission ("Request message", "Simple reply message", ...) -------------

# C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
# C: 16 bits, command flags
# C: 16 bits, type
# C: 64 bits, handle (cookie)
# C: 64 bits, offset (unsigned)
# C: 32 bits, length (unsigned)
# C: (length bytes of data if the request is of type NBD_CMD_WRITE)
REQUEST: Final = struct.Struct(">IHHQQI")
assert REQUEST.size == 28

# S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
# S: 32 bits, error (MAY be zero)
# S: 64 bits, handle (cookie)
# S: (length bytes of data if the request is of type NBD_CMD_READ and error is zero)
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
assert SIMPLE_REPLY.size == 16

# S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
# S: 16 bits, flags
# S: 16 bits, type
# S: 64 bits, handle (cookie)
# S: 32 bits, length of payload (unsigned)
# Used alone for NBD_REPLY_TYPE_NONE (length 0).
CHUNK_HEADER: Final = struct.Struct(">IHHQI")
assert CHUNK_HEADER.size == 20

# Chunk header + NBD_REPLY_TYPE_OFFSET_DATA payload head:
# 64 bits: offset (unsigned); (length - 8 bytes of data follow)
OFFSET_DATA_HEAD: Final = struct.Struct(">IHHQIQ")
assert OFFSET_DATA_HEAD.size == 28

# Whole NBD_REPLY_TYPE_OFFSET_HOLE chunk: header +
# 64 bits: offset (unsigned); 32 bits: hole size (unsigned, MUST be nonzero)
OFFSET_HOLE_CHUNK: Final = struct.Struct(">IHHQIQI")
assert OFFSET_HOLE_CHUNK.size == 32

# Chunk header + error chunk payload head (NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET):
# 32 bits: error (MUST be nonzero); 16 bits: message length
# (message bytes follow; for ERROR_OFFSET then 64 bits: offset)
ERROR_HEAD: Final = struct.Struct(">IHHQIIH")
assert ERROR_HEAD.size == 26
ERROR_OFFSET_TAIL: Final = struct.Struct(">Q")
assert ERROR_OFFSET_TAIL.size == 8

# Chunk header + NBD_REPLY_TYPE_BLOCK_STATUS payload head:
# 32 bits, metadata context ID; (descriptors follow)
BLOCK_STATUS_HEAD: Final = struct.Struct(">IHHQII")
assert BLOCK_STATUS_HEAD.size == 24

# One block status descriptor:
# 32 bits, length of the extent (unsigned, MUST be nonzero); 32 bits, status flags
BLOCK_DESCRIPTOR: Final = struct.Struct(">II")
assert BLOCK_DESCRIPTOR.size == 8


# --- Helpers ---------------------------------------------------------------------


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """Encode one fixed-newstyle option reply (header + payload)."""
    return OPTION_REPLY_HEADER.pack(NBD_REP_MAGIC, option, reply_type, len(payload)) + payload


def encode_string(text: str, limit: int = NBD_MAX_STRING_SIZE) -> bytes:
    """UTF-8 encode ``text``, truncated to at most ``limit`` bytes on a character boundary.

    For human-readable messages only: the spec caps every string at 4096 bytes
    ("Conventions") and requires valid UTF-8, so a long message is cut rather
    than rejected.
    """
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def decode_string(raw: bytes) -> str | None:
    """Decode an NBD string from the peer, or ``None`` if it breaks the spec's rules.

    "Conventions": UTF-8, MUST NOT contain NUL, MUST be no longer than 4096 bytes.
    """
    if len(raw) > NBD_MAX_STRING_SIZE or b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
