"""The `jsnap` command line. Every error is one readable line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import quote

from jsnap import __version__, admin, ops
from jsnap.engine import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_JOURNAL_SIZE,
    DURABILITY_MODES,
    Engine,
    init_pool,
)
from jsnap.errors import JsnapError
from jsnap.server import NbdServer
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
    init.set_defaults(func=cmd_init, needs_pool=False)

    vol = sub.add_parser("volume", help="create, list, delete volumes")
    vsub = vol.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=_Parser)
    c = vsub.add_parser("create", help="create a volume")
    c.add_argument("name")
    c.add_argument("--size", type=_size, required=True, help="size, e.g. 10G")
    c.add_argument("--preallocate", action="store_true",
                   help="allocate the whole production file now instead of sparsely")
    c.set_defaults(func=cmd_volume_create)
    ls = vsub.add_parser("list", help="list volumes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_volume_list)
    d = vsub.add_parser("delete", help="delete a volume and its snapshots")
    d.add_argument("name")
    d.set_defaults(func=cmd_volume_delete)

    snap = sub.add_parser("snapshot", help="create, list, delete, roll back snapshots")
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
    srv.set_defaults(func=cmd_serve)

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
    )
    print(f"created pool {args.path} (journal {format_size(args.journal_size)}, chunk "
          f"{format_size(args.chunk_size)}, durability {args.durability})")
    return 0


def _run(args: argparse.Namespace, local: Callable[[Engine], Any], method: str, path: str,
         body: dict[str, Any] | None = None) -> Any:
    """Run an operation on the live pool through the server's admin API, or, with no server
    running, on the pool opened here (the same ops function either way)."""
    try:
        return admin.call(args.pool, method, path, body)
    except admin.ServerNotRunning:
        pass
    with Engine.open(args.pool, start_destager=False) as e:
        return local(e)


def _q(name: str) -> str:
    return quote(name, safe="")


def cmd_volume_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "size": args.size, "preallocate": args.preallocate}
    v = _run(args, lambda e: ops.volume_create(e, **body), "POST", "/v1/volumes", body)
    print(f"created volume {v['name']} ({format_size(v['size'])})")
    return 0


def cmd_volume_list(args: argparse.Namespace) -> int:
    rows = _run(args, ops.volume_list, "GET", "/v1/volumes")
    if args.json:
        print(json.dumps(rows))
    else:
        _table(["NAME", "SIZE", "SNAPSHOTS"],
               [[r["name"], format_size(int(r["size"])), r["snapshots"]] for r in rows])
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


def cmd_status(args: argparse.Namespace) -> int:
    st = _run(args, ops.status, "GET", "/v1/status")
    if args.json:
        print(json.dumps(st))
        return 0
    print(f"pool        {st['pool']}")
    print(f"state       {st['state']}")
    print(f"durability  {st['durability']}    chunk {format_size(st['chunk_size'])}")
    print(f"journal     {format_size(st['journal_size'])}, {st['journal_fill'] * 100:.1f}% full, "
          f"{st['journal_records']} records not destaged")
    print(f"snapshots   {st['store_slots']} store slots, {st['store_free_slots']} free")
    _table(["VOLUME", "SIZE", "SNAPSHOTS"],
           [[v["name"], format_size(v["size"]), v["snapshots"]] for v in st["volumes"]])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tcp = args.listen or ([] if args.socket else [("127.0.0.1", 10809)])
    e = Engine.open(args.pool, start_destager=True, flush_interval=args.flush_interval / 1000)
    try:
        try:
            srv = NbdServer(e, tcp=tcp, unix=args.socket or [])
            adm = admin.AdminServer(e, admin.socket_path(args.pool))
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
    print(f"jsnap: serving {len(e.volumes)} volume(s) of {e.path} on "
          f"{', '.join(srv.addresses)}", file=sys.stderr, flush=True)
    stop.wait()
    logging.getLogger("jsnap").info("stopping: finishing in-flight requests")
    srv.stop()
    adm.stop()
    e.close()
    logging.getLogger("jsnap").info("stopped; journal is durable")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"jsnap: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
