"""``ServerConnection``: the server side of one NBD connection, sans I/O.

Model (after h11): bytes in, events out; decisions in, bytes out.  The transport puts
received bytes into the connection (``get_buffer`` + ``buffer_updated``, or
``receive_data``), pulls events with ``next_event()`` until ``NEED_DATA``, and sends whatever
the ``reply_*`` methods return.  The codec never performs I/O, never blocks, never starts
threads, and never knows which exports exist: every decision is the application's, taken
through a reply method.

States (``conn.state``)::

    CLIENT_FLAGS --flags--> OPTIONS --option--> OPTION_PENDING --reply_*--> OPTIONS
                                                      |  reply_export (GO, EXPORT_NAME)
                                                      v
                       CLOSED <--DISC / EOF-- TRANSMISSION
    (OPTIONS/CLIENT_FLAGS --EOF--> CLOSED;  OPTION_PENDING(abort) --reply_ack--> CLOSED;
     any --RemoteProtocolError--> ERROR)

The greeting (``greeting()``) is a constant: fixed newstyle only, with
NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES.  TLS is ``ServerConnection(tls="off" |
"allow" | "require")``; ``negotiation.py`` says what each mode does and how STARTTLS
starts negotiation over.

The connection is three parts, and the switch between them:

* ``buffer.ReceiveBuffer`` -- the received bytes (the buffer invariants are there) and how
  the stream ended: closed (``ConnectionClosed``) or failed (``RemoteProtocolError``).
* ``negotiation.Negotiation`` -- the handshake: client flags, one option at a time, what
  it settled; ``reply_export`` for GO / EXPORT_NAME ends it with an ``Agreement``.
* ``transmission.Transmission`` -- built from that ``Agreement``: requests in, replies out.

Both phases parse straight out of the one buffer.  The connection chooses which phase
reads, records protocol errors, and forwards each ``reply_*`` to its phase.

Invariants:

1. ``next_event`` makes one call, to the current phase's reader (``_next``, switched at
   each phase change rather than tested per event); after a ``RemoteProtocolError`` it
   raises that same error, every time.
2. Forwarding adds no call per request: the bytes-in methods are the buffer's own, bound
   to the connection, and each transmission ``reply_*`` tests for the phase inline.
3. The parts never refer back to the connection (no callbacks), so a connection makes no
   reference cycle: reference counting frees it, and its buffer, as soon as the transport
   drops it (the serving process runs full collections rarely: ``cli/gcpolicy.py``).
4. Transmission keeps no per-request state (replies may be produced in any order, from the
   request event alone); per connection it keeps only the ``Agreement``.

Not thread-safe: use one connection from one thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal, NoReturn, Protocol

from jsnap.nbd.buffer import ReceiveBuffer
from jsnap.nbd.constants import NBD_MAX_DOS_SAFE_PAYLOAD
from jsnap.nbd.errors import LocalProtocolError, RemoteProtocolError
from jsnap.nbd.events import Event, NeedData, Request
from jsnap.nbd.export import ExportInfo
from jsnap.nbd.negotiation import GREETING_BYTES, Negotiation, State
from jsnap.nbd.transmission import BytesLike, Transmission

__all__ = ["ServerConnection", "State"]

_BEFORE_TRANSMISSION = "no request can be answered before transmission"


class _GetBuffer(Protocol):
    def __call__(self, min_size: int = 65536) -> memoryview: ...  # ReceiveBuffer.get_buffer


def _raising(exc: RemoteProtocolError) -> Callable[[], NoReturn]:
    """The reader of a failed connection: the same error, every time."""
    def next_event() -> NoReturn:
        raise exc
    return next_event


class ServerConnection:
    """Server side of one NBD connection (fixed newstyle handshake, then transmission).

    ``max_payload`` caps the length of one WRITE payload; a longer WRITE is a
    ``RemoteProtocolError`` (its payload cannot be skipped without buffering
    it).  The spec asks servers not to treat lengths below 2^25 as a denial of
    service, hence the 32 MiB default.  ``buffer_size`` is the initial receive
    buffer size.  ``tls`` is "off", "allow" or "require" (``negotiation.py``).
    """

    __slots__ = ("get_buffer", "buffer_updated", "receive_data", "_rx", "_neg", "_tx", "_next",
                 "_max_payload")

    # Bytes in: the receive buffer's own methods (docstrings in buffer.py), bound to each
    # connection so that a recv costs no wrapper call.
    get_buffer: _GetBuffer
    buffer_updated: Callable[[int], None]
    receive_data: Callable[[bytes | bytearray | memoryview], None]

    def __init__(self, *, max_payload: int = NBD_MAX_DOS_SAFE_PAYLOAD,
                 buffer_size: int = 256 * 1024,
                 tls: Literal["off", "allow", "require"] = "off") -> None:
        if max_payload < 1 or buffer_size < 1:
            raise ValueError("max_payload and buffer_size must be positive")
        if tls not in ("off", "allow", "require"):
            raise ValueError(f"tls must be 'off', 'allow' or 'require', not {tls!r}")
        rx = self._rx = ReceiveBuffer(buffer_size)
        self.get_buffer = rx.get_buffer
        self.buffer_updated = rx.buffer_updated
        self.receive_data = rx.receive_data
        self._neg = Negotiation(rx, max_payload=max_payload, tls=tls)
        self._tx: Transmission | None = None
        #: The current phase's reader (invariant 1).
        self._next: Callable[[], Event | NeedData] = self._neg.next_event
        self._max_payload = max_payload

    # --- Introspection ---------------------------------------------------------------

    @property
    def state(self) -> State:
        # The handshake's steps, TRANSMISSION once it handed over, then CLOSED or ERROR
        # as the stream ended (in either phase): the negotiation sees all of it.
        return self._neg.state

    @property
    def structured_replies(self) -> bool:
        """Whether NBD_OPT_STRUCTURED_REPLY was acknowledged."""
        return self._neg.structured

    @property
    def no_zeroes(self) -> bool:
        """Whether the client set NBD_FLAG_C_NO_ZEROES."""
        return self._neg.no_zeroes

    @property
    def export(self) -> ExportInfo | None:
        """The export in use, once transmission has started."""
        tx = self._tx
        return None if tx is None else tx.agreed.export

    @property
    def transmission_flags(self) -> int:
        """The transmission flags sent for the export (0 before transmission)."""
        tx = self._tx
        return 0 if tx is None else tx.agreed.flags

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        """Context id -> name of the metadata contexts usable with BLOCK_STATUS.

        Before transmission: those set by the last NBD_OPT_SET_META_CONTEXT.
        In transmission: empty unless that option named the export entered.
        """
        tx = self._tx
        return MappingProxyType(self._neg.meta_contexts if tx is None
                                else tx.agreed.meta_contexts)

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def tls_active(self) -> bool:
        """Whether ``reply_starttls()`` was called: every byte since goes through TLS."""
        return self._neg.tls_active

    # --- Bytes in --------------------------------------------------------------------

    def greeting(self) -> bytes:
        """The server's first bytes: NBDMAGIC, IHAVEOPT, handshake flags."""
        return GREETING_BYTES

    # --- Events out ------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA`` if no complete message is buffered.

        Raises ``RemoteProtocolError`` if the peer broke the protocol (and on
        every later call), ``LocalProtocolError`` if an option still awaits
        its reply.
        """
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._rx.fail(exc)
        self._next = _raising(exc)

    # --- Handshake answers -----------------------------------------------------------

    def reply_export(self, info: ExportInfo) -> bytes:
        """Accept ``OptExportName``, ``OptGo`` or ``OptInfo`` with this export.

        GO and EXPORT_NAME enter transmission; INFO stays in the handshake.
        """
        data, agreed = self._neg.reply_export(info)
        if agreed is not None:
            tx = Transmission(self._rx, agreed, max_payload=self._max_payload)
            self._tx = tx
            self._next = tx.next_request
        return data

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> bytes:
        """Answer ``OptList`` with (name, description) pairs (description may be "")."""
        return self._neg.reply_list(exports)

    def reply_meta_contexts(self, names: Iterable[str]) -> bytes:
        """Answer ``OptListMetaContext`` / ``OptSetMetaContext`` with the context names.

        For SET the codec numbers the contexts 1, 2, ... (duplicates dropped)
        and remembers them; for LIST the ids are 0 ("reserved and SHOULD be
        set to zero").
        """
        return self._neg.reply_meta_contexts(names)

    def reply_ack(self) -> bytes:
        """Answer ``OptStructuredReply`` (enables structured replies) or ``OptAbort``."""
        return self._neg.reply_ack()

    def reply_starttls(self) -> bytes:
        """Accept ``OptStartTls``: the NBD_REP_ACK to send in the clear; then TLS.

        Negotiation starts over (structured replies and metadata contexts are
        forgotten).  Raises ``RemoteProtocolError`` if bytes sent after the
        option are already buffered (see ``negotiation.py``).
        """
        try:
            return self._neg.reply_starttls()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def reply_option_error(self, error: int, message: str = "") -> bytes:
        """Refuse the pending option with an NBD_REP_ERR_* value; the handshake goes on.

        Not for NBD_OPT_EXPORT_NAME (it has no error reply: close the
        connection instead) nor NBD_OPT_ABORT (which MUST be acknowledged).
        """
        return self._neg.reply_option_error(error, message)

    # --- Transmission answers --------------------------------------------------------
    # Replies stay possible after NBD_CMD_DISC ("The server MUST handle all outstanding
    # requests" before closing): the Transmission outlives the stream.  Each method tests
    # `tx` inline rather than through a helper: one call per reply, on the hot path.

    def reply_ok(self, request: Request) -> bytes:
        """Success without data: a simple reply (allowed for every command but
        READ, whether or not structured replies were negotiated)."""
        tx = self._tx
        if tx is None:
            raise LocalProtocolError(_BEFORE_TRANSMISSION)
        return tx.reply_ok(request)

    def reply_error(self, request: Request, error: int, message: str = "") -> bytes:
        """Fail ``request`` with host errno ``error`` (mapped to an NBD error).

        A structured NBD_REPLY_TYPE_ERROR chunk (with ``message``) when
        structured replies were negotiated -- the spec "SHOULD prefer" it and
        requires it for READ -- else a simple reply (the message is dropped).
        """
        tx = self._tx
        if tx is None:
            raise LocalProtocolError(_BEFORE_TRANSMISSION)
        return tx.reply_error(request, error, message)

    def reply_error_at(self, request: Request, error: int, offset: int, message: str = "",
                       *, done: bool = True) -> bytes:
        """NBD_REPLY_TYPE_ERROR_OFFSET: ``request`` failed at ``offset`` (structured only).

        With ``done=False`` more chunks must follow (e.g. ``reply_done``).
        """
        tx = self._tx
        if tx is None:
            raise LocalProtocolError(_BEFORE_TRANSMISSION)
        return tx.reply_error_at(request, error, offset, message, done)

    def reply_done(self, request: Request) -> bytes:
        """NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: ends a structured reply."""
        tx = self._tx
        if tx is None:
            raise LocalProtocolError(_BEFORE_TRANSMISSION)
        return tx.reply_done(request)

    def reply_read(self, request: Request,
                   pieces: Sequence[tuple[int, int, BytesLike | None]], *,
                   done: bool = True) -> list[BytesLike]:
        """Answer a ``Read`` with ``(offset, length, data)`` pieces; ``data=None`` is a hole.

        Pieces must be in ascending order, not overlap and lie inside the
        request; with ``done=True`` (the default) they must cover it exactly.
        Returns buffers for ``sendmsg`` (data buffers are passed through, not
        copied).  Without structured replies: one simple reply, holes sent as
        zeroes.  With them: one OFFSET_DATA / OFFSET_HOLE chunk per piece, the
        last one flagged DONE -- or, for NBD_CMD_FLAG_DF, a single chunk ("If
        the area being read contains both data and a hole, the server MUST use
        NBD_REPLY_TYPE_OFFSET_DATA with the zeroes explicitly present").
        ``done=False`` (structured only, not with DF) sends part of a reply to
        be finished by ``reply_error_at``/``reply_done``/``reply_read``.
        """
        tx = self._tx
        if tx is None:
            raise LocalProtocolError(_BEFORE_TRANSMISSION)
        return tx.reply_read(request, pieces, done)

    def reply_block_status(self, request: Request,
                           extents: Mapping[int, Sequence[tuple[int, int]]]) -> bytes:
        """Answer a ``BlockStatus`` with ``{context_id: [(length, flags), ...]}``.

        Exactly one entry per context in ``meta_contexts`` ("exactly one
        status chunk per negotiated metadata context ID").  The codec trims
        each list to what the spec allows: with REQ_ONE the first extent,
        clamped to the request length; otherwise extents up to the first one
        that reaches the request length.
        """
        tx = self._tx
        if tx is None:
            raise LocalProtocolError(_BEFORE_TRANSMISSION)
        return tx.reply_block_status(request, extents)
