"""The pool's volumes and the pool itself: `init`, `volume create|resize|list|delete`,
`pool grow` and `pool release`, and `export`/`import` of a volume's content as an image
file (transfer.py does the copying)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jsnap.admin import ops
from jsnap.cli import transfer
from jsnap.cli.common import q, run, table
from jsnap.cli.progress import zeroing
from jsnap.core.layout import init_pool
from jsnap.errors import JsnapError
from jsnap.units import format_size


def cmd_init(args: argparse.Namespace) -> int:
    with zeroing() as progress:
        size = init_pool(
            args.path,
            journal_size=args.journal_size,
            chunk_size=args.chunk_size,
            durability=args.durability,
            journal_path=args.journal_path,
            data_path=args.data_path,
            snapshot_path=args.snapshot_path,
            pool_size=args.pool_size,
            force=args.force,
            progress=progress,
        )
    print(f"created pool {args.path} (journal {format_size(size)}, chunk "
          f"{format_size(args.chunk_size)}, durability {args.durability})")
    return 0


def cmd_volume_create(args: argparse.Namespace) -> int:
    if args.preallocate and args.thin:
        raise JsnapError("--preallocate needs --raw (a thin volume allocates on first write)")
    target = os.path.abspath(args.device) if args.device else args.nbd
    if target is None and args.size is None:
        raise JsnapError("--size is required (with --device or --nbd it defaults to the "
                         "device's or export's)")
    body: dict[str, Any] = {"name": args.name, "size": args.size,
                            "preallocate": args.preallocate, "thin": args.thin}
    if target is not None:
        body.update(thin=False, device=target)
    v = run(args, lambda e: ops.volume_create(e, **body), "POST", "/v1/volumes", body)
    if v.get("device"):
        print(f"created volume {v['name']} on {v['device']} ({format_size(v['size'])}, "
              "with the data it holds)")
    else:
        print(f"created {'thin' if v['thin'] else 'raw'} volume {v['name']} "
              f"({format_size(v['size'])})")
    return 0


def cmd_volume_resize(args: argparse.Namespace) -> int:
    v = run(args, lambda e: ops.volume_resize(e, args.name, args.size), "POST",
            f"/v1/volumes/{q(args.name)}/resize", {"size": args.size})
    print(f"volume {v['name']} is now {format_size(v['size'])}")
    return 0


def cmd_pool_grow(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file) if args.file else None
    st = run(args, lambda e: ops.pool_grow(e, args.size, path), "POST", "/v1/pool/grow",
             {"size": args.size, "path": path})
    print(f"pool capacity is now {format_size(st['pool_capacity'])} "
          f"({format_size(st['pool_available'])} available)")
    return 0


def cmd_pool_release(args: argparse.Namespace) -> int:
    st = run(args, ops.pool_release, "POST", "/v1/pool/release", {})
    print(f"released {format_size(st['released'])} to the file system; the data files hold "
          f"{format_size(st['pool_backed'])}")
    return 0


def cmd_volume_list(args: argparse.Namespace) -> int:
    rows = run(args, ops.volume_list, "GET", "/v1/volumes")
    if args.json:
        print(json.dumps(rows))
    else:
        table(["NAME", "TYPE", "SIZE", "ALLOCATED", "SNAPSHOTS"],
              [[r["name"], "thin" if r["thin"] else r.get("device") or "raw",
                format_size(int(r["size"])), format_size(int(r["allocated"])), r["snapshots"]]
               for r in rows])
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    v = run(args, lambda e: ops.volume_delete(e, args.name), "DELETE",
            f"/v1/volumes/{q(args.name)}")
    if v.get("device"):
        print(f"deleted volume {args.name}; {v['device']} holds its content (every write "
              "destaged), its snapshots are gone")
    else:
        print(f"deleted volume {args.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(transfer.export_image(args.pool, args.export, args.file, args.format,
                                opener=args.opener, owner=args.owner))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    print(transfer.import_image(args.pool, args.file, args.volume, args.format, args.create,
                                opener=args.opener, owner=args.owner))
    return 0
