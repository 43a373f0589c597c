"""Pool operations as JSON-shaped functions, shared by the CLI and the admin API.

The CLI calls these on a pool it opened itself when no server holds the pool, and the admin
API calls the very same functions inside the server; so a command behaves the same either way.
Arguments and results are plain JSON values.
"""

from __future__ import annotations

import time
from typing import Any

import jsnap.nbd  # noqa: F401  (loaded, so that status can say whether compiled)
from jsnap.compiled import compiled_packages
from jsnap.core import cbt, usage
from jsnap.core.engine import Engine
from jsnap.core.volumes import Snapshot, Volume

Json = dict[str, Any]


def _volume(e: Engine, v: Volume) -> Json:
    return {"name": v.name, "size": v.size, "snapshots": len(v.snaps),
            "thin": v.thin is not None, "allocated": e.allocated(v),
            "device": v.path if v.adopted else None}


def _snapshot(e: Engine, s: Snapshot) -> Json:
    return {"volume": e.by_id[s.vol].name, "name": s.name, "created": s.ctime}


def volume_create(e: Engine, name: str, size: int | None, preallocate: bool = False,
                  thin: bool = True, device: str | None = None) -> Json:
    return _volume(e, e.volume_create(name, None if size is None else int(size),
                                      preallocate=bool(preallocate), thin=bool(thin),
                                      device=None if device is None else str(device)))


def volume_resize(e: Engine, name: str, size: int) -> Json:
    return _volume(e, e.volume_resize(name, int(size)))


def pool_grow(e: Engine, size: int | None, path: str | None = None) -> Json:
    e.pool_grow(None if size is None else int(size), path)
    return e.pool_stats()


def pool_release(e: Engine) -> Json:
    return {"released": e.pool_release(), **e.pool_stats()}


def volume_list(e: Engine) -> list[Json]:
    return [_volume(e, v) for v in e.volume_list()]


def volume_delete(e: Engine, name: str) -> Json:
    vol = e.volume(name)
    e.volume_delete(name)
    return {"name": name, "device": vol.path if vol.adopted else None}


def snapshot_create(e: Engine, volume: str, name: str) -> Json:
    t0 = time.monotonic()
    s = e.snapshot_create(e.volume(volume), name)
    return {**_snapshot(e, s), "seconds": time.monotonic() - t0}


def snapshot_list(e: Engine, volume: str | None = None) -> list[Json]:
    vol = e.volume(volume) if volume else None
    return [_snapshot(e, s) for s in e.snapshot_list(vol)]


def snapshot_delete(e: Engine, volume: str, name: str) -> Json:
    e.snapshot_delete(e.volume(volume), name)
    return {"volume": volume, "name": name}


def snapshot_rollback(e: Engine, volume: str, name: str) -> Json:
    n = e.snapshot_rollback(e.volume(volume), name)
    return {"volume": volume, "name": name, "chunks": n}


def snapshot_diff(e: Engine, volume: str, since: str, until: str | None = None) -> Json:
    """Byte ranges that may differ between snapshot `since` and `until` (None: the live
    volume), in chunk granularity, adjacent chunks merged."""
    vol = e.volume(volume)
    a = e.snapshot(vol, since)
    b = e.snapshot(vol, until) if until else None
    ext = cbt.changed_extents(e.changed_chunks(vol, a, b), e.chunk_size, vol.size)
    return {"volume": volume, "from": since, "to": until, "size": vol.size,
            "chunk_size": e.chunk_size, "changed": sum(n for _, n in ext),
            "extents": [{"offset": off, "length": n} for off, n in ext]}


def volume_extents(e: Engine, volume: str, offset: int, length: int,
                   snapshot: str | None = None) -> Json:
    """Allocation map of a range of a volume or snapshot as [length, flags] runs (flags:
    1 = hole, 2 = reads as zeroes); may cover less than asked. For export."""
    vol = e.volume(volume)
    snap = e.snapshot(vol, snapshot) if snapshot else None
    return {"extents": [list(r) for r in cbt.allocation(e, vol, snap, int(offset), int(length))]}


def status(e: Engine) -> Json:
    st: Json = dict(e.stats())
    st["pool"] = e.path
    st["volumes"] = [
        {**_volume(e, v), "snapshot_names": [s.name for s in e.snapshot_list(v)]}
        for v in e.volume_list()
    ]
    st["snapshots"] = usage.snapshots(e)  # with age and held space
    st["serving"] = False  # the admin API fills these in when a server runs
    st["clients"] = []
    st["compiled"] = compiled_packages()  # e.g. ["nbd"]: mypyc's modules in use (setup.py)
    return st


def acl_list(e: Engine) -> list[Json]:
    return [{"volume": vol, **rule.to_json()} for vol, rule in sorted(e.access.rules().items())]


def acl_set(e: Engine, volume: str, addresses: list[str] | None = None,
            subjects: list[str] | None = None) -> Json:
    rule = e.access.set_rule(volume, addresses or [], subjects or [])
    return {"volume": volume, **rule.to_json()}


def acl_clear(e: Engine, volume: str) -> Json:
    e.access.clear_rule(volume)
    return {"volume": volume}
