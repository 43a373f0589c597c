"""`jsnap export` / `jsnap import`: copy a volume or snapshot to an image file and back.

Model
-----
A transfer copies between an image file and an *endpoint*, the volume (or, for export, a
snapshot) inside the pool. How the pool is reached is decided once, by `open_pool`:

* No server holds the pool: it is opened here (`Engine.open(start_destager=True)`, so a
  large import keeps the journal draining) and the endpoint calls the engine directly.
* `jsnap serve` holds it (its admin socket answers): data goes over NBD (`jsnap.stores.nbd_client`)
  to the address the server announces on `GET /v1/nbd` -- a unix socket when it has one
  (always admitted by access rules), else its TCP listener; allocation maps and volume
  creation go through the admin API, to the same `ops` functions the local case calls.
  A server requiring TLS on every listener cannot be used (the client speaks no TLS): the
  error says so.

Raw images are copied natively, sparse both ways, in BLOCK-sized reads:

* export walks the allocation map (`cbt.allocation`: the engine's holes; for a snapshot,
  the live holes outside the chunks changed since it), skips ranges that read as zeroes,
  reads the rest, and writes only the PIECEs that are not all zero; the file is then cut to
  the volume's size, so every skipped range is a hole (`st_blocks` stays small).
* import skips the file's holes (SEEK_DATA/SEEK_HOLE) and zero PIECEs. On a volume made by
  `--create` (thin, all zeroes) they are simply not written; on an existing volume each
  zero run is one WRITE_ZEROES, which unmaps it. The volume's bytes past the image's end
  are left as they were.

qcow2 goes through `qemu-img convert` with the endpoint as an NBD source or target: the
server's listener, or, when the pool is opened here, a private `NbdServer` on a unix socket
in a fresh 0700 directory, alive for the conversion only.

Export of a live volume that clients are writing is not a point-in-time image: export a
snapshot for that. Progress goes to stderr only when it is a terminal (`jsnap.cli.progress`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import quote

from jsnap.admin import api as admin
from jsnap.admin import ops
from jsnap.cli.progress import Progress, human
from jsnap.core import cbt
from jsnap.core.engine import SECTOR, Engine
from jsnap.core.volumes import Snapshot, Volume
from jsnap.errors import InvalidRequest, JsnapError, NotFound
from jsnap.stores.catalog import DEFAULT_OWNER
from jsnap.stores.device import open_store
from jsnap.stores.files import FileOpener
from jsnap.stores.nbd_client import NbdClient, NbdError, NbdProtocolError
from jsnap.transport.server import NbdServer
from jsnap.units import KiB, MiB, align_up, format_size

BLOCK = 4 * MiB  # read/write unit: large enough that per-call costs vanish
PIECE = 64 * KiB  # zero detection and sparse-output granularity
_ZERO = bytes(PIECE)
FORMATS = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _q(name: str) -> str:
    return quote(name, safe="")


def split_export(spec: str) -> tuple[str, str | None]:
    """`VOL` or `VOL@SNAP`."""
    vol, at, snap = spec.partition("@")
    if not vol or (at and not snap):
        raise InvalidRequest(f"invalid export {spec!r}: use VOLUME or VOLUME@SNAPSHOT")
    return vol, snap if at else None


# -- endpoints ----------------------------------------------------------------------------------


class Endpoint(Protocol):
    def allocation(self, offset: int, length: int) -> list[tuple[int, int]]: ...
    def readinto(self, offset: int, view: memoryview) -> None: ...
    def write(self, offset: int, data: memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...


class LocalEndpoint:
    def __init__(self, e: Engine, vol: Volume, snap: Snapshot | None) -> None:
        self.e, self.vol, self.snap = e, vol, snap

    def allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        return cbt.allocation(self.e, self.vol, self.snap, offset, length)

    def readinto(self, offset: int, view: memoryview) -> None:
        if self.snap is None:
            self.e.readinto(self.vol, offset, view)
        else:
            view[:] = self.e.read_snapshot(self.snap, offset, len(view))

    def write(self, offset: int, data: memoryview) -> None:
        self.e.write(self.vol, offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.e.write_zeroes(self.vol, offset, length)

    def flush(self) -> None:
        self.e.flush()


class RemoteEndpoint:
    """The export over NBD; allocation maps from the admin API (the client negotiates no
    metadata contexts)."""

    def __init__(self, pool: Pool, address: str | tuple[str, int], vol: str,
                 snap: str | None) -> None:
        self.pool, self.vol, self.snap = pool, vol, snap
        export = vol if snap is None else f"{vol}@{snap}"
        try:
            self.client = NbdClient(address, export)
        except NbdError as err:  # GO refused: access rule, or the export vanished
            raise JsnapError(f"the server refused NBD export {export!r}: {err}") from None
        except OSError as err:
            raise JsnapError(f"cannot reach the server's NBD listener {address}: "
                             f"{err.strerror or err}") from None

    def allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        path = (f"/v1/volumes/{_q(self.vol)}/extents?offset={offset}&length={length}"
                + (f"&snapshot={_q(self.snap)}" if self.snap else ""))
        return [(int(n), int(f)) for n, f in self.pool.admin("GET", path)["extents"]]

    def readinto(self, offset: int, view: memoryview) -> None:
        view[:] = self.client.pread(len(view), offset)

    def write(self, offset: int, data: memoryview) -> None:
        self.client.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self.client.zero(length, offset)

    def flush(self) -> None:
        self.client.flush()

    def close(self) -> None:
        self.client.close()


# -- reaching the pool --------------------------------------------------------------------------


class Pool:
    """The pool, opened here (`engine` set) or held by a server (`nbd` = its listeners)."""

    def __init__(self, path: str, owner: str, engine: Engine | None = None,
                 nbd: dict[str, Any] | None = None) -> None:
        self.path, self.owner, self.engine, self.nbd = path, owner, engine, nbd

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return admin.call(self.path, method, path, body, owner=self.owner)

    def call(self, local: Callable[[Engine], Any], method: str, path: str,
             body: dict[str, Any] | None = None) -> Any:
        if self.engine is not None:
            return local(self.engine)
        return self.admin(method, path, body)

    def size(self, vol: str, snap: str | None) -> int:
        """The volume's size, after checking that it (and the snapshot) exist."""
        if snap is not None:
            snaps = self.call(lambda e: ops.snapshot_list(e, vol), "GET",
                              f"/v1/snapshots?volume={_q(vol)}")
            if not any(s["name"] == snap for s in snaps):
                raise NotFound(f"volume {vol!r} has no snapshot named {snap!r}")
        for v in self.call(ops.volume_list, "GET", "/v1/volumes"):
            if v["name"] == vol:
                return int(v["size"])
        raise NotFound(f"no volume named {vol!r}")

    def _address(self) -> str | tuple[str, int]:
        assert self.nbd is not None
        if self.nbd.get("tls") == "require":
            raise JsnapError("the server requires TLS on every NBD listener and export/import "
                             "cannot speak TLS: serve with --tls=allow, or stop the server")
        if self.nbd.get("unix"):
            return str(self.nbd["unix"][0])
        if self.nbd.get("tcp"):
            host, port = self.nbd["tcp"][0]
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            return str(host), int(port)
        raise JsnapError("the server holding the pool has no NBD listener")

    @contextlib.contextmanager
    def endpoint(self, vol: str, snap: str | None) -> Iterator[Endpoint]:
        if self.engine is not None:
            v = self.engine.volume(vol)
            yield LocalEndpoint(self.engine, v, self.engine.snapshot(v, snap) if snap else None)
            return
        ep = RemoteEndpoint(self, self._address(), vol, snap)
        try:
            yield ep
        except (NbdError, NbdProtocolError) as err:
            raise JsnapError(f"NBD request to the server failed: {err}") from None
        finally:
            ep.close()

    @contextlib.contextmanager
    def qemu_server(self) -> Iterator[dict[str, str]]:
        """A QEMU `server` address (SocketAddress) serving every export of the pool."""
        if self.engine is None:
            addr = self._address()
            if isinstance(addr, str):
                yield {"type": "unix", "path": addr}
            else:
                yield {"type": "inet", "host": addr[0], "port": str(addr[1])}
            return
        tmp = tempfile.mkdtemp(prefix="jsnap-transfer-")  # 0700: only we can connect
        sock = os.path.join(tmp, "nbd.sock")
        srv = NbdServer(self.engine, unix=[sock])
        try:
            srv.start()
            yield {"type": "unix", "path": sock}
        finally:
            srv.stop()
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def open_pool(path: str, opener: FileOpener = open_store, owner: str = DEFAULT_OWNER
              ) -> Iterator[Pool]:
    """The owner's part of the pool through its live server, or opened here (its files
    with `opener`)."""
    try:
        nbd = admin.call(path, "GET", "/v1/nbd", owner=owner)
    except admin.ServerNotRunning:
        with Engine.open(path, owner=owner, start_destager=True, opener=opener) as e:
            yield Pool(path, owner, engine=e)
        return
    yield Pool(path, owner, nbd=nbd)


