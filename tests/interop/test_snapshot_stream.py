"""Snapshots taken through the CLI and the admin socket while libnbd clients stream writes.

Two libnbd writers (stamp_writer.py, one connection each, each on its own half of the
volume) write 4 KiB blocks one request at a time, block i stamped with i, printing issue
and acknowledgement times (CLOCK_MONOTONIC, shared by every process on the host). The test
takes snapshots mid-stream (the first with `jsnap snapshot create`, the others with a direct
admin-socket request, whose short window makes the check sharp), noting when each call
started (t0) and returned (t1). Each snapshot must then be a consistent cut of each stream:

  * every block acknowledged before t0 is in the snapshot with its stamp;
  * no block whose write was issued after t1 is in the snapshot (since a writer has one
    request in flight, that is every block after the first one acknowledged after t1);
  * blocks in between may be either, but the cut is a prefix: once a block is missing, no
    later block is present; and no block is ever torn or holds anything but its own stamp.

Each snapshot is read twice: right away, and once the destager has emptied the journal (the
snapshot then reads chunks preserved in the snapshot store).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
from interop_util import (
    HERE,
    require_libnbd_python,
    require_tool,
    run,
    run_libnbd,
    wait_destaged,
)

pytestmark = pytest.mark.interop

BLOCK = 4096
NBLOCKS = 32768  # a 128 MiB volume: far more than the writer reaches during the test

READ_STAMPS = r"""
import json, struct, sys
import nbd
BLOCK = 4096
MAGIC = 0x4A534E4150535450
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = int(sys.argv[2])
out = []
step = 1024
for first in range(0, n, step):
    count = min(step, n - first)
    data = h.pread(count * BLOCK, first * BLOCK)
    for k in range(count):
        b = data[k * BLOCK:(k + 1) * BLOCK]
        i = first + k
        if b.count(0) == BLOCK:
            out.append("z")
        elif b == struct.pack("<QQ", MAGIC, i) * (BLOCK // 16):
            out.append(1)
        else:
            magic, idx = struct.unpack_from("<QQ", b)
            out.append(f"bad:{idx if magic == MAGIC else 'garbage'}")
print(json.dumps(out))
"""


class StampWriter:
    """stamp_writer.py in the background; its ack lines parsed as they arrive."""

    def __init__(self, uri: str, first: int, count: int, flush_every: int = 0) -> None:
        py = require_libnbd_python()
        self.proc = subprocess.Popen(
            [py, str(HERE / "stamp_writer.py"), uri, str(first), str(count), str(flush_every)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.acks: dict[int, tuple[float, float]] = {}  # block -> (t_issue, t_ack)
        self.flushes: list[tuple[int, float]] = []  # (last block covered, t_ack)
        self.error: str | None = None
        self.finished = False  # the writer's output ended
        self.completed = False  # it wrote every block it was asked to
        self.ready = threading.Event()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            with self.cond:
                if parts[0] == "ready":
                    self.ready.set()
                elif parts[0] == "w":
                    self.acks[int(parts[1])] = (float(parts[2]), float(parts[3]))
                elif parts[0] == "f":
                    self.flushes.append((int(parts[1]), float(parts[2])))
                elif parts[0] == "e":
                    self.error = line[2:].strip()
                elif parts[0] == "done":
                    self.completed = True
                self.cond.notify_all()
        with self.cond:
            self.finished = True
            self.ready.set()
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float = 30.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred() or self.finished, timeout):
                pytest.fail(f"stamp writer: condition not met in {timeout} s "
                            f"({len(self.acks)} acks)")

    def stop(self) -> None:
        """Ask the writer to stop after its current request; wait for it."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("stamp writer did not stop")
        self.thread.join(10)
        assert self.proc.returncode == 0, (
            f"stamp writer exited {self.proc.returncode}: {self.proc.stderr.read()}")


def read_stamps(uri: str, nblocks: int) -> list:
    """Per block of the export: 1 = its own stamp, "z" = zeroes, "bad:..." = anything else."""
    p = run_libnbd(READ_STAMPS, uri, str(nblocks), timeout=120)
    return json.loads(p.stdout)


def test_snapshot_create_mid_write_stream_is_a_consistent_cut(jsnap_server):
    """Two writers on two connections (each on its own half of the volume), three snapshots."""
    half = NBLOCKS // 2
    srv = jsnap_server({"vol": f"{NBLOCKS * BLOCK // (1 << 20)}M"})
    writers = [StampWriter(srv.uri("vol"), first, half) for first in (0, half)]
    for w in writers:
        assert w.ready.wait(30), "stamp writer did not connect"
    cuts = []  # (name, t0, t1)
    try:
        for k in range(3):
            for w in writers:
                seen = len(w.acks)
                w.wait_for(lambda w=w, seen=seen: len(w.acks) >= seen + 300)
            t0 = time.monotonic()
            if k == 0:  # the CLI: a process start-up inside the window
                srv.cli("snapshot", "create", "vol", f"s{k}")
            else:  # the admin socket directly: a window of a few milliseconds
                srv.admin("POST", "/v1/volumes/vol/snapshots", {"name": f"s{k}"})
            t1 = time.monotonic()
            cuts.append((f"s{k}", t0, t1))
        # Let the streams run well past the last snapshot.
        for w in writers:
            w.wait_for(lambda w=w: sum(ti > cuts[-1][2] for ti, _ in w.acks.values()) >= 300)
    finally:
        for w in writers:
            w.stop()

    stamps = {}  # export -> per-block list
    for phase in ("live", "destaged"):
        if phase == "destaged":
            wait_destaged(srv)  # snapshots now read preserved chunks from the snapshot store
        stamps[phase, "vol"] = read_stamps(srv.uri("vol"), NBLOCKS)
        for name, _, _ in cuts:
            stamps[phase, name] = read_stamps(srv.uri(f"vol@{name}"), NBLOCKS)

    for w in writers:
        assert w.error is None, w.error
        first = min(w.acks)
        last = max(w.acks)
        assert sorted(w.acks) == list(range(first, last + 1))
        assert last < first + half - 1, "a writer reached the end of its range"
        region = slice(first, first + half)
        n_acked = last + 1 - first
        for (phase, export), got in stamps.items():
            got = got[region]
            where = f"vol@{export} ({phase}), writer from block {first}"
            bad = [(first + i, v) for i, v in enumerate(got) if v not in (1, "z")]
            assert not bad, f"{where}: torn or foreign blocks {bad[:10]}"
            if export == "vol":
                assert got[:n_acked] == [1] * n_acked, f"{where}: lost acknowledged blocks"
                assert got[n_acked:] == ["z"] * (half - n_acked), f"{where}: unwritten blocks"
                continue
            _, t0, t1 = next(c for c in cuts if c[0] == export)
            before = [i for i, (_, ta) in w.acks.items() if ta < t0]
            after = [i for i, (ti, _) in w.acks.items() if ti > t1]
            assert len(before) >= 300 and len(after) >= 100, (where, len(before), len(after))
            missing = [i for i in before if got[i - first] != 1]
            assert not missing, (f"{where}: blocks acknowledged before the snapshot call are "
                                 f"missing: {missing[:10]} (of {len(before)})")
            leaked = [i for i in after if got[i - first] != "z"]
            assert not leaked, (f"{where}: blocks written after the snapshot call returned "
                                f"are in the snapshot: {leaked[:10]} (first such block "
                                f"{min(after)})")
            cut = got.index("z") if "z" in got else half
            assert got[cut:] == ["z"] * (half - cut), f"{where}: the cut is not a prefix"
            print(f"{where}: acked before {max(before)}, cut at {first + cut}, "
                  f"first after {min(after)}")


VERIFY_SNAPSHOT_READS = r"""
import json, random, sys, time
import nbd
uri, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
orig = open(path, "rb").read()
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(5)
reads, bad = 0, []
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    n = rng.choice([512, 4096, 65536, 200000, 1 << 20])
    off = rng.randrange(0, len(orig) - n + 1)
    if rng.random() < 0.5:
        off -= off % 4096
    got = h.pread(n, off)
    reads += 1
    if got != orig[off:off + n]:
        first = next(i for i in range(n) if got[i] != orig[off + i])
        bad.append([off, n, off + first])
print(json.dumps({"reads": reads, "bad": bad[:10], "nbad": len(bad)}))
"""


READ_PASSES = r"""
import hashlib, json, sys, time
import nbd
uri, passes, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
out = []
for p in range(passes):
    if p:
        time.sleep(gap)
    hashes = []
    for off in range(0, size, 1 << 20):
        data = h.pread(min(1 << 20, size - off), off)
        hashes.extend(hashlib.sha1(data[i:i + 65536]).hexdigest()[:16]
                      for i in range(0, len(data), 65536))
    out.append(hashes)
print(json.dumps(out))
"""


def test_snapshot_reads_stay_stable_while_volume_is_overwritten(jsnap_server, tmp_path):
    """Readers of snapshot exports race the destager: fio overwrites the volume at full speed
    (chunks are being preserved and production overwritten) for 4 s. Two libnbd readers read
    random ranges of a snapshot taken before, comparing with the image written; snapshots
    taken during the overwrite are each read whole several times while it goes on. Every
    read of a snapshot must give the same bytes, before and after the journal is destaged."""
    fio = require_tool("fio")
    py = require_libnbd_python()
    srv = jsnap_server({"vol": "16M"}, chunk_size="64K")
    orig = tmp_path / "orig.raw"
    orig.write_bytes(os.urandom(16 << 20))
    run([require_tool("nbdcopy"), str(orig), srv.uri("vol")])
    srv.cli("snapshot", "create", "vol", "s0")
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([py, "-c", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    def result(p: subprocess.Popen[str]):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        return json.loads(out)

    writer = subprocess.Popen(
        [fio, "--name=ow", "--ioengine=nbd", f"--uri={srv.uri('vol')}", "--rw=randwrite",
         "--bssplit=4k/60:16k/20:64k/20", "--iodepth=32", "--time_based", "--runtime=4",
         "--norandommap", "--verify_state_save=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    procs.append(writer)
    try:
        random_readers = [spawn(VERIFY_SNAPSHOT_READS, srv.uri("vol@s0"), str(orig), "3.5")
                          for _ in range(2)]
        pass_readers = {}
        for k in range(1, 4):
            time.sleep(0.6)
            srv.admin("POST", "/v1/volumes/vol/snapshots", {"name": f"s{k}"})
            pass_readers[f"s{k}"] = spawn(READ_PASSES, srv.uri(f"vol@s{k}"), "4", "0.2")
        randoms = [result(p) for p in random_readers]
        passes = {name: result(p) for name, p in pass_readers.items()}
        fio_out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0, fio_out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    st = json.loads(srv.cli("status", "--json").stdout)
    assert st["preserved_copies"] > 256, f"too little was preserved during the test: {st}"
    for res in randoms:
        assert res["reads"] > 50, res
        assert res["nbad"] == 0, f"snapshot s0 reads changed under overwrite: {res}"
    wait_destaged(srv)
    for name, runs in passes.items():
        final = result(spawn(READ_PASSES, srv.uri(f"vol@{name}"), "1", "0"))[0]
        for i, hashes in enumerate(runs):
            diff = [c for c, (a, b) in enumerate(zip(hashes, final, strict=True)) if a != b]
            assert not diff, (f"{name}: read pass {i} during the overwrite differs from the "
                              f"read after destaging in 64 KiB chunks {diff[:10]}")
    out = tmp_path / "s0.raw"
    run([require_tool("nbdcopy"), srv.uri("vol@s0"), str(out)])
    run(["cmp", str(orig), str(out)])
