"""What the application tells the codec about an export: ``ExportInfo``.

Model: the codec never knows which exports exist.  When a client asks for one
(NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO) the application looks it up
and answers with an ``ExportInfo``; the codec turns it into wire bytes.  The
capability booleans are *inputs*: ``transmission_flags()`` derives the
16-bit transmission flags from them truthfully ("The server MUST NOT set the
flag for features it does not support"), taking into account what was
negotiated on this connection (structured replies, for NBD_FLAG_SEND_DF).

Invariants (checked in ``__post_init__``, ``ValueError`` otherwise): the name
and description are valid NBD strings; the size fits 64 bits; the block size
constraints obey "Block size constraints" (minimum a power of two <= 64 KiB,
preferred a power of two >= max(minimum, 512), maximum a multiple of the
minimum or 0xffffffff and at least min(preferred, size)).
"""

from __future__ import annotations

from dataclasses import dataclass

from jsnap.nbd.constants import (
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_ROTATIONAL,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_DF,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_MAX_BLOCK_SIZE_UNLIMITED,
    NBD_MAX_DOS_SAFE_PAYLOAD,
    NBD_MAX_STRING_SIZE,
)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export as the application wants it advertised.

    ``can_*`` flags say what the application implements; ``read_only`` wins
    over the write-side ones (a read-only export never advertises TRIM,
    WRITE_ZEROES or FAST_ZERO, since every such request would fail with EPERM).
    ``can_df`` only matters once structured replies are negotiated: the codec
    itself implements "don't fragment" reads.
    """

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_write_zeroes: bool = False
    can_fast_zero: bool = False
    can_multi_conn: bool = False
    can_cache: bool = False
    can_df: bool = True
    rotational: bool = False
    min_block_size: int = 1
    preferred_block_size: int = 4096
    #: Default 32 MiB: the largest request every client must be able to use
    #: ("Block size constraints": lengths below 2^25 are never a DoS).
    max_block_size: int = NBD_MAX_DOS_SAFE_PAYLOAD

    def __post_init__(self) -> None:
        if len(self.name.encode("utf-8")) > NBD_MAX_STRING_SIZE or "\x00" in self.name:
            raise ValueError("export name must be at most 4096 UTF-8 bytes without NUL")
        if (len(self.description.encode("utf-8")) > NBD_MAX_STRING_SIZE
                or "\x00" in self.description):
            raise ValueError("export description must be at most 4096 UTF-8 bytes without NUL")
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"export size {self.size} does not fit in 64 bits")
        mn, pref, mx = self.min_block_size, self.preferred_block_size, self.max_block_size
        if not _is_power_of_two(mn) or mn > 1 << 16:
            raise ValueError(f"minimum block size {mn} must be a power of two <= 65536")
        if not _is_power_of_two(pref) or pref < max(mn, 512):
            raise ValueError(f"preferred block size {pref} must be a power of two "
                             f">= max(minimum block size, 512)")
        if mx != NBD_MAX_BLOCK_SIZE_UNLIMITED and (mx % mn or mx > NBD_MAX_BLOCK_SIZE_UNLIMITED):
            raise ValueError(f"maximum block size {mx} must be a multiple of the minimum "
                             f"block size, or 0xffffffff")
        if mx < min(pref, self.size):
            raise ValueError(f"maximum block size {mx} must be at least "
                             f"min(preferred block size, export size)")


def transmission_flags(info: ExportInfo, *, structured_replies: bool) -> int:
    """The 16-bit transmission flags for ``info`` on a connection.

    NBD_FLAG_SEND_DF "MUST [be left] clear if structured replies have not been
    negotiated"; NBD_FLAG_SEND_FAST_ZERO "MUST [be] 0 if
    NBD_FLAG_SEND_WRITE_ZEROES is not set".
    """
    flags = NBD_FLAG_HAS_FLAGS
    if info.read_only:
        flags |= NBD_FLAG_READ_ONLY
    else:
        if info.can_trim:
            flags |= NBD_FLAG_SEND_TRIM
        if info.can_write_zeroes:
            flags |= NBD_FLAG_SEND_WRITE_ZEROES
            if info.can_fast_zero:
                flags |= NBD_FLAG_SEND_FAST_ZERO
    if info.can_flush:
        flags |= NBD_FLAG_SEND_FLUSH
    if info.can_fua:
        flags |= NBD_FLAG_SEND_FUA
    if info.rotational:
        flags |= NBD_FLAG_ROTATIONAL
    if info.can_df and structured_replies:
        flags |= NBD_FLAG_SEND_DF
    if info.can_multi_conn:
        flags |= NBD_FLAG_CAN_MULTI_CONN
    if info.can_cache:
        flags |= NBD_FLAG_SEND_CACHE
    return flags
