"""Owners: several engines own the volumes of one pool at once (layout.py "Owners", L6;
catalog.py K5; pool.py P3). Engines of two owners here run in one process, each with its
destager, as they would in two; tests/interop/test_owners.py runs them as two servers."""

from __future__ import annotations

import os
import random
import sqlite3
import threading

import pytest

from jsnap.core.check import check_pool
from jsnap.core.engine import Engine
from jsnap.core.layout import (
    FORMAT_OWNERS,
    FORMAT_VERSION,
    PoolLock,
    create_owner,
    delete_owner,
    list_owners,
)
from jsnap.errors import AlreadyExists, InvalidRequest, NotFound, PoolBusy, PoolError
from jsnap.stores.catalog import SEQ_BITS, Catalog

MiB = 1 << 20


def _fmt(pool: str) -> object:
    cat = Catalog(os.path.join(pool, "pool.db"))
    try:
        return cat.get("format")
    finally:
        cat.close()


def test_two_owners_serve_their_own_volumes_side_by_side_and_survive_reopen(pool_path):
    assert _fmt(pool_path) == FORMAT_VERSION
    create_owner(pool_path, "b", journal_size=4 * MiB)
    assert _fmt(pool_path) == FORMAT_OWNERS  # an owner-blind jsnap now refuses the pool
    a = Engine.open(pool_path)
    b = Engine.open(pool_path, owner="b")
    rng = random.Random(7)
    want: dict[str, bytearray] = {}
    snaps: dict[str, bytes] = {}
    try:
        for e, names in ((a, ("a1", "a2")), (b, ("b1", "b2"))):
            for i, name in enumerate(names):
                e.volume_create(name, 2 * MiB, thin=i == 0)  # one thin, one raw each
                want[name] = bytearray(2 * MiB)
        assert sorted(a.volumes) == ["a1", "a2"] and sorted(b.volumes) == ["b1", "b2"]
        ids = {e.volume(n).id for e in (a, b) for n in e.volumes}
        assert len(ids) == 4  # volume ids are pool-wide
        with pytest.raises(AlreadyExists, match="owned by 'b'"):
            a.volume_create("b1", MiB)
        with pytest.raises(AlreadyExists, match="owned by ''"):
            b.volume_create("a2", MiB)

        def writes(e: Engine, names: tuple[str, ...], seed: int) -> None:
            r = random.Random(seed)
            for step in range(300):
                name = names[step % 2]
                off = r.randrange(0, 2 * MiB - 20000) & ~511
                data = r.randbytes(r.choice([512, 4096, 16384]))
                e.write(e.volume(name), off, data)
                want[name][off:off + len(data)] = data
                if step == 150:
                    for n in names:
                        e.snapshot_create(e.volume(n), "s")
                        snaps[n] = bytes(want[n])

        # Both owners write, snapshot and destage at once (their destagers share the catalog).
        ta = threading.Thread(target=writes, args=(a, ("a1", "a2"), 1))
        tb = threading.Thread(target=writes, args=(b, ("b1", "b2"), 2))
        ta.start(), tb.start()
        ta.join(), tb.join()
        del rng
        a.wait_destaged(), b.wait_destaged()
        for e in (a, b):
            assert check_pool(e) == ([], [])
        sa, sb = a.snapshot(a.volume("a1"), "s"), b.snapshot(b.volume("b1"), "s")
        assert sa.seq < 1 << SEQ_BITS <= sb.seq  # each owner numbers from its own base
        with pytest.raises(PoolBusy, match="owner b"):
            Engine.open(pool_path, owner="b", start_destager=False)
    finally:
        a.close()
        b.close()
    # Reopen in the other order; each sees only its own volumes and snapshots, intact.
    b = Engine.open(pool_path, owner="b", start_destager=False)
    a = Engine.open(pool_path, start_destager=False)
    try:
        for e in (a, b):
            for name in e.volumes:
                v = e.volume(name)
                assert e.read(v, 0, 2 * MiB) == want[name], name
                assert e.read_snapshot(e.snapshot(v, "s"), 0, 2 * MiB) == snaps[name], name
            assert check_pool(e) == ([], [])
        files_a = {f.path for f in a.pool.files.values()}
        files_b = {f.path for f in b.pool.files.values()}
        assert not files_a & files_b and any(p.endswith("data-0.b.dat") for p in files_b)
        assert b.slots.file.path.endswith("snapstore.b.dat")
    finally:
        a.close()
        b.close()


