"""Replay of a long journal through the engine: the part a forked child scans.

Past FORK_SCAN_AFTER (stores/journal/replay.py) bytes of records, a child process scans
the journal and this process indexes what it streams. The engine must come out of replay in
the same state, to the last reservation, as when one process does it all: checked here on a
crashed pool with every record kind (small and multi-chunk writes, REMAP, zeroes, big trims,
snapshot markers) on thick and thin volumes, and by reading every volume and snapshot back.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from jsnap.core.check import check_thin
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.core.recovery import Replay
from jsnap.core.writes import REMAP_MIN
from jsnap.stores import journal as jn
from jsnap.stores.journal import replay as jreplay

CS = 16 * 1024
SIZE = 4 << 20


def _crashed_pool(tmp_path) -> tuple[str, dict[str, bytes]]:
    """A pool left as a crash leaves it, its journal holding a few thousand records past a
    checkpoint that moved; returns it and what each image read before the crash."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=32 << 20, chunk_size=CS)
    e = Engine.open(path, start_destager=False)
    rng = random.Random(5)
    vols = [e.volume_create("thick", SIZE), e.volume_create("thin1", SIZE, thin=True),
            e.volume_create("thin2", SIZE, thin=True)]
    snaps = 0
    for i in range(3000):
        v = rng.choice(vols)
        op = rng.random()
        if op < 0.75:
            n = rng.choice([512, 4096, 4096, 4096, 2 * CS + 100])
            off = rng.randrange(0, SIZE - n)
            e.write(v, off, rng.randbytes(n))
        elif op < 0.8 and v.thin is not None:
            off = rng.randrange(0, (SIZE - REMAP_MIN) // CS) * CS
            e.write(v, off, rng.randbytes(REMAP_MIN))  # whole chunks: a REMAP record
        elif op < 0.85:
            off = rng.randrange(0, SIZE // 2)
            big = v.name != "thin1"  # thin1's writes stay off the big-trim path
            e.write_zeroes(v, off, rng.choice([4096, 2 * CS] + [70 * CS] * big))
        elif op < 0.9:
            off = rng.randrange(0, SIZE // 2)
            e.trim(v, off, rng.choice([4096, 2 * CS] + [70 * CS] * (v.name != "thin1")))
        elif op < 0.95:
            snaps += 1
            e.snapshot_create(v, f"s{snaps}")
        elif v.snaps:
            e.snapshot_delete(v, rng.choice(sorted(v.snaps)))
        if i == 600 or e.journal.fill() > 0.9:
            e.destage()  # the checkpoint is not at the journal's start
    e.flush()
    images = {}
    for v in e.volume_list():
        images[v.name] = bytes(e.read(v, 0, SIZE))
        for s in e.snapshot_list(v):
            images[f"{v.name}@{s.name}"] = bytes(e.read_snapshot(s, 0, SIZE))
    assert len(e.backlog.pending) > 2000
    e.abandon()
    return path, images


def _state(e: Engine) -> dict[str, object]:
    j = e.journal
    return {
        "pending": [(tuple(r), r.name, r.exts) for r in e.backlog.pending],
        "changes": ({v: dict(t) for v, t in e.changes.volumes.items()}, e.changes.big,
                    e.changes.npieces),
        "reserved": (dict(e.resv.by_seq), e.pool.reserved, e.backlog.remap_bytes,
                     sorted(e.pool.free)),
        "volumes": {v.name: (dict(e.resv.cover.get(v.id, {})), e.resv.big.get(v.id, []),
                             v.snap_seqs, sorted(v.snaps))
                    for v in e.volume_list()},
        "journal": (j.head, j.used, j.next_seq, j.durable_seq, j.replay_end),
    }


def _replay_each(self: Replay, recs: list[jn.Record]) -> None:
    """Replay.batch without its inlined common case: the reference."""
    self.pending.extend(recs)
    for rec in recs:
        self.one(rec)


def test_forked_replay_leaves_the_engine_as_one_process_does(tmp_path, monkeypatch):
    path, images = _crashed_pool(tmp_path)
    states = []
    for fork_after in (-1, 1 << 40, 0, 100_000):
        with monkeypatch.context() as m:
            if fork_after < 0:
                m.setattr(Replay, "batch", _replay_each)
                fork_after = 1 << 40
            states.append(_opened_state(path, images, m, fork_after))
    kinds = {r[0][1] for r in states[0]["pending"]}  # type: ignore[index, union-attr]
    assert {jn.WRITE, jn.REMAP, jn.ZEROES, jn.TRIM, jn.SNAP_CREATE} <= kinds
    assert states[1] == states[0], "the inlined replay of a WRITE differs from Replay.one"
    assert states[2] == states[0], "a replay scanned by a child from the start differs"
    assert states[3] == states[0], "a replay scanned by a child part way differs"
    # and the pool destages to the same images afterwards
    e = Engine.open(path, start_destager=False)
    e.destage()
    for v in e.volume_list():
        assert bytes(e.read(v, 0, SIZE)) == images[v.name]
    assert check_thin(e) == []
    e.close()


def _opened_state(path: str, images: dict[str, bytes], m, fork_after: int) -> dict[str, object]:
    m.setattr(jreplay, "FORK_SCAN_AFTER", fork_after)
    m.setattr(jreplay, "_BATCH", 1024 if fork_after else 97)
    e = Engine.open(path, start_destager=False)
    try:
        for v in e.volume_list():
            assert bytes(e.read(v, 0, SIZE)) == images[v.name], (fork_after, v.name)
            for s in e.snapshot_list(v):
                assert bytes(e.read_snapshot(s, 0, SIZE)) == images[f"{v.name}@{s.name}"]
        assert check_thin(e) == []
        return _state(e)
    finally:
        e.abandon()


_SLOW_REPLAY = """
import sys, time
from jsnap.stores.journal import replay as jreplay
from jsnap.core.engine import Engine
from jsnap.core.recovery import Replay
jreplay.FORK_SCAN_AFTER, jreplay._BATCH = 0, 1
real = Replay.batch
def stalled(self, recs):
    real(self, recs)
    print("replaying", flush=True)
    time.sleep(120)
Replay.batch = stalled
Engine.open(sys.argv[1], start_destager=False)
"""


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.crash
def test_a_server_killed_during_a_forked_replay_leaves_the_pool_free(tmp_path):
    """SIGKILL a process while its scanner child runs: the child holds no copy of the pool
    lock (a restart at once must not find the pool busy) and dies with its parent."""
    path, images = _crashed_pool(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_REPLAY, path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "replaying\n", proc.stderr.read() if proc.stderr else ""
        (child,) = _children(proc.pid)
        fds = os.listdir(f"/proc/{child}/fd")
        held = {os.path.realpath(f"/proc/{child}/fd/{fd}") for fd in fds}
        assert os.path.join(path, "lock") not in held
    finally:
        proc.kill()
        proc.wait()
    e = Engine.open(path, start_destager=False)  # at once: PoolBusy if the child held it
    try:
        for v in e.volume_list():
            assert bytes(e.read(v, 0, SIZE)) == images[v.name]
    finally:
        e.close()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and _state_of(child) != "Z":
        assert time.monotonic() < deadline, f"scanner {child} outlived its killed parent"
        time.sleep(0.01)


def _state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
