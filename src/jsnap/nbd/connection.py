"""``ServerConnection``: the server side of one NBD connection, sans I/O.

Model (after h11): bytes in, events out; decisions in, bytes out.  The
transport puts received bytes into the connection (``get_buffer`` +
``buffer_updated``, or ``receive_data``), pulls events with ``next_event()``
until ``NEED_DATA``, and sends whatever the ``reply_*`` methods return.  The
codec never performs I/O, never blocks, never starts threads, and never knows
which exports exist: every decision is the application's, taken through a
reply method.

States (``conn.state``)::

    CLIENT_FLAGS --flags--> OPTIONS --option--> OPTION_PENDING --reply_*--> OPTIONS
                                                      |  reply_export (GO, EXPORT_NAME)
                                                      v
                       CLOSED <--DISC / EOF-- TRANSMISSION
    (OPTIONS/CLIENT_FLAGS --EOF--> CLOSED;  OPTION_PENDING(abort) --reply_ack--> CLOSED;
     any --RemoteProtocolError--> ERROR)

The greeting (``greeting()``) is a constant: fixed newstyle only, with
NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES.

TLS (``ServerConnection(tls=...)``; the codec never encrypts, the transport
does):

* ``"off"`` (the spec's NOTLS): NBD_OPT_STARTTLS gets NBD_REP_ERR_POLICY.
* ``"allow"`` (SELECTIVETLS): every option works before TLS; STARTTLS is
  offered.
* ``"require"`` (FORCEDTLS): before TLS every option but STARTTLS and ABORT
  is refused with NBD_REP_ERR_TLS_REQD *by the codec*, so the application never
  sees a GO, LIST or INFO it could leak an answer to; NBD_OPT_EXPORT_NAME,
  which cannot be refused, ends the connection (``RemoteProtocolError``).

STARTTLS arrives as ``OptStartTls``; ``reply_starttls()`` returns the ACK and
starts negotiation over: structured replies and metadata contexts negotiated in
the clear are forgotten (spec: "the server MUST NOT preserve any negotiation
state"), so a man in the middle cannot inject them.  Bytes the client sent
after STARTTLS, before its reply, are a protocol violation (they would be
plaintext taken for TLS-protected data): ``reply_starttls`` raises
``RemoteProtocolError``.  The transport sends the ACK in the clear, runs the
TLS handshake, and from then on feeds decrypted bytes to the same connection.

Receive buffer invariants:

* One growable ``bytearray``; unread bytes are ``buf[start:end]``, free space
  is ``buf[end:]``.  Parsing only advances ``start`` (no copy, no per-event
  compaction); ``get_buffer``/``receive_data`` rewind when everything was read,
  compact (one memmove of the unread tail) only when the free space is too
  small, and grow by allocating a *new* bytearray (never resizing in place,
  which would fail while an event still holds a view).
* A ``Write`` event's payload is a view of ``buf``: valid until the next
  ``get_buffer()``/``receive_data()`` call, which may overwrite it.
* ``get_buffer(n)`` guarantees room for ``n`` bytes *and* for the rest of a
  partially received message, so a large WRITE lands with one more recv.

Transmission invariants: the codec keeps no per-request state (replies may be
produced in any order, from the request event alone); per connection it keeps
only what was negotiated (structured replies, NO_ZEROES, the export and its
transmission flags, the metadata contexts SET for the export entered).

Not thread-safe: use one connection from one thread at a time.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal

from jsnap.nbd.constants import (
    COMMAND_NAMES,
    IHAVEOPT,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_WRITE,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_MAX_BLOCK_SIZE_UNLIMITED,
    NBD_MAX_DOS_SAFE_PAYLOAD,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_REP_ACK,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_FLAG_ERROR,
    NBD_REQUEST_MAGIC,
    NBDMAGIC,
    nbd_error_from_errno,
)
from jsnap.nbd.errors import LocalProtocolError, RemoteProtocolError
from jsnap.nbd.events import (
    NEED_DATA,
    BadOption,
    BlockStatus,
    Cache,
    ConnectionClosed,
    Event,
    Flush,
    NeedData,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptionEvent,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    Read,
    RejectedRequest,
    Request,
    Trim,
    Write,
    WriteZeroes,
)
from jsnap.nbd.export import ExportInfo, transmission_flags
from jsnap.nbd.handshake import (
    MAX_OPTION_LENGTH,
    TlsState,
    encode_export_name_reply,
    encode_info_replies,
    encode_meta_context_replies,
    encode_option_error,
    encode_server_replies,
    parse_option,
)
from jsnap.nbd.transmission import (
    COMMAND_SLOTS,
    MAX_CHUNK_DATA,
    BytesLike,
    allowed_flags_table,
    block_status_chunk,
    error_chunk,
    error_offset_chunk,
    none_chunk,
    offset_data_head,
    offset_hole_chunk,
    simple_reply,
    zeroes,
)
from jsnap.nbd.wire import CLIENT_FLAGS, GREETING, OPTION_HEADER, REQUEST, option_reply

#: Handshake flags this server sends ("Handshake flags").
HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
_KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
_GREETING = GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS)


class State(enum.Enum):
    """Where the connection is; see the module docstring for the transitions."""

    CLIENT_FLAGS = "CLIENT_FLAGS"
    OPTIONS = "OPTIONS"
    OPTION_PENDING = "OPTION_PENDING"
    TRANSMISSION = "TRANSMISSION"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


# Module-level aliases: an identity test against a global is the cheapest
# state check on the per-request path.
_CLIENT_FLAGS = State.CLIENT_FLAGS
_OPTIONS = State.OPTIONS
_OPTION_PENDING = State.OPTION_PENDING
_TRANSMISSION = State.TRANSMISSION
_CLOSED = State.CLOSED
_ERROR = State.ERROR

_REQUEST_SIZE = REQUEST.size
_unpack_request = REQUEST.unpack_from

#: Event class per command number.  Slot NBD_CMD_DISC is never used: a
#: disconnect becomes ``ConnectionClosed`` before this table is consulted.
_REQUEST_TYPES: tuple[type[Request], ...] = (
    Read, Write, Request, Flush, Trim, Cache, WriteZeroes, BlockStatus,
)
assert len(_REQUEST_TYPES) == COMMAND_SLOTS


def _command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"command {command}")


def _tls_refusal(option: int) -> BadOption:
    """FORCEDTLS before STARTTLS: "If the server receives any other option,
    including NBD_OPT_INFO and unsupported options, it MUST reply with
    NBD_REP_ERR_TLS_REQD"; NBD_OPT_EXPORT_NAME "cannot error, it MUST
    terminate the session"."""
    if option == NBD_OPT_EXPORT_NAME:
        raise RemoteProtocolError("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, but this "
                                  "server requires TLS")
    return BadOption(option, NBD_REP_ERR_TLS_REQD,
                     "this server requires TLS: send NBD_OPT_STARTTLS first")


