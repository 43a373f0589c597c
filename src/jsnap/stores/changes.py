"""The changes table: which byte ranges of each volume live in the journal, and where.

Model
-----
Per volume, a dict chunk-number -> list of pieces, in ascending seq. A piece is a tuple
(seq, start, end, data_pos): the bytes [start, end) of the volume (never crossing a chunk
boundary) were written by record `seq`, and their data is at `data_pos`: ZEROES (-1: the
record wrote zeroes, i.e. WRITE_ZEROES or TRIM), a journal byte offset, or, with POOL_BIT
set, a location in the thin pool's data files (a REMAP record's data, written in place
already: pool_pos / pool_location). Newer pieces win byte by byte;
partial overlaps are resolved at read time by laying pieces over each other in seq order.

Keeping older pieces (instead of splitting them at insert) is what lets a snapshot read see
the journal "as of" its marker: it lays only the pieces with seq below the marker.

Invariants
----------
C1. The table is a cache of the journal between checkpoint and head: rebuilding it by
    replaying the journal gives the same reads (DESIGN invariant 6). It is never persisted.
C2. A piece is dropped early (absorbed) only when a newer piece covers it wholly and no
    snapshot of the volume was created between the two; no read of any image can see it then.
C3. Pieces leave the table only after the destager wrote them to production, so a reader
    never finds a range in neither place.

Locking: callers hold the engine's condition lock.
"""

from __future__ import annotations

from jsnap.stores import journal as jn
from jsnap.stores.thin import FILE_SHIFT

Piece = tuple[int, int, int, int]


# A record spanning more chunks than this (a whole-device TRIM or WRITE_ZEROES, say) is kept
# as one piece in the volume's list of big pieces instead of one piece per chunk: a 100 GiB
# discard is then one tuple, not 1.6 million.
BIG_CHUNKS = 64

# data_pos of a piece: ZEROES, a journal offset (< POOL_BIT), or POOL_BIT | file number in
# bits 46-61 | byte offset in that data file in bits 0-45 (64 TiB per file, 65536 files).
ZEROES = -1
POOL_BIT = 1 << 62
_POOL_FILE_SHIFT = 46
_POOL_OFFSET_MASK = (1 << _POOL_FILE_SHIFT) - 1
_EXT_INDEX_MASK = (1 << FILE_SHIFT) - 1  # an extent id's index in its file (stores/thin.py)


def pool_pos(file_no: int, offset: int) -> int:
    """data_pos of bytes at `offset` in the pool's data file number `file_no`."""
    assert 0 <= file_no <= 0xFFFF and 0 <= offset <= _POOL_OFFSET_MASK
    return POOL_BIT | (file_no << _POOL_FILE_SHIFT) | offset


def pool_location(data_pos: int) -> tuple[int, int]:
    """(file number, byte offset) of a data_pos with POOL_BIT set."""
    return (data_pos >> _POOL_FILE_SHIFT) & 0xFFFF, data_pos & _POOL_OFFSET_MASK


