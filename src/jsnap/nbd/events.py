"""Events the server codec reports to the application.

Model (after h11): ``ServerConnection.next_event()`` turns received bytes into
one of these immutable objects, or the ``NEED_DATA`` sentinel.  Handshake
events (``Opt*``, ``BadOption``) each wait for exactly one answer from the
application through a ``reply_*`` method; transmission events (``Request``
subclasses) are answered in any order, any time later, by passing the event
back to a ``reply_*`` method -- the codec keeps no per-request state.

Invariants:

* Every event is a frozen, slotted dataclass; equality compares fields.
* ``Write.payload`` is a memoryview *into the codec's receive buffer*; it is
  valid only until the next ``get_buffer()`` / ``receive_data()`` call on the
  connection.  Copy it (``bytes(ev.payload)``) to keep it longer.
* A request the codec can already tell is wrong (unknown command, flag not
  allowed, BLOCK_STATUS without a metadata context, ...) arrives as
  ``RejectedRequest`` carrying the errno the spec asks for; the application
  answers it with ``reply_error(ev, ev.error)`` and the connection goes on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from jsnap.nbd.constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
)


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__


#: Returned by ``next_event()`` when no complete message is buffered: receive more.
NEED_DATA: _NeedData = _NeedData.NEED_DATA
NeedData = Literal[_NeedData.NEED_DATA]


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything ``next_event()`` returns besides ``NEED_DATA``."""


# --- Handshake: option events ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionEvent(Event):
    """An option the application must answer before the next event."""

    option: ClassVar[int]


@dataclass(frozen=True, slots=True)
class OptExportName(OptionEvent):
    """NBD_OPT_EXPORT_NAME: answer ``reply_export(info)``; it cannot be refused,
    so for an unknown export close the connection (spec: "MUST terminate")."""

    option: ClassVar[int] = NBD_OPT_EXPORT_NAME
    export_name: str


@dataclass(frozen=True, slots=True)
class OptInfo(OptionEvent):
    """NBD_OPT_INFO: answer ``reply_export(info)`` or ``reply_option_error(...)``
    (e.g. NBD_REP_ERR_UNKNOWN); the handshake goes on either way."""

    option: ClassVar[int] = NBD_OPT_INFO
    export_name: str
    #: NBD_INFO_* types the client asked for, in its order (unknown ones kept).
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OptGo(OptionEvent):
    """NBD_OPT_GO: as ``OptInfo``, but a successful ``reply_export`` enters transmission."""

    option: ClassVar[int] = NBD_OPT_GO
    export_name: str
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OptList(OptionEvent):
    """NBD_OPT_LIST: answer ``reply_list([(name, description), ...])`` or an error."""

    option: ClassVar[int] = NBD_OPT_LIST


@dataclass(frozen=True, slots=True)
class OptAbort(OptionEvent):
    """NBD_OPT_ABORT: answer ``reply_ack()``; then ``next_event()`` returns
    ``ConnectionClosed("abort")``."""

    option: ClassVar[int] = NBD_OPT_ABORT


@dataclass(frozen=True, slots=True)
class OptStructuredReply(OptionEvent):
    """NBD_OPT_STRUCTURED_REPLY: ``reply_ack()`` to enable, or ``reply_option_error``."""

    option: ClassVar[int] = NBD_OPT_STRUCTURED_REPLY


@dataclass(frozen=True, slots=True)
class OptStartTls(OptionEvent):
    """NBD_OPT_STARTTLS on a connection that offers TLS and has not started it: answer
    ``reply_starttls()``, send those bytes in the clear, then run the TLS handshake; every
    later byte in either direction goes through TLS.  Refusing (``reply_option_error``,
    e.g. NBD_REP_ERR_SHUTDOWN) is allowed too.  Only a ``ServerConnection`` created with
    ``tls="allow"`` or ``"require"`` produces it."""

    option: ClassVar[int] = NBD_OPT_STARTTLS


