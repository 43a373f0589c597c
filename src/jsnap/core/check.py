"""Consistency checks of an open pool: thin maps, pool extents, snapshot store slots.

Each check returns one readable line per problem (empty list: consistent). Run with the
destager idle (offline `jsnap check`, or tests between steps): a batch in flight owns
extents the catalog does not list yet.

What is checked (stores/thin.py T2, T4; destager invariant 7):
- no pool extent is owned twice (map entries, preserved rows, journaled REMAP records)
- every owned extent lies in a data file's backed range
- allocated = mapped + preserved + free-listed: owned and free extents partition the backed
  extents exactly (a leak is a backed extent neither owned nor free)
- the in-memory maps equal the catalog's rows
- no snapshot store slot is owned twice, and owned slots are not on the free list
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from jsnap.stores.thin import FILE_SHIFT, ext_id

if TYPE_CHECKING:
    from jsnap.core.engine import Engine


def _owners(e: Engine) -> dict[int, list[str]]:
    cat = e.catalog
    owners: dict[int, list[str]] = collections.defaultdict(list)
    names = cat.volume_names()
    for vid, chunk, ext, hi in cat.extent_owners():  # any owner's rows naming our extents
        before = "" if hi is None else f" preserved before {hi}"
        owners[ext].append(f"volume {names.get(vid, vid)} chunk {chunk}{before}")
    with e.lock:  # journaled REMAP records own their extents until destaged
        for rec in e.backlog.pending:
            for ext in rec.exts or ():
                owners[ext].append(f"journal record {rec.seq} (remap)")
    return owners


def check_thin(e: Engine) -> list[str]:
    problems: list[str] = []
    owners = _owners(e)
    for ext, who in sorted(owners.items()):
        if len(who) > 1:
            problems.append(f"extent {ext:#x} is owned {len(who)} times: " + "; ".join(who))
    pool = e.pool
    backed = {
        ext_id(f.no, i) for f in pool.files.values() for i in range(f.backed)
    }
    for ext in sorted(set(owners) - backed):
        f = pool.files.get(ext >> FILE_SHIFT)
        where = "no such data file" if f is None else f"beyond the {f.backed} backed extents"
        problems.append(f"extent {ext:#x} ({owners[ext][0]}): {where}")
    with pool.lock:
        free = list(pool.free)
        used = pool.used
    dup_free = [x for x, n in collections.Counter(free).items() if n > 1]
    for ext in dup_free:
        problems.append(f"extent {ext:#x} is on the free list twice")
    both = set(owners) & set(free)
    for ext in sorted(both):
        problems.append(f"extent {ext:#x} is free-listed but owned by {owners[ext][0]}")
    leaked = backed - set(owners) - set(free)
    if leaked:
        problems.append(
            f"{len(leaked)} extent(s) leaked (backed, neither owned nor free), first "
            f"{min(leaked):#x}")
    if used != len(owners):
        problems.append(f"pool counts {used} extents in use, the catalog owns {len(owners)}")
    for vol in e.volume_list():
        if vol.thin is None:
            continue
        rows = e.catalog.thin_map(vol.id)
        foreign = [x for x in rows.values() if x >> FILE_SHIFT not in pool.files]
        if foreign:
            problems.append(f"volume {vol.name}: {len(foreign)} chunk(s) mapped outside its "
                            f"owner's data files, first extent {foreign[0]:#x}")
        mem = dict(vol.thin.items())
        if rows != mem:
            diff = sorted(set(rows.items()) ^ set(mem.items()))[:3]
            problems.append(f"volume {vol.name}: map in memory differs from the catalog {diff}")
        if vol.thin.mapped != len(mem):
            problems.append(f"volume {vol.name}: map counts {vol.thin.mapped} chunks, has "
                            f"{len(mem)}")
        top = (vol.size - 1) // e.chunk_size
        beyond = [c for c in rows if c > top]
        if beyond:
            problems.append(f"volume {vol.name}: chunk {beyond[0]} mapped beyond its size")
    return problems


def check_store(e: Engine) -> list[str]:
    """Raw volumes' snapshot store: each slot owned once, owned slots not free."""
    problems: list[str] = []
    slots = collections.Counter(e.catalog.used_slots())
    for slot, n in sorted(slots.items()):
        if n > 1:
            problems.append(f"snapshot store slot {slot} is owned {n} times")
    for slot in sorted(set(slots) & set(e.slots.free_slots())):
        problems.append(f"snapshot store slot {slot} is free-listed but in use")
    return problems


_ORPHANS = [  # (table, what) rows naming a volume that no longer exists
    ("preserved", "preserved copies"),
    ("thin_map", "thin map entries"),
    ("snapshots", "snapshot rows"),
]


def check_pool(e: Engine, repair: bool = False) -> tuple[list[str], list[str]]:
    """Everything above plus catalog rows of deleted volumes. Returns (problems, repairs).

    `repair` fixes only what is provably safe: rows that belong to no volume can be read by
    nothing, so they are deleted (their extents and slots become free at the next open).
    An extent owned twice is reported, never "fixed": one owner holds wrong data and only
    a person can tell which."""
    problems: list[str] = []
    repairs: list[str] = []
    cat = e.catalog
    orphans = cat.orphan_rows()
    for table, what in _ORPHANS:
        n = orphans[table]
        if not n:
            continue
        if repair:
            with cat.transaction() as t:
                t.delete_orphans(table)
            repairs.append(f"deleted {n} {what} of deleted volumes")
        else:
            problems.append(f"{n} {what} belong to no volume (--repair deletes them)")
    for vol in e.volume_list():
        top = (vol.size - 1) >> e.chunk_shift
        n = cat.mapped_beyond(vol.id, top)
        if n and repair:
            with cat.transaction() as t:
                t.unmap_beyond(vol.id, top)
            repairs.append(f"volume {vol.name}: unmapped {n} chunks beyond its size")
    if repairs:  # the in-memory state was built from the rows just deleted: reload it
        return problems, repairs
    problems += check_thin(e) + check_store(e)
    return problems, repairs
