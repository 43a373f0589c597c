"""Handshake phase of the server codec: option bytes <-> events, answers <-> reply bytes."""

from __future__ import annotations

import struct

import pytest
from nbd_client import (
    C_FIXED,
    C_NO_ZEROES,
    DISK,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXT_HDR,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META,
    OPT_PEEK,
    OPT_SET_META,
    OPT_SR,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_SHUTDOWN,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META,
    REP_SERVER,
    client_flags,
    drain,
    go_data,
    meta_data,
    option,
    parse_greeting,
    parse_info,
    parse_option_replies,
)

from jsnap.nbd import (
    NEED_DATA,
    BadOption,
    ConnectionClosed,
    Event,
    ExportInfo,
    LocalProtocolError,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStructuredReply,
    RemoteProtocolError,
    ServerConnection,
    State,
    transmission_flags,
)
from jsnap.nbd.handshake import MAX_OPTION_LENGTH


def fresh(flags: int = C_FIXED | C_NO_ZEROES, *, structured: bool = False) -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(client_flags(flags))
    if structured:
        conn.receive_data(option(OPT_SR))
        assert isinstance(conn.next_event(), OptStructuredReply)
        conn.reply_ack()
    return conn


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    assert parse_greeting(ServerConnection().greeting()) == 0b11


def test_client_flags_alone_need_more_data() -> None:
    conn = ServerConnection()
    assert conn.state is State.CLIENT_FLAGS
    conn.receive_data(client_flags()[:3])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(client_flags()[3:])
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.OPTIONS
    assert conn.no_zeroes
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA"


# --- option bytes -> event ----------------------------------------------------------------

GOOD = [
    pytest.param(OPT_EXPORT_NAME, b"disk", False, OptExportName("disk"), id="export-name"),
    pytest.param(OPT_EXPORT_NAME, b"", False, OptExportName(""), id="export-name-default"),
    pytest.param(OPT_EXPORT_NAME, "d\u00efsk".encode(), False, OptExportName("d\u00efsk"),
                 id="export-name-utf8"),
    pytest.param(OPT_GO, go_data("disk"), False, OptGo("disk", ()), id="go"),
    pytest.param(OPT_GO, go_data("", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99)),
                 False, OptGo("", (1, 2, 3, 99)), id="go-info-requests-unknown-kept"),
    pytest.param(OPT_INFO, go_data("x", (INFO_BLOCK_SIZE,)), False,
                 OptInfo("x", (INFO_BLOCK_SIZE,)), id="info"),
    pytest.param(OPT_LIST, b"", False, OptList(), id="list"),
    pytest.param(OPT_ABORT, b"", False, OptAbort(), id="abort"),
    pytest.param(OPT_ABORT, b"junk", False, OptAbort(), id="abort-data-ignored"),
    pytest.param(OPT_SR, b"", False, OptStructuredReply(), id="structured-reply"),
    pytest.param(OPT_LIST_META, meta_data("disk", ("base:",)), False,
                 OptListMetaContext("disk", ("base:",)), id="list-meta-without-structured"),
    pytest.param(OPT_LIST_META, meta_data("disk"), True, OptListMetaContext("disk", ()),
                 id="list-meta-no-query"),
    pytest.param(OPT_SET_META, meta_data("disk", ("base:allocation", "qemu:dirty-bitmap:b")),
                 True, OptSetMetaContext("disk", ("base:allocation", "qemu:dirty-bitmap:b")),
                 id="set-meta"),
]


@pytest.mark.parametrize(("opt", "data", "structured", "expected"), GOOD)
def test_option_bytes_to_event(opt: int, data: bytes, structured: bool, expected: Event) -> None:
    conn = fresh(structured=structured)
    conn.receive_data(option(opt, data))
    assert conn.next_event() == expected
    assert conn.state is State.OPTION_PENDING


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


