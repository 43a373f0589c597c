"""Space held by each snapshot, for `jsnap status`.

Model
-----
A row (vol, chunk, hi, slot) of the `preserved` table is chunk `chunk` as it was before the
write with seq `hi` was destaged. It serves exactly the snapshots S of its volume with
lo < S.seq < hi, where lo is the previous row's hi for the same chunk (or -1): those read
it, every other snapshot reads another row or production (see destager.py).

A snapshot **holds** the rows that serve it and no other snapshot: deleting that snapshot
alone would free them (what `CatalogTxn.free_copies` does). Rows shared by several snapshots are
counted for none, so the held figures add up to less than the pool's preserved space when
snapshots share copies; deleting two snapshots may free more than their two held figures.
A row only counts as space when it has a slot: a thin volume's row with slot -1 records
that the old chunk was unmapped (all zeroes) and takes no extent.

The figures come from the catalog, so they are as of the last destage batch: writes still
in the journal have not preserved anything yet, and a snapshot deleted but not yet
destaged still shares its rows (its neighbours may show less than they will).

One SQL pass: a window function pairs each row with the previous hi of its chunk (the
table's primary key order, so no sort), and the snapshot range join uses the snapshots'
primary key; the cost is linear in the preserved rows (about 3 s per million on the
development machine), which `status` pays and `/metrics` never does.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsnap.core.engine import Engine

def held_chunks(engine: Engine) -> dict[int, int]:
    """snapshot seq -> chunks (slots or extents) that it alone holds."""
    return engine.catalog.held_chunks()


def snapshots(engine: Engine) -> list[dict[str, Any]]:
    """Every live snapshot with its age and held space (see the module docstring)."""
    held = held_chunks(engine)
    now = time.time()
    out = []
    for s in engine.snapshot_list():
        n = held.get(s.seq, 0)
        out.append({"volume": engine.by_id[s.vol].name, "name": s.name, "created": s.ctime,
                    "age": max(now - s.ctime, 0.0), "held_chunks": n,
                    "held_bytes": n * engine.chunk_size})
    return out
