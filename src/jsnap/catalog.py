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
                                 hi > S.seq, if any (see destager.py for why that is exact).
                                 For a thin volume the slot is a pool extent (thin.py), or -1
                                 when the old content was an unmapped, all-zero chunk.
pool_files(no, path, capacity)   the pool's data files and the extents each may grow to
thin_map(vol, chunk, ext, seq)   a thin volume's chunk -> pool extent (see thin.py)

Every thread gets its own connection (sqlite3 objects are not shared across threads).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable

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
        db = self.db
        with Txn(db):
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", items.items())

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


class Txn:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