def _check_string(text: str, what: str) -> bytes:
    """Encode a string the application gives us, enforcing "Conventions"."""
    raw = text.encode("utf-8")
    if len(raw) > NBD_MAX_STRING_SIZE or b"\x00" in raw:
        raise LocalProtocolError(f"{what} {text!r} is not a valid NBD string "
                                 f"(at most 4096 UTF-8 bytes, no NUL)")
    return raw


class ServerConnection:
    """Server side of one NBD connection (fixed newstyle handshake, then transmission).

    ``max_payload`` caps the length of one WRITE payload; a longer WRITE is a
    ``RemoteProtocolError`` (its payload cannot be skipped without buffering
    it).  The spec asks servers not to treat lengths below 2^25 as a denial of
    service, hence the 32 MiB default.  ``buffer_size`` is the initial receive
    buffer size.  ``tls`` is "off", "allow" or "require" (module docstring).
    """

    __slots__ = (
        "_buf", "_view", "_start", "_end", "_want", "_eof", "_state", "_pending", "_closed",
        "_error", "_no_zeroes", "_structured", "_meta_export", "_meta_contexts", "_export",
        "_tflags", "_allowed", "_max_payload", "_tls", "_tls_required",
    )

    def __init__(self, *, max_payload: int = NBD_MAX_DOS_SAFE_PAYLOAD,
                 buffer_size: int = 256 * 1024,
                 tls: Literal["off", "allow", "require"] = "off") -> None:
        if max_payload < 1 or buffer_size < 1:
            raise ValueError("max_payload and buffer_size must be positive")
        if tls not in ("off", "allow", "require"):
            raise ValueError(f"tls must be 'off', 'allow' or 'require', not {tls!r}")
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        #: Bytes (from ``_start``) the parser needs to complete the current message.
        self._want = 0
        self._eof = False
        self._state = _CLIENT_FLAGS
        self._pending: Event | None = None
        self._closed: ConnectionClosed | None = None
        self._error: RemoteProtocolError | None = None
        self._no_zeroes = False
        self._structured = False
        #: Export name of the last NBD_OPT_SET_META_CONTEXT, and the contexts it set.
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}
        self._export: ExportInfo | None = None
        self._tflags = 0
        self._allowed: tuple[int, ...] = ()
        self._max_payload = max_payload
        self._tls: TlsState = "off" if tls == "off" else "offered"
        self._tls_required = tls == "require"

    # --- Introspection ---------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def structured_replies(self) -> bool:
        """Whether NBD_OPT_STRUCTURED_REPLY was acknowledged."""
        return self._structured

    @property
    def no_zeroes(self) -> bool:
        """Whether the client set NBD_FLAG_C_NO_ZEROES."""
        return self._no_zeroes

    @property
    def export(self) -> ExportInfo | None:
        """The export in use, once transmission has started."""
        return self._export

    @property
    def transmission_flags(self) -> int:
        """The transmission flags sent for the export (0 before transmission)."""
        return self._tflags

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        """Context id -> name of the metadata contexts usable with BLOCK_STATUS.

        Before transmission: those set by the last NBD_OPT_SET_META_CONTEXT.
        In transmission: empty unless that option named the export entered.
        """
        return MappingProxyType(self._meta_contexts)

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def tls_active(self) -> bool:
        """Whether ``reply_starttls()`` was called: every byte since goes through TLS."""
        return self._tls == "active"

    # --- Bytes in --------------------------------------------------------------------

    def greeting(self) -> bytes:
        """The server's first bytes: NBDMAGIC, IHAVEOPT, handshake flags."""
        return _GREETING

    def get_buffer(self, min_size: int = 65536) -> memoryview:
        """Writable space at the end of the receive buffer, at least ``min_size`` bytes.

        Also large enough for the rest of a partially received message.  Fill
        a prefix of it (``sock.recv_into(view)``) and call
        ``buffer_updated(n)``.  Invalidates earlier ``Write.payload`` views.
        """
        self._reserve(max(min_size, self._want - (self._end - self._start), 1))
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes were written at the start of the last ``get_buffer()`` view.

        ``0`` means end of stream (what ``recv_into`` returns at EOF).
        """
        if nbytes == 0:
            self._eof = True
            return
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise LocalProtocolError(f"buffer_updated({nbytes}) does not fit the buffer "
                                     f"returned by get_buffer()")
        if self._state is _CLOSED or self._state is _ERROR:
            return  # nobody will parse it: drop
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the receive buffer; ``b""`` means end of stream.

        Invalidates earlier ``Write.payload`` views.
        """
        n = len(data)
        if n == 0:
            self._eof = True
            return
        if self._state is _CLOSED or self._state is _ERROR:
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        self._reserve(n)
        end = self._end
        self._view[end:end + n] = data
        self._end = end + n

    def _reserve(self, n: int) -> None:
        """Make ``buf[end:]`` at least ``n`` bytes long (rewind, compact or grow)."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = start = end = 0
        size = len(self._buf)
        if size - end >= n:
            return
        unread = end - start
        if size - unread >= n:
            # Compact: one memmove (memoryview assignment handles the overlap).
            self._view[0:unread] = self._view[start:end]
        else:
            # Grow into a new buffer; views held by events keep the old one alive.
            new = bytearray(max(2 * size, unread + n))
            new[0:unread] = self._view[start:end]
            self._buf = new
            self._view = memoryview(new)
        self._start = 0
        self._end = unread

    # --- Events out ------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA`` if no complete message is buffered.

        Raises ``RemoteProtocolError`` if the peer broke the protocol (and on
        every later call), ``LocalProtocolError`` if an option still awaits
        its reply.
        """
        try:
            state = self._state
            if state is _TRANSMISSION:
                return self._next_request()
            if state is _OPTIONS:
                return self._next_option()
            if state is _CLIENT_FLAGS:
                return self._next_client_flags()
            if state is _CLOSED:
                assert self._closed is not None
                return self._closed
            if state is _OPTION_PENDING:
                raise LocalProtocolError(f"answer {self._pending!r} before asking for the "
                                         f"next event")
            assert self._error is not None
            raise self._error
        except RemoteProtocolError as exc:
            self._state = _ERROR
            self._error = exc
            raise

    def _need(self, total: int) -> NeedData | ConnectionClosed:
        """No complete message: ask for more, or end at EOF."""
        self._want = total
        if not self._eof:
            return NEED_DATA
        if self._end == self._start:
            return self._close("eof")
        raise RemoteProtocolError(f"peer closed the connection mid-message "
                                  f"({self._end - self._start} of {total} bytes received)")

    def _close(self, reason: Literal["disconnect", "abort", "eof"]) -> ConnectionClosed:
        event = ConnectionClosed(reason)
        self._closed = event
        self._pending = None
        self._state = _CLOSED
        self._start = self._end = 0
        return event

    def _next_client_flags(self) -> Event | NeedData:
        # C: 32 bits, client flags.  "the server MUST drop the TCP connection if
        # the client sets an unknown flag"; only fixed newstyle is served.
        if self._end - self._start < CLIENT_FLAGS.size:
            return self._need(CLIENT_FLAGS.size)
        (flags,) = CLIENT_FLAGS.unpack_from(self._buf, self._start)
        self._start += CLIENT_FLAGS.size
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise RemoteProtocolError(f"unknown client flags 0x{flags:08x}")
        if not flags & NBD_FLAG_C_FIXED_NEWSTYLE:
            raise RemoteProtocolError("client did not set NBD_FLAG_C_FIXED_NEWSTYLE; "
                                      "only fixed newstyle negotiation is supported")
        self._no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self._state = _OPTIONS
        return self._next_option()

    def _next_option(self) -> Event | NeedData:
        start = self._start
        avail = self._end - start
        if avail < OPTION_HEADER.size:
            return self._need(OPTION_HEADER.size)
        magic, option, length = OPTION_HEADER.unpack_from(self._buf, start)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic 0x{magic:016x}")
        if length > MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option {option} data length {length} exceeds "
                                      f"{MAX_OPTION_LENGTH}")
        total = OPTION_HEADER.size + length
        if avail < total:
            return self._need(total)
        data = bytes(self._view[start + OPTION_HEADER.size:start + total])
        self._start = start + total
        if option == NBD_OPT_SET_META_CONTEXT:
            # "Issuing this command replaces all previously-set metadata
            # contexts (including when this command fails)".
            self._meta_export = None
            self._meta_contexts = {}
        event: Event
        if (self._tls_required and self._tls == "offered" and option != NBD_OPT_STARTTLS
                and option != NBD_OPT_ABORT):
            event = _tls_refusal(option)
        else:
            event = parse_option(option, data, structured=self._structured, tls=self._tls)
        self._pending = event
        self._state = _OPTION_PENDING
        return event

    def _next_request(self) -> Event | NeedData:
        # Hot path: one unpack, a few int tests, one event.
        start = self._start
        if self._end - start < _REQUEST_SIZE:
            return self._need(_REQUEST_SIZE)
        magic, flags, command, cookie, offset, length = _unpack_request(self._buf, start)
        if magic != NBD_REQUEST_MAGIC:
            if magic == NBD_EXTENDED_REQUEST_MAGIC:
                raise RemoteProtocolError("extended request header, but extended headers "
                                          "were not negotiated")
            raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
        if command == NBD_CMD_WRITE:
            if length > self._max_payload:
                # The payload cannot be skipped without reading it all: hang up
                # ("Block size constraints": a server MAY hard-disconnect on a
                # payload large enough to be a denial of service).
                raise RemoteProtocolError(f"NBD_CMD_WRITE payload of {length} bytes exceeds "
                                          f"the limit of {self._max_payload}")
            end = start + _REQUEST_SIZE + length
            if end > self._end:
                return self._need(_REQUEST_SIZE + length)
            self._start = end
            if flags & ~self._allowed[NBD_CMD_WRITE]:
                return self._reject(cookie, offset, length, flags, command)
            return Write(cookie, offset, length, flags, self._view[start + _REQUEST_SIZE:end])
        self._start = start + _REQUEST_SIZE
        if command >= COMMAND_SLOTS:
            # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
            return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                                   f"unknown {_command_name(command)}")
        if command == NBD_CMD_DISC:
            return self._close("disconnect")
        if flags & ~self._allowed[command]:
            return self._reject(cookie, offset, length, flags, command)
        if command == NBD_CMD_BLOCK_STATUS and not self._meta_contexts:
            # "Servers SHOULD reply with NBD_EINVAL to clients sending
            # NBD_CMD_BLOCK_STATUS without selecting at least one metadata context."
            return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                                   "NBD_CMD_BLOCK_STATUS without a metadata context")
        if command == NBD_CMD_FLUSH and (offset or length):
            # "For a flush request, length and offset are reserved, and MUST be
            # set to all-zero."
            return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                                   "NBD_CMD_FLUSH with nonzero offset or length")
        request: Request = _REQUEST_TYPES[command](cookie, offset, length, flags)
        return request

    def _reject(self, cookie: int, offset: int, length: int, flags: int,
                command: int) -> RejectedRequest:
        # "The server SHOULD return NBD_EINVAL if it receives an unknown command
        # flag [or] a flag not explicitly documented as applicable".
        bad = flags & ~self._allowed[command]
        return RejectedRequest(cookie, offset, length, flags, command, errno.EINVAL,
                               f"flags 0x{bad:04x} not allowed for {_command_name(command)}")

    # --- Handshake answers -----------------------------------------------------------

    def _take_pending(self, kinds: tuple[type[Event], ...], method: str) -> Event:
        event = self._pending
        if self._state is not _OPTION_PENDING or not isinstance(event, kinds):
            raise LocalProtocolError(f"{method}() does not answer the pending option "
                                     f"({event!r}, state {self._state.name})")
        return event

    def _answered(self) -> None:
        self._pending = None
        self._state = _OPTIONS

    def reply_export(self, info: ExportInfo) -> bytes:
        """Accept ``OptExportName``, ``OptGo`` or ``OptInfo`` with this export.

        GO and EXPORT_NAME enter transmission; INFO stays in the handshake.
        """
        event = self._take_pending((OptExportName, OptGo, OptInfo), "reply_export")
        if (info.max_block_size != NBD_MAX_BLOCK_SIZE_UNLIMITED
                and info.max_block_size > self._max_payload):
            raise LocalProtocolError(f"max_block_size {info.max_block_size} exceeds this "
                                     f"connection's max_payload {self._max_payload}")
        flags = transmission_flags(info, structured_replies=self._structured)
        if isinstance(event, OptExportName):
            data = encode_export_name_reply(info.size, flags, no_zeroes=self._no_zeroes)
            self._enter_transmission(event.export_name, info, flags)
            return data
        assert isinstance(event, (OptGo, OptInfo))
        data = encode_info_replies(event.option, info, flags, event.info_requests)
        if isinstance(event, OptGo):
            self._enter_transmission(event.export_name, info, flags)
        else:
            self._answered()
        return data

    def _enter_transmission(self, export_name: str, info: ExportInfo, flags: int) -> None:
        # BLOCK_STATUS needs the last SET_META_CONTEXT to have named "the same
        # export name that was ultimately selected for transmission phase".
        if self._meta_export != export_name:
            self._meta_contexts = {}
        self._export = info
        self._tflags = flags
        self._allowed = allowed_flags_table(flags)
        self._pending = None
        self._state = _TRANSMISSION

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> bytes:
        """Answer ``OptList`` with (name, description) pairs (description may be "")."""
        self._take_pending((OptList,), "reply_list")
        encoded = [(_check_string(name, "export name"),
                    _check_string(description, "export description"))
                   for name, description in exports]
        self._answered()
        return encode_server_replies(encoded)

    def reply_meta_contexts(self, names: Iterable[str]) -> bytes:
        """Answer ``OptListMetaContext`` / ``OptSetMetaContext`` with the context names.

        For SET the codec numbers the contexts 1, 2, ... (duplicates dropped)
        and remembers them; for LIST the ids are 0 ("reserved and SHOULD be
        set to zero").
        """
        event = self._take_pending((OptListMetaContext, OptSetMetaContext),
                                   "reply_meta_contexts")
        assert isinstance(event, (OptListMetaContext, OptSetMetaContext))
        unique: dict[str, bytes] = {}
        for name in names:
            raw = _check_string(name, "metadata context name")
            # "The name MUST consist of a namespace, followed by a colon, followed
            # by a leaf-name.  The namespace must consist entirely of printable
            # non-whitespace UTF-8 characters other than colons, and be non-empty."
            namespace, colon, _ = name.partition(":")
            if (not colon or not namespace or not namespace.isprintable()
                    or any(c.isspace() for c in namespace)):
                raise LocalProtocolError(f"metadata context name {name!r} is not "
                                         f"'namespace:leaf'")
            unique.setdefault(name, raw)
        if isinstance(event, OptSetMetaContext):
            self._meta_contexts = {i: name for i, name in enumerate(unique, 1)}
            self._meta_export = event.export_name
            data = encode_meta_context_replies(
                event.option, ((i, unique[name]) for i, name in self._meta_contexts.items()))
        else:
            data = encode_meta_context_replies(event.option, ((0, raw) for raw in unique.values()))
        self._answered()
        return data

    def reply_ack(self) -> bytes:
        """Answer ``OptStructuredReply`` (enables structured replies) or ``OptAbort``."""
        event = self._take_pending((OptStructuredReply, OptAbort), "reply_ack")
        assert isinstance(event, (OptStructuredReply, OptAbort))
        data = option_reply(event.option, NBD_REP_ACK)
        if isinstance(event, OptAbort):
            self._close("abort")
        else:
            self._structured = True
            self._answered()
        return data

    def reply_starttls(self) -> bytes:
        """Accept ``OptStartTls``: the NBD_REP_ACK to send in the clear; then TLS.

        Negotiation starts over (structured replies and metadata contexts are
        forgotten).  Raises ``RemoteProtocolError`` if bytes sent after the
        option are already buffered (see the module docstring).
        """
        self._take_pending((OptStartTls,), "reply_starttls")
        if self._end != self._start:
            exc = RemoteProtocolError(f"{self._end - self._start} bytes sent after "
                                      f"NBD_OPT_STARTTLS, before its reply")
            self._pending = None
            self._state = _ERROR
            self._error = exc
            raise exc
        self._tls = "active"
        self._structured = False
        self._meta_export = None
        self._meta_contexts = {}
        self._answered()
        return option_reply(NBD_OPT_STARTTLS, NBD_REP_ACK)

    def reply_option_error(self, error: int, message: str = "") -> bytes:
        """Refuse the pending option with an NBD_REP_ERR_* value; the handshake goes on.

        Not for NBD_OPT_EXPORT_NAME (it has no error reply: close the
        connection instead) nor NBD_OPT_ABORT (which MUST be acknowledged).
        """
        event = self._take_pending((OptionEvent, BadOption), "reply_option_error")
        assert isinstance(event, (OptionEvent, BadOption))
        if isinstance(event, (OptExportName, OptAbort)):
            raise LocalProtocolError(f"{type(event).__name__} cannot be refused with an "
                                     f"error reply")
        if not error & NBD_REP_FLAG_ERROR or error > 0xFFFFFFFF:
            raise LocalProtocolError(f"0x{error:x} is not an NBD_REP_ERR_* value")
        self._answered()
        return encode_option_error(event.option, error, message)

    # --- Transmission answers --------------------------------------------------------

    def _check_transmission(self) -> None:
        # Replies stay possible after NBD_CMD_DISC: "The server MUST handle all
        # outstanding requests" before closing.
        if self._export is None:
            raise LocalProtocolError("no request can be answered before transmission")

    def reply_ok(self, request: Request) -> bytes:
        """Success without data: a simple reply (allowed for every command but
        READ, whether or not structured replies were negotiated)."""
        self._check_transmission()
        if isinstance(request, (Read, BlockStatus, RejectedRequest)):
            raise LocalProtocolError(f"reply_ok() cannot answer {type(request).__name__}; use "
                                     f"reply_read/reply_block_status/reply_error")
        return simple_reply(request.cookie)

    def reply_error(self, request: Request, error: int, message: str = "") -> bytes:
        """Fail ``request`` with host errno ``error`` (mapped to an NBD error).

        A structured NBD_REPLY_TYPE_ERROR chunk (with ``message``) when
        structured replies were negotiated -- the spec "SHOULD prefer" it and
        requires it for READ -- else a simple reply (the message is dropped).
        """
        self._check_transmission()
        if error == 0:
            raise LocalProtocolError("reply_error() needs a nonzero errno")
        nbd_error = nbd_error_from_errno(error)
        if self._structured:
            return error_chunk(request.cookie, nbd_error, message)
        return simple_reply(request.cookie, nbd_error)

    def reply_error_at(self, request: Request, error: int, offset: int, message: str = "",
                       *, done: bool = True) -> bytes:
        """NBD_REPLY_TYPE_ERROR_OFFSET: ``request`` failed at ``offset`` (structured only).

        With ``done=False`` more chunks must follow (e.g. ``reply_done``).
        """
        self._check_transmission()
        if not self._structured:
            raise LocalProtocolError("error offsets need structured replies")
        if not isinstance(request, (Read, Write, Trim, Cache, WriteZeroes, BlockStatus)):
            raise LocalProtocolError(f"NBD_REPLY_TYPE_ERROR_OFFSET is not valid for "
                                     f"{type(request).__name__}")
        if error == 0:
            raise LocalProtocolError("reply_error_at() needs a nonzero errno")
        if not request.offset <= offset < request.offset + request.length:
            raise LocalProtocolError(f"error offset {offset} outside the request")
        return error_offset_chunk(request.cookie, nbd_error_from_errno(error), offset, message,
                                  done=done)

    def reply_done(self, request: Request) -> bytes:
        """NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: ends a structured reply."""
        self._check_transmission()
        if not self._structured:
            raise LocalProtocolError("reply_done() needs structured replies")
        if isinstance(request, RejectedRequest):
            raise LocalProtocolError("a RejectedRequest is answered with reply_error()")
        return none_chunk(request.cookie)

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
        self._check_transmission()
        if not isinstance(request, Read):
            raise LocalProtocolError(f"reply_read() cannot answer {type(request).__name__}")
        structured = self._structured
        df = request.flags & NBD_CMD_FLAG_DF
        if not done and (not structured or df):
            raise LocalProtocolError("a partial read reply needs structured replies and no DF")
        pos = request.offset
        end = pos + request.length
        total = 0
        for offset, length, data in pieces:
            if offset < pos or (done and offset > pos):
                raise LocalProtocolError("read pieces must be in order, must not overlap "
                                         "and (with done=True) must leave no gap")
            if length <= 0 or offset + length > end:
                raise LocalProtocolError(f"read piece ({offset}, {length}) is empty or "
                                         f"outside the request")
            if length > MAX_CHUNK_DATA:
                raise LocalProtocolError(f"read piece of {length} bytes does not fit one chunk")
            if data is not None and len(data) != length:
                raise LocalProtocolError(f"read piece data is {len(data)} bytes, "
                                         f"expected {length}")
            pos = offset + length
            total += length
        if done and pos != end:
            raise LocalProtocolError("read pieces do not cover the request")
        cookie = request.cookie
        out: list[BytesLike]
        if not structured:
            out = [simple_reply(cookie)]
            for _, length, data in pieces:
                if data is None:
                    out.extend(zeroes(length))
                else:
                    out.append(data)
            return out
        if not pieces:
            return [none_chunk(cookie)] if done else []
        if df:
            if len(pieces) == 1 and pieces[0][2] is None:
                return [offset_hole_chunk(cookie, request.offset, total, done=True)]
            if total > MAX_CHUNK_DATA:
                raise LocalProtocolError("a DF read this large cannot be one chunk; "
                                         "reply EOVERFLOW instead")
            out = [offset_data_head(cookie, request.offset, total, done=True)]
            for _, length, data in pieces:
                if data is None:
                    out.extend(zeroes(length))
                else:
                    out.append(data)
            return out
        out = []
        last = len(pieces) - 1
        for i, (offset, length, data) in enumerate(pieces):
            final = done and i == last
            if data is None:
                out.append(offset_hole_chunk(cookie, offset, length, done=final))
            else:
                out.append(offset_data_head(cookie, offset, length, done=final))
                out.append(data)
        return out

    def reply_block_status(self, request: Request,
                           extents: Mapping[int, Sequence[tuple[int, int]]]) -> bytes:
        """Answer a ``BlockStatus`` with ``{context_id: [(length, flags), ...]}``.

        Exactly one entry per context in ``meta_contexts`` ("exactly one
        status chunk per negotiated metadata context ID").  The codec trims
        each list to what the spec allows: with REQ_ONE the first extent,
        clamped to the request length; otherwise extents up to the first one
        that reaches the request length.
        """
        self._check_transmission()
        if not isinstance(request, BlockStatus):
            raise LocalProtocolError(f"reply_block_status() cannot answer "
                                     f"{type(request).__name__}")
        contexts = self._meta_contexts
        if (not extents or len(extents) != len(contexts)
                or any(ctx not in contexts for ctx in extents)):
            raise LocalProtocolError(f"block status needs exactly the contexts "
                                     f"{sorted(contexts)}, got {sorted(extents)}")
        req_one = request.flags & NBD_CMD_FLAG_REQ_ONE
        limit = request.length
        chunks = []
        last = len(extents) - 1
        for i, (ctx, ctx_extents) in enumerate(extents.items()):
            selected: list[tuple[int, int]] = []
            covered = 0
            for length, status in ctx_extents:
                if not 0 < length <= 0xFFFFFFFF or not 0 <= status <= 0xFFFFFFFF:
                    raise LocalProtocolError(f"bad extent ({length}, {status})")
                if req_one:
                    selected.append((min(length, limit), status))
                    break
                selected.append((length, status))
                covered += length
                if covered >= limit:
                    break
            if not selected or selected[0][0] == 0:
                raise LocalProtocolError(f"context {ctx}: at least one nonempty extent needed")
            chunks.append(block_status_chunk(request.cookie, ctx, selected, done=i == last))
        return b"".join(chunks)
