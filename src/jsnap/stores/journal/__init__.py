"""The journal: a circular, checksummed, append-only log of writes and snapshot markers.

Model
-----
The journal file is the NVRAM of the design. Writers append records and are answered without
waiting for copy-on-write; the destager later moves each record to production and frees its
space by advancing the *checkpoint* (the position and seq of the oldest record not yet
destaged, kept in the pool catalog). At open, replay finds the records from the checkpoint
on; the first one that fails a check ends the log.

    0            4096                                                        file end
    | superblock |  ...free... | tail: oldest live rec | ... | head: next append | ...free... |
                                <------------- live records, seq ascending ------->

In parts, each with its model and invariants:

    format.py   superblock, record header and kinds, Record, `format_journal`    F1-F3
    writer.py   Journal: append (with waits for space), group commit, release    J3-J5
    replay.py   the scan from the checkpoint, its checks, the forked scanner     J1, J2, J6

Importers use this package (`from jsnap.stores import journal as jn`): the names below.
Replay's tunables (FORK_SCAN_AFTER and the like) are read where they are defined, so a test
sets them on `jsnap.stores.journal.replay`.
"""

from jsnap.stores.journal.format import (
    ALIGN,
    DATA_KINDS,
    EXT,
    HEADER,
    KIND_NAMES,
    REC_MAGIC,
    REMAP,
    SNAP_CREATE,
    SNAP_DELETE,
    SUPER,
    SUPER_MAGIC,
    SUPERBLOCK_SIZE,
    TRIM,
    VERSION,
    WRAP,
    WRITE,
    ZEROES,
    ZEROES_ALLOC,
    Record,
    format_journal,
)
from jsnap.stores.journal.writer import MARKER_RESERVE, Entry, Journal, JournalFailed

__all__ = [
    "ALIGN",
    "DATA_KINDS",
    "EXT",
    "HEADER",
    "KIND_NAMES",
    "MARKER_RESERVE",
    "REC_MAGIC",
    "REMAP",
    "SNAP_CREATE",
    "SNAP_DELETE",
    "SUPER",
    "SUPERBLOCK_SIZE",
    "SUPER_MAGIC",
    "TRIM",
    "VERSION",
    "WRAP",
    "WRITE",
    "ZEROES",
    "ZEROES_ALLOC",
    "Entry",
    "Journal",
    "JournalFailed",
    "Record",
    "format_journal",
]
