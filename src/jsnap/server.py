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

So replies leave out of request order whenever a batch mixes durable and plain requests.
FLUSH on any connection makes every write acknowledged on any connection durable (one shared
journal), which is why CAN_MULTI_CONN is advertised.

Errors: a malformed request gets the spec's errno in its reply; a protocol violation
(RemoteProtocolError) closes that connection only; an unexpected exception fails the one
request with EIO and is logged. Nothing a client sends can stop the server or another client.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from jsnap import nbd
from jsnap.engine import Engine, Snapshot, Volume, errno_of
from jsnap.errors import JsnapError
from jsnap.nbd.constants import NBD_REP_ERR_UNKNOWN
from jsnap.units import MiB

log = logging.getLogger("jsnap.server")

MAX_PAYLOAD = 32 * MiB  # the spec's "should not be treated as denial of service" bound
PREFERRED_BLOCK = 4096
BASE_ALLOCATION = "base:allocation"
IOV_MAX = 1024
_POOL_MIN = 64 * 1024  # reads at least this large use the connection's buffer pool
_RECV_SIZE = 256 * 1024


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


class ClientConnection(threading.Thread):
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        super().__init__(name=f"nbd-client {peer}", daemon=True)
        self.server = server
        self.engine = server.engine
        self.sock = sock
        self.peer = peer
        self.conn = nbd.ServerConnection(max_payload=MAX_PAYLOAD)
        self.export: Export | None = None
        self.requests = 0
        self.free_buffers: dict[int, list[bytearray]] = {}
        self.send_lock = threading.Lock()  # the reader and the durable sender both send
        self.durable_q: queue.SimpleQueue[tuple[int, list[Any]] | None] = queue.SimpleQueue()
        self.sender_error: BaseException | None = None

    def run(self) -> None:
        reason = "closed"
        try:
            self._run()
        except nbd.RemoteProtocolError as e:
            reason = f"protocol error: {e}"
        except (BrokenPipeError, ConnectionResetError):
            reason = "client disconnected"
        except OSError as e:
            reason = f"socket error: {e.strerror or e}"
        except Exception as e:  # a bug: this client goes, the server stays
            log.exception("connection %s failed", self.peer)
            reason = f"internal error: {e}"
        finally:
            try:
                self.sock.close()
            finally:
                self.server.forget(self)
        log.info("client %s export %r: %s after %d requests", self.peer,
                 self.export.name if self.export else None, reason, self.requests)

    def _recv(self) -> bool:
        view = self.conn.get_buffer(_RECV_SIZE)
        n = self.sock.recv_into(view)
        self.conn.buffer_updated(n)
        return n > 0

    def _run(self) -> None:
        sock, conn = self.sock, self.conn
        sock.sendall(conn.greeting())
        # Handshake: one option at a time, each answered before the next is read.
        while self.export is None:
            ev = conn.next_event()
            if ev is nbd.NEED_DATA:
                if not self._recv():
                    return
                continue
            if isinstance(ev, nbd.ConnectionClosed):
                return
            reply = self._option(ev)
            if reply is None:
                return  # EXPORT_NAME of an unknown export: the spec says close
            sock.sendall(reply)
            if conn.state is nbd.State.CLOSED:
                return
        log.info("client %s opened export %r", self.peer, self.export.name)
        self._transmission()

    # -- handshake ----------------------------------------------------------------------------

    def _option(self, ev: nbd.Event) -> bytes | None:
        conn, engine = self.conn, self.engine
        if isinstance(ev, (nbd.OptGo, nbd.OptInfo, nbd.OptExportName)):
            export = resolve_export(engine, ev.export_name)
            if export is None:
                if isinstance(ev, nbd.OptExportName):
                    return None
                return conn.reply_option_error(
                    NBD_REP_ERR_UNKNOWN, f"no export named {ev.export_name!r}")
            reply = conn.reply_export(export.info)
            if not isinstance(ev, nbd.OptInfo):
                self.export = export
            return reply
        if isinstance(ev, nbd.OptList):
            return conn.reply_list(list_exports(engine))
        if isinstance(ev, (nbd.OptStructuredReply, nbd.OptAbort)):
            return conn.reply_ack()
        if isinstance(ev, (nbd.OptListMetaContext, nbd.OptSetMetaContext)):
            if resolve_export(engine, ev.export_name) is None:
                return conn.reply_option_error(
                    NBD_REP_ERR_UNKNOWN, f"no export named {ev.export_name!r}")
            return conn.reply_meta_contexts(self._contexts(ev.queries, ev))
        if isinstance(ev, nbd.BadOption):
            return conn.reply_option_error(ev.error, ev.message)
        raise AssertionError(f"unexpected handshake event {ev!r}")

    @staticmethod
    def _contexts(queries: Sequence[str], ev: nbd.Event) -> list[str]:
        if not queries:  # LIST with no query: everything we offer
            return [BASE_ALLOCATION] if isinstance(ev, nbd.OptListMetaContext) else []
        return [BASE_ALLOCATION] if any(q in ("base:", BASE_ALLOCATION) for q in queries) \
            else []

    # -- transmission -------------------------------------------------------------------------

    def _transmission(self) -> None:
        sender = threading.Thread(target=self._send_durable, daemon=True,
                                  name=f"nbd-durable {self.peer}")
        sender.start()
        try:
            self._serve_requests()
        finally:
            self.durable_q.put(None)  # the sender sends what is queued, then stops
            sender.join()

    def _serve_requests(self) -> None:
        conn, engine, sock = self.conn, self.engine, self.sock
        export = self.export
        assert export is not None
        info, vol, snap = export.info, export.vol, export.snap
        structured = conn.structured_replies
        contexts = dict(conn.meta_contexts)
        while True:
            out: list[bytes | bytearray | memoryview] = []
            later: list[bytes | bytearray | memoryview] = []  # replies waiting for fdatasync
            sync_seq = -1
            closed = False
            # Consecutive WRITEs are journaled together (one lock hold, one pwritev); any
            # other request first flushes them, so it sees them.
            writes: list[tuple[int, memoryview]] = []
            write_evs: list[nbd.Write] = []
            lent: list[bytearray] = []  # pooled read buffers in this batch's replies
            while True:
                ev = conn.next_event()
                if ev is nbd.NEED_DATA:
                    break
                if isinstance(ev, nbd.ConnectionClosed):
                    closed = True
                    break
                self.requests += 1
                assert isinstance(ev, nbd.Request), ev  # the codec's transmission events
                err = nbd.validate_request(ev, info)
                if err is not None:
                    out.append(conn.reply_error(ev, err))
                    continue
                if type(ev) is nbd.Write:
                    writes.append((ev.offset, ev.payload))
                    write_evs.append(ev)
                    continue
                if writes:
                    sync_seq = self._journal_writes(vol, writes, write_evs, out, later, sync_seq)
                try:
                    if isinstance(ev, nbd.Read):
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
                    elif isinstance(ev, (nbd.WriteZeroes, nbd.Trim)):
                        if isinstance(ev, nbd.Trim):
                            seq = engine.trim(vol, ev.offset, ev.length, wait=False)
                        else:
                            seq = engine.write_zeroes(vol, ev.offset, ev.length, wait=False,
                                                      no_hole=ev.no_hole)
                        if ev.fua or engine.sync_mode:
                            sync_seq = max(sync_seq, seq)
                            later.append(conn.reply_ok(ev))
                        else:
                            out.append(conn.reply_ok(ev))
                    elif isinstance(ev, nbd.Flush):
                        sync_seq = max(sync_seq, engine.journal.written_seq)
                        later.append(conn.reply_ok(ev))
                    elif isinstance(ev, nbd.Cache):
                        out.append(conn.reply_ok(ev))
                    elif isinstance(ev, nbd.BlockStatus):
                        if snap is None:
                            ext = engine.extents(vol, ev.offset, ev.length)
                        else:
                            ext = [(ev.length, 0)]  # snapshots: all data (always truthful)
                        out.append(conn.reply_block_status(ev, {cid: ext for cid in contexts}))
                    else:
                        out.append(conn.reply_error(ev, errno.EINVAL))
                except JsnapError as e:
                    out.append(conn.reply_error(ev, e.errno, str(e)))
                except OSError as e:
                    log.error("client %s: %s failed: %s", self.peer, type(ev).__name__, e)
                    out.append(conn.reply_error(ev, errno_of(e), str(e)))
            if writes:
                sync_seq = self._journal_writes(vol, writes, write_evs, out, later, sync_seq)
            if later:
                # The durable replies go to the sender thread, which shares one fdatasync
                # among every batch queued meanwhile; this thread goes on receiving.
                if self.sender_error is not None:
                    raise OSError(errno.EIO, f"journal sync failed: {self.sender_error}")
                self.durable_q.put((sync_seq, later))
            if out:
                with self.send_lock:
                    _send_all(sock, out)
            for buf in lent:  # sent: the buffers can serve the next batch
                free = self.free_buffers.setdefault(len(buf), [])
                if len(free) < 64:
                    free.append(buf)
            if closed:
                return
            if not self._recv():
                return  # EOF: every complete request buffered was answered above

    def _send_durable(self) -> None:
        """Sender thread: wait until queued replies are durable, then send them."""
        q, engine = self.durable_q, self.engine
        while True:
            item = q.get()
            if item is None:
                return
            seq, replies = item
            stop = False
            while not q.empty():  # take everything queued meanwhile: one sync for all
                more = q.get()
                if more is None:
                    stop = True
                    break
                seq = max(seq, more[0])
                replies = replies + more[1]
            try:
                engine.wait_durable(seq, fua=True)
                with self.send_lock:
                    _send_all(self.sock, replies)
            except (JsnapError, OSError) as e:
                log.error("client %s: durable replies failed: %s", self.peer, e)
                self.sender_error = e
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if stop:
                return


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
        try:
            seq = engine.write_many(vol, writes)
        except (JsnapError, OSError) as e:
            for ev in evs:
                out.append(conn.reply_error(ev, errno_of(e), str(e)))
        else:
            durable = engine.sync_mode
            for ev in evs:
                if durable or ev.fua:
                    later.append(conn.reply_ok(ev))
                    sync_seq = max(sync_seq, seq)
                else:
                    out.append(conn.reply_ok(ev))
        writes.clear()
        evs.clear()
        return sync_seq


class NbdServer:
    """Listens on TCP and/or unix sockets and serves every volume of one engine."""

    def __init__(self, engine: Engine, *, tcp: Sequence[tuple[str, int]] = (),
                 unix: Sequence[str] = (), max_connections: int = 1024) -> None:
        self.engine = engine
        self.max_connections = max_connections
        self.listeners: list[socket.socket] = []
        self.clients: set[ClientConnection] = set()
        self.lock = threading.Lock()
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
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = "unix"
            with self.lock:
                if self.stopping or len(self.clients) >= self.max_connections:
                    log.warning("refusing client %s: %s", peer,
                                "shutting down" if self.stopping else "too many connections")
                    sock.close()
                    continue
                client = ClientConnection(self, sock, peer)
                self.clients.add(client)
            client.start()

    def forget(self, client: ClientConnection) -> None:
        with self.lock:
            self.clients.discard(client)

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
