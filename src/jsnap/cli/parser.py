"""The `jsnap` argument parser: every command, option and help text in one place, and the
argument types that turn a bad value into one readable line. Each command's function lives in
its group's module (volumes, snapshots, serve, acl, status); the parser points at it with
`set_defaults(func=...)`, so this module imports those, never the other way."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from jsnap import __version__
from jsnap.cli import transfer
from jsnap.cli.acl import cmd_acl_clear, cmd_acl_list, cmd_acl_set
from jsnap.cli.common import EXIT_USAGE
from jsnap.cli.owners import cmd_owner_create, cmd_owner_delete, cmd_owner_list
from jsnap.cli.serve import cmd_serve
from jsnap.cli.snapshots import (
    cmd_snapshot_create,
    cmd_snapshot_delete,
    cmd_snapshot_diff,
    cmd_snapshot_list,
    cmd_snapshot_rollback,
)
from jsnap.cli.status import cmd_check, cmd_status
from jsnap.cli.volumes import (
    cmd_export,
    cmd_import,
    cmd_init,
    cmd_pool_grow,
    cmd_pool_release,
    cmd_volume_create,
    cmd_volume_delete,
    cmd_volume_list,
    cmd_volume_resize,
)
from jsnap.core import access as acl
from jsnap.core.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_JOURNAL_SIZE,
    DURABILITY_MODES,
    check_owner_name,
)
from jsnap.errors import InvalidRequest
from jsnap.stores.device import open_store
from jsnap.transport.server import (
    DEFAULT_BUSY_POLL,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_INFLIGHT_REQUESTS,
    MAX_BUSY_POLL,
)
from jsnap.units import format_size, parse_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the usage block: "a bad CLI argument gets one readable line".
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _owner(text: str) -> str:
    if text == "":  # the default owner (argparse runs the type on the default too)
        return text
    try:
        check_owner_name(text)
    except InvalidRequest as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


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
    p.add_argument(
        "--owner", type=_owner, default=os.environ.get("JSNAP_OWNER", ""), metavar="NAME",
        help="act on the volumes of this owner of the pool (default: $JSNAP_OWNER, or the "
             "pool's own); see 'owner create'",
    )
    p.set_defaults(opener=open_store)  # main(opener=...) replaces it; no flag sets it
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    init = sub.add_parser("init", help="create a pool")
    init.add_argument("path", metavar="POOL", help="pool directory to create")
    init.add_argument("--journal-size", type=_size,
                      help=f"journal size (default {format_size(DEFAULT_JOURNAL_SIZE)}; on a "
                           "block device, the whole device)")
    init.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE,
                      help=f"copy-on-write unit (default {format_size(DEFAULT_CHUNK_SIZE)})")
    init.add_argument("--durability", choices=DURABILITY_MODES, default="writeback",
                      help="sync: acknowledge writes once durable; writeback (default): "
                           "durable on FLUSH or FUA, like a disk with a write cache")
    init.add_argument("--journal-path",
                      help="journal file or block device (default POOL/journal); a device "
                           "holding a file system or another pool's journal is refused")
    init.add_argument("--data-path", help="directory for volume data (default POOL), or a "
                                           "block device for the thin pool's data")
    init.add_argument("--snapshot-path",
                      help="directory for the raw volumes' snapshot store (default POOL), "
                           "or a block device for it")
    init.add_argument("--pool-size", type=_positive_size,
                      help="most space thin volumes and their snapshots may take in the data "
                           "path (default: the size of its filesystem); grow it later with "
                           "'pool grow'")
    init.add_argument("--force", action="store_true",
                      help="overwrite a journal, data or snapshot path that holds another "
                           "pool's journal, a file system or a partition table")
    init.set_defaults(func=cmd_init, needs_pool=False)

    vol = sub.add_parser("volume", help="create, list, delete volumes")
    vsub = vol.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=_Parser)
    c = vsub.add_parser("create", help="create a volume")
    c.add_argument("name")
    c.add_argument("--size", type=_size,
                   help="size, e.g. 10G (required unless --device or --nbd)")
    kind = c.add_mutually_exclusive_group()
    kind.add_argument("--thin", dest="thin", action="store_true", default=True,
                      help="allocate pool extents on first write (default)")
    kind.add_argument("--raw", dest="thin", action="store_false",
                      help="a file of its own in the data path (sparse unless --preallocate)")
    c.add_argument("--preallocate", action="store_true",
                   help="with --raw: allocate the whole file now")
    kind.add_argument("--device", metavar="DEV",
                      help="production is this block device (an existing LUN or disk), with "
                           "the data it holds: jsnap journals writes in front of it and "
                           "keeps snapshots; --size defaults to the device's")
    kind.add_argument("--nbd", metavar="URI",
                      help="production is another server's NBD export (nbd://HOST[:PORT]/"
                           "EXPORT or nbd+unix:///EXPORT?socket=PATH), with its data, as "
                           "for --device")
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
    g.add_argument("--size", type=_positive_size,
                   help="capacity to add (required, except for a block device: all of it)")
    g.add_argument("--file", metavar="PATH",
                   help="create this new data file for it, or use this block device")
    g.set_defaults(func=cmd_pool_grow)
    rel = psub.add_parser("release", help="give the file system back the space the data "
                                          "files hold unused at their end (e.g. when it is "
                                          "full and destage waits for space)")
    rel.set_defaults(func=cmd_pool_release)

    own = sub.add_parser("owner", help="split the pool's volumes among processes: owners, "
                                       "each with its own journal and server")
    osub = own.add_subparsers(dest="action", metavar="ACTION", required=True,
                              parser_class=_Parser)
    c = osub.add_parser("create", help="add an owner (its journal, data file, snapshot "
                                       "store); serve it with --owner NAME serve")
    c.add_argument("name", type=_owner)
    c.add_argument("--journal-path",
                   help="journal file or block device (default POOL/journal.NAME)")
    c.add_argument("--journal-size", type=_size,
                   help=f"journal size (default {format_size(DEFAULT_JOURNAL_SIZE)}; on a "
                        "block device, the whole device)")
    c.add_argument("--pool-size", type=_positive_size,
                   help="most space its thin volumes may take (default: the size of the "
                        "data path's filesystem)")
    c.add_argument("--force", action="store_true",
                   help="overwrite a journal path that holds a journal or a file system")
    c.set_defaults(func=cmd_owner_create)
    ls = osub.add_parser("list", help="list owners, their volumes and serving processes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_owner_list)
    d = osub.add_parser("delete", help="delete an owner that holds no volume")
    d.add_argument("name", type=_owner)
    d.set_defaults(func=cmd_owner_delete)

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
