"""An engine's status: one consistent picture of its state for `jsnap status`, the admin
API's GET /v1/status and /metrics, taken under the engine's lock (engine.py E5)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from jsnap.core.pool import store_kind

if TYPE_CHECKING:
    from jsnap.core.engine import Engine


def engine_status(e: Engine) -> dict[str, object]:
    bl = e.backlog
    with e.lock:
        j = e.journal
        failed = bl.failed or j.failed
        now = time.monotonic()
        oldest = bl.oldest_append()
        rate_records, rate_bytes = bl.destage_window.rate(now)
        return {
            "state": (f"read-only: {failed}" if failed else
                      f"waiting for space: {bl.space_short}" if bl.space_short
                      else f"waiting for store: {bl.store_down}" if bl.store_down
                      else "ok"),
            "destage_space_waits": bl.space_waits,
            "destage_store_waits": bl.store_waits,
            "durability": e.durability,
            "chunk_size": e.chunk_size,
            "journal_size": j.end,
            "journal_used": j.used,
            "journal_fill": j.fill(),
            "journal_records": len(bl.pending),
            "journal_waiters": j.waiters + bl.remap_waiters,
            "remap_pending_bytes": bl.remap_bytes,
            "durable_seq": j.durable_seq,
            "written_seq": j.written_seq,
            "changes_pieces": e.changes.npieces,
            "destaged_records": bl.destaged_records,
            "preserved_copies": bl.preserved_copies,
            "cache_windows_dropped": bl.cache_windows_dropped,
            "journal_oldest_age": max(now - oldest, 0.0) if bl.pending else 0.0,
            "destaged_bytes": bl.destaged_bytes,
            "destage_rate_records": rate_records,
            "destage_rate_bytes": rate_bytes,
            "snapshot_count": sum(len(v.snaps) for v in e.volumes.values()),
            "store_slots": e.slots.count,
            "store_free_slots": e.slots.free_count,
            "volumes": len(e.volumes),
            "stores": [{"role": "journal", "path": e.journal_path,
                        "kind": store_kind(e.journal_path), "size": j.end,
                        "used": j.used}, *e.shared.stores()],
            **e.pool_stats(),
        }
