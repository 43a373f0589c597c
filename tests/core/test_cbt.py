"""Changed-block tracking: Engine.changed_chunks(since, until) against a record of writes.

Random writes, zeroes and trims interleaved with snapshots and partial destages, on raw and
thin volumes; for every pair of snapshots (and snapshot -> live) the engine must list
chunks some operation touched in between, never missing one whose bytes differ. Raw
volumes list exactly the touched chunks; a thin volume may leave out a trim or zero of a
chunk that was never allocated (it read as zeroes before and after)."""

from __future__ import annotations

import random

import pytest

from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool

CS = 4096
SIZE = 64 * CS


@pytest.mark.parametrize("thin", [False, True], ids=["raw", "thin"])
@pytest.mark.parametrize("seed", range(4))
def test_changed_chunks_are_exactly_the_touched_ones(tmp_path, thin, seed):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CS, pool_size=1 << 24)
    rng = random.Random(seed)
    with Engine.open(path, start_destager=False) as e:
        v = e.volume_create("v", SIZE, thin=thin)
        touched: list[set[int]] = [set()]  # chunks touched in each epoch
        images: list[bytes] = []
        names: list[str] = []
        for step in range(200):
            r = rng.random()
            off = rng.randrange(SIZE)
            n = min(rng.randrange(1, 3 * CS), SIZE - off)
            if r < 0.6:
                e.write(v, off, rng.randbytes(n))
            elif r < 0.7:
                e.trim(v, off, n)
            elif r < 0.75:
                e.write_zeroes(v, off, n)
            elif r < 0.85:
                names.append(f"s{step}")
                images.append(bytes(e.read(v, 0, SIZE)))
                e.snapshot_create(v, names[-1])
                touched.append(set())
                continue
            else:
                e.destage(rng.randrange(1, 20))
                continue
            touched[-1].update(range(off // CS, (off + n - 1) // CS + 1))
        snaps = [e.snapshot(v, n) for n in names]
        live = bytes(e.read(v, 0, SIZE))
        for i, since in enumerate(snaps):
            for j in range(i + 1, len(snaps) + 1):
                until = snaps[j] if j < len(snaps) else None
                want = set().union(*touched[i + 1 : j + 1])
                got = e.changed_chunks(v, since, until)
                if thin:
                    assert set(got) <= want, (since.name, until and until.name)
                else:
                    assert set(got) == want, (since.name, until and until.name)
                after = images[j] if j < len(images) else live
                for c in range(SIZE // CS):  # whatever differs is listed
                    if images[i][c * CS : (c + 1) * CS] != after[c * CS : (c + 1) * CS]:
                        assert c in got
            if i % 2:
                e.destage()  # the same answers once everything is in production
