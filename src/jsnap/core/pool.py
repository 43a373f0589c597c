"""An owner's view of a pool: its catalog, its layout, and the space its volumes live in.

Model
-----
A pool (core/layout.py) is shared by whatever serves its volumes. Its volumes are split
among owners (layout.py, "Owners"); an engine (core/engine.py) is one owner open in one
process, and owns that owner's volumes and everything that moves their writes: their
journal, changes table, pending queue, destager and snapshot markers. This module is the
rest, the parts of the pool that owner uses:

    catalog   every durable row, seen as this owner's (stores/catalog.py)
    extents   the owner's thin space: its data files, free list, reservations (thin.py)
    slots     the owner's snapshot store for raw volumes (stores/snapstore.py)
    lock      POOL/lock (POOL/lock.OWNER), held while it is open (layout.py L2)

and the operations that change only those: creating, resizing and deleting a volume's
storage and rows, growing and releasing the pool's space, and reading its space figures.

Invariants
----------
P1 The catalog row of a volume is committed after its file exists (synced, with its
   directory) and removed before its file is: a crash leaves at most a file that no row
   names, which the next create of that id truncates.
P2 A volume's storage (its file, its extents, its slots) is released only after its rows
   are deleted in one transaction, and by the caller that removed it from every owner's
   memory, so no reader can reach space that is being reused.
P3 An owner's free lists (extents, slots) live in the one process that holds its lock;
   they are rebuilt from the catalog at each open (thin.py T4, snapstore.py S3). Owners
   share no data file and no snapshot store, so no free list is shared across processes;
   what they do share (volume names and ids, data file numbers, seq ranges) is taken in
   catalog transactions (catalog.py K5).
P4 An adopted volume's storage (`volume create --device` or `--nbd`: a block device,
   another server's NBD export) is never truncated, resized or removed by the pool;
   deleting the volume leaves it holding the volume's content (the engine destages the
   volume's writes before it deletes the rows).

Callers serialise the changes (Engine.admin_lock); the extent and slot free lists have
their own locks.
"""

from __future__ import annotations

import errno
import os
import time

from jsnap.core.layout import FORMATS, PoolLock, owned_name
from jsnap.core.volumes import Snapshot, Volume
from jsnap.errors import AlreadyExists, InvalidRequest, NoSpace, PoolError
from jsnap.stores.catalog import DEFAULT_OWNER, Catalog
from jsnap.stores.device import foreign_content, is_block_device
from jsnap.stores.files import FileOpener, sync_dir
from jsnap.stores.nbd_client import parse_uri
from jsnap.stores.remote import is_nbd_uri
from jsnap.stores.snapstore import SlotStore
from jsnap.stores.thin import ExtentPool, PoolFile, ThinFile, ThinMap
from jsnap.units import format_size


def store_kind(path: str) -> str:
    """"device" or "file": what status says a store is (the engine itself asks caps)."""
    return "device" if is_block_device(path) else "file"


