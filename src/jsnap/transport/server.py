"""The NBD transport: sockets and threads around the sans-I/O codec (jsnap.nbd) and the engine.

Model
-----
One thread per listener accepts; one thread per client connection runs a batched loop (the
design measured fastest on this machine, see shared/PERFORMANCE-NOTES.md):

    recv_into one preallocated buffer
    -> handle *every* complete request in it (WRITE payloads go straight from that buffer
       into the journal with pwritev; reads are pread into fresh buffers)
    -> if any request in the batch needs durability (sync mode, FUA, FLUSH): one
       fdatasync for the whole batch (group commit across connections, too)
    -> send all replies with sendmsg, replies that needed no sync first.

Each connection also has a sender thread. It sends the replies that wait for an fdatasync
(durable writes, FLUSH) once the journal is synced, and a batch's replies as soon as they
hold 256 KiB of READ data, so that the client thread receives and reads the next requests
while those bytes drain into the socket (1 MiB reads at QD8: ~2.0 -> ~3.0 GB/s measured).
So replies leave out of request order whenever a batch mixes durable and plain requests.
FLUSH on any connection makes every write acknowledged on any connection durable (one shared
journal), which is why CAN_MULTI_CONN is advertised.

Busy polling (`busy_poll`, `serve --busy-poll`): when it is the only connection in
transmission, a client thread that finds no request waiting polls the socket for up to
`busy_poll` seconds before it blocks. On a virtual machine an idle vCPU halts, and waking
it for the next request costs tens of microseconds: a QD1 client waits for that on every
request (measured: 4 KiB writes at QD1 p50 75 -> 46 us, reads 59 -> 34 us). The poll is
adaptive: it stays on while requests come within it, and is turned off by one that does
not, until a blocking wait is short again; so a slow or idle client costs nothing. With
several connections it is off: their threads would take the CPU and GIL from each other
(4 QD1 clients: 13-15k IOPS without it, 10k with it).

Errors: a malformed request gets the spec's errno in its reply; a protocol violation
(RemoteProtocolError) closes that connection only; an unexpected exception fails the one
request with EIO and is logged. Nothing a client sends can stop the server or another client.

TLS (`serve --tls-cert`): the codec runs the STARTTLS negotiation (FORCEDTLS with
`--tls=require`, SELECTIVETLS with `allow`); after the ACK the connection's I/O goes through
a `jsnap.transport.tls.TlsChannel` (memory BIOs, see that module for why), chosen once per batch
loop: plain connections keep the recv_into/sendmsg path above, untouched.

Access control: `jsnap.transport.acl` rules are checked when a client names an export (GO, INFO,
EXPORT_NAME, meta contexts) and filter NBD_OPT_LIST; they are read per option from an
in-memory copy the admin API replaces, so changes apply to the next option, no restart.

Limits (each protects the server from one client):
- `max_connections`: a connection beyond it is closed at once, before the greeting;
  clients still negotiating count too.
- `handshake_timeout`: the whole negotiation (TLS handshake included) must end within it,
  or the connection is closed (a slow-loris client holds a slot that long at most). There
  is no idle timeout in transmission: an NBD client may rightly stay idle for hours.
- `max_inflight_requests` / `max_inflight_bytes` per connection: the batch loop stops
  parsing once that many requests (including replies queued for the sender thread) or
  that many bytes of READ data (in the batch and queued) await sending, sends, and reads
  the socket again only when below. Without it one recv of 256 KiB could hold ~9000
  32 MiB READs (a batch is answered before the next recv, but its replies were built all at
  once), and a client that never reads its replies could make us queue them without bound.
  Nothing is refused: the client just sees TCP backpressure. One request is always
  admitted, whatever its size.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from jsnap import nbd
from jsnap.core import cbt
from jsnap.core.engine import Engine, errno_of
from jsnap.core.stats import ConnStats, observe_batch, op_index
from jsnap.core.volumes import Snapshot, Volume
from jsnap.errors import JsnapError, NoSpace
from jsnap.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
)
from jsnap.transport import acl
from jsnap.transport.tls import TlsChannel
from jsnap.units import MiB

log = logging.getLogger("jsnap.server")

MAX_PAYLOAD = 32 * MiB  # the spec's "should not be treated as denial of service" bound
PREFERRED_BLOCK = 4096
BASE_ALLOCATION = cbt.BASE_ALLOCATION
IOV_MAX = 1024
_POOL_MIN = 64 * 1024  # reads at least this large use the connection's buffer pool
_RECV_SIZE = 256 * 1024
# READ data at which the batch's replies so far go to the sender thread, so this thread
# reads the next requests (and their data) while those bytes drain into the socket.
_HANDOFF = 256 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_INFLIGHT_REQUESTS = 1024
DEFAULT_MAX_INFLIGHT_BYTES = 64 * MiB  # two maximal READs
DEFAULT_BUSY_POLL = 50e-6  # seconds; the gap between a QD1 client's requests is ~20-40 us
MAX_BUSY_POLL = 10e-3


class Export:
    """What one connection serves: a volume read-write, or one of its snapshots read-only."""

    __slots__ = ("name", "vol", "snap", "info")

    def __init__(self, name: str, vol: Volume, snap: Snapshot | None) -> None:
        self.name = name
        self.vol = vol
        self.snap = snap
        ro = snap is not None
        self.info = nbd.ExportInfo(
            name=name,
            size=vol.size,
            description=f"snapshot {snap.name} of volume {vol.name}" if snap else
            f"volume {vol.name}",
            read_only=ro,
            can_flush=True,
            can_fua=True,
            can_trim=not ro,
            can_write_zeroes=not ro,
            can_fast_zero=not ro,  # zeroing is one journal record: always fast
            can_multi_conn=True,
            can_cache=True,
            can_df=True,
            min_block_size=1,
            preferred_block_size=PREFERRED_BLOCK,
            max_block_size=MAX_PAYLOAD,
        )


def resolve_export(engine: Engine, name: str) -> Export | None:
    """`VOLUME` or `VOLUME@SNAPSHOT`; "" means the only volume when there is exactly one."""
    vol_name, at, snap_name = name.partition("@")
    if not vol_name and not at:
        vols = engine.volume_list()
        if len(vols) != 1:
            return None
        vol_name = vols[0].name
    vol = engine.volumes.get(vol_name)
    if vol is None:
        return None
    if not at:
        return Export(name, vol, None)
    snap = vol.snaps.get(snap_name)
    return Export(name, vol, snap) if snap is not None else None


def list_exports(engine: Engine) -> list[tuple[str, str]]:
    out = []
    for v in engine.volume_list():
        out.append((v.name, f"volume {v.name}"))
        for s in engine.snapshot_list(v):
            out.append((f"{v.name}@{s.name}", f"snapshot {s.name} of volume {v.name}"))
    return out


def _is_zero(data: bytearray) -> bool:
    """Whether a read came back all zeroes (sent as a hole: less to send, and truthful).
    Real data usually fails on the first probes, so the full count runs mostly on zeroes."""
    n = len(data)
    if data[0] or data[n - 1] or data[n >> 1]:
        return False
    return data.count(0) == n


def _send_all(sock: socket.socket, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
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


def _op(ev: nbd.Request) -> int:
    """The metrics op slot of a request, its NBD command number (error paths only: the hot
    path names the NBD_CMD_* constant of the request it just handled)."""
    return op_index(getattr(ev, "command", -1))


class ClientConnection(threading.Thread):
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str,
                 address: acl.IPAddress | None) -> None:
        super().__init__(name=f"nbd-client {peer}", daemon=True)
        self.server = server
        self.engine = server.engine
        self.sock = sock
        self.peer = peer
        self.address = address  # None: a unix-socket client
        self.conn = nbd.ServerConnection(
            max_payload=MAX_PAYLOAD,
            tls=server.tls_mode if server.tls_context is not None else "off")
        self.tls: TlsChannel | None = None  # set once the TLS handshake succeeded
        self.common_names: list[str] = []  # of the verified client certificate
        self.export: Export | None = None
        self.requests = 0
        self.stats = ConnStats()  # see jsnap.core.stats: written by this thread and the sender
        self.since = time.time()  # connected at (status)
        self.started = time.monotonic()
        self.polling = False  # busy polling pays off for this client now (_recv_polling)
        self.batch_ops: list[int] = []  # the current batch's, see _serve_requests
        self.batch_dops: list[int] = []
        self.free_buffers: dict[int, list[bytearray]] = {}
        self.send_lock = threading.Lock()  # the reader and the durable sender both send
        # (sync seq or -1, replies, batch start time, their ops for the latency histogram,
        # pooled read buffers to recycle once sent, READ bytes in the replies)
        self.durable_q: queue.SimpleQueue[
            tuple[int, list[Any], float, list[int], list[bytearray], int] | None] = \
            queue.SimpleQueue()
        self.sender_error: BaseException | None = None
        # Requests whose replies wait in the sender's queue, the READ bytes in them, and
        # whether the sender has stopped.
        self.durable_pending = 0
        self.queued_bytes = 0
        self.sender_done = False
        self.durable_cv = threading.Condition(threading.Lock())

    def run(self) -> None:
        reason = "closed"
        try:
            self._run()
        except nbd.RemoteProtocolError as e:
            reason = f"protocol error: {e}"
        except (BrokenPipeError, ConnectionResetError, EOFError):
            reason = "client disconnected"
        except ssl.SSLError as e:
            reason = f"TLS error: {e.reason or e}"
        except TimeoutError:
            reason = ("handshake not finished within "
                      f"{self.server.handshake_timeout:g} s" if self.export is None
                      else "socket timeout")
        except OSError as e:
            reason = f"socket error: {e.strerror or e}"
        except Exception as e:  # a bug: this client goes, the server stays
            log.exception("connection %s failed", self.peer)
            reason = f"internal error: {e}"
        finally:
            try:
                if self.tls is not None:
                    self.tls.close()
                self.sock.close()
            finally:
                self.server.forget(self)
        st = self.stats
        duration = time.monotonic() - self.started
        log.info("client %s export %r: %s after %.1f s, %d requests, %d bytes read, "
                 "%d bytes written", self.peer, self.export.name if self.export else None,
                 reason, duration, self.requests, st.read_bytes, st.written_bytes,
                 extra={"event": "close", "peer": self.peer, "reason": reason,
                        "export": self.export.name if self.export else None,
                        "duration_s": round(duration, 3), "requests": self.requests,
                        "read_bytes": st.read_bytes, "written_bytes": st.written_bytes})

    def _recv(self) -> bool:
        view = self.conn.get_buffer(_RECV_SIZE)
        n = self.sock.recv_into(view)
        self.conn.buffer_updated(n)
        return n > 0

    def _recv_polling(self) -> bool:
        """_recv with busy polling (module doc): poll first while that keeps paying off."""
        view = self.conn.get_buffer(_RECV_SIZE)
        sock, server = self.sock, self.server
        poll = server.busy_poll
        n = -1
        if self.polling and server.transmitting == 1:
            deadline = time.perf_counter() + poll
            while True:
                try:
                    n = sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                    break
                except BlockingIOError:
                    if time.perf_counter() >= deadline:
                        break
        if n < 0:
            t = time.perf_counter()
            n = sock.recv_into(view)
            # A short wait (it includes our own wake-up): a poll would have caught it.
            self.polling = time.perf_counter() - t < 2 * poll
        self.conn.buffer_updated(n)
        return n > 0

    def _recv_tls(self) -> bool:
        assert self.tls is not None
        return self.tls.recv_into(self.conn) > 0

    def _send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        if self.tls is None:
            with self.send_lock:
                _send_all(self.sock, bufs)
        else:
            self.tls.send(bufs)

    def _run(self) -> None:
        conn = self.conn
        timeout = self.server.handshake_timeout
        # One deadline for the whole negotiation, re-armed before every socket call: a
        # per-call timeout would let a client trickle one byte per period forever.
        deadline = None if timeout is None else time.monotonic() + timeout
        self._handshake_io(deadline)
        self.sock.sendall(conn.greeting())
        # Handshake: one option at a time, each answered before the next is read.
        while self.export is None:
            ev = conn.next_event()
            if ev is nbd.NEED_DATA:
                self._handshake_io(deadline)
                if not (self._recv() if self.tls is None else self._recv_tls()):
                    return
                continue
            if isinstance(ev, nbd.ConnectionClosed):
                return
            if isinstance(ev, nbd.OptStartTls):
                self._start_tls(deadline)
                continue
            reply = self._option(ev)
            if reply is None:
                return  # EXPORT_NAME refused: the spec says close
            self._handshake_io(deadline)
            self._send([reply])
            if conn.state is nbd.State.CLOSED:
                return
        if deadline is not None:
            self.sock.settimeout(None)  # transmission: blocking I/O, no deadline
        log.info("client %s opened export %r%s", self.peer, self.export.name,
                 f" over {self.tls.version}" if self.tls is not None else "",
                 extra={"event": "open", "peer": self.peer, "export": self.export.name,
                        "tls": self.tls.version if self.tls is not None else None})
        self._transmission()

    def _handshake_io(self, deadline: float | None) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)

    def _start_tls(self, deadline: float | None) -> None:
        """ACK in the clear, then the TLS handshake; every later byte is encrypted."""
        ctx = self.server.tls_context
        assert ctx is not None  # the codec offers STARTTLS only when TLS is configured
        ack = self.conn.reply_starttls()  # RemoteProtocolError on plaintext behind it
        self._handshake_io(deadline)
        self.sock.sendall(ack)
        tls = TlsChannel(ctx, self.sock)
        tls.handshake(deadline)
        self.tls = tls
        self.common_names = tls.peer_common_names()
        log.debug("client %s: %s established, certificate CN %s", self.peer, tls.version,
                  self.common_names or "none")

    # -- handshake ----------------------------------------------------------------------------

    def _admitted(self, volume: str) -> bool:
        rule = acl.rule_for(self.engine, volume)
        return rule is None or rule.admits(self.address, self.common_names)

    def _refuse(self, ev: nbd.Event, export: Export) -> bytes | None:
        """The reply to an option naming an export this client may not use."""
        log.warning("client %s (certificate CN %s) denied export %r by its access rule",
                    self.peer, self.common_names or "none", export.name)
        if isinstance(ev, nbd.OptExportName):
            return None  # cannot be refused: close
        rule = acl.rule_for(self.engine, export.vol.name)
        if (isinstance(ev, (nbd.OptGo, nbd.OptInfo)) and rule is not None and rule.subjects
                and self.server.tls_context is not None and not self.conn.tls_active):
            # SELECTIVETLS: an export only certificate holders may use is TLS-only, and
            # for those the spec says GO/INFO "MUST reply with NBD_REP_ERR_TLS_REQD".
            return self.conn.reply_option_error(
                NBD_REP_ERR_TLS_REQD, f"export {export.name!r} requires TLS and a client "
                                      f"certificate")
        return self.conn.reply_option_error(NBD_REP_ERR_POLICY,
                                            f"access to export {export.name!r} denied")

    def _option(self, ev: nbd.Event) -> bytes | None:
        conn, engine = self.conn, self.engine
        if isinstance(ev, (nbd.OptGo, nbd.OptInfo, nbd.OptExportName)):
            export = resolve_export(engine, ev.export_name)
            if export is None:
                if isinstance(ev, nbd.OptExportName):
                    return None
                return conn.reply_option_error(
                    NBD_REP_ERR_UNKNOWN, f"no export named {ev.export_name!r}")
            if not self._admitted(export.vol.name):
                return self._refuse(ev, export)
            reply = conn.reply_export(export.info)
            if not isinstance(ev, nbd.OptInfo):
                self.export = export
            return reply
        if isinstance(ev, nbd.OptList):
            return conn.reply_list([(name, desc) for name, desc in list_exports(engine)
                                    if self._admitted(name.partition("@")[0])])
        if isinstance(ev, (nbd.OptStructuredReply, nbd.OptAbort)):
            return conn.reply_ack()
        if isinstance(ev, (nbd.OptListMetaContext, nbd.OptSetMetaContext)):
            export = resolve_export(engine, ev.export_name)
            if export is None:
                return conn.reply_option_error(
                    NBD_REP_ERR_UNKNOWN, f"no export named {ev.export_name!r}")
            if not self._admitted(export.vol.name):
                return self._refuse(ev, export)
            return conn.reply_meta_contexts(cbt.select_contexts(
                ev.queries, isinstance(ev, nbd.OptListMetaContext),
                cbt.bitmap_names(engine, export.vol, export.snap)))
        if isinstance(ev, nbd.BadOption):
            return conn.reply_option_error(ev.error, ev.message)
        raise AssertionError(f"unexpected handshake event {ev!r}")

    # -- transmission -------------------------------------------------------------------------

    def _transmission(self) -> None:
        sender = threading.Thread(target=self._send_durable, daemon=True,
                                  name=f"nbd-durable {self.peer}")
        sender.start()
        with self.server.lock:
            self.server.transmitting += 1
        try:
            self._serve_requests()
        finally:
            with self.server.lock:
                self.server.transmitting -= 1
            self.durable_q.put(None)  # the sender sends what is queued, then stops
            sender.join()

    def _serve_requests(self) -> None:
        conn, engine, sock = self.conn, self.engine, self.sock
        export = self.export
        assert export is not None
        info, vol, snap = export.info, export.vol, export.snap
        structured = conn.structured_replies
        # BLOCK_STATUS answers per negotiated context: base:allocation, or a dirty bitmap
        # (computed at its first use, see jsnap.core.cbt).
        contexts = dict(conn.meta_contexts)
        bitmaps = {cid: cbt.DirtyBitmap(engine, vol, name[len(cbt.DIRTY_BITMAP):], snap)
                   for cid, name in contexts.items() if name != BASE_ALLOCATION}
        # Chosen once: plain connections keep the direct recv_into/sendmsg calls.
        tls = self.tls
        recv = (self._recv_tls if tls is not None
                else self._recv_polling if self.server.busy_poll > 0 else self._recv)
        send_lock = self.send_lock
        max_requests = self.server.max_inflight_requests
        max_bytes = self.server.max_inflight_bytes
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
            busy = self.durable_pending  # requests parsed and not answered yet
            pending_bytes = 0  # READ data in this batch's replies
            # Consecutive WRITEs are journaled together (one lock hold, one pwritev); any
            # other request first flushes them, so it sees them.
            writes: list[tuple[int, memoryview]] = []
            write_evs: list[nbd.Write] = []
            lent: list[bytearray] = []  # pooled read buffers in this batch's replies
            while True:
                if busy >= max_requests or pending_bytes + self.queued_bytes >= max_bytes:
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
                            data = self._buffer(ev.length)
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
                            self._queue_replies(-1, out, t0, done[:], lent, pending_bytes)
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
                if self.sender_error is not None:
                    raise OSError(errno.EIO, f"journal sync failed: {self.sender_error}")
                self._queue_replies(sync_seq, later, t0, dops, [], 0)
                dops = self.batch_dops = []
            if out:
                if tls is None:
                    with send_lock:
                        _send_all(sock, out)
                else:
                    tls.send(out)
            if done:
                observe_batch(lat, lat_sum, done, time.monotonic() - t0)
                done.clear()
            if rbytes:
                stats.read_bytes += rbytes
            self._recycle(lent)  # sent: the buffers can serve the next batch
            if closed:
                return
            if full:
                self._wait_durable(max_requests, max_bytes)
                continue  # more complete requests may be buffered: no recv yet
            if not recv():
                return  # EOF: every complete request buffered was answered above
            t0 = time.monotonic()

    def _allocation(self, ev: nbd.BlockStatus) -> list[tuple[int, int]]:
        """base:allocation extents of the request's range."""
        assert self.export is not None
        if self.export.snap is not None:
            return [(ev.length, 0)]  # snapshots: all data (always truthful)
        return self.engine.extents(self.export.vol, ev.offset, ev.length)

    def _queue_replies(self, sync_seq: int, replies: list[Any], t0: float, ops: list[int],
                       lent: list[bytearray], nbytes: int) -> None:
        """Hand replies to the sender thread: after an fdatasync up to `sync_seq` (durable
        replies), or at once (-1: large READ replies, sent while this thread goes on)."""
        with self.durable_cv:
            self.durable_pending += len(ops)
            self.queued_bytes += nbytes
        self.durable_q.put((sync_seq, replies, t0, ops, lent, nbytes))

    def _wait_durable(self, max_requests: int, max_bytes: int) -> None:
        """Backpressure: wait until the sender's queue is below both limits."""
        with self.durable_cv:
            while ((self.durable_pending >= max_requests or self.queued_bytes >= max_bytes)
                   and self.sender_error is None and not self.sender_done):
                self.durable_cv.wait()
        if self.sender_error is not None:
            raise OSError(errno.EIO, f"journal sync failed: {self.sender_error}")

    def _send_durable(self) -> None:
        """Sender thread: wait until queued replies are durable (if they must be), send them,
        recycle their read buffers."""
        try:
            self._send_durable_loop()
        finally:
            with self.durable_cv:
                self.sender_done = True
                self.durable_cv.notify_all()

    def _send_durable_loop(self) -> None:
        q, engine = self.durable_q, self.engine
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
                self._send(replies)
                self._recycle(lent)
                now = time.monotonic()
                for t0, ops in timed:
                    if ops:
                        observe_batch(dlat, dlat_sum, ops, now - t0)
            except (JsnapError, OSError) as e:
                log.error("client %s: durable replies failed: %s", self.peer, e)
                self.sender_error = e
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            with self.durable_cv:
                self.durable_pending -= sum(len(ops) for _, ops in timed)
                self.queued_bytes -= nbytes
                self.durable_cv.notify_all()
            if stop:
                return


    def _recycle(self, bufs: list[bytearray]) -> None:
        """Return sent read buffers to the pool (the sender appends, only the reader pops)."""
        for buf in bufs:
            free = self.free_buffers.setdefault(len(buf), [])
            if len(free) < 64:
                free.append(buf)

    def _buffer(self, n: int) -> bytearray:
        """A read buffer of n bytes: reused across batches for large reads, which saves a
        zero-filled allocation per request (it showed on 1 MiB reads)."""
        free = self.free_buffers.get(n)
        return free.pop() if free else bytearray(n)

    def _journal_writes(self, vol: Volume, writes: list[tuple[int, memoryview]],
                        evs: list[nbd.Write], out: list[bytes | bytearray | memoryview],
                        later: list[bytes | bytearray | memoryview], sync_seq: int) -> int:
        """Journal the pending WRITEs; queue their replies (after the sync if they need one)."""
        conn, engine = self.conn, self.engine
        done, dops, stats = self.batch_ops, self.batch_dops, self.stats
        try:
            seq = engine.write_many(vol, writes)
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


