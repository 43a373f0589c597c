"""The NBD server: listeners, the accept threads, and the set of connected clients.

Model
-----
Threads: one accept thread per listener (TCP or unix socket); per accepted client one
`ClientConnection` thread (jsnap.transport.connection: negotiation, TLS, access rules, busy
polling), which runs its `Dispatcher` (jsnap.transport.dispatch: the batched request loop)
once an export is open, beside one reply sender thread (jsnap.transport.replies: durable
and large READ replies). Exports are names resolved per option (jsnap.transport.exports).

Errors: a protocol violation or a socket error closes that connection only; a bug in one
connection is logged and closes it. Nothing a client sends can stop the server or another
client.

Ownership: `NbdServer` owns the listeners and the set of connections; `lock` guards
`clients`, `closed_stats`, `connections_total`, `stopping` and `transmitting`. A connection
removes itself (`forget`) when its threads are done, and its counters are folded into
`closed_stats` then, so metrics (jsnap.admin.metrics) lose nothing.

Limits (each protects the server from one client):
- `max_connections`: a connection beyond it is closed at once, before the greeting;
  clients still negotiating count too.
- `handshake_timeout`: the whole negotiation must end within it (jsnap.transport.connection).
- `max_inflight_requests` / `max_inflight_bytes` per connection: how much a connection
  parses before it waits for its replies to drain (jsnap.transport.dispatch).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

from jsnap.core import access as acl
from jsnap.core.engine import Engine
from jsnap.core.stats import ConnStats
from jsnap.transport.connection import ClientConnection
from jsnap.units import MiB

log = logging.getLogger("jsnap.server")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_INFLIGHT_REQUESTS = 1024
DEFAULT_MAX_INFLIGHT_BYTES = 64 * MiB  # two maximal READs
DEFAULT_BUSY_POLL = 50e-6  # seconds; the gap between a QD1 client's requests is ~20-40 us
MAX_BUSY_POLL = 10e-3


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
        engine.access.rules()  # load the access rules here, not in a connection thread
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
