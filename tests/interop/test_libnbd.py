"""libnbd against a live `jsnap serve`: nbdinfo, nbdcopy, and the Python bindings.

libnbd scripts run under Debian's /usr/bin/python3 (run_libnbd); each prints one JSON line
of observations and the assertions are made here. Strict mode is turned off where a test
means to reach the server with a request libnbd would otherwise refuse client-side (past the
end, write to a read-only export), so the errno checked is the server's.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from interop_util import (
    make_image,
    require_libnbd_python,
    require_tool,
    run,
    run_libnbd_json,
    wait_destaged,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20

PRELUDE = r"""
import errno, json, os, sys
import nbd

def connect(uri, structured=True, strict=True, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    if not strict:
        h.set_strict_mode(0)
    return h

def err(fn, *args, **kw):
    # errno name of a failed call, or "ok"
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"

def extents(h, count, offset, flags=0):
    out = []
    def cb(ctx, off, entries, error):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, offset, cb, flags)
    return out

def done(**kw):
    print(json.dumps(kw))
"""


def _libnbd(script: str, *args: str, timeout: float = 60.0):
    return run_libnbd_json(PRELUDE + script, *args, timeout=timeout)


def _map(extents: list[list[int]], offset: int = 0) -> list[tuple[int, int, int]]:
    """(start, end, flags) runs, adjacent equal flags merged."""
    out: list[tuple[int, int, int]] = []
    pos = offset
    for length, flags in extents:
        if out and out[-1][2] == flags and out[-1][1] == pos:
            out[-1] = (out[-1][0], pos + length, flags)
        else:
            out.append((pos, pos + length, flags))
        pos += length
    return out


def _flags_at(runs: list[tuple[int, int, int]], offset: int) -> int:
    for s, e, f in runs:
        if s <= offset < e:
            return f
    raise AssertionError(f"offset {offset} not covered by {runs}")


# -- nbdinfo ----------------------------------------------------------------------------------


def test_nbdinfo_list_shows_every_volume_and_snapshot(jsnap_server):
    nbdinfo = require_tool("nbdinfo")
    srv = jsnap_server({"alpha": "8M", "beta": "16M"})
    srv.cli("snapshot", "create", "alpha", "s1")
    srv.cli("snapshot", "create", "alpha", "s2")
    srv.cli("snapshot", "create", "beta", "nightly")
    srv.cli("volume", "create", "gamma", "--size", "4M")  # created while serving
    p = run([nbdinfo, "--list", "--json", srv.uri()])
    exports = {e["export-name"]: e for e in json.loads(p.stdout)["exports"]}
    assert set(exports) == {"alpha", "alpha@s1", "alpha@s2", "beta", "beta@nightly", "gamma"}
    assert exports["alpha@s1"]["is_read_only"] is True
    assert exports["alpha"]["is_read_only"] is False
    assert exports["beta@nightly"]["export-size"] == 16 * MiB
    assert exports["gamma"]["export-size"] == 4 * MiB
    # A deleted snapshot is no longer listed.
    srv.cli("snapshot", "delete", "alpha", "s1")
    p = run([nbdinfo, "--list", "--json", srv.uri()])
    names = {e["export-name"] for e in json.loads(p.stdout)["exports"]}
    assert names == {"alpha", "alpha@s2", "beta", "beta@nightly", "gamma"}


def test_nbdinfo_size_matches_volume(jsnap_server):
    nbdinfo = require_tool("nbdinfo")
    srv = jsnap_server({"vol": "64M", "small": "1536K"}, tcp=True)
    assert run([nbdinfo, "--size", srv.uri("vol")]).stdout.strip() == str(64 * MiB)
    assert run([nbdinfo, "--size", srv.uri("small", tcp=True)]).stdout.strip() == str(1536 * 1024)


def test_nbdinfo_map_reports_data_and_holes_fresh_and_after_trim(jsnap_server):
    nbdinfo = require_tool("nbdinfo")
    srv = jsnap_server({"vol": "64M"})
    uri = srv.uri("vol")

    def nbd_map() -> list[tuple[int, int, int]]:
        p = run([nbdinfo, "--map", "--json", uri])
        return [(e["offset"], e["offset"] + e["length"], e["type"])
                for e in json.loads(p.stdout)]

    fresh = nbd_map()
    assert fresh == [(0, 64 * MiB, 3)], f"fresh volume is not one hole: {fresh}"

    _libnbd(r"""
