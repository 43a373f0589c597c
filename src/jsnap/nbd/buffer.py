"""``ReceiveBuffer``: the client's byte stream, shared by both phases of a connection.

Model (after h11's ``_receivebuffer.py``): the transport fills the buffer (``get_buffer`` +
``buffer_updated``, or ``receive_data``); the phase that is reading (``Negotiation``, then
``Transmission``) parses messages straight out of ``buf[start:end]`` and advances ``start``,
and asks ``need(total)`` when a message is incomplete.  The buffer also records how the stream
ended, once: ``close(reason)`` for a clean end, ``fail(exc)`` for a protocol violation.  The
parsers read and write ``buf``, ``view``, ``start`` and ``end`` directly: that is the per-request
path, and an attribute is cheaper than a call.

Invariants:

1. One growable ``bytearray``; unread bytes are ``buf[start:end]``, free space is
   ``buf[end:]``.  Parsing only advances ``start`` (no copy, no per-event compaction);
   ``get_buffer``/``receive_data`` rewind when everything was read, compact (one memmove of
   the unread tail) only when the free space is too small, and grow by allocating a *new*
   bytearray (never resizing in place, which would fail while an event still holds a view).
2. A ``Write`` event's payload is a view of ``buf``: valid until the next
   ``get_buffer()``/``receive_data()`` call, which may overwrite it.
3. ``get_buffer(n)`` guarantees room for ``n`` bytes *and* for the rest of a partially
   received message (``want``, set by ``need``), so a large WRITE lands with one more recv.
4. Once the stream is closed or failed, received bytes are dropped (nobody will parse them).
   A closed buffer is empty and at EOF, so every later ``need()`` returns the same
   ``ConnectionClosed``: a parser reports the end without a test of its own per message.
"""

from __future__ import annotations

from typing import Literal

from jsnap.nbd.errors import LocalProtocolError, RemoteProtocolError
from jsnap.nbd.events import NEED_DATA, ConnectionClosed, NeedData


class ReceiveBuffer:
    """Received bytes not parsed yet, and the end of the stream (see the module docstring)."""

    __slots__ = ("buf", "view", "start", "end", "want", "eof", "closed", "error")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        #: Bytes (from ``start``) the parser needs to complete the current message.
        self.want = 0
        #: The peer closed its side (``recv`` returned 0).
        self.eof = False
        self.closed: ConnectionClosed | None = None
        self.error: RemoteProtocolError | None = None

    # The three methods below are ServerConnection's own bytes-in API (bound per connection).

    def get_buffer(self, min_size: int = 65536) -> memoryview:
        """Writable space at the end of the receive buffer, at least ``min_size`` bytes.

        Also large enough for the rest of a partially received message.  Fill
        a prefix of it (``sock.recv_into(view)``) and call
        ``buffer_updated(n)``.  Invalidates earlier ``Write.payload`` views.
        """
        self._reserve(max(min_size, self.want - (self.end - self.start), 1))
        return self.view[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last ``get_buffer()`` view.

        ``0`` means end of stream (what ``recv_into`` returns at EOF).
        """
        if nbytes == 0:
            self.eof = True
            return
        if nbytes < 0 or self.end + nbytes > len(self.buf):
            raise LocalProtocolError(f"buffer_updated({nbytes}) does not fit the buffer "
                                     f"returned by get_buffer()")
        if self.closed is not None or self.error is not None:
            return  # nobody will parse it: drop
        if self.eof:
            raise LocalProtocolError("data received after end of stream")
        self.end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the receive buffer; ``b""`` means end of stream.

        Invalidates earlier ``Write.payload`` views.
        """
        n = len(data)
        if n == 0:
            self.eof = True
            return
        if self.closed is not None or self.error is not None:
            return
        if self.eof:
            raise LocalProtocolError("data received after end of stream")
        self._reserve(n)
        end = self.end
        self.view[end:end + n] = data
        self.end = end + n

    def _reserve(self, n: int) -> None:
        """Make ``buf[end:]`` at least ``n`` bytes long (rewind, compact or grow)."""
        start, end = self.start, self.end
        if start == end:
            self.start = self.end = start = end = 0
        size = len(self.buf)
        if size - end >= n:
            return
        unread = end - start
        if size - unread >= n:
            # Compact: one memmove (memoryview assignment handles the overlap).
            self.view[0:unread] = self.view[start:end]
        else:
            # Grow into a new buffer; views held by events keep the old one alive.
            new = bytearray(max(2 * size, unread + n))
            new[0:unread] = self.view[start:end]
            self.buf = new
            self.view = memoryview(new)
        self.start = 0
        self.end = unread

    def need(self, total: int) -> NeedData | ConnectionClosed:
        """No complete message of ``total`` bytes: ask for more, or end at EOF."""
        self.want = total
        if not self.eof:
            return NEED_DATA
        if self.end == self.start:
            closed = self.closed
            return closed if closed is not None else self.close("eof")
        raise RemoteProtocolError(f"peer closed the connection mid-message "
                                  f"({self.end - self.start} of {total} bytes received)")

    def close(self, reason: Literal["disconnect", "abort", "eof"]) -> ConnectionClosed:
        """End the stream cleanly: unread bytes are dropped, and so is anything received later."""
        event = ConnectionClosed(reason)
        self.closed = event
        self.start = self.end = 0
        self.eof = True  # with nothing buffered: need() answers `event` from now on
        return event

    def fail(self, exc: RemoteProtocolError) -> None:
        """The peer broke the protocol: anything received from now on is dropped."""
        self.error = exc
