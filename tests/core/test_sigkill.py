"""SIGKILL a real writer process at random moments; the reopened pool must hold what it acked.

A worker process (sigkill_worker.py) runs a seeded random workload on two 1 MiB volumes of a
pool with a 2 MiB journal (it wraps many times per round and writers meet backpressure) and
the destager thread running: 4 KiB-stamped writes, write-zeroes/trim, snapshot create and
delete. It prints an intent line before each operation and an ack line after it. The test
kills it with SIGKILL after a random delay, reopens the pool in-process and checks, against a
model built from the ack lines (DESIGN invariants 3 and 4, and snapshot semantics):

  * data: every 4 KiB block holds its value as of the last durable point (every ack in
    `sync` mode; the last completed flush, or snapshot create/delete, in `writeback` mode) or
    the value of a later op covering it (acked but not yet flushed, or in flight): so no
    durable write is lost, and no block is torn or holds anything never written to it. Each
    op is one journal record, so it is all-or-nothing: a record may not show in one block
    while another block of it shows an older value. In `sync` mode this means: exactly the
    acked state, plus possibly the whole in-flight op;
  * snapshots: every snapshot acked created and not acked deleted exists and reads exactly
    the state of the acked operations before its creation; one whose create or delete was in
    flight may or may not exist, and reads right if it does; no other snapshot exists.

The same pool goes on from round to round (the next worker recovers the pool the previous
check reopened and closed; version numbers and snapshot names continue), so recovery of a
recovered pool is exercised. Some rounds kill the worker early, while it may still be
recovering. Every other check reopens with the destager thread running, so the checks also
read while the replayed journal is being destaged. Half the workers and half the checks
replay with the journal scanned by a forked child (journal/replay.py, FORK_SCAN_AFTER = 0), so that
path meets torn tails of real kills, and workers killed while their scanner runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from sigkill_worker import BLOCK, NBLOCKS, VOL_SIZE, VOLUMES, decode, stamp

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.stores.journal import replay as jreplay

pytestmark = pytest.mark.crash

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sigkill_worker.py")
JOURNAL_SIZE = 2 << 20
CHUNK = 4096
ROUNDS = 20
SLOW_ROUNDS = 200
_ZERO = bytes(BLOCK)

# A block's model state: (version, zero). (0, True) is "never written".
BlockState = tuple[int, bool]
State = dict[str, list[BlockState]]


def _block_bytes(vol: str, block: int, st: BlockState) -> bytes:
    version, zero = st
    return _ZERO if zero else stamp(vol, block, version)


def _image(vol: str, blocks: list[BlockState]) -> bytes:
    return b"".join(_block_bytes(vol, b, st) for b, st in enumerate(blocks))


def _diff(vol: str, got: bytes, want: list[BlockState], limit: int = 8) -> str:
    out = []
    for b, st in enumerate(want):
        g = got[b * BLOCK : (b + 1) * BLOCK]
        if g != _block_bytes(vol, b, st):
            out.append(
                f"block {b}: has {decode(g)}, expected "
                f"{'zeroes' if st[1] else f'v{st[0]}'}"
            )
            if len(out) >= limit:
                out.append("...")
                break
    return "; ".join(out)


class Campaign:
    """One pool killed round after round, and the model of what it must hold."""

    def __init__(self, root: str, durability: str, flush_every: int = 0, seed: int = 0) -> None:
        self.root = root
        self.pool = os.path.join(root, "pool")
        self.durability = durability
        self.flush_every = flush_every
        self.seed = seed
        init_pool(self.pool, journal_size=JOURNAL_SIZE, chunk_size=CHUNK, durability=durability)
        e = Engine.open(self.pool, start_destager=False)
        for name in VOLUMES:
            e.volume_create(name, VOL_SIZE)
        e.close()
        self.state: State = {v: [(0, True)] * NBLOCKS for v in VOLUMES}
        self.snaps: dict[tuple[str, str], list[BlockState]] = {}
        self.version = 0  # highest version any worker may have used
        self.snapno = 1  # next snapshot number never used
        self.rounds = 0
        self.acked_total = 0
        self.broken: str | None = None

    # -- one round ----------------------------------------------------------------------------

    def run_round(self, index: int) -> None:
        if self.broken:
            pytest.skip(f"an earlier round failed: {self.broken}")
        try:
            self._run_round(index)
        except BaseException as exc:
            self.broken = f"round {index}: {type(exc).__name__}"
            raise

    def _run_round(self, index: int) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        seed = rng.randrange(1 << 30)
        cfg = {
            "pool": self.pool,
            "seed": seed,
            "version": self.version,
            "snapno": self.snapno,
            "flush_every": self.flush_every,
            "fork_scan": index % 4 in (1, 2),
        }
        out_path = os.path.join(self.root, f"round{index}.out")
        err_path = os.path.join(self.root, f"round{index}.err")
        early = index % 5 == 4  # kill while the worker may still be opening/recovering
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, WORKER, json.dumps(cfg)], stdout=out, stderr=err
            )
        try:
            if early:
                time.sleep(rng.uniform(0.05, 0.4))
            else:
                self._wait_ready(proc, out_path, err_path)
                time.sleep(rng.uniform(0.2, 1.5))
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        with open(err_path, "rb") as f:
            err_text = f.read().decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, (
            f"round {index} (seed {seed}): worker exited with {proc.returncode} before the "
            f"kill:\n{err_text[-3000:]}"
        )
        with open(out_path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        self._check(index, seed, lines, with_destager=index % 2 == 1)
        self.rounds += 1

    def _wait_ready(self, proc: subprocess.Popen, out_path: str, err_path: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(out_path, "rb") as f:
                if b'"op":"ready"' in f.read(4096):
                    return
            if proc.poll() is not None:
                with open(err_path, "rb") as f:
                    pytest.fail(f"worker died while opening the pool:\n{f.read().decode()[-3000:]}")
            time.sleep(0.01)
        pytest.fail("worker did not open the pool within 30 s")

    # -- the model of one round ---------------------------------------------------------------

    @staticmethod
    def _apply(state: State, op: dict) -> State:
        new = dict(state)
        vol = op["vol"]
        blocks = list(new[vol])
        for b in range(op["block"], op["block"] + op["nblocks"]):
            blocks[b] = (op["version"], op["op"] == "zero")
        new[vol] = blocks
        return new

    def _check(self, index: int, seed: int, lines: list[str], with_destager: bool) -> None:
        where = f"round {index} (worker seed {seed}, {self.durability})"
        events: list[dict] = []
        for i, line in enumerate(lines):
            try:
                events.append(json.loads(line))
            except ValueError:
                # Only the very last line can be cut short by the kill.
                assert i == len(lines) - 1, f"{where}: bad worker output line {i}: {line!r}"

        cur: State = self.state  # after every acked op
        durable: State = cur  # after the last durable point
        later: list[dict] = []  # data ops after the durable point, acked or in flight
        snaps = dict(self.snaps)
        in_flight: dict | None = None
        acked = 0
        for ev in events:
            if "intent" in ev:
                assert in_flight is None, f"{where}: two ops in flight: {in_flight} and {ev}"
                in_flight = ev["intent"]
                self.version = max(self.version, in_flight.get("version", 0))
                if in_flight["op"] == "snap":
                    self.snapno = max(self.snapno, int(in_flight["name"][1:]) + 1)
                continue
            kind = ev["op"]
            if kind == "ready":
                continue
            assert ev == in_flight, f"{where}: ack {ev} does not match intent {in_flight}"
            in_flight = None
            acked += 1
            if kind in ("write", "zero"):
                cur = self._apply(cur, ev)
                if self.durability == "sync":
                    durable, later = cur, []
                else:
                    later.append(ev)
                continue
            # flush, and snapshot create/delete (durable before they return, with all before)
            durable, later = cur, []
            if kind == "snap":
                snaps[(ev["vol"], ev["name"])] = cur[ev["vol"]]
            elif kind == "snapdel":
                del snaps[(ev["vol"], ev["name"])]
        maybe_snap: tuple[tuple[str, str], list[BlockState]] | None = None
        maybe_gone: tuple[str, str] | None = None
        if in_flight is not None:
            kind = in_flight["op"]
            if kind in ("write", "zero"):
                later.append(in_flight)
            elif kind == "snap":
                maybe_snap = ((in_flight["vol"], in_flight["name"]), cur[in_flight["vol"]])
            elif kind == "snapdel":
                maybe_gone = (in_flight["vol"], in_flight["name"])
        self.acked_total += acked

        fork_after = jreplay.FORK_SCAN_AFTER
        if index % 4 >= 2:  # replay with the scan in a forked child (journal/replay.py)
            jreplay.FORK_SCAN_AFTER = 0
        try:
            e = Engine.open(self.pool, start_destager=with_destager)
        finally:
            jreplay.FORK_SCAN_AFTER = fork_after
        try:
            got = {v: bytes(e.read(e.volume(v), 0, VOL_SIZE)) for v in VOLUMES}
            recovered = self._match_blocks(where, got, durable, later, in_flight)
            # Snapshots: the acked ones exist, the in-flight one may, nothing else does.
            listed = {(v, s.name) for v in VOLUMES for s in e.snapshot_list(e.volume(v))}
            required = set(snaps) - ({maybe_gone} if maybe_gone else set())
            allowed = set(snaps) | ({maybe_snap[0]} if maybe_snap else set())
            assert required <= listed, (
                f"{where}: acknowledged snapshots missing after recovery: "
                f"{sorted(required - listed)} (in flight: {in_flight})"
            )
            assert listed <= allowed, (
                f"{where}: unexpected snapshots after recovery: {sorted(listed - allowed)} "
                f"(in flight: {in_flight})"
            )
            images = dict(snaps)
            if maybe_snap is not None:
                images[maybe_snap[0]] = maybe_snap[1]
            for v, name in sorted(listed):
                img = bytes(e.read_snapshot(e.snapshot(e.volume(v), name), 0, VOL_SIZE))
                want = images[(v, name)]
                assert img == _image(v, want), (
                    f"{where}: snapshot {v}@{name} reads wrong: {_diff(v, img, want)}"
                )
        finally:
            e.close()
        # What the pool now holds is the base of the next round.
        self.state = recovered
        self.snaps = {k: images[k] for k in listed}

    @staticmethod
    def _match_blocks(where: str, got: dict[str, bytes], durable: State, later: list[dict],
                      in_flight: dict | None) -> State:
        """Check every block against what it may hold; return the state it does hold.

        A block holds its value at the last durable point or the value of a later op covering
        it (acked, or in flight); never anything else (not a torn block, not a value from
        before the durable point). Each op is one journal record, so all-or-nothing: if a
        block shows op R, no other block of R may show something older than R.
        """
        # matches[(vol, block)]: indexes of the options whose bytes the block holds
        # (-1 = the durable value, i = later[i]); zeroes can match several.
        matches: dict[tuple[str, int], set[int]] = {}
        recovered: State = {}
        bad = []
        for v in VOLUMES:
            blocks = list(durable[v])
            for b in range(NBLOCKS):
                data = got[v][b * BLOCK : (b + 1) * BLOCK]
                options = [(-1, durable[v][b])] + [
                    (i, (op["version"], op["op"] == "zero"))
                    for i, op in enumerate(later)
                    if op["vol"] == v and op["block"] <= b < op["block"] + op["nblocks"]
                ]
                m = {i for i, st in options if data == _block_bytes(v, b, st)}
                if not m:
                    want = "zeroes" if durable[v][b][1] else f"v{durable[v][b][0]}"
                    later_vs = [f"v{st[0]}" for i, st in options[1:]]
                    bad.append(f"{v} block {b}: has {decode(data)}, expected {want}"
                               + (f" or one of {later_vs}" if later_vs else ""))
                    continue
                matches[(v, b)] = m
                blocks[b] = dict(options)[max(m)]
            recovered[v] = blocks
        if bad:
            pytest.fail(
                f"{where}: {len(bad)} blocks hold a value they may not (after the last durable "
                f"point: {len(later)} ops, in flight: {in_flight}): " + "; ".join(bad[:8])
            )
        for i, op in enumerate(later):
            ms = [matches[(op["vol"], b)] for b in range(op["block"], op["block"] + op["nblocks"])]
            # Some block can only be R's value (R is there), yet another can only be from
            # before R (R is not there): a torn record.
            if any(m == {i} for m in ms) and any(max(m) < i for m in ms):
                pytest.fail(
                    f"{where}: op {op} recovered in part only (per block, the ops whose value "
                    f"it holds: {[sorted(m) for m in ms]}; -1 = from before the op)"
                )
        return recovered

    # -- the end ------------------------------------------------------------------------------

    def final_check(self) -> None:
        e = Engine.open(self.pool, start_destager=True)
        try:
            e.wait_destaged(timeout=60)
            assert e.stats()["journal_records"] == 0
            self._check_exact(e, "after a clean reopen and wait_destaged()")
        finally:
            e.close()
        # And once more from production and the snapshot store alone (empty journal).
        e = Engine.open(self.pool, start_destager=False)
        try:
            assert e.stats()["journal_records"] == 0
            self._check_exact(e, "after destaging everything and reopening")
        finally:
            e.close()

    def _check_exact(self, e: Engine, when: str) -> None:
        for v in VOLUMES:
            got = bytes(e.read(e.volume(v), 0, VOL_SIZE))
            assert got == _image(v, self.state[v]), (
                f"volume {v} {when}: {_diff(v, got, self.state[v])}"
            )
        listed = {(v, s.name) for v in VOLUMES for s in e.snapshot_list(e.volume(v))}
        assert listed == set(self.snaps), f"snapshots {when}: {sorted(listed)} != model"
        for (v, name), want in sorted(self.snaps.items()):
            img = bytes(e.read_snapshot(e.snapshot(e.volume(v), name), 0, VOL_SIZE))
            assert img == _image(v, want), f"snapshot {v}@{name} {when}: {_diff(v, img, want)}"


@pytest.fixture(scope="module")
def sync_campaign(tmp_path_factory):
    return Campaign(str(tmp_path_factory.mktemp("sigkill-sync")), "sync", seed=1)


@pytest.mark.parametrize("round_index", range(ROUNDS), ids=lambda i: f"round{i:02d}")
def test_sigkill_round_keeps_acked_writes_and_snapshots(sync_campaign, round_index):
    sync_campaign.run_round(round_index)


def test_sigkill_campaign_final_reopen_destages_to_model(sync_campaign):
    if sync_campaign.broken:
        pytest.skip(f"an earlier round failed: {sync_campaign.broken}")
    if sync_campaign.rounds == 0:
        sync_campaign.run_round(0)
    # The campaign must have done real work, or the rounds checked nothing.
    assert sync_campaign.acked_total > 0
    sync_campaign.final_check()


def test_sigkill_writeback_keeps_flushed_writes(tmp_path):
    c = Campaign(str(tmp_path), "writeback", flush_every=10, seed=2)
    for i in range(2):
        c.run_round(i)
    assert c.acked_total > 0
    c.final_check()


@pytest.mark.slow
def test_sigkill_many_rounds_keep_acked_writes_and_snapshots(tmp_path):
    c = Campaign(str(tmp_path), "sync", seed=3)
    for i in range(SLOW_ROUNDS):
        c.run_round(i)
    c.final_check()