def listen_info(srv: NbdServer, tls: str) -> dict[str, Any]:
    """What `GET /v1/nbd` reports for a serving process: absolute unix socket paths, bound
    TCP (host, port) pairs, and the TLS mode (off, allow, require)."""
    unix: list[str] = []
    tcp: list[list[Any]] = []
    for s in srv.listeners:
        name = s.getsockname()
        if s.family == socket.AF_UNIX:
            unix.append(os.path.abspath(name))
        else:
            tcp.append([name[0], name[1]])
    return {"unix": unix, "tcp": tcp, "tls": tls}


# -- raw data movement ----------------------------------------------------------------------


def _runs(buf: bytearray, base: int, n: int) -> list[tuple[int, int, bool]]:
    """buf[:n] (holding bytes at `base`) as merged (start, end, is_zero) runs; pieces end on
    multiples of PIECE in the image, so holes line up with filesystem blocks."""
    out: list[tuple[int, int, bool]] = []
    i = 0
    while i < n:
        j = min(n, (base + i) // PIECE * PIECE + PIECE - base)
        zero = buf.startswith(_ZERO if j - i == PIECE else _ZERO[: j - i], i)
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], j, zero)
        else:
            out.append((i, j, zero))
        i = j
    return out


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise JsnapError("the image file shrank while it was being read")
        view, offset = view[n:], offset + n


