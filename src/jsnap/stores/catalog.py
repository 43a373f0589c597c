"""The pool catalog: configuration, volumes, snapshots and the snapshot store index, in SQLite.

Why SQLite (WAL mode, synchronous=FULL): the index must be durable and consistent with the
preserved chunk data at every crash point (DESIGN invariant 1), be queried by (volume, chunk,
seq) ranges, and cost O(1) rows per preserved chunk. SQLite gives atomic multi-row commits and
indexed range queries from the standard library; in WAL mode a commit is one fsync of the
WAL, and readers never block the destager's writer. Measured on this machine: see README.

Tables
------
meta(key, value)                 configuration, generation, checkpoint (pos, seq); an
                                 owner's own keys (OWNER_KEYS) are "owner.NAME.key"
owners(name, seq_base, ctime)    owners of the pool's volumes besides the default one ('')
volumes(id, name, size, path,    ids are never reused, so journal records of a deleted
  thin, owner)                   volume are recognisably orphaned; thin=1: no file, a map
snapshots(seq, vol, name, ctime) seq = seq of the snapshot's create marker in the journal;
                                 a row exists once the destager passed the marker
preserved(vol, chunk, hi, slot)  slot `slot` of the snapshot store holds the content chunk
                                 `chunk` had before the write with seq `hi` was destaged.
                                 A snapshot S reads chunk c from the row with the smallest
                                 hi > S.seq, if any (see core/destager.py for why that is exact).
                                 For a thin volume the slot is a pool extent (thin.py), or -1
                                 when the old content was an unmapped, all-zero chunk.
pool_files(no, path, capacity,   the pool's data files, the extents each may grow to, and
  owner)                         the owner whose volumes allocate from it
thin_map(vol, chunk, ext, seq)   a thin volume's chunk -> pool extent (see thin.py)

Owners: a pool's volumes are split among owners (core/pool.py), each with its own journal,
lock, data files and snapshot store. A Catalog is opened for one owner and its reads see
that owner's part: its volumes and their rows, its data files and the extents in them, its
meta keys. Names, volume ids and snapshot seqs are pool-wide (K2, K5).

Every SQL statement of the package is in this module: other modules call the named
methods below, reads on `Catalog`, changes inside `with catalog.transaction() as t:` on
the `CatalogTxn` it yields (one SQLite transaction, BEGIN IMMEDIATE ... COMMIT).

Invariants
----------
K1 A change commits whole or not at all: every write goes through a CatalogTxn, and the
   destager's batch (preserved rows, map rows, remap_seq, a marker's snapshot row and the
   copies it frees) is one transaction, committed after the data it names is synced
   (DESIGN invariant 1, thin.py T3).
K2 Volume ids are never reused (meta next_volume_id only grows), so journal records of a
   deleted volume stay recognisable as orphans.
K3 A thread's reads inside its own transaction see that transaction's writes: every thread
   has its own connection (sqlite3 objects are not shared across threads), and a
   CatalogTxn runs on the connection of the thread that opened it.
K4 A transaction that fails for lack of space (SQLITE_FULL: the file system or its quota is
   full) is rolled back whole and raises NoSpace: nothing changed, so the caller may retry
   it once space returns (the destager does: core/destager.py, "space").
K5 What owners share is allocated inside one transaction, so owners in other processes
   never collide: a volume id (take_volume_id), a data file number (add_pool_file), an
   owner's seq base. Each owner's journal numbers records from its own base
   (owner index << SEQ_BITS), so snapshot seqs, which key the snapshots table, are unique
   across the pool.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator

from jsnap.errors import AlreadyExists, NoSpace
from jsnap.stores.thin import FILE_SHIFT

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    path TEXT NOT NULL, ctime REAL NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY, vol INTEGER NOT NULL, name TEXT NOT NULL, ctime REAL NOT NULL);
CREATE TABLE IF NOT EXISTS preserved (
    vol INTEGER NOT NULL, chunk INTEGER NOT NULL, hi INTEGER NOT NULL, slot INTEGER NOT NULL,
    PRIMARY KEY (vol, chunk, hi)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS preserved_by_hi ON preserved (vol, hi);
CREATE TABLE IF NOT EXISTS pool_files (
    no INTEGER PRIMARY KEY, path TEXT NOT NULL, capacity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS owners (
    name TEXT PRIMARY KEY, seq_base INTEGER NOT NULL UNIQUE, ctime REAL NOT NULL);
CREATE TABLE IF NOT EXISTS thin_map (
    vol INTEGER NOT NULL, chunk INTEGER NOT NULL, ext INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (vol, chunk)) WITHOUT ROWID;
"""

