"""The journal: a circular, checksummed, append-only log of writes and snapshot markers.

Model
-----
The journal file is the NVRAM of the design. Writers append records and are answered without
waiting for copy-on-write; the destager later moves each record to production and frees its
space by advancing the *checkpoint* (the position and seq of the oldest record not yet
destaged, kept in the pool catalog).

    0            4096                                                        file end
    | superblock |  ...free... | tail: oldest live rec | ... | head: next append | ...free... |
                                <------------- live records, seq ascending ------->

Records are placed at 64-byte aligned positions. A record that does not fit before the end of
the file is preceded by a WRAP record and placed at 4096 again. Every record is:

    header (64 bytes, little endian)       payload (payload_len bytes, padded to 64)
    magic version kind flags seq gen vol offset length aux payload_len reserved crc

The payload of a WRITE record starts 64-byte aligned right after its header, so a reader (or
copy_file_range) takes it straight from the file without reassembly.

Invariants
----------
J1. Records are appended in strictly increasing `seq` with no gaps; `gen` never decreases along
    the chain. Replay from the checkpoint accepts a record only if its magic, version, CRC32C
    (over header and payload), seq (= expected) and gen (>= previous, <= current) all check;
    the first failure ends the log and everything after it is a torn or stale tail.
J2. Each pool open takes a new generation (stored durably before the first append), so a
    stale record from an earlier life that happens to carry the next expected seq at the next
    position is rejected instead of resurrected.
J3. Space between tail and head is never overwritten; the checkpoint (tail) advances only
    after the destager made the records durable in production (DESIGN invariant 2).
J4. A full journal makes appenders wait for space (DESIGN invariant 7); nothing fails,
    unless the destager itself waits for space (`stalled`): then they get NoSpace (ENOSPC)
    at once, and nothing of theirs past what was appended is journaled.
J5. `durable_seq` is the highest seq known to be on stable storage: concurrent writers share
    one fdatasync (group commit); a failed fdatasync is never retried-and-ignored: the journal
    is marked failed and every later append or sync raises.
J6. Replay of a long log (past FORK_SCAN_AFTER bytes) is scanned on by a forked child
    running the same checks (J1) on the same bytes; this process takes only what the child
    streams, in order, and goes on scanning itself from the last record received if the
    child fails. The child writes nothing, holds no copy of the pool lock, and dies with
    its parent.

Locking: every method except `replay` and `replay_batches` expects the caller to hold `cv`
(a Condition shared with the engine); waits release it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import itertools
import logging
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from crc32c import crc32c

from jsnap.errors import IntegrityError, JsnapError, NoSpace
from jsnap.stores.files import BlockFile, Buffer

log = logging.getLogger("jsnap.journal")

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
_CRC_AT = 60  # crc covers header[:60] then the payload
_HEAD = struct.Struct("<IBBHQIIQQQIII")  # the header without its crc
_CRC = struct.Struct("<I")
assert _HEAD.size == _CRC_AT
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

_PAD = bytes(ALIGN)
_PAGE = 4096
_ZERO_PAGE = memoryview(bytes(_PAGE))
_REPLAY_WINDOW = 8 << 20  # the scan's reads in the child (Journal._scan_forked)...
# ...and in this process, which keeps the memory: freed 8 MiB windows stayed in the heap
# (17 MiB more RSS after a full-journal restart)
_REPLAY_WINDOW_HERE = 1 << 20
MARKER_RESERVE = 64 << 10  # journal space only snapshot markers may use (see append)...
_IOV_BATCH = 900  # buffers per pwritev, below Linux's IOV_MAX of 1024
# Restart after a crash with a full journal is bound by Python work per record, about half in
# the scan (read, check, parse) and half in the engine's indexing. Records past this many
# bytes from the checkpoint are scanned by a forked child (Journal._scan_forked), so the two
# halves run on two cores; a short log is not worth a fork.
FORK_SCAN_AFTER = 32 << 20
# The child's messages: a count of records, of extras and the extras' bytes; `count`
# entries (a Record's fields); (index, length) of each extra (a snapshot marker's name, a
# REMAP's extent ids); the extras. A count of _END ends the stream; its bytes say why the
# log ends (replay_end).
_MSG = struct.Struct("<III")
_ENTRY = struct.Struct("<10Q")  # the ten fields of a Record
_EXTRA = struct.Struct("<II")
_END = 0xFFFFFFFF
_BATCH = 1024  # records per list replay_batches yields, and per message
_PIPE_SIZE = 1 << 20
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# One append: kind, vol, offset, length, payload buffers, payload length, aux, name.
Entry = tuple[int, int, int, int, Sequence[Buffer], int, int, str]


def _die_with(parent: int) -> None:
    """In a forked replay scanner: be killed when the process that forked it dies (a crash
    during replay leaves no scanner behind), or exit now if it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _send_all(fd: int, parts: list[Buffer]) -> None:
    """One message of the replay scanner (Journal._scan_child) into its pipe."""
    view = memoryview(b"".join(parts))
    while view:
        view = view[os.write(fd, view):]


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class _WindowReader:
    """The replay scan's reads: windows of `window` bytes, the next one read ahead by a
    thread while records of this one are parsed (pread releases the GIL), so a cold-cache
    restart overlaps disk reads with parsing: a few big preads instead of two small ones
    per record."""

    def __init__(self, file: BlockFile, start: int, end: int, window: int) -> None:
        self.file, self.start, self.end, self.window = file, start, end, window
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jsnap-replay")
        self.ahead: concurrent.futures.Future[bytes] | None = None
        self.ahead_pos = -1

    def _fetch(self, at: int, n: int) -> concurrent.futures.Future[bytes]:
        return self.pool.submit(self.file.pread, min(max(n, self.window), self.end - at), at)

    def read(self, at: int, n: int) -> tuple[memoryview, int]:
        """A window holding [at, at+n) and the index of `at` in it. The next window is the
        read-ahead, taken as it is (no copy); a record across two windows is read alone."""
        ahead = self.ahead
        if ahead is not None and self.ahead_pos <= at:  # on into the read-ahead (or the wrap)
            data = ahead.result()
            self.ahead = None
            if at + n <= self.ahead_pos + len(data):
                start = self.ahead_pos
                nxt = start + len(data)
                self.ahead_pos = nxt if nxt < self.end else self.start
                self.ahead = self._fetch(self.ahead_pos, 0)
                return memoryview(data), at - start
        elif ahead is not None and at < self.ahead_pos < at + n:  # across the windows' seam
            return memoryview(self.file.pread(n, at)), 0
        data = self._fetch(at, n).result()  # the first window, or a record longer than one
        nxt = at + len(data)
        self.ahead_pos = nxt if nxt < self.end else self.start
        self.ahead = self._fetch(self.ahead_pos, 0)
        return memoryview(data), 0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class JournalFailed(JsnapError):
    """A journal write or fdatasync failed; the pool must not acknowledge further writes."""


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


