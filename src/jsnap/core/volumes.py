"""Volumes and snapshots as the engine keeps them in memory.

Model
-----
A Volume is a raw file or a thin map (stores/thin.py) with its live snapshots; a Snapshot
is named by the seq of its create marker in the journal: its image is every record below
that seq. The catalog holds the same rows (stores/catalog.py); these objects are what the
engine, the destager and the transport share while the pool is open.

Invariants
----------
V1 `snap_seqs` is replaced, never mutated, so the destager reads it without the engine's
   lock; `snaps` and `by_seq` change only under that lock.
V2 A deleted volume or snapshot is marked `deleted` before it leaves the registry, so a
   request that resolved it earlier fails cleanly (NotFound) instead of reading reused space.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from jsnap.errors import InvalidRequest, NoSpace, NotFound, ReadOnly
from jsnap.stores.files import BlockFile
from jsnap.stores.thin import ThinMap

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def check_range(vol: Volume, offset: int, length: int, write: bool) -> None:
    """A request's range against the volume: NotFound once it is deleted; past its end,
    ENOSPC for a write (as a disk answers) and EINVAL for a read."""
    if write:
        check_writable(vol)
    elif vol.deleted:
        raise NotFound(f"volume {vol.name!r} was deleted")
    if offset < 0 or length < 0 or offset + length > vol.size:
        cls = NoSpace if write else InvalidRequest
        raise cls(f"range {offset}+{length} is beyond the end of volume {vol.name!r} "
                  f"({vol.size} bytes)")


def check_writable(vol: Volume) -> None:
    """Writes (and snapshot markers) of a volume: refused once it is deleted or being
    deleted (callers holding the engine's lock ask again there: E5)."""
    if vol.deleted:
        raise NotFound(f"volume {vol.name!r} was deleted")
    if vol.retiring:
        raise ReadOnly(f"volume {vol.name!r} is being deleted")


def check_name(kind: str, name: str) -> None:
    if not _NAME_RE.match(name):
        raise InvalidRequest(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits and . _ : + - "
            "(starting with a letter or digit)"
        )


@dataclass(eq=False)
class Snapshot:
    seq: int  # seq of its create marker: the image is every record below it
    vol: int
    name: str
    ctime: float
    deleted: bool = False


@dataclass(eq=False)
class Volume:
    id: int
    name: str
    size: int
    path: str
    file: BlockFile
    deleted: bool = False
    # Production on storage the pool does not own (`volume create --device`): never
    # resized, truncated or removed by jsnap; a delete leaves it the volume's content.
    adopted: bool = False
    retiring: bool = False  # being deleted: its last writes are destaging, no new ones
    thin: ThinMap | None = None  # thin volumes: the map (reservations: jsnap.core.reservations)
    # Live snapshots, ascending seq. Replaced, never mutated, so the destager can read it
    # without the lock.
    snap_seqs: list[int] = field(default_factory=list)
    snaps: dict[str, Snapshot] = field(default_factory=dict)
    by_seq: dict[int, Snapshot] = field(default_factory=dict)

    def add_snapshot(self, snap: Snapshot) -> None:
        self.snaps[snap.name] = snap
        self.by_seq[snap.seq] = snap
        seqs = list(self.snap_seqs)
        bisect.insort(seqs, snap.seq)
        self.snap_seqs = seqs

    def remove_snapshot(self, snap: Snapshot) -> None:
        snap.deleted = True
        if self.snaps.get(snap.name) is snap:
            del self.snaps[snap.name]
        self.by_seq.pop(snap.seq, None)
        self.snap_seqs = [s for s in self.snap_seqs if s != snap.seq]

    @property
    def newest_snap(self) -> int:
        return self.snap_seqs[-1] if self.snap_seqs else 0
