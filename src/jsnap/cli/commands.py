"""The `jsnap` command line. Every error is one readable line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import quote

from jsnap import __version__
from jsnap.admin import api as admin
from jsnap.admin import ops
from jsnap.cli import gcpolicy, logs, transfer
from jsnap.core.engine import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_JOURNAL_SIZE,
    DURABILITY_MODES,
    Engine,
    init_pool,
)
from jsnap.errors import JsnapError
from jsnap.stores.files import FileOpener, OsFile
from jsnap.transport import acl
from jsnap.transport.server import (
    DEFAULT_BUSY_POLL,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_INFLIGHT_REQUESTS,
    MAX_BUSY_POLL,
    NbdServer,
)
from jsnap.transport.tls import server_context
from jsnap.units import format_size, parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the usage block: "a bad CLI argument gets one readable line".
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _millis(text: str) -> int:
    if not text.isdigit() or int(text) > 60_000:
        raise argparse.ArgumentTypeError(f"invalid interval {text!r} (milliseconds, 0-60000)")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (a positive integer)")
    return int(text)


def _positive_size(text: str) -> int:
    n = _size(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (must be positive)")
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (seconds, 0-86400)")
    return value


def _busy_poll(text: str) -> float:
    top = round(MAX_BUSY_POLL * 1e6)
    if not text.isdigit() or int(text) > top:
        raise argparse.ArgumentTypeError(f"invalid busy poll {text!r} (microseconds, 0-{top})")
    return float(text)


def _network(text: str) -> str:
    try:
        return str(acl.parse_network(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _subject(text: str) -> str:
    try:
        return acl.parse_subject(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid address {text!r} (expected HOST:PORT)")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jsnap", description="Block storage over NBD with free snapshots.")
    p.add_argument("--version", action="version", version=f"jsnap {__version__}")
    p.add_argument(
        "-p", "--pool", default=os.environ.get("JSNAP_POOL"),
        help="pool directory (default: $JSNAP_POOL)",
    )
    p.set_defaults(opener=OsFile)  # main(opener=...) replaces it; no flag sets it
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    init = sub.add_parser("init", help="create a pool")
    init.add_argument("path", metavar="POOL", help="pool directory to create")
    init.add_argument("--journal-size", type=_size, default=DEFAULT_JOURNAL_SIZE,
                      help=f"journal size (default {format_size(DEFAULT_JOURNAL_SIZE)})")
    init.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE,
                      help=f"copy-on-write unit (default {format_size(DEFAULT_CHUNK_SIZE)})")
    init.add_argument("--durability", choices=DURABILITY_MODES, default="writeback",
                      help="sync: acknowledge writes once durable; writeback (default): "
                           "durable on FLUSH or FUA, like a disk with a write cache")
    init.add_argument("--journal-path", help="journal file (default POOL/journal)")
    init.add_argument("--data-path", help="directory for volume data (default POOL)")
    init.add_argument("--snapshot-path", help="directory for the snapshot store (default POOL)")
    init.add_argument("--pool-size", type=_positive_size,
                      help="most space thin volumes and their snapshots may take in the data "
                           "path (default: the size of its filesystem); grow it later with "
                           "'pool grow'")
    init.set_defaults(func=cmd_init, needs_pool=False)

    vol = sub.add_parser("volume", help="create, list, delete volumes")
    vsub = vol.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=_Parser)
    c = vsub.add_parser("create", help="create a volume")
    c.add_argument("name")
    c.add_argument("--size", type=_size, required=True, help="size, e.g. 10G")
    kind = c.add_mutually_exclusive_group()
    kind.add_argument("--thin", dest="thin", action="store_true", default=True,
                      help="allocate pool extents on first write (default)")
    kind.add_argument("--raw", dest="thin", action="store_false",
                      help="a file of its own in the data path (sparse unless --preallocate)")
    c.add_argument("--preallocate", action="store_true",
                   help="with --raw: allocate the whole file now")
    c.set_defaults(func=cmd_volume_create)
    rs = vsub.add_parser("resize", help="grow a volume (new connections see the new size)")
    rs.add_argument("name")
    rs.add_argument("--size", type=_size, required=True, help="new size, e.g. 20G")
    rs.set_defaults(func=cmd_volume_resize)
    ls = vsub.add_parser("list", help="list volumes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_volume_list)
    d = vsub.add_parser("delete", help="delete a volume and its snapshots")
    d.add_argument("name")
    d.set_defaults(func=cmd_volume_delete)

    snap = sub.add_parser("snapshot", help="create, list, delete, roll back, diff snapshots")
    ssub = snap.add_subparsers(dest="action", metavar="ACTION", required=True,
                               parser_class=_Parser)
    c = ssub.add_parser("create", help="take a snapshot (O(1), no pause)")
    c.add_argument("volume")
    c.add_argument("name")
    c.set_defaults(func=cmd_snapshot_create)
    ls = ssub.add_parser("list", help="list snapshots")
    ls.add_argument("volume", nargs="?")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_snapshot_list)
    d = ssub.add_parser("delete", help="delete a snapshot and reclaim its space")
    d.add_argument("volume")
    d.add_argument("name")
    d.set_defaults(func=cmd_snapshot_delete)
    r = ssub.add_parser("rollback", help="make a volume's content equal to a snapshot's")
    r.add_argument("volume")
    r.add_argument("name")
    r.set_defaults(func=cmd_snapshot_rollback)
    df = ssub.add_parser("diff", help="list the ranges changed since a snapshot (chunk "
                                      "granularity): for incremental backups")
    df.add_argument("volume")
    df.add_argument("since", metavar="FROM", help="the older snapshot")
    df.add_argument("until", metavar="TO", nargs="?",
                    help="the newer snapshot (default: the live volume)")
    df.add_argument("--json", action="store_true")
    df.set_defaults(func=cmd_snapshot_diff)

    fmt_help = "image format (default: qcow2 for a .qcow2 file name, else raw)"
    ex = sub.add_parser("export", help="copy a volume or snapshot to an image file (sparse)")
    ex.add_argument("export", metavar="VOLUME[@SNAPSHOT]")
    ex.add_argument("file", metavar="FILE")
    ex.add_argument("--format", choices=transfer.FORMATS, help=fmt_help)
    ex.set_defaults(func=cmd_export)
    im = sub.add_parser("import", help="copy an image file into a volume")
    im.add_argument("file", metavar="FILE")
    im.add_argument("volume", metavar="VOLUME")
    im.add_argument("--format", choices=transfer.FORMATS,
                    help="image format (default: qcow2 if the file says so, else raw)")
    im.add_argument("--create", action="store_true",
                    help="create VOLUME (thin) with the image's size; without it VOLUME must "
                         "exist and be at least that large")
    im.set_defaults(func=cmd_import)

    srv = sub.add_parser("serve", help="serve every volume (and snapshot, read-only) over NBD")
    srv.add_argument("--listen", action="append", type=_hostport, metavar="HOST:PORT",
                     help="TCP address (repeatable; default 127.0.0.1:10809 unless --socket)")
    srv.add_argument("--socket", action="append", metavar="PATH",
                     help="unix socket path (repeatable)")
    srv.add_argument("--flush-interval", type=_millis, default=25, metavar="MS",
                     help="writeback mode: sync the journal at least every MS milliseconds "
                          "(default 25; 0 = only on FLUSH/FUA/snapshots: faster writes, "
                          "slower snapshot creates under load)")
    srv.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"])
    srv.add_argument("--log-format", default="text", choices=["text", "json"],
                     help="stderr log lines: text (default) or one JSON object per line "
                          "(ts, level, logger, msg and fields)")
    srv.add_argument("--tls-cert", metavar="FILE",
                     help="server certificate (PEM): enables TLS (NBD_OPT_STARTTLS)")
    srv.add_argument("--tls-key", metavar="FILE",
                     help="the certificate's private key (PEM, unencrypted; default: in "
                          "--tls-cert's file)")
    srv.add_argument("--tls-ca", metavar="FILE",
                     help="CA certificate(s) (PEM): clients must present a certificate "
                          "signed by one")
    srv.add_argument("--tls", choices=["require", "allow"],
                     help="with --tls-cert: require TLS before any option (default), or "
                          "allow plain clients too")
    srv.add_argument("--max-connections", type=_positive, default=DEFAULT_MAX_CONNECTIONS,
                     metavar="N", help="refuse (close) connections beyond N, negotiating "
                                       f"ones included (default {DEFAULT_MAX_CONNECTIONS})")
    srv.add_argument("--handshake-timeout", type=_seconds, default=DEFAULT_HANDSHAKE_TIMEOUT,
                     metavar="S", help="close a client that has not finished negotiating "
                                       "(TLS included) within S seconds (default "
                                       f"{DEFAULT_HANDSHAKE_TIMEOUT:g}; 0 = never)")
    srv.add_argument("--max-inflight-requests", type=_positive,
                     default=DEFAULT_MAX_INFLIGHT_REQUESTS, metavar="N",
                     help="per connection: stop reading requests while N await their "
                          f"replies (default {DEFAULT_MAX_INFLIGHT_REQUESTS})")
    srv.add_argument("--max-inflight-bytes", type=_positive_size,
                     default=DEFAULT_MAX_INFLIGHT_BYTES,
                     metavar="SIZE",
                     help="per connection: stop reading requests while SIZE of read data "
                          f"awaits sending (default {format_size(DEFAULT_MAX_INFLIGHT_BYTES)})")
    srv.add_argument("--busy-poll", type=_busy_poll, default=DEFAULT_BUSY_POLL * 1e6,
                     metavar="US",
                     help="a lone client's connection polls its socket up to US "
                          "microseconds for the next request before sleeping: lower "
                          "latency on virtual machines for some CPU (default "
                          f"{DEFAULT_BUSY_POLL * 1e6:.0f}; 0 = off)")
    srv.add_argument("--drop-big-folios", action=argparse.BooleanOptionalAction,
                     default=True,
                     help="when the destager's small writes land in big page-cache folios "
                          "and cost too much CPU, drop those 2 MiB windows from the page "
                          "cache if this server wrote them with large writes and they "
                          "served no reads lately (default on; see docs/operations.md)")
    srv.add_argument("--admin-listen", type=_hostport, metavar="HOST:PORT",
                     help="also serve the admin API (and /metrics) over TCP, plain HTTP; "
                          "needs --admin-token-file")
    srv.add_argument("--admin-token-file", metavar="FILE",
                     help="file holding the bearer token every TCP admin request must send "
                          "(Authorization: Bearer TOKEN)")
    srv.set_defaults(func=cmd_serve)

    acl_p = sub.add_parser("acl", help="limit which clients may use a volume's exports")
    asub = acl_p.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=_Parser)
    a = asub.add_parser("set", help="replace a volume's access rule (covers its snapshots)")
    a.add_argument("volume")
    a.add_argument("--allow-address", action="append", type=_network, default=[],
                   metavar="CIDR", help="TCP clients must come from one of these networks "
                                        "(repeatable; unix-socket clients are always allowed)")
    a.add_argument("--allow-subject", action="append", type=_subject, default=[],
                   metavar="CN", help="TLS clients must present a certificate (verified "
                                      "with serve --tls-ca) with one of these common names "
                                      "(repeatable)")
    a.set_defaults(func=cmd_acl_set)
    ls = asub.add_parser("list", help="list access rules")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_acl_list)
    c = asub.add_parser("clear", help="remove a volume's rule: every client may use it")
    c.add_argument("volume")
    c.set_defaults(func=cmd_acl_clear)

    pool = sub.add_parser("pool", help="grow the pool thin volumes allocate from, or give "
                                       "back its unused space")
    psub = pool.add_subparsers(dest="action", metavar="ACTION", required=True,
                               parser_class=_Parser)
    g = psub.add_parser("grow", help="add capacity: to the last data file, or as a new file")
    g.add_argument("--size", type=_positive_size, required=True, help="capacity to add")
    g.add_argument("--file", metavar="PATH", help="create this new data file for it")
    g.set_defaults(func=cmd_pool_grow)
    rel = psub.add_parser("release", help="give the file system back the space the data "
                                          "files hold unused at their end (e.g. when it is "
                                          "full and destage waits for space)")
    rel.set_defaults(func=cmd_pool_release)

    chk = sub.add_parser("check", help="verify the pool offline: journal, snapshot index, "
                                       "thin maps (one line per problem)")
    chk.add_argument("--repair", action="store_true",
                     help="also fix what is provably safe (rows of deleted volumes) and say "
                          "what was done")
    chk.set_defaults(func=cmd_check)

    st = sub.add_parser("status", help="show the pool's state")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    return p


def cmd_init(args: argparse.Namespace) -> int:
    init_pool(
        args.path,
        journal_size=args.journal_size,
        chunk_size=args.chunk_size,
        durability=args.durability,
        journal_path=args.journal_path,
        data_path=args.data_path,
        snapshot_path=args.snapshot_path,
        pool_size=args.pool_size,
    )
    print(f"created pool {args.path} (journal {format_size(args.journal_size)}, chunk "
          f"{format_size(args.chunk_size)}, durability {args.durability})")
    return 0


def _open(args: argparse.Namespace, *, start_destager: bool = False,
          **kwargs: Any) -> Engine:
    """Open the pool here, its files through the opener main() was given."""
    return Engine.open(args.pool, start_destager=start_destager, opener=args.opener, **kwargs)


def _run(args: argparse.Namespace, local: Callable[[Engine], Any], method: str, path: str,
         body: dict[str, Any] | None = None) -> Any:
    """Run an operation on the live pool through the server's admin API, or, with no server
    running, on the pool opened here (the same ops function either way)."""
    try:
        return admin.call(args.pool, method, path, body)
    except admin.ServerNotRunning:
        pass
    with _open(args) as e:
        return local(e)


def _q(name: str) -> str:
    return quote(name, safe="")


def cmd_volume_create(args: argparse.Namespace) -> int:
    if args.preallocate and args.thin:
        raise JsnapError("--preallocate needs --raw (a thin volume allocates on first write)")
    body = {"name": args.name, "size": args.size, "preallocate": args.preallocate,
            "thin": args.thin}
    v = _run(args, lambda e: ops.volume_create(e, **body), "POST", "/v1/volumes", body)
    print(f"created {'thin' if v['thin'] else 'raw'} volume {v['name']} "
          f"({format_size(v['size'])})")
    return 0


def cmd_volume_resize(args: argparse.Namespace) -> int:
    v = _run(args, lambda e: ops.volume_resize(e, args.name, args.size), "POST",
             f"/v1/volumes/{_q(args.name)}/resize", {"size": args.size})
    print(f"volume {v['name']} is now {format_size(v['size'])}")
    return 0


def cmd_pool_grow(args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file) if args.file else None
    st = _run(args, lambda e: ops.pool_grow(e, args.size, path), "POST", "/v1/pool/grow",
              {"size": args.size, "path": path})
    print(f"pool capacity is now {format_size(st['pool_capacity'])} "
          f"({format_size(st['pool_available'])} available)")
    return 0


def cmd_pool_release(args: argparse.Namespace) -> int:
    st = _run(args, ops.pool_release, "POST", "/v1/pool/release", {})
    print(f"released {format_size(st['released'])} to the file system; the data files hold "
          f"{format_size(st['pool_backed'])}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from jsnap.core.check import check_pool  # noqa: PLC0415 - only this command needs it

    with _open(args) as e:
        problems, repairs = check_pool(e, repair=args.repair)
        print(f"journal: {e.replayed_records} records to destage; {e.journal.replay_end}")
    for line in repairs:
        print(f"repaired: {line}")
    if repairs:  # check again on the repaired catalog, with state rebuilt from it
        with _open(args) as e:
            problems, _ = check_pool(e)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found" if problems else "pool is consistent")
    return 1 if problems else 0


def cmd_volume_list(args: argparse.Namespace) -> int:
    rows = _run(args, ops.volume_list, "GET", "/v1/volumes")
    if args.json:
        print(json.dumps(rows))
    else:
        _table(["NAME", "TYPE", "SIZE", "ALLOCATED", "SNAPSHOTS"],
               [[r["name"], "thin" if r["thin"] else "raw", format_size(int(r["size"])),
                 format_size(int(r["allocated"])), r["snapshots"]] for r in rows])
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    _run(args, lambda e: ops.volume_delete(e, args.name), "DELETE",
         f"/v1/volumes/{_q(args.name)}")
    print(f"deleted volume {args.name}")
    return 0


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    s = _run(args, lambda e: ops.snapshot_create(e, args.volume, args.name), "POST",
             f"/v1/volumes/{_q(args.volume)}/snapshots", {"name": args.name})
    print(f"created snapshot {s['volume']}@{s['name']}")
    return 0


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    path = "/v1/snapshots" + (f"?volume={_q(args.volume)}" if args.volume else "")
    rows = _run(args, lambda e: ops.snapshot_list(e, args.volume), "GET", path)
    if args.json:
        print(json.dumps(rows))
    else:
        _table(["VOLUME", "SNAPSHOT", "CREATED"],
               [[r["volume"], r["name"],
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(r["created"])))]
                for r in rows])
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    _run(args, lambda e: ops.snapshot_delete(e, args.volume, args.name), "DELETE",
         f"/v1/volumes/{_q(args.volume)}/snapshots/{_q(args.name)}")
    print(f"deleted snapshot {args.volume}@{args.name}")
    return 0


def cmd_snapshot_rollback(args: argparse.Namespace) -> int:
    r = _run(args, lambda e: ops.snapshot_rollback(e, args.volume, args.name), "POST",
             f"/v1/volumes/{_q(args.volume)}/snapshots/{_q(args.name)}/rollback")
    print(f"rolled back {args.volume} to {args.name} ({r['chunks']} chunks rewritten)")
    return 0


def cmd_snapshot_diff(args: argparse.Namespace) -> int:
    path = f"/v1/volumes/{_q(args.volume)}/snapshots/{_q(args.since)}/diff" + (
        f"?to={_q(args.until)}" if args.until else "")
    d = _run(args, lambda e: ops.snapshot_diff(e, args.volume, args.since, args.until),
             "GET", path)
    if args.json:
        print(json.dumps(d))
        return 0
    _table(["OFFSET", "LENGTH"], [[x["offset"], x["length"]] for x in d["extents"]])
    print(f"{len(d['extents'])} extent(s), {format_size(d['changed'])} of "
          f"{format_size(d['size'])} changed from {args.volume}@{args.since} to "
          f"{args.volume}{'@' + args.until if args.until else ' (live)'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(transfer.export_image(args.pool, args.export, args.file, args.format,
                                opener=args.opener))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    print(transfer.import_image(args.pool, args.file, args.volume, args.format, args.create,
                                opener=args.opener))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _run(args, ops.status, "GET", "/v1/status")
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
    print()
    _table(["VOLUME", "TYPE", "SIZE", "ALLOCATED", "SNAPSHOTS"],
           [[v["name"], "thin" if v["thin"] else "raw", format_size(v["size"]),
             _human(v["allocated"]), v["snapshots"]] for v in st["volumes"]])
    if st["snapshots"]:
        print()
        _table(["SNAPSHOT", "AGE", "HELD"],
               [[f"{s['volume']}@{s['name']}", _duration(s["age"]), _human(s["held_bytes"])]
                for s in st["snapshots"]])
    print()
    if st["clients"]:
        _table(["CLIENT", "EXPORT", "CONNECTED", "REQUESTS"],
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


def cmd_acl_set(args: argparse.Namespace) -> int:
    body = {"addresses": args.allow_address, "subjects": args.allow_subject}
    r = _run(args, lambda e: ops.acl_set(e, args.volume, **body), "PUT",
             f"/v1/acl/{_q(args.volume)}", body)
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
    rows = _run(args, ops.acl_list, "GET", "/v1/acl")
    if args.json:
        print(json.dumps(rows))
    else:
        _table(["VOLUME", "ADDRESSES", "SUBJECTS"],
               [[r["volume"], ",".join(r["addresses"]) or "any",
                 ",".join(r["subjects"]) or "any"] for r in rows])
    return 0


def cmd_acl_clear(args: argparse.Namespace) -> int:
    _run(args, lambda e: ops.acl_clear(e, args.volume), "DELETE", f"/v1/acl/{_q(args.volume)}")
    print(f"access to {args.volume}: every client")
    return 0


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The serve command's TLS context (None without --tls-cert); JsnapError if unusable."""
    if args.tls_cert is None:
        for flag, value in (("--tls-key", args.tls_key), ("--tls-ca", args.tls_ca),
                            ("--tls", args.tls)):
            if value is not None:
                raise JsnapError(f"{flag} needs --tls-cert")
        return None
    return server_context(args.tls_cert, args.tls_key, args.tls_ca)


