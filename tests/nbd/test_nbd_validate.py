"""validate_request: request checks against the export description."""

from __future__ import annotations

import errno

import pytest

from jsnap.nbd import (
    BlockStatus,
    Cache,
    ExportInfo,
    Flush,
    Read,
    RejectedRequest,
    Request,
    Trim,
    Write,
    WriteZeroes,
    validate_request,
)

FAST_ZERO = 16
MIB = 1 << 20
RW = ExportInfo("rw", 64 * MIB, can_flush=True, can_trim=True, can_write_zeroes=True,
                min_block_size=512, max_block_size=4 * MIB)
RO = ExportInfo("ro", 64 * MIB, read_only=True)
BARE = ExportInfo("bare", 64 * MIB)  # no flush, trim or write zeroes


def w(offset: int, length: int) -> Write:
    return Write(1, offset, length, 0, memoryview(bytes(length)))


CASES = [
    pytest.param(Read(1, 0, 4096, 0), RW, None, id="read-ok"),
    pytest.param(w(64 * MIB - 512, 512), RW, None, id="write-last-block"),
    pytest.param(RejectedRequest(1, 0, 0, 0, 99, errno.EINVAL, "x"), RW, errno.EINVAL,
                 id="rejected-keeps-its-errno"),
    pytest.param(Flush(1, 0, 0, 0), RW, None, id="flush-ok"),
    pytest.param(Flush(1, 0, 0, 0), BARE, errno.EINVAL, id="flush-not-advertised"),
    pytest.param(w(0, 512), RO, errno.EPERM, id="write-read-only"),
    pytest.param(Trim(1, 0, 512, 0), RO, errno.EPERM, id="trim-read-only"),
    pytest.param(WriteZeroes(1, 0, 512, 0), RO, errno.EPERM, id="zeroes-read-only"),
    pytest.param(Read(1, 0, 512, 0), RO, None, id="read-read-only"),
    pytest.param(Trim(1, 0, 512, 0), BARE, errno.EINVAL, id="trim-not-advertised"),
    pytest.param(WriteZeroes(1, 0, 512, 0), BARE, errno.EINVAL, id="zeroes-not-advertised"),
    pytest.param(w(64 * MIB, 512), RW, errno.ENOSPC, id="write-past-end"),
    pytest.param(WriteZeroes(1, 64 * MIB - 512, 1024, 0), RW, errno.ENOSPC,
                 id="zeroes-past-end"),
    pytest.param(Read(1, 64 * MIB - 512, 1024, 0), RW, errno.EINVAL, id="read-past-end"),
    pytest.param(Trim(1, 2**63, 512, 0), RW, errno.EINVAL, id="trim-past-end"),
    pytest.param(Cache(1, 64 * MIB, 512, 0), RW, errno.EINVAL, id="cache-past-end"),
    pytest.param(BlockStatus(1, 64 * MIB, 512, 0), RW, errno.EINVAL, id="status-past-end"),
    pytest.param(BlockStatus(1, 0, 0, 0), RW, errno.EINVAL, id="status-zero-length"),
    pytest.param(Read(1, 0, 0, 0), RW, None, id="read-zero-length-is-a-no-op"),
    pytest.param(Read(1, 100, 512, 0), RW, errno.EINVAL, id="unaligned-offset"),
    pytest.param(w(0, 100), RW, errno.EINVAL, id="unaligned-length"),
    pytest.param(Read(1, 100, 512, 0), BARE, None, id="min-block-size-1"),
    pytest.param(Read(1, 0, 4 * MIB + 512, 0), RW, errno.EINVAL, id="read-over-max"),
    pytest.param(w(0, 4 * MIB + 512), RW, errno.EINVAL, id="write-over-max"),
    pytest.param(Cache(1, 0, 4 * MIB + 512, 0), RW, errno.EINVAL, id="cache-over-max"),
    pytest.param(WriteZeroes(1, 0, 8 * MIB, 0), RW, errno.EINVAL, id="zeroes-over-max"),
    pytest.param(WriteZeroes(1, 0, 8 * MIB, FAST_ZERO), RW, None,
                 id="fast-zeroes-may-exceed-max"),
    pytest.param(Trim(1, 0, 8 * MIB, 0), RW, None, id="trim-may-exceed-max"),
    pytest.param(BlockStatus(1, 0, 64 * MIB, 0), RW, None, id="status-may-exceed-max"),
]


@pytest.mark.parametrize(("request_", "info", "expected"), CASES)
def test_validate_request(request_: Request, info: ExportInfo, expected: int | None) -> None:
    assert validate_request(request_, info) == expected
