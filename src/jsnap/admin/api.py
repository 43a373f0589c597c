"""The admin API: HTTP + JSON on a unix socket in the pool directory (POOL/admin.sock).

While `jsnap serve` holds a pool, every CLI command reaches the live pool through this socket
(the pool lock keeps anyone else from opening it). The routes, all JSON in and out:

    GET    /v1/status
    GET    /v1/volumes
    POST   /v1/volumes                        {"name", "size", "thin"? (true), "preallocate"?}
    DELETE /v1/volumes/NAME
    POST   /v1/volumes/NAME/resize                       {"size"}  (grow only)
    POST   /v1/pool/grow                                 {"size", "path"?}
    POST   /v1/pool/release                  truncate the data files' unused tails
    GET    /v1/snapshots[?volume=NAME]
    POST   /v1/volumes/NAME/snapshots                    {"name"}
    DELETE /v1/volumes/NAME/snapshots/SNAP
    POST   /v1/volumes/NAME/snapshots/SNAP/rollback
    GET    /v1/volumes/NAME/snapshots/SNAP/diff[?to=SNAP2]   changed extents since SNAP
    GET    /v1/volumes/NAME/extents?offset=O&length=L[&snapshot=SNAP]   allocation map
    GET    /v1/nbd                           the NBD listeners: {"unix", "tcp", "tls"}
    GET    /v1/acl
    PUT    /v1/acl/NAME                                  {"addresses"?, "subjects"?}
    DELETE /v1/acl/NAME

    GET    /metrics          Prometheus text exposition (jsnap.admin.metrics), not JSON

Errors: {"error": "one readable line"} with 400 (invalid), 404 (not found), 409 (exists),
507 (no space), 503 (pool failed or closed), 500 (anything else), 401 (TCP listener only:
no or a wrong bearer token).

Listeners: the unix socket (mode 0600: filesystem permissions are its access control), and
optionally TCP (`serve --admin-listen HOST:PORT --admin-token-file FILE`), where every
request, /metrics included, must carry `Authorization: Bearer TOKEN`. TCP is plain HTTP:
keep it on loopback or a trusted network, or put a TLS proxy in front. docs/api.md is the
full reference.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from jsnap import errors
from jsnap.admin import metrics, ops
from jsnap.core.engine import Engine
from jsnap.core.layout import owned_name
from jsnap.stores.catalog import DEFAULT_OWNER

log = logging.getLogger("jsnap.admin")

SOCKET_NAME = "admin.sock"

_STATUS = [
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.InvalidRequest, 400),
    (errors.NoSpace, 507),
    (errors.ReadOnly, 403),
    (errors.PoolError, 503),
]
_FROM_STATUS = {
    404: errors.NotFound,
    409: errors.AlreadyExists,
    400: errors.InvalidRequest,
    507: errors.NoSpace,
    403: errors.ReadOnly,
    503: errors.PoolError,
}


def socket_path(pool: str, owner: str = DEFAULT_OWNER) -> str:
    """The admin socket of the process serving `owner`'s volumes (POOL/admin.OWNER.sock)."""
    return os.path.join(pool, owned_name(SOCKET_NAME, owner))


def route(engine: Engine, method: str, target: str, body: dict[str, Any],
          nbd: dict[str, Any] | None = None) -> Any:
    """Dispatch one request to an ops function; raise JsnapError for a bad request.
    `nbd`: the serving process's NBD listeners, for clients that move data (export)."""
    url = urlsplit(target)
    parts = [unquote(p) for p in url.path.strip("/").split("/")]
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    if parts[:1] != ["v1"]:
        raise errors.NotFound(f"no such API path {url.path!r}")
    p = parts[1:]
    try:
        if method == "GET" and p == ["status"]:
            return ops.status(engine)
        if p[:1] == ["volumes"]:
            if method == "GET" and len(p) == 1:
                return ops.volume_list(engine)
            if method == "POST" and len(p) == 1:
                return ops.volume_create(engine, body["name"], body.get("size"),
                                         body.get("preallocate", False), body.get("thin", True),
                                         body.get("device"))
            if method == "DELETE" and len(p) == 2:
                return ops.volume_delete(engine, p[1])
            if method == "POST" and len(p) == 3 and p[2] == "resize":
                return ops.volume_resize(engine, p[1], body["size"])
            if len(p) >= 3 and p[2] == "snapshots":
                if method == "POST" and len(p) == 3:
                    return ops.snapshot_create(engine, p[1], body["name"])
                if method == "DELETE" and len(p) == 4:
                    return ops.snapshot_delete(engine, p[1], p[3])
                if method == "POST" and len(p) == 5 and p[4] == "rollback":
                    return ops.snapshot_rollback(engine, p[1], p[3])
                if method == "GET" and len(p) == 5 and p[4] == "diff":
                    return ops.snapshot_diff(engine, p[1], p[3], query.get("to"))
            if method == "GET" and len(p) == 3 and p[2] == "extents":
                return ops.volume_extents(engine, p[1], int(query["offset"]),
                                          int(query["length"]), query.get("snapshot"))
        if method == "GET" and p == ["nbd"]:
            return nbd if nbd is not None else {"unix": [], "tcp": [], "tls": "off"}
        if method == "POST" and p == ["pool", "grow"]:
            return ops.pool_grow(engine, body.get("size"), body.get("path"))
        if method == "POST" and p == ["pool", "release"]:
            return ops.pool_release(engine)
        if method == "GET" and p == ["snapshots"]:
            return ops.snapshot_list(engine, query.get("volume"))
        if p[:1] == ["acl"]:
            if method == "GET" and len(p) == 1:
                return ops.acl_list(engine)
            if method == "PUT" and len(p) == 2:
                return ops.acl_set(engine, p[1], body.get("addresses"), body.get("subjects"))
            if method == "DELETE" and len(p) == 2:
                return ops.acl_clear(engine, p[1])
    except KeyError as e:
        raise errors.InvalidRequest(f"missing field {e.args[0]!r} in request body") from None
    raise errors.NotFound(f"no such API route {method} {url.path}")