def cmd_serve(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, args.log_format)
    tcp = args.listen or ([] if args.socket else [("127.0.0.1", 10809)])
    tls_context = _tls_context(args)  # before opening the pool: a bad file fails fast
    token = _admin_token(args)  # the same
    full_gc = gcpolicy.FullCollections(lambda: len(e.pending))
    with gcpolicy.suspended():  # replay: one long-lived Record per journal record
        e = _open(args, start_destager=True, flush_interval=args.flush_interval / 1000,
                  drop_big_folios=args.drop_big_folios)
        # Frozen before the collector is back on: else its first young collection would
        # visit every object the replay left in the youngest generation, as a full one
        # does (0.11 s after replaying a full 1 GiB journal).
        full_gc.install()
    try:
        try:
            srv = NbdServer(e, tcp=tcp, unix=args.socket or [],
                            max_connections=args.max_connections,
                            tls_context=tls_context, tls_mode=args.tls or "require",
                            handshake_timeout=args.handshake_timeout,
                            max_inflight_requests=args.max_inflight_requests,
                            max_inflight_bytes=args.max_inflight_bytes,
                            busy_poll=args.busy_poll / 1e6)
            adm = admin.AdminServer(e, admin.socket_path(args.pool), nbd=transfer.listen_info(
                srv, "off" if tls_context is None else args.tls or "require"))
            adm.live = srv  # status: connected clients; /metrics: request counters
            adm_tcp = None
            if token is not None:
                adm_tcp = admin.AdminTcpServer(e, args.admin_listen, token, nbd=adm.nbd)
                adm_tcp.live = srv
        except OSError as err:
            raise JsnapError(f"cannot listen: {err.strerror or err}") from None
    except BaseException:
        e.close()
        raise
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    srv.start()
    adm.start()
    if adm_tcp is not None:
        adm_tcp.start()
    tls_note = "" if tls_context is None else \
        f" (TLS {'optional' if args.tls == 'allow' else 'required'})"
    admin_note = "" if adm_tcp is None else f"; admin API on {adm_tcp.url} (token required)"
    ready = (f"jsnap: serving {len(e.volumes)} volume(s) of {e.path} on "
             f"{', '.join(srv.addresses)}{tls_note}{admin_note}")
    logs.announce(ready, args.log_format, event="serving")
    # Wake up now and then: a signal the kernel hands to another thread only sets a flag,
    # and the main thread runs the handler once it executes Python code again (an untimed
    # wait here was seen to sleep through SIGTERM).
    while not stop.wait(0.5):
        full_gc.tick()
    logging.getLogger("jsnap").info("stopping: finishing in-flight requests")
    srv.stop()
    adm.stop()
    if adm_tcp is not None:
        adm_tcp.stop()
    e.close()
    logging.getLogger("jsnap").info("stopped; journal is durable")
    return 0


def _admin_token(args: argparse.Namespace) -> str | None:
    """The TCP admin listener's token (None: no TCP admin listener)."""
    if args.admin_listen is None and args.admin_token_file is None:
        return None
    if args.admin_listen is None or args.admin_token_file is None:
        raise JsnapError("--admin-listen and --admin-token-file go together (the TCP admin "
                         "API always requires a token)")
    return admin.read_token(args.admin_token_file)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None, *, opener: FileOpener = OsFile) -> int:
    """Run one `jsnap` command (`argv`: its arguments, default sys.argv[1:]). `opener` opens
    the pool's files wherever a command opens the pool itself (storage.OsFile; a tool that
    wraps the files, e.g. tools/faulty_jsnap.py injecting errors, passes its own)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.opener = opener
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "needs_pool", True) and not args.pool:
        print("jsnap: error: no pool given: use -p POOL or set JSNAP_POOL", file=sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except JsnapError as e:
        print(f"jsnap: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `jsnap ... | head`: the reader is gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"jsnap: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as e:  # e.g. a read-only pool.db or pool directory
        print(f"jsnap: error: pool catalog {os.path.join(args.pool or '', 'pool.db')}: {e}",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
