"""Handshake phase: option payload parsing and option reply encoding (pure functions).

Model: ``parse_option(option, data, structured=..., tls=...)`` turns one
complete option (id + payload, already framed by ``Negotiation``) into exactly
one event.  An option the codec can already judge -- unknown or unsupported
(``NBD_REP_ERR_UNSUP``), malformed (``NBD_REP_ERR_INVALID``) -- becomes a
``BadOption`` carrying the reply the spec asks for, and the handshake goes
on ("Servers that receive messages which they do not implement MUST reply to
them with NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next message").
NBD_OPT_STARTTLS depends on ``tls`` (the connection's TLS state): refused
with NBD_REP_ERR_POLICY when the server has no TLS, NBD_REP_ERR_INVALID once
TLS is active, else ``OptStartTls``.  (FORCEDTLS refusals of the other
options happen before parsing, in ``Negotiation``.)
The encoders build the server's replies from what the application decided.

Invariants: the functions keep no state; every string handed to the
application is valid per "Conventions" (UTF-8, no NUL, <= 4096 bytes); the
only exception raised is ``RemoteProtocolError``, for NBD_OPT_EXPORT_NAME
with an unusable name (that option cannot carry an error reply, so the only
answer the spec allows is terminating the session).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from jsnap.nbd.constants import (
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    OPTION_NAMES,
)
from jsnap.nbd.errors import RemoteProtocolError
from jsnap.nbd.events import (
    BadOption,
    Event,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
)
from jsnap.nbd.export import ExportInfo
from jsnap.nbd.wire import (
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    U16,
    U32,
    decode_string,
    encode_string,
    option_reply,
)

#: Longest option payload accepted.  The largest legitimate option is a
#: NBD_OPT_{LIST,SET}_META_CONTEXT: an export name and a few queries, each a
#: string of at most 4096 bytes; 64 KiB holds a name and 15 maximal queries.
#: The whole payload is buffered before parsing, so without a cap a peer could
#: make us hold up to 4 GiB per connection; above it we hang up (the spec
#: lets a server hard-disconnect a client whose behaviour "constitutes a
#: denial of service").
MAX_OPTION_LENGTH = 64 * 1024


def _invalid(option: int, message: str) -> BadOption:
    return BadOption(option, NBD_REP_ERR_INVALID, message)


def _parse_export_name(data: bytes) -> Event:
    name = decode_string(data)
    if name is None:
        # No error reply exists for this option: "the server MUST terminate the session".
        raise RemoteProtocolError("NBD_OPT_EXPORT_NAME with an invalid export name "
                                  "(not UTF-8, contains NUL, or longer than 4096 bytes)")
    return OptExportName(name)


def _parse_leading_name(option: int, data: bytes, fixed: int) -> tuple[str, int] | BadOption:
    """The leading (32-bit length, name) of GO/INFO/meta-context data, whose fixed fields
    take `fixed` bytes in all: the name and the offset just after it, or the refusal."""
    size = len(data)
    if size < fixed:
        return _invalid(option, f"option data shorter than {fixed} bytes")
    (name_len,) = U32.unpack_from(data, 0)
    if name_len > size - fixed:
        return _invalid(option, "export name length exceeds the option data")
    name = decode_string(data[4:4 + name_len])
    if name is None:
        return _invalid(option, "export name is not a valid NBD string")
    return name, 4 + name_len


def _parse_info_or_go(option: int, data: bytes) -> Event:
    # Data: 32 bits, length of name (MUST be no larger than option length - 6);
    # String: name; 16 bits, number of information requests; 16 bits x n.
    size = len(data)
    parsed = _parse_leading_name(option, data, 6)
    if isinstance(parsed, BadOption):
        return parsed
    name, pos = parsed
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if size != pos + 2 * count:
        return _invalid(option, "information request count does not match the option length")
    requests = tuple(U16.unpack_from(data, pos + 2 * i)[0] for i in range(count))
    if option == NBD_OPT_GO:
        return OptGo(name, requests)
    return OptInfo(name, requests)


def _parse_meta_context(option: int, data: bytes, structured: bool) -> Event:
    # Data: 32 bits, length of export name; String, name; 32 bits, number of
    # queries; then per query: 32 bits, length of query; String, query.
    if option == NBD_OPT_SET_META_CONTEXT and not structured:
        # "This option MUST NOT be requested unless structured replies have been
        # negotiated first. [...] a server SHOULD send NBD_REP_ERR_INVALID."
        return _invalid(option, "structured replies must be negotiated first")
    size = len(data)
    parsed = _parse_leading_name(option, data, 8)
    if isinstance(parsed, BadOption):
        return parsed
    name, pos = parsed
    (count,) = U32.unpack_from(data, pos)
    pos += 4
    queries: list[str] = []
    # ``count`` comes from the peer: the loop is bounded by the data instead
    # (each query takes at least 4 bytes and the data is at most 64 KiB).
    while len(queries) < count:
        if pos + 4 > size:
            return _invalid(option, "query count exceeds the option data")
        (query_len,) = U32.unpack_from(data, pos)
        pos += 4
        if query_len > size - pos:
            return _invalid(option, "query length exceeds the option data")
        query = decode_string(data[pos:pos + query_len])
        pos += query_len
        if query is None:
            return _invalid(option, "query is not a valid NBD string")
        # "it MUST start with a namespace and a colon"; the server MAY refuse.
        if ":" not in query:
            return _invalid(option, f"query {query!r} has no namespace")
        queries.append(query)
    if pos != size:
        return _invalid(option, "trailing data after the last query")
    if option == NBD_OPT_SET_META_CONTEXT:
        return OptSetMetaContext(name, tuple(queries))
    return OptListMetaContext(name, tuple(queries))


def _parse_no_data(option: int, data: bytes, structured: bool) -> Event:
    # NBD_OPT_LIST and NBD_OPT_STRUCTURED_REPLY: "The client MUST NOT send any
    # additional data with the option, and the server SHOULD reject a request
    # that includes data with NBD_REP_ERR_INVALID."
    if data:
        return _invalid(option, "this option takes no data")
    if option == NBD_OPT_LIST:
        return OptList()
    if structured:
        # "The client SHOULD NOT send such messages more than once; if it does,
        # the server MAY fail the repeated message with NBD_REP_ERR_INVALID."
        return _invalid(option, "structured replies already negotiated")
    return OptStructuredReply()


#: What a connection can do about NBD_OPT_STARTTLS: "off" (the server has no TLS: the spec's
#: NOTLS mode), "offered" (TLS available, not started yet), "active" (TLS running).
TlsState = Literal["off", "offered", "active"]


def _parse_starttls(data: bytes, tls: TlsState) -> Event:
    if data:
        # "The client MUST NOT send any additional data with the option"; the
        # other no-data options are refused the same way.
        return _invalid(NBD_OPT_STARTTLS, "this option takes no data")
    if tls == "off":
        # NOTLS mode: "MUST respond with NBD_REP_ERR_POLICY (if it does not
        # support TLS for policy reasons), NBD_REP_ERR_UNSUP (if it does not
        # support the NBD_OPT_STARTTLS option at all)".  The option is known
        # here; this server was just not given a certificate: policy.
        return BadOption(NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY,
                         "TLS is not enabled on this server")
    if tls == "active":
        # "If the server receives NBD_OPT_STARTTLS when TLS has already been
        # negotiated, it MUST reply with NBD_REP_ERR_INVALID."
        return _invalid(NBD_OPT_STARTTLS, "TLS is already active")
    return OptStartTls()


def parse_option(option: int, data: bytes, *, structured: bool,
                 tls: TlsState = "off") -> Event:
    """Turn one complete option into its event (``BadOption`` if it must fail).

    ``structured`` says whether structured replies are already negotiated,
    ``tls`` where the connection stands with TLS (see ``TlsState``).
    Raises ``RemoteProtocolError`` only for an unusable NBD_OPT_EXPORT_NAME.
    """
    if option == NBD_OPT_GO or option == NBD_OPT_INFO:
        return _parse_info_or_go(option, data)
    if option == NBD_OPT_SET_META_CONTEXT or option == NBD_OPT_LIST_META_CONTEXT:
        return _parse_meta_context(option, data, structured)
    if option == NBD_OPT_LIST or option == NBD_OPT_STRUCTURED_REPLY:
        return _parse_no_data(option, data, structured)
    if option == NBD_OPT_EXPORT_NAME:
        return _parse_export_name(data)
    if option == NBD_OPT_ABORT:
        # "a server SHOULD ignore any data sent by the client rather than
        # rejecting the request as invalid."
        return OptAbort()
    if option == NBD_OPT_STARTTLS:
        return _parse_starttls(data, tls)
    # Everything else, including NBD_OPT_EXTENDED_HEADERS.
    name = OPTION_NAMES.get(option, f"option {option}")
    return BadOption(option, NBD_REP_ERR_UNSUP, f"{name} is not supported by this server")


# --- Reply encoders ----------------------------------------------------------------


def encode_export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, 124 zeroes unless NO_ZEROES."""
    head = EXPORT_NAME_REPLY.pack(size, flags)
    return head if no_zeroes else head + EXPORT_NAME_ZEROES


