"""Another server's NBD export as a store: production of a volume jsnap sits in front of
(`volume create NAME --nbd URI`: nbdkit, qemu-nbd, another jsnap, a SAN target speaking NBD).

Model
-----
`NbdStore` keeps a small pool of connections (stores/nbd_client.py) to one export and lends
one per call, so reads from many client threads and the destager's writes proceed side by
side. Its caps: no allocate, no resize (the export's size is the server's), no page cache
of ours; `zero_fast` when the export takes NBD_CMD_WRITE_ZEROES.

    reads, writes   NBD_CMD_READ / WRITE, split at the export's maximum block size;
                    a write not aligned to its minimum block size is widened by reading
                    the edge blocks first (only the destager writes production, so no
                    other write races the read-modify-write)
    zeroes, punch   NBD_CMD_WRITE_ZEROES (NO_HOLE for zero_range), written zeroes when
                    the export has no WRITE_ZEROES. Never NBD_CMD_TRIM: a trimmed range is
                    not promised to read back as zeroes.
    sync            NBD_CMD_FLUSH on every connection that wrote since the last sync, or
                    on one when the export says CAN_MULTI_CONN (a flush then covers the
                    writes every connection completed)

Invariants
----------
N1 Everything written before `sync()` returns is durable on the export (the store
   interface's contract, stores/files.py): a flush covers what its connection completed,
   and every connection that completed a write since the last sync is flushed. If one of
   them was lost before its flush, the next sync raises EIO: those writes are in doubt
   and must be redone (the destager redoes its batch from the journal).
N2 A connection that failed (a socket error, a timeout, a protocol error) is closed and
   never lent again, nor are the idle ones (a backend that went away took them too), and
   the call is made once more on a new connection; if that fails too it raises
   StoreUnavailable (EIO) naming the export, and the next call connects anew. An error
   reply is an OSError with its errno, and the connection stays. A request without a
   reply may or may not have been carried out: the destager redoes what it does not know
   finished (DESIGN: idempotent replay).
N3 The export's size, read-only flag and block sizes are read at the first connection
   and checked at each later one: a changed size or a read-only export is an error, never
   a silent shrink. The first connection is made at the first call that needs the export
   (a pool opens while a backend is down: its volume's reads fail, the rest serves).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from jsnap.nbd.constants import NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_SEND_WRITE_ZEROES
from jsnap.stores.files import BlockFile, Buffer, StoreCaps, StoreUnavailable
from jsnap.stores.nbd_client import (
    NbdClient,
    NbdError,
    NbdProtocolError,
    parse_uri,
)

CONNECTIONS = 4  # at most this many connections per export
TIMEOUT = 30.0  # seconds one request may take before its connection counts as failed
URI_SCHEMES = ("nbd://", "nbd+unix://")
T = TypeVar("T")


def is_nbd_uri(path: str) -> bool:
    return path.startswith(URI_SCHEMES)


class NbdStore:
    """A BlockFile on an NBD export; safe to share between threads."""

    def __init__(self, uri: str, connections: int = CONNECTIONS,
                 timeout: float = TIMEOUT) -> None:
        self.path = uri
        self.address, self.export = parse_uri(uri)
        self.timeout = timeout
        self._cv = threading.Condition()
        self._idle: list[NbdClient] = []  # connected, not lent
        self._open = 0  # connections that exist: idle or lent (at most `_max`)
        self._max = connections
        self._dirty: set[NbdClient] = set()  # wrote since the last sync
        self._in_doubt = 0  # dirty connections lost since the last sync (N1)
        self._closed = False
        self._size: int | None = None  # the export's, from its first connection (N3)
        self.min_block = 1
        self._multi = self._zeroes = False

    @property
    def caps(self) -> StoreCaps:
        return StoreCaps(allocate=False, zero_fast=self._zeroes, resize=False,
                         page_cache=False)

    # -- connections (N2, N3) ---------------------------------------------------------------

    def _connect(self) -> NbdClient:
        try:
            c = NbdClient(self.address, self.export, timeout=self.timeout)
        except (OSError, NbdError, NbdProtocolError) as e:
            raise self._eio(f"cannot connect: {e}") from None
        if c.read_only:
            c.close()
            raise OSError(errno.EROFS, f"NBD export {self.path} is read-only")
        if self._size is None:
            self._size, self.min_block = c.size, c.min_block
            self._multi = bool(c.flags & NBD_FLAG_CAN_MULTI_CONN)
            self._zeroes = bool(c.flags & NBD_FLAG_SEND_WRITE_ZEROES)
        elif self._size != c.size:
            c.close()
            raise OSError(errno.EIO, f"NBD export {self.path}: its size changed from "
                          f"{self._size} to {c.size} bytes")
        return c

    def _eio(self, why: str) -> StoreUnavailable:
        return StoreUnavailable(f"NBD export {self.path}: {why}")

    def _borrow(self, want: NbdClient | None = None) -> tuple[NbdClient | None, bool]:
        """(connection, whether it is new): an idle one (`want` itself if given: None once
        it has failed), waiting while all are lent; a new one when fewer than the maximum
        exist."""
        with self._cv:
            while True:
                if self._closed:
                    raise OSError(errno.EBADF, f"NBD export {self.path} is closed")
                if want is not None:
                    if want in self._idle:
                        self._idle.remove(want)
                        return want, False
                    if want.sock.fileno() < 0:
                        return None, False
                elif self._idle:
                    return self._idle.pop(), False
                elif self._open < self._max:
                    self._open += 1
                    break
                self._cv.wait()
        try:
            return self._connect(), True
        except BaseException:
            self._lost(None)
            raise

    def _give_back(self, c: NbdClient) -> None:
        with self._cv:
            self._idle.append(c)
            self._cv.notify_all()

    def _lost(self, c: NbdClient | None) -> None:
        """N2: a failed connection is closed and forgotten, and so are the idle ones: a
        backend that went away took them too (their unflushed writes are in doubt: N1)."""
        with self._cv:
            gone = ([] if c is None else [c]) + self._idle
            self._idle = []
            self._open -= len(gone) if c is not None else len(gone) + 1
            for x in gone:
                if x in self._dirty:
                    self._dirty.discard(x)
                    self._in_doubt += 1
            self._cv.notify_all()
        for x in gone:
            x.sock.close()

    def _on(self, c: NbdClient, fn: Callable[[NbdClient], T], writes: bool) -> T:
        """Run `fn` on the borrowed `c` and give it back (or drop it: N2)."""
        try:
            out = fn(c)
        except NbdError as e:
            self._give_back(c)  # an error reply: the connection is fine
            raise OSError(e.errno, f"NBD export {self.path}: {e}") from None
        except (OSError, NbdProtocolError) as e:
            self._lost(c)
            raise self._eio(str(e) or type(e).__name__) from None
        except BaseException:
            self._lost(c)
            raise
        if writes:
            with self._cv:
                self._dirty.add(c)
        self._give_back(c)
        return out

    def _call(self, fn: Callable[[NbdClient], T], writes: bool = False) -> T:
        """`fn` on a connection; once more on a new one if an idle connection had died
        meanwhile (every call here is idempotent: reads, the same bytes written again,
        zeroes, a flush, whose lost writes N1 reports anyway)."""
        c, fresh = self._borrow()
        assert c is not None
        if fresh:
            return self._on(c, fn, writes)
        try:
            return self._on(c, fn, writes)
        except StoreUnavailable:
            c, _ = self._borrow()  # the idle ones went with it (_lost): a new connection
            assert c is not None
            return self._on(c, fn, writes)

    # -- the store interface ----------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        return self._call(lambda c: c.pread(length, offset))

    def preadinto(self, buf: memoryview, offset: int) -> int:
        data = self.pread(len(buf), offset)
        buf[: len(data)] = data
        return len(data)

    def pwrite(self, data: Buffer, offset: int) -> None:
        view = memoryview(data).cast("B")
        self.size()  # connected once: the block sizes are known
        bs = self.min_block
        start, end = offset, offset + len(view)
        lo, hi = start - start % bs, -(-end // bs) * bs
        if (lo, hi) != (start, end):  # widen to whole blocks: read the edges first
            buf = bytearray(self.pread(hi - lo, lo)) if hi - lo <= 2 * bs else None
            if buf is None:
                buf = bytearray(hi - lo)
                buf[: bs] = self.pread(bs, lo)
                buf[-bs:] = self.pread(bs, hi - bs)
            buf[start - lo : end - lo] = view
            view, offset = memoryview(buf), lo
        self._call(lambda c: c.pwrite(view, offset), writes=True)

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> None:
        self.pwrite(b"".join(bufs), offset)

    def copy_from(self, src: BlockFile, src_offset: int, length: int, offset: int) -> None:
        self.pwrite(src.pread(length, src_offset), offset)

    def zero_range(self, offset: int, length: int) -> None:
        self._zero(offset, length, no_hole=True)

    def zero_allocated(self, offset: int, length: int) -> None:
        self._zero(offset, length, no_hole=True)

    def punch_hole(self, offset: int, length: int) -> None:
        self._zero(offset, length, no_hole=False)

    def _zero(self, offset: int, length: int, no_hole: bool) -> None:
        if length <= 0:
            return
        self.size()
        bs = self.min_block
        if not self._zeroes or offset % bs or length % bs:
            step = 1 << 20
            for pos in range(offset, offset + length, step):
                self.pwrite(bytes(min(step, offset + length - pos)), pos)
            return
        self._call(lambda c: c.zero(length, offset, no_hole=no_hole), writes=True)

    def allocate(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "an NBD export has no space to allocate", self.path)

    def truncate(self, size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "an NBD export cannot be resized", self.path)

    def size(self) -> int:
        if self._size is None:
            c, _ = self._borrow()  # N3: the first connection tells it
            assert c is not None
            self._give_back(c)
        assert self._size is not None
        return self._size

    def sync(self) -> None:
        """N1: flush what every connection completed since the last sync."""
        with self._cv:
            dirty, self._dirty = self._dirty, set()
            lost, self._in_doubt = self._in_doubt, 0
        if lost:
            raise self._eio(f"{lost} connection(s) with unflushed writes were lost: those "
                            "writes are in doubt")
        if not dirty:
            return
        if self._multi:
            self._call(lambda c: c.flush())
            return
        for target in dirty:
            c, _ = self._borrow(target)  # it may be lent to a reader right now: wait for it
            if c is not None:  # else it failed since: the next sync reports it (N1)
                self._on(c, lambda c: c.flush(), writes=False)

    def drop_cache(self, offset: int, length: int) -> bool:
        return False

    def close(self) -> None:
        with self._cv:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cv.notify_all()
        for c in idle:
            c.close()