def test_a_crash_of_one_owner_replays_its_own_journal_only(pool_path):
    create_owner(pool_path, "b", journal_size=4 * MiB)
    a = Engine.open(pool_path, start_destager=False)
    b = Engine.open(pool_path, owner="b", start_destager=False)
    a.volume_create("va", MiB)
    b.volume_create("vb", MiB)
    a.write(a.volume("va"), 0, b"A" * 4096)
    b.write(b.volume("vb"), 0, b"B" * 4096)
    b.snapshot_create(b.volume("vb"), "s1")
    b.write(b.volume("vb"), 0, b"C" * 4096)
    b.flush()
    b.abandon()  # b crashes with everything still in its journal; a keeps serving
    a.write(a.volume("va"), 4096, b"a" * 4096)
    a.destage()
    b = Engine.open(pool_path, owner="b", start_destager=False)
    try:
        assert b.replayed_records == 3  # two writes and the marker: nothing of a's
        vb = b.volume("vb")
        assert b.read(vb, 0, 4096) == b"C" * 4096
        assert b.read_snapshot(b.snapshot(vb, "s1"), 0, 4096) == b"B" * 4096
        b.destage()
        assert b.read_snapshot(b.snapshot(vb, "s1"), 0, 4096) == b"B" * 4096
        assert a.read(a.volume("va"), 0, 8192) == b"A" * 4096 + b"a" * 4096
    finally:
        a.close()
        b.close()


def test_owner_create_refuses_bad_names_duplicates_and_another_owners_journal(pool_path):
    for bad in ("", "B", "-x", "a/b", "a.b", "x" * 33):
        with pytest.raises(InvalidRequest, match="invalid owner name"):
            create_owner(pool_path, bad)
    create_owner(pool_path, "b", journal_size=MiB)
    with pytest.raises(AlreadyExists, match="has an owner 'b'"):
        create_owner(pool_path, "b")
    for journal in (os.path.join(pool_path, "journal"), os.path.join(pool_path, "journal.b")):
        with pytest.raises(InvalidRequest, match="journal of another owner"):
            create_owner(pool_path, "c", journal_path=journal, force=True)
    with pytest.raises(InvalidRequest, match="too small"):
        create_owner(pool_path, "c", journal_size=4096)
    with pytest.raises(PoolError, match="not a jsnap pool"):
        create_owner(os.path.dirname(pool_path), "c")
    assert [o["name"] for o in list_owners(pool_path)] == ["", "b"]


def test_opening_an_unknown_owner_says_how_to_create_it_and_leaves_no_lock(pool_path):
    with pytest.raises(PoolError, match="no owner 'nope'.*owner create nope"):
        Engine.open(pool_path, owner="nope")
    assert not os.path.exists(os.path.join(pool_path, "lock.nope"))


def test_owner_delete_refuses_while_it_holds_volumes_or_is_open(pool_path):
    create_owner(pool_path, "b", journal_size=MiB)
    with Engine.open(pool_path, owner="b") as b:
        b.volume_create("vb", MiB)
        with pytest.raises(PoolBusy):
            delete_owner(pool_path, "b")
        assert list_owners(pool_path)[1]["pid"] == str(os.getpid())
    with pytest.raises(InvalidRequest, match="holds 1 volume.*vb"):
        delete_owner(pool_path, "b")
    with Engine.open(pool_path, owner="b") as b:
        b.volume_delete("vb")
    assert list_owners(pool_path)[1]["pid"] is None
    delete_owner(pool_path, "b")
    with pytest.raises(NotFound):
        delete_owner(pool_path, "b")
    left = sorted(f for f in os.listdir(pool_path) if ".b" in f)
    assert left == [], left
    # The name is free again: a new owner "b" starts clean.
    create_owner(pool_path, "b", journal_size=MiB)
    with Engine.open(pool_path, owner="b") as b:
        assert b.volume_list() == []


def test_pool_grow_of_one_owner_adds_a_file_numbered_pool_wide(pool_path, tmp_path):
    create_owner(pool_path, "b", journal_size=MiB)
    with Engine.open(pool_path) as a, Engine.open(pool_path, owner="b") as b:
        b.pool_grow(MiB, str(tmp_path / "extra-b.dat"))
        a.pool_grow(MiB, str(tmp_path / "extra-a.dat"))
        nos_a, nos_b = set(a.pool.files), set(b.pool.files)
        assert not nos_a & nos_b and len(nos_a) == len(nos_b) == 2


def test_a_pool_made_before_owners_gets_its_columns_and_keeps_its_volumes(pool_path):
    with Engine.open(pool_path) as e:
        e.volume_create("old", MiB)
        e.write(e.volume("old"), 0, b"x" * 4096)
    db = sqlite3.connect(os.path.join(pool_path, "pool.db"))
    db.execute("ALTER TABLE volumes DROP COLUMN owner")
    db.execute("ALTER TABLE pool_files DROP COLUMN owner")
    db.commit()
    db.close()
    with Engine.open(pool_path) as e:
        assert e.read(e.volume("old"), 0, 4096) == b"x" * 4096
        assert check_pool(e) == ([], [])


def test_lock_holder_is_none_when_free_and_takes_nothing(pool_path):
    assert PoolLock.holder(pool_path) is None
    lock = PoolLock(pool_path)  # the holder check left it free to take
    try:
        assert PoolLock.holder(pool_path) == str(os.getpid())
    finally:
        lock.release()
