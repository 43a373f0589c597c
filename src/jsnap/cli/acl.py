"""The access-rule commands: `acl set|list|clear` (which clients may use a volume's exports)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from jsnap.admin import ops
from jsnap.cli.common import q, run, table


def cmd_acl_set(args: argparse.Namespace) -> int:
    body = {"addresses": args.allow_address, "subjects": args.allow_subject}
    r = run(args, lambda e: ops.acl_set(e, args.volume, **body), "PUT",
            f"/v1/acl/{q(args.volume)}", body)
    print(f"access to {r['volume']} (and its snapshots): "
          f"{_rule_text(r['addresses'], r['subjects'])}")
    return 0


def _rule_text(addresses: Sequence[str], subjects: Sequence[str]) -> str:
    parts = []
    if addresses:
        parts.append("from " + ", ".join(addresses))
    if subjects:
        parts.append("with a certificate for " + ", ".join(f"CN={s}" for s in subjects))
    return " and ".join(parts) + " (unix socket: always)"


def cmd_acl_list(args: argparse.Namespace) -> int:
    rows = run(args, ops.acl_list, "GET", "/v1/acl")
    if args.json:
        print(json.dumps(rows))
    else:
        table(["VOLUME", "ADDRESSES", "SUBJECTS"],
              [[r["volume"], ",".join(r["addresses"]) or "any",
                ",".join(r["subjects"]) or "any"] for r in rows])
    return 0


def cmd_acl_clear(args: argparse.Namespace) -> int:
    run(args, lambda e: ops.acl_clear(e, args.volume), "DELETE", f"/v1/acl/{q(args.volume)}")
    print(f"access to {args.volume}: every client")
    return 0