@dataclass(frozen=True, slots=True)
class OptListMetaContext(OptionEvent):
    """NBD_OPT_LIST_META_CONTEXT: resolve ``queries`` for ``export_name`` (no
    queries = everything available) and answer ``reply_meta_contexts(names)``."""

    option: ClassVar[int] = NBD_OPT_LIST_META_CONTEXT
    export_name: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OptSetMetaContext(OptionEvent):
    """NBD_OPT_SET_META_CONTEXT: resolve ``queries`` (no queries = select none)
    and answer ``reply_meta_contexts(names)``; the codec assigns the ids."""

    option: ClassVar[int] = NBD_OPT_SET_META_CONTEXT
    export_name: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BadOption(Event):
    """An option the codec already knows must fail (unsupported or malformed).

    Answer ``reply_option_error(ev.error, ev.message)`` (or another error, e.g.
    NBD_REP_ERR_SHUTDOWN); the handshake goes on.
    """

    option: int
    #: NBD_REP_ERR_* the spec asks for.
    error: int
    message: str


# --- Transmission: requests ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request(Event):
    """A transmission request; pass it back to a ``reply_*`` method to answer it.

    Each concrete subclass has a ``command`` class attribute (NBD_CMD_*);
    ``RejectedRequest`` carries the raw command number as a field instead.
    """

    #: The client's opaque 64-bit handle, echoed in every reply.
    cookie: int
    offset: int
    length: int
    #: Raw NBD_CMD_FLAG_* bits, already checked against what the command allows.
    flags: int

    @property
    def fua(self) -> bool:
        return bool(self.flags & NBD_CMD_FLAG_FUA)


@dataclass(frozen=True, slots=True)
class Read(Request):
    command: ClassVar[int] = NBD_CMD_READ

    @property
    def df(self) -> bool:
        """NBD_CMD_FLAG_DF: the reply must use at most one content chunk."""
        return bool(self.flags & NBD_CMD_FLAG_DF)


@dataclass(frozen=True, slots=True)
class Write(Request):
    command: ClassVar[int] = NBD_CMD_WRITE
    #: ``length`` bytes, a view into the receive buffer: valid until the next
    #: ``get_buffer()`` / ``receive_data()``.  Not hashable (writable view).
    payload: memoryview = field(hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class Flush(Request):
    command: ClassVar[int] = NBD_CMD_FLUSH


@dataclass(frozen=True, slots=True)
class Trim(Request):
    command: ClassVar[int] = NBD_CMD_TRIM


@dataclass(frozen=True, slots=True)
class Cache(Request):
    command: ClassVar[int] = NBD_CMD_CACHE


@dataclass(frozen=True, slots=True)
class WriteZeroes(Request):
    command: ClassVar[int] = NBD_CMD_WRITE_ZEROES

    @property
    def no_hole(self) -> bool:
        """NBD_CMD_FLAG_NO_HOLE: the area must stay allocated."""
        return bool(self.flags & NBD_CMD_FLAG_NO_HOLE)

    @property
    def fast_zero(self) -> bool:
        """NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP unless zeroing is fast."""
        return bool(self.flags & NBD_CMD_FLAG_FAST_ZERO)


@dataclass(frozen=True, slots=True)
class BlockStatus(Request):
    command: ClassVar[int] = NBD_CMD_BLOCK_STATUS

    @property
    def req_one(self) -> bool:
        """NBD_CMD_FLAG_REQ_ONE: one extent per context, not past the request."""
        return bool(self.flags & NBD_CMD_FLAG_REQ_ONE)


@dataclass(frozen=True, slots=True)
class RejectedRequest(Request):
    """A request the codec refused; answer ``reply_error(ev, ev.error)``.

    ``command`` here is the raw command number sent by the client (it may be
    unknown); ``flags`` are the raw flags, *not* validated.  A rejected WRITE's
    payload has already been consumed and is not kept.
    """

    command: int
    #: Host errno to reply with (errno.EINVAL for everything the codec rejects).
    error: int
    reason: str


# --- End of the connection -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """No more events will come; close the socket once pending replies are sent.

    ``reason`` is ``"disconnect"`` (NBD_CMD_DISC: answer outstanding requests
    first, spec "MUST handle all outstanding requests"), ``"abort"``
    (NBD_OPT_ABORT, after the ACK) or ``"eof"`` (the peer closed the stream at
    a message boundary).
    """

    reason: Literal["disconnect", "abort", "eof"]