def encode_info_replies(option: int, info: ExportInfo, flags: int,
                        requests: tuple[int, ...]) -> bytes:
    """NBD_REP_INFO replies then NBD_REP_ACK, for NBD_OPT_INFO / NBD_OPT_GO.

    Sends NBD_INFO_EXPORT (mandatory) and NBD_INFO_BLOCK_SIZE always: the
    server advertises non-default constraints (a finite maximum), which "SHOULD
    [be advertised] via NBD_INFO_BLOCK_SIZE", and "The server MAY send
    information requests back which are not explicitly requested".  NAME and
    DESCRIPTION only when requested (DESCRIPTION only if there is one).
    """
    out = [
        option_reply(option, NBD_REP_INFO, INFO_EXPORT.pack(NBD_INFO_EXPORT, info.size, flags)),
        option_reply(option, NBD_REP_INFO, INFO_BLOCK_SIZE.pack(
            NBD_INFO_BLOCK_SIZE, info.min_block_size, info.preferred_block_size,
            info.max_block_size)),
    ]
    if NBD_INFO_NAME in requests:
        out.append(option_reply(option, NBD_REP_INFO,
                                INFO_TYPE.pack(NBD_INFO_NAME) + info.name.encode("utf-8")))
    if NBD_INFO_DESCRIPTION in requests and info.description:
        out.append(option_reply(option, NBD_REP_INFO, INFO_TYPE.pack(NBD_INFO_DESCRIPTION)
                                + info.description.encode("utf-8")))
    out.append(option_reply(option, NBD_REP_ACK))
    return b"".join(out)


