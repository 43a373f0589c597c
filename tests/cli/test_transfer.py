"""export / import / snapshot diff without a server (the pool opened in-process), and the
pieces they are built from: zero runs, allocation of snapshots, dirty bitmaps, meta context
selection, the progress line.

Runs through the real CLI where the user would; qcow2 needs qemu-img (skipped, or failed in
CI, without it). Served pools are covered in tests/interop/test_backup.py."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys

import pytest
from conftest import require_tool

from jsnap.cli import transfer
from jsnap.cli.progress import Progress
from jsnap.core import cbt
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.errors import NotFound

MiB = 1 << 20
CS = 4096


def jsnap(*args: str, check: bool = True, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "jsnap", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"jsnap {args} exited {p.returncode}: {p.stderr}")
    return p


def image(path, size: int, seed: int, data_ranges: list[tuple[int, int]]) -> bytes:
    """A sparse raw image: random bytes in `data_ranges`, holes elsewhere."""
    rng = random.Random(seed)
    buf = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data_ranges:
            chunk = rng.randbytes(n)
            buf[off:off + n] = chunk
            f.seek(off)
            f.write(chunk)
    return bytes(buf)


DATA = [(0, 3000), (1 * MiB + 123, 200_000), (5 * MiB, 64 * 1024), (8 * MiB - 777, 777)]


@pytest.fixture
def pool(tmp_path):
    path = str(tmp_path / "pool")
    jsnap("init", path, "--journal-size", "4M", "--chunk-size", "4K")
    return path


def test_raw_round_trip_sparse_and_silent(pool, tmp_path):
    src = tmp_path / "in.img"
    want = image(src, 8 * MiB, 1, DATA)
    p = jsnap("-p", pool, "import", str(src), "vol", "--create")
    assert p.stderr == ""  # no progress line when stderr is not a terminal
    assert p.stdout.startswith(f"imported {src} (raw) into vol: 8.0M in"), p.stdout
    vols = json.loads(jsnap("-p", pool, "volume", "list", "--json").stdout)
    assert [(v["name"], v["size"]) for v in vols] == [("vol", 8 * MiB)]
    # Only what the image holds was written: the thin volume maps about that much.
    assert vols[0]["allocated"] <= 512 * 1024, vols
    out = tmp_path / "out.img"
    p = jsnap("-p", pool, "export", "vol", str(out))
    assert p.stderr == "" and p.stdout.startswith(f"exported vol to {out} (raw)"), p
    assert out.read_bytes() == want
    # Sparse: the file holds about the data, not 8 MiB (pieces of 64 KiB at most each).
    assert out.stat().st_blocks * 512 <= 600 * 1024, out.stat().st_blocks


def test_snapshot_export_is_the_image_at_snapshot_time(pool, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    want_a = image(a, 4 * MiB, 2, [(0, 100_000), (3 * MiB, 5000)])
    want_b = image(b, 4 * MiB, 3, [(50_000, 70_000), (2 * MiB, 4096)])
    jsnap("-p", pool, "import", str(a), "vol", "--create")
    jsnap("-p", pool, "snapshot", "create", "vol", "s1")
    # Import into the existing volume: B's holes must zero what A had there (the data
    # A had at 3M is gone from the live volume, still in the snapshot).
    jsnap("-p", pool, "import", str(b), "vol")
    with Engine.open(pool, start_destager=False) as e:
        e.destage()  # the zeroed chunks are now live holes (journaled ones count as data)
        assert cbt.allocation(e, e.volume("vol"), None, 3 * MiB, 4096) == [(4096, 3)]
    jsnap("-p", pool, "export", "vol@s1", str(tmp_path / "s1.img"))
    jsnap("-p", pool, "export", "vol", str(tmp_path / "live.img"))
    assert (tmp_path / "s1.img").read_bytes() == want_a
    assert (tmp_path / "live.img").read_bytes() == want_b


def test_raw_volume_round_trip(pool, tmp_path):
    """A raw (file per volume) volume: its allocation map comes from the file's holes."""
    src = tmp_path / "in.img"
    want = image(src, 8 * MiB, 4, DATA)
    jsnap("-p", pool, "volume", "create", "rv", "--size", "8M", "--raw")
    jsnap("-p", pool, "import", str(src), "rv")
    jsnap("-p", pool, "snapshot", "create", "rv", "s")
    out = tmp_path / "out.img"
    jsnap("-p", pool, "export", "rv@s", str(out))
    assert out.read_bytes() == want
    assert out.stat().st_blocks * 512 <= 600 * 1024