class ChangesTable:
    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.shift = chunk_size.bit_length() - 1
        # vol -> chunk -> pieces; a volume is a key here while it has any piece, big or not
        self.volumes: dict[int, dict[int, list[Piece]]] = {}
        self.big: dict[int, list[Piece]] = {}  # vol -> big pieces, ascending seq
        self.npieces = 0

    def index(self, vol: int, rec: jn.Record, newest_snap: int) -> None:
        """Insert a journaled data record: a WRITE's payload is at its journal offset, a
        REMAP's chunks are in the pool extents it names, zeroes and trims have no data."""
        if rec.kind == jn.REMAP:
            assert rec.exts is not None
            cs = self.chunk_size
            for i, ext in enumerate(rec.exts):
                self.insert(vol, rec.seq, rec.offset + i * cs, cs,
                            pool_pos(ext >> FILE_SHIFT, (ext & _EXT_INDEX_MASK) * cs),
                            newest_snap)
            return
        self.insert(vol, rec.seq, rec.offset, rec.length,
                    rec.data_pos if rec.kind == jn.WRITE else ZEROES, newest_snap)

    def insert(
        self, vol: int, seq: int, offset: int, length: int, data_pos: int, newest_snap: int
    ) -> None:
        """Record that `seq` wrote [offset, offset+length); `newest_snap` is the seq of the
        volume's newest snapshot marker (0 if none), used for absorption (C2)."""
        chunks = self.volumes.setdefault(vol, {})
        end = offset + length
        if ((end - 1) >> self.shift) - (offset >> self.shift) >= BIG_CHUNKS:
            self.big.setdefault(vol, []).append((seq, offset, end, data_pos))
            self.npieces += 1
            return
        shift = self.shift
        c = offset >> shift
        if (end - 1) >> shift == c:  # within one chunk, the common case
            lst = chunks.get(c)
            if lst is None:
                chunks[c] = [(seq, offset, end, data_pos)]
                self.npieces += 1
                return
        pos = offset
        while pos < end:
            stop = min(end, (c + 1) << shift)
            piece = (seq, pos, stop, -1 if data_pos < 0 else data_pos + (pos - offset))
            lst = chunks.get(c)
            if lst is None:
                chunks[c] = [piece]
            else:
                # Absorb older pieces wholly under this one, unless a snapshot sits between.
                if lst[-1][0] > newest_snap:
                    for p in lst:
                        if p[1] >= pos and p[2] <= stop and p[0] > newest_snap:
                            kept = [q for q in lst
                                    if q[0] < newest_snap or q[1] < pos or q[2] > stop]
                            self.npieces -= len(lst) - len(kept)
                            kept.append(piece)
                            chunks[c] = kept
                            break
                    else:
                        lst.append(piece)
                else:
                    lst.append(piece)
            self.npieces += 1
            pos = stop
            c += 1

    def insert_one_chunk(self, vol: int, seq: int, offset: int, length: int, data_pos: int,
                         newest_snap: int, c: int) -> None:
        """insert() of a record within chunk c, its first case inlined: replay calls this
        once per record of a full journal, and restart time is Python time per record."""
        chunks = self.volumes.get(vol)
        if chunks is None:
            chunks = self.volumes[vol] = {}
        if c in chunks:  # absorption rules apply
            self.insert(vol, seq, offset, length, data_pos, newest_snap)
        else:
            chunks[c] = [(seq, offset, offset + length, data_pos)]
            self.npieces += 1

    def pieces(self, vol: int, offset: int, length: int, below_seq: int = 0) -> list[Piece]:
        """Pieces overlapping [offset, offset+length), in an order safe to lay (per chunk by seq),
        clipped to the range. With `below_seq`, only pieces of records older than it."""
        chunks = self.volumes.get(vol)
        if chunks is None:
            return []
        end = offset + length
        out: list[Piece] = []
        for c in range(offset >> self.shift, ((end - 1) >> self.shift) + 1):
            lst = chunks.get(c)
            if lst is not None:
                _clip_into(out, lst, offset, end, below_seq)
        big = self.big.get(vol)
        if big:
            _clip_into(out, big, offset, end, below_seq)
            out.sort(key=_seq)  # lay big and per-chunk pieces together, oldest first
        return out

    def chunks_after(self, vol: int, seq: int, below: int | None = None) -> set[int]:
        """Chunks of `vol` touched by a journaled record newer than `seq` (and older than
        `below`). Pieces are absorbed only with no snapshot between, so a window between
        two snapshots never loses a chunk to absorption."""
        chunks = self.volumes.get(vol, {})
        if below is None:
            out = {c for c, lst in chunks.items() if lst[-1][0] > seq}
        else:
            out = {c for c, lst in chunks.items() if any(seq < p[0] < below for p in lst)}
        for pseq, s, e, _ in self.big.get(vol, ()):
            if pseq > seq and (below is None or pseq < below):
                out.update(range(s >> self.shift, ((e - 1) >> self.shift) + 1))
        return out

    def remove_upto(self, vol: int, chunks: set[int], seq: int) -> None:
        """Forget pieces with seq <= `seq` in `chunks` of `vol`: they are in production now."""
        table = self.volumes.get(vol)
        if table is None:
            return
        big = self.big.get(vol)
        if big:
            kept = [p for p in big if p[0] > seq]
            self.npieces -= len(big) - len(kept)
            if kept:
                self.big[vol] = kept
            else:
                del self.big[vol]
        for c in chunks:
            lst = table.get(c)
            if lst is None:
                continue
            if lst[-1][0] <= seq:
                self.npieces -= len(lst)
                del table[c]
            elif lst[0][0] <= seq:
                kept = [p for p in lst if p[0] > seq]
                self.npieces -= len(lst) - len(kept)
                table[c] = kept
        if not table and vol not in self.big:
            del self.volumes[vol]

    def drop_volume(self, vol: int) -> None:
        table = self.volumes.pop(vol, None)
        if table:
            self.npieces -= sum(len(lst) for lst in table.values())
        self.npieces -= len(self.big.pop(vol, ()))


def _seq(piece: Piece) -> int:
    return piece[0]


def _clip_into(out: list[Piece], pieces: list[Piece], offset: int, end: int,
               below_seq: int) -> None:
    """Append `pieces` (ascending seq) that overlap [offset, end), clipped to it; with
    `below_seq`, only those of records older than it."""
    for seq, s, e, dpos in pieces:
        if below_seq and seq >= below_seq:
            break
        if e <= offset or s >= end:
            continue
        if s < offset:
            if dpos >= 0:
                dpos += offset - s
            s = offset
        out.append((seq, s, min(e, end), dpos))