assert _ENTRY.size == 8 * len(_RecordFields._fields)


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


def _attach(rec: Record, payload: Buffer) -> None:
    """Set what a snapshot marker's or REMAP record's payload holds on its Record."""
    if rec.kind == SNAP_CREATE:
        rec.name = bytes(payload).decode("utf-8", "replace")
    else:
        rec.exts = [e for (e,) in EXT.iter_unpack(payload)]


def _payload_of(rec: Record) -> bytes:
    """The payload _attach read `rec`'s name or extents from (the replay scanner's extra)."""
    if rec.kind == SNAP_CREATE:
        return rec.name.encode()
    return b"".join(map(EXT.pack, rec.exts or ()))


def format_journal(file: BlockFile, size: int, pool_uuid: bytes) -> None:
    """Write a fresh superblock; the record area's old bytes are harmless stale tail (J1)."""
    file.truncate(size)
    sb = SUPER.pack(SUPER_MAGIC, VERSION, 0, size, pool_uuid)
    file.pwrite(sb + bytes(SUPERBLOCK_SIZE - len(sb)), 0)
    file.sync()


class Journal:
    def __init__(
        self,
        file: BlockFile,
        cv: threading.Condition,
        *,
        generation: int,
        checkpoint_pos: int,
        checkpoint_seq: int,
        checkpoint_gen: int = 0,
    ) -> None:
        self.file = file
        self.cv = cv
        self.gen = generation
        sb = file.pread(SUPER.size, 0)
        size: int  # struct gives Any: the bounds below are ints
        magic, version, _, size, self.pool_uuid = SUPER.unpack(sb)
        if magic != SUPER_MAGIC:
            raise IntegrityError(f"{file.path}: not a jsnap journal (bad magic at byte 0)")
        if version != VERSION:
            raise IntegrityError(f"{file.path}: journal format version {version} is not supported")
        if file.size() < size:
            raise IntegrityError(f"{file.path}: journal is {file.size()} bytes, expected {size}")
        self.start = SUPERBLOCK_SIZE
        self.end = size - size % ALIGN
        self.capacity = self.end - self.start
        # Largest single record payload: a quarter of the journal, so a writer never waits for
        # space that can only appear if the journal were emptier than empty.
        self.max_payload = min(32 << 20, (self.capacity // 4) & ~(ALIGN - 1))
        self.marker_reserve = min(MARKER_RESERVE, self.capacity // 64)  # ...at most 1/64
        self.tail = checkpoint_pos  # oldest live record (the checkpoint)
        # Generation of the last destaged record: the record at the checkpoint must not be
        # older, or it is stale tail from before a cut that the checkpoint has reached (J2).
        self.checkpoint_gen = checkpoint_gen
        self.head = checkpoint_pos  # next append position
        self.next_seq = checkpoint_seq
        self.used = 0  # bytes between tail and head, wrap padding included
        self.durable_seq = checkpoint_seq - 1
        self.written_seq = checkpoint_seq - 1
        self._syncing = False
        self.failed: BaseException | None = None
        self._bufs: list[Buffer] = []  # the run of records being built by append_many
        self._run_pos = checkpoint_pos
        self.waiters = 0  # writers waiting for space (visible in status)
        # Set (to why) while the destager cannot drain for lack of space: a writer that would
        # wait for journal space gets NoSpace instead of waiting for what may never come.
        self.stalled: str | None = None
        self.replay_end = ""  # where and why replay stopped (logged by the engine)
        self._resume: tuple[int, int, int] | None = None  # where a budgeted _scan stopped
        # Run in a forked replay scanner before it scans: closes what the child must not
        # hold (the engine's pool lock, so a restart after a crash never finds it taken).
        self.after_fork: Callable[[], None] | None = None
        # Called before every fdatasync, lock released: makes REMAP records' data durable
        # before the records themselves count as durable. An exception fails the journal.
        self.pre_sync: Callable[[], None] | None = None

    # -- replay -------------------------------------------------------------------------------

    def replay(self, verify: Callable[[Record], bool] | None = None) -> Iterator[Record]:
        """replay_batches, one record at a time."""
        for batch in self.replay_batches(verify):
            yield from batch

    def replay_batches(self, verify: Callable[[Record], bool] | None = None
                       ) -> Iterator[list[Record]]:
        """Yield the valid records from the checkpoint on, in lists, and set head/next_seq
        after the last.

        Stops silently at the first record that fails a check (J1): that is the torn tail.
        `verify(rec)` is asked about each REMAP record (exts filled in): False ends the log
        there too (its data did not all reach the disk); it must not depend on what the
        caller did with the records before (they come in batches). Past FORK_SCAN_AFTER
        bytes of records, a forked child scans the rest (see _scan_forked).
        """
        reader = _WindowReader(self.file, self.start, self.end,
                               min(_REPLAY_WINDOW, _REPLAY_WINDOW_HERE))
        self._resume = None
        try:
            yield from self._scan(reader.read, self.tail, self.next_seq, self.checkpoint_gen,
                                  verify, FORK_SCAN_AFTER)
        finally:
            reader.close()  # no thread of ours runs at the fork
        if self._resume is not None:  # a long log: a child scans on while we index
            yield from self._scan_forked(*self._resume, verify)
        self.durable_seq = self.written_seq = self.next_seq - 1

    def _scan(self, read: Callable[[int, int], tuple[memoryview, int]], pos: int, seq: int,
              gen: int, verify: Callable[[Record], bool] | None,
              budget: int | None = None) -> Iterator[list[Record]]:
        # One pass per record over a full journal (restart time): window hits and the head
        # accounting are inlined; head and used live in locals until the end. With a
        # `budget`, stops after that many bytes of records and leaves where it stopped in
        # self._resume.
        unpack_from, hsize, jstart, jend, jgen, maxp = HEADER.unpack_from, HEADER.size, \
            self.start, self.end, self.gen, self.max_payload
        new = tuple.__new__
        buf, base, blen = memoryview(b""), 0, 0  # the window, its file offset, its length
        head, used = self.head, self.used
        stop_at = -1 if budget is None else used + budget
        out: list[Record] = []
        try:
            while True:
                if used >= stop_at >= 0:
                    self._resume = (pos, seq, gen)
                    break
                if pos + hsize > jend:
                    pos = jstart
                i = pos - base
                if i < 0 or i + hsize > blen:
                    buf, i = read(pos, hsize)
                    base, blen = pos - i, len(buf)
                (magic, version, kind, _flags, rseq, rgen, vol, offset, length, aux, plen, _r,
                 _p, crc) = unpack_from(buf, i)
                end = pos + hsize + ((plen + ALIGN - 1) & ~(ALIGN - 1))
                if (magic != REC_MAGIC or version != VERSION or rseq != seq or rgen < gen
                        or rgen > jgen or kind not in KIND_NAMES or end > jend or plen > maxp):
                    self._stop(pos, seq, self._header_problem(magic, version, rseq, seq, rgen,
                                                              gen, kind, plen))
                    break
                if i + hsize + plen > blen:  # the payload runs past this window
                    buf, i = read(pos, hsize + plen)
                    base, blen = pos - i, len(buf)
                payload = buf[i + hsize : i + hsize + plen]
                if crc32c(payload, crc32c(buf[i : i + _CRC_AT])) != crc:
                    self._stop(pos, seq, "bad crc (torn or corrupt record)")
                    break
                rec = new(Record, (rseq, kind, vol, offset, length, aux, pos, end, pos + hsize,
                                   rgen))
                if kind == SNAP_CREATE or kind == REMAP:
                    _attach(rec, payload)
                if kind == REMAP:
                    if verify is not None and not verify(rec):
                        self._stop(pos, seq, "remapped data does not match its checksum (torn)")
                        break
                # Move head past rec (which sits at head, or at start after a wrap).
                if pos != head:  # implicit wrap: fewer than 64 bytes were left at the end
                    used += jend - head
                used += end - pos
                if kind == WRAP:
                    used += jend - end
                    head = jstart
                else:
                    head = end
                self.next_seq = rseq + 1
                out.append(rec)
                if len(out) == _BATCH:
                    yield out
                    out = []
                gen = rgen
                seq += 1
                pos = jstart if kind == WRAP else end
        finally:
            self.head, self.used = head, used
        if out:
            yield out

    def _scan_here(self, pos: int, seq: int, gen: int, verify: Callable[[Record], bool] | None,
                   window: int = _REPLAY_WINDOW_HERE) -> Iterator[list[Record]]:
        reader = _WindowReader(self.file, self.start, self.end,
                               min(_REPLAY_WINDOW, window))
        try:
            yield from self._scan(reader.read, pos, seq, gen, verify)
        finally:
            reader.close()

    def _scan_forked(self, pos: int, seq: int, gen: int,
                     verify: Callable[[Record], bool] | None) -> Iterator[list[Record]]:
        """Go on with replay in a forked child: it reads and checks the records (the same
        _scan, so the same rules) and streams their fields through a pipe; this process
        makes the Records (in C) and the caller indexes them meanwhile, on the other core.
        Should the child fail, the scan goes on here from the last record received."""
        rfd, wfd = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe only means more switches
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(rfd)
            os.close(wfd)
            log.warning("journal %s: cannot fork a replay scanner (%s); scanning here",
                        self.file.path, e)
            yield from self._scan_here(pos, seq, gen, verify)
            return
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                _die_with(parent)
                os.close(rfd)
                if self.after_fork is not None:
                    self.after_fork()
                self._scan_child(wfd, pos, seq, gen, verify)
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        last: Record | None = None
        ended = False
        src = os.fdopen(rfd, "rb", buffering=_PIPE_SIZE)
        make = functools.partial(tuple.__new__, Record)  # Record._make with no Python frame
        unpack_entries, esize = _ENTRY.iter_unpack, _ENTRY.size
        try:
            while True:
                msg = src.read(_MSG.size)
                if len(msg) < _MSG.size:
                    break
                count, nextra, xlen = _MSG.unpack(msg)
                if count == _END:
                    self.replay_end = src.read(xlen).decode("utf-8", "replace")
                    ended = True
                    break
                size = count * esize + nextra * _EXTRA.size + xlen
                body = memoryview(src.read(size))
                if len(body) < size:
                    break
                recs = list(map(make, unpack_entries(body[: count * esize])))
                at = count * esize + nextra * _EXTRA.size
                for k, n in _EXTRA.iter_unpack(body[count * esize : at]):
                    _attach(recs[k], body[at : at + n])
                    at += n
                last = recs[-1]
                yield recs
        finally:
            src.close()
            if not ended:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if last is not None:  # the head accounting _scan does, from the last record
            self.head = self.start if last.kind == WRAP else last.end
            self.next_seq = last.seq + 1
            h, t = self.head, self.tail
            self.used = h - t if h >= t else (self.end - t) + (h - self.start)
            pos, seq, gen = self.head, last.seq + 1, last.gen
        if not ended:
            log.warning("journal %s: the replay scanner stopped early; scanning on here from "
                        "seq %d", self.file.path, seq)
            yield from self._scan_here(pos, seq, gen, verify)

    def _scan_child(self, wfd: int, pos: int, seq: int, gen: int,
                    verify: Callable[[Record], bool] | None) -> None:
        """The forked scanner: send the valid records from (pos, seq, gen) on, a batch per
        message, then the end message with why the log ends."""
        for recs in self._scan_here(pos, seq, gen, verify, _REPLAY_WINDOW):
            extras = [(k, _payload_of(rec)) for k, rec in enumerate(recs)
                      if rec.kind == SNAP_CREATE or rec.kind == REMAP]
            _send_all(wfd, [
                _MSG.pack(len(recs), len(extras), sum(len(x) for _, x in extras)),
                struct.pack(f"<{len(recs) * len(_RecordFields._fields)}Q",
                            *itertools.chain.from_iterable(recs)),
                *(_EXTRA.pack(k, len(x)) for k, x in extras),
                *(x for _, x in extras)])
        why = self.replay_end.encode()
        _send_all(wfd, [_MSG.pack(_END, 0, len(why)), why])

    def _header_problem(self, magic: int, version: int, rseq: int, seq: int, rgen: int,
                        gen: int, kind: int, plen: int) -> str:
        """Why a header failed the checks of _scan: redone off the per-record path, once, at
        the end of the log, only to name the reason."""
        if magic != REC_MAGIC or version != VERSION:
            return "no record (bad magic or version)"
        if rseq != seq:
            return f"stale record (seq {rseq})"
        if rgen < gen or rgen > self.gen:
            return f"stale record (generation {rgen})"
        if kind not in KIND_NAMES:
            return f"unknown record kind {kind}"
        return f"bad payload length {plen}"

    def _stop(self, pos: int, seq: int, why: str) -> None:
        """The end of the log: everything from here on is a torn or stale tail (J1)."""
        self.replay_end = f"{self.file.path}: log ends at byte {pos}, seq {seq}: {why}"

    # -- append -------------------------------------------------------------------------------

    def record_size(self, payload_len: int) -> int:
        return HEADER.size + _align(payload_len)

    def _need(self, size: int) -> int:
        """Bytes of free space an append of `size` at head consumes, wrap waste included."""
        if self.head + size <= self.end:
            return size
        return (self.end - self.head) + size

    def append(
        self,
        kind: int,
        vol: int,
        offset: int,
        length: int,
        payload: Sequence[Buffer] = (),
        payload_len: int = 0,
        aux: int = 0,
        name: str = "",
    ) -> Record:
        """Append one record, waiting for space if the journal is full (J4). Caller holds cv.

        Snapshot markers may use the space kept back from data records (MARKER_RESERVE), so
        a snapshot is taken at once even when writers are waiting for a full journal."""
        reserve = 0 if kind in (SNAP_CREATE, SNAP_DELETE) else self.marker_reserve
        entry = (kind, vol, offset, length, payload, payload_len, aux, name)
        return self.append_many([entry], reserve=reserve)[0]

    def append_many(self, items: Sequence[Entry],
                     admit: Callable[[list[Record]], None] | None = None,
                     reserve: int = -1) -> list[Record]:
        """Append records in order with as few pwritev calls as possible (one per contiguous
        run of up to IOV_MAX buffers). Caller holds cv; waits for space release it (J4).

        `admit` is called with the records appended so far before any wait and at the end:
        records must reach the destager before we sleep on space only it can free, and in
        seq order, since other writers may append while we sleep."""
        if self.failed is not None:
            raise JournalFailed(f"{self.file.path}: journal failed earlier: {self.failed}")
        if reserve < 0:
            reserve = self.marker_reserve
        recs: list[Record] = []
        admitted = 0
        self._bufs = []
        self._run_pos = self.head
        for kind, vol, offset, length, payload, payload_len, aux, name in items:
            size = HEADER.size + _align(payload_len)
            assert payload_len <= self.max_payload
            # Keep one ALIGN gap so head == tail always means "empty", never "full".
            if self._need(size) + ALIGN + reserve > self.capacity - self.used:
                self._flush_run()  # what we built must be in the file before we sleep
                if admit is not None and admitted < len(recs):
                    admit(recs[admitted:])
                    admitted = len(recs)
                while self._need(size) + ALIGN + reserve > self.capacity - self.used:
                    if self.stalled is not None:
                        raise NoSpace(f"the journal is full and destage is waiting for "
                                      f"space: {self.stalled}")
                    self.waiters += 1
                    try:
                        self.cv.wait()
                    finally:
                        self.waiters -= 1
                    if self.failed is not None:
                        raise JournalFailed(
                            f"{self.file.path}: journal failed earlier: {self.failed}")
                self._run_pos = self.head  # others appended while we slept
            if self.head + size > self.end:
                if self.head + HEADER.size <= self.end:
                    self._build(WRAP, 0, 0, 0, (), 0, 0, "")
                else:
                    self.used += self.end - self.head
                    self.head = self.start
                self._flush_run()
            recs.append(self._build(kind, vol, offset, length, payload, payload_len, aux, name))
            if len(self._bufs) > _IOV_BATCH:
                self._flush_run()
        self._flush_run()
        if admit is not None and admitted < len(recs):
            admit(recs[admitted:])
        return recs

    def _build(self, kind: int, vol: int, offset: int, length: int,
               payload: Sequence[Buffer], payload_len: int, aux: int, name: str) -> Record:
        """Lay out one record at head into the pending run (written by _flush_run)."""
        seq = self.next_seq
        pos = self.head
        head = _HEAD.pack(REC_MAGIC, VERSION, kind, 0, seq, self.gen, vol, offset, length, aux,
                          payload_len, 0, 0)
        crc = crc32c(head)
        for buf in payload:
            crc = crc32c(buf, crc)
        pad = (-payload_len) & (ALIGN - 1)
        bufs = self._bufs
        bufs.append(head + _CRC.pack(crc))
        bufs.extend(payload)
        if pad:
            bufs.append(_PAD[:pad])
        end = pos + HEADER.size + payload_len + pad
        rec = Record(seq, kind, vol, offset, length, aux, pos, end, name, self.gen)
        # Move head past it: the record sits at head (append_many wrapped before calling us)
        self.used += end - pos
        if kind == WRAP:
            self.used += self.end - end
            self.head = self.start
        else:
            self.head = end
        self.next_seq = seq + 1
        return rec

    def _pad_to_page(self) -> int:
        """Zero bytes that may follow the run: up to the next page boundary, never into live
        records (the tail) or past the end. A write that ends mid-page makes the kernel read
        the rest of that page first when it is not cached: measured 64 us per 4 KiB append
        on evicted journal pages, against 4 us when the run ends on a page boundary."""
        head = self.head
        stop = min((head + _PAGE - 1) & ~(_PAGE - 1), self.end)
        if self.used and self.tail > head:
            stop = min(stop, self.tail)
        return max(stop - head, 0)

    def _flush_run(self) -> None:
        """pwritev the pending run at its position; only then are its records 'written'."""
        bufs = self._bufs
        if bufs:
            pos = self._run_pos
            pad = self._pad_to_page()
            if pad:
                bufs.append(_ZERO_PAGE[:pad])
            try:
                self.file.pwritev(bufs, pos)
            except BaseException as e:
                self.failed = JournalFailed(f"{self.file.path}: write failed at byte {pos}: {e}")
                self.cv.notify_all()
                log.error("journal %s: write failed at byte %d (%s); the pool is read-only "
                          "until restarted", self.file.path, pos, e)
                raise self.failed from e
            bufs.clear()
        self.written_seq = self.next_seq - 1
        self._run_pos = self.head

    # -- durability ---------------------------------------------------------------------------

    def sync_upto(self, seq: int) -> None:
        """Return once every record up to `seq` is durable; concurrent callers share one sync."""
        while self.durable_seq < seq:
            if self.failed is not None:
                raise JournalFailed(f"{self.file.path}: journal failed earlier: {self.failed}")
            if self._syncing:
                self.cv.wait()
                continue
            self._syncing = True
            target = self.written_seq
            self.cv.release()
            try:
                if self.pre_sync is not None:
                    self.pre_sync()
                self.file.sync()
            except BaseException as e:
                self.cv.acquire()
                self._syncing = False
                # fsyncgate: never retry and pretend it worked
                self.failed = JournalFailed(f"{self.file.path}: fdatasync failed: {e}")
                self.cv.notify_all()
                log.error("journal %s: fdatasync failed (%s); writes not yet durable may be "
                          "lost; the pool is read-only until restarted", self.file.path, e)
                raise self.failed from e
            self.cv.acquire()
            self._syncing = False
            if target > self.durable_seq:
                self.durable_seq = target
            self.cv.notify_all()

    # -- reclaim ------------------------------------------------------------------------------

    def release_upto(self, rec: Record) -> None:
        """Free the space of every record up to and including `rec` (checkpoint moved, J3)."""
        new_tail = self.start if rec.kind == WRAP else rec.end
        if new_tail >= self.tail:
            freed = new_tail - self.tail
        else:
            freed = (self.end - self.tail) + (new_tail - self.start)
        self.used -= freed
        self.tail = new_tail
        assert self.used >= 0, (self.used, self.tail)
        assert (self.used == 0) == (self.tail == self.head), (self.used, self.tail, self.head)
        self.cv.notify_all()

    def fill(self) -> float:
        return self.used / self.capacity