BAD = [
    pytest.param(OPT_STARTTLS, b"", False, REP_ERR_POLICY, id="starttls-without-tls"),
    pytest.param(OPT_STARTTLS, b"x", False, REP_ERR_INVALID, id="starttls-with-data"),
    pytest.param(OPT_PEEK, b"", False, REP_ERR_UNSUP, id="peek-export-unsupported"),
    pytest.param(OPT_EXT_HDR, b"", True, REP_ERR_UNSUP, id="extended-headers-unsupported"),
    pytest.param(0x1234, b"xyz", False, REP_ERR_UNSUP, id="unknown-option"),
    pytest.param(OPT_LIST, b"x", False, REP_ERR_INVALID, id="list-with-data"),
    pytest.param(OPT_SR, b"x", False, REP_ERR_INVALID, id="structured-reply-with-data"),
    pytest.param(OPT_SR, b"", True, REP_ERR_INVALID, id="structured-reply-twice"),
    pytest.param(OPT_GO, b"\0\0\0\0\0", False, REP_ERR_INVALID, id="go-too-short"),
    pytest.param(OPT_GO, _u32(3) + b"ab\0\0", False, REP_ERR_INVALID, id="go-name-overruns"),
    pytest.param(OPT_GO, _u32(2) + b"\xff\xfe\0\0", False, REP_ERR_INVALID,
                 id="go-name-not-utf8"),
    pytest.param(OPT_GO, _u32(2) + b"a\0\0\0", False, REP_ERR_INVALID, id="go-name-with-nul"),
    pytest.param(OPT_GO, go_data("n" * 4097), False, REP_ERR_INVALID, id="go-name-too-long"),
    pytest.param(OPT_GO, go_data("a", (1,)) + b"\0", False, REP_ERR_INVALID,
                 id="go-count-mismatch"),
    pytest.param(OPT_INFO, go_data("a", (1, 2))[:-2], False, REP_ERR_INVALID,
                 id="info-count-overruns"),
    pytest.param(OPT_SET_META, meta_data("disk", ("base:allocation",)), False, REP_ERR_INVALID,
                 id="set-meta-before-structured"),
    pytest.param(OPT_LIST_META, b"\0" * 7, True, REP_ERR_INVALID, id="meta-too-short"),
    pytest.param(OPT_LIST_META, _u32(1) + b"\0" * 4, True, REP_ERR_INVALID,
                 id="meta-name-overruns"),
    pytest.param(OPT_LIST_META, _u32(1) + b"\xff" + _u32(0), True, REP_ERR_INVALID,
                 id="meta-name-not-utf8"),
    pytest.param(OPT_LIST_META, _u32(0) + _u32(1), True, REP_ERR_INVALID,
                 id="meta-query-count-overruns"),
    pytest.param(OPT_LIST_META, _u32(0) + _u32(1) + _u32(5) + b"a:", True, REP_ERR_INVALID,
                 id="meta-query-overruns"),
    pytest.param(OPT_LIST_META, _u32(0) + _u32(1) + _u32(2) + b"\xc3:", True, REP_ERR_INVALID,
                 id="meta-query-not-utf8"),
    pytest.param(OPT_SET_META, meta_data("disk", ("allocation",)), True, REP_ERR_INVALID,
                 id="meta-query-without-namespace"),
    pytest.param(OPT_SET_META, meta_data("disk", ("base:a",)) + b"!", True, REP_ERR_INVALID,
                 id="meta-trailing-data"),
]


@pytest.mark.parametrize(("opt", "data", "structured", "error"), BAD)
def test_bad_option_is_refused_and_handshake_goes_on(opt: int, data: bytes, structured: bool,
                                                     error: int) -> None:
    conn = fresh(structured=structured)
    conn.receive_data(option(opt, data) + option(OPT_LIST))
    ev = conn.next_event()
    assert isinstance(ev, BadOption)
    assert (ev.option, ev.error) == (opt, error)
    assert ev.message
    replies = parse_option_replies(conn.reply_option_error(ev.error, ev.message))
    assert [(r.option, r.type) for r in replies] == [(opt, error)]
    assert replies[0].payload.decode() == ev.message
    assert conn.next_event() == OptList()