h = connect(sys.argv[1])
h.pwrite(b"\x01" * 65536, 1 * 1048576)
h.pwrite(b"\x02" * 4096, 8 * 1048576)
h.pwrite(b"\x03" * 200000, 20 * 1048576 + 100)
done()
""", uri)
    for phase in ("journaled", "destaged"):
        if phase == "destaged":
            wait_destaged(srv)
        m = nbd_map()
        assert m[0][0] == 0 and m[-1][1] == 64 * MiB, m
        for s, e in [(1 * MiB, 1 * MiB + 65536), (8 * MiB, 8 * MiB + 4096),
                     (20 * MiB + 100, 20 * MiB + 200100)]:
            for off in (s, (s + e) // 2, e - 1):
                assert _flags_at(m, off) & 1 == 0, f"{phase}: written {off} not data: {m}"
        for off in (0, 4 * MiB, 30 * MiB, 64 * MiB - 1):
            assert _flags_at(m, off) == 3, f"{phase}: unwritten {off} not a hole: {m}"

    _libnbd(r"""
h = connect(sys.argv[1])
h.trim(65536, 1 * 1048576)
done()
""", uri)
    wait_destaged(srv)
    m = nbd_map()
    for off in (1 * MiB, 1 * MiB + 65535):
        assert _flags_at(m, off) == 3, f"trimmed {off} not a hole: {m}"
    assert _flags_at(m, 8 * MiB) & 1 == 0, m


@pytest.mark.parametrize("raw", [False, True], ids=["thin", "raw"])
def test_nbdinfo_map_of_a_snapshot_shows_its_holes_and_nbdcopy_copies_it(jsnap_server,
                                                                          tmp_path, raw):
    """A snapshot's map is its own: data where it has data (even where the live volume was
    trimmed since), holes where it never had any (even where the live volume was written
    since), whether the records are journaled, destaged or replayed after a restart; and
    nbdcopy and qemu-img, which skip what the map calls holes, get its bytes."""
    nbdinfo, nbdcopy = require_tool("nbdinfo"), require_tool("nbdcopy")
    qemu_img = require_tool("qemu-img")
    srv = jsnap_server({})
    srv.cli("volume", "create", "vol", "--size", "64M", *(["--raw"] if raw else []))
    uri, snap_uri = srv.uri("vol"), srv.uri("vol@s")
    written = [(1 * MiB, 65536, 1), (8 * MiB, 4096, 2), (20 * MiB + 100, 200000, 3)]
    want = bytearray(64 * MiB)
    for off, n, byte in written:
        want[off : off + n] = bytes([byte]) * n
    _libnbd(r"""
h = connect(sys.argv[1])
h.pwrite(b"\x01" * 65536, 1 * 1048576)
h.pwrite(b"\x02" * 4096, 8 * 1048576)
h.pwrite(b"\x03" * 200000, 20 * 1048576 + 100)
h.pwrite(b"\x04" * 65536, 40 * 1048576)
h.trim(65536, 40 * 1048576)
done()
""", uri)
    srv.cli("snapshot", "create", "vol", "s")
    _libnbd(r"""
