"""NBD protocol constants, named exactly as in the NBD spec (doc/proto.md).

Model: plain ``int`` constants (no enums) so that they can be used directly in
``struct`` packing and bit tests on the hot path.  Grouping and order follow the
spec's headings ("Handshake", "Values" > "Handshake phase" > ..., "Transmission
phase" > ...).  Values only; no behaviour except the two tiny error-mapping
functions at the end, which implement the spec's "Error values" advice.

Invariant: every name here is the spec's own name, so ``grep`` across the spec
and this module finds both.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from typing import Final

# --- Magic numbers ("Handshake", "Transmission") -----------------------------

#: S: first 64 bits of every handshake, ASCII "NBDMAGIC" (a.k.a. INIT_PASSWD).
NBDMAGIC: Final = 0x4E42444D41474943
#: S: second 64 bits of the newstyle greeting; C: prefix of every option request.
IHAVEOPT: Final = 0x49484156454F5054
#: S: magic of every option reply in fixed newstyle negotiation.
NBD_REP_MAGIC: Final = 0x0003E889045565A9
#: C: magic of a (compact) transmission request.
NBD_REQUEST_MAGIC: Final = 0x25609513
#: C: magic of an extended-header request (NBD_OPT_EXTENDED_HEADERS); never
#: negotiated by this server, so seeing it is a protocol violation.
NBD_EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71
#: S: magic of a simple reply (formerly NBD_REPLY_MAGIC).
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: S: magic of a structured reply chunk.
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
#: S: magic of an extended-header reply chunk (not used by this server).
NBD_EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C

# --- Handshake phase > Flag fields > Handshake flags (16 bits, server) --------

NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1

# --- Handshake phase > Flag fields > Client flags (32 bits, client) -----------

NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1

# --- Handshake phase > Flag fields > Transmission flags (16 bits, server) -----

NBD_FLAG_HAS_FLAGS: Final = 1 << 0
NBD_FLAG_READ_ONLY: Final = 1 << 1
NBD_FLAG_SEND_FLUSH: Final = 1 << 2
NBD_FLAG_SEND_FUA: Final = 1 << 3
NBD_FLAG_ROTATIONAL: Final = 1 << 4
NBD_FLAG_SEND_TRIM: Final = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
NBD_FLAG_SEND_DF: Final = 1 << 7
NBD_FLAG_CAN_MULTI_CONN: Final = 1 << 8
NBD_FLAG_SEND_RESIZE: Final = 1 << 9
NBD_FLAG_SEND_CACHE: Final = 1 << 10
NBD_FLAG_SEND_FAST_ZERO: Final = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD: Final = 1 << 12

# --- Handshake phase > Option types -------------------------------------------

NBD_OPT_EXPORT_NAME: Final = 1
NBD_OPT_ABORT: Final = 2
NBD_OPT_LIST: Final = 3
NBD_OPT_PEEK_EXPORT: Final = 4  # withdrawn extension; answered NBD_REP_ERR_UNSUP
NBD_OPT_STARTTLS: Final = 5  # see ServerConnection(tls=...)
NBD_OPT_INFO: Final = 6
NBD_OPT_GO: Final = 7
NBD_OPT_STRUCTURED_REPLY: Final = 8
NBD_OPT_LIST_META_CONTEXT: Final = 9
NBD_OPT_SET_META_CONTEXT: Final = 10
NBD_OPT_EXTENDED_HEADERS: Final = 11  # not supported; answered NBD_REP_ERR_UNSUP

# --- Handshake phase > Option reply types -------------------------------------

NBD_REP_ACK: Final = 1
NBD_REP_SERVER: Final = 2
NBD_REP_INFO: Final = 3
NBD_REP_META_CONTEXT: Final = 4

#: All error reply types have bit 31 set.
NBD_REP_FLAG_ERROR: Final = 1 << 31
NBD_REP_ERR_UNSUP: Final = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY: Final = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID: Final = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM: Final = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD: Final = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN: Final = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN: Final = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD: Final = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG: Final = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD: Final = NBD_REP_FLAG_ERROR | 10

# --- Option reply types > NBD_REP_INFO > information types ---------------------

NBD_INFO_EXPORT: Final = 0
NBD_INFO_NAME: Final = 1
NBD_INFO_DESCRIPTION: Final = 2
NBD_INFO_BLOCK_SIZE: Final = 3

# --- Metadata querying > base:allocation / qemu namespace ---------------------

NBD_STATE_HOLE: Final = 1 << 0
NBD_STATE_ZERO: Final = 1 << 1
#: qemu:dirty-bitmap:NAME contexts (qemu docs/interop/nbd.rst).
NBD_STATE_DIRTY: Final = 1 << 0

# --- Transmission phase > Flag fields > Command flags (16 bits) ----------------

NBD_CMD_FLAG_FUA: Final = 1 << 0
NBD_CMD_FLAG_NO_HOLE: Final = 1 << 1
NBD_CMD_FLAG_DF: Final = 1 << 2
NBD_CMD_FLAG_REQ_ONE: Final = 1 << 3
NBD_CMD_FLAG_FAST_ZERO: Final = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN: Final = 1 << 5  # extended headers only; never valid here

# --- Transmission phase > Flag fields > Structured reply flags (16 bits) -------

NBD_REPLY_FLAG_DONE: Final = 1 << 0

# --- Transmission phase > Structured reply types --------------------------------

NBD_REPLY_TYPE_NONE: Final = 0
NBD_REPLY_TYPE_OFFSET_DATA: Final = 1
NBD_REPLY_TYPE_OFFSET_HOLE: Final = 2
NBD_REPLY_TYPE_BLOCK_STATUS: Final = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT: Final = 6  # extended headers only; not sent
#: All error chunk types have bit 15 set.
NBD_REPLY_TYPE_ERROR_BIT: Final = 1 << 15
NBD_REPLY_TYPE_ERROR: Final = NBD_REPLY_TYPE_ERROR_BIT | 1
NBD_REPLY_TYPE_ERROR_OFFSET: Final = NBD_REPLY_TYPE_ERROR_BIT | 2

# --- Transmission phase > Request types ------------------------------------------

NBD_CMD_READ: Final = 0
NBD_CMD_WRITE: Final = 1
NBD_CMD_DISC: Final = 2
NBD_CMD_FLUSH: Final = 3
NBD_CMD_TRIM: Final = 4
NBD_CMD_CACHE: Final = 5
NBD_CMD_WRITE_ZEROES: Final = 6
NBD_CMD_BLOCK_STATUS: Final = 7
NBD_CMD_RESIZE: Final = 8  # experimental RESIZE extension; unknown to this server

# --- Transmission phase > Error values --------------------------------------------

NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

# --- Limits ("Conventions", "Block size constraints") ---------------------------

#: Strings (export names, error messages, context names) MUST be no longer than this.
NBD_MAX_STRING_SIZE: Final = 4096
#: Writes below 2^25 bytes SHOULD NOT be treated as a denial of service.
NBD_MAX_DOS_SAFE_PAYLOAD: Final = 1 << 25
#: The "no inherent limit" value of the maximum block size.
NBD_MAX_BLOCK_SIZE_UNLIMITED: Final = 0xFFFFFFFF

# --- Names for messages and logs ----------------------------------------------

OPTION_NAMES: Final[Mapping[int, str]] = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
}

COMMAND_NAMES: Final[Mapping[int, str]] = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
    NBD_CMD_CACHE: "NBD_CMD_CACHE",
    NBD_CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
    NBD_CMD_RESIZE: "NBD_CMD_RESIZE",
}

# --- NBD error <-> errno ---------------------------------------------------------

#: Host errno -> NBD error value.  The spec fixes the wire values (which match
#: Linux) and says a server SHOULD map EDQUOT and EFBIG to NBD_ENOSPC; EROFS and
#: EACCES become NBD_EPERM because to the client they mean "not permitted".
ERRNO_TO_NBD: Final[Mapping[int, int]] = {
    _errno.EPERM: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

#: NBD error value -> host errno (for clients and tests).
NBD_TO_ERRNO: Final[Mapping[int, int]] = {
    NBD_EPERM: _errno.EPERM,
    NBD_EIO: _errno.EIO,
    NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL,
    NBD_ENOSPC: _errno.ENOSPC,
    NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP,
    NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def nbd_error_from_errno(err: int) -> int:
    """Map a host errno to the NBD error to put on the wire.

    Anything the spec does not define becomes NBD_EINVAL: "The client SHOULD
    treat an unexpected error value as if it had been NBD_EINVAL", so sending
    EINVAL ourselves keeps the meaning identical for every client.
    """
    return ERRNO_TO_NBD.get(err, NBD_EINVAL)


def errno_from_nbd_error(err: int) -> int:
    """Map an NBD error from the wire to a host errno (unknown values -> EINVAL, per spec)."""
    return NBD_TO_ERRNO.get(err, _errno.EINVAL)
