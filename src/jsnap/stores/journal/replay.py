"""Journal replay: scan the records from the checkpoint on, check each, find where the log ends.

Model
-----
At open the engine asks the journal for its records from the checkpoint (`Journal.replay`,
`replay_batches`); the journal runs one Scan. A Scan reads the file in windows with a
read-ahead thread (_WindowReader), checks each record's header and CRC, makes the Records
and does the head accounting (head, used, next_seq) as it goes; the first record that fails
a check ends the log, and `why` says where and why (logged by the engine as replay_end).

Restart after a crash with a full journal is bound by Python work per record, about half in
the scan and half in the engine's indexing: past FORK_SCAN_AFTER bytes a forked child scans
the rest and streams the Records' fields through a pipe, so the two halves run on two cores.

Invariants
----------
J1. Records are appended in strictly increasing `seq` with no gaps; `gen` never decreases along
    the chain. Replay from the checkpoint accepts a record only if its magic, version, CRC32C
    (over header and payload), seq (= expected) and gen (>= previous, <= current) all check;
    the first failure ends the log and everything after it is a torn or stale tail.
J2. Each pool open takes a new generation (stored durably before the first append), so a
    stale record from an earlier life that happens to carry the next expected seq at the next
    position is rejected instead of resurrected.
J6. Replay of a long log (past FORK_SCAN_AFTER bytes) is scanned on by a forked child
    running the same checks (J1) on the same bytes; this process takes only what the child
    streams, in order, and goes on scanning itself from the last record received if the
    child fails. The child writes nothing, holds no copy of the pool lock, and dies with
    its parent.
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
from collections.abc import Callable, Iterator

from crc32c import crc32c

from jsnap.stores.files import BlockFile, Buffer
from jsnap.stores.journal.format import (
    ALIGN,
    CRC_AT,
    HEADER,
    KIND_NAMES,
    REC_MAGIC,
    REMAP,
    SNAP_CREATE,
    VERSION,
    WRAP,
    Record,
    attach,
    payload_of,
)

log = logging.getLogger("jsnap.journal")

_REPLAY_WINDOW = 8 << 20  # the scan's reads in the child (Scan._scan_forked)...
# ...and in this process, which keeps the memory: freed 8 MiB windows stayed in the heap
# (17 MiB more RSS after a full-journal restart)
_REPLAY_WINDOW_HERE = 1 << 20
# Records past this many bytes from the checkpoint are scanned by a forked child
# (Scan._scan_forked), so the scan and the engine's indexing run on two cores; a short log
# is not worth a fork.
FORK_SCAN_AFTER = 32 << 20
# The child's messages: a count of records, of extras and the extras' bytes; `count`
# entries (a Record's fields); (index, length) of each extra (a snapshot marker's name, a
# REMAP's extent ids); the extras. A count of _END ends the stream; its bytes say why the
# log ends (Scan.why).
_MSG = struct.Struct("<III")
_ENTRY = struct.Struct("<10Q")  # the ten fields of a Record
_EXTRA = struct.Struct("<II")
_END = 0xFFFFFFFF
_BATCH = 1024  # records per list replay_batches yields, and per message
_PIPE_SIZE = 1 << 20
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

assert _ENTRY.size == 8 * len(Record._fields)

Verify = Callable[[Record], bool]


def _die_with(parent: int) -> None:
    """In a forked replay scanner: be killed when the process that forked it dies (a crash
    during replay leaves no scanner behind), or exit now if it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _send_all(fd: int, parts: list[Buffer]) -> None:
    """One message of the replay scanner (Scan._scan_child) into its pipe."""
    view = memoryview(b"".join(parts))
    while view:
        view = view[os.write(fd, view):]


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