DEFAULT_OWNER = ""
SEQ_BITS = 48  # an owner's journal seqs: base + up to 2**48 records (89 years at 100k/s)
# Meta keys each owner has its own of: its journal and where destage stands in it, its data
# files' default size, its access rules. The default owner's are the plain keys.
OWNER_KEYS = frozenset({"journal_path", "journal_size", "generation", "checkpoint_pos",
                        "checkpoint_seq", "checkpoint_gen", "remap_seq", "pool_size", "acl"})


def owner_key(owner: str, key: str) -> str:
    return f"owner.{owner}.{key}" if owner and key in OWNER_KEYS else key


class Catalog:
    def __init__(self, path: str, owner: str = DEFAULT_OWNER) -> None:
        self.path = path
        self.owner = owner
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        db = self.db
        db.executescript(SCHEMA)
        cols = [r[1] for r in db.execute("PRAGMA table_info(volumes)")]
        if "thin" not in cols:  # pools made before thin volumes: every volume is raw
            db.execute("ALTER TABLE volumes ADD COLUMN thin INTEGER NOT NULL DEFAULT 0")
        for table in ("volumes", "pool_files"):  # pools made before owners: all the default's
            if "owner" not in [r[1] for r in db.execute(f"PRAGMA table_info({table})")]:
                try:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN owner TEXT NOT NULL "
                               "DEFAULT ''")
                except sqlite3.OperationalError as e:  # another owner's process just did
                    if "duplicate column" not in str(e):
                        raise

    @property
    def db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def release_thread(self) -> None:
        """Close the calling thread's connection (threads that live for one request)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._all_lock:
                self._all.remove(conn)
            conn.close()

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    # -- meta ---------------------------------------------------------------------------------

    def get(self, key: str, default: object = None) -> object:
        """A pool-wide key, or this owner's own for OWNER_KEYS."""
        value = self.get_owned(self.owner, key)
        return default if value is None else value

    def get_owned(self, owner: str, key: str) -> object:
        """A pool-wide key, or `owner`'s own for OWNER_KEYS (e.g. another's journal path)."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?",
                              (owner_key(owner, key),)).fetchone()
        return None if row is None else row[0]

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if not isinstance(value, int):
            raise ValueError(f"{self.path}: meta {key!r} is {value!r}, not an integer")
        return value

    def set_many(self, items: dict[str, object]) -> None:
        with self.transaction() as t:
            t.set_meta(items)

    def transaction(self) -> Txn:
        """`with catalog.transaction() as t:` one atomic change through t's methods (K1)."""
        return Txn(self.db, self.owner)

    # -- owners -------------------------------------------------------------------------------

    def owners(self) -> list[tuple[str, int]]:
        """(name, seq base) of every owner, the default one ('', 0) first."""
        return [(DEFAULT_OWNER, 0)] + self.db.execute(
            "SELECT name, seq_base FROM owners ORDER BY seq_base").fetchall()

    def volume_counts(self) -> dict[str, int]:
        """owner -> how many volumes it holds (owners with none are absent)."""
        return dict(self.db.execute("SELECT owner, count(*) FROM volumes GROUP BY owner"))

    def volume_owner(self, name: str) -> str | None:
        """The owner of the volume called `name` (any owner's), or None."""
        row = self.db.execute("SELECT owner FROM volumes WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def volume_at(self, path: str) -> str | None:
        """The name of the volume (any owner's) whose production is `path`, or None."""
        row = self.db.execute("SELECT name FROM volumes WHERE path=?", (path,)).fetchone()
        return None if row is None else str(row[0])

    # -- volumes, snapshots, pool files, thin maps (this owner's) -----------------------------

    def volumes(self) -> list[tuple[int, str, int, str, bool]]:
        """(id, name, size, path, thin) of every volume of this owner."""
        return [(vid, name, size, path, bool(thin)) for vid, name, size, path, thin in
                self.db.execute("SELECT id, name, size, path, thin FROM volumes WHERE owner=?",
                                (self.owner,))]

    def volume_names(self) -> dict[int, str]:
        """id -> name of every volume, any owner's."""
        return dict(self.db.execute("SELECT id, name FROM volumes"))

    def snapshots(self) -> list[tuple[int, int, str, float]]:
        """(seq, volume id, name, ctime) of every snapshot of this owner's volumes, by seq."""
        return self.db.execute(
            "SELECT seq, vol, name, ctime FROM snapshots WHERE vol IN "
            f"({_MY_VOLUMES}) ORDER BY seq", (self.owner,)).fetchall()

    def pool_files(self) -> list[tuple[int, str, int]]:
        """(number, path, capacity in extents) of this owner's data files."""
        return self.db.execute("SELECT no, path, capacity FROM pool_files WHERE owner=? "
                               "ORDER BY no", (self.owner,)).fetchall()

    def thin_maps(self) -> Iterator[tuple[int, int, int, int]]:
        """(volume id, chunk, extent, seq) of every thin map entry of this owner's volumes."""
        return iter(self.db.execute(
            f"SELECT vol, chunk, ext, seq FROM thin_map WHERE vol IN ({_MY_VOLUMES})",
            (self.owner,)))

    def extent_owners(self) -> Iterator[tuple[int, int, int, int | None]]:
        """(volume id, chunk, extent, hi) of every map entry (hi None) and preserved copy
        naming an extent of this owner's data files, whoever's volume it is: what `jsnap
        check` counts, and what the free list must not hold (used_extents)."""
        mine = (self.owner,)
        yield from self.db.execute(
            f"SELECT vol, chunk, ext, NULL FROM thin_map WHERE {_IN_MY_FILES('ext')}", mine)
        yield from self.db.execute(
            "SELECT vol, chunk, slot, hi FROM preserved WHERE slot >= 0 AND vol IN "
            f"(SELECT id FROM volumes WHERE thin) AND {_IN_MY_FILES('slot')}", mine)

    def thin_map(self, vol: int) -> dict[int, int]:
        """chunk -> extent of one volume."""
        return dict(self.db.execute("SELECT chunk, ext FROM thin_map WHERE vol=?", (vol,)))

    def orphan_rows(self) -> dict[str, int]:
        """Rows of deleted volumes, by table ('preserved', 'thin_map', 'snapshots')."""
        return {table: self.db.execute(
            f"SELECT count(*) FROM {table} WHERE vol NOT IN (SELECT id FROM volumes)"
        ).fetchone()[0] for table in _VOLUME_TABLES}

    def mapped_beyond(self, vol: int, top: int) -> int:
        """Map entries of `vol` for chunks past `top` (its last chunk)."""
        n: int = self.db.execute("SELECT count(*) FROM thin_map WHERE vol=? AND chunk>?",
                                 (vol, top)).fetchone()[0]
        return n

    def held_chunks(self) -> dict[int, int]:
        """snapshot seq -> preserved chunks (slots or extents) that it alone reads, for this
        owner's snapshots."""
        return dict(self.db.execute(_HELD_SQL, (self.owner,)).fetchall())

    # -- preserved index ----------------------------------------------------------------------

    def max_his(self, vol: int, chunks: list[int]) -> dict[int, int]:
        """max_hi(c) of each chunk: the newest preserved hi (chunks with none are absent).
        One query per 500 chunks: the destager asks once per batch, not once per chunk."""
        out: dict[int, int] = {}
        db = self.db
        for i in range(0, len(chunks), 500):
            part = chunks[i : i + 500]
            out.update(db.execute(
                "SELECT chunk, max(hi) FROM preserved WHERE vol=? AND chunk IN "
                f"({','.join('?' * len(part))}) GROUP BY chunk", (vol, *part)))
        return out

    def find_preserved(self, vol: int, chunk: int, snap_seq: int) -> int | None:
        """Slot holding chunk `chunk` as snapshot `snap_seq` sees it, or None (see module doc)."""
        row = self.db.execute(
            "SELECT slot FROM preserved WHERE vol=? AND chunk=? AND hi>? ORDER BY hi LIMIT 1",
            (vol, chunk, snap_seq),
        ).fetchone()
        return None if row is None else row[0]

    def preserved_in(self, vol: int, c0: int, c1: int, snap_seq: int) -> dict[int, int]:
        """find_preserved of every chunk in [c0, c1] that has a copy for snapshot
        `snap_seq`, in one query (block status of a snapshot asks per request range)."""
        # A bare column beside SQLite's one min() comes from the row holding that minimum.
        return {chunk: slot for chunk, slot, _ in self.db.execute(
            "SELECT chunk, slot, min(hi) FROM preserved WHERE vol=? AND chunk BETWEEN ? AND ? "
            "AND hi>? GROUP BY chunk", (vol, c0, c1, snap_seq))}

    def chunks_changed_since(self, vol: int, snap_seq: int, below: int | None = None
                             ) -> list[int]:
        """Chunks with a destaged write after snapshot `snap_seq` (and before `below`): the
        first such write of each chunk left a preserved row, kept while the snapshot lives."""
        rows = self.db.execute(
            "SELECT DISTINCT chunk FROM preserved WHERE vol=? AND hi>? AND hi<?",
            (vol, snap_seq, (1 << 63) - 1 if below is None else below),
        )
        return [r[0] for r in rows]

    def used_slots(self) -> Iterable[int]:
        """This owner's snapshot store slots in use: its raw volumes' copies (a thin volume's
        copies are pool extents), and those of deleted volumes until `check --repair`."""
        return (r[0] for r in self.db.execute(
            "SELECT slot FROM preserved WHERE vol NOT IN "
            "(SELECT id FROM volumes WHERE thin OR owner != ?)", (self.owner,)))

    def used_extents(self) -> set[int]:
        """Extents of this owner's data files owned by a thin map or by a thin volume's
        preserved copy (T2)."""
        return {ext for _vid, _chunk, ext, _hi in self.extent_owners()}


_VOLUME_TABLES = ("preserved", "thin_map", "snapshots")  # rows that name a volume
_MY_VOLUMES = "SELECT id FROM volumes WHERE owner=?"


def _IN_MY_FILES(column: str) -> str:  # noqa: N802 (a SQL fragment, named like the others)
    """`column` (an extent id) lies in a data file of the owner bound as the parameter."""
    return f"({column} >> {FILE_SHIFT}) IN (SELECT no FROM pool_files WHERE owner=?)"

# Space each snapshot alone holds (core/usage.py): a copy (vol, chunk, hi) serves the snapshots
# with seq in (previous hi of that chunk, hi); one it serves alone is that snapshot's.
_HELD_SQL = """
WITH r AS (
    SELECT vol, chunk, hi, slot,
           LAG(hi, 1, -1) OVER (PARTITION BY vol, chunk ORDER BY hi) AS lo
    FROM preserved WHERE vol IN (SELECT id FROM volumes WHERE owner=?)),
owner AS (
    SELECT min(s.seq) AS snap
    FROM r JOIN snapshots s ON s.vol = r.vol AND s.seq > r.lo AND s.seq < r.hi
    WHERE r.slot >= 0
    GROUP BY r.vol, r.chunk, r.hi
    HAVING count(*) = 1)
SELECT snap, count(*) FROM owner GROUP BY snap
"""


_FULL = (sqlite3.SQLITE_FULL,)


class Txn:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on an autocommit connection; yields
    the CatalogTxn whose methods are the changes a transaction may make."""

    def __init__(self, db: sqlite3.Connection, owner: str) -> None:
        self.db = db
        self.owner = owner

    def __enter__(self) -> CatalogTxn:
        self.db.execute("BEGIN IMMEDIATE")
        return CatalogTxn(self.db, self.owner)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        failed = exc
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as e:
                failed = e
        # SQLite may have rolled back already (SQLITE_FULL inside a statement does): a
        # second ROLLBACK would raise and hide why.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        if isinstance(failed, sqlite3.Error) and failed.sqlite_errorcode in _FULL:
            raise NoSpace(f"catalog: {failed} (nothing changed)") from failed  # K4
        if exc_type is None and isinstance(failed, BaseException):
            raise failed  # the COMMIT failed and was rolled back


class CatalogTxn:
    """The changes one transaction makes (K1); reads here see them (K3)."""

    def __init__(self, db: sqlite3.Connection, owner: str) -> None:
        self.db = db
        self.owner = owner

    def set_meta(self, items: dict[str, object]) -> None:
        """Pool-wide keys, or this owner's own for OWNER_KEYS."""
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(owner_key(self.owner, k), v) for k, v in items.items()])

    # -- owners -------------------------------------------------------------------------------

    def add_owner(self, name: str, meta: dict[str, object]) -> int:
        """A new owner with its own meta keys (`meta`, OWNER_KEYS); returns its seq base,
        the next free one (K5), where its journal's checkpoint_seq starts."""
        if self.db.execute("SELECT 1 FROM owners WHERE name=?", (name,)).fetchone():
            raise AlreadyExists(f"owner {name!r} exists")
        (top,) = self.db.execute("SELECT max(seq_base) FROM owners").fetchone()
        base = (top or 0) + (1 << SEQ_BITS)
        self.db.execute("INSERT INTO owners (name, seq_base, ctime) VALUES (?,?,?)",
                        (name, base, time.time()))
        assert not set(meta) - OWNER_KEYS, meta
        meta = {**meta, "checkpoint_seq": base}  # its journal's first record
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(owner_key(name, k), v) for k, v in meta.items()])
        return base

    def delete_owner(self, name: str) -> None:
        """Drop an owner that holds no volume, its data file rows and its meta keys."""
        assert name != DEFAULT_OWNER
        self.db.execute("DELETE FROM owners WHERE name=?", (name,))
        self.db.execute("DELETE FROM pool_files WHERE owner=?", (name,))
        self.db.executemany("DELETE FROM meta WHERE key=?",
                            [(owner_key(name, k),) for k in OWNER_KEYS])

    # -- volumes ------------------------------------------------------------------------------

    def take_volume_id(self) -> int:
        """A new volume id, never used before in this pool by any owner (K2, K5)."""
        (vid,) = self.db.execute("SELECT value FROM meta WHERE key='next_volume_id'").fetchone()
        self.db.execute("UPDATE meta SET value=? WHERE key='next_volume_id'", (vid + 1,))
        return int(vid)

    def add_volume(self, vid: int, name: str, size: int, path: str, thin: bool,
                   ctime: float) -> None:
        """A new volume row of this owner, with an id from take_volume_id; a name any
        owner's volume has already is refused (names are pool-wide)."""
        owner = self.db.execute("SELECT owner FROM volumes WHERE name=?", (name,)).fetchone()
        if owner is not None:
            held = f" (owned by {owner[0]!r})" if owner[0] != self.owner else ""
            raise AlreadyExists(f"volume {name!r} exists{held}")
        self.db.execute(
            "INSERT INTO volumes (id, name, size, path, ctime, thin, owner) "
            "VALUES (?,?,?,?,?,?,?)", (vid, name, size, path, ctime, int(thin), self.owner))

    def resize_volume(self, vid: int, size: int) -> None:
        self.db.execute("UPDATE volumes SET size=? WHERE id=?", (size, vid))

    def delete_volume(self, vid: int) -> list[int]:
        """Drop a volume and every row naming it; returns the snapshot store slots (raw) or
        pool extents (thin) its preserved copies and map entries owned."""
        db = self.db
        owned = [r[0] for r in db.execute("SELECT slot FROM preserved WHERE vol=?", (vid,))]
        owned += [r[0] for r in db.execute("SELECT ext FROM thin_map WHERE vol=?", (vid,))]
        for table in _VOLUME_TABLES:
            db.execute(f"DELETE FROM {table} WHERE vol=?", (vid,))
        db.execute("DELETE FROM volumes WHERE id=?", (vid,))
        return owned

    def delete_orphans(self, table: str) -> None:
        """`jsnap check --repair`: rows of `table` that name no volume."""
        assert table in _VOLUME_TABLES
        self.db.execute(f"DELETE FROM {table} WHERE vol NOT IN (SELECT id FROM volumes)")

    # -- pool files and thin maps -------------------------------------------------------------

    def add_pool_file(self, path: str, capacity: int) -> int:
        """A data file of this owner; returns its number, the next in the pool (K5)."""
        (top,) = self.db.execute("SELECT max(no) FROM pool_files").fetchone()
        no = 0 if top is None else top + 1
        self.db.execute("INSERT INTO pool_files (no, path, capacity, owner) VALUES (?,?,?,?)",
                        (no, path, capacity, self.owner))
        return no

    def set_pool_file_capacity(self, no: int, capacity: int) -> None:
        self.db.execute("UPDATE pool_files SET capacity=? WHERE no=?", (capacity, no))

    def map_chunks(self, rows: Iterable[tuple[int, int, int, int]]) -> None:
        """(volume id, chunk, extent, seq) map entries, replacing any."""
        self.db.executemany(
            "INSERT OR REPLACE INTO thin_map (vol, chunk, ext, seq) VALUES (?,?,?,?)", rows)

    def unmap_chunks(self, rows: Iterable[tuple[int, int]]) -> None:
        """(volume id, chunk) map entries to drop."""
        self.db.executemany("DELETE FROM thin_map WHERE vol=? AND chunk=?", rows)

    def unmap_beyond(self, vol: int, top: int) -> None:
        self.db.execute("DELETE FROM thin_map WHERE vol=? AND chunk>?", (vol, top))

    # -- snapshots and the preserved index ----------------------------------------------------

    def add_preserved(self, rows: Iterable[tuple[int, int, int, int]]) -> None:
        """(volume id, chunk, hi, slot) preserved copies, replacing any (a replayed batch)."""
        self.db.executemany(
            "INSERT OR REPLACE INTO preserved (vol, chunk, hi, slot) VALUES (?,?,?,?)", rows)

    def add_snapshot(self, seq: int, vol: int, name: str, ctime: float) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO snapshots (seq, vol, name, ctime) VALUES (?,?,?,?)",
            (seq, vol, name, ctime))

    def delete_snapshot(self, seq: int) -> None:
        self.db.execute("DELETE FROM snapshots WHERE seq=?", (seq,))

    def free_copies(self, vol: int, deleted: int, prev: int | None, nxt: int) -> list[int]:
        """Delete the copies no live snapshot reads once snapshot `deleted` is gone; return
        their slots. A copy (c, hi) serves the live snapshots in (previous hi of c, hi): only
        copies with hi in (deleted, nxt), `nxt` the next live snapshot, could have served
        `deleted` alone, and each is kept iff `prev`, the previous live one, still falls in
        its range."""
        db = self.db
        rows = db.execute("SELECT chunk, hi, slot FROM preserved WHERE vol=? AND hi>? AND hi<?",
                          (vol, deleted, nxt)).fetchall()
        freed: list[int] = []
        for chunk, hi, slot in rows:
            if prev is not None:
                (before,) = db.execute(
                    "SELECT max(hi) FROM preserved WHERE vol=? AND chunk=? AND hi<?",
                    (vol, chunk, hi)).fetchone()
                if before is None or before < prev:
                    continue  # `prev` still reads this copy
            db.execute("DELETE FROM preserved WHERE vol=? AND chunk=? AND hi=?",
                       (vol, chunk, hi))
            freed.append(slot)
        return freed
