"""The benchmark still runs end to end (a smoke run: no figure is judged here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import require_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.interop
def test_bench_quick_run_measures_jsnap_and_peers(tmp_path):
    for tool in ("fio", "nbdkit", "qemu-nbd", "fincore"):
        require_tool(tool)
    out = tmp_path / "bench.json"
    workdir = tempfile.mkdtemp(prefix="jb", dir="/tmp")  # unix socket paths must stay short
    try:
        p = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick",
             "--workloads", "randwrite4k-qd32,randread4k-qd32,restart-randread4k-qd32",
             "--runtime", "1",
             "--workdir", workdir, "--json", str(out)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    jsnap = [r for r in runs if r["server"] == "jsnap" and "error" not in r]
    assert {r["workload"] for r in jsnap} == {"randwrite4k-qd32", "randread4k-qd32",
                                              "restart-randread4k-qd32"}
    assert all(r["ios"] > 0 for r in jsnap)
    assert any(r["server"] == "nbdkit-file" and "error" not in r for r in runs)
    # The restart runs report the page cache around the read, whatever it was (~12 s here).
    restart = [r for r in runs if r["workload"] == "restart-randread4k-qd32"
               and "error" not in r]
    assert {"jsnap", "nbdkit-file"} <= {r["server"] for r in restart}
    for r in restart:
        assert r["cache"]["files"] and 0 <= r["cache"]["fraction_before"] <= 1
