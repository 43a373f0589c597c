"""Model-based test: the engine against a plain bytes model per volume and per snapshot.

Rules write / zeroes / trim / snapshot create / delete / rollback / destage-some / flush /
crash-and-reopen drive one engine (destager stepped by the test, files on CrashFS). After
every step every volume and every live snapshot must read exactly as the model.

Crashes drop (or tear) every write not yet synced. The model keeps, for every acknowledged
operation, the journal seq it ended at and the state after it; after a crash the engine must
come back as the state of the newest operation whose records all survived, and never older
than the last durable one (DESIGN invariants 3 and 4).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
import pytest
from crashfs import CrashFS
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from jsnap.core.check import check_thin
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool
from jsnap.stores import changes

CHUNK = 4096
VOL_SIZE = 8 * CHUNK
VOLUMES = ("a", "b")
MAX_SNAPS = 6

EXAMPLES = int(os.environ.get("JSNAP_MODEL_EXAMPLES", "300"))


class EngineModel(RuleBasedStateMachine):
    durability = "writeback"
    thin: tuple[str, ...] = ()  # volumes created thin (pool extents) instead of raw files

    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="jsnap-model-")
        self.path = os.path.join(self.tmp, "pool")
        init_pool(self.path, journal_size=1 << 20, chunk_size=CHUNK, durability=self.durability)
        self.fs = CrashFS(seed=0)
        self.e = Engine.open(self.path, start_destager=False, opener=self.fs)
        self.vols: dict[str, bytes] = {}
        for name in VOLUMES:
            self.e.volume_create(name, VOL_SIZE, thin=name in self.thin)
            self.vols[name] = bytes(VOL_SIZE)
        self.snaps: dict[tuple[str, str], bytes] = {}
        self.counter = 0
        # (seq after the op, model state after it); pruned to what a crash could come back to
        self.history: list[tuple[int, dict[str, bytes], dict[tuple[str, str], bytes]]] = []
        self._remember(self.e.journal.written_seq)

    def teardown(self) -> None:
        if not self.e.closed:
            self.e.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _remember(self, seq: int) -> None:
        self.history.append((seq, dict(self.vols), dict(self.snaps)))
        durable = self.e.journal.durable_seq
        # Forget states older than the newest one that is already durable.
        while len(self.history) > 1 and self.history[1][0] <= durable:
            self.history.pop(0)

    @initialize(seed=st.integers(0, 2**32 - 1))
    def seed_fs(self, seed: int) -> None:
        self.fs.rng.seed(seed)

    def _apply(self, vol: str, offset: int, data: bytes) -> None:
        cur = self.vols[vol]
        self.vols[vol] = cur[:offset] + data + cur[offset + len(data):]

    # -- data rules ---------------------------------------------------------------------------

    @rule(vol=st.sampled_from(VOLUMES), offset=st.integers(0, VOL_SIZE - 1),
          length=st.integers(1, 3 * CHUNK), seed=st.integers(0, 2**16), fua=st.booleans())
    def write(self, vol: str, offset: int, length: int, seed: int, fua: bool) -> None:
        length = min(length, VOL_SIZE - offset)
        data = random.Random(seed).randbytes(length)
        seq = self.e.write(self.e.volume(vol), offset, data, fua=fua)
        self._apply(vol, offset, data)
        self._remember(seq)

    @rule(vol=st.sampled_from(VOLUMES), offset=st.integers(0, VOL_SIZE - 1),
          length=st.integers(1, 3 * CHUNK), how=st.sampled_from(["trim", "zero", "no-hole"]))
    def zero(self, vol: str, offset: int, length: int, how: str) -> None:
        length = min(length, VOL_SIZE - offset)
        v = self.e.volume(vol)
        if how == "trim":
            seq = self.e.trim(v, offset, length)
        else:
            seq = self.e.write_zeroes(v, offset, length, no_hole=how == "no-hole")
        self._apply(vol, offset, bytes(length))
        self._remember(seq)

    @rule()
    def flush(self) -> None:
        self.e.flush()
        self._remember(self.e.journal.written_seq)

    @rule(n=st.integers(1, 12))
    def destage_some(self, n: int) -> None:
        self.e.destage(n)

    # -- snapshot rules -----------------------------------------------------------------------

    @precondition(lambda self: len(self.snaps) < MAX_SNAPS * len(VOLUMES))
    @rule(target=snapshots, vol=st.sampled_from(VOLUMES))
    def snapshot_create(self, vol: str) -> tuple[str, str]:
        self.counter += 1
        name = f"s{self.counter}"
        self.e.snapshot_create(self.e.volume(vol), name)
        self.snaps[(vol, name)] = self.vols[vol]
        self._remember(self.e.journal.written_seq)
        return (vol, name)

    @rule(snap=consumes(snapshots))
    def snapshot_delete(self, snap: tuple[str, str]) -> None:
        if snap not in self.snaps:
            return  # lost in a crash before it was created (cannot happen: creates are durable)
        self.e.snapshot_delete(self.e.volume(snap[0]), snap[1])
        del self.snaps[snap]
        self._remember(self.e.journal.written_seq)

    @rule(snap=snapshots)
    def rollback(self, snap: tuple[str, str]) -> None:
        if snap not in self.snaps:
            return
        self.e.snapshot_rollback(self.e.volume(snap[0]), snap[1])
        self.vols[snap[0]] = self.snaps[snap]
        self._remember(self.e.journal.written_seq)

    # -- crashes ------------------------------------------------------------------------------

    @rule(mode=st.sampled_from(["drop", "tear"]))
    def crash_and_reopen(self, mode: str) -> None:
        durable = self.e.journal.durable_seq
        self.e.abandon()
        self.fs.crash(mode)
        self.e = Engine.open(self.path, start_destager=False, opener=self.fs)
        recovered = self.e.journal.written_seq
        assert recovered >= durable, f"lost durable records: recovered {recovered} < {durable}"
        # The newest remembered state whose records all came back.
        candidates = [h for h in self.history if h[0] <= recovered]
        assert candidates, (recovered, [h[0] for h in self.history])
        seq, vols, snaps = candidates[-1]
        self.vols, self.snaps = dict(vols), dict(snaps)
        self.history = [(seq, vols, snaps)]

    @rule()
    def close_and_reopen(self) -> None:
        self.e.close()
        self.e = Engine.open(self.path, start_destager=False, opener=self.fs)
        self.history = [(self.e.journal.written_seq, dict(self.vols), dict(self.snaps))]

    # -- invariant ----------------------------------------------------------------------------

    @invariant()
    def reads_match_model(self) -> None:
        e = self.e
        for name, want in self.vols.items():
            got = bytes(e.read(e.volume(name), 0, VOL_SIZE))
            assert got == want, f"volume {name} differs at byte {_first_diff(got, want)}"
        live = {(e.by_id[s.vol].name, s.name) for s in e.snapshot_list()}
        assert live == set(self.snaps), (live, set(self.snaps))
        for (vol, name), want in self.snaps.items():
            v = e.volume(vol)
            got = bytes(e.read_snapshot(e.snapshot(v, name), 0, VOL_SIZE))
            assert got == want, f"snapshot {vol}@{name} differs at byte {_first_diff(got, want)}"
        if self.thin:
            problems = check_thin(e)
            assert not problems, problems
            # With no snapshot left, every extent in use is a mapped chunk: deletes reclaimed.
            if not e.backlog.pending and not e.snapshot_list():
                mapped = sum(e.volume(n).thin.mapped for n in self.thin)  # type: ignore[union-attr]
                assert e.pool.used == mapped, (e.pool.used, mapped)


def _first_diff(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), -1)


class ThinEngineModel(EngineModel):
    """Volume a is thin, b raw: their records share batches."""

    thin = ("a",)


class BigPieces(EngineModel):
    """Every record spanning two chunks or more takes the big paths: one changes-table piece,
    and on thin volumes one big-trim entry."""

    def __init__(self) -> None:
        self._saved_big = changes.BIG_CHUNKS
        changes.BIG_CHUNKS = 1
        super().__init__()

    def teardown(self) -> None:
        changes.BIG_CHUNKS = self._saved_big
        super().teardown()


class ThinBigPieceEngineModel(BigPieces):
    thin = ("a", "b")


class SyncEngineModel(EngineModel):
    durability = "sync"


class BigPieceEngineModel(BigPieces):
    pass


_settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestEngineWriteback = EngineModel.TestCase
TestEngineWriteback.settings = _settings
TestEngineSync = SyncEngineModel.TestCase
TestEngineSync.settings = settings(_settings, max_examples=max(EXAMPLES // 3, 50))
TestEngineBigPieces = BigPieceEngineModel.TestCase
TestEngineBigPieces.settings = settings(_settings, max_examples=max(EXAMPLES // 3, 50))
TestEngineThin = ThinEngineModel.TestCase
TestEngineThin.settings = settings(_settings, max_examples=max(EXAMPLES // 2, 50))
TestEngineThinBigPieces = ThinBigPieceEngineModel.TestCase
TestEngineThinBigPieces.settings = settings(_settings, max_examples=max(EXAMPLES // 3, 50))


@pytest.mark.slow
def test_model_long() -> None:
    """The same machine with ten times the examples: `pytest -m slow`."""
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(EngineModel, settings=settings(_settings, max_examples=EXAMPLES * 10))
