"""`jsnap serve`: the serving process. Opens the pool, starts the NBD server and the admin API
(unix socket, and TCP with a token), then runs until SIGTERM/SIGINT; its TLS context and admin
token are checked before the pool opens, so a bad file fails fast."""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import threading

from jsnap.admin import api as admin
from jsnap.cli import gcpolicy, logs, transfer
from jsnap.cli.common import open_pool
from jsnap.errors import JsnapError
from jsnap.transport.server import NbdServer
from jsnap.transport.tls import server_context


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
    full_gc = gcpolicy.FullCollections(lambda: len(e.backlog.pending))
    with gcpolicy.suspended():  # replay: one long-lived Record per journal record
        e = open_pool(args, start_destager=True, flush_interval=args.flush_interval / 1000,
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
            adm = admin.AdminServer(
                e, admin.socket_path(args.pool, args.owner), nbd=transfer.listen_info(
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
    whose = f" (owner {e.owner})" if e.owner else ""
    ready = (f"jsnap: serving {len(e.volumes)} volume(s) of {e.path}{whose} on "
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
