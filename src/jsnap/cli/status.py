"""Looking at the pool: `status` (live through the admin API, or offline) and `check` (offline
verification and repair), with the human-readable sizes and durations status prints."""

from __future__ import annotations

import argparse
import json
import time

from jsnap.admin import ops
from jsnap.cli.common import open_pool, run, table
from jsnap.units import format_size


def cmd_status(args: argparse.Namespace) -> int:
    st = run(args, ops.status, "GET", "/v1/status")
    if args.json:
        print(json.dumps(st))
        return 0
    now = time.time()
    served = "served by a running jsnap serve" if st["serving"] else "no server running"
    print(f"pool        {st['pool']} ({served})")
    print(f"state       {st['state']}")
    print(f"durability  {st['durability']}    chunk {format_size(st['chunk_size'])}")
    print(f"journal     {_human(st['journal_used'])} of {format_size(st['journal_size'])} "
          f"({st['journal_fill'] * 100:.1f}% full), {st['journal_records']} records not "
          f"destaged, oldest {_duration(st['journal_oldest_age'])}")
    if st.get("remap_pending_bytes"):
        print(f"            + {_human(st['remap_pending_bytes'])} written in place (large "
              "aligned writes), not yet mapped")
    print(f"destage     {_human(st['destage_rate_bytes'])}/s, "
          f"{st['destage_rate_records']:.0f} records/s over the last minute")
    print(f"space       {_human(st['pool_capacity'])} capacity, "
          f"{_human(st['pool_allocated'])} allocated ({_human(st['pool_mapped'])} volumes, "
          f"{_human(st['pool_preserved'])} snapshots), "
          f"{_human(st['pool_reserved'])} reserved by the journal, "
          f"{_human(st['pool_available'])} available")
    print(f"file system {_human(st['pool_fs_free'])} free where the data files are, "
          f"{_human(st['pool_fs_reserve'])} of it kept for the catalog and other files")
    print(f"raw store   {st['store_slots']} snapshot slots, {st['store_free_slots']} free")
    for i, s in enumerate(st.get("stores", [])):
        print(f"{'stores' if i == 0 else '':<12}{s['role']:<15}{s['path']} ({s['kind']}, "
              f"{_human(s['used'])} used of {_human(s['size'])})")
    print()
    table(["VOLUME", "TYPE", "SIZE", "ALLOCATED", "SNAPSHOTS"],
          [[v["name"], "thin" if v["thin"] else "raw", format_size(v["size"]),
            _human(v["allocated"]), v["snapshots"]] for v in st["volumes"]])
    if st["snapshots"]:
        print()
        table(["SNAPSHOT", "AGE", "HELD"],
              [[f"{s['volume']}@{s['name']}", _duration(s["age"]), _human(s["held_bytes"])]
               for s in st["snapshots"]])
    print()
    if st["clients"]:
        table(["CLIENT", "EXPORT", "CONNECTED", "REQUESTS"],
              [[c["peer"], c["export"] or "(negotiating)",
                f"{_duration(now - c['since'])} ago", c["requests"]]
               for c in st["clients"]])
    else:
        print("clients     none" + ("" if st["serving"] else " (no server running)"))
    return 0


def _human(n: float) -> str:
    """Bytes for people, to three significant digits: 1572864 -> "1.50M"."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit:
            v = n / unit
            return f"{v:.3g}{suffix}" if v < 1000 else f"{v:.0f}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    """A duration for people: 0.25s, 42s, 5m12s, 3h04m, 2d05h."""
    if seconds < 10:
        return f"{seconds:.2g}s" if seconds < 1 else f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cmd_check(args: argparse.Namespace) -> int:
    from jsnap.core.check import check_pool  # noqa: PLC0415 - only this command needs it

    with open_pool(args) as e:
        problems, repairs = check_pool(e, repair=args.repair)
        print(f"journal: {e.replayed_records} records to destage; {e.journal.replay_end}")
    for line in repairs:
        print(f"repaired: {line}")
    if repairs:  # check again on the repaired catalog, with state rebuilt from it
        with open_pool(args) as e:
            problems, _ = check_pool(e)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found" if problems else "pool is consistent")
    return 1 if problems else 0
