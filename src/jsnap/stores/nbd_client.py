"""A small blocking NBD client in pure standard library: the remote store's connections
(stores/remote.py), and tools' and tests'.

Model
-----
One `NbdClient` is one socket (unix path or TCP host:port) and one export. The handshake is
fixed newstyle with NBD_OPT_GO asking for the export's block size constraints (no TLS, no
structured replies, no meta contexts), so every reply is a simple reply. `min_block`,
`preferred_block` and `max_block` are the server's (1, 4096 and MAX_REQUEST when it sends
none); requests larger than `max_block` are split, and alignment to `min_block` is the
caller's (the remote store's) to keep. Requests are strictly one at a time: each method
sends one request and waits for its reply (the cookie must match), so the caller always
knows which request was in flight when a connection breaks.

Errors
------
* `NbdError`: the server answered a request with an error; `errno` is the host errno
  (EINVAL, ENOSPC, ...), `nbd_error` the wire value. The connection stays usable. A refused
  NBD_OPT_GO (unknown export...) is an NbdError too (EINVAL, the reply type in the message).
* `ConnectionError` (incl. `NbdDisconnected` for EOF), or `TimeoutError` after `timeout`
  seconds: the connection is gone or stuck; a request without a reply may or may not have
  been carried out.
* `NbdProtocolError`: the server sent something this client cannot parse; close it.

Limits: requests larger than `max_request` (32 MiB, the spec's safe payload bound) are split
into several requests, so a large pread/pwrite is not atomic. No structured replies means a
read error mid-way cannot say where it happened (the spec's simple-reply limitation).
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
import urllib.parse

from jsnap.nbd.constants import (
    COMMAND_NAMES,
    IHAVEOPT,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_OPT_GO,
    NBD_REP_ACK,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    errno_from_nbd_error,
)

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
MAX_REQUEST = 32 << 20


class NbdError(Exception):
    """An error reply. `errno` is the host errno, `nbd_error` the value on the wire."""

    def __init__(self, nbd_error: int, what: str) -> None:
        self.nbd_error = nbd_error
        self.errno = errno_from_nbd_error(nbd_error)
        super().__init__(f"{what}: {_errno.errorcode.get(self.errno, self.errno)} "
                         f"(NBD error {nbd_error})")


class NbdDisconnected(ConnectionError):
    """The server closed the connection."""


class NbdProtocolError(Exception):
    """The server sent bytes that do not follow the protocol."""


def parse_uri(uri: str) -> tuple[str | tuple[str, int], str]:
    """(address, export) of an NBD URI: nbd://HOST[:PORT]/EXPORT or
    nbd+unix:///EXPORT?socket=PATH (the forms of the NBD URI spec that need no TLS)."""
    u = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.scheme == "nbd" and u.hostname:
        return (u.hostname, u.port or 10809), export
    if u.scheme == "nbd+unix" and not u.netloc:
        socks = urllib.parse.parse_qs(u.query).get("socket")
        if socks and socks[0]:
            return socks[0], export
    raise ValueError(f"invalid NBD URI {uri!r}: use nbd://HOST[:PORT]/EXPORT or "
                     "nbd+unix:///EXPORT?socket=PATH")


def _fua(fua: bool) -> int:
    return NBD_CMD_FLAG_FUA if fua else 0