# --- answers -> reply bytes ---------------------------------------------------------------


@pytest.mark.parametrize(("flags", "padding"), [
    pytest.param(C_FIXED | C_NO_ZEROES, 0, id="no-zeroes"),
    pytest.param(C_FIXED, 124, id="with-zeroes"),
])
def test_export_name_reply_and_zero_padding(flags: int, padding: int) -> None:
    conn = fresh(flags)
    conn.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    assert conn.next_event() == OptExportName("disk")
    data = conn.reply_export(DISK)
    assert len(data) == 10 + padding
    size, tflags = struct.unpack_from(">QH", data)
    assert size == DISK.size
    assert tflags == conn.transmission_flags
    assert data[10:] == bytes(padding)
    assert conn.state is State.TRANSMISSION
    assert conn.export is DISK


@pytest.mark.parametrize(("requests", "info", "expected_kinds"), [
    pytest.param((), DISK, [INFO_EXPORT, INFO_BLOCK_SIZE], id="nothing-requested"),
    pytest.param((INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77), DISK,
                 [INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION], id="all-requested"),
    pytest.param((INFO_DESCRIPTION,), ExportInfo("d", 512), [INFO_EXPORT, INFO_BLOCK_SIZE],
                 id="no-description-to-send"),
])
@pytest.mark.parametrize("opt", [OPT_GO, OPT_INFO], ids=["go", "info"])
def test_go_and_info_replies(opt: int, requests: tuple[int, ...], info: ExportInfo,
                             expected_kinds: list[int]) -> None:
    conn = fresh()
    conn.receive_data(option(opt, go_data("", requests)))
    assert isinstance(conn.next_event(), (OptGo, OptInfo))
    replies = parse_option_replies(conn.reply_export(info))
    assert all(r.option == opt for r in replies)
    assert [r.type for r in replies] == [REP_INFO] * len(expected_kinds) + [REP_ACK]
    infos = dict(parse_info(r.payload) for r in replies[:-1])
    assert list(infos) == expected_kinds
    assert infos[INFO_EXPORT] == (info.size, transmission_flags(info, structured_replies=False))
    assert infos[INFO_BLOCK_SIZE] == (info.min_block_size, info.preferred_block_size,
                                      info.max_block_size)
    if INFO_NAME in infos:
        assert infos[INFO_NAME] == (info.name,)
        assert infos[INFO_DESCRIPTION] == (info.description,)
    assert conn.state is (State.TRANSMISSION if opt == OPT_GO else State.OPTIONS)


def test_info_then_go_gives_the_same_flags() -> None:
    conn = fresh(structured=True)
    conn.receive_data(option(OPT_INFO, go_data("disk")) + option(OPT_GO, go_data("disk")))
    assert isinstance(conn.next_event(), OptInfo)
    info_replies = parse_option_replies(conn.reply_export(DISK))
    assert isinstance(conn.next_event(), OptGo)
    go_replies = parse_option_replies(conn.reply_export(DISK))
    assert [r.payload for r in info_replies] == [r.payload for r in go_replies]


def test_go_refused_then_go_again() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_GO, go_data("nope")))
    assert conn.next_event() == OptGo("nope", ())
    replies = parse_option_replies(conn.reply_option_error(REP_ERR_UNKNOWN, "no such export"))
    assert [(r.type, r.payload) for r in replies] == [(REP_ERR_UNKNOWN, b"no such export")]
    assert conn.state is State.OPTIONS
    conn.receive_data(option(OPT_GO, go_data("disk")))
    assert conn.next_event() == OptGo("disk", ())


