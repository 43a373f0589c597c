"""STARTTLS in the codec: NOTLS / SELECTIVETLS / FORCEDTLS replies, and the restart of
negotiation after the upgrade (the encryption itself belongs to the transport)."""

from __future__ import annotations

import pytest
from nbd_client import (
    C_FIXED,
    C_NO_ZEROES,
    OPT_ABORT,
    OPT_EXPORT_NAME,
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
    REP_ERR_TLS_REQD,
    answer,
    client_flags,
    go_data,
    meta_data,
    option,
    parse_info,
    parse_option_replies,
)

from jsnap.nbd import (
    BadOption,
    ConnectionClosed,
    LocalProtocolError,
    OptAbort,
    OptGo,
    OptList,
    OptStartTls,
    RemoteProtocolError,
    ServerConnection,
    State,
)

F_SEND_DF = 1 << 7


def fresh(tls: str) -> ServerConnection:
    conn = ServerConnection(tls=tls)  # type: ignore[arg-type]
    conn.receive_data(client_flags(C_FIXED | C_NO_ZEROES))
    return conn


def start_tls(conn: ServerConnection) -> None:
    conn.receive_data(option(OPT_STARTTLS))
    assert conn.next_event() == OptStartTls()
    replies = parse_option_replies(conn.reply_starttls())
    assert [(r.option, r.type, r.payload) for r in replies] == [(OPT_STARTTLS, REP_ACK, b"")]
    assert conn.tls_active
    assert conn.state is State.OPTIONS


def test_tls_mode_must_be_known() -> None:
    with pytest.raises(ValueError, match="tls must be"):
        ServerConnection(tls="maybe")  # type: ignore[arg-type]


def test_tls_off_refuses_starttls_with_policy_and_goes_on() -> None:
    conn = fresh("off")
    conn.receive_data(option(OPT_STARTTLS) + option(OPT_LIST))
    ev = conn.next_event()
    assert isinstance(ev, BadOption) and ev.error == REP_ERR_POLICY
    conn.reply_option_error(ev.error, ev.message)
    assert conn.next_event() == OptList()
    assert not conn.tls_active


@pytest.mark.parametrize("opt", [OPT_LIST, OPT_GO, OPT_INFO, OPT_SR, OPT_LIST_META,
                                 OPT_SET_META, OPT_PEEK, 0x1234])
def test_tls_require_refuses_every_option_before_starttls(opt: int) -> None:
    """FORCEDTLS: the application never even sees these options before TLS, so nothing
    about the exports can leak; malformed and unknown options get TLS_REQD too."""
    conn = fresh("require")
    data = {OPT_GO: go_data("disk"), OPT_INFO: go_data("disk"),
            OPT_LIST_META: meta_data("disk"), OPT_SET_META: meta_data("disk")}.get(opt, b"x")
    conn.receive_data(option(opt, data))
    ev = conn.next_event()
    assert isinstance(ev, BadOption)
    assert (ev.option, ev.error) == (opt, REP_ERR_TLS_REQD)
    replies = parse_option_replies(conn.reply_option_error(ev.error, ev.message))
    assert [(r.option, r.type) for r in replies] == [(opt, REP_ERR_TLS_REQD)]
    # Still refused however often it is asked, until STARTTLS.
    conn.receive_data(option(OPT_LIST))
    again = conn.next_event()
    assert isinstance(again, BadOption) and again.error == REP_ERR_TLS_REQD
    conn.reply_option_error(again.error)
    start_tls(conn)
    conn.receive_data(option(OPT_LIST))
    assert conn.next_event() == OptList()


