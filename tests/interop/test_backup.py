"""Backups against a live `jsnap serve`: export/import through the server, `snapshot diff`
through the admin API, `qemu:dirty-bitmap:SNAP` contexts read by nbdinfo and libnbd, and the
README's full + incremental backup recipe run verbatim with the real tools.

The README blocks run in bash from the server's base directory (which holds `pool` and
`nbd.sock`, as the recipe assumes), with `python3` resolving to the interpreter that has
libnbd (nbdsh is `python3 -m nbd`) and `jsnap` to this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from certs import make_pki
from interop_util import (
    HERE,
    make_image,
    require_libnbd_python,
    require_tool,
    run,
    run_libnbd_json,
)

from jsnap.core.layout import DEFAULT_CHUNK_SIZE

pytestmark = pytest.mark.interop

MiB = 1 << 20
CS = DEFAULT_CHUNK_SIZE  # the pools' chunk size


def _sparse_image(path: Path, size: int, seed: int) -> bytes:
    """make_image's mix of data and zero runs, written sparse (zero runs as holes)."""
    data = make_image(path, size, seed)
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4096):
            block = data[off:off + 4096]
            if block.count(0) != len(block):
                f.seek(off)
                f.write(block)
    return data


def _qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    run([*args, uri])


def _compare(a: str, b: str, fmt_a: str = "raw", fmt_b: str = "raw") -> None:
    p = run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b], check=False)
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_import_round_trip_through_the_server(jsnap_server, tmp_path, fmt):
    srv = jsnap_server({"vol": "16M"})
    src = tmp_path / "src.img"
    want = _sparse_image(src, 16 * MiB, 11)
    if fmt == "qcow2":
        qsrc = tmp_path / "src.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(qsrc)])
        src = qsrc
    p = srv.cli("import", str(src), "vol", "--format", fmt)
    assert p.stdout.startswith(f"imported {src} ({fmt}) into vol"), p.stdout
    assert p.stderr == ""
    _compare(srv.uri("vol"), str(src), "raw", fmt)
    srv.cli("snapshot", "create", "vol", "s1")
    # Change the live volume: the snapshot export must still be the imported image.
    _qemu_io(srv.uri("vol"), "write -P 0x5a 0 1M", "write -z 8M 4M")
    out = tmp_path / f"s1.{fmt}"
    p = srv.cli("export", "vol@s1", str(out), "--format", fmt)
    assert p.stdout.startswith(f"exported vol@s1 to {out} ({fmt})") and p.stderr == "", p
    _compare(str(src), str(out), fmt, fmt)
    _compare(str(out), srv.uri("vol@s1"), fmt, "raw")
    if fmt == "raw":
        assert out.read_bytes() == want
        # Sparse: the image's zero runs (about half of it) are holes in the export.
        assert out.stat().st_blocks * 512 < 12 * MiB, out.stat().st_blocks
    # Round trip into a new volume made for it, through the server.
    srv.cli("import", str(out), "copy", "--create")
    _compare(srv.uri("copy"), str(src), "raw", fmt)
    vols = {v["name"]: v for v in json.loads(srv.cli("volume", "list", "--json").stdout)}
    assert vols["copy"]["size"] == 16 * MiB and vols["copy"]["thin"]


def test_export_of_a_sparse_volume_stays_sparse(jsnap_server, tmp_path):
    srv = jsnap_server({"big": "256M"})
    _qemu_io(srv.uri("big"), "write -P 1 0 64k", "write -P 2 200M 64k")
    out = tmp_path / "big.img"
    srv.cli("export", "big", str(out))
    assert out.stat().st_size == 256 * MiB
    assert out.stat().st_blocks * 512 <= 1 * MiB, out.stat().st_blocks
    _compare(str(out), srv.uri("big"))


def test_import_into_a_too_small_volume_is_one_line(jsnap_server, tmp_path):
    srv = jsnap_server({"small": "1M"})
    img = tmp_path / "x.img"
    make_image(img, 2 * MiB, 12)
    p = srv.cli("import", str(img), "small", check=False)
    assert p.returncode == 1 and p.stdout == "", p
    assert p.stderr == (f"jsnap: error: volume 'small' (1M) is smaller than {img} (2M): grow "
                        f"it with 'jsnap volume resize small --size 2M' or import with --create "
                        f"into a new volume\n")


