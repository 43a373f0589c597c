"""TLS for NBD connections: the server's SSLContext, and TLS over a connected socket.

Model
-----
After NBD_OPT_STARTTLS is acknowledged (in the clear), a connection switches to a
``TlsChannel``: an ``ssl.SSLObject`` bound to two ``ssl.MemoryBIO``s, with the raw socket
doing all I/O. Why not ``ssl.SSLSocket``:

* the server has two threads per connection: the connection thread blocks in recv while the
  durable-reply sender writes. An OpenSSL ``SSL`` object must not be used by two threads at
  once, and an SSLSocket would hold it (inside OpenSSL) for the whole blocking recv. With
  memory BIOs nothing blocks inside OpenSSL: the raw recv happens outside any lock, and the
  SSL object is touched only briefly, under ``ssl_lock``, to push ciphertext in or pull
  plaintext (or ciphertext) out;
* ``SSLSocket`` has no ``sendmsg``; here replies are written record by record from the
  same buffer lists the plain path hands to ``sendmsg``.

Invariants
----------
1. ``ssl_lock`` guards the SSLObject and both BIOs; it is never held across a socket call,
   so a reader blocked in recv never stops the sender, and vice versa.
2. ``send_lock`` orders ciphertext on the socket: taking bytes out of the outgoing BIO and
   sending them happen under it, so TLS records reach the wire in the order OpenSSL made
   them, whichever thread made them (a read can make records too: TLS 1.3 key updates,
   alerts). Lock order: ``send_lock`` before ``ssl_lock``.
3. Plain connections never touch this module: their send and recv paths are unchanged.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, cast

from jsnap.errors import JsnapError

_RAW_RECV = 256 * 1024  # ciphertext read per recv (as the plain path's recv size)
_PLAIN_CHUNK = 256 * 1024  # plaintext encrypted per write: bounds the outgoing BIO
_COALESCE = 16 * 1024  # smaller reply pieces are joined: fewer, fuller TLS records
_RECORD = 16 * 1024  # the most plaintext one TLS record (so one SSLObject.read) yields


class Receiver(Protocol):
    """What ``TlsChannel.recv_into`` needs of a jsnap.nbd.ServerConnection."""

    def get_buffer(self, min_size: int = ...) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...


def _no_passphrase() -> str:
    # Without this OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise JsnapError("the TLS key is encrypted: give an unencrypted key file")


def _pem(path: str, what: str, marker: bytes) -> bytes:
    """The file's start, or one readable line for the usual mistakes (before OpenSSL's
    terser errors)."""
    if not os.path.isfile(path):
        raise JsnapError(f"{what} {path}: no such file")
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise JsnapError(f"{what} {path}: not readable ({e.strerror or e})") from None
    if marker not in text:
        raise JsnapError(f"{what} {path}: no PEM {marker.decode().strip('-')} in it")
    return text


def server_context(cert: str, key: str | None, ca: str | None) -> ssl.SSLContext:
    """The server's TLS context: its certificate and key; with ``ca``, client certificates
    are required and must chain to it. Errors are one readable JsnapError line."""
    text = _pem(cert, "TLS certificate", b"CERTIFICATE-----")
    if key is not None:
        _pem(key, "TLS key", b"PRIVATE KEY-----")
    elif b"PRIVATE KEY-----" not in text:
        raise JsnapError(f"TLS certificate {cert}: no private key in it (give --tls-key)")
    if ca is not None:
        _pem(ca, "TLS CA file", b"CERTIFICATE-----")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec's floor
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as e:
        why = "key does not match the certificate" if e.reason == "KEY_VALUES_MISMATCH" \
            else e.reason if e.reason and e.reason != "PEM lib" else "unusable PEM data"
        raise JsnapError(f"cannot use TLS certificate {cert}"
                         f"{f' with key {key}' if key else ''}: {why}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise JsnapError(f"cannot use TLS CA file {ca}: {e.reason or 'unusable PEM data'}"
                             ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TlsChannel:
    """Server-side TLS over the connected socket ``sock`` (see the module docstring)."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ssl_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.raw = bytearray(_RAW_RECV)
        self.raw_view = memoryview(self.raw)

    # -- handshake ------------------------------------------------------------------------

    def handshake(self, deadline: float | None) -> None:
        """Run the TLS handshake; raises ssl.SSLError (e.g. a bad client certificate, after
        sending the alert), TimeoutError past ``deadline`` (time.monotonic), EOFError."""
        while True:
            try:
                with self.ssl_lock:
                    self.obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                try:
                    self.flush()  # the alert that tells the client why
                except OSError:
                    pass
                raise
            else:
                self.flush()
                return
            self.flush()
            if deadline is not None:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
            n = self.sock.recv_into(self.raw)
            if n == 0:
                raise EOFError("client closed the connection during the TLS handshake")
            with self.ssl_lock:
                self.incoming.write(self.raw_view[:n])

    def peer_common_names(self) -> list[str]:
        """The commonName values of the verified client certificate's subject (none when the
        client sent no certificate, i.e. the server has no CA to verify one with)."""
        cert: Any = self.obj.getpeercert()
        if not cert:
            return []
        return [value for rdn in cert.get("subject", ()) for key, value in rdn
                if key == "commonName"]

    @property
    def version(self) -> str | None:
        return self.obj.version()

    # -- data -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send whatever ciphertext OpenSSL has made (invariant 2)."""
        with self.send_lock:
            with self.ssl_lock:
                data = self.outgoing.read()
            if data:
                self.sock.sendall(data)

    def recv_into(self, conn: Receiver) -> int:
        """Decrypt what the client sent into ``conn`` (a jsnap.nbd.ServerConnection):
        receives from the socket until at least one plaintext byte is there; returns how
        many, or 0 at end of stream (close_notify or the socket closing)."""
        while True:
            got = 0
            eof = False
            with self.ssl_lock:
                try:
                    while True:
                        view = conn.get_buffer(_RECORD)
                        # With a buffer, read returns a count (typeshed says bytes).
                        k = cast(int, self.obj.read(len(view), view))
                        if k == 0:  # close_notify received
                            eof = True
                            break
                        conn.buffer_updated(k)
                        got += k
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    eof = True  # the peer closed without close_notify
                pending = self.outgoing.pending
            if pending:
                self.flush()
            if got:
                return got
            if eof:
                return 0
            n = self.sock.recv_into(self.raw)  # outside ssl_lock: the sender keeps going
            with self.ssl_lock:
                if n:
                    self.incoming.write(self.raw_view[:n])
                else:
                    self.incoming.write_eof()

    def send(self, bufs: Sequence[bytes | bytearray | memoryview]) -> None:
        """Encrypt and send ``bufs`` in order, whole (the TLS twin of ``sendmsg`` loops)."""
        with self.send_lock:
            small = bytearray()
            for b in bufs:
                n = len(b)
                if n < _COALESCE:
                    small += b
                    if len(small) < _PLAIN_CHUNK:
                        continue
                    self._write(small)
                    small = bytearray()
                    continue
                if small:
                    self._write(small)
                    small = bytearray()
                view = memoryview(b).cast("B")
                for i in range(0, n, _PLAIN_CHUNK):
                    self._write(view[i:i + _PLAIN_CHUNK])
            if small:
                self._write(small)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        # Called with send_lock held: encrypt one piece, send its records at once, so the
        # outgoing BIO never holds more than one piece's ciphertext.
        with self.ssl_lock:
            self.obj.write(data)
            out = self.outgoing.read()
        self.sock.sendall(out)

    def close(self) -> None:
        """Best effort close_notify ("the server MUST close down the TLS session"), bounded
        in time: a client that stopped reading must not hold the connection thread."""
        try:
            self.sock.settimeout(1.0)
            with self.send_lock:
                with self.ssl_lock:
                    try:
                        self.obj.unwrap()
                    except ssl.SSLError:
                        pass  # SSLWantReadError: our close_notify is out, theirs may not come
                    data = self.outgoing.read()
                if data:
                    self.sock.sendall(data)
        except OSError:
            pass