h = connect(sys.argv[1])
h.trim(65536, 1 * 1048576)
h.pwrite(b"\x05" * 8192, 8 * 1048576)
h.pwrite(b"\x06" * 1048576, 30 * 1048576)
h.pwrite(b"\x07" * 4096, 40 * 1048576)
done()
""", uri)

    def nbd_map() -> list[tuple[int, int, int]]:
        p = run([nbdinfo, "--map", "--json", snap_uri])
        return [(e["offset"], e["offset"] + e["length"], e["type"])
                for e in json.loads(p.stdout)]

    for phase in ("fresh", "destaged", "restarted"):
        if phase == "destaged":
            wait_destaged(srv)
        elif phase == "restarted":
            srv.restart()
        m = nbd_map()
        assert m[0][0] == 0 and m[-1][1] == 64 * MiB, m
        for s, e, flags in m:
            assert flags in (0, 3), m
            if flags == 3:
                assert want[s:e].count(0) == e - s, f"{phase}: false hole {s}-{e}: {m}"
        for off, n, _ in written:
            for at in (off, off + n // 2, off + n - 1):
                assert _flags_at(m, at) == 0, f"{phase}: {at} has data in s: {m}"
        # Never written before s (30M and 40M only after it, 40M trimmed before it). A raw
        # volume's copy of a hole is data (copy_file_range fills it): only never written.
        never = (0, 4 * MiB, 64 * MiB - 1)
        for at in never if raw else (*never, 30 * MiB, 30 * MiB + 65536, 40 * MiB):
            assert _flags_at(m, at) == 3, f"{phase}: {at} is a hole in s: {m}"
        p = run([qemu_img, "map", "--output=json", "-f", "raw", snap_uri])
        for e in json.loads(p.stdout):
            if not e["data"]:
                s, end = e["start"], e["start"] + e["length"]
                assert e["zero"] and want[s:end].count(0) == end - s, p.stdout
        out = tmp_path / f"{phase}.raw"
        run([nbdcopy, "--connections=4", snap_uri, str(out)], timeout=120)
        assert out.read_bytes() == want, f"{phase}: nbdcopy of the snapshot differs"


# -- nbdcopy ----------------------------------------------------------------------------------


def test_nbdcopy_four_connections_roundtrip(jsnap_server, tmp_path):
    nbdcopy = require_tool("nbdcopy")
    srv = jsnap_server({"vol": "32M"}, tcp=True)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(32 * MiB))
    run([nbdcopy, "--connections=4", str(src), srv.uri("vol")], timeout=120)
    out = tmp_path / "out.raw"
    run([nbdcopy, "--connections=4", srv.uri("vol", tcp=True), str(out)], timeout=120)
    assert out.stat().st_size == 32 * MiB
    run(["cmp", str(src), str(out)])
    # Snapshot, then copy the snapshot out while the volume is overwritten.
    srv.cli("snapshot", "create", "vol", "s")
    run([nbdcopy, "--connections=4", str(tmp_path / "out.raw"), srv.uri("vol")], timeout=120)
    zero = tmp_path / "zero.raw"
    zero.write_bytes(bytes(32 * MiB))
    run([nbdcopy, "--connections=4", str(zero), srv.uri("vol")], timeout=120)
    out2 = tmp_path / "out2.raw"
    run([nbdcopy, "--connections=4", srv.uri("vol@s", tcp=True), str(out2)], timeout=120)
    run(["cmp", str(src), str(out2)])


def test_nbdcopy_mixed_image_with_zero_runs_roundtrip(jsnap_server, tmp_path):
    nbdcopy = require_tool("nbdcopy")
    srv = jsnap_server({"vol": "16M"})
    # Non-zero everywhere first, so zero runs must be written (nbdcopy uses WRITE_ZEROES).
    full = tmp_path / "full.raw"
    full.write_bytes(b"\xff" * (16 * MiB))
    run([nbdcopy, str(full), srv.uri("vol")])
    src = tmp_path / "src.raw"
    make_image(src, 16 * MiB, seed=7)
    run([nbdcopy, "--connections=4", str(src), srv.uri("vol")], timeout=120)
    out = tmp_path / "out.raw"
    run([nbdcopy, srv.uri("vol"), str(out)])
    run(["cmp", str(src), str(out)])


# -- the Python bindings ----------------------------------------------------------------------


def test_libnbd_pwrite_fua_and_flush_read_back(jsnap_server):
    srv = jsnap_server({"vol": "8M"})
    r = _libnbd(r"""
