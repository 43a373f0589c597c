"""The option-haggling phase of a connection: ``Negotiation``, from the client flags to an export.

Model: ``Negotiation`` reads the client flags, then one option at a time, from the
connection's ``ReceiveBuffer``; ``handshake.parse_option`` turns each option into an event,
which waits for exactly one answer from the application (a ``reply_*`` method) before the
next option is read.  It owns what the handshake has settled so far (NO_ZEROES, structured
replies, the metadata contexts, TLS).  ``reply_export`` for NBD_OPT_GO or NBD_OPT_EXPORT_NAME
ends it: it returns, with the reply bytes, an ``Agreement`` -- the export, its transmission
flags, structured replies, the metadata contexts set for that export -- which is all the
transmission phase is told.

Steps (``state`` while the handshake runs; the whole diagram is in ``connection.py``)::

    CLIENT_FLAGS --flags--> OPTIONS --option--> OPTION_PENDING --reply_*--> OPTIONS
                                                      |  reply_export (GO, EXPORT_NAME)
                                                      v
                                                TRANSMISSION (the Agreement is handed over)

TLS (``tls=``; the codec never encrypts, the transport does):

* ``"off"`` (the spec's NOTLS): NBD_OPT_STARTTLS gets NBD_REP_ERR_POLICY.
* ``"allow"`` (SELECTIVETLS): every option works before TLS; STARTTLS is offered.
* ``"require"`` (FORCEDTLS): before TLS every option but STARTTLS and ABORT is refused with
  NBD_REP_ERR_TLS_REQD *here*, so the application never sees a GO, LIST or INFO it could
  leak an answer to; NBD_OPT_EXPORT_NAME, which cannot be refused, ends the connection
  (``RemoteProtocolError``).

STARTTLS arrives as ``OptStartTls``; ``reply_starttls()`` returns the ACK and starts
negotiation over.  Bytes the client sent after STARTTLS, before its reply, are a protocol
violation (they would be plaintext taken for TLS-protected data): ``reply_starttls`` raises
``RemoteProtocolError``.  The transport sends the ACK in the clear, runs the TLS handshake, and
from then on feeds decrypted bytes to the same connection.

Invariants:

1. At most one option is pending: ``_pending`` is set exactly in OPTION_PENDING, and no
   option is read until it is answered.
2. STARTTLS forgets structured replies and metadata contexts negotiated in the clear (spec:
   "the server MUST NOT preserve any negotiation state"), so a man in the middle cannot
   inject them.
3. NBD_OPT_SET_META_CONTEXT replaces the contexts even when it fails; they reach the
   ``Agreement`` only if they were set for the export entered.
4. ``state`` is the connection's ``State``: the step above, unless the stream has ended (the
   buffer's ``closed`` / ``error``, in either phase), which wins.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from jsnap.nbd.buffer import ReceiveBuffer
from jsnap.nbd.constants import (
    IHAVEOPT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_MAX_BLOCK_SIZE_UNLIMITED,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_REP_ACK,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_FLAG_ERROR,
    NBDMAGIC,
)
from jsnap.nbd.errors import LocalProtocolError, RemoteProtocolError
from jsnap.nbd.events import (
    BadOption,
    Event,
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
from jsnap.nbd.wire import CLIENT_FLAGS, GREETING, OPTION_HEADER, option_reply

#: Handshake flags this server sends ("Handshake flags").
HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
_KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
#: The server's first bytes, a constant: fixed newstyle only.
GREETING_BYTES = GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS)


class State(enum.Enum):
    """Where the connection is; see ``connection.py`` for the transitions."""

    CLIENT_FLAGS = "CLIENT_FLAGS"
    OPTIONS = "OPTIONS"
    OPTION_PENDING = "OPTION_PENDING"
    TRANSMISSION = "TRANSMISSION"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


_CLIENT_FLAGS = State.CLIENT_FLAGS
_OPTIONS = State.OPTIONS
_OPTION_PENDING = State.OPTION_PENDING
_TRANSMISSION = State.TRANSMISSION


@dataclass(frozen=True, slots=True)
class Agreement:
    """What the handshake settled for transmission: all ``Transmission`` is told."""

    export: ExportInfo
    #: The transmission flags sent for the export.
    flags: int
    structured: bool
    #: Context id -> name usable with BLOCK_STATUS: empty unless the last
    #: NBD_OPT_SET_META_CONTEXT named this export.
    meta_contexts: Mapping[int, str]


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


class Negotiation:
    """The handshake of one connection (see the module docstring).

    ``next_event`` reads from ``rx``; each ``reply_*`` answers the pending option and returns
    the bytes to send.  ``max_payload`` is the connection's WRITE limit, which an export's
    maximum block size must not exceed.
    """

    __slots__ = ("_rx", "_step", "_pending", "_max_payload", "_no_zeroes", "_structured",
                 "_meta_export", "_meta_contexts", "_tls", "_tls_required")

    def __init__(self, rx: ReceiveBuffer, *, max_payload: int,
                 tls: Literal["off", "allow", "require"]) -> None:
        self._rx = rx
        self._step = _CLIENT_FLAGS
        self._pending: Event | None = None
        self._max_payload = max_payload
        self._no_zeroes = False
        self._structured = False
        #: Export name of the last NBD_OPT_SET_META_CONTEXT, and the contexts it set.
        self._meta_export: str | None = None
        self._meta_contexts: dict[int, str] = {}
        self._tls: TlsState = "off" if tls == "off" else "offered"
        self._tls_required = tls == "require"

    # --- What has been settled -----------------------------------------------------------

    @property
    def state(self) -> State:
        rx = self._rx
        if rx.error is not None:
            return State.ERROR
        if rx.closed is not None:
            return State.CLOSED
        return self._step

    @property
    def no_zeroes(self) -> bool:
        return self._no_zeroes

    @property
    def structured(self) -> bool:
        return self._structured

    @property
    def meta_contexts(self) -> Mapping[int, str]:
        return self._meta_contexts

    @property
    def tls_active(self) -> bool:
        return self._tls == "active"

    # --- Bytes in, events out ------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next option (or ``BadOption``), ``NEED_DATA`` or ``ConnectionClosed``."""
        step = self._step
        if step is _OPTIONS:
            return self._next_option()
        if step is _CLIENT_FLAGS:
            return self._next_client_flags()
        raise LocalProtocolError(f"answer {self._pending!r} before asking for the "
                                 f"next event")

    def _next_client_flags(self) -> Event | NeedData:
        # C: 32 bits, client flags.  "the server MUST drop the TCP connection if
        # the client sets an unknown flag"; only fixed newstyle is served.
        rx = self._rx
        if rx.end - rx.start < CLIENT_FLAGS.size:
            return rx.need(CLIENT_FLAGS.size)
        (flags,) = CLIENT_FLAGS.unpack_from(rx.buf, rx.start)
        rx.start += CLIENT_FLAGS.size
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise RemoteProtocolError(f"unknown client flags 0x{flags:08x}")
        if not flags & NBD_FLAG_C_FIXED_NEWSTYLE:
            raise RemoteProtocolError("client did not set NBD_FLAG_C_FIXED_NEWSTYLE; "
                                      "only fixed newstyle negotiation is supported")
        self._no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self._step = _OPTIONS
        return self._next_option()

    def _next_option(self) -> Event | NeedData:
        rx = self._rx
        start = rx.start
        avail = rx.end - start
        if avail < OPTION_HEADER.size:
            return rx.need(OPTION_HEADER.size)
        magic, option, length = OPTION_HEADER.unpack_from(rx.buf, start)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic 0x{magic:016x}")
        if length > MAX_OPTION_LENGTH:
            raise RemoteProtocolError(f"option {option} data length {length} exceeds "
                                      f"{MAX_OPTION_LENGTH}")
        total = OPTION_HEADER.size + length
        if avail < total:
            return rx.need(total)
        data = bytes(rx.view[start + OPTION_HEADER.size:start + total])
        rx.start = start + total
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
        self._step = _OPTION_PENDING
        return event

    # --- Answers -------------------------------------------------------------------------

    def _take_pending(self, kinds: tuple[type[Event], ...], method: str) -> Event:
        event = self._pending
        # `_pending` is None outside OPTION_PENDING (invariant 1), so this is the state test too.
        if not isinstance(event, kinds):
            raise LocalProtocolError(f"{method}() does not answer the pending option "
                                     f"({event!r}, state {self.state.name})")
        return event

    def _answered(self) -> None:
        self._pending = None
        self._step = _OPTIONS

    def reply_export(self, info: ExportInfo) -> tuple[bytes, Agreement | None]:
        """The reply, and the ``Agreement`` if it ends the handshake (GO, EXPORT_NAME)."""
        event = self._take_pending((OptExportName, OptGo, OptInfo), "reply_export")
        if (info.max_block_size != NBD_MAX_BLOCK_SIZE_UNLIMITED
                and info.max_block_size > self._max_payload):
            raise LocalProtocolError(f"max_block_size {info.max_block_size} exceeds this "
                                     f"connection's max_payload {self._max_payload}")
        flags = transmission_flags(info, structured_replies=self._structured)
        if isinstance(event, OptExportName):
            data = encode_export_name_reply(info.size, flags, no_zeroes=self._no_zeroes)
            return data, self._agree(event.export_name, info, flags)
        assert isinstance(event, (OptGo, OptInfo))
        data = encode_info_replies(event.option, info, flags, event.info_requests)
        if isinstance(event, OptGo):
            return data, self._agree(event.export_name, info, flags)
        self._answered()
        return data, None

    def _agree(self, export_name: str, info: ExportInfo, flags: int) -> Agreement:
        # BLOCK_STATUS needs the last SET_META_CONTEXT to have named "the same
        # export name that was ultimately selected for transmission phase".
        contexts = self._meta_contexts if self._meta_export == export_name else {}
        self._pending = None
        self._step = _TRANSMISSION
        return Agreement(info, flags, self._structured, contexts)

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> bytes:
        self._take_pending((OptList,), "reply_list")
        encoded = [(_check_string(name, "export name"),
                    _check_string(description, "export description"))
                   for name, description in exports]
        self._answered()
        return encode_server_replies(encoded)

    def reply_meta_contexts(self, names: Iterable[str]) -> bytes:
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
        event = self._take_pending((OptStructuredReply, OptAbort), "reply_ack")
        assert isinstance(event, (OptStructuredReply, OptAbort))
        data = option_reply(event.option, NBD_REP_ACK)
        self._answered()
        if isinstance(event, OptAbort):
            self._rx.close("abort")
        else:
            self._structured = True
        return data

    def reply_starttls(self) -> bytes:
        """The ACK; raises ``RemoteProtocolError`` (recorded by the connection) if bytes
        sent after the option are already buffered."""
        self._take_pending((OptStartTls,), "reply_starttls")
        rx = self._rx
        if rx.end != rx.start:
            self._answered()  # consumed: the connection ends in ERROR
            raise RemoteProtocolError(f"{rx.end - rx.start} bytes sent after "
                                      f"NBD_OPT_STARTTLS, before its reply")
        self._tls = "active"
        self._structured = False
        self._meta_export = None
        self._meta_contexts = {}
        self._answered()
        return option_reply(NBD_OPT_STARTTLS, NBD_REP_ACK)

    def reply_option_error(self, error: int, message: str) -> bytes:
        event = self._take_pending((OptionEvent, BadOption), "reply_option_error")
        assert isinstance(event, (OptionEvent, BadOption))
        if isinstance(event, (OptExportName, OptAbort)):
            raise LocalProtocolError(f"{type(event).__name__} cannot be refused with an "
                                     f"error reply")
        if not error & NBD_REP_FLAG_ERROR or error > 0xFFFFFFFF:
            raise LocalProtocolError(f"0x{error:x} is not an NBD_REP_ERR_* value")
        self._answered()
        return encode_option_error(event.option, error, message)