def test_qcow2_round_trip(pool, tmp_path):
    qemu_img = require_tool("qemu-img")
    raw = tmp_path / "in.img"
    image(raw, 6 * MiB, 5, [(4096, 70_000), (5 * MiB, 1000)])
    qcow = tmp_path / "in.qcow2"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                   check=True)
    p = jsnap("-p", pool, "import", str(qcow), "vol", "--create")  # format from the magic
    assert "(qcow2) into vol" in p.stdout, p.stdout
    out = tmp_path / "out.qcow2"
    p = jsnap("-p", pool, "export", "vol", str(out))  # format from the name
    assert "(qcow2)" in p.stdout and p.stderr == "", p
    cmp = subprocess.run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", str(qcow),
                          str(out)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = json.loads(subprocess.run([qemu_img, "info", "--output=json", str(out)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 6 * MiB


@pytest.mark.parametrize("args, needle", [
    (["import", "{img}", "small"], "volume 'small' (1M) is smaller than"),
    (["import", "{img}", "small", "--create"], "volume 'small' already exists"),
    (["import", "{img}", "small@s"], "snapshots are read-only"),
    (["import", "{missing}", "small"], "No such file or directory"),
    (["export", "small@nosuch", "{out}"], "volume 'small' has no snapshot named 'nosuch'"),
    (["export", "nosuch", "{out}"], "no volume named 'nosuch'"),
    (["export", "small", "{dir}"], "is not a regular file"),
    (["snapshot", "diff", "small", "nosuch"], "has no snapshot named 'nosuch'"),
], ids=["too-small", "create-existing", "into-snapshot", "missing-file", "unknown-snapshot",
        "unknown-volume", "export-to-dir", "diff-unknown"])
def test_user_mistakes_are_one_line(pool, tmp_path, args, needle):
    image(tmp_path / "in.img", 2 * MiB, 6, [(0, 10)])
    jsnap("-p", pool, "volume", "create", "small", "--size", "1M")
    args = [a.format(img=tmp_path / "in.img", missing=tmp_path / "nope.img",
                     out=tmp_path / "out.img", dir=tmp_path) for a in args]
    p = jsnap("-p", pool, *args, check=False)
    assert p.returncode == 1, p
    assert p.stderr.startswith("jsnap: error: ") and needle in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "out.img").exists()


def test_qcow2_without_qemu_img_is_one_line(pool, tmp_path):
    image(tmp_path / "in.img", MiB, 7, [(0, 10)])
    jsnap("-p", pool, "import", str(tmp_path / "in.img"), "vol", "--create")
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    p = jsnap("-p", pool, "export", "vol", str(tmp_path / "x.qcow2"), check=False, env=env)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p
    assert "qcow2 images need qemu-img" in p.stderr, p.stderr


def test_failed_create_import_leaves_no_volume(pool, tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(transfer.QCOW2_MAGIC + b"\0" * 600)  # says qcow2, is not
    require_tool("qemu-img")
    p = jsnap("-p", pool, "import", str(bad), "vol", "--create", check=False)
    assert p.returncode == 1 and "cannot read" in p.stderr and "as qcow2" in p.stderr, p
    assert json.loads(jsnap("-p", pool, "volume", "list", "--json").stdout) == []


def test_snapshot_diff_cli(pool, tmp_path):
    jsnap("-p", pool, "volume", "create", "vol", "--size", "1M")
    jsnap("-p", pool, "snapshot", "create", "vol", "s1")
    with Engine.open(pool, start_destager=False) as e:
        v = e.volume("vol")
        e.write(v, 5000, b"x" * 10)  # chunk 1
        e.write(v, 8192, b"y")  # chunk 2: merges with 1
        e.trim(v, 40 * CS, 2 * CS)  # chunks 40-41
    jsnap("-p", pool, "snapshot", "create", "vol", "s2")
    with Engine.open(pool, start_destager=False) as e:
        e.write(e.volume("vol"), MiB - 1, b"z")  # the last chunk, after s2
    d = json.loads(jsnap("-p", pool, "snapshot", "diff", "vol", "s1", "s2", "--json").stdout)
    assert d["extents"] == [{"offset": CS, "length": 2 * CS},
                            {"offset": 40 * CS, "length": 2 * CS}]
    assert (d["from"], d["to"], d["changed"], d["size"]) == ("s1", "s2", 4 * CS, MiB)
    live = json.loads(jsnap("-p", pool, "snapshot", "diff", "vol", "s2", "--json").stdout)
    assert live["to"] is None and live["extents"] == [{"offset": MiB - CS, "length": CS}]
    text = jsnap("-p", pool, "snapshot", "diff", "vol", "s1", "s2").stdout.splitlines()
    assert text[0].split() == ["OFFSET", "LENGTH"] and text[1].split() == ["4096", "8192"]
    assert text[-1] == "2 extent(s), 16K of 1M changed from vol@s1 to vol@s2"
    p = jsnap("-p", pool, "snapshot", "diff", "vol", "s2", "s1", check=False)
    assert p.returncode == 1 and "is older than" in p.stderr, p


# -- building blocks ----------------------------------------------------------------------------


def test_zero_runs_split_on_piece_boundaries():
    P = transfer.PIECE
    buf = bytearray(3 * P)
    buf[P + 5] = 1
    # Held at image offset P // 2: pieces end at P, 2P, 3P in the image.
    assert transfer._runs(buf, P // 2, 3 * P) == [
        (0, P // 2, True), (P // 2, P // 2 + P, False), (P // 2 + P, 3 * P, True)]
    assert transfer._runs(bytearray(10), 0, 10) == [(0, 10, True)]
    assert transfer._runs(bytearray(b"\0\1"), 0, 2) == [(0, 2, False)]


def test_changed_extents_merge_and_clip():
    assert cbt.changed_extents([], 4096, 10_000) == []
    assert cbt.changed_extents([0, 1, 3, 4, 5, 9], 10, 95) == [(0, 20), (30, 30), (90, 5)]
    assert cbt.changed_extents([2], 4096, 9000) == [(8192, 808)]


def test_select_contexts():
    bm = ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]
    base = cbt.BASE_ALLOCATION
    assert cbt.select_contexts([], True, bm) == [base, *bm]
    assert cbt.select_contexts([], False, bm) == []
    assert cbt.select_contexts(["qemu:"], True, bm) == bm
    assert cbt.select_contexts(["qemu:dirty-bitmap:"], True, bm) == bm
    assert cbt.select_contexts(["qemu:dirty-bitmap:"], False, bm) == []  # SET: exact names
    assert cbt.select_contexts(["qemu:dirty-bitmap:b", "base:"], False, bm) == [base, bm[1]]
    assert cbt.select_contexts(["qemu:dirty-bitmap:c", "x:y"], False, bm) == []


@pytest.fixture
def eng(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=4 << 20, chunk_size=CS, pool_size=64 << 20)
    e = Engine.open(path, start_destager=False)
    yield e
    e.close()


def _cover(runs, offset):
    """(start, end, flags) of (length, flags) runs from offset."""
    out = []
    for n, f in runs:
        out.append((offset, offset + n, f))
        offset += n
    return out


def test_snapshot_allocation_is_the_snapshots_not_the_live_volumes(eng):
    v = eng.volume_create("v", 64 * CS, thin=True)
    eng.write(v, 0, b"a" * (8 * CS))
    eng.write(v, 20 * CS, b"b" * CS)
    s = eng.snapshot_create(v, "s")
    eng.trim(v, 0, 8 * CS)  # live holes where the snapshot has data
    eng.write(v, 40 * CS, b"c" * CS)  # live data where the snapshot has a hole
    eng.destage()
    runs = _cover(cbt.allocation(eng, v, s, 0, 64 * CS), 0)
    data = [(a, b) for a, b, f in runs if not f & 2]
    assert data == [(0, 8 * CS), (20 * CS, 21 * CS)], runs
    assert runs[-1][1] == 64 * CS and runs[0][0] == 0
    live = _cover(cbt.allocation(eng, v, None, 0, 64 * CS), 0)
    assert [(a, b) for a, b, f in live if not f & 2] == [(20 * CS, 21 * CS), (40 * CS, 41 * CS)]
    # A window starting inside a changed hole.
    part = _cover(cbt.allocation(eng, v, s, 3 * CS + 7, 10 * CS), 3 * CS + 7)
    assert part[0] == (3 * CS + 7, 8 * CS, 0) and part[-1][1] == 13 * CS + 7, part


def test_dirty_bitmap_snapshot_and_live(eng):
    v = eng.volume_create("v", 32 * CS, thin=True)
    eng.snapshot_create(v, "s1")
    eng.write(v, 3 * CS + 1, b"x" * CS)  # chunks 3-4
    s2 = eng.snapshot_create(v, "s2")
    eng.write(v, 10 * CS, b"y")  # chunk 10, after s2
    assert cbt.bitmap_names(eng, v, s2) == ["qemu:dirty-bitmap:s1"]
    assert cbt.bitmap_names(eng, v, None) == ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2"]
    bm = cbt.DirtyBitmap(eng, v, "s1", s2)
    assert bm.extents(0, 32 * CS) == [(3 * CS, 0), (2 * CS, 1), (27 * CS, 0)]
    assert bm.extents(4 * CS, CS) == [(CS, 1)]  # clipped to the request
    assert bm.extents(5 * CS, 2 * CS) == [(2 * CS, 0)]
    live = cbt.DirtyBitmap(eng, v, "s2", None)
    assert live.extents(0, 32 * CS) == [(10 * CS, 0), (CS, 1), (21 * CS, 0)]
    eng.write(v, 31 * CS, b"z")  # the live bitmap sees new writes at once
    assert live.extents(30 * CS, 2 * CS) == [(CS, 0), (CS, 1)]
    eng.snapshot_delete(v, "s1")
    with pytest.raises(NotFound):
        bm.extents(0, CS)


def test_dirty_bitmap_caps_extents_per_reply(eng):
    v = eng.volume_create("v", 2 * cbt.MAX_EXTENTS * 2 * CS, thin=True)
    eng.snapshot_create(v, "s")
    for c in range(0, 2 * cbt.MAX_EXTENTS * 2, 2):  # every other chunk
        eng.write(v, c * CS, b"w")
    out = cbt.DirtyBitmap(eng, v, "s", None).extents(0, v.size)
    assert len(out) == cbt.MAX_EXTENTS and all(n == CS for n, _ in out)
    assert [f for _, f in out[:4]] == [1, 0, 1, 0]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_at_most_every_interval():
    now = [100.0]
    tty = _Tty()
    p = Progress(100 * MiB, "export v", stream=tty, clock=lambda: now[0])
    for i in range(1, 51):  # 50 updates in 1 s: about 5 redraws
        now[0] += 0.02
        p.update(i * MiB)
    assert tty.getvalue().count("\r") in (5, 6), tty.getvalue()
    last = tty.getvalue().rsplit("\r", 1)[-1]
    assert re.fullmatch(r"export v: 4\d\.0M / 100\.0M \(4\d\.0%\), 50\.0M/s, ETA 0:01", last), last
    p.close()
    assert tty.getvalue().endswith("\r")
    quiet = io.StringIO()  # not a terminal: nothing at all
    q = Progress(10, stream=quiet)
    q.update(5)
    q.close()
    assert quiet.getvalue() == ""
