"""Request checks against the export: ``validate_request(event, info) -> errno | None``.

Model: the codec validates what the wire alone tells it (command, flags,
negotiated features); this helper adds what needs the export's description
(size, read-only, block size constraints, which commands were advertised).
It is pure and optional: the application calls it first and, on a non-None
result, answers ``conn.reply_error(event, result)`` without touching storage.

Rules, in order (spec section in brackets):

1. ``RejectedRequest`` -> its own errno (so one call covers both layers).
2. FLUSH on an export without flush -> EINVAL; FLUSH is otherwise valid.
3. WRITE, TRIM, WRITE_ZEROES on a read-only export -> EPERM ["Error values":
   "SHOULD return NBD_EPERM if it receives a write or trim request on a
   read-only export"; WRITE_ZEROES likewise].
4. TRIM / WRITE_ZEROES not advertised -> EINVAL ("MUST NOT send ... unless").
5. Past the end of the export -> ENOSPC for WRITE and WRITE_ZEROES, EINVAL for
   READ, TRIM, CACHE, BLOCK_STATUS ["Error values", "NBD_CMD_BLOCK_STATUS"].
6. Zero-length BLOCK_STATUS -> EINVAL: a successful reply needs an extent of
   nonzero length that does not exceed the request, which cannot exist.
   Other zero-length requests are valid no-ops (the spec leaves them
   unspecified but says the server SHOULD NOT disconnect).
7. Offset or length not a multiple of the minimum block size -> EINVAL
   ["Block size constraints": "SHOULD report an NBD_EINVAL error if the
   client's request is not aligned"].
8. Length above the maximum block size for READ, WRITE, CACHE, and
   WRITE_ZEROES without FAST_ZERO -> EINVAL (TRIM, BLOCK_STATUS and fast
   zeroes may exceed it: "the client MUST NOT use a length larger than any
   advertised maximum block size" names only those commands).
"""

from __future__ import annotations

import errno

from jsnap.nbd.events import (
    BlockStatus,
    Cache,
    Flush,
    Read,
    RejectedRequest,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from jsnap.nbd.export import ExportInfo


def validate_request(request: Request, info: ExportInfo) -> int | None:
    """The errno to fail ``request`` with on ``info``'s export, or ``None`` if it is valid."""
    if isinstance(request, RejectedRequest):
        return request.error
    if isinstance(request, Flush):
        return None if info.can_flush else errno.EINVAL
    writes = isinstance(request, (Write, Trim, WriteZeroes))
    if writes and info.read_only:
        return errno.EPERM
    if isinstance(request, Trim) and not info.can_trim:
        return errno.EINVAL
    if isinstance(request, WriteZeroes) and not info.can_write_zeroes:
        return errno.EINVAL
    offset = request.offset
    length = request.length
    if offset + length > info.size:
        return errno.ENOSPC if isinstance(request, (Write, WriteZeroes)) else errno.EINVAL
    if length == 0 and isinstance(request, BlockStatus):
        return errno.EINVAL
    if (offset | length) & (info.min_block_size - 1):
        return errno.EINVAL
    if length > info.max_block_size and (
            isinstance(request, (Read, Write, Cache))
            or (isinstance(request, WriteZeroes) and not request.fast_zero)):
        return errno.EINVAL
    return None
