"""The journal's on-disk format: superblock, record header, record kinds, and the Record.

Model
-----
The file starts with a superblock of SUPERBLOCK_SIZE bytes; records fill the rest, at 64-byte
aligned positions, circularly (writer.py appends them, replay.py reads them back):

    0            4096                                                        file end
    | superblock |  ...free... | tail: oldest live rec | ... | head: next append | ...free... |

    header (64 bytes, little endian)       payload (payload_len bytes, padded to 64)
    magic version kind flags seq gen vol offset length aux payload_len reserved crc

The payload of a WRITE record starts 64-byte aligned right after its header, so a reader (or
copy_file_range) takes it straight from the file without reassembly. A record that does not
fit before the end of the file is preceded by a WRAP record and placed at 4096 again.

Invariants
----------
F1. A record at `pos` has its payload at pos + 64 and ends at pos + 64 + payload_len rounded
    up to 64 (`data_pos`, `end`); every record starts 64-byte aligned, in [4096, file end).
F2. The CRC32C of a record covers its header's first 60 bytes (CRC_AT), then the payload;
    it is stored in the header's last 4 bytes.
F3. A Record is a tuple of exactly its ten fields (replay makes them with tuple.__new__, the
    forked scanner streams them as ten int64s). `name` (SNAP_CREATE) and `exts` (REMAP) are
    not fields: class defaults, set on the records that have them; replay sets them from
    the payload (`attach`), and `payload_of` gives that payload back.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from jsnap.errors import IntegrityError
from jsnap.stores.files import BlockFile, Buffer

SUPERBLOCK_SIZE = 4096
ALIGN = 64

# Superblock, at offset 0:
#   C: 8 bytes magic "JSNAPJNL", 32 bits version, 32 bits reserved, 64 bits file size,
#   16 bytes pool uuid
SUPER = struct.Struct("<8sIIQ16s")
assert SUPER.size == 40
SUPER_MAGIC = b"JSNAPJNL"
VERSION = 1

# Record header:
#   C: 32 bits magic, 8 bits version, 8 bits kind, 16 bits flags,
#   64 bits seq, 32 bits generation, 32 bits volume id,
#   64 bits offset, 64 bits length, 64 bits aux,
#   32 bits payload length, 32 bits reserved, 32 bits pad, 32 bits crc32c
HEADER = struct.Struct("<IBBHQIIQQQIIII")
assert HEADER.size == 64
CRC_AT = 60  # crc covers header[:60] then the payload (F2)
HEAD = struct.Struct("<IBBHQIIQQQIII")  # the header without its crc
CRC = struct.Struct("<I")
assert HEAD.size == CRC_AT
REC_MAGIC = 0x524E534A  # "JSNR"

# Record kinds.
WRITE = 1
ZEROES = 2
TRIM = 3
SNAP_CREATE = 4  # payload: snapshot name; aux: creation time (µs since epoch)
SNAP_DELETE = 5  # aux: seq of the snapshot's create marker
WRAP = 6  # the rest of the file is unused; the next record is at SUPERBLOCK_SIZE
ZEROES_ALLOC = 7  # WRITE_ZEROES with NO_HOLE: zeroes that stay allocated in production
# A write redirected to fresh pool extents (thin volumes, whole chunks): the data is written
# to the extents before the record, whose payload is the extent ids (little-endian int64, one
# per chunk) and whose aux is the CRC32C of the data. Replay checks that CRC (via `verify`):
# a record that reached the disk before its data is a torn tail like any other.
REMAP = 8
KIND_NAMES = {
    WRITE: "write",
    ZEROES: "zeroes",
    TRIM: "trim",
    SNAP_CREATE: "snapshot-create",
    SNAP_DELETE: "snapshot-delete",
    WRAP: "wrap",
    ZEROES_ALLOC: "zeroes-allocated",
    REMAP: "remap",
}
DATA_KINDS = (WRITE, ZEROES, TRIM, ZEROES_ALLOC, REMAP)
EXT = struct.Struct("<q")  # one extent id of a REMAP payload


class _RecordFields(NamedTuple):
    seq: int
    kind: int
    vol: int
    offset: int
    length: int
    aux: int
    pos: int
    end: int
    data_pos: int
    gen: int


class Record(_RecordFields):
    """One journal record as the engine tracks it (no payload kept in memory but markers').

    A tuple of header fields, so that replay makes them in C (`tuple.__new__` mapped over
    `struct.iter_unpack`, no Python constructor: 258k of them in a full 1 GiB journal):
    seq, kind, vol, offset, length, aux; `pos` is the file offset of the header, `data_pos`
    of the payload, `end` right after the padded payload (where the next record goes);
    `gen` the generation that wrote it. `name` (a snapshot marker's) and `exts` are set on
    the few records that have them."""

    name = ""
    # REMAP: the extents holding the data, one per chunk; None once they are not the
    # record's to give back (its destage was committed before a crash, or its volume was
    # deleted): see core/recovery.py.
    exts: list[int] | None = None

    def __new__(cls, seq: int, kind: int, vol: int, offset: int, length: int, aux: int,
                pos: int, end: int, name: str = "", gen: int = 0) -> Record:
        rec = tuple.__new__(cls, (seq, kind, vol, offset, length, aux, pos, end,
                                  pos + HEADER.size, gen))
        if name:
            rec.name = name
        return rec

    def __repr__(self) -> str:
        return (
            f"Record(seq={self.seq}, {KIND_NAMES.get(self.kind, self.kind)}, vol={self.vol}, "
            f"offset={self.offset}, length={self.length}, pos={self.pos})"
        )


def attach(rec: Record, payload: Buffer) -> None:
    """Set what a snapshot marker's or REMAP record's payload holds on its Record (F3)."""
    if rec.kind == SNAP_CREATE:
        rec.name = bytes(payload).decode("utf-8", "replace")
    else:
        rec.exts = [e for (e,) in EXT.iter_unpack(payload)]


def payload_of(rec: Record) -> bytes:
    """The payload `attach` read `rec`'s name or extents from (the forked scanner's extra)."""
    if rec.kind == SNAP_CREATE:
        return rec.name.encode()
    return b"".join(map(EXT.pack, rec.exts or ()))


def format_journal(file: BlockFile, size: int, pool_uuid: bytes) -> None:
    """Write a fresh superblock. The caller zeroes the record area (core/layout.py, L5):
    records carry no pool identity. A store that cannot resize (a device) holds `size`."""
    if file.caps.resize:
        file.truncate(size)
    sb = SUPER.pack(SUPER_MAGIC, VERSION, 0, size, pool_uuid)
    file.pwrite(sb + bytes(SUPERBLOCK_SIZE - len(sb)), 0)
    file.sync()


def read_superblock(file: BlockFile) -> tuple[int, bytes]:
    """The file size and pool uuid the superblock states, once it checks out."""
    size: int  # struct gives Any: the bounds the caller derives are ints
    pool_uuid: bytes
    magic, version, _, size, pool_uuid = SUPER.unpack(file.pread(SUPER.size, 0))
    if magic != SUPER_MAGIC:
        raise IntegrityError(f"{file.path}: not a jsnap journal (bad magic at byte 0)")
    if version != VERSION:
        raise IntegrityError(f"{file.path}: journal format version {version} is not supported")
    if file.size() < size:
        raise IntegrityError(f"{file.path}: journal is {file.size()} bytes, expected {size}")
    return size, pool_uuid
