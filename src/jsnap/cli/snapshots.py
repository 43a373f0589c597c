"""The snapshot commands: `snapshot create|list|delete|rollback|diff`."""

from __future__ import annotations

import argparse
import json
import time

from jsnap.admin import ops
from jsnap.cli.common import q, run, table
from jsnap.units import format_size


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    s = run(args, lambda e: ops.snapshot_create(e, args.volume, args.name), "POST",
            f"/v1/volumes/{q(args.volume)}/snapshots", {"name": args.name})
    print(f"created snapshot {s['volume']}@{s['name']}")
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    path = "/v1/snapshots" + (f"?volume={q(args.volume)}" if args.volume else "")
    rows = run(args, lambda e: ops.snapshot_list(e, args.volume), "GET", path)
    if args.json:
        print(json.dumps(rows))
    else:
        table(["VOLUME", "SNAPSHOT", "CREATED"],
              [[r["volume"], r["name"],
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r["created"])))]
               for r in rows])
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    run(args, lambda e: ops.snapshot_delete(e, args.volume, args.name), "DELETE",
        f"/v1/volumes/{q(args.volume)}/snapshots/{q(args.name)}")
    print(f"deleted snapshot {args.volume}@{args.name}")
    return 0


def cmd_snapshot_rollback(args: argparse.Namespace) -> int:
    r = run(args, lambda e: ops.snapshot_rollback(e, args.volume, args.name), "POST",
            f"/v1/volumes/{q(args.volume)}/snapshots/{q(args.name)}/rollback")
    print(f"rolled back {args.volume} to {args.name} ({r['chunks']} chunks rewritten)")
    return 0


def cmd_snapshot_diff(args: argparse.Namespace) -> int:
    path = f"/v1/volumes/{q(args.volume)}/snapshots/{q(args.since)}/diff" + (
        f"?to={q(args.until)}" if args.until else "")
    d = run(args, lambda e: ops.snapshot_diff(e, args.volume, args.since, args.until),
            "GET", path)
    if args.json:
        print(json.dumps(d))
        return 0
    table(["OFFSET", "LENGTH"], [[x["offset"], x["length"]] for x in d["extents"]])
    print(f"{len(d['extents'])} extent(s), {format_size(d['changed'])} of "
          f"{format_size(d['size'])} changed from {args.volume}@{args.since} to "
          f"{args.volume}{'@' + args.until if args.until else ' (live)'}")
    return 0