class Pool:
    # Set by open():
    path: str
    owner: str
    opener: FileOpener
    lock: PoolLock
    catalog: Catalog
    chunk_size: int
    chunk_shift: int
    durability: str
    journal_path: str
    data_path: str
    snapshot_path: str
    extents: ExtentPool
    slots: SlotStore

    @classmethod
    def open(cls, path: str, opener: FileOpener, owner: str = DEFAULT_OWNER) -> Pool:
        """Lock the owner's part of the pool and open its catalog and space; PoolError if
        it is not a pool or has no such owner."""
        db_path = os.path.join(path, "pool.db")
        try:
            os.stat(db_path)
        except (FileNotFoundError, NotADirectoryError):
            raise PoolError(f"{path} is not a jsnap pool (no pool.db); create it with "
                            "'jsnap init'") from None
        except OSError as e:  # say so, rather than "not a pool" (e.g. EACCES on the directory)
            raise PoolError(f"cannot open pool {path}: {e.strerror}") from None
        self = cls()
        self.path = os.path.abspath(path)
        self.opener = opener
        self.owner = owner
        if owner != DEFAULT_OWNER:  # before its lock file is made: a mistyped name leaves none
            cat = Catalog(db_path)
            try:
                if not any(name == owner for name, _ in cat.owners()):
                    raise PoolError(self._no_owner())
            finally:
                cat.close()
        self.lock = PoolLock(path, owner)
        try:
            self._open()
        except BaseException:
            self._close_partial()
            raise
        return self

    def _no_owner(self) -> str:
        return (f"pool {self.path} has no owner {self.owner!r}; create it with "
                f"'jsnap -p {self.path} owner create {self.owner}'")

    def _open(self) -> None:
        self.catalog = cat = Catalog(os.path.join(self.path, "pool.db"), self.owner)
        if cat.get("format") not in FORMATS:
            raise PoolError(f"{self.path}: unsupported pool format {cat.get('format')!r}")
        if not any(name == self.owner for name, _ in cat.owners()):  # deleted meanwhile
            raise PoolError(self._no_owner())
        self.chunk_size = cat.get_int("chunk_size")
        self.chunk_shift = self.chunk_size.bit_length() - 1
        self.durability = str(cat.get("durability"))
        self.journal_path = str(cat.get("journal_path"))
        self.data_path = str(cat.get("data_path"))
        self.snapshot_path = str(cat.get("snapshot_path"))
        self.extents = self._open_extents()
        device = cat.get("snapshot_device") if self.owner == DEFAULT_OWNER else None
        store = str(device) if device else os.path.join(
            self.snapshot_path, owned_name("snapstore.dat", self.owner))
        self.slots = SlotStore(self.opener(store), self.chunk_size, cat.used_slots())

    def _open_extents(self) -> ExtentPool:
        cat = self.catalog
        rows = cat.pool_files()
        if not rows:  # the owner's first open (or a pool made before thin volumes)
            path = os.path.join(self.data_path, owned_name("data-0.dat", self.owner))
            size = cat.get("pool_size")
            if not isinstance(size, int):
                st = os.statvfs(self.data_path)
                size = st.f_blocks * st.f_frsize
            self.opener(path, create=True).close()
            sync_dir(self.data_path)
            with cat.transaction() as t:
                no = t.add_pool_file(path, size // self.chunk_size)
            rows = [(no, path, size // self.chunk_size)]
        files = []
        for no, path, capacity in rows:
            f = self.opener(path)
            # A file is backed as far as it is long; a device as far as extents in use show
            # (ExtentPool raises it): its free list grows with use, not with its size.
            backed = f.size() // self.chunk_size if f.caps.resize else 0
            files.append(PoolFile(no, path, f, capacity, backed))
        return ExtentPool(self.chunk_size, files, cat.used_extents())

    def load_volumes(self) -> list[Volume]:
        """Every volume of this owner, with its thin map and its destaged snapshots."""
        cat = self.catalog
        maps: dict[int, ThinMap] = {}
        for vid, chunk, ext, seq in cat.thin_maps():
            maps.setdefault(vid, ThinMap()).set(chunk, ext, seq)
        vols: dict[int, Volume] = {}
        for vid, name, size, vpath, thin in cat.volumes():
            if thin:
                tmap = maps.get(vid) or ThinMap()
                vols[vid] = Volume(vid, name, size, vpath, ThinFile(self.extents, tmap, size),
                                   thin=tmap)
            else:
                vols[vid] = Volume(vid, name, size, vpath, self.opener(vpath),
                                   adopted=vpath != self._raw_path(vid))
        for seq, vid, name, ctime in cat.snapshots():
            if vid in vols:
                vols[vid].add_snapshot(Snapshot(seq, vid, name, ctime))
        return list(vols.values())

    # -- volumes' storage (P1, P2) -------------------------------------------------------------

    def _raw_path(self, vid: int) -> str:
        return os.path.join(self.data_path, f"vol-{vid}.img")

    def adopt_volume(self, name: str, size: int | None, target: str) -> Volume:
        """A raw volume whose production is `target`, storage the pool does not own, with
        its data (P1: the row names storage that exists): a block device, or another
        server's NBD export (an nbd:// or nbd+unix:// URI). `size`: the first bytes of it
        the volume exposes (None: all of it)."""
        if is_nbd_uri(target):
            path = target
            try:
                parse_uri(path)
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        else:
            path = os.path.abspath(target)
            if not is_block_device(path):
                raise InvalidRequest(f"{path} is not a block device")
        held = self.catalog.volume_at(path)
        if held is not None:
            raise AlreadyExists(f"{path} is volume {held!r} of this pool already")
        f = None
        try:
            f = self.opener(path)  # a device is claimed (device.py D1): not mounted
            have = f.size()  # an export: its first connection
        except OSError as e:
            if f is not None:
                f.close()
            busy = (" (mounted, or held by another program or by this pool)"
                    if e.errno == errno.EBUSY else "")
            raise PoolError(f"cannot open {path}: {e.strerror}{busy}") from None
        try:
            if size is None:
                size = have - have % 512
            if size <= 0 or size % 512 or size > have:
                raise InvalidRequest(f"invalid size {size} for {path} ({format_size(have)}): "
                                     "a positive multiple of 512, at most its size")
            with self.catalog.transaction() as t:
                vid = t.take_volume_id()
                t.add_volume(vid, name, size, path, False, time.time())
        except BaseException:
            f.close()
            raise
        return Volume(vid, name, size, path, f, adopted=True)

    def create_volume(self, name: str, size: int, preallocate: bool, thin: bool) -> Volume:
        """The storage and the catalog row of a new volume (P1). Its id is taken first, in
        a transaction of its own, so a raw volume's file name is never another's."""
        with self.catalog.transaction() as t:
            vid = t.take_volume_id()
        if thin:
            with self.catalog.transaction() as t:
                t.add_volume(vid, name, size, "", True, time.time())
            tmap = ThinMap()
            return Volume(vid, name, size, "", ThinFile(self.extents, tmap, size), thin=tmap)
        path = self._raw_path(vid)
        f = self.opener(path, create=True)
        try:
            f.truncate(0)  # a leftover file of a crashed create holds nothing we want
            f.truncate(size)
            if preallocate and f.caps.allocate:
                try:
                    f.allocate(0, size)
                except OSError as e:
                    raise NoSpace(
                        f"cannot preallocate {format_size(size)}: {e.strerror}") from None
            f.sync()
            sync_dir(self.data_path)
            with self.catalog.transaction() as t:
                t.add_volume(vid, name, size, path, False, time.time())
        except BaseException:
            f.close()
            try:
                os.unlink(path)  # nothing refers to it: the catalog row was not committed
            except OSError:
                pass
            raise
        return Volume(vid, name, size, path, f)

    def resize_volume(self, vol: Volume, size: int) -> None:
        if vol.adopted:
            raise InvalidRequest(f"volume {vol.name!r} is {vol.path}, which jsnap does not "
                                 "resize")
        # The file first, then the catalog: a crash in between leaves a longer file
        # whose tail the catalog does not expose (reads past the old size never happen).
        vol.file.truncate(size)
        vol.file.sync()
        with self.catalog.transaction() as t:
            t.resize_volume(vol.id, size)

    def delete_volume_rows(self, vol: Volume) -> list[int]:
        """Delete the volume's rows; returns its preserved slots or extents (P2)."""
        with self.catalog.transaction() as t:
            return t.delete_volume(vol.id)

    def release_volume(self, vol: Volume, held: list[int]) -> None:
        """Give back the storage of a volume no owner holds any more (P2): its map's extents
        and preserved copies (thin), or its file and snapshot slots (raw)."""
        if vol.thin is not None:
            self.extents.give_back(held)
            return
        self.slots.free(held)
        vol.file.close()
        if vol.adopted:
            return  # the device stays, holding the volume's content
        try:
            os.unlink(vol.path)
        except FileNotFoundError:
            pass
        sync_dir(self.data_path)

    def allocated(self, vol: Volume) -> int:
        """Bytes the volume's current data occupies: mapped extents (thin) or the file's
        allocated blocks (raw). Snapshots' preserved copies are counted by the pool."""
        if vol.thin is not None:
            return vol.thin.mapped * self.chunk_size
        if vol.adopted:
            return vol.size  # a device's blocks are all there
        fd = getattr(vol.file, "fd", None)
        return os.fstat(fd).st_blocks * 512 if isinstance(fd, int) and fd >= 0 else 0

    # -- the pool's space ----------------------------------------------------------------------

    def grow(self, size: int | None, path: str | None = None) -> None:
        """Raise the pool's capacity: `path` None grows the last data file to hold `size`
        more bytes; a new path adds a data file of `size` bytes, or a block device (of
        `size` bytes of it; None: all). Online: new extents are allocated from at once."""
        cs = self.chunk_size
        ext = self.extents
        device = path is not None and is_block_device(path)
        if size is None and not device:
            raise InvalidRequest("give the size to add (--size)")
        if size is not None and size <= 0:
            raise InvalidRequest("the size to add must be positive")
        if size is not None and size // cs == 0:
            raise InvalidRequest(f"{format_size(size)} is less than one chunk")
        if path is None:
            assert size is not None
            no = max(ext.files)
            last = ext.files[no]
            cap = last.capacity + size // cs
            if not last.file.caps.resize and cap * cs > last.file.size():
                raise InvalidRequest(f"{last.path} is a device of "
                                     f"{format_size(last.file.size())}: it cannot hold more; "
                                     "add another (--file)")
            with self.catalog.transaction() as t:
                t.set_pool_file_capacity(no, cap)
            ext.set_capacity(no, cap)
            return
        path = os.path.abspath(path)
        if any(f.path == path for f in ext.files.values()):
            raise AlreadyExists(f"{path} is a data file of this pool already")
        held = self.catalog.volume_at(path)
        if held is not None or path == self.journal_path:
            raise AlreadyExists(f"{path} is {'the journal' if held is None else held} of "
                                "this pool")
        if not device and os.path.exists(path):
            raise AlreadyExists(f"{path} exists; give a new file for the pool to create")
        try:
            f = self.opener(path, create=True)
        except OSError as e:
            busy = " (mounted, or held by another program)" if e.errno == errno.EBUSY else ""
            raise PoolError(f"cannot open data file {path}: {e.strerror}{busy}") from None
        try:
            if device:
                have = f.size()
                size = have if size is None else size
                if size > have:
                    raise InvalidRequest(f"{path} holds {format_size(have)}, less than "
                                         f"{format_size(size)}")
                what = foreign_content(path, f)
                if what:
                    raise PoolError(f"{path} holds {what}: not using it for data (wipe it "
                                    "first, e.g. wipefs -a)")
            else:
                sync_dir(os.path.dirname(path))
            assert size is not None
            with self.catalog.transaction() as t:
                no = t.add_pool_file(path, size // cs)
        except BaseException:
            f.close()
            if not device:
                os.unlink(path)
            raise
        ext.add_file(PoolFile(no, path, f, size // cs, 0))

    def space(self, mapped: int, remapped: int) -> dict[str, int]:
        """Pool space in bytes (thin volumes): capacity, backed by the data files, mapped by
        volumes (`mapped` extents), held for snapshots, free-listed, reserved by journaled
        records. `remapped`: extents of pending REMAP records (owned, not yet mapped)."""
        cs, p = self.chunk_size, self.extents
        with p.lock:
            used, free, reserved = p.used, len(p.free), p.reserved
        fs_free, fs_reserve = p.fs_space()
        return {
            "pool_capacity": p.capacity() * cs,
            "pool_backed": p.backed() * cs,
            "pool_allocated": used * cs,
            "pool_mapped": mapped * cs,
            "pool_preserved": (used - mapped - remapped) * cs,
            "pool_free": free * cs,
            "pool_reserved": reserved * cs,
            "pool_available": max(p.available(), 0) * cs,
            "pool_fs_free": fs_free,  # the data files' file systems, beside our accounting
            "pool_fs_reserve": fs_reserve,
        }

    def stores(self) -> list[dict[str, object]]:
        """Where the pool's data lives, for status: each data file and the raw snapshot
        store, with its kind (a block device or a file), size and use, in bytes."""
        cs, ext = self.chunk_size, self.extents
        with ext.lock:
            files = [(f.path, f.capacity * cs, f.backed * cs) for f in ext.files.values()]
        out: list[dict[str, object]] = [
            {"role": "data", "path": path, "kind": store_kind(path), "size": capacity,
             "used": backed} for path, capacity, backed in files]
        slots = self.slots
        out.append({"role": "snapshot store", "path": slots.file.path,
                    "kind": store_kind(slots.file.path), "size": slots.count * cs,
                    "used": (slots.count - slots.free_count) * cs})
        return out

    # -- close ---------------------------------------------------------------------------------

    def _close_partial(self) -> None:
        """Close whatever a failed open got as far as opening, and unlock."""
        for name in ("slots", "extents", "catalog"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
        self.lock.release()

    def close(self) -> None:
        self.slots.close()
        self.extents.close()
        self.catalog.close()
        self.lock.release()