def test_list_reply() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_LIST))
    assert conn.next_event() == OptList()
    replies = parse_option_replies(conn.reply_list([("a", ""), ("disk", "the disk")]))
    assert [(r.option, r.type) for r in replies] == [(OPT_LIST, REP_SERVER)] * 2 + [
        (OPT_LIST, REP_ACK)]
    assert replies[0].payload == struct.pack(">I", 1) + b"a"
    assert replies[1].payload == struct.pack(">I", 4) + b"diskthe disk"


@pytest.mark.parametrize(("name", "description"), [
    pytest.param("a\0b", "", id="nul-in-name"),
    pytest.param("a", "x" * 4097, id="description-too-long"),
])
def test_list_reply_rejects_bad_strings_and_keeps_state(name: str, description: str) -> None:
    conn = fresh()
    conn.receive_data(option(OPT_LIST))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.reply_list([(name, description)])
    assert conn.state is State.OPTION_PENDING
    assert parse_option_replies(conn.reply_list([]))[-1].type == REP_ACK


def test_list_meta_context_reply_uses_id_zero() -> None:
    conn = fresh(structured=True)
    conn.receive_data(option(OPT_LIST_META, meta_data("disk", ("base:", "qemu:"))))
    assert isinstance(conn.next_event(), OptListMetaContext)
    replies = parse_option_replies(conn.reply_meta_contexts(
        ["base:allocation", "qemu:dirty-bitmap:b1", "base:allocation"]))
    assert [(r.option, r.type) for r in replies] == [(OPT_LIST_META, REP_META)] * 2 + [
        (OPT_LIST_META, REP_ACK)]
    assert [r.payload for r in replies[:2]] == [
        struct.pack(">I", 0) + b"base:allocation", struct.pack(">I", 0) + b"qemu:dirty-bitmap:b1"]
    assert conn.meta_contexts == {}


def test_set_meta_context_assigns_unique_ids() -> None:
    conn = fresh(structured=True)
    conn.receive_data(option(OPT_SET_META, meta_data("disk", ("base:allocation", "qemu:x:"))))
    conn.next_event()
    replies = parse_option_replies(conn.reply_meta_contexts(
        ["base:allocation", "qemu:dirty-bitmap:b1", "base:allocation"]))
    ids = [struct.unpack_from(">I", r.payload)[0] for r in replies[:-1]]
    assert ids == [1, 2]
    assert [r.payload[4:] for r in replies[:-1]] == [b"base:allocation", b"qemu:dirty-bitmap:b1"]
    assert replies[-1].type == REP_ACK
    assert dict(conn.meta_contexts) == {1: "base:allocation", 2: "qemu:dirty-bitmap:b1"}


@pytest.mark.parametrize("name", [
    pytest.param("allocation", id="no-colon"),
    pytest.param(":allocation", id="empty-namespace"),
    pytest.param("ba se:allocation", id="space-in-namespace"),
    pytest.param("ba\x07se:x", id="unprintable-namespace"),
    pytest.param("base:" + "x" * 4096, id="too-long"),
])
def test_meta_context_names_are_checked(name: str) -> None:
    conn = fresh(structured=True)
    conn.receive_data(option(OPT_SET_META, meta_data("disk", ("base:",))))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.reply_meta_contexts([name])
    assert conn.state is State.OPTION_PENDING


def _set_meta(conn: ServerConnection, export: str, names: list[str]) -> None:
    conn.receive_data(option(OPT_SET_META, meta_data(export, ("base:allocation",))))
    assert isinstance(conn.next_event(), OptSetMetaContext)
    conn.reply_meta_contexts(names)


def _go(conn: ServerConnection, export: str) -> None:
    conn.receive_data(option(OPT_GO, go_data(export)))
    assert isinstance(conn.next_event(), OptGo)
    conn.reply_export(DISK)


def test_meta_contexts_survive_go_to_the_same_export_and_info() -> None:
    conn = fresh(structured=True)
    _set_meta(conn, "disk", ["base:allocation"])
    conn.receive_data(option(OPT_INFO, go_data("other")))
    conn.next_event()
    conn.reply_export(DISK)
    _go(conn, "disk")
    assert dict(conn.meta_contexts) == {1: "base:allocation"}