def _connect(address: str | tuple[str, int], timeout: float | None) -> socket.socket:
    """A tuple or "HOST:PORT" is TCP; any other string is a unix socket path."""
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and "/" not in address:
            address = (host.strip("[]"), int(port))
    if isinstance(address, tuple):
        sock = socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class NbdClient:
    """Connected and in transmission once constructed; `size` and `flags` (the transmission
    flags) come from the server's NBD_INFO_EXPORT."""

    def __init__(self, address: str | tuple[str, int], export: str = "",
                 timeout: float | None = 60.0, max_request: int = MAX_REQUEST) -> None:
        self.export = export
        self.max_request = max_request
        self.size = 0
        self.flags = 0
        self.min_block, self.preferred_block, self.max_block = 1, 4096, max_request
        self._cookie = 0
        self.sock = _connect(address, timeout)
        try:
            self._handshake(export)
        except BaseException:
            self.sock.close()
            raise

    # -- handshake ------------------------------------------------------------------------

    def _handshake(self, export: str) -> None:
        magic, opt_magic, hflags = _GREETING.unpack(self._recv(_GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdProtocolError("not a newstyle NBD server")
        if not hflags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not support fixed newstyle negotiation")
        cflags = NBD_FLAG_C_FIXED_NEWSTYLE
        if hflags & NBD_FLAG_NO_ZEROES:
            cflags |= NBD_FLAG_C_NO_ZEROES  # then GO's reply carries no 124 zero bytes
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE)
        self.sock.sendall(struct.pack(">I", cflags)
                          + _OPTION.pack(IHAVEOPT, NBD_OPT_GO, len(data)) + data)
        got_info = False
        while True:
            magic, opt, rtype, length = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
            if magic != NBD_REP_MAGIC or opt != NBD_OPT_GO:
                raise NbdProtocolError(f"bad option reply (magic {magic:#x}, option {opt})")
            payload = self._recv(length)
            if rtype & NBD_REP_FLAG_ERROR:
                msg = payload.decode(errors="replace")
                raise NbdError(NBD_EINVAL, f"NBD_OPT_GO {export!r} refused "
                               f"(reply {rtype:#x}{': ' + msg if msg else ''})")
            if rtype == NBD_REP_INFO and len(payload) >= 12:
                kind = struct.unpack(">H", payload[:2])[0]
                if kind == NBD_INFO_EXPORT:
                    self.size, self.flags = struct.unpack(">QH", payload[2:12])
                    got_info = True
                elif kind == NBD_INFO_BLOCK_SIZE and len(payload) >= 14:
                    lo, pref, hi = struct.unpack(">III", payload[2:14])
                    self.min_block, self.preferred_block = max(lo, 1), pref
                    self.max_block = min(hi, self.max_request)
                    self.max_request = self.max_block
            elif rtype == NBD_REP_ACK:
                if not got_info:
                    raise NbdProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
                return

    # -- transmission -----------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return bool(self.flags & NBD_FLAG_READ_ONLY)

    def pread(self, n: int, off: int) -> bytes:
        out = bytearray()
        for o, m in self._split(n, off, self.max_request):
            self._request(NBD_CMD_READ, 0, o, m)
            out += self._reply(NBD_CMD_READ, o, m, m)
        return bytes(out)

    def pwrite(self, buf: bytes | bytearray | memoryview, off: int, fua: bool = False) -> None:
        view = memoryview(buf).cast("B")
        for o, m in self._split(len(view), off, self.max_request):
            self._request(NBD_CMD_WRITE, _fua(fua), o, m,
                          view[o - off : o - off + m])
            self._reply(NBD_CMD_WRITE, o, m)

    def flush(self) -> None:
        self._request(NBD_CMD_FLUSH, 0, 0, 0)
        self._reply(NBD_CMD_FLUSH, 0, 0)

    def trim(self, n: int, off: int, fua: bool = False) -> None:
        for o, m in self._split(n, off, 1 << 31):
            self._request(NBD_CMD_TRIM, _fua(fua), o, m)
            self._reply(NBD_CMD_TRIM, o, m)

    def zero(self, n: int, off: int, fua: bool = False, no_hole: bool = False) -> None:
        flags = _fua(fua) | (NBD_CMD_FLAG_NO_HOLE if no_hole else 0)
        for o, m in self._split(n, off, 1 << 31):
            self._request(NBD_CMD_WRITE_ZEROES, flags, o, m)
            self._reply(NBD_CMD_WRITE_ZEROES, o, m)

    def close(self) -> None:
        """NBD_CMD_DISC (best effort: the server may already be gone), then close."""
        try:
            self._request(NBD_CMD_DISC, 0, 0, 0)
        except OSError:
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire -------------------------------------------------------------------------------

    @staticmethod
    def _split(n: int, off: int, limit: int) -> list[tuple[int, int]]:
        if n == 0:
            return [(off, 0)]  # still one request: the server validates it
        return [(o, min(limit, off + n - o)) for o in range(off, off + n, limit)]

    def _request(self, cmd: int, flags: int, off: int, n: int,
                 payload: memoryview | None = None) -> None:
        self._cookie += 1
        header = _REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, self._cookie, off, n)
        if payload is None:
            self.sock.sendall(header)
        else:
            self.sock.sendall(header)
            self.sock.sendall(payload)

    def _reply(self, cmd: int, off: int, n: int, read_len: int = 0) -> bytes:
        magic, error, cookie = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != NBD_SIMPLE_REPLY_MAGIC:
            raise NbdProtocolError(f"bad reply magic {magic:#x}")
        if cookie != self._cookie:
            raise NbdProtocolError(f"reply cookie {cookie}, expected {self._cookie}")
        if error:
            raise NbdError(error, f"{COMMAND_NAMES.get(cmd, cmd)} {off}+{n}")
        return self._recv(read_len) if read_len else b""

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise NbdDisconnected(f"server closed the connection ({got} of {n} bytes)")
            got += k
        return bytes(buf)