def test_tls_only_server_is_refused_in_one_line(jsnap_server, tmp_path):
    """A server requiring TLS everywhere: export/import cannot use it and says why (the
    admin API tells the CLI before it tries)."""
    d = make_pki(tmp_path / "pki")
    srv = jsnap_server({"vol": "1M"}, start=False)
    srv.start("--tls-cert", str(d.server_cert), "--tls-key", str(d.server_key))
    p = srv.cli("export", "vol", str(tmp_path / "x.img"), check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p
    assert "requires TLS" in p.stderr, p.stderr


def test_admin_reports_nbd_listeners(jsnap_server):
    srv = jsnap_server({"vol": "1M"}, tcp=True)
    info = srv.admin("GET", "/v1/nbd")
    assert info == {"unix": [srv.socket], "tcp": [["127.0.0.1", srv.port]], "tls": "off"}


def _map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = run(["nbdinfo", f"--map={context}", "--json", uri]).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def _dirty(entries: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(off, n) for off, n, t in entries if t & 1]


def test_nbdinfo_dirty_bitmap_shows_exactly_the_changed_chunks(jsnap_server):
    require_tool("nbdinfo")
    srv = jsnap_server({"vol": "8M"})
    _qemu_io(srv.uri("vol"), "write -P 1 0 8M")
    srv.cli("snapshot", "create", "vol", "s1")
    _qemu_io(srv.uri("vol"),
             f"write -P 2 {CS + 100} 10",  # inside chunk 1
             f"write -P 3 {3 * CS - 1} 2",  # chunks 2 and 3 (merged with 1)
             f"write -z {10 * CS} {2 * CS}",  # chunks 10-11: zeroes count as changes
             f"discard {100 * CS} {CS}",  # chunk 100: so do trims
             f"write -P 4 {8 * MiB - 1} 1")  # the last chunk
    srv.cli("snapshot", "create", "vol", "s2")
    _qemu_io(srv.uri("vol"), f"write -P 5 {50 * CS} 1")  # after s2: only in the live map
    entries = _map(srv.uri("vol@s2"), "qemu:dirty-bitmap:s1")
    want = [(CS, 3 * CS), (10 * CS, 2 * CS), (100 * CS, CS), (8 * MiB - CS, CS)]
    assert _dirty(entries) == want, entries
    assert entries[0][0] == 0 and sum(n for _, n, _ in entries) == 8 * MiB  # whole export
    text = run(["nbdinfo", "--map=qemu:dirty-bitmap:s1", srv.uri("vol@s2")]).stdout
    assert re.search(rf"^\s*{CS}\s+{3 * CS}\s+1\s+dirty$", text, re.M), text
    # The CLI (through the admin API) agrees with the NBD view.
    d = json.loads(srv.cli("snapshot", "diff", "vol", "s1", "s2", "--json").stdout)
    assert [(x["offset"], x["length"]) for x in d["extents"]] == want
    # The live volume: since s2, and since s1 (everything above plus the later write).
    assert _dirty(_map(srv.uri("vol"), "qemu:dirty-bitmap:s2")) == [(50 * CS, CS)]
    assert _dirty(_map(srv.uri("vol"), "qemu:dirty-bitmap:s1")) == sorted(
        [*want, (50 * CS, CS)])
    # s1's export has no older snapshot: no bitmap to offer.
    p = run(["nbdinfo", "--map=qemu:dirty-bitmap:s1", srv.uri("vol@s1")], check=False)
    assert p.returncode != 0


def test_libnbd_lists_and_negotiates_bitmaps_with_base_allocation(jsnap_server):
    srv = jsnap_server({"vol": "4M"})
    srv.cli("snapshot", "create", "vol", "a")
    _qemu_io(srv.uri("vol"), f"write -P 7 {2 * CS} {CS}")
    srv.cli("snapshot", "create", "vol", "b")
    srv.cli("snapshot", "create", "vol", "c")
    r = run_libnbd_json(r"""
import json, sys
import nbd
uri = sys.argv[1]
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
listed = {}
for q in ([], ["qemu:"], ["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:b"]):
    names = []
    h.clear_meta_contexts()
    for name in q:
        h.add_meta_context(name)
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    listed[",".join(q)] = names
h.opt_abort()
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("qemu:dirty-bitmap:a")
h.connect_uri(uri)
got = {}
def cb(ctx, off, entries, error):
    got[ctx] = list(zip(entries[0::2], entries[1::2]))
    return 0
h.block_status(h.get_size(), 0, cb)
print(json.dumps({"listed": listed, "got": got,
                  "both": [h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
                           h.can_meta_context("qemu:dirty-bitmap:a")]}))
""", srv.uri("vol@c"))
    bitmaps = ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]  # older than c only
    assert r["listed"][""] == ["base:allocation", *bitmaps], r
    assert r["listed"]["qemu:"] == bitmaps and r["listed"]["qemu:dirty-bitmap:"] == bitmaps
    assert r["listed"]["qemu:dirty-bitmap:b"] == ["qemu:dirty-bitmap:b"]
    assert r["both"] == [True, True]
    dirty = r["got"]["qemu:dirty-bitmap:a"]
    assert dirty[:2] == [[2 * CS, 0], [CS, 1]] and sum(n for n, _ in dirty) == 4 * MiB, dirty
    assert sum(n for n, _ in r["got"]["base:allocation"]) > 0


