"""Constants, wire layouts, errors, ExportInfo and transmission flags."""

from __future__ import annotations

import errno

import pytest

from jsnap.nbd import (
    ExportInfo,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerConnection,
    transmission_flags,
)
from jsnap.nbd import constants as c
from jsnap.nbd.wire import decode_string, encode_string


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError):
        ProtocolError("x")
    for cls in (RemoteProtocolError, LocalProtocolError):
        err = cls("why")
        assert isinstance(err, ProtocolError) and str(err) == "why"


def test_magics_spell_what_the_spec_says() -> None:
    assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"


@pytest.mark.parametrize(("host", "wire"), [
    pytest.param(errno.EPERM, c.NBD_EPERM, id="eperm"),
    pytest.param(errno.EACCES, c.NBD_EPERM, id="eacces"),
    pytest.param(errno.EIO, c.NBD_EIO, id="eio"),
    pytest.param(errno.ENOMEM, c.NBD_ENOMEM, id="enomem"),
    pytest.param(errno.EINVAL, c.NBD_EINVAL, id="einval"),
    pytest.param(errno.ENOSPC, c.NBD_ENOSPC, id="enospc"),
    pytest.param(errno.EFBIG, c.NBD_ENOSPC, id="efbig"),
    pytest.param(errno.EOVERFLOW, c.NBD_EOVERFLOW, id="eoverflow"),
    pytest.param(errno.EOPNOTSUPP, c.NBD_ENOTSUP, id="eopnotsupp"),
    pytest.param(errno.ESHUTDOWN, c.NBD_ESHUTDOWN, id="eshutdown"),
    pytest.param(errno.EBADF, c.NBD_EINVAL, id="unlisted"),
])
def test_errno_to_nbd_error(host: int, wire: int) -> None:
    assert c.nbd_error_from_errno(host) == wire


def test_nbd_error_to_errno_round_trips() -> None:
    for wire in c.NBD_TO_ERRNO:
        assert c.nbd_error_from_errno(c.errno_from_nbd_error(wire)) == wire
    assert c.errno_from_nbd_error(4242) == errno.EINVAL


@pytest.mark.parametrize(("raw", "expected"), [
    pytest.param(b"disk", "disk", id="ascii"),
    pytest.param("\u00e9".encode(), "\u00e9", id="utf8"),
    pytest.param(b"a" * 4096, "a" * 4096, id="longest"),
    pytest.param(b"a" * 4097, None, id="too-long"),
    pytest.param(b"a\0", None, id="nul"),
    pytest.param(b"\xff", None, id="not-utf8"),
])
def test_decode_string(raw: bytes, expected: str | None) -> None:
    assert decode_string(raw) == expected


def test_encode_string_truncates_on_a_character_boundary() -> None:
    assert encode_string("abc") == b"abc"
    assert encode_string("\u20ac" * 2000) == ("\u20ac" * 1365).encode()
    assert encode_string("abcdef", limit=4) == b"abcd"


# --- ExportInfo ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    pytest.param({"name": "x" * 4097}, id="name-too-long"),
    pytest.param({"name": "a\0"}, id="name-nul"),
    pytest.param({"description": "d" * 4097}, id="description-too-long"),
    pytest.param({"description": "\0"}, id="description-nul"),
    pytest.param({"size": -1}, id="negative-size"),
    pytest.param({"size": 1 << 64}, id="size-over-64-bits"),
    pytest.param({"min_block_size": 3}, id="min-not-power-of-two"),
    pytest.param({"min_block_size": 1 << 17, "preferred_block_size": 1 << 17,
                  "max_block_size": 1 << 17}, id="min-over-64k"),
    pytest.param({"preferred_block_size": 256}, id="preferred-under-512"),
    pytest.param({"min_block_size": 4096, "preferred_block_size": 2048}, id="preferred-under-min"),
    pytest.param({"preferred_block_size": 3000}, id="preferred-not-power-of-two"),
    pytest.param({"min_block_size": 512, "max_block_size": 1000}, id="max-not-multiple"),
    pytest.param({"max_block_size": 1 << 32}, id="max-over-32-bits"),
    pytest.param({"max_block_size": 2048}, id="max-under-preferred"),
])
def test_export_info_rejects_what_the_spec_forbids(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "disk", "size": 1 << 30} | kwargs
    with pytest.raises(ValueError):
        ExportInfo(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="defaults"),
    pytest.param({"size": 0}, id="empty-export"),
    pytest.param({"size": 1024, "max_block_size": 1024}, id="max-equal-to-small-size"),
    pytest.param({"max_block_size": 0xFFFFFFFF}, id="max-unlimited"),
    pytest.param({"min_block_size": 1 << 16, "preferred_block_size": 1 << 16,
                  "max_block_size": 1 << 25}, id="min-64k"),
])
def test_export_info_accepts_valid_constraints(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "disk", "size": 1 << 30} | kwargs
    ExportInfo(**args)  # type: ignore[arg-type]


FLAGS = [
    pytest.param({}, False, c.NBD_FLAG_HAS_FLAGS, id="nothing"),
    pytest.param({}, True, c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_DF, id="df-with-structured"),
    pytest.param({"can_df": False}, True, c.NBD_FLAG_HAS_FLAGS, id="df-disabled"),
    pytest.param({"can_trim": True, "can_write_zeroes": True, "can_fast_zero": True}, False,
                 c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES
                 | c.NBD_FLAG_SEND_FAST_ZERO, id="write-side"),
    pytest.param({"can_fast_zero": True}, False, c.NBD_FLAG_HAS_FLAGS,
                 id="fast-zero-needs-write-zeroes"),
    pytest.param({"can_write_zeroes": True}, False,
                 c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_WRITE_ZEROES,
                 id="write-zeroes-without-fast-zero"),
    pytest.param({"read_only": True, "can_trim": True, "can_write_zeroes": True,
                  "can_fast_zero": True, "can_fua": True}, False,
                 c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY | c.NBD_FLAG_SEND_FUA,
                 id="read-only-hides-write-side"),
    pytest.param({"can_flush": True, "can_fua": True, "rotational": True,
                  "can_multi_conn": True, "can_cache": True}, False,
                 c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_SEND_FLUSH | c.NBD_FLAG_SEND_FUA
                 | c.NBD_FLAG_ROTATIONAL | c.NBD_FLAG_CAN_MULTI_CONN | c.NBD_FLAG_SEND_CACHE,
                 id="the-rest"),
]


@pytest.mark.parametrize(("kwargs", "structured", "expected"), FLAGS)
def test_transmission_flags(kwargs: dict[str, bool], structured: bool, expected: int) -> None:
    info = ExportInfo("disk", 1 << 20, **kwargs)  # type: ignore[arg-type]
    assert transmission_flags(info, structured_replies=structured) == expected


def test_server_connection_reports_max_payload() -> None:
    assert ServerConnection().max_payload == 1 << 25
    assert ServerConnection(max_payload=4096).max_payload == 4096
