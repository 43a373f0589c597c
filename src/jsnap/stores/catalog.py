"""The pool catalog: configuration, volumes, snapshots and the snapshot store index, in SQLite.

Why SQLite (WAL mode, synchronous=FULL): the index must be durable and consistent with the
preserved chunk data at every crash point (DESIGN invariant 1), be queried by (volume, chunk,
seq) ranges, and cost O(1) rows per preserved chunk. SQLite gives atomic multi-row commits and
indexed range queries from the standard library; in WAL mode a commit is one fsync of the
WAL, and readers never block the destager's writer. Measured on this machine: see README.

Tables
------
meta(key, value)                 configuration, generation, checkpoint (pos, seq)
volumes(id, name, size, path,    ids are never reused, so journal records of a deleted
  thin)                          volume are recognisably orphaned; thin=1: no file, a map
snapshots(seq, vol, name, ctime) seq = seq of the snapshot's create marker in the journal;
                                 a row exists once the destager passed the marker
preserved(vol, chunk, hi, slot)  slot `slot` of the snapshot store holds the content chunk
                                 `chunk` had before the write with seq `hi` was destaged.
                                 A snapshot S reads chunk c from the row with the smallest
                                 hi > S.seq, if any (see core/destager.py for why that is exact).
                                 For a thin volume the slot is a pool extent (thin.py), or -1
                                 when the old content was an unmapped, all-zero chunk.
pool_files(no, path, capacity)   the pool's data files and the extents each may grow to
thin_map(vol, chunk, ext, seq)   a thin volume's chunk -> pool extent (see thin.py)

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
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator

from jsnap.errors import NoSpace

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
CREATE TABLE IF NOT EXISTS thin_map (
    vol INTEGER NOT NULL, chunk INTEGER NOT NULL, ext INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (vol, chunk)) WITHOUT ROWID;
"""


class Catalog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        db = self.db
        db.executescript(SCHEMA)
        cols = [r[1] for r in db.execute("PRAGMA table_info(volumes)")]
        if "thin" not in cols:  # pools made before thin volumes: every volume is raw
            db.execute("ALTER TABLE volumes ADD COLUMN thin INTEGER NOT NULL DEFAULT 0")

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
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

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
        return Txn(self.db)

    # -- volumes, snapshots, pool files, thin maps --------------------------------------------

    def volumes(self) -> list[tuple[int, str, int, str, bool]]:
        """(id, name, size, path, thin) of every volume."""
        return [(vid, name, size, path, bool(thin)) for vid, name, size, path, thin in
                self.db.execute("SELECT id, name, size, path, thin FROM volumes")]

    def volume_names(self) -> dict[int, str]:
        return dict(self.db.execute("SELECT id, name FROM volumes"))

    def snapshots(self) -> list[tuple[int, int, str, float]]:
        """(seq, volume id, name, ctime) of every snapshot, by seq."""
        return self.db.execute("SELECT seq, vol, name, ctime FROM snapshots ORDER BY seq"
                               ).fetchall()

    def pool_files(self) -> list[tuple[int, str, int]]:
        """(number, path, capacity in extents) of the pool's data files."""
        return self.db.execute("SELECT no, path, capacity FROM pool_files ORDER BY no"
                               ).fetchall()

    def thin_maps(self) -> Iterator[tuple[int, int, int, int]]:
        """(volume id, chunk, extent, seq) of every thin map entry."""
        return iter(self.db.execute("SELECT vol, chunk, ext, seq FROM thin_map"))

    def thin_map(self, vol: int) -> dict[int, int]:
        """chunk -> extent of one volume."""
        return dict(self.db.execute("SELECT chunk, ext FROM thin_map WHERE vol=?", (vol,)))

    def thin_preserved(self) -> Iterator[tuple[int, int, int, int]]:
        """(volume id, chunk, hi, extent) of thin volumes' preserved copies (not zero)."""
        return iter(self.db.execute(
            "SELECT vol, chunk, hi, slot FROM preserved WHERE slot >= 0 AND vol IN "
            "(SELECT id FROM volumes WHERE thin)"))

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
        """snapshot seq -> preserved chunks (slots or extents) that it alone reads."""
        return dict(self.db.execute(_HELD_SQL).fetchall())

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
        """Snapshot store slots in use (raw volumes; a thin volume's copies are pool extents)."""
        return (r[0] for r in self.db.execute(
            "SELECT slot FROM preserved WHERE vol NOT IN (SELECT id FROM volumes WHERE thin)"))

    def used_extents(self) -> set[int]:
        """Pool extents owned by a thin map or by a thin volume's preserved copy (T2)."""
        used = {r[0] for r in self.db.execute("SELECT ext FROM thin_map")}
        used.update(r[0] for r in self.db.execute(
            "SELECT slot FROM preserved WHERE slot >= 0 AND vol IN "
            "(SELECT id FROM volumes WHERE thin)"))
        return used


_VOLUME_TABLES = ("preserved", "thin_map", "snapshots")  # rows that name a volume

# Space each snapshot alone holds (core/usage.py): a copy (vol, chunk, hi) serves the snapshots
# with seq in (previous hi of that chunk, hi); one it serves alone is that snapshot's.
_HELD_SQL = """
WITH r AS (
    SELECT vol, chunk, hi, slot,
           LAG(hi, 1, -1) OVER (PARTITION BY vol, chunk ORDER BY hi) AS lo
    FROM preserved),
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

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> CatalogTxn:
        self.db.execute("BEGIN IMMEDIATE")
        return CatalogTxn(self.db)

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

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def set_meta(self, items: dict[str, object]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", items.items())

    # -- volumes ------------------------------------------------------------------------------

    def add_volume(self, vid: int, name: str, size: int, path: str, thin: bool,
                   ctime: float) -> None:
        """A new volume row; the next id moves past it (K2)."""
        self.db.execute(
            "INSERT INTO volumes (id, name, size, path, ctime, thin) VALUES (?,?,?,?,?,?)",
            (vid, name, size, path, ctime, int(thin)))
        self.db.execute("UPDATE meta SET value=? WHERE key='next_volume_id'", (vid + 1,))

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

    def add_pool_file(self, no: int, path: str, capacity: int) -> None:
        self.db.execute("INSERT INTO pool_files (no, path, capacity) VALUES (?,?,?)",
                        (no, path, capacity))

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
