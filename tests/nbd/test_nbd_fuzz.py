"""Property tests: arbitrary bytes never crash the codec, whatever the feeding style.

A fresh ServerConnection is fed arbitrary (or semi-structured) client bytes in
three styles -- all at once, in random chunks through get_buffer/buffer_updated,
one byte at a time -- while a fixed application answers every event.  Only
RemoteProtocolError may escape, and all three styles must produce the same
events and end the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_client import (
    CMD_BLOCK_STATUS,
    CMD_WRITE,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_EXT_HDR,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META,
    OPT_SET_META,
    OPT_SR,
    OPT_STARTTLS,
    REP_ERR_POLICY,
    answer,
    client_flags,
    go_data,
    meta_data,
    option,
    request,
    snapshot,
)

from jsnap.nbd import (
    NEED_DATA,
    BlockStatus,
    ConnectionClosed,
    Event,
    ExportInfo,
    OptStartTls,
    Read,
    RejectedRequest,
    RemoteProtocolError,
    Request,
    ServerConnection,
    validate_request,
)

MAX_PAYLOAD = 64 * 1024  # small, so random WRITE headers do not make huge buffers
EXPORT = ExportInfo("disk", 1 << 20, can_flush=True, can_fua=True, can_trim=True,
                    can_write_zeroes=True, can_fast_zero=True, can_cache=True,
                    min_block_size=512, max_block_size=MAX_PAYLOAD)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Outcome = tuple[list[Event], str | None]


def respond(conn: ServerConnection, ev: Event) -> None:
    """Answer like a real application would, exercising the reply encoders."""
    if isinstance(ev, OptStartTls):
        # Accepting would make the outcome depend on how the bytes were cut (bytes queued
        # behind STARTTLS are a protocol error): refusing keeps the styles comparable.
        conn.reply_option_error(REP_ERR_POLICY, "not in this test")
        return
    if not isinstance(ev, Request):
        answer(conn, ev, EXPORT)
        return
    info = conn.export
    assert info is not None
    err = validate_request(ev, info)
    if err is not None or isinstance(ev, RejectedRequest):
        conn.reply_error(ev, err or 5, "no")
    elif isinstance(ev, Read):
        conn.reply_read(ev, [(ev.offset, ev.length, None)] if ev.length else [])
    elif isinstance(ev, BlockStatus):
        conn.reply_block_status(ev, {ctx: [(ev.length, 0)] for ctx in conn.meta_contexts})
    else:
        conn.reply_ok(ev)


def pump(conn: ServerConnection, events: list[Event]) -> bool:
    """Handle every available event; True once the connection is closed."""
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return False
        assert isinstance(ev, Event)
        events.append(snapshot(ev))
        if isinstance(ev, ConnectionClosed):
            return True
        respond(conn, ev)


def run(pieces: list[bytes], feed: Callable[[ServerConnection, bytes], None],
        tls: str = "off") -> Outcome:
    conn = ServerConnection(max_payload=MAX_PAYLOAD, buffer_size=64,
                            tls=tls)  # type: ignore[arg-type]
    events: list[Event] = []
    try:
        for piece in pieces:
            feed(conn, piece)
            if pump(conn, events):
                return events, None
        conn.receive_data(b"")
        assert pump(conn, events)
    except RemoteProtocolError as exc:
        return events, str(exc)
    return events, None


def via_receive_data(conn: ServerConnection, data: bytes) -> None:
    conn.receive_data(data)


def via_get_buffer(conn: ServerConnection, data: bytes) -> None:
    view = conn.get_buffer(len(data))
    view[:len(data)] = data
    conn.buffer_updated(len(data))


def check_all_styles(blob: bytes, cuts: list[int], tls: str = "off") -> Outcome:
    whole = run([blob], via_receive_data, tls)
    bounds = [0, *sorted(set(cuts)), len(blob)]
    chunked = run([blob[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a],
                  via_get_buffer, tls)
    bytewise = run([blob[i:i + 1] for i in range(len(blob))], via_receive_data, tls)
    assert chunked == whole
    assert bytewise == whole
    return whole


# --- strategies ----------------------------------------------------------------------------

KNOWN_OPTIONS = st.sampled_from([OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO,
                                 OPT_GO, OPT_SR, OPT_LIST_META, OPT_SET_META, OPT_EXT_HDR])
OPTION_IDS = st.one_of(KNOWN_OPTIONS, KNOWN_OPTIONS, st.integers(0, 2**32 - 1))
NAMES = st.sampled_from(["", "disk", "other", "d\u00efsk"])
QUERIES = st.lists(st.sampled_from(["base:", "base:allocation", "qemu:dirty-bitmap:", "nope"]),
                   max_size=3).map(tuple)


@st.composite
def an_option(draw: st.DrawFn) -> bytes:
    opt = draw(OPTION_IDS)
    payload = draw(st.one_of(
        st.just(b""),
        st.binary(max_size=24),
        st.builds(go_data, NAMES, st.lists(st.integers(0, 5), max_size=4).map(tuple)),
        st.builds(meta_data, NAMES, QUERIES),
    ))
    return option(opt, payload)


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    flags = draw(st.sampled_from([client_flags(), client_flags(1), client_flags(3)]))
    options = draw(st.lists(an_option(), max_size=6))
    tail = draw(st.binary(max_size=40))
    return flags + b"".join(options) + tail


PREFIXES = st.sampled_from([
    client_flags() + option(OPT_SR) + option(OPT_SET_META, meta_data("disk", ("base:",)))
    + option(OPT_GO, go_data("disk")),
    client_flags() + option(OPT_GO, go_data("disk")),
    client_flags(1) + option(OPT_EXPORT_NAME, b"disk"),
    client_flags() + option(OPT_SR) + option(OPT_EXPORT_NAME, b"disk"),
])


@st.composite
def a_request(draw: st.DrawFn) -> bytes:
    # Mostly plausible requests (so the valid paths are exercised), sometimes anything.
    cmd = draw(st.one_of(st.integers(0, 7), st.integers(0, 7), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.just(0), st.sampled_from([1, 2, 4, 8, 16, 19]),
                           st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.sampled_from([0, 512, EXPORT.size - 512]),
                            st.integers(0, 2**64 - 1)))
    length = draw(st.one_of(st.sampled_from([0, 512, 4096]), st.integers(0, 2**32 - 1)))
    cookie = draw(st.integers(0, 2**64 - 1))
    if cmd == CMD_WRITE:
        length = draw(st.integers(0, 600))
        payload = draw(st.binary(min_size=length, max_size=length))
        return request(cmd, cookie, offset, length, flags, payload)
    if cmd == CMD_BLOCK_STATUS:
        length = draw(st.integers(0, 4096))
    return request(cmd, cookie, offset, length, flags)


@st.composite
def transmission_stream(draw: st.DrawFn) -> bytes:
    return (draw(PREFIXES) + b"".join(draw(st.lists(a_request(), max_size=8)))
            + draw(st.binary(max_size=40)))


CUTS = st.lists(st.integers(0, 4000), max_size=12)


# --- properties ----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200), CUTS)
def test_raw_handshake_bytes(blob: bytes, cuts: list[int]) -> None:
    check_all_styles(blob, cuts)


@FUZZ
@given(st.binary(max_size=200), CUTS)
def test_raw_options_after_valid_client_flags(blob: bytes, cuts: list[int]) -> None:
    check_all_styles(client_flags() + blob, cuts)


@FUZZ
@given(handshake_stream(), CUTS)
def test_option_sequences(blob: bytes, cuts: list[int]) -> None:
    check_all_styles(blob, cuts)


@FUZZ
@given(handshake_stream(), CUTS, st.sampled_from(["allow", "require"]))
def test_option_sequences_with_tls_offered(blob: bytes, cuts: list[int], tls: str) -> None:
    check_all_styles(blob, cuts, tls)


@FUZZ
@given(PREFIXES, st.binary(max_size=300), CUTS)
def test_raw_transmission_bytes(prefix: bytes, blob: bytes, cuts: list[int]) -> None:
    events, _ = check_all_styles(prefix + blob, cuts)
    assert events  # the prefix always yields its option events


@FUZZ
@given(transmission_stream(), CUTS)
def test_request_sequences(blob: bytes, cuts: list[int]) -> None:
    check_all_styles(blob, cuts)


def test_valid_stream_ends_cleanly_in_every_style() -> None:
    blob = (client_flags() + option(OPT_SR) + option(OPT_SET_META, meta_data("disk", ("base:",)))
            + option(OPT_GO, go_data("disk")) + request(CMD_WRITE, 1, 0, 4, 0, b"abcd")
            + request(CMD_BLOCK_STATUS, 2, 0, 512) + request(2))
    events, error = check_all_styles(blob, [5, 17, 100])
    assert error is None
    assert events[-1] == ConnectionClosed("disconnect")
    assert sum(isinstance(e, Request) for e in events) == 2
    assert struct.unpack(">I", blob[:4]) == (3,)