def test_meta_contexts_dropped_on_go_to_another_export() -> None:
    conn = fresh(structured=True)
    _set_meta(conn, "other", ["base:allocation"])
    _go(conn, "disk")
    assert conn.meta_contexts == {}


def test_meta_contexts_dropped_on_export_name_to_another_export() -> None:
    conn = fresh(structured=True)
    _set_meta(conn, "other", ["base:allocation"])
    conn.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    conn.next_event()
    conn.reply_export(DISK)
    assert conn.meta_contexts == {}


@pytest.mark.parametrize("second", [
    pytest.param(meta_data("disk", ("nonamespace",)), id="failed-set"),
    pytest.param(meta_data("disk", ()), id="empty-set"),
])
def test_a_later_set_meta_context_replaces_earlier_even_when_failing(second: bytes) -> None:
    conn = fresh(structured=True)
    _set_meta(conn, "disk", ["base:allocation"])
    conn.receive_data(option(OPT_SET_META, second))
    ev = conn.next_event()
    assert conn.meta_contexts == {}
    if isinstance(ev, BadOption):
        conn.reply_option_error(ev.error, ev.message)
    else:
        conn.reply_meta_contexts([])
    _go(conn, "disk")
    assert conn.meta_contexts == {}


def test_structured_reply_ack_enables_structured_replies() -> None:
    conn = fresh()
    assert not conn.structured_replies
    conn.receive_data(option(OPT_SR))
    assert conn.next_event() == OptStructuredReply()
    assert parse_option_replies(conn.reply_ack())[0].type == REP_ACK
    assert conn.structured_replies


def test_structured_reply_can_be_refused() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_SR))
    conn.next_event()
    assert parse_option_replies(conn.reply_option_error(REP_ERR_POLICY))[0].type == REP_ERR_POLICY
    assert not conn.structured_replies


def test_abort_is_acked_then_closed_and_later_bytes_ignored() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_ABORT) + option(OPT_LIST))
    assert conn.next_event() == OptAbort()
    replies = parse_option_replies(conn.reply_ack())
    assert [(r.option, r.type, r.payload) for r in replies] == [(OPT_ABORT, REP_ACK, b"")]
    assert conn.next_event() == ConnectionClosed("abort")
    conn.receive_data(b"more junk")
    conn.get_buffer(10)
    conn.buffer_updated(5)
    assert conn.next_event() == ConnectionClosed("abort")
    assert conn.state is State.CLOSED


def test_option_error_message_is_truncated_to_4096_utf8_bytes() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_LIST))
    conn.next_event()
    message = "\u00e9" * 3000  # 6000 bytes; the cut must not split a character
    payload = parse_option_replies(conn.reply_option_error(REP_ERR_SHUTDOWN, message))[0].payload
    assert payload.decode() == "\u00e9" * 2048


# --- misuse by the application -----------------------------------------------------------


def test_next_event_while_an_option_awaits_its_answer() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_LIST))
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="answer"):
        conn.next_event()


