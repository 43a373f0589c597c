"""fio's NBD engine (libnbd inside fio) with data verification against `jsnap serve`."""

from __future__ import annotations

import json

import pytest
from interop_util import require_tool, run

pytestmark = pytest.mark.interop


def fio(uri: str, out_dir, name: str, *opts: str, timeout: float = 120.0) -> dict:
    """Run one fio job on `uri`; fail on a non-zero exit or any job error; return the JSON."""
    exe = require_tool("fio")
    out = out_dir / f"{name}.json"
    cmd = [exe, f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
           f"--output={out}", "--verify_state_save=0", *opts]
    p = run(cmd, timeout=timeout, check=False, cwd=out_dir)  # fio drops files in its cwd
    text = out.read_text() if out.exists() else ""
    assert p.returncode == 0, f"fio exited {p.returncode}\n{p.stdout}\n{p.stderr}\n{text}"
    report = json.loads(text[text.index("{"):])
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']} error {job['error']}: {text}"
    return report


VERIFY = ["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--serialize_overlap=1"]


def _written(report: dict) -> tuple[int, int]:
    w = sum(j["write"]["io_bytes"] for j in report["jobs"])
    r = sum(j["read"]["io_bytes"] for j in report["jobs"])
    return w, r


def test_fio_randwrite_4k_iodepth32_verifies(jsnap_server, tmp_path):
    srv = jsnap_server({"vol": "64M"})
    report = fio(srv.uri("vol"), tmp_path, "rw4k", "--rw=randwrite", "--bs=4k", "--size=32M",
                 "--iodepth=32", *VERIFY)
    w, r = _written(report)
    assert w == 32 << 20 and r == 32 << 20, (w, r)  # every block written, every one verified


def test_fio_randwrite_mixed_block_sizes_verifies(jsnap_server, tmp_path):
    srv = jsnap_server({"vol": "64M"})
    report = fio(srv.uri("vol"), tmp_path, "rwmix", "--rw=randwrite",
                 "--bssplit=512/10:4k/40:16k/20:64k/20:256k/10", "--size=32M", "--iodepth=32",
                 "--offset=4M", *VERIFY)
    w, r = _written(report)
    assert w >= 16 << 20 and r == w, (w, r)


def test_fio_randwrite_sync_durability_verifies(jsnap_server, tmp_path):
    srv = jsnap_server({"vol": "32M"}, durability="sync")
    report = fio(srv.uri("vol"), tmp_path, "rwsync", "--rw=randwrite",
                 "--bssplit=4k/60:8k/20:64k/20", "--size=16M", "--iodepth=32", *VERIFY)
    w, r = _written(report)
    assert w >= 8 << 20 and r == w, (w, r)


def test_fio_two_jobs_over_tcp_with_flushes_verify(jsnap_server, tmp_path):
    """Two connections at once over TCP, each on its own 16 MiB region, FLUSH every 32 writes."""
    srv = jsnap_server({"vol": "64M"}, tcp=True)
    report = fio(srv.uri("vol", tcp=True), tmp_path, "tcp2", "--rw=randwrite", "--bs=4k",
                 "--size=16M", "--numjobs=2", "--offset_increment=16M", "--iodepth=32",
                 "--fsync=32", *VERIFY)
    w, r = _written(report)
    assert w == 32 << 20 and r == 32 << 20, (w, r)


def test_fio_small_journal_wraps_under_backpressure_verifies(jsnap_server, tmp_path):
    """A 4 MiB journal under 32 MiB of 4 KiB..1 MiB writes at iodepth 32: the journal wraps
    many times and writers wait for the destager (backpressure); nothing may hang or rot."""
    srv = jsnap_server({"vol": "64M"}, journal_size="4M")
    report = fio(srv.uri("vol"), tmp_path, "smalljournal", "--rw=randwrite",
                 "--bssplit=4k/40:64k/30:256k/20:1m/10", "--size=32M", "--iodepth=32",
                 *VERIFY, timeout=60)
    w, r = _written(report)
    assert w >= 16 << 20 and r == w, (w, r)
