"""One NBD client connection: its thread, the negotiation, then its dispatcher.

Model
-----
`ClientConnection` is the thread of one accepted socket. It owns the socket, the codec's
`nbd.ServerConnection`, the TLS channel once upgraded and the connection's `ConnStats`. It
runs the negotiation itself, one option at a time, each answered before the next is read;
once an export is open it makes a `Dispatcher` (jsnap.transport.dispatch) for it and hands
it the receive function, and the dispatcher runs the transmission phase in this same thread
(with its reply sender beside it). When the thread ends, for whatever reason, it closes the
socket and calls `host.forget(self)`; every way out is logged once, with why.

It sees the server only as a `ConnectionHost`: the engine, the settings it serves with, and
`transmitting`, the number of connections past negotiation, which it changes under
`host.lock` and reads (unlocked) to decide on busy polling.

TLS (`serve --tls-cert`): the codec runs the STARTTLS negotiation (FORCEDTLS with
`--tls=require`, SELECTIVETLS with `allow`); after the ACK the connection's I/O goes through
a `jsnap.transport.tls.TlsChannel` (memory BIOs, see that module for why), chosen once for
the transmission phase: plain connections keep recv_into/sendmsg, untouched.

Access control: `jsnap.core.access` rules are checked when a client names an export (GO,
INFO, EXPORT_NAME, meta contexts) and filter NBD_OPT_LIST; they are read per option from an
in-memory copy the admin API replaces, so changes apply to the next option, no restart.

`handshake_timeout`: the whole negotiation (TLS handshake included) must end within it, or
the connection is closed (a slow-loris client holds a slot that long at most). There is no
idle timeout in transmission: an NBD client may rightly stay idle for hours.

Busy polling (`busy_poll`, `serve --busy-poll`): when it is the only connection in
transmission, a connection that finds no request waiting polls the socket for up to
`busy_poll` seconds before it blocks. On a virtual machine an idle vCPU halts, and waking
it for the next request costs tens of microseconds: a QD1 client waits for that on every
request (measured: 4 KiB writes at QD1 p50 75 -> 46 us, reads 59 -> 34 us). The poll is
adaptive: it stays on while requests come within it, and is turned off by one that does
not, until a blocking wait is short again; so a slow or idle client costs nothing. With
several connections it is off: their threads would take the CPU and GIL from each other
(4 QD1 clients: 13-15k IOPS without it, 10k with it).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Literal, Protocol

from jsnap import nbd
from jsnap.core import access as acl
from jsnap.core import cbt
from jsnap.core.engine import Engine
from jsnap.core.stats import ConnStats
from jsnap.nbd.constants import NBD_REP_ERR_POLICY, NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_UNKNOWN
from jsnap.transport.dispatch import Dispatcher
from jsnap.transport.exports import (
    MAX_PAYLOAD,
    Export,
    list_exports,
    resolve_export,
    unknown_export,
)
from jsnap.transport.replies import send_all
from jsnap.transport.tls import TlsChannel

log = logging.getLogger("jsnap.server")

_RECV_SIZE = 256 * 1024


class ConnectionHost(Protocol):
    """Everything a connection sees of its server (jsnap.transport.server.NbdServer)."""

    engine: Engine
    tls_context: ssl.SSLContext | None
    tls_mode: Literal["allow", "require"]
    handshake_timeout: float | None
    busy_poll: float
    max_inflight_requests: int
    max_inflight_bytes: int
    lock: threading.Lock
    transmitting: int  # connections past negotiation, changed under `lock`

    def forget(self, client: ClientConnection) -> None: ...


class ClientConnection(threading.Thread):
    def __init__(self, host: ConnectionHost, sock: socket.socket, peer: str,
                 address: acl.IPAddress | None) -> None:
        super().__init__(name=f"nbd-client {peer}", daemon=True)
        self.host = host
        self.engine = host.engine
        self.sock = sock
        self.peer = peer
        self.address = address  # None: a unix-socket client
        self.conn = nbd.ServerConnection(
            max_payload=MAX_PAYLOAD,
            tls=host.tls_mode if host.tls_context is not None else "off")
        self.tls: TlsChannel | None = None  # set once the TLS handshake succeeded
        self.common_names: list[str] = []  # of the verified client certificate
        self.export: Export | None = None
        self.dispatcher: Dispatcher | None = None  # set once an export is open
        self.stats = ConnStats()  # see jsnap.core.stats: written by this thread and the sender
        self.since = time.time()  # connected at (status)
        self.started = time.monotonic()
        self.polling = False  # busy polling pays off for this client now (_recv_polling)

    @property
    def requests(self) -> int:
        """Requests received so far (status, the close log)."""
        d = self.dispatcher
        return d.requests if d is not None else 0

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
                      f"{self.host.handshake_timeout:g} s" if self.export is None
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
                self.engine.release_thread()  # the catalog connection snapshot reads made
                self.host.forget(self)
        st = self.stats
        duration = time.monotonic() - self.started
        requests = self.requests
        log.info("client %s export %r: %s after %.1f s, %d requests, %d bytes read, "
                 "%d bytes written", self.peer, self.export.name if self.export else None,
                 reason, duration, requests, st.read_bytes, st.written_bytes,
                 extra={"event": "close", "peer": self.peer, "reason": reason,
                        "export": self.export.name if self.export else None,
                        "duration_s": round(duration, 3), "requests": requests,
                        "read_bytes": st.read_bytes, "written_bytes": st.written_bytes})

    def _recv(self) -> bool:
        view = self.conn.get_buffer(_RECV_SIZE)
        n = self.sock.recv_into(view)
        self.conn.buffer_updated(n)
        return n > 0

    def _recv_polling(self) -> bool:
        """_recv with busy polling (module doc): poll first while that keeps paying off."""
        view = self.conn.get_buffer(_RECV_SIZE)
        sock, host = self.sock, self.host
        poll = host.busy_poll
        n = -1
        if self.polling and host.transmitting == 1:
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
        # Negotiation only: no other thread sends yet, so no lock.
        if self.tls is None:
            send_all(self.sock, bufs)
        else:
            self.tls.send(bufs)

    def _run(self) -> None:
        conn = self.conn
        timeout = self.host.handshake_timeout
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
        self._transmission(self.export)

    def _handshake_io(self, deadline: float | None) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)

    def _start_tls(self, deadline: float | None) -> None:
        """ACK in the clear, then the TLS handshake; every later byte is encrypted."""
        ctx = self.host.tls_context
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
        rule = self.engine.access.rule_for(volume)
        return rule is None or rule.admits(self.address, self.common_names)

    def _refuse(self, ev: nbd.Event, export: Export) -> bytes | None:
        """The reply to an option naming an export this client may not use."""
        log.warning("client %s (certificate CN %s) denied export %r by its access rule",
                    self.peer, self.common_names or "none", export.name)
        if isinstance(ev, nbd.OptExportName):
            return None  # cannot be refused: close
        rule = self.engine.access.rule_for(export.vol.name)
        if (isinstance(ev, (nbd.OptGo, nbd.OptInfo)) and rule is not None and rule.subjects
                and self.host.tls_context is not None and not self.conn.tls_active):
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
                    NBD_REP_ERR_UNKNOWN, unknown_export(engine, ev.export_name))
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
                    NBD_REP_ERR_UNKNOWN, unknown_export(engine, ev.export_name))
            if not self._admitted(export.vol.name):
                return self._refuse(ev, export)
            return conn.reply_meta_contexts(cbt.select_contexts(
                ev.queries, isinstance(ev, nbd.OptListMetaContext),
                cbt.bitmap_names(engine, export.vol, export.snap)))
        if isinstance(ev, nbd.BadOption):
            return conn.reply_option_error(ev.error, ev.message)
        raise AssertionError(f"unexpected handshake event {ev!r}")

    # -- transmission -------------------------------------------------------------------------

    def _transmission(self, export: Export) -> None:
        host = self.host
        d = Dispatcher(self.engine, export, self.conn, self.sock, self.tls, self.stats,
                       self.peer, host.max_inflight_requests, host.max_inflight_bytes)
        self.dispatcher = d
        # Chosen once: plain connections keep the direct recv_into call.
        recv = (self._recv_tls if self.tls is not None
                else self._recv_polling if host.busy_poll > 0 else self._recv)
        d.start()
        with host.lock:
            host.transmitting += 1
        try:
            d.serve(recv)
        finally:
            with host.lock:
                host.transmitting -= 1
            d.close()  # the sender sends what is queued, then stops