h = connect(sys.argv[1])
a = os.urandom(65536); b = os.urandom(5000); c = os.urandom(12345)
h.pwrite(a, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b, 70000)
h.flush()
h.pwrite(c, 1 << 20, nbd.CMD_FLAG_FUA)
ok_same = h.pread(65536, 0) == a and h.pread(5000, 70000) == b and h.pread(12345, 1 << 20) == c
h.cache(1 << 20, 0)                      # NBD_CMD_CACHE: a hint, must succeed
chunks = []
def chunk(sub, off, status, error):
    chunks.append([off, len(sub), status])
    return 0
# Don't fragment: one content chunk, and data (with the zeroes in it) since it spans a hole.
df = h.pread_structured(65536 + 70000, 0, chunk, nbd.CMD_FLAG_DF)
ok_df = chunks == [[0, 135536, nbd.READ_DATA]]
ok_same = ok_same and df == a + bytes(4464) + b + bytes(135536 - 75000)
h.shutdown()
h2 = connect(sys.argv[1])  # a new connection sees the same data
ok_new = h2.pread(65536, 0) == a and h2.pread(5000, 70000) == b and h2.pread(12345, 1 << 20) == c
done(can_fua=h2.can_fua(), can_flush=h2.can_flush(), same=ok_same, new=ok_new,
     can_cache=h2.can_cache(), can_df=h2.can_df(), df=ok_df or chunks)
""", srv.uri("vol"))
    assert r == {"can_fua": True, "can_flush": True, "same": True, "new": True,
                 "can_cache": True, "can_df": True, "df": True}


def test_libnbd_trim_reads_zeroes(jsnap_server):
    srv = jsnap_server({"vol": "8M"})
    r = _libnbd(r"""
h = connect(sys.argv[1])
data = os.urandom(3 * 65536)
h.pwrite(data, 0)
h.trim(65536, 65536)
h.trim(1000, 10)          # unaligned trim
h.flush()
got = h.pread(3 * 65536, 0)
expect = bytearray(data); expect[65536:131072] = bytes(65536); expect[10:1010] = bytes(1000)
done(can_trim=h.can_trim(), match=got == bytes(expect))
""", srv.uri("vol"))
    assert r == {"can_trim": True, "match": True}


def test_libnbd_zero_with_and_without_no_hole_and_fast_zero(jsnap_server):
    srv = jsnap_server({"vol": "8M"})
    r = _libnbd(r"""
h = connect(sys.argv[1])
base = 1 << 20
data = os.urandom(8 * 65536)
h.pwrite(data, base)
expect = bytearray(data)
flags = [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO,
         nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_FUA]
results = []
for i, f in enumerate(flags):
    off, n = i * 65536 + 777, 40000 + i   # unaligned
    results.append(err(h.zero, n, base + off, f))
    expect[off:off + n] = bytes(n)
got = h.pread(len(data), base)
# Zeroed ranges must read back as zeroes also through a connection without structured replies.
h2 = connect(sys.argv[1], structured=False, meta=False)
got2 = h2.pread(len(data), base)
done(can_zero=h.can_zero(), can_fast_zero=h.can_fast_zero(), results=results,
     match=got == bytes(expect), match_simple=got2 == bytes(expect))
""", srv.uri("vol"))
    assert r == {"can_zero": True, "can_fast_zero": True, "results": ["ok"] * 5,
                 "match": True, "match_simple": True}


def test_libnbd_block_status_base_allocation(jsnap_server):
    srv = jsnap_server({"vol": "8M"})
    srv.cli("snapshot", "create", "vol", "empty")
    r = _libnbd(r"""