def encode_server_replies(exports: Iterable[tuple[bytes, bytes]]) -> bytes:
    """NBD_REP_SERVER per (encoded name, encoded description), then NBD_REP_ACK.

    Payload: 32 bits, length of name; String, name; the rest, a description
    "suitable for direct display to a human being".
    """
    out = []
    for raw_name, raw_desc in exports:
        out.append(option_reply(NBD_OPT_LIST, NBD_REP_SERVER,
                                U32.pack(len(raw_name)) + raw_name + raw_desc))
    out.append(option_reply(NBD_OPT_LIST, NBD_REP_ACK))
    return b"".join(out)


def encode_meta_context_replies(option: int, contexts: Iterable[tuple[int, bytes]]) -> bytes:
    """NBD_REP_META_CONTEXT per (id, encoded name), then NBD_REP_ACK."""
    out = [option_reply(option, NBD_REP_META_CONTEXT, U32.pack(ctx_id) + name)
           for ctx_id, name in contexts]
    out.append(option_reply(option, NBD_REP_ACK))
    return b"".join(out)


def encode_option_error(option: int, error: int, message: str) -> bytes:
    """An error reply; "All error replies MAY have some data set, [...] an error
    message string suitable for display to the user"."""
    return option_reply(option, error, encode_string(message))
