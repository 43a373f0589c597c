"""Replies that leave a connection after its batch: the sender thread and the read buffers.

Model
-----
Each connection in transmission has one `ReplySender`, owned by its `Dispatcher`
(jsnap.transport.dispatch) and run in its own thread. The request loop hands it, with `put`:

- durable replies (FUA and sync-mode writes, zeroes and trims, FLUSH), with the journal
  sequence they wait for. The sender takes everything queued meanwhile, waits once for the
  journal to be durable up to the highest sequence (`Engine.wait_durable`: one fdatasync,
  shared with the other connections too), then sends them all;
- a batch's replies once they hold 256 KiB of READ data (sequence -1: sent at once), so the
  loop receives and reads the next requests while those bytes drain into the socket
  (1 MiB reads at QD8: ~2.0 -> ~3.0 GB/s measured).

So replies leave out of request order whenever a batch mixes durable and plain requests;
NBD allows that (every reply names its request). FLUSH on any connection makes every write
acknowledged on any connection durable (one shared journal), which is why CAN_MULTI_CONN is
advertised.

Invariants
----------
1. Both the loop (its batch's plain replies) and the sender write to the socket;
   `send_lock` keeps one sendmsg sequence whole (a TlsChannel orders its records itself).
2. `pending` (requests whose replies are queued) and `queued_bytes` (READ bytes in them)
   change only under `cv`: `put` adds before queueing, the sender subtracts after sending
   and notifies; the loop reads them without the lock (an int read; a stale value only
   moves a backpressure check by one batch) and waits on `cv` in `wait_below`.
3. The first failure to sync or send is kept in `error`, the socket is shut down (the
   loop's next recv sees EOF) and the sender stops, sending nothing more; the loop checks
   `error` before it queues durable replies, and `wait_below` raises it, both as EIO.
4. `done` is set, under `cv`, whenever the thread ends, so `wait_below` never waits on a
   sender that is gone.
5. `ReadBuffers`: only the loop takes a buffer; the loop and the sender give them back once
   sent (list append and pop are atomic under the GIL).
6. Latency: the sender folds what it sent into its own histogram of the connection's
   `ConnStats` (`dlat`), which no other thread writes (jsnap.core.stats).
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from jsnap.core.engine import Engine
from jsnap.core.stats import ConnStats, observe_batch
from jsnap.errors import JsnapError
from jsnap.transport.tls import TlsChannel

log = logging.getLogger("jsnap.server")

IOV_MAX = 1024


def send_all(sock: socket.socket, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
    """sendmsg every buffer, resuming after partial sends, IOV_MAX buffers at a time."""
    pending = [memoryview(b).cast("B") for b in bufs if len(b)]
    while pending:
        batch = pending[:IOV_MAX]
        sent = sock.sendmsg(batch)
        i = 0
        while i < len(batch) and sent >= len(batch[i]):
            sent -= len(batch[i])
            i += 1
        if i < len(batch) and sent:
            batch[i] = batch[i][sent:]
        pending = batch[i:] + pending[IOV_MAX:]


class ReadBuffers:
    """A connection's pool of large read buffers, by size: reused across batches, which
    saves a zero-filled allocation per request (it showed on 1 MiB reads)."""

    __slots__ = ("free",)

    def __init__(self) -> None:
        self.free: dict[int, list[bytearray]] = {}

    def take(self, n: int) -> bytearray:
        """A buffer of n bytes (the request loop only)."""
        free = self.free.get(n)
        return free.pop() if free else bytearray(n)

    def give(self, bufs: list[bytearray]) -> None:
        """Return sent read buffers to the pool (the loop and the sender)."""
        for buf in bufs:
            free = self.free.setdefault(len(buf), [])
            if len(free) < 64:
                free.append(buf)


class ReplySender:
    """The sender thread of one connection, and the queue and counters it shares with the
    request loop (module doc)."""

    def __init__(self, engine: Engine, sock: socket.socket, tls: TlsChannel | None,
                 stats: ConnStats, buffers: ReadBuffers, peer: str) -> None:
        self.engine = engine
        self.sock = sock
        self.tls = tls
        self.stats = stats
        self.buffers = buffers
        self.peer = peer
        self.send_lock = threading.Lock()  # the loop and this thread both send
        # (sync seq or -1, replies, batch start time, their ops for the latency histogram,
        # pooled read buffers to recycle once sent, READ bytes in the replies)
        self.q: queue.SimpleQueue[
            tuple[int, list[Any], float, list[int], list[bytearray], int] | None] = \
            queue.SimpleQueue()
        self.error: BaseException | None = None
        # Requests whose replies wait in the queue, the READ bytes in them, and whether
        # this thread has stopped.
        self.pending = 0
        self.queued_bytes = 0
        self.done = False
        self.cv = threading.Condition(threading.Lock())
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"nbd-durable {peer}")

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Send what is queued, then stop (the loop calls this when it ends)."""
        self.q.put(None)
        self.thread.join()

    def put(self, sync_seq: int, replies: list[Any], t0: float, ops: list[int],
            lent: list[bytearray], nbytes: int) -> None:
        """Send replies after an fdatasync up to `sync_seq` (durable replies), or at once
        (-1: large READ replies, sent while the loop goes on)."""
        with self.cv:
            self.pending += len(ops)
            self.queued_bytes += nbytes
        self.q.put((sync_seq, replies, t0, ops, lent, nbytes))

    def wait_below(self, max_requests: int, max_bytes: int) -> None:
        """Backpressure: wait until the queue is below both limits."""
        with self.cv:
            while ((self.pending >= max_requests or self.queued_bytes >= max_bytes)
                   and self.error is None and not self.done):
                self.cv.wait()
        if self.error is not None:
            raise OSError(errno.EIO, f"journal sync failed: {self.error}")

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        if self.tls is None:
            with self.send_lock:
                send_all(self.sock, bufs)
        else:
            self.tls.send(bufs)

    def _run(self) -> None:
        """Wait until queued replies are durable (if they must be), send them, recycle
        their read buffers."""
        try:
            self._loop()
        finally:
            with self.cv:
                self.done = True
                self.cv.notify_all()

    def _loop(self) -> None:
        q, engine, give = self.q, self.engine, self.buffers.give
        dlat, dlat_sum = self.stats.dlat, self.stats.dlat_sum  # this thread's own histogram
        while True:
            item = q.get()
            if item is None:
                return
            seq, replies, t0, ops, lent, nbytes = item
            timed = [(t0, ops)]  # batch start and ops, for the latency histogram
            stop = False
            while not q.empty():  # take everything queued meanwhile: one sync for all
                more = q.get()
                if more is None:
                    stop = True
                    break
                seq = max(seq, more[0])
                replies = replies + more[1]
                timed.append((more[2], more[3]))
                lent = lent + more[4]
                nbytes += more[5]
            try:
                if seq >= 0:
                    engine.wait_durable(seq, fua=True)
                self.send(replies)
                give(lent)
                now = time.monotonic()
                for t0, ops in timed:
                    if ops:
                        observe_batch(dlat, dlat_sum, ops, now - t0)
            except (JsnapError, OSError) as e:
                log.error("client %s: durable replies failed: %s", self.peer, e)
                self.error = e
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            with self.cv:
                self.pending -= sum(len(ops) for _, ops in timed)
                self.queued_bytes -= nbytes
                self.cv.notify_all()
            if stop:
                return
