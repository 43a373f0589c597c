"""The destager runs on a Backlog alone: no Engine (issue 20's boundary, which issue 24's
destager process will put a pipe behind).

The parts are built here from the shared pool and the stores, the way Engine.open builds
them; records are journaled, indexed and admitted the way the engine's write path does;
then the destager, handed only the Backlog, destages them: production gets the data, a
snapshot marker gets its preserved copy first, the checkpoint passes everything."""

from __future__ import annotations

import threading
import time

from jsnap.core.backlog import Backlog
from jsnap.core.layout import init_pool
from jsnap.core.pool import Pool
from jsnap.core.recovery import Replay
from jsnap.core.reservations import Reservations
from jsnap.core.volumes import Snapshot, Volume
from jsnap.stores import journal as jn
from jsnap.stores.changes import ChangesTable
from jsnap.stores.files import OsFile

CS = 4096


def test_a_destager_runs_on_a_backlog_without_an_engine(tmp_path) -> None:
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CS, pool_size=256 * CS)
    pool = Pool.open(path, OsFile)
    jfile = OsFile(pool.journal_path)
    try:
        raw = pool.create_volume("raw", 16 * CS, preallocate=False, thin=False)
        thin = pool.create_volume("thin", 16 * CS, preallocate=False, thin=True)
        by_id = {raw.id: raw, thin.id: thin}
        lock = threading.Lock()
        cv = threading.Condition(lock)
        cat = pool.catalog
        journal = jn.Journal(jfile, cv, generation=1,
                             checkpoint_pos=cat.get_int("checkpoint_pos"),
                             checkpoint_seq=cat.get_int("checkpoint_seq"))
        changes = ChangesTable(CS)
        resv = Reservations(pool.extents, pool.chunk_shift)
        backlog = Backlog(lock, cv, journal, jfile, changes, resv, cat, pool.extents,
                          pool.slots, by_id, drop_big_folios=False)
        Replay(by_id, changes, resv, pool.extents, backlog.pending, remap_done=-1).run(journal)

        def write(vol: Volume, offset: int, data: bytes) -> None:  # Engine._append_writes
            with lock:
                budget = [0]
                if vol.thin is not None:
                    budget[0] = resv.reserve(vol, [(jn.WRITE, offset, len(data))])
                rec = journal.append(jn.WRITE, vol.id, offset, len(data), (data,), len(data))
                changes.index(vol.id, rec, vol.newest_snap)
                if vol.thin is not None:
                    resv.admit(vol, rec, budget)
                backlog.admit([rec])
                resv.release(budget[0])

        def snapshot(vol: Volume, name: str) -> Snapshot:  # Engine.snapshot_create
            with lock:
                rec = journal.append(jn.SNAP_CREATE, vol.id, 0, 0, (name.encode(),),
                                     len(name), aux=int(time.time() * 1e6), name=name)
                snap = Snapshot(rec.seq, vol.id, name, time.time())
                vol.add_snapshot(snap)
                backlog.admit([rec])
                journal.sync_upto(rec.seq)
            return snap

        for vol in (raw, thin):
            write(vol, 0, b"a" * 2 * CS)
        s_raw, s_thin = snapshot(raw, "s"), snapshot(thin, "s")
        for vol in (raw, thin):
            write(vol, 512, b"b" * CS)  # over a chunk both snapshots need

        assert backlog.destage() == 6
        assert not backlog.pending and changes.npieces == 0
        assert cat.get_int("checkpoint_seq") == journal.next_seq  # the checkpoint passed all
        new = b"a" * 512 + b"b" * CS + b"a" * (CS - 512)
        for vol in (raw, thin):
            assert vol.file.pread(2 * CS, 0) == new, vol.name
        # Chunk 0's old content was preserved for each snapshot before production changed:
        # in a store slot (raw) and in a pool extent (thin).
        slot = cat.find_preserved(raw.id, 0, s_raw.seq)
        assert slot is not None and pool.slots.file.pread(CS, slot * CS) == b"a" * CS
        ext = cat.find_preserved(thin.id, 0, s_thin.seq)
        assert ext is not None and ext >= 0
        f, off = pool.extents.locate(ext)
        assert f.pread(CS, off) == b"a" * CS
        # Chunks 0 and 1 of each volume, copied once each: the write covers neither whole.
        assert backlog.preserved_copies == 4
    finally:
        for vol in (raw, thin):
            vol.file.close()
        jfile.close()
        pool.close()
