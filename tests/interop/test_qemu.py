"""QEMU's NBD client (qemu-img, qemu-io) against a live `jsnap serve`."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from interop_util import make_image, require_tool, run, wait_destaged

pytestmark = pytest.mark.interop

MiB = 1 << 20


def _qemu_io(uri: str, *cmds: str, check: bool = True):
    args = [require_tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    args.append(uri)
    p = run(args, check=False)
    failed = p.returncode != 0 or "failed" in p.stdout.lower() or "error" in p.stderr.lower()
    if check and failed:
        pytest.fail(f"qemu-io {cmds} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                    f"stderr:\n{p.stderr}")
    return p


def test_qemu_img_info_reports_virtual_size(jsnap_server):
    srv = jsnap_server({"big": "64M", "odd": "1000K"}, tcp=True)
    srv.cli("snapshot", "create", "odd", "s1")
    img = require_tool("qemu-img")
    for export, size in [("big", 64 * MiB), ("odd", 1000 * 1024), ("odd@s1", 1000 * 1024)]:
        for tcp in (False, True):
            p = run([img, "info", "--output=json", srv.uri(export, tcp=tcp)])
            assert json.loads(p.stdout)["virtual-size"] == size, (export, tcp, p.stdout)


def test_qemu_img_convert_snapshot_equals_original_after_overwrite(jsnap_server, tmp_path):
    img = require_tool("qemu-img")
    srv = jsnap_server({"vol": "24M"})
    uri = srv.uri("vol")
    orig = tmp_path / "orig.raw"
    make_image(orig, 16 * MiB, seed=1)
    # Junk first, so the image's zero runs must really be written as zeroes by qemu-img.
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"\xa5" * (24 * MiB))
    run([img, "convert", "-n", "-f", "raw", "-O", "raw", str(junk), uri])
    run([img, "convert", "-n", "-f", "raw", "-O", "raw", str(orig), uri])
    # The tail past 16 MiB still holds junk: zero it so the volume equals the image.
    _qemu_io(uri, f"write -z {16 * MiB} {8 * MiB}")
    run([img, "compare", "-f", "raw", "-F", "raw", str(orig), uri])

    srv.cli("snapshot", "create", "vol", "before")
    # Overwrite part of the live volume: data, zeroes, discards, unaligned ones too.
    _qemu_io(uri, f"write -P 0xee {1 * MiB} {2 * MiB}", f"write -z {5 * MiB} 70000",
             f"discard {8 * MiB} {1 * MiB}", "discard 10000001 123457",
             "write -P 0x5a 12345 6789")

    snap_uri = srv.uri("vol@before")
    for phase in ("journaled", "destaged"):
        if phase == "destaged":
            wait_destaged(srv)  # now the snapshot reads preserved chunks from the store
        out = tmp_path / f"snap-{phase}.raw"
        run([img, "convert", "-f", "raw", "-O", "raw", snap_uri, str(out)])
        assert out.stat().st_size == 24 * MiB
        p = run([img, "compare", "-f", "raw", "-F", "raw", str(orig), str(out)], check=False)
        assert p.returncode == 0, f"snapshot ({phase}) differs from the original: {p.stdout}"
        # The live volume differs from the original, first in the block written at 12345
        # (qemu-img compare names the start of the first differing block).
        p = run([img, "compare", "-f", "raw", "-F", "raw", str(orig), uri], check=False)
        assert p.returncode == 1, f"live volume vs original: exit {p.returncode}: {p.stdout}"
        m = re.search(r"Content mismatch at offset (\d+)", p.stdout)
        assert m and int(m.group(1)) <= 12345 < int(m.group(1)) + 65536, p.stdout


def test_qemu_io_overlapping_unaligned_writes_read_back_exactly(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    uri = srv.uri("vol")
    _qemu_io(uri, "write -P 0x11 1000 5000", "write -P 0x22 3000 300",
             "write -P 0x33 5999 2")
    _qemu_io(uri,
             "read -P 0 0 1000",
             "read -P 0x11 1000 2000",
             "read -P 0x22 3000 300",
             "read -P 0x11 3300 2699",
             "read -P 0x33 5999 2",
             "read -P 0 6001 100000")
    # Each sub-range check can fail: a wrong pattern is reported.
    p = _qemu_io(uri, "read -P 0x11 2999 2", check=False)
    assert "Pattern verification failed" in p.stdout, p.stdout


def test_qemu_io_write_zeroes_and_discard_read_as_zero(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    uri = srv.uri("vol")
    _qemu_io(uri, "write -P 0x44 0 262144")
    _qemu_io(uri, "write -z 1000 3000", "discard 65536 65536")
    _qemu_io(uri,
             "read -P 0x44 0 1000",
             "read -P 0 1000 3000",
             "read -P 0x44 4000 61536",
             "read -P 0 65536 65536",
             "read -P 0x44 131072 131072")


def test_qemu_io_read_past_end_fails(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    p = _qemu_io(srv.uri("vol"), f"read {4 * MiB - 512} 1024", check=False)
    assert p.returncode != 0 or "error" in (p.stdout + p.stderr).lower(), p.stdout
    assert "read 1024/1024 bytes" not in p.stdout, p.stdout
    # The connection is still usable for in-range requests.
    _qemu_io(srv.uri("vol"), f"read -P 0 {4 * MiB - 512} 512")


def test_qemu_io_32mib_write_with_journal_smaller_than_request(jsnap_server):
    """The server advertises a 32 MiB maximum block size whatever the journal size; a pool
    with a 16 MiB journal must still take one 32 MiB WRITE (it needs more than one journal
    lap, so the destager has to free space while the request is being journaled)."""
    srv = jsnap_server({"vol": "64M"}, journal_size="16M")
    uri = srv.uri("vol")
    args = [require_tool("qemu-io"), "-f", "raw", "-c", f"write -P 0x5c {MiB} {32 * MiB}",
            "-c", f"read -P 0x5c {MiB} {32 * MiB}", "-c", f"read -P 0 0 {MiB}", uri]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        st = srv.cli("status", "--json", timeout=5, check=False).stdout
        srv.kill()  # a stuck request would hold SIGTERM for the server's 30 s join timeout
        pytest.fail(f"a 32 MiB WRITE into a 16 MiB journal hangs; status: {st}")
    assert p.returncode == 0 and "failed" not in p.stdout.lower(), p.stdout + p.stderr
