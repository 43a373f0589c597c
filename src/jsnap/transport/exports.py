"""NBD exports: the names a client may open, and what each one serves.

Model
-----
An export is looked up, never stored: `resolve_export` maps a name the client sent (GO, INFO,
EXPORT_NAME, meta contexts) to a fresh `Export` over the engine's current volumes and
snapshots, so a volume created or deleted through the admin API shows at the next option.
`VOLUME` serves the volume read-write, `VOLUME@SNAPSHOT` one of its snapshots read-only.
An `Export` is immutable once built and owned by the connection that opened it; it holds
no lock and no thread touches it but that connection's.
"""

from __future__ import annotations

from jsnap import nbd
from jsnap.core.engine import Engine
from jsnap.core.volumes import Snapshot, Volume
from jsnap.units import MiB

MAX_PAYLOAD = 32 * MiB  # the spec's "should not be treated as denial of service" bound
PREFERRED_BLOCK = 4096


class Export:
    """What one connection serves: a volume read-write, or one of its snapshots read-only."""

    __slots__ = ("name", "vol", "snap", "info")

    def __init__(self, name: str, vol: Volume, snap: Snapshot | None) -> None:
        self.name = name
        self.vol = vol
        self.snap = snap
        ro = snap is not None
        self.info = nbd.ExportInfo(
            name=name,
            size=vol.size,
            description=f"snapshot {snap.name} of volume {vol.name}" if snap else
            f"volume {vol.name}",
            read_only=ro,
            can_flush=True,
            can_fua=True,
            can_trim=not ro,
            can_write_zeroes=not ro,
            can_fast_zero=not ro,  # zeroing is one journal record: always fast
            can_multi_conn=True,
            can_cache=True,
            can_df=True,
            min_block_size=1,
            preferred_block_size=PREFERRED_BLOCK,
            max_block_size=MAX_PAYLOAD,
        )


def resolve_export(engine: Engine, name: str) -> Export | None:
    """`VOLUME` or `VOLUME@SNAPSHOT`; "" means the only volume when there is exactly one."""
    vol_name, at, snap_name = name.partition("@")
    if not vol_name and not at:
        vols = engine.volume_list()
        if len(vols) != 1:
            return None
        vol_name = vols[0].name
    vol = engine.volumes.get(vol_name)
    if vol is None:
        return None
    if not at:
        return Export(name, vol, None)
    snap = vol.snaps.get(snap_name)
    return Export(name, vol, snap) if snap is not None else None


def unknown_export(engine: Engine, name: str) -> str:
    """Why `name` resolves to nothing here, naming the owner that serves it if another
    owner of the pool holds the volume (its own `jsnap --owner NAME serve` serves it)."""
    owner = engine.owner_of(name.partition("@")[0])
    if owner is None or owner == engine.owner:
        return f"no export named {name!r}"
    return (f"export {name!r} is served by owner {owner or '(default)'!r} of this pool, "
            "not by this server")


def list_exports(engine: Engine) -> list[tuple[str, str]]:
    out = []
    for v in engine.volume_list():
        out.append((v.name, f"volume {v.name}"))
        for s in engine.snapshot_list(v):
            out.append((f"{v.name}@{s.name}", f"snapshot {s.name} of volume {v.name}"))
    return out