def test_tls_require_export_name_before_tls_ends_the_session() -> None:
    conn = fresh("require")
    conn.receive_data(option(OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError, match="requires TLS"):
        conn.next_event()
    assert conn.state is State.ERROR


def test_tls_require_still_acknowledges_abort() -> None:
    conn = fresh("require")
    conn.receive_data(option(OPT_ABORT))
    assert conn.next_event() == OptAbort()
    conn.reply_ack()
    assert conn.next_event() == ConnectionClosed("abort")


def test_tls_require_after_starttls_goes_into_transmission() -> None:
    conn = fresh("require")
    start_tls(conn)
    conn.receive_data(option(OPT_GO, go_data("disk")))
    assert conn.next_event() == OptGo("disk", ())
    answer(conn, OptGo("disk", ()))
    assert conn.state is State.TRANSMISSION


def test_tls_allow_serves_options_before_and_after_starttls() -> None:
    conn = fresh("allow")
    conn.receive_data(option(OPT_LIST))
    assert conn.next_event() == OptList()
    answer(conn, OptList())
    start_tls(conn)
    conn.receive_data(option(OPT_LIST))
    assert conn.next_event() == OptList()


@pytest.mark.parametrize("data", [b"", b"x"])
def test_second_starttls_is_invalid(data: bytes) -> None:
    conn = fresh("allow")
    start_tls(conn)
    conn.receive_data(option(OPT_STARTTLS, data))
    ev = conn.next_event()
    assert isinstance(ev, BadOption) and ev.error == REP_ERR_INVALID
    conn.reply_option_error(ev.error, ev.message)
    assert conn.tls_active


def test_starttls_with_data_is_invalid_before_tls() -> None:
    conn = fresh("require")
    conn.receive_data(option(OPT_STARTTLS, b"hello"))
    ev = conn.next_event()
    assert isinstance(ev, BadOption) and ev.error == REP_ERR_INVALID
    conn.reply_option_error(ev.error, ev.message)
    assert not conn.tls_active


def test_starttls_forgets_negotiation_made_in_the_clear() -> None:
    """Structured replies and metadata contexts set before STARTTLS could have been injected
    by a man in the middle: after the upgrade they are gone (spec, NBD_OPT_STARTTLS)."""
    conn = fresh("allow")
    conn.receive_data(option(OPT_SR))
    answer(conn, conn.next_event())
    conn.receive_data(option(OPT_SET_META, meta_data("disk", ("base:allocation",))))
    answer(conn, conn.next_event())
    assert conn.structured_replies and conn.meta_contexts
    start_tls(conn)
    assert not conn.structured_replies
    assert not conn.meta_contexts
    conn.receive_data(option(OPT_GO, go_data("disk")))
    replies = parse_option_replies(answer(conn, conn.next_event()))
    _, (_, tflags) = parse_info(replies[0].payload)
    assert not tflags & F_SEND_DF  # DF is only offered with structured replies
    assert conn.state is State.TRANSMISSION and not conn.meta_contexts


def test_starttls_with_bytes_already_queued_behind_it_is_a_protocol_error() -> None:
    """A client must wait for the ACK; plaintext behind STARTTLS would otherwise be taken
    for data protected by TLS (the classic STARTTLS command injection)."""
    conn = fresh("require")
    conn.receive_data(option(OPT_STARTTLS) + option(OPT_GO, go_data("disk")))
    assert conn.next_event() == OptStartTls()
    with pytest.raises(RemoteProtocolError, match="after NBD_OPT_STARTTLS"):
        conn.reply_starttls()
    assert conn.state is State.ERROR and not conn.tls_active
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_starttls_may_be_refused_by_the_application() -> None:
    conn = fresh("allow")
    conn.receive_data(option(OPT_STARTTLS))
    assert conn.next_event() == OptStartTls()
    replies = parse_option_replies(conn.reply_option_error(REP_ERR_SHUTDOWN, "stopping"))
    assert [(r.option, r.type) for r in replies] == [(OPT_STARTTLS, REP_ERR_SHUTDOWN)]
    assert not conn.tls_active


def test_reply_starttls_answers_only_starttls() -> None:
    conn = fresh("allow")
    conn.receive_data(option(OPT_LIST))
    assert conn.next_event() == OptList()
    with pytest.raises(LocalProtocolError):
        conn.reply_starttls()
