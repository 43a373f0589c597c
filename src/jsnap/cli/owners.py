"""Owners of a pool's volumes: `owner create|list|delete` (core/layout.py, "Owners"). Each
owner is served by its own process (`jsnap -p POOL --owner NAME serve`), with its own
journal; the default owner ('') is the pool's own."""

from __future__ import annotations

import argparse
import json

from jsnap.cli.common import table
from jsnap.cli.progress import zeroing
from jsnap.core.layout import create_owner, delete_owner, list_owners
from jsnap.units import format_size


def cmd_owner_create(args: argparse.Namespace) -> int:
    with zeroing() as progress:
        size = create_owner(args.pool, args.name, journal_path=args.journal_path,
                            journal_size=args.journal_size, pool_size=args.pool_size,
                            force=args.force, progress=progress)
    print(f"created owner {args.name} of {args.pool} (journal {format_size(size)}); serve "
          f"its volumes with 'jsnap -p {args.pool} --owner {args.name} serve'")
    return 0


def cmd_owner_list(args: argparse.Namespace) -> int:
    rows = list_owners(args.pool)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table(["OWNER", "VOLUMES", "SERVED BY", "JOURNAL"],
          [[r["name"] or "(default)", r["volumes"],
            f"pid {r['pid']}" if r["pid"] else "-", r["journal"]] for r in rows])
    return 0


def cmd_owner_delete(args: argparse.Namespace) -> int:
    delete_owner(args.pool, args.name)
    print(f"deleted owner {args.name}")
    return 0