def _readme_block(first_line: str) -> str:
    text = (HERE.parent.parent / "README.md").read_text()
    section = text.split("\n## Backups\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no README block starting {first_line!r} under '## Backups'")


def _recipe_env(tmp_path: Path) -> dict[str, str]:
    """PATH where `python3` has libnbd (nbdsh runs `python3 -m nbd`) and `jsnap` is this
    checkout run by this interpreter."""
    py = require_libnbd_python()
    bin_dir = tmp_path / "recipe-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").unlink(missing_ok=True)
    (bin_dir / "python3").symlink_to(py)
    wrapper = bin_dir / "jsnap"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m jsnap "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _run_env(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (f"recipe failed ({p.returncode}):\n{script}\nstdout:\n"
                               f"{p.stdout}\nstderr:\n{p.stderr}")
    return p


def test_readme_full_and_incremental_backup_recipe(jsnap_server, tmp_path):
    for tool in ("nbdinfo", "nbdsh", "qemu-io", "cp"):
        require_tool(tool)
    env = _recipe_env(tmp_path)
    srv = jsnap_server({"disk0": "32M"})
    base = Path(srv.pool).parent
    assert Path(srv.socket) == base / "nbd.sock"  # what the recipe's S=$PWD/nbd.sock names
    uri = srv.uri("disk0")
    _qemu_io(uri, "write -P 1 0 4M", "write -P 2 20M 3M", f"write -P 3 {31 * MiB} 12345")
    _run_env(_readme_block("# full backup"), base, env)
    full = base / "full.img"
    _compare(str(full), srv.uri("disk0@s1"))
    # The guest goes on: overwrites, unaligned writes, zeroes and trims across chunks.
    _qemu_io(uri, "write -P 4 1M 100k", f"write -P 5 {10 * MiB + 3} 70000",
             "write -z 20M 1M", "discard 22M 512k", f"write -P 6 {32 * MiB - 512} 512")
    p = _run_env(_readme_block("# incremental backup"), base, env)
    assert "Images are identical" in p.stdout, p.stdout
    s2 = base / "s2.img"
    assert s2.read_bytes() == run_bytes(srv.uri("disk0@s2"), tmp_path)
    # Only the dirty extents were copied: a handful of chunks, not the 32M export.
    dirty = json.loads((base / "dirty.json").read_text())
    assert 0 < sum(e["length"] for e in dirty if e["type"] & 1) <= 2 * MiB, dirty
    # Breaking the chain must show: the full backup alone differs from s2.
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(full),
             srv.uri("disk0@s2")], check=False)
    assert p.returncode == 1, p.stdout

    # The same against the live volume, with the writes quiesced: changes since s2.
    _qemu_io(uri, f"write -P 7 {5 * MiB} 4096", f"discard 0 {CS}")
    live_map = base / "live.json"
    live_map.write_text(run(["nbdinfo", "--map=qemu:dirty-bitmap:s2", "--json", uri]).stdout)
    shutil.copyfile(s2, base / "live.img")
    _run_env(f"""nbdsh -u '{uri}' -c '
import json
with open("live.img", "r+b") as f:
    for e in json.load(open("live.json")):
        if e["type"] & 1:
            f.seek(e["offset"])
            f.write(h.pread(e["length"], e["offset"]))
'""", base, env)
    assert [(e["offset"], e["length"]) for e in json.loads(live_map.read_text())
            if e["type"] & 1] == [(0, CS), (5 * MiB, CS)]
    _compare(str(base / "live.img"), uri)


def run_bytes(uri: str, tmp_path: Path) -> bytes:
    """An export's bytes, copied with nbdcopy."""
    out = tmp_path / "copy.img"
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()