def _file_segments(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_hole) segments of [0, size) from SEEK_DATA/SEEK_HOLE (everything is
    data where the filesystem or device cannot tell)."""
    pos = 0
    while pos < size:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
        except OSError as e:
            if e.errno != errno.ENXIO:
                yield pos, size, False
                return
            data = size  # ENXIO: only a hole is left
        if data > pos:
            yield pos, data, True
            pos = data
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        yield pos, hole, False
        pos = hole


def export_raw(src: Endpoint, fd: int, size: int, prog: Progress) -> int:
    """Copy the endpoint into the (empty) file `fd`, sparse; return the bytes written."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    written = pos = 0
    while pos < size:
        for n, flags in src.allocation(pos, size - pos):
            if not flags & 2:  # NBD_STATE_ZERO clear: may hold data
                for off in range(pos, pos + n, BLOCK):
                    m = min(BLOCK, pos + n - off)
                    src.readinto(off, view[:m])
                    for s, e, zero in _runs(buf, off, m):
                        if not zero:
                            _pwrite_all(fd, view[s:e], off + s)
                            written += e - s
                    prog.update(off + m)
            pos += n
            prog.update(pos)
    os.ftruncate(fd, size)  # the skipped tail becomes a hole too
    os.fsync(fd)
    return written


def import_raw(fd: int, dst: Endpoint, size: int, fresh: bool, prog: Progress) -> int:
    """Copy the image file `fd` into the endpoint; zero runs are skipped on a `fresh` (all
    zero) volume and written as WRITE_ZEROES otherwise. Returns the data bytes written."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    written = 0
    zero_at = zero_end = 0  # pending zero run, coalesced across blocks and file holes

    def zero(start: int, end: int) -> None:
        nonlocal zero_at, zero_end
        if start != zero_end:
            flush_zero()
            zero_at = start
        zero_end = end

    def flush_zero() -> None:
        nonlocal zero_at
        if zero_end > zero_at and not fresh:
            dst.zero(zero_at, zero_end - zero_at)
        zero_at = zero_end

    for start, end, hole in _file_segments(fd, size):
        if hole:
            zero(start, end)
            prog.update(end)
            continue
        for off in range(start, end, BLOCK):
            m = min(BLOCK, end - off)
            _pread_exact(fd, view[:m], off)
            for s, e, is_zero in _runs(buf, off, m):
                if is_zero:
                    zero(off + s, off + e)
                else:
                    flush_zero()
                    dst.write(off + s, view[s:e])
                    written += e - s
                    zero_at = zero_end = off + e
            prog.update(off + m)
    flush_zero()
    dst.flush()
    return written


# -- qemu-img -----------------------------------------------------------------------------------


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise JsnapError("qcow2 images need qemu-img, which is not installed (Debian: apt "
                         "install qemu-utils); raw images need nothing")
    return path


def _qemu_json(server: dict[str, str], export: str) -> str:
    """A qemu-img filename for an NBD export under the raw format (json: needs no URI
    escaping of socket paths or names)."""
    return "json:" + json.dumps({"file": {"driver": "nbd", "server": server,
                                          "export": export}})


def run_qemu_img(args: list[str], prog: Progress) -> None:
    """qemu-img SUBCOMMAND ARGS...; with a progress display, its `-p` percentages drive it."""
    cmd = [qemu_img(), args[0], *(["-p"] if prog.enabled else []), *args[1:]]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err)
        assert proc.stdout is not None
        tail = b""
        while chunk := os.read(proc.stdout.fileno(), 4096):
            tail = (tail + chunk)[-256:]
            found = _PERCENT.findall(tail)
            if found:
                prog.update(int(float(found[-1]) / 100 * prog.total))
        rc = proc.wait()
        if rc != 0:
            err.seek(0)
            lines = [ln for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
            raise JsnapError(f"qemu-img {args[0]} failed: "
                             f"{lines[-1] if lines else f'exit code {rc}'}")
    prog.update(prog.total)


def qcow2_size(path: str) -> int:
    p = subprocess.run([qemu_img(), "info", "--output=json", "-f", "qcow2", path],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        raise JsnapError(f"cannot read {path} as qcow2: {lines[-1] if lines else p.returncode}")
    return int(json.loads(p.stdout)["virtual-size"])


# -- the commands -------------------------------------------------------------------------------


def export_image(pool: str, spec: str, path: str, fmt: str | None = None, *,
                 opener: FileOpener = open_store, owner: str = DEFAULT_OWNER) -> str:
    """Copy VOL or VOL@SNAP into the image file `path` (replaced if it exists); return the
    summary line."""
    vol, snap = split_export(spec)
    fmt = fmt or ("qcow2" if path.endswith((".qcow2", ".qcow")) else "raw")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise InvalidRequest(f"{path} is not a regular file: export writes image files")
    if fmt == "qcow2":
        qemu_img()  # fail before opening anything when it is missing
    with open_pool(pool, opener, owner) as p:
        size = p.size(vol, snap)
        with Progress(size, f"export {spec}") as prog:
            if fmt == "raw":
                with p.endpoint(vol, snap) as src:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o644)
                    try:
                        data = export_raw(src, fd, size, prog)
                    except BaseException:
                        os.close(fd)
                        os.unlink(path)  # a partial image must not pass for a backup
                        raise
                    os.close(fd)
                note = f", {human(data)} of data"
            else:
                with p.qemu_server() as server:
                    run_qemu_img(["convert", "-f", "raw", "-O", "qcow2",
                                  _qemu_json(server, spec), path], prog)
                note = ""
    return f"exported {spec} to {path} ({fmt}): {prog.summary()}{note}"


def import_image(pool: str, path: str, vol: str, fmt: str | None = None,
                 create: bool = False, *, opener: FileOpener = open_store,
                 owner: str = DEFAULT_OWNER) -> str:
    """Copy the image file `path` into volume `vol` (made, thin, with `create`); return the
    summary line."""
    if "@" in vol:
        raise InvalidRequest(f"cannot import into {vol!r}: snapshots are read-only")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fmt is None:
            fmt = "qcow2" if os.pread(fd, 4, 0) == QCOW2_MAGIC else "raw"
        size = os.lseek(fd, 0, os.SEEK_END) if fmt == "raw" else qcow2_size(path)
        with open_pool(pool, opener, owner) as p:
            if create:
                vsize = align_up(max(size, 1), SECTOR)
                body = {"name": vol, "size": vsize, "thin": True}
                p.call(lambda e: ops.volume_create(e, vol, vsize), "POST", "/v1/volumes", body)
            else:
                vsize = p.size(vol, None)
                if vsize < size:
                    raise InvalidRequest(
                        f"volume {vol!r} ({format_size(vsize)}) is smaller than {path} "
                        f"({format_size(size)}): grow it with 'jsnap volume resize {vol} "
                        f"--size {format_size(align_up(size, SECTOR))}' or import with --create "
                        f"into a new volume")
            try:
                with Progress(size, f"import {os.path.basename(path)}") as prog:
                    note = ""
                    if fmt == "raw":
                        with p.endpoint(vol, None) as dst:
                            note = f", {human(import_raw(fd, dst, size, create, prog))} of data"
                    else:
                        with p.qemu_server() as server:
                            run_qemu_img(["convert", "-n", *(["--target-is-zero"] if create
                                                             else []),
                                          "-f", "qcow2", "-O", "raw", path,
                                          _qemu_json(server, vol)], prog)
            except BaseException:
                if create:  # a half-filled new volume is no use to anyone
                    with contextlib.suppress(JsnapError, OSError):
                        p.call(lambda e: ops.volume_delete(e, vol), "DELETE",
                               f"/v1/volumes/{_q(vol)}")
                raise
    finally:
        os.close(fd)
    return f"imported {path} ({fmt}) into {vol}: {prog.summary()}{note}"
