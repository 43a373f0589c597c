"""Memory and restart time of `jsnap serve` over a big pool with a full journal.

Builds (in this process, destager off) a pool of VOLUMES thin volumes of SIZE each with
SNAPS snapshots per volume, destages a sparse prefill (so the thin maps hold entries spread
over every volume), then fills the journal with random 4 KiB writes across the volumes and
abandons the engine as a crash would (nothing destaged, nothing closed). Then it starts
`jsnap serve` on the pool, times it until its "serving" line (journal replay included), and
reads the server's RSS from /proc: right after start-up, and after reading through NBD.

    python bench/restart_rss.py [--volumes 10] [--size 100G] [--snaps 100]
                                [--journal-size 256M] [--prefill 20000] [--drop-caches]
                                [--rounds 1]

With --rounds N the crashed pool is kept aside and each round restarts a fresh copy of it,
so one build gives N restart times (the cold-cache figure on a VM is noisy).

Prints one line per figure. Targets (issue 6): RSS <= 300 MiB for 10 x 100 GiB x 100
snapshots with a full journal; serving again <= 3 s after a crash with a full 1 GiB journal.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import jsnap
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.units import format_size, parse_size

CHUNK = 64 * 1024


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def build(pool: str, a: argparse.Namespace) -> int:
    init_pool(pool, journal_size=a.journal_size, chunk_size=CHUNK)
    e = Engine.open(pool, start_destager=False)
    rng = random.Random(1)
    buf = rng.randbytes(4096)
    vols = [e.volume_create(f"v{i}", a.size, thin=True) for i in range(a.volumes)]
    t0 = time.monotonic()
    for i in range(a.prefill):  # sparse data everywhere: map entries in many pages
        v = vols[i % len(vols)]
        e.write(v, rng.randrange(a.size // 4096) * 4096, buf)
        if i % 2000 == 1999:
            e.destage()
    for s in range(a.snaps):
        for v in vols:
            e.snapshot_create(v, f"s{s}")
    e.destage()
    print(f"prefill {a.prefill} writes, {a.snaps * a.volumes} snapshots, destaged "
          f"({time.monotonic() - t0:.1f} s)")
    n = 0
    j = e.journal
    while j.used + 4096 + 2 * 4096 < j.capacity - j.marker_reserve:  # fill to the brim
        v = vols[n % len(vols)]
        e.write(v, rng.randrange(a.size // 4096) * 4096, buf)
        n += 1
    print(f"journal {format_size(j.capacity)} filled with {n} records "
          f"({j.used * 100 // j.capacity}% used); crashing (abandon)")
    e.abandon()
    return n


def copy_pool(src: str, dst: str) -> None:
    """Copy a pool directory keeping its files sparse (the thin pool file is mostly holes;
    the catalog names files by absolute path, so a pool is only copied back where it was)."""
    subprocess.run(["cp", "-a", "--sparse=always", src, dst], check=True)


def restart(pool: str, sock: str, tmp: str, a: argparse.Namespace,
            measure_rss: bool) -> subprocess.Popen[bytes] | None:
    """Start `jsnap serve` on the crashed pool and time it to its "serving" line."""
    # An installed jsnap has its bytecode (pip compiles it at install time); a checkout run
    # with PYTHONDONTWRITEBYTECODE=1 would compile every module at each start (0.1-0.2 s).
    compileall.compile_dir(os.path.dirname(jsnap.__file__), quiet=1)
    os.sync()  # the pool copy's writeback is not part of the restart
    if a.drop_caches:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    t0 = time.monotonic()
    log = open(os.path.join(tmp, "serve.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jsnap", "-p", pool, "serve",
                             "--socket", sock], stdout=log, stderr=subprocess.STDOUT)
    while True:
        log.seek(0)
        text = log.read()
        if "jsnap: serving" in text:
            break
        if proc.poll() is not None or time.monotonic() - t0 > 120:
            print(text)
            proc.kill()
            return None
        time.sleep(0.01)
    ready = time.monotonic() - t0
    replay = next((line.split("replayed ", 1)[1].split(";")[0]
                   for line in text.splitlines() if "replayed " in line), "?")
    print(f"restart: serving after {ready:.2f} s (replayed {replay})")
    if measure_rss:
        rss, hwm = rss_kib(proc.pid)
        print(f"rss after restart: {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB) with "
              f"{a.volumes} x {format_size(a.size)} thin volumes x {a.snaps} snapshots, "
              f"full {format_size(a.journal_size)} journal")
        # Read a few snapshots and volumes through NBD so lazily built state is counted.
        for i in range(min(a.volumes, 3)):
            subprocess.run(["nbdinfo", "--map", f"nbd+unix:///v{i}@s0?socket={sock}"],
                           capture_output=True, timeout=120)
        rss, hwm = rss_kib(proc.pid)
        print(f"rss after nbdinfo --map of 3 snapshots: {rss / 1024:.0f} MiB "
              f"(peak {hwm / 1024:.0f} MiB)")
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=10)
    ap.add_argument("--size", type=parse_size, default=parse_size("100G"))
    ap.add_argument("--snaps", type=int, default=100)
    ap.add_argument("--journal-size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--prefill", type=int, default=20000)
    ap.add_argument("--drop-caches", action="store_true",
                    help="echo 3 > /proc/sys/vm/drop_caches before the restart (root)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="restart a fresh copy of the crashed pool this many times")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="jsnap-rss-", dir=a.workdir)
    pool, sock = os.path.join(tmp, "pool"), os.path.join(tmp, "nbd.sock")
    proc = None
    try:
        build(pool, a)
        if a.rounds > 1:
            copy_pool(pool, pool + ".crashed")
        for r in range(a.rounds):
            if r:
                shutil.rmtree(pool)
                copy_pool(pool + ".crashed", pool)
            proc = restart(pool, sock, tmp, a, measure_rss=r == a.rounds - 1)
            if proc is None:
                return 1
            proc.terminate()
            proc.wait(timeout=60)
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