class Scan:
    """One replay of a journal's records area [start, end) from its checkpoint `tail`, by a
    journal of generation `gen`. It owns the head accounting while it runs (`head`, `used`,
    `next_seq`, from the journal's) and `why` the log ended; the journal takes them back when
    the scan is done. `after_fork` runs in a forked scanner before it scans (J6)."""

    def __init__(self, file: BlockFile, start: int, end: int, gen: int, max_payload: int,
                 after_fork: Callable[[], None] | None, *, tail: int, head: int, used: int,
                 next_seq: int) -> None:
        self.file, self.start, self.end, self.gen = file, start, end, gen
        self.max_payload, self.after_fork = max_payload, after_fork
        self.tail, self.head, self.used, self.next_seq = tail, head, used, next_seq
        self.why = ""  # where and why the log ends
        self._resume: tuple[int, int, int] | None = None  # where a budgeted _scan stopped

    def batches(self, checkpoint_gen: int, verify: Verify | None) -> Iterator[list[Record]]:
        """Yield the valid records from the checkpoint on, in lists (see Journal.replay_batches):
        in this process up to FORK_SCAN_AFTER bytes of records, then from a forked child."""
        reader = _WindowReader(self.file, self.start, self.end,
                               min(_REPLAY_WINDOW, _REPLAY_WINDOW_HERE))
        self._resume = None
        try:
            yield from self._scan(reader.read, self.tail, self.next_seq, checkpoint_gen,
                                  verify, FORK_SCAN_AFTER)
        finally:
            reader.close()  # no thread of ours runs at the fork
        if self._resume is not None:  # a long log: a child scans on while we index
            yield from self._scan_forked(*self._resume, verify)

    def _scan(self, read: Callable[[int, int], tuple[memoryview, int]], pos: int, seq: int,
              gen: int, verify: Verify | None,
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
                if crc32c(payload, crc32c(buf[i : i + CRC_AT])) != crc:
                    self._stop(pos, seq, "bad crc (torn or corrupt record)")
                    break
                rec = new(Record, (rseq, kind, vol, offset, length, aux, pos, end, pos + hsize,
                                   rgen))
                if kind == SNAP_CREATE or kind == REMAP:
                    attach(rec, payload)
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

    def _scan_here(self, pos: int, seq: int, gen: int, verify: Verify | None,
                   window: int = _REPLAY_WINDOW_HERE) -> Iterator[list[Record]]:
        reader = _WindowReader(self.file, self.start, self.end,
                               min(_REPLAY_WINDOW, window))
        try:
            yield from self._scan(reader.read, pos, seq, gen, verify)
        finally:
            reader.close()

    def _scan_forked(self, pos: int, seq: int, gen: int,
                     verify: Verify | None) -> Iterator[list[Record]]:
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
                    self.why = src.read(xlen).decode("utf-8", "replace")
                    ended = True
                    break
                size = count * esize + nextra * _EXTRA.size + xlen
                body = memoryview(src.read(size))
                if len(body) < size:
                    break
                recs = list(map(make, unpack_entries(body[: count * esize])))
                at = count * esize + nextra * _EXTRA.size
                for k, n in _EXTRA.iter_unpack(body[count * esize : at]):
                    attach(recs[k], body[at : at + n])
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
                    verify: Verify | None) -> None:
        """The forked scanner: send the valid records from (pos, seq, gen) on, a batch per
        message, then the end message with why the log ends."""
        for recs in self._scan_here(pos, seq, gen, verify, _REPLAY_WINDOW):
            extras = [(k, payload_of(rec)) for k, rec in enumerate(recs)
                      if rec.kind == SNAP_CREATE or rec.kind == REMAP]
            _send_all(wfd, [
                _MSG.pack(len(recs), len(extras), sum(len(x) for _, x in extras)),
                struct.pack(f"<{len(recs) * len(Record._fields)}Q",
                            *itertools.chain.from_iterable(recs)),
                *(_EXTRA.pack(k, len(x)) for k, x in extras),
                *(x for _, x in extras)])
        why = self.why.encode()
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
        self.why = f"{self.file.path}: log ends at byte {pos}, seq {seq}: {why}"
