"""A minimal NBD client on raw sockets, for sending what no real client would send.

Written from the NBD spec (constants typed in here, not imported from jsnap). Fixed newstyle
handshake with NBD_OPT_GO and simple replies only (no structured replies are negotiated);
any option can be sent and its replies read (`send_option`, `option_replies`). Unix socket
or TCP.
"""

from __future__ import annotations

import socket
import struct
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_POLICY = (1 << 31) | 2
REP_ERR_TLS_REQD = (1 << 31) | 5
INFO_EXPORT = 0

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


def go_data(export: str) -> bytes:
    """NBD_OPT_GO / NBD_OPT_INFO data: the name, no information requests."""
    name = export.encode()
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


class RawClient:
    def __init__(self, path: str | tuple[str, int], timeout: float = 10.0) -> None:
        """`path`: a unix socket, or a (host, port) TCP address."""
        fam = socket.AF_UNIX if isinstance(path, str) else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.size: int | None = None
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">8s8sH", self.recv_exact(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (magic, opt)
        return flags

    def start_options(self) -> None:
        """Greeting and client flags: ready for options."""
        self.greeting()
        self.sock.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))

    def send_option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)

    def option_replies(self, opt: int) -> list[tuple[int, bytes]]:
        """(reply type, payload) of every reply to `opt` up to the final one (an ACK, an
        error, or for NBD_OPT_GO/INFO/LIST anything but INFO/SERVER)."""
        out = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == OPT_REPLY_MAGIC and ropt == opt, (hex(magic), ropt)
            out.append((rtype, self.recv_exact(length)))
            if rtype not in (REP_INFO, REP_SERVER):
                return out

    def handshake(self, export: str) -> int:
        """Greeting, client flags, NBD_OPT_GO: enter transmission; return the export size."""
        self.start_options()
        self.send_option(OPT_GO, go_data(export))
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
            assert magic == OPT_REPLY_MAGIC and opt == OPT_GO, (hex(magic), opt)
            payload = self.recv_exact(length)
            if rtype == REP_INFO:
                (info,) = struct.unpack(">H", payload[:2])
                if info == INFO_EXPORT:
                    self.size, _tflags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                assert self.size is not None
                return self.size
            else:
                raise AssertionError(f"NBD_OPT_GO failed: reply type 0x{rtype:x} {payload!r}")

    def send_request(self, cmd: int, offset: int, length: int, flags: int = 0,
                     magic: int = REQUEST_MAGIC) -> int:
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, self.cookie, offset, length))
        return self.cookie

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, cookie, data

    def write(self, offset: int, data: bytes) -> int:
        cookie = self.send_request(CMD_WRITE, offset, len(data))
        self.sock.sendall(data)
        error, rcookie, _ = self.reply()
        assert rcookie == cookie
        return error

    def read(self, offset: int, length: int) -> bytes:
        cookie = self.send_request(CMD_READ, offset, length)
        error, rcookie, data = self.reply(length)
        assert rcookie == cookie and error == 0, (rcookie, cookie, error)
        return data

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the connection within `timeout` (data is discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
        return False