uri, snap_uri = sys.argv[1], sys.argv[2]
h = connect(uri)
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"\x07" * 65536, 1 << 20)
full = extents(h, 4 << 20, 0)
one = extents(h, 4 << 20, 0, nbd.CMD_FLAG_REQ_ONE)
mid = extents(h, 65536, (1 << 20) + 4096)
s = connect(snap_uri)
snap = extents(s, 8 << 20, 0)
done(full=full, one=one, mid=mid, snap=snap,
     snap_ctx=s.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
""", srv.uri("vol"), srv.uri("vol@empty"))
    full = _map(r["full"])
    assert full[0][0] == 0 and full[-1][1] <= 8 * MiB and full[-1][1] > 0, full
    assert _flags_at(full, 0) == 3 and _flags_at(full, MiB - 1) == 3, full
    assert _flags_at(full, MiB) & 1 == 0 and _flags_at(full, MiB + 65535) & 1 == 0, full
    if full[-1][1] > MiB + 65536:
        assert _flags_at(full, MiB + 65536) == 3, full
    assert len(r["one"]) == 1 and 0 < r["one"][0][0] <= 4 * MiB, r["one"]
    assert r["one"][0][1] == 3 and r["one"][0][0] <= MiB, r["one"]
    mid = _map(r["mid"], MiB + 4096)
    assert mid[0][0] == MiB + 4096 and mid[0][2] & 1 == 0, mid
    # The snapshot export offers base:allocation too, and its answer covers the request.
    assert r["snap_ctx"] is True
    assert sum(e[0] for e in r["snap"]) > 0, r["snap"]


def test_libnbd_pread_past_end_is_einval(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    r = _libnbd(r"""
h = connect(sys.argv[1], strict=False)
size = h.get_size()
past = err(h.pread, 1024, size - 512)
after = err(h.pread, 1, size)
write_past = err(h.pwrite, b"x" * 1024, size - 512)
trim_past = err(h.trim, 1024, size - 512)
inside = h.pread(512, size - 512) == bytes(512)   # the connection is still usable
done(past=past, after=after, write_past=write_past, trim_past=trim_past, inside=inside)
""", srv.uri("vol"))
    assert r == {"past": "EINVAL", "after": "EINVAL", "write_past": "ENOSPC",
                 "trim_past": "EINVAL", "inside": True}


def test_libnbd_write_to_snapshot_export_is_eperm(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    srv.cli("snapshot", "create", "vol", "s")
    r = _libnbd(r"""
h = connect(sys.argv[1], strict=False)
done(ro=h.is_read_only(), write=err(h.pwrite, b"x" * 4096, 0),
     fua=err(h.pwrite, b"x" * 4096, 0, nbd.CMD_FLAG_FUA),
     trim=err(h.trim, 4096, 0), zero=err(h.zero, 4096, 0),
     flush=err(h.flush), read=h.pread(4096, 0) == bytes(4096))
""", srv.uri("vol@s"))
    assert r == {"ro": True, "write": "EPERM", "fua": "EPERM", "trim": "EPERM",
                 "zero": "EPERM", "flush": "ok", "read": True}


def test_libnbd_unknown_export_connect_fails(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    srv.cli("snapshot", "create", "vol", "s")
    r = _libnbd(r"""
sock = sys.argv[1]
out = {}
for name in ["nope", "vol@nope", "nope@s", "VOL", "vol@"]:
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
        out[name] = "connected"
    except nbd.Error as e:
        out[name] = "failed"
h = connect(f"nbd+unix:///vol?socket={sock}")   # the server still serves
done(results=out, size=h.get_size())
""", srv.socket)
    assert r == {"results": dict.fromkeys(["nope", "vol@nope", "nope@s", "VOL", "vol@"],
                                          "failed"),
                 "size": 4 * MiB}


def test_libnbd_multi_conn_writes_visible_across_connections(jsnap_server):
    srv = jsnap_server({"vol": "8M"})
    r = _libnbd(r"""
a = connect(sys.argv[1]); b = connect(sys.argv[1])
ok = True
for i in range(50):
    data = os.urandom(4096 + i)
    off = (i * 65536 + i * 7) % ((8 << 20) - 10000)
    (a if i % 2 else b).pwrite(data, off)
    ok = ok and (b if i % 2 else a).pread(len(data), off) == data
a.pwrite(b"z" * 4096, 0); b.flush()
done(multi=[a.can_multi_conn(), b.can_multi_conn()], ok=ok,
     after_flush=a.pread(4096, 0) == b"z" * 4096)
""", srv.uri("vol"))
    assert r == {"multi": [True, True], "ok": True, "after_flush": True}


def test_libnbd_without_structured_replies_reads_and_writes(jsnap_server):
    srv = jsnap_server({"vol": "8M"})
    r = _libnbd(r"""
h = connect(sys.argv[1], structured=False, meta=False)
sr = h.get_structured_replies_negotiated()
data = bytearray(os.urandom(1 << 20))
data[100000:300000] = bytes(200000)          # zero runs inside data
h.pwrite(bytes(data), 4096)
h.zero(65536, 2 << 20)
h.pwrite(os.urandom(65536), 3 << 20); h.trim(65536, 3 << 20)
ok = h.pread(len(data), 4096) == bytes(data)
ok_zero = h.pread(65536, 2 << 20) == bytes(65536) and h.pread(65536, 3 << 20) == bytes(65536)
ok_fresh = h.pread(1 << 20, 5 << 20) == bytes(1 << 20)
ok_mixed = h.pread(8192, 4096 + (1 << 20) - 4096) == bytes(data[-4096:]) + bytes(4096)
h.set_strict_mode(0)
past = err(h.pread, 1024, (8 << 20) - 512)
ok_after = h.pread(4096, 4096) == bytes(data[:4096])
done(sr=sr, ok=ok, ok_zero=ok_zero, ok_fresh=ok_fresh, ok_mixed=ok_mixed, past=past,
     ok_after=ok_after)
""", srv.uri("vol"))
    assert r == {"sr": False, "ok": True, "ok_zero": True, "ok_fresh": True, "ok_mixed": True,
                 "past": "EINVAL", "ok_after": True}


def test_libnbd_many_requests_in_flight_mixed_fua(jsnap_server):
    """64 aio writes at once, every other one FUA (the server answers FUA ones after the
    batch's fdatasync, i.e. out of order), then 64 aio reads: each completes with its data."""
    srv = jsnap_server({"vol": "8M"})
    r = _libnbd(r"""
h = connect(sys.argv[1])
bufs = [os.urandom(4096 * (1 + i % 4)) for i in range(64)]
offs = [i * 65536 + 512 * (i % 3) for i in range(64)]
cookies = [h.aio_pwrite(b, o, flags=nbd.CMD_FLAG_FUA if i % 2 else 0)
           for i, (b, o) in enumerate(zip(bufs, offs))]
while h.aio_in_flight() > 0:
    h.poll(-1)
wres = [h.aio_command_completed(c) for c in cookies]
rbufs = [nbd.Buffer(len(b)) for b in bufs]
cookies = [h.aio_pread(rb, o) for rb, o in zip(rbufs, offs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
rres = [h.aio_command_completed(c) for c in cookies]
done(wres=all(wres), rres=all(rres), match=[rb.to_bytearray() == b for rb, b in zip(rbufs, bufs)])
""", srv.uri("vol"))
    assert r == {"wres": True, "rres": True, "match": [True] * 64}


def test_libnbd_max_block_size_requests(jsnap_server):
    """READ and WRITE of exactly the advertised maximum (32 MiB) work; one byte more is
    EINVAL from the server (strict mode off), and the connection stays usable."""
    srv = jsnap_server({"vol": "64M"})
    r = _libnbd(r"""
h = connect(sys.argv[1], strict=False)
mx = h.get_block_size(nbd.SIZE_MAXIMUM)
data = os.urandom(mx)
h.pwrite(data, 4096)
same = h.pread(mx, 4096) == data
too_big_read = err(h.pread, mx + 1, 0)
# An oversized WRITE's payload may be refused with EINVAL, or the server may drop that
# connection (it need not swallow the payload); either way nothing of it may land.
w = connect(sys.argv[1], strict=False)
too_big_write = err(w.pwrite, b"\x01" * (mx + 1), 0)
if too_big_write != "EINVAL":
    too_big_write = "disconnected" if w.aio_is_dead() or w.aio_is_closed() else too_big_write
after = h.pread(4096, 4096) == data[:4096] and h.pread(4096, 0) == bytes(4096)
done(mx=mx, same=same, too_big_read=too_big_read, too_big_write=too_big_write, after=after)
""", srv.uri("vol"), timeout=120)
    assert r["too_big_write"] in ("EINVAL", "disconnected"), r
    r.pop("too_big_write")
    assert r == {"mx": 32 * MiB, "same": True, "too_big_read": "EINVAL", "after": True}


def test_nbdinfo_default_export_is_the_only_volume(jsnap_server):
    nbdinfo = require_tool("nbdinfo")
    srv = jsnap_server({"only": "2M"})
    assert run([nbdinfo, "--size", srv.uri("")]).stdout.strip() == str(2 * MiB)
    srv.cli("volume", "create", "second", "--size", "4M")
    p = run([nbdinfo, "--size", srv.uri("")], check=False)
    assert p.returncode != 0, "the default export is ambiguous with two volumes"
    assert run([nbdinfo, "--size", srv.uri("second")]).stdout.strip() == str(4 * MiB)


def test_cli_rollback_while_serving_restores_snapshot_for_clients(jsnap_server):
    """`jsnap snapshot rollback` through the admin socket while a client stays connected:
    the connected client and a new one both read the snapshot's content afterwards."""
    srv = jsnap_server({"vol": "8M"})
    uri = srv.uri("vol")
    script = r"""
import hashlib, time
h = connect(sys.argv[1])
a = os.urandom(1 << 20)
h.pwrite(a, 0); h.flush()
print("snap", flush=True); sys.stdin.readline()
h.pwrite(os.urandom(1 << 20), 512 * 1024); h.zero(65536, 4 << 20); h.pwrite(b"x" * 4096, 6 << 20)
print("rollback", flush=True); sys.stdin.readline()
got = h.pread(8 << 20, 0)
expect = a + bytes(7 << 20)
done(same_conn=got == expect)
"""
    p = subprocess.Popen([require_libnbd_python(), "-c", PRELUDE + script, uri],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "snap", p.stderr.read()
        srv.cli("snapshot", "create", "vol", "good")
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "rollback", p.stderr.read()
        srv.cli("snapshot", "rollback", "vol", "good")
        p.stdin.write("\n")
        p.stdin.flush()
        out, errout = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert json.loads(out.strip().splitlines()[-1]) == {"same_conn": True}, errout
    r = _libnbd(r"""
h = connect(sys.argv[1]); s = connect(sys.argv[2])
done(equal=h.pread(8 << 20, 0) == s.pread(8 << 20, 0))
""", uri, srv.uri("vol@good"))
    assert r == {"equal": True}


def test_libnbd_export_names_with_punctuation(jsnap_server):
    """Names may hold . _ : + -; the export name goes through NBD as is (no URI parsing)."""
    vol, snap = "a.b_c:d+e-f", "s.1:x+y-z"
    srv = jsnap_server({vol: "4M"})
    srv.cli("snapshot", "create", vol, snap)
    r = _libnbd(r"""
sock, vol, snap = sys.argv[1:4]
def open_export(name):
    h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock); return h
h = open_export(vol)
h.pwrite(b"p" * 4096, 0)
s = open_export(vol + "@" + snap)
done(vol=h.pread(4096, 0) == b"p" * 4096, snap=s.pread(4096, 0) == bytes(4096),
     ro=s.is_read_only())
""", srv.socket, vol, snap)
    assert r == {"vol": True, "snap": True, "ro": True}


def test_libnbd_zero_no_hole_leaves_range_allocated(jsnap_server):
    """NBD_CMD_FLAG_NO_HOLE on WRITE_ZEROES: the area "MUST be fully provisioned" (NBD spec,
    NBD_CMD_WRITE_ZEROES; qemu: NO_HOLE == must write zeroes, no hole). After the destager
    has applied it, base:allocation must not report that range as a hole. A plain
    WRITE_ZEROES and a TRIM may leave holes. Checked on a thin, a sparse raw and a
    --preallocate raw volume."""
    srv = jsnap_server({"vol": "8M"})
    srv.cli("volume", "create", "raw", "--size", "8M", "--raw")
    srv.cli("volume", "create", "pre", "--size", "8M", "--raw", "--preallocate")
    script = r"""
h = connect(sys.argv[1])
h.pwrite(os.urandom(3 << 20), 0)
h.flush()
done()
"""
    zero = r"""
h = connect(sys.argv[1])
h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 1 << 20)
h.trim(1 << 20, 2 << 20)
h.flush()
done(zero=h.pread(3 << 20, 0) == bytes(3 << 20))
"""
    status = r"""
h = connect(sys.argv[1])
done(ext=extents(h, 3 << 20, 0))
"""
    for vol in ("vol", "raw", "pre"):
        _libnbd(script, srv.uri(vol))
        wait_destaged(srv)
        assert _libnbd(zero, srv.uri(vol)) == {"zero": True}
        wait_destaged(srv)
        runs = _map(_libnbd(status, srv.uri(vol))["ext"])
        for off in (0, 512 * 1024, MiB - 1):
            assert _flags_at(runs, off) & 1 == 0, (
                f"{vol}: WRITE_ZEROES with NO_HOLE left a hole at {off}: {runs}")


BLOCK_STATUS_RACE = r"""
import time
w = connect(sys.argv[1]); c = connect(sys.argv[1])
B, N, seconds, phase = 4096, 8192, float(sys.argv[2]), sys.argv[3]
blk = os.urandom(B)
if phase == "prefill":   # every even block of the first 32 MiB: many extents to seek over
    for i in range(0, N, 2):
        w.pwrite(blk, i * B)
    w.flush()
    done()
    sys.exit(0)
bad, queries, b = [], 0, 1
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and b < N:
    w.pwrite(blk, b * B)            # acknowledged before the query below is sent
    ext = extents(c, 8 << 20, b * B)
    queries += 1
    if ext and ext[0][1] & 2:       # NBD_STATE_ZERO claimed for the block just written
        again = extents(c, B, b * B)
        bad.append([b, ext[0], c.pread(B, b * B) == blk, again[:1]])
    b += 2
done(queries=queries, nbad=len(bad), bad=bad[:5])
"""


def test_libnbd_block_status_never_reports_acknowledged_data_as_zero(jsnap_server):
    """Right after a WRITE is acknowledged (on one connection), BLOCK_STATUS (on another,
    multi-conn) must not report that block as NBD_STATE_ZERO while the destager moves it to
    production: clients (nbdcopy, qemu-img convert) skip ranges reported as zero, so a wrong
    answer silently drops data from a copy. Each query starts at the block just written and
    spans 8 MiB of alternating data and holes, so the server seeks for a while."""
    srv = jsnap_server({"vol": "64M"})
    _libnbd(BLOCK_STATUS_RACE, srv.uri("vol"), "0", "prefill")
    wait_destaged(srv)
    r = _libnbd(BLOCK_STATUS_RACE, srv.uri("vol"), "3", "race")
    assert r["queries"] > 100, r
    assert r["nbad"] == 0, (
        f"{r['nbad']} of {r['queries']} BLOCK_STATUS replies claimed an acknowledged, "
        f"just-written block reads as zeroes ([block, first extent, data reads back right, "
        f"status on re-query]): {r['bad']}")
