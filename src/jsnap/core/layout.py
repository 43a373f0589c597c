"""A pool on disk: creating one (`init_pool`) and owning it while it is open (`PoolLock`).

A pool is a directory (the three stores may live elsewhere):

    POOL/pool.db         catalog (SQLite, WAL): config, volumes, snapshots, preserved index
    POOL/lock            exclusive flock of the default owner, holds its process's PID
    POOL/journal         the circular journal (stores/journal/), or a block device
                         (`--journal-path /dev/X`: an NVMe partition, pmem, a battery-backed
                         device, the NVRAM of the design; stores/device.py)
    POOL/vol-<id>.img    production store of each raw volume (a plain file)
    POOL/snapstore.dat   raw volumes' preserved chunks, one slot of chunk_size each, or a
                         block device (`--snapshot-path /dev/Y`)
    POOL/data-<n>.dat    the pool's extents: thin volumes' data and their preserved copies
                         (stores/thin.py); a data file may be a block device
                         (`--data-path /dev/X`, `pool grow --file /dev/Z`)

Owners. The volumes of a pool are split among owners (README "Design", "Ownership"): the
default one, '', made by init, and any made by `create_owner`. Each owner has its own lock,
journal, data files and snapshot store, named like the default's with the owner's name
before the extension (POOL/lock.NAME, POOL/journal.NAME, POOL/data-0.NAME.dat,
POOL/snapstore.NAME.dat, POOL/admin.NAME.sock), so engines in other processes, or later on
other machines, can own the other volumes of the same pool at the same time.

Invariants
----------
L1 The catalog is created last: a directory is a pool once pool.db exists, and every file
   it names exists (and is synced, with its directory) before it does.
L2 One process owns a pool at a time: it holds POOL/lock's flock for as long as the pool is
   open, and a second opener is refused with the holder's PID (PoolBusy).
L3 A journal on a block device takes the whole device unless a smaller size is asked; a
   larger one is refused. A device is never resized (its store cannot: caps.resize).
L4 Without `force`, init overwrites nothing that holds data: a journal path holding a
   jsnap journal (its superblock magic: another pool's, or a deleted pool's whose volumes
   may still need it) is refused, and so is a device holding a file system, a partition
   table or a RAID/LVM member (blkid -p).
L5 The journal's record area is zeroed before the catalog exists. Records carry no pool
   identity, so records of an earlier journal left there could pass replay's checks (seq
   from 1, generation from 1, CRC) and be replayed into the new pool. On a device the
   kernel zeroes (WRITE ZEROES where the device has it: instant on NVMe and loop devices).
L6 An owner's catalog row is committed last, after its journal and snapshot store exist,
   and in the same transaction as the pool's format 2 (FORMATS), so a jsnap that knows no
   owners refuses the pool rather than serve an owner's volumes without their journal.
   An owner is deleted only while its lock is held and it holds no volume: its rows go
   first, then its files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import uuid
from collections.abc import Callable

from jsnap.errors import AlreadyExists, InvalidRequest, NotFound, PoolBusy, PoolError
from jsnap.stores import journal as jn
from jsnap.stores.catalog import DEFAULT_OWNER, Catalog
from jsnap.stores.device import foreign_content, is_block_device, open_store
from jsnap.stores.files import BlockFile, OsFile, sync_dir
from jsnap.units import MiB, format_size, is_power_of_two

DEFAULT_JOURNAL_SIZE = 256 * MiB
DEFAULT_CHUNK_SIZE = 16 * 1024  # chosen by benchmark: BENCHMARKS.md, run 7
MIN_JOURNAL_SIZE = 1 * MiB
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4096, 1 * MiB
DURABILITY_MODES = ("sync", "writeback")
FORMAT_VERSION = 1  # what init writes: a pool with the default owner only
FORMAT_OWNERS = 2  # written with the first other owner (L6)
FORMATS = (FORMAT_VERSION, FORMAT_OWNERS)  # what this version opens
OWNER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")  # it goes into file names
_ZERO_STEP = 256 * MiB  # init zeroes the journal in steps, telling `progress` after each


def _resolve(pool: str, path: str | None, default: str) -> str:
    """A path the user gave is taken as given (relative to the working directory); the
    default lives inside the pool directory."""
    return os.path.abspath(path if path else os.path.join(pool, default))


def owned_name(name: str, owner: str) -> str:
    """The default owner's file `name`, or owner's own: lock -> lock.X, data-0.dat ->
    data-0.X.dat."""
    if owner == DEFAULT_OWNER:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}.{owner}{dot}{ext}"


def _journal_size(jf: BlockFile, asked: int | None) -> int:
    """The journal's size (L3): what was asked, which a device must hold; by default a
    file's DEFAULT_JOURNAL_SIZE and a device's whole size."""
    if jf.caps.resize:
        return DEFAULT_JOURNAL_SIZE if asked is None else asked
    have = jf.size()
    if asked is None:
        if have < MIN_JOURNAL_SIZE:
            raise InvalidRequest(f"{jf.path} is {format_size(have)}: a journal needs at "
                                 "least 1M")
        return have
    if asked > have:
        raise InvalidRequest(f"journal size {format_size(asked)} is larger than {jf.path} "
                             f"({format_size(have)})")
    return asked


def _held(jf: BlockFile) -> str | None:
    """What a store's path holds that init must not overwrite unasked (L4)."""
    if jf.size() >= jn.SUPER.size:
        magic, _, _, _, owner = jn.SUPER.unpack(jf.pread(jn.SUPER.size, 0))
        if magic == jn.SUPER_MAGIC:
            return f"the journal of jsnap pool {uuid.UUID(bytes=owner)}"
    if not jf.caps.resize:  # a device: what blkid (or a magic number) says is on it
        return foreign_content(jf.path, jf)
    return None