@pytest.mark.parametrize(("opt", "data", "call"), [
    pytest.param(OPT_LIST, b"", lambda c: c.reply_export(DISK), id="export-for-list"),
    pytest.param(OPT_GO, go_data("a"), lambda c: c.reply_list([]), id="list-for-go"),
    pytest.param(OPT_GO, go_data("a"), lambda c: c.reply_ack(), id="ack-for-go"),
    pytest.param(OPT_LIST, b"", lambda c: c.reply_meta_contexts([]), id="meta-for-list"),
    pytest.param(OPT_EXPORT_NAME, b"a", lambda c: c.reply_option_error(REP_ERR_UNKNOWN),
                 id="error-for-export-name"),
    pytest.param(OPT_ABORT, b"", lambda c: c.reply_option_error(REP_ERR_INVALID),
                 id="error-for-abort"),
    pytest.param(OPT_LIST, b"", lambda c: c.reply_option_error(REP_ACK), id="error-not-error"),
    pytest.param(OPT_LIST, b"", lambda c: c.reply_option_error(1 << 32 | 1 << 31),
                 id="error-too-large"),
    pytest.param(OPT_GO, go_data("a"),
                 lambda c: c.reply_export(ExportInfo("a", 1 << 30, max_block_size=64 << 20)),
                 id="max-block-size-above-max-payload"),
])
def test_wrong_answer_is_refused_and_state_kept(opt: int, data: bytes, call: object) -> None:
    conn = fresh()
    conn.receive_data(option(opt, data))
    ev = conn.next_event()
    with pytest.raises(LocalProtocolError):
        call(conn)  # type: ignore[operator]
    assert conn.state is State.OPTION_PENDING
    assert conn._neg._pending == ev  # noqa: SLF001


def test_unlimited_max_block_size_is_accepted() -> None:
    conn = fresh()
    conn.receive_data(option(OPT_GO, go_data("a")))
    conn.next_event()
    conn.reply_export(ExportInfo("a", 1 << 30, max_block_size=0xFFFFFFFF))
    assert conn.state is State.TRANSMISSION


def test_answer_without_pending_option() -> None:
    conn = fresh()
    with pytest.raises(LocalProtocolError, match="pending"):
        conn.reply_ack()


# --- peer misbehaviour -------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(client_flags(C_FIXED | 4), id="unknown-client-flag"),
    pytest.param(client_flags(C_NO_ZEROES), id="not-fixed-newstyle"),
    pytest.param(client_flags() + b"IHAVEOPX" + bytes(8), id="bad-option-magic"),
    pytest.param(client_flags() + b"IHAVEOPT" + struct.pack(">II", OPT_GO, MAX_OPTION_LENGTH + 1),
                 id="option-too-long"),
    pytest.param(client_flags() + option(OPT_EXPORT_NAME, b"a\0"), id="export-name-with-nul"),
    pytest.param(client_flags() + option(OPT_EXPORT_NAME, b"\x80"), id="export-name-not-utf8"),
])
def test_protocol_errors_are_sticky_and_later_data_ignored(data: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    assert conn.state is State.ERROR
    conn.receive_data(b"more")
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is first.value


def test_option_of_max_length_is_accepted() -> None:
    conn = fresh()
    conn.receive_data(option(0x99, bytes(MAX_OPTION_LENGTH)))
    assert isinstance(conn.next_event(), BadOption)


@pytest.mark.parametrize(("data", "outcome"), [
    pytest.param(b"", ConnectionClosed("eof"), id="before-client-flags"),
    pytest.param(client_flags(), ConnectionClosed("eof"), id="between-options"),
    pytest.param(client_flags()[:2], RemoteProtocolError, id="inside-client-flags"),
    pytest.param(client_flags() + option(OPT_GO, go_data("a"))[:20], RemoteProtocolError,
                 id="inside-option"),
])
def test_eof_during_handshake(data: bytes, outcome: object) -> None:
    conn = ServerConnection()
    conn.receive_data(data)
    conn.receive_data(b"")
    if isinstance(outcome, ConnectionClosed):
        assert drain(conn) == [outcome]
        assert conn.next_event() == outcome
    else:
        with pytest.raises(RemoteProtocolError, match="mid-message"):
            conn.next_event()


def test_full_handshake_then_options_pipelined_in_one_buffer() -> None:
    conn = ServerConnection()
    conn.receive_data(client_flags() + option(OPT_SR) + option(OPT_LIST)
                      + option(OPT_GO, go_data("disk")))
    assert conn.next_event() == OptStructuredReply()
    conn.reply_ack()
    assert conn.next_event() == OptList()
    conn.reply_list([])
    assert conn.next_event() == OptGo("disk", ())
    conn.reply_export(DISK)
    assert conn.next_event() is NEED_DATA