class _Handler(BaseHTTPRequestHandler):
    server: AdminServer | AdminTcpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("admin: " + format, *args)

    def _authorized(self) -> bool:
        """TCP listener: the bearer token must match (constant-time); else 401."""
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization") or ""
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        log.warning("admin: refused %s %s from %s: %s bearer token", self.command,
                    urlsplit(self.path).path, self.client_address[0],
                    "wrong" if given else "no")
        self.close_connection = True  # the body, if any, was not read
        self._reply(401, {"error": "missing or wrong bearer token (Authorization: Bearer "
                                   "TOKEN, see serve --admin-token-file)"},
                    {"WWW-Authenticate": 'Bearer realm="jsnap"', "Connection": "close"})
        return False

    def _handle(self) -> None:
        if not self._authorized():
            return
        path = urlsplit(self.path).path
        if path == "/metrics" and self.command == "GET":
            try:
                text = metrics.render(self.server.engine, self.server.live)
            except Exception as e:
                log.exception("metrics scrape failed")
                self._reply(500, {"error": f"internal error: {e}"})
                return
            self._send(200, text.encode(), metrics.CONTENT_TYPE)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise errors.InvalidRequest("request body must be a JSON object")
            try:
                result = route(self.server.engine, self.command, self.path, body,
                               self.server.nbd)
            finally:  # one thread per request: don't leave its SQLite connection behind
                self.server.engine.release_thread()
            if path.rstrip("/") == "/v1/status" and isinstance(result, dict):
                live = self.server.live  # what only the serving process knows
                result["serving"] = live is not None
                result["clients"] = live.clients_info() if live is not None else []
            self._reply(200, result)
        except errors.JsnapError as e:
            code = next((c for cls, c in _STATUS if isinstance(e, cls)), 500)
            self._reply(code, {"error": str(e)})
        except (ValueError, TypeError) as e:
            self._reply(400, {"error": f"bad request: {e}"})
        except Exception as e:  # a bug must not kill the server: report it, log it
            log.exception("admin request failed")
            self._reply(500, {"error": f"internal error: {e}"})

    def _reply(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, code: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = _handle


class _Listener:
    """What both admin listeners share: the engine, where NBD listens, a serving thread."""

    daemon_threads = True
    token: str | None = None  # None: no token asked (the unix socket: file permissions)
    live: Any = None  # the serving process's NbdServer (clients, request metrics), if any
    engine: Engine
    nbd: dict[str, Any] | None  # GET /v1/nbd: where the NBD server listens (jsnap.cli.transfer)
    thread: threading.Thread

    def _serve_in(self, name: str) -> None:
        self.thread = threading.Thread(target=self.serve_forever,  # type: ignore[attr-defined]
                                       name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()  # type: ignore[attr-defined]
        self.server_close()  # type: ignore[attr-defined]


class AdminServer(_Listener, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def __init__(self, engine: Engine, path: str, nbd: dict[str, Any] | None = None) -> None:
        self.engine, self.nbd = engine, nbd
        try:
            os.unlink(path)  # a stale socket of a crashed server; we hold the pool lock
        except FileNotFoundError:
            pass
        super().__init__(path, _Handler)
        os.chmod(path, 0o600)
        self._serve_in("jsnap-admin")

    def stop(self) -> None:
        super().stop()
        try:
            os.unlink(self.server_address)  # type: ignore[arg-type]
        except OSError:
            pass


class AdminTcpServer(_Listener, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The same API on TCP (`serve --admin-listen`): every request needs the bearer token."""

    allow_reuse_address = True

    def __init__(self, engine: Engine, address: tuple[str, int], token: str,
                 nbd: dict[str, Any] | None = None) -> None:
        if not token:
            raise ValueError("the admin token is empty")
        self.engine, self.nbd = engine, nbd
        self.token = token
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._serve_in("jsnap-admin-tcp")


def read_token(path: str) -> str:
    """The admin token from `path` (surrounding whitespace stripped); JsnapError if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise errors.JsnapError(f"cannot read admin token file {path}: "
                                f"{getattr(e, 'strerror', None) or e}") from None
    if not token or any(c.isspace() for c in token):
        raise errors.JsnapError(f"admin token file {path} must hold one token (no spaces)")
    if mode & 0o077:
        log.warning("admin token file %s is readable by group or others (chmod 600 it)", path)
    return token


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class ServerNotRunning(Exception):
    pass


def call(pool: str, method: str, path: str, body: dict[str, Any] | None = None,
         timeout: float = 600.0, owner: str = DEFAULT_OWNER) -> Any:
    """Call the admin API of the server holding `owner`'s volumes of `pool`;
    ServerNotRunning if there is none."""
    sock = socket_path(pool, owner)
    if not os.path.exists(sock):
        raise ServerNotRunning(pool)
    conn = _UnixHTTPConnection(sock, timeout)
    try:
        try:
            conn.connect()
        except (ConnectionRefusedError, FileNotFoundError):
            raise ServerNotRunning(pool) from None
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = json.loads(resp.read() or b"null")
    finally:
        conn.close()
    if resp.status != 200:
        msg = payload.get("error") if isinstance(payload, dict) else str(payload)
        raise _FROM_STATUS.get(resp.status, errors.JsnapError)(msg)
    return payload
