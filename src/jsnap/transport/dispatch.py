"""The transmission phase of one NBD connection: requests in, engine calls, replies out.

Model
-----
A `Dispatcher` is made by its connection (jsnap.transport.connection) once an export is
open, and runs in the connection's thread: `start()` starts its reply sender
(jsnap.transport.replies), `serve(recv)` runs the batched loop until the client goes, and
`close()` lets the sender send what is queued and stop. The loop (the design measured
fastest on this machine, see shared/PERFORMANCE-NOTES.md):

    recv_into one preallocated buffer (`recv`, the connection's: plain, busy-polling or TLS)
    -> handle *every* complete request in it (WRITE payloads go straight from that buffer
       into the journal with pwritev; reads are pread into fresh or pooled buffers)
    -> replies that need durability (sync mode, FUA, FLUSH) go to the sender, which shares
       one fdatasync among every batch queued meanwhile (group commit across connections)
    -> send the other replies with sendmsg; READ replies go to the sender early, once a
       batch holds 256 KiB of them.

This loop is the per-request path (a Python connection tops out near 30k requests/s): what
it uses is hoisted into locals before the loop, and per request it makes no call it can
avoid.

Errors: a malformed request gets the spec's errno in its reply; a protocol violation
(RemoteProtocolError) propagates and closes this connection only; an engine error fails the
one request with its errno (OSError: logged). Nothing a client sends can stop the server or
another client.

Limits (`max_inflight_requests` / `max_inflight_bytes`, per connection): the loop stops
parsing once that many requests (including replies queued for the sender) or that many
bytes of READ data (in the batch and queued) await sending, sends, and reads the socket
again only when below. Without it one recv of 256 KiB could hold ~9000 32 MiB READs (a batch
is answered before the next recv, but its replies were built all at once), and a client that
never reads its replies could make us queue them without bound. Nothing is refused: the
client just sees TCP backpressure. One request is always admitted, whatever its size.

Ownership: the dispatcher's state (request count, per-batch op lists) is written by the
connection's thread only; the `ConnStats` it is given is shared with the sender as
jsnap.core.stats says. The codec, socket and TLS channel stay the connection's.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable

from jsnap import nbd
from jsnap.core import cbt
from jsnap.core.engine import Engine, errno_of
from jsnap.core.stats import ConnStats, observe_batch, op_index
from jsnap.core.volumes import Volume
from jsnap.errors import JsnapError, NoSpace
from jsnap.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
)
from jsnap.transport.exports import Export
from jsnap.transport.replies import ReadBuffers, ReplySender, send_all
from jsnap.transport.tls import TlsChannel

log = logging.getLogger("jsnap.server")

BASE_ALLOCATION = cbt.BASE_ALLOCATION
_POOL_MIN = 64 * 1024  # reads at least this large use the connection's buffer pool
# READ data at which the batch's replies so far go to the sender thread, so this thread
# reads the next requests (and their data) while those bytes drain into the socket.
_HANDOFF = 256 * 1024


def _is_zero(data: bytearray) -> bool:
    """Whether a read came back all zeroes (sent as a hole: less to send, and truthful).
    Real data usually fails on the first probes, so the full count runs mostly on zeroes."""
    n = len(data)
    if data[0] or data[n - 1] or data[n >> 1]:
        return False
    return data.count(0) == n


def _op(ev: nbd.Request) -> int:
    """The metrics op slot of a request, its NBD command number (error paths only: the hot
    path names the NBD_CMD_* constant of the request it just handled)."""
    return op_index(getattr(ev, "command", -1))


class Dispatcher:
    """Serves the requests of one connection on one export (module doc)."""

    def __init__(self, engine: Engine, export: Export, conn: nbd.ServerConnection,
                 sock: socket.socket, tls: TlsChannel | None, stats: ConnStats, peer: str,
                 max_requests: int, max_bytes: int) -> None:
        self.engine = engine
        self.export = export
        self.conn = conn
        self.sock = sock
        self.tls = tls
        self.stats = stats
        self.peer = peer
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.batch_ops: list[int] = []  # the current batch's, see serve
        self.batch_dops: list[int] = []
        self.buffers = ReadBuffers()
        self.replies = ReplySender(engine, sock, tls, stats, self.buffers, peer)

    def start(self) -> None:
        self.replies.start()

    def close(self) -> None:
        self.replies.close()

    def serve(self, recv: Callable[[], bool]) -> None:
        """The batch loop, until the client closes (`recv` False: EOF) or disconnects.
        `recv` reads into the codec's buffer."""
        conn, engine, sock = self.conn, self.engine, self.sock
        export = self.export
        info, vol, snap = export.info, export.vol, export.snap
        structured = conn.structured_replies
        # BLOCK_STATUS answers per negotiated context: base:allocation, or a dirty bitmap
        # (computed at its first use, see jsnap.core.cbt).
        contexts = dict(conn.meta_contexts)
        bitmaps = {cid: cbt.DirtyBitmap(engine, vol, name[len(cbt.DIRTY_BITMAP):], snap)
                   for cid, name in contexts.items() if name != BASE_ALLOCATION}
        # Chosen once: plain connections keep the direct sendmsg call.
        tls = self.tls
        replies = self.replies
        send_lock, put_replies = replies.send_lock, replies.put
        take_buffer, recycle = self.buffers.take, self.buffers.give
        max_requests, max_bytes = self.max_requests, self.max_bytes
        stats = self.stats
        errors, lat, lat_sum = stats.errors, stats.lat, stats.lat_sum
        # Metrics (jsnap.core.stats): the op (NBD command number) of each request answered in
        # `out` (done) and in `later` (dops), folded into the latency histogram once sent.
        # Reused across batches (dops is handed to the sender, then replaced): at QD1 a
        # batch is one request, so per-batch allocations are per-request costs.
        done, dops = self.batch_ops, self.batch_dops  # _journal_writes appends to them too
        t0 = time.monotonic()  # when the buffered requests came (reset after each recv)
        while True:
            rbytes = 0
            out: list[bytes | bytearray | memoryview] = []
            later: list[bytes | bytearray | memoryview] = []  # replies waiting for fdatasync
            sync_seq = -1
            closed = False
            full = False  # stopped at a limit: send, then go on without receiving
            busy = replies.pending  # requests parsed and not answered yet
            pending_bytes = 0  # READ data in this batch's replies
            # Consecutive WRITEs are journaled together (one lock hold, one pwritev); any
            # other request first flushes them, so it sees them.
            writes: list[tuple[int, memoryview]] = []
            write_evs: list[nbd.Write] = []
            lent: list[bytearray] = []  # pooled read buffers in this batch's replies
            while True:
                if busy >= max_requests or pending_bytes + replies.queued_bytes >= max_bytes:
                    full = True
                    break
                ev = conn.next_event()
                if ev is nbd.NEED_DATA:
                    break
                if isinstance(ev, nbd.ConnectionClosed):
                    closed = True
                    break
                self.requests += 1
                busy += 1
                assert isinstance(ev, nbd.Request), ev  # the codec's transmission events
                err = nbd.validate_request(ev, info)
                if err is not None:
                    out.append(conn.reply_error(ev, err))
                    op = _op(ev)
                    errors[op] += 1
                    done.append(op)
                    continue
                if type(ev) is nbd.Write:
                    writes.append((ev.offset, ev.payload))
                    write_evs.append(ev)
                    continue
                if writes:
                    sync_seq = self._journal_writes(vol, writes, write_evs, out, later, sync_seq)
                try:
                    if isinstance(ev, nbd.Read):
                        pending_bytes += ev.length
                        if snap is None and ev.length >= _POOL_MIN:
                            data = take_buffer(ev.length)
                            lent.append(data)
                            engine.readinto(vol, ev.offset, memoryview(data))
                        elif snap is None:
                            data = engine.read(vol, ev.offset, ev.length)
                        else:
                            data = engine.read_snapshot(snap, ev.offset, ev.length)
                        n = ev.length
                        if not n:
                            out.extend(conn.reply_read(ev, []))
                        elif structured and _is_zero(data):
                            out.extend(conn.reply_read(ev, [(ev.offset, n, None)]))
                        else:
                            out.extend(conn.reply_read(ev, [(ev.offset, n, data)]))
                        rbytes += n
                        done.append(NBD_CMD_READ)
                        if pending_bytes >= _HANDOFF:
                            put_replies(-1, out, t0, done[:], lent, pending_bytes)
                            done.clear()
                            out, lent, pending_bytes = [], [], 0
                    elif isinstance(ev, (nbd.WriteZeroes, nbd.Trim)):
                        if isinstance(ev, nbd.Trim):
                            seq = engine.trim(vol, ev.offset, ev.length, wait=False)
                            op = NBD_CMD_TRIM
                        else:
                            seq = engine.write_zeroes(vol, ev.offset, ev.length, wait=False,
                                                      no_hole=ev.no_hole)
                            op = NBD_CMD_WRITE_ZEROES
                        if ev.fua or engine.sync_mode:
                            sync_seq = max(sync_seq, seq)
                            later.append(conn.reply_ok(ev))
                            dops.append(op)
                        else:
                            out.append(conn.reply_ok(ev))
                            done.append(op)
                    elif isinstance(ev, nbd.Flush):
                        sync_seq = max(sync_seq, engine.journal.written_seq)
                        later.append(conn.reply_ok(ev))
                        dops.append(NBD_CMD_FLUSH)
                    elif isinstance(ev, nbd.Cache):
                        out.append(conn.reply_ok(ev))
                        done.append(NBD_CMD_CACHE)
                    elif isinstance(ev, nbd.BlockStatus):
                        out.append(conn.reply_block_status(ev, {
                            cid: bitmaps[cid].extents(ev.offset, ev.length) if cid in bitmaps
                            else self._allocation(ev) for cid in contexts}))
                        done.append(NBD_CMD_BLOCK_STATUS)
                    else:
                        out.append(conn.reply_error(ev, errno.EINVAL))
                        errors[_op(ev)] += 1
                        done.append(_op(ev))
                except JsnapError as e:
                    out.append(conn.reply_error(ev, e.errno, str(e)))
                    errors[_op(ev)] += 1
                    done.append(_op(ev))
                except OSError as e:
                    log.error("client %s: %s failed: %s", self.peer, type(ev).__name__, e)
                    out.append(conn.reply_error(ev, errno_of(e), str(e)))
                    errors[_op(ev)] += 1
                    done.append(_op(ev))
            if writes:
                sync_seq = self._journal_writes(vol, writes, write_evs, out, later, sync_seq)
            if later:
                # The durable replies go to the sender thread, which shares one fdatasync
                # among every batch queued meanwhile; this thread goes on receiving.
                if replies.error is not None:
                    raise OSError(errno.EIO, f"journal sync failed: {replies.error}")
                put_replies(sync_seq, later, t0, dops, [], 0)
                dops = self.batch_dops = []
            if out:
                if tls is None:
                    with send_lock:
                        send_all(sock, out)
                else:
                    tls.send(out)
            if done:
                observe_batch(lat, lat_sum, done, time.monotonic() - t0)
                done.clear()
            if rbytes:
                stats.read_bytes += rbytes
            recycle(lent)  # sent: the buffers can serve the next batch
            if closed:
                return
            if full:
                replies.wait_below(max_requests, max_bytes)
                continue  # more complete requests may be buffered: no recv yet
            if not recv():
                return  # EOF: every complete request buffered was answered above
            t0 = time.monotonic()

    def _allocation(self, ev: nbd.BlockStatus) -> list[tuple[int, int]]:
        """base:allocation extents of the request's range."""
        if self.export.snap is not None:
            return self.engine.snapshot_extents(self.export.snap, ev.offset, ev.length)
        return self.engine.extents(self.export.vol, ev.offset, ev.length)

    def _journal_writes(self, vol: Volume, writes: list[tuple[int, memoryview]],
                        evs: list[nbd.Write], out: list[bytes | bytearray | memoryview],
                        later: list[bytes | bytearray | memoryview], sync_seq: int) -> int:
        """Journal the pending WRITEs; queue their replies (after the sync if they need one)."""
        conn, engine = self.conn, self.engine
        done, dops, stats = self.batch_ops, self.batch_dops, self.stats
        try:
            seq = engine.writes.write_many(vol, writes)
        except NoSpace:
            if len(evs) == 1:
                out.append(conn.reply_error(evs[0], errno.ENOSPC, "pool is full"))
                stats.errors[NBD_CMD_WRITE] += 1
                done.append(NBD_CMD_WRITE)
            else:  # a full pool may still place some of them: each gets its own answer
                for w, ev in zip(writes, evs, strict=True):
                    sync_seq = self._journal_writes(vol, [w], [ev], out, later, sync_seq)
        except (JsnapError, OSError) as e:
            for ev in evs:
                out.append(conn.reply_error(ev, errno_of(e), str(e)))
            stats.errors[NBD_CMD_WRITE] += len(evs)
            done.extend([NBD_CMD_WRITE] * len(evs))
        else:
            durable = engine.sync_mode
            nbytes = 0
            for ev in evs:
                nbytes += ev.length
                if durable or ev.fua:
                    later.append(conn.reply_ok(ev))
                    sync_seq = max(sync_seq, seq)
                    dops.append(NBD_CMD_WRITE)
                else:
                    out.append(conn.reply_ok(ev))
                    done.append(NBD_CMD_WRITE)
            stats.written_bytes += nbytes
        writes.clear()
        evs.clear()
        return sync_seq