class NbdServer:
    """Listens on TCP and/or unix sockets and serves every volume of one engine."""

    def __init__(self, engine: Engine, *, tcp: Sequence[tuple[str, int]] = (),
                 unix: Sequence[str] = (), max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 tls_context: ssl.SSLContext | None = None,
                 tls_mode: Literal["allow", "require"] = "require",
                 handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_inflight_requests: int = DEFAULT_MAX_INFLIGHT_REQUESTS,
                 max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
                 busy_poll: float = DEFAULT_BUSY_POLL) -> None:
        if max_connections < 1 or max_inflight_requests < 1 or max_inflight_bytes < 1:
            raise ValueError("connection and in-flight limits must be positive")
        if not 0 <= busy_poll <= MAX_BUSY_POLL:
            raise ValueError(f"busy poll must be 0 to {MAX_BUSY_POLL * 1e6:.0f} us")
        self.busy_poll = busy_poll
        self.transmitting = 0  # connections past negotiation (busy polling: only if 1)
        self.engine = engine
        self.max_connections = max_connections
        self.tls_context = tls_context
        self.tls_mode = tls_mode  # only with a tls_context; without one: NOTLS
        self.handshake_timeout = handshake_timeout or None  # 0: no limit
        self.max_inflight_requests = max_inflight_requests
        self.max_inflight_bytes = max_inflight_bytes
        acl.rules(engine)  # load the access rules here, not in a connection thread
        self.listeners: list[socket.socket] = []
        self.clients: set[ClientConnection] = set()
        self.lock = threading.Lock()
        self.closed_stats = ConnStats()  # closed connections' counters (jsnap.core.stats)
        self.connections_total = 0
        self.stopping = False
        self.addresses: list[str] = []
        for host, port in tcp:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(128)
            self.listeners.append(s)
            bound = s.getsockname()
            self.addresses.append(f"nbd://{host}:{bound[1]}")
        for path in unix:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(128)
            self.listeners.append(s)
            self.addresses.append(f"nbd+unix:///?socket={path}")
        self.threads = [
            threading.Thread(target=self._accept, args=(s,), name="nbd-accept", daemon=True)
            for s in self.listeners
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _accept(self, lsock: socket.socket) -> None:
        while not self.stopping:
            try:
                sock, addr = lsock.accept()
            except OSError:
                if self.stopping:
                    return
                continue
            address: acl.IPAddress | None = None
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
                address = ipaddress.ip_address(addr[0])
            else:
                peer = "unix"
            with self.lock:
                if self.stopping or len(self.clients) >= self.max_connections:
                    log.warning("refusing client %s: %s", peer,
                                "shutting down" if self.stopping else "too many connections")
                    sock.close()
                    continue
                client = ClientConnection(self, sock, peer, address)
                self.clients.add(client)
                self.connections_total += 1
            client.start()

    def forget(self, client: ClientConnection) -> None:
        with self.lock:
            if client in self.clients:  # its threads are done: fold its counters in
                self.clients.discard(client)
                self.closed_stats.add(client.stats)

    def clients_info(self) -> list[dict[str, Any]]:
        """Connected clients for `status`, oldest first."""
        with self.lock:
            clients = sorted(self.clients, key=lambda c: c.since)
        return [{"peer": c.peer, "export": c.export.name if c.export else None,
                 "since": c.since, "requests": c.requests,
                 "read_bytes": c.stats.read_bytes, "written_bytes": c.stats.written_bytes,
                 "tls": c.tls.version if c.tls is not None else None} for c in clients]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let every client finish the requests it already sent, then return."""
        with self.lock:
            self.stopping = True
            clients = list(self.clients)
        for s in self.listeners:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for c in clients:
            try:
                c.sock.shutdown(socket.SHUT_RD)  # recv returns EOF after buffered requests
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for c in clients:
            c.join(max(0.0, deadline - time.monotonic()))
        for c in clients:
            if c.is_alive():  # e.g. a client that stopped reading its replies
                log.warning("client %s did not finish its requests in %.0f s; closing it",
                            c.peer, timeout)
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.join(1.0)
        for t in self.threads:
            t.join(1.0)