def _format(jf: BlockFile, size: int, pool_uuid: uuid.UUID,
            progress: Callable[[int, int], None] | None) -> None:
    """Write the superblock and zero the record area (L5), durably."""
    jn.format_journal(jf, size, pool_uuid.bytes)
    if jf.caps.allocate:
        try:
            # Reserve the space first: a full disk fails here, at once, with ENOSPC.
            jf.allocate(0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    # Then zeroes: on a file real ones, since fallocated blocks are 'unwritten' extents and
    # the first write to each makes its fdatasync commit filesystem metadata too (64 KiB
    # append + fdatasync: ~220 us on fallocated blocks, ~115 us on written ones;
    # bench/journal_io.py); on a device the kernel's zeroing (WRITE ZEROES where it has it).
    for pos in range(jn.SUPERBLOCK_SIZE, size, _ZERO_STEP):
        jf.zero_range(pos, min(_ZERO_STEP, size - pos))
        if progress is not None:
            progress(min(pos + _ZERO_STEP, size), size)
    jf.sync()


def _make_journal(journal_file: str, journal_size: int | None, pool_uuid: uuid.UUID,
                  force: bool, progress: Callable[[int, int], None] | None) -> int:
    """Create (or take the device of) a journal and format it (L3-L5); returns its size."""
    jdir = os.path.realpath(os.path.dirname(journal_file))
    if (jdir == "/dev" or jdir.startswith("/dev/") and not jdir.startswith("/dev/shm")) \
            and not is_block_device(journal_file):  # a mistyped device: no file in /dev
        raise InvalidRequest(f"{journal_file} is not a block device")
    try:
        jf = open_store(journal_file, create=True)
    except OSError as e:
        busy = " (mounted, or held by another program)" if e.errno == errno.EBUSY else ""
        raise PoolError(f"cannot open journal {journal_file}: {e.strerror}{busy}") from e
    try:
        journal_size = _journal_size(jf, journal_size)
        if not force:
            held = _held(jf)
            if held:
                raise PoolError(f"{journal_file} holds {held}: not overwriting it "
                                "(--force does)")
        _format(jf, journal_size, pool_uuid, progress)
    finally:
        jf.close()
    return journal_size


def _device_path(path: str | None) -> str | None:
    """`path` (absolute) if it names a block device, else None."""
    return os.path.abspath(path) if path and is_block_device(path) else None


def _check_device(dev: str, force: bool) -> int:
    """A device for a pool's data or snapshot store: it can be claimed (not mounted, not
    held) and, unless `force`, holds nothing a user may want (L4). Returns its size."""
    try:
        f = open_store(dev)
    except OSError as e:
        busy = " (mounted, or held by another program)" if e.errno == errno.EBUSY else ""
        raise PoolError(f"cannot open {dev}: {e.strerror}{busy}") from e
    try:
        if not force:
            held = _held(f)
            if held:
                raise PoolError(f"{dev} holds {held}: not overwriting it (--force does)")
        return f.size()
    finally:
        f.close()


def init_pool(
    path: str,
    *,
    journal_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    durability: str = "writeback",
    journal_path: str | None = None,
    data_path: str | None = None,
    snapshot_path: str | None = None,
    pool_size: int | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Create a new pool directory. Refuses to touch an existing pool. Returns the journal's
    size: `journal_size`, or by default DEFAULT_JOURNAL_SIZE for a file and the whole
    device for a block device (L3).

    `pool_size` caps the data file thin volumes allocate from (None: the size of the
    filesystem holding it, so the filesystem's free space is the real limit). `force`
    overwrites a journal path that holds something (L4). `progress(done, total)` is told
    how far zeroing the journal got."""
    if durability not in DURABILITY_MODES:
        raise InvalidRequest(f"invalid durability {durability!r}: use sync or writeback")
    if not is_power_of_two(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidRequest(
            f"invalid chunk size {chunk_size}: use a power of two from 4K to 1M"
        )
    if journal_size is not None and journal_size < MIN_JOURNAL_SIZE:
        raise InvalidRequest(
            f"journal size {format_size(journal_size)} is too small: at least 1M"
        )
    db_path = os.path.join(path, "pool.db")
    if os.path.exists(db_path):
        raise AlreadyExists(f"{path} is already a jsnap pool (found {db_path})")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PoolError(f"cannot create pool directory {path}: {e.strerror}") from e
    journal_file = _resolve(path, journal_path, "journal")
    # A data or snapshot path may be a block device: the store is the device, and the
    # directory for that kind's files (raw volumes, other owners' stores) is the pool's.
    data_dev = _device_path(data_path)
    snap_dev = _device_path(snapshot_path)
    devices = [d for d in (data_dev, snap_dev) if d]
    if len({os.path.realpath(d) for d in devices + [journal_file]}) < len(devices) + 1:
        raise InvalidRequest("the journal, data and snapshot stores need a device each")
    data_dir = path if data_dev else _resolve(path, data_path, ".")
    snap_dir = path if snap_dev else _resolve(path, snapshot_path, ".")
    for d in (data_dir, snap_dir, os.path.dirname(journal_file)):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise PoolError(f"cannot create directory {d}: {e.strerror}") from e
    data_size = _check_device(data_dev, force) if data_dev else None
    if snap_dev:
        _check_device(snap_dev, force)
    pool_uuid = uuid.uuid4()
    journal_size = _make_journal(journal_file, journal_size, pool_uuid, force, progress)
    if snap_dev is None:
        store = OsFile(os.path.join(snap_dir, "snapstore.dat"), create=True)
        store.sync()
        store.close()
    if pool_size is None:
        st = os.statvfs(data_dir)
        pool_size = data_size if data_size is not None else st.f_blocks * st.f_frsize
    if pool_size < chunk_size:
        raise InvalidRequest(f"pool size {format_size(pool_size)} is smaller than one chunk")
    if data_size is not None and pool_size > data_size:
        raise InvalidRequest(f"pool size {format_size(pool_size)} is larger than {data_dev} "
                             f"({format_size(data_size)})")
    if data_dev is None:
        OsFile(os.path.join(data_dir, "data-0.dat"), create=True).close()
    for d in {path, data_dir, snap_dir, os.path.dirname(journal_file)}:
        sync_dir(d)
    # The catalog is created last: its existence is what makes the directory a pool.
    cat = Catalog(db_path)
    meta: dict[str, object] = {
        "format": FORMAT_VERSION,
        "uuid": str(pool_uuid),
        "chunk_size": chunk_size,
        "journal_size": journal_size,
        "journal_path": journal_file,
        "data_path": data_dir,
        "snapshot_path": snap_dir,
        "durability": durability,
        "generation": 0,
        "checkpoint_pos": jn.SUPERBLOCK_SIZE,
        "checkpoint_seq": 1,
        "next_volume_id": 1,
        "pool_size": pool_size,  # the first open records data-0.dat with this capacity
    }
    if snap_dev:
        meta["snapshot_device"] = snap_dev  # the default owner's snapshot store
    with cat.transaction() as t:
        t.set_meta(meta)
        if data_dev:
            t.add_pool_file(data_dev, pool_size // chunk_size)
    cat.close()
    sync_dir(path)
    return journal_size


class PoolLock:
    """An exclusive flock on POOL/lock (POOL/lock.OWNER) holding the PID of the process
    that owns those volumes, so a second opener can say who."""

    def __init__(self, pool: str, owner: str = DEFAULT_OWNER) -> None:
        self.path = os.path.join(pool, owned_name("lock", owner))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            whose = f" (owner {owner})" if owner else ""
            raise PoolBusy(f"pool {pool}{whose} is in use by process {holder}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    @staticmethod
    def holder(pool: str, owner: str = DEFAULT_OWNER) -> str | None:
        """The PID holding the owner's lock, or None if nobody does (asks, takes nothing)."""
        try:
            fd = os.open(os.path.join(pool, owned_name("lock", owner)),
                         os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # and with it the shared lock, if it was taken
        return None

    def release(self) -> None:
        if self.fd >= 0:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor, so that the lock goes with
        the process that took it (the file keeps its PID; an flock is held while any copy
        of the descriptor is open)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- owners (L6) -------------------------------------------------------------------------------


def check_owner_name(name: str) -> None:
    if not OWNER_NAME.match(name):
        raise InvalidRequest(f"invalid owner name {name!r}: 1-32 of a-z, 0-9 and '-', "
                             "starting with a letter or digit")


def _open_catalog(path: str) -> Catalog:
    db_path = os.path.join(path, "pool.db")
    if not os.path.exists(db_path):
        raise PoolError(f"{path} is not a jsnap pool (no pool.db); create it with "
                        "'jsnap init'")
    return Catalog(db_path)


def create_owner(
    path: str,
    name: str,
    *,
    journal_path: str | None = None,
    journal_size: int | None = None,
    pool_size: int | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Add owner `name` to the pool at `path`: its journal (POOL/journal.NAME or
    `journal_path`, a file or a block device as for init), its snapshot store, and its
    catalog row last (L6). Its first data file is made at its first open, of `pool_size`
    (None: the size of the data file system). Returns the journal's size."""
    check_owner_name(name)
    cat = _open_catalog(path)
    try:
        if any(n == name for n, _ in cat.owners()):
            raise AlreadyExists(f"pool {path} has an owner {name!r} already")
        journal_file = _resolve(path, journal_path, owned_name("journal", name))
        if journal_size is not None and journal_size < MIN_JOURNAL_SIZE:
            raise InvalidRequest(f"journal size {format_size(journal_size)} is too small: "
                                 "at least 1M")
        taken = {os.path.realpath(str(cat.get_owned(other, "journal_path")))
                 for other, _ in cat.owners()}
        if os.path.realpath(journal_file) in taken:
            raise InvalidRequest(f"{journal_file} is the journal of another owner of this "
                                 "pool")
        chunk_size = cat.get_int("chunk_size")
        data_dir, snap_dir = str(cat.get("data_path")), str(cat.get("snapshot_path"))
        if pool_size is None:
            st = os.statvfs(data_dir)
            pool_size = st.f_blocks * st.f_frsize
        if pool_size < chunk_size:
            raise InvalidRequest(f"pool size {format_size(pool_size)} is smaller than one "
                                 "chunk")
        os.makedirs(os.path.dirname(journal_file), exist_ok=True)
        size = _make_journal(journal_file, journal_size, uuid.UUID(str(cat.get("uuid"))),
                             force, progress)
        store = OsFile(os.path.join(snap_dir, owned_name("snapstore.dat", name)),
                       create=True)
        store.truncate(0)  # a deleted owner's leftovers hold nothing this one may read
        store.sync()
        store.close()
        for d in {path, snap_dir, os.path.dirname(journal_file)}:
            sync_dir(d)
        with cat.transaction() as t:
            t.add_owner(name, {
                "journal_path": journal_file,
                "journal_size": size,
                "generation": 0,
                "checkpoint_pos": jn.SUPERBLOCK_SIZE,
                "pool_size": pool_size,
            })
            t.set_meta({"format": FORMAT_OWNERS})
        return size
    finally:
        cat.close()


def delete_owner(path: str, name: str) -> None:
    """Remove owner `name`, which must hold no volume and not be open anywhere (L6): its
    rows, then its journal (a file; a device is left as it is), data files and snapshot
    store."""
    check_owner_name(name)
    cat = _open_catalog(path)
    try:
        if not any(n == name for n, _ in cat.owners()):
            raise NotFound(f"pool {path} has no owner {name!r}")
        lock = PoolLock(path, name)
        try:
            mine = Catalog(cat.path, name)
            try:
                vols = [v[1] for v in mine.volumes()]
                if vols:
                    raise InvalidRequest(f"owner {name!r} holds {len(vols)} volume(s) "
                                         f"({', '.join(sorted(vols)[:3])}): delete them "
                                         "first")
                files = [p for _, p, _ in mine.pool_files()]
                journal = str(mine.get("journal_path"))
                with mine.transaction() as t:
                    t.delete_owner(name)
            finally:
                mine.close()
            snap = os.path.join(str(cat.get("snapshot_path")), owned_name("snapstore.dat", name))
            for f in [snap, *files] + ([] if is_block_device(journal) else [journal]):
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass
            os.unlink(lock.path)
        finally:
            lock.release()
    finally:
        cat.close()


def list_owners(path: str) -> list[dict[str, object]]:
    """Each owner of the pool: name, journal, volumes, and the PID serving it (None)."""
    cat = _open_catalog(path)
    try:
        counts = cat.volume_counts()
        return [{"name": name, "journal": cat.get_owned(name, "journal_path"),
                 "seq_base": base, "volumes": counts.get(name, 0),
                 "pid": PoolLock.holder(path, name)} for name, base in cat.owners()]
    finally:
        cat.close()
