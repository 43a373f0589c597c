#!/usr/bin/env python3
"""jsnap benchmark harness: jsnap and peer NBD servers side by side, driven by fio.

    python bench/run.py                 # all workloads, 10 s runs, 3 A/B pairs, 1 GiB volumes
    python bench/run.py --quick         # smoke run (~2.5 min), what CI runs a part of
    python bench/run.py --workloads randwrite4k-qd32,randread4k-qd32 --runtime 5 --pairs 2
    python bench/run.py --workloads restart-randread4k-qd32 --read-cache cold

Stdlib only. bench/README.md says what each workload does and how to read the tables.
"""

from __future__ import annotations

import abc
import argparse
import ctypes
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
EXPORT = "bench"
CHUNK = 64 * KiB  # jsnap's copy-on-write unit; the qcow2 peer is created with the same cluster size
SNAP_COUNTS = (0, 1, 10, 100)
QUICK_SNAP_COUNTS = (0, 1, 10)  # 100 jsnap CLI calls alone cost ~15 s of Python start-up
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The five plain workloads: time-based fio runs over the whole (prefilled) volume.
BASIC = {
    "randwrite4k-qd1": ("randwrite", "4k", 1, "4 KiB random writes, QD1"),
    "randwrite4k-qd32": ("randwrite", "4k", 32, "4 KiB random writes, QD32"),
    "randread4k-qd32": ("randread", "4k", 32, "4 KiB random reads, QD32"),
    "seqwrite1m-qd8": ("write", "1M", 8, "1 MiB sequential writes, QD8"),
    "seqread1m-qd8": ("read", "1M", 8, "1 MiB sequential reads, QD8"),
}
# Reads as a user meets them: data written by an earlier run of the server, the server
# restarted on it, the backing files' page cache in a stated state (--read-cache).
# Each maps to the plain workload whose fio args it runs. The random writes are the other
# side of jsnap's page-cache drops: small writes into the big folios of a warm file.
RESTART = {
    "restart-randread4k-qd32": "randread4k-qd32",
    "restart-seqread1m-qd8": "seqread1m-qd8",
    "restart-randwrite4k-qd32": "randwrite4k-qd32",
}
# qemu-nbd-qcow2 is left out: one more server per round, and its reads are qemu-nbd-raw's
# plus cluster lookups.
RESTART_SERVERS = ("jsnap", "nbdkit-file", "qemu-nbd-raw", "nbd-server")
# 4 KiB random writes over the whole volume before each stop: jsnap's journal then holds
# small writes to replay at start (it destages lazily: a clean stop leaves them there).
RESTART_BURST = ["--rw=randwrite", "--bs=4k", "--iodepth=32", f"--io_size={16 * MiB}"]
# Below (warm) or above (cold) this share of the backing files' bytes cached right before
# the read run, a result is marked as not in its stated page-cache state.
WARM_MIN, COLD_MAX = 0.9, 0.1
SYNC = "sync-randwrite4k-qd32"
SNAPCOST = "snapcost"
SNAPCREATE = "snapcreate-latency"
# jsnap in front of an nbdkit file export (volume create --nbd) against that nbdkit alone:
# 4 KiB random writes at QD32 and QD1 (issue 21: the journal in front of another server).
INFRONT = "infront-randwrite4k"
ALL_WORKLOADS = [*BASIC, *RESTART, SYNC, SNAPCOST, SNAPCREATE, INFRONT]
INSTALL_HINT = {
    "fio": "apt-get install fio",
    "nbdkit": "apt-get install nbdkit",
    "qemu-nbd": "apt-get install qemu-utils",
    "qemu-img": "apt-get install qemu-utils",
    "nbd-server": "apt-get install nbd-server",
    "fincore": "apt-get install util-linux",
}


class BenchError(Exception):
    """Fatal for the whole run (missing fio, bad options)."""


class ServerError(Exception):
    """One server could not be set up or served badly: skip it, keep the others."""


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_size(text: str) -> int:
    units = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1] if t and t[-1] in units else ""
    try:
        return int(t[: len(t) - len(suffix)]) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}") from None


def fmt_size(n: int) -> str:
    for suffix, unit in (("G", GiB), ("M", MiB), ("K", KiB)):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ServerError(f"{name} not found: {INSTALL_HINT.get(name, 'install ' + name)}")
    return path


def tail(path: str, n: int = 6) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def run_cmd(argv: list[str], timeout: float = 120, what: str = "") -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ServerError(f"{what or argv[0]}: timed out after {timeout:.0f}s") from None
    except OSError as e:
        raise ServerError(f"{what or argv[0]}: {e}") from None
    if cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip().splitlines()[-3:]
        raise ServerError(f"{what or shlex.join(argv)} exited {cp.returncode}: {' | '.join(msg)}")
    return cp


def residency(paths: list[str]) -> dict[str, tuple[int, int]]:
    """{path: (size, bytes in the page cache)}, by fincore (util-linux)."""
    out = {}
    for path in paths:
        cp = run_cmd(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", path],
                     timeout=30, what="fincore")
        cached, size = map(int, cp.stdout.split())
        out[path] = (size, cached)
    return out


# --------------------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the harness itself is SIGKILLed, its servers get SIGTERM
    # instead of lingering on the machine.
    _libc.prctl(1, signal.SIGTERM)


def _read_stat(pid: int) -> tuple[int, str, int, int] | None:
    """(ppid, state, utime+stime, cutime+cstime) from /proc/PID/stat, times in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and ')': split after the last ')'. rest[0] is field 3 (state).
    rest = data[data.rindex(")") + 2:].split()
    return int(rest[1]), rest[0], int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def process_tree(root: int) -> dict[int, tuple[int, str, int, int]]:
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st:
                stats[int(name)] = st
    kids: dict[int, list[int]] = {}
    for pid, st in stats.items():
        kids.setdefault(st[0], []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid]
            todo.extend(kids.get(pid, []))
    return tree


def _process_cpu_s(pid: int) -> float | None:
    """All threads' CPU time of pid, dead ones included, at ns resolution.

    Reads the process CPU-time clock (clock_getcpuclockid: MAKE_PROCESS_CPUCLOCK(pid, SCHED)).
    Per-thread schedstat would miss thread-per-connection servers, whose threads are gone
    by the time fio has disconnected.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except OSError:
        return None


def tree_cpu_seconds(root: int) -> tuple[float, float]:
    """Server CPU: (utime+stime from /proc/PID/stat, the same at ns resolution).

    Both sum the live processes of the tree plus the c-times of children they reaped, so a
    forking server (nbd-server: one child per connection) is covered and nothing counts twice.
    /proc/PID/stat counts 10 ms ticks, too coarse for snapcost's sub-second runs; the second
    figure reads each process's CPU clock instead (reaped children still come in ticks).
    """
    ticks = precise = 0.0
    for pid, (_, _, own, reaped) in process_tree(root).items():
        ticks += own + reaped
        cpu = _process_cpu_s(pid)
        precise += (cpu if cpu is not None else own / CLK_TCK) + reaped / CLK_TCK
    return ticks / CLK_TCK, precise


def pid_alive(pid: int) -> bool:
    st = _read_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- servers

class Server(abc.ABC):
    """One NBD server process on a fresh backing file in its own temp dir.

    Serves one transport: some servers cannot listen on a unix socket and TCP at once, so
    `--transport both` starts a second instance rather than treating servers differently.
    """

    name = "?"
    restarts_to_snapshot = False  # take_snapshots() stops and starts the server process

    def __init__(self, bench: Bench, transport: str) -> None:
        self.b = bench
        self.transport = transport
        self.dir = tempfile.mkdtemp(prefix=self.name + "-", dir=bench.workdir)
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.log_path = os.path.join(self.dir, "server.log")
        self.size = bench.size

    @abc.abstractmethod
    def create(self) -> None:
        """Make the backing file (or pool) the server will serve."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The server's command line for this transport."""

    @abc.abstractmethod
    def backing(self) -> list[str]:
        """Files to warm into the page cache before a read run."""

    def uri(self) -> str:
        if self.transport == "unix":
            return f"nbd+unix:///{EXPORT}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    def describe(self) -> str:
        return shlex.join(self.command())

    def _prepare_listen(self) -> None:
        """Pick a free port, or clear the unix socket path (which must fit sun_path)."""
        if self.transport == "unix" and len(self.sock) > 100:
            raise ServerError(f"socket path too long for AF_UNIX ({self.sock}): "
                              "use a shorter --workdir")
        if self.transport == "tcp":
            self.port = free_port()
        elif os.path.exists(self.sock):
            os.unlink(self.sock)

    def _spawn(self) -> None:
        self._prepare_listen()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=self.dir,
                                         preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            return False
        return self.pid is not None and pid_alive(self.pid)

    def start(self) -> None:
        self._spawn()
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        # Ready = a connection gets the NBD greeting ("NBDMAGIC"), not merely a socket file.
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"exited during startup: {tail(self.log_path)}")
            try:
                if self.transport == "unix":
                    s = socket.socket(socket.AF_UNIX)
                    addr: object = self.sock
                else:
                    s = socket.socket()
                    addr = ("127.0.0.1", self.port)
                with s:
                    s.settimeout(2)
                    s.connect(addr)
                    hello = b""
                    while len(hello) < 18 and (chunk := s.recv(18 - len(hello))):
                        hello += chunk
                    if hello[:8] == b"NBDMAGIC":
                        if hello[8:16] == b"IHAVEOPT":
                            # Leave with NBD_OPT_ABORT so servers log no failed negotiation
                            # (that noise would bury the real error in a startup failure).
                            flags = int.from_bytes(hello[16:18], "big") & 3
                            s.sendall(flags.to_bytes(4, "big") + b"IHAVEOPT"
                                      + (2).to_bytes(4, "big") + bytes(4))
                            try:
                                s.recv(64)
                            except OSError:
                                pass
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.05)
        raise ServerError(f"not ready after {timeout:.0f}s ({last}): {tail(self.log_path)}")

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL; then any descendant that outlived it. Only our own PIDs."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        family = [p for p in process_tree(pid) if p != pid]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    break
                if self.proc is None and not pid_alive(pid):
                    break
                time.sleep(0.02)
            else:
                continue
            break
        for p in family:
            if pid_alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if not self.b.args.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def quiesce(self) -> None:
        """Wait for the server's own background work left by the previous run (none here:
        the page cache's is flushed by settle)."""
        return

    def warm(self) -> None:
        """Read the backing files so the run starts from page cache (the VM reclaims idle cache)."""
        buf = bytearray(4 * MiB)
        for path in self.backing():
            try:
                with open(path, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            except OSError:
                pass

    def evict(self) -> None:
        """Drop the backing files from the page cache (--read-cache cold). fsync first:
        POSIX_FADV_DONTNEED drops clean pages only."""
        for path in self.backing():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def start_facts(self) -> dict:
        """What the server said about its last start, for the JSON (none here)."""
        return {}

    def take_snapshots(self, names: list[str]) -> None:
        raise ServerError(f"{self.name} has no snapshots")

    def _truncate(self, path: str) -> None:
        with open(path, "wb") as f:
            f.truncate(self.size)


class NbdkitFile(Server):
    def __init__(self, bench: Bench, transport: str, fua: bool = False) -> None:
        self.fua = fua
        self.name = "nbdkit-file-fua" if fua else "nbdkit-file"
        super().__init__(bench, transport)
        self.file = os.path.join(self.dir, "disk.raw")

    def create(self) -> None:
        need_tool("nbdkit")
        self._truncate(self.file)

    def command(self) -> list[str]:
        listen = (["--unix", self.sock] if self.transport == "unix"
                  else ["--ipaddr", "127.0.0.1", "--port", str(self.port)])
        # fuamode=force: every write gets FUA, which the file plugin turns into an fdatasync:
        # the durable-writes peer for jsnap --durability sync.
        fua = ["--filter=fua"] if self.fua else []
        return ["nbdkit", "--foreground", *listen, *fua, "file", self.file,
                *(["fuamode=force"] if self.fua else [])]

    def backing(self) -> list[str]:
        return [self.file]


class QemuNbd(Server):
    def __init__(self, bench: Bench, transport: str, fmt: str = "raw",
                 initial_snapshot: bool = True) -> None:
        self.fmt = fmt
        self.initial_snapshot = initial_snapshot
        self.restarts_to_snapshot = fmt == "qcow2"
        self.name = f"qemu-nbd-{fmt}"
        super().__init__(bench, transport)
        self.file = os.path.join(self.dir, f"disk.{fmt}")

    def create(self) -> None:
        need_tool("qemu-nbd")
        if self.fmt == "raw":
            self._truncate(self.file)
            return
        need_tool("qemu-img")
        # 64 KiB clusters (qcow2's default, stated): each server at its default copy-on-write
        # unit (jsnap: 16 KiB chunks). One write per 64 KiB is a first write for both.
        run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CHUNK}",
                 self.file, str(self.size)])
        if self.initial_snapshot:
            run_cmd(["qemu-img", "snapshot", "-c", "s1", self.file])

    def command(self) -> list[str]:
        listen = (["-k", self.sock] if self.transport == "unix"
                  else ["-b", "127.0.0.1", "-p", str(self.port)])
        # -t: keep serving after the first client leaves. writeback+threads: page cache and
        # flush honoured, the same contract as nbdkit file and jsnap writeback.
        return ["qemu-nbd", "-f", self.fmt, "-x", EXPORT, "-t", *listen, "--cache=writeback",
                "--aio=threads", "--discard=ignore", "--detect-zeroes=off", self.file]

    def backing(self) -> list[str]:
        return [self.file]

    def take_snapshots(self, names: list[str]) -> None:
        if self.fmt != "qcow2":
            return super().take_snapshots(names)
        # qemu-nbd has no live snapshot command and holds the image's write lock, so internal
        # snapshots are taken offline: stop, qemu-img snapshot -c, restart.
        if not names:
            return
        self.stop()
        for n in names:
            run_cmd(["qemu-img", "snapshot", "-c", n, self.file], what="qemu-img snapshot -c")
        self.start()


class NbdServer(Server):
    name = "nbd-server"

    def __init__(self, bench: Bench, transport: str) -> None:
        super().__init__(bench, transport)
        self.file = os.path.join(self.dir, "disk.raw")
        self.conf = os.path.join(self.dir, "nbd-server.conf")
        self.pidfile = os.path.join(self.dir, "nbd-server.pid")

    def create(self) -> None:
        need_tool("nbd-server")
        self._truncate(self.file)

    def _write_conf(self) -> None:
        # With unixsock set nbd-server does not listen on TCP; for TCP listenaddr pins it to
        # loopback (its default is every address). flush/fua honoured like the other peers.
        listen = (f"unixsock = {self.sock}" if self.transport == "unix"
                  else f"listenaddr = 127.0.0.1\nport = {self.port}")
        with open(self.conf, "w") as f:
            f.write(f"[generic]\n{listen}\n[{EXPORT}]\nexportname = {self.file}\n"
                    "flush = true\nfua = true\n")

    def command(self) -> list[str]:
        # Not -d: with -d it serves one client and exits. It daemonizes; we track the PID file.
        return ["nbd-server", "-C", self.conf, "-p", self.pidfile]

    def start(self) -> None:
        self._prepare_listen()
        self._write_conf()
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        with open(self.log_path, "ab") as logf:
            cp = subprocess.run(self.command(), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, cwd=self.dir, timeout=30)
        if cp.returncode != 0:
            raise ServerError(f"exited {cp.returncode}: {tail(self.log_path)}")
        # The daemon creates the PID file and writes it a moment later: retry until it parses.
        deadline = time.monotonic() + 10
        self.pid = None
        while self.pid is None:
            try:
                with open(self.pidfile) as f:
                    self.pid = int(f.read().strip())
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self._kill_unrecorded()
                    raise ServerError("no PID file after 10 s (after daemonizing nbd-server "
                                      f"logs to syslog): {tail(self.log_path)}") from None
                time.sleep(0.02)
        self.proc = None
        self._wait_ready()

    def backing(self) -> list[str]:
        return [self.file]

    def _kill_unrecorded(self) -> None:
        # Our daemon without a PID file: its command line holds our unique temp path.
        want = "\0".join(self.command()).encode()
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read().rstrip(b"\0") == want:
                        os.kill(int(name), signal.SIGKILL)
            except (OSError, ValueError):
                pass


class Jsnap(Server):
    def __init__(self, bench: Bench, transport: str, durability: str = "writeback",
                 journal_size: int | None = None) -> None:
        # Plain workloads run on jsnap's default journal (what a user gets); snapcost sizes
        # the journal so its burst fits and its sustained phase is twice the journal.
        self.journal_size = journal_size
        self.durability = durability
        self.name = "jsnap" if durability == "writeback" else f"jsnap-{durability}"
        super().__init__(bench, transport)
        self.pool = os.path.join(self.dir, "pool")
        self.cli = list(bench.jsnap_argv)
        # --journal-dir: the journal on another file system (the design's journal device)
        jdir = bench.args.journal_dir
        self.journal_path = (os.path.join(jdir, os.path.basename(self.dir) + ".journal")
                             if jdir else None)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.journal_path and not self.b.args.keep:
                try:
                    os.unlink(self.journal_path)
                except FileNotFoundError:
                    pass

    def create(self) -> None:
        jopt = (["--journal-size", fmt_size(self.journal_size)] if self.journal_size else [])
        if self.journal_path:
            jopt += ["--journal-path", self.journal_path]
        copt = ["--chunk-size", fmt_size(self.b.chunk_size)] if self.b.chunk_size else []
        run_cmd([*self.cli, "init", self.pool, *jopt, *copt,
                 "--durability", self.durability], what="jsnap init")
        run_cmd([*self.cli, "-p", self.pool, "volume", "create", EXPORT, "--size",
                 fmt_size(self.size), f"--{self.b.volume_type}"], what="jsnap volume create")

    def command(self) -> list[str]:
        listen = (["--socket", self.sock] if self.transport == "unix"
                  else ["--listen", f"127.0.0.1:{self.port}"])
        return [*self.cli, "-p", self.pool, "serve", *listen]

    def backing(self) -> list[str]:
        out = []
        for root, _, files in os.walk(self.pool):
            for fn in files:
                p = os.path.join(root, fn)
                if os.path.isfile(p) and not os.path.islink(p):
                    out.append(p)
        return out

    def start_facts(self) -> dict:
        # Proof that the burst was still in the journal at the stop: the last start's replay.
        with open(self.log_path, errors="replace") as f:
            found = re.findall(r"replayed (\d+) journal records", f.read())
        return {"replayed_records": int(found[-1]) if found else None}

    def snapshot_cmd(self, name: str) -> list[str]:
        return [*self.cli, "-p", self.pool, "snapshot", "create", EXPORT, name]

    def quiesce(self, timeout: float = 120) -> None:
        """Wait until the journal is empty, so a run does not race the destage of the one
        before it (a snapcost burst is defined as fitting in the free journal)."""
        deadline = time.monotonic() + timeout
        while True:
            cp = run_cmd([*self.cli, "-p", self.pool, "status", "--json"], what="jsnap status")
            if json.loads(cp.stdout)["journal_records"] == 0:
                return
            if time.monotonic() > deadline:
                raise ServerError(f"jsnap journal did not drain in {timeout:.0f} s")
            time.sleep(0.2)

    def take_snapshots(self, names: list[str]) -> None:
        for n in names:
            run_cmd(self.snapshot_cmd(n), what="jsnap snapshot create")


class JsnapInFront(Jsnap):
    """jsnap whose volume's production is an nbdkit file export of its own (`volume create
    --nbd`): writes land in jsnap's journal, destage writes them to the export."""

    def __init__(self, bench: Bench, transport: str) -> None:
        super().__init__(bench, transport)
        self.name = "jsnap-nbdkit"
        self.backend_file = os.path.join(self.dir, "backend.raw")
        self.backend_sock = os.path.join(self.dir, "backend.sock")
        self.backend: subprocess.Popen | None = None

    def create(self) -> None:
        need_tool("nbdkit")
        self._truncate(self.backend_file)
        with open(os.path.join(self.dir, "backend.log"), "ab") as logf:
            self.backend = subprocess.Popen(
                ["nbdkit", "--foreground", "--unix", self.backend_sock, "file",
                 self.backend_file], stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.backend_sock):
            if self.backend.poll() is not None or time.monotonic() > deadline:
                raise ServerError("the backend nbdkit did not start")
            time.sleep(0.02)
        jopt = (["--journal-size", fmt_size(self.journal_size)] if self.journal_size else [])
        run_cmd([*self.cli, "init", self.pool, *jopt, "--durability", self.durability],
                what="jsnap init")
        run_cmd([*self.cli, "-p", self.pool, "volume", "create", EXPORT, "--nbd",
                 f"nbd+unix:///?socket={self.backend_sock}"], what="jsnap volume create")

    def backing(self) -> list[str]:
        return [*super().backing(), self.backend_file]

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.backend is not None and self.backend.poll() is None:
                self.backend.kill()
                self.backend.wait(10)


# --------------------------------------------------------------------------- the bench

def mmm(vals: list[float]) -> tuple[float, float, float]:
    return min(vals), statistics.median(vals), max(vals)


def fmt_num(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "iops":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    if unit == "ratio":
        return f"{v:.2f}"
    if unit == "%":
        return f"{v * 100:.0f}%"
    if unit in ("us", "ms") and v < 10:
        return f"{v:.1f}" if unit == "us" else f"{v:.2f}"
    return f"{v:.0f}"


def fmt_mmm(vals: list[float], unit: str) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, med, hi = mmm(vals)
    if len(vals) == 1:
        return fmt_num(med, unit)
    return f"{fmt_num(med, unit)} ({fmt_num(lo, unit)}..{fmt_num(hi, unit)})"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size
        self.journal_size: int = args.journal_size
        self.runtime: float = args.runtime
        self.pairs: int = args.pairs
        self.records: list[dict] = []
        self.figures: list[dict] = []  # for --markdown and the JSON summary
        self.servers_seen: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.jsnap_failed: list[str] = []
        self.fio = ""
        self.jsnap_argv: list[str] = []
        self.volume_type: str = args.volume_type
        self.chunk_size: int | None = args.chunk_size
        self.jsnap_ok = False
        self.workdir = ""
        self.fio_seq = itertools.count(1)  # next() is atomic: prefills run in threads

    # ---- setup

    def check_tools(self) -> None:
        fio = shutil.which("fio")
        if not fio:
            raise BenchError("fio not found: apt-get install fio")
        cp = subprocess.run([fio, "--enghelp=nbd"], capture_output=True, text=True)
        if cp.returncode != 0 or "uri" not in cp.stdout:
            raise BenchError("this fio has no nbd engine (needs fio >= 3.19 built with libnbd): "
                             "apt-get install fio")
        self.fio = fio

    def resolve_jsnap(self) -> None:
        if self.args.jsnap_cmd:
            # Servers run with cwd in their temp dir: make relative script paths absolute.
            argv = [os.path.abspath(a) if i and not os.path.isabs(a) and os.path.isfile(a)
                    else a for i, a in enumerate(shlex.split(self.args.jsnap_cmd))]
            exe = shutil.which(argv[0])
            if not exe:
                self.skipped["jsnap"] = f"{argv[0]} not found (--jsnap-cmd)"
                return
            argv[0] = exe
        elif shutil.which("jsnap"):
            argv = [shutil.which("jsnap")]
        else:
            argv = [sys.executable, "-m", "jsnap"]
        # A pyenv shim costs ~60 ms of bash per call, which would sit inside every measured
        # `snapshot create`: call the real script instead.
        if "/shims/" in argv[0] and shutil.which("pyenv"):
            cp = subprocess.run(["pyenv", "which", os.path.basename(argv[0])],
                                capture_output=True, text=True)
            if cp.returncode == 0 and cp.stdout.strip():
                argv[0] = cp.stdout.strip()
        env_path = os.path.join(REPO, "src")
        if argv[1:3] == ["-m", "jsnap"] and os.path.isdir(env_path):
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (env_path, os.environ.get("PYTHONPATH")) if p)
        try:
            cp = subprocess.run([*argv, "serve", "--help"], capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.skipped["jsnap"] = f"{shlex.join(argv)} serve --help: {e}"
            return
        if cp.returncode != 0:
            why = (cp.stderr or cp.stdout).strip().splitlines()[-1:] or ["no output"]
            self.skipped["jsnap"] = (f"`{shlex.join(argv)} serve --help` exited "
                                     f"{cp.returncode}: {why[0]}")
            return
        self.jsnap_argv = argv
        self.jsnap_ok = True

    def make_workdir(self) -> None:
        base = self.args.workdir or tempfile.gettempdir()
        self.workdir = tempfile.mkdtemp(prefix="jsnap-bench-", dir=base)
        fstype = "?"
        best = ""
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if self.workdir.startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        self.fstype = fstype
        if fstype in ("tmpfs", "ramfs"):
            log(f"warning: {base} is {fstype}: fdatasync is free there, durable figures are "
                "meaningless (use --workdir on a disk)")

    def bring_up(self, candidates: list[Server], servers: list[Server]) -> None:
        """Start each candidate, then prefill all at once (not measured, so in parallel).

        Started servers are appended to the caller's `servers` at once so its `finally`
        stops them even if we are interrupted half-way.
        """
        for srv in candidates:
            if self.start(srv):
                servers.append(srv)
        with ThreadPoolExecutor(max(1, len(servers))) as ex:
            ok = list(ex.map(self.prefill, list(servers)))
        for srv, good in zip(list(servers), ok, strict=True):
            if not good:
                servers.remove(srv)
                srv.close()

    def start(self, srv: Server) -> Server | None:
        """create + start; on failure print why, clean up, return None (peer skipped)."""
        try:
            srv.create()
            srv.start()
        except ServerError as e:
            srv.close()
            self.note_skip(srv.name, str(e))
            return None
        self.servers_seen.setdefault(f"{srv.name} [{srv.transport}]", srv.describe())
        return srv

    def note_skip(self, name: str, why: str) -> None:
        log(f"  {name} skipped: {why}")
        self.skipped.setdefault(name, why)
        if name.startswith("jsnap"):
            self.jsnap_failed.append(f"{name}: {why}")

    # ---- fio

    def fio_run(self, srv: Server, args: list[str], timeout: float) -> dict:
        out = os.path.join(self.workdir, f"fio-{next(self.fio_seq)}.json")
        argv = self.fio_argv(srv.uri(), args, out)
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ServerError(f"fio timed out after {timeout:.0f}s") from None
        return self.fio_parse(out, cp.returncode, cp.stderr)

    def fio_argv(self, uri: str, args: list[str], out: str) -> list[str]:
        # disk_util=0: there is no local disk to sample behind an NBD URI.
        return [self.fio, "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--disk_util=0",
                "--output-format=json", f"--output={out}", *args]

    @staticmethod
    def fio_parse(out: str, rc: int, stderr: str) -> dict:
        try:
            with open(out) as f:
                text = f.read()
            # fio writes warnings ("fio: ...") into the output file ahead of the JSON.
            data = json.loads(text[text.index("{"):])
            job = data["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError):
            raise ServerError(f"fio exited {rc}, no JSON: {stderr.strip()[-300:]}") from None
        if rc != 0 or job.get("error"):
            raise ServerError(f"fio exited {rc} error={job.get('error')}: "
                              f"{stderr.strip()[-300:]}")
        ios = iops = bw = 0.0
        lat_dir = None
        for d in ("read", "write"):
            s = job[d]
            ios += s["total_ios"]
            iops += s["iops"]
            bw += s["bw_bytes"]
            if s["total_ios"] and (lat_dir is None or s["total_ios"] > job[lat_dir]["total_ios"]):
                lat_dir = d
        if not ios or lat_dir is None:
            raise ServerError("fio completed no I/O")
        clat = job[lat_dir]["clat_ns"]
        pct = clat.get("percentile", {})
        return {
            "ios": int(ios), "iops": iops, "mbps": bw / 1e6,
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
            "mean_us": clat.get("mean", 0) / 1000, "fio_runtime_ms": job.get("job_runtime"),
            "fio_cpu_pct": job.get("usr_cpu", 0) + job.get("sys_cpu", 0),
        }

    def settle(self, srv: Server, warm: bool = True) -> None:
        """Before every measured run: let the server finish its background work (jsnap's
        destage), flush dirty pages, then read the backing files (not after a restart:
        their page cache is what is measured then).

        Without the flush, one server's dirty backlog (GBs after prefill) is written back
        during the next server's run and throttles its writes.
        """
        srv.quiesce()
        self.syncfs()
        if warm:
            srv.warm()

    def syncfs(self) -> None:
        fd = os.open(self.workdir, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def restart(self, srv: Server) -> dict:
        """Restart the server as a service is restarted, over small writes it has not
        destaged: burst, stop (SIGTERM), page cache of the backing files to --read-cache,
        start on the same files, wait --restart-settle s (whatever the server does to the
        page cache at start, and jsnap's destage of the replayed journal, begin meanwhile)."""
        state = self.args.read_cache
        self.fio_run(srv, RESTART_BURST, timeout=120)
        srv.stop()  # at once: jsnap destages after 0.5 s without writes
        t0 = time.monotonic()
        self.syncfs()
        # Right before the start: this VM reclaims page cache after about a minute idle.
        if state == "warm":
            srv.warm()
        else:
            srv.evict()
        srv.start()
        facts = {"read_cache": state, "restart_s": time.monotonic() - t0, **srv.start_facts()}
        time.sleep(self.args.restart_settle)
        return facts

    def cache_report(self, before: dict[str, tuple[int, int]],
                     after: dict[str, tuple[int, int]]) -> dict:
        """Residency of the backing files around a read run, and whether it was as stated."""
        state = self.args.read_cache
        size = sum(sz for sz, _ in before.values())
        # min(): fincore counts a file's last page whole
        frac = {k: sum(min(sz, c) for sz, c in d.values()) / max(1, size)
                for k, d in (("before", before), ("after", after))}
        ok = frac["before"] >= WARM_MIN if state == "warm" else frac["before"] <= COLD_MAX
        return {
            "state": state, "size": size, "fraction_before": frac["before"],
            "fraction_after": frac["after"], "as_stated": ok,
            "note": "" if ok else f"cache: {frac['before'] * 100:.0f} % (stated {state})",
            "files": [{"path": p, "size": after.get(p, before.get(p, (0, 0)))[0],
                       "cached_before": before[p][1] if p in before else None,
                       "cached_after": after[p][1] if p in after else None}
                      for p in sorted({*before, *after})],
        }

    def measure(self, srv: Server, fio_args: list[str], *, transport: str, workload: str,
                variant: str, pair: int, timeout: float, restart: bool = False) -> dict | None:
        rec = {"transport": transport, "workload": workload, "variant": variant,
               "server": srv.name, "pair": pair, "fio_args": fio_args}
        try:
            if restart:
                rec.update(self.restart(srv))
            t0 = time.monotonic()
            self.settle(srv, warm=not restart)
            rec["settle_s"] = time.monotonic() - t0
            if not srv.alive():
                raise ServerError(f"server is not running: {tail(srv.log_path)}")
            before = residency(srv.backing()) if restart else {}
            cpu0 = tree_cpu_seconds(srv.pid)
            rec.update(self.fio_run(srv, fio_args, timeout))
            if len(process_tree(srv.pid)) > 1:
                # A forking server (nbd-server) must reap its per-connection child before
                # that child's CPU shows in the parent's cutime.
                time.sleep(0.1)
            cpu1 = tree_cpu_seconds(srv.pid)
            if restart:
                rec["cache"] = self.cache_report(before, residency(srv.backing()))
        except ServerError as e:
            rec["error"] = str(e)
            log(f"  {srv.name} {workload} {variant} FAILED: {e}")
            if srv.name.startswith("jsnap"):
                self.jsnap_failed.append(f"{srv.name} {workload} {variant}: {e}")
            self.records.append(rec)
            return None
        rec["server_cpu_s"] = cpu1[0] - cpu0[0]  # utime+stime, 10 ms ticks
        rec["server_cpu_s_ns"] = cpu1[1] - cpu0[1]  # same from schedstat, ns
        rec["cpu_us_per_io_ticks"] = rec["server_cpu_s"] / rec["ios"] * 1e6
        rec["cpu_us_per_io"] = rec["server_cpu_s_ns"] / rec["ios"] * 1e6
        self.records.append(rec)
        return rec

    def prefill(self, srv: Server) -> bool:
        # Reads must hit written data; one sequential 1 MiB pass also serves as the write
        # half of the server's warm-up.
        try:
            self.fio_run(srv, ["--rw=write", "--bs=1M", "--iodepth=8"],
                         timeout=120 + self.size / (20 * MiB))
            return True
        except ServerError as e:
            self.note_skip(srv.name, f"prefill failed: {e}")
            return False

    def warmup(self, srv: Server) -> None:
        # nbdkit's first 1 MiB read run after start is ~3x slower: one throwaway read run.
        srv.warm()
        t = "500ms" if self.args.quick else "1"
        try:
            self.fio_run(srv, ["--rw=read", "--bs=1M", "--iodepth=8", "--time_based",
                               f"--runtime={t}"], timeout=60)
        except ServerError as e:
            log(f"  {srv.name} warm-up failed: {e}")

    def timed(self, args: list[str]) -> list[str]:
        return [*args, "--time_based", f"--runtime={self.runtime:g}"]

    # ---- workloads

    def run_basic(self, transport: str, names: list[str]) -> None:
        """The plain workloads, then the restart ones on the same (prefilled) servers."""
        plain = [w for w in names if w in BASIC]
        servers: list[Server] = []
        try:
            candidates: list[Server] = []
            if self.jsnap_ok:
                candidates.append(Jsnap(self, transport))
            candidates += [NbdkitFile(self, transport), QemuNbd(self, transport, "raw"),
                           *([QemuNbd(self, transport, "qcow2")] if plain else []),
                           NbdServer(self, transport)]
            log(f"[{transport}] starting {', '.join(s.name for s in candidates)} "
                f"on {fmt_size(self.size)} each, prefilling"
                + (", warming up" if plain else ""))
            self.bring_up(candidates, servers)
            if plain:  # the restart workloads measure the first reads after a start
                with ThreadPoolExecutor(max(1, len(servers))) as ex:
                    list(ex.map(self.warmup, servers))
            for wl in plain:
                rw, bs, qd, desc = BASIC[wl]
                args = self.timed([f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}"])
                for pair in range(self.pairs):
                    for srv in servers:  # A B C.. A B C..: drift hits every server alike
                        self.measure(srv, args, transport=transport, workload=wl, variant="",
                                     pair=pair, timeout=self.runtime + 60)
                unit = "iops" if bs == "4k" else "mbps"
                self.table(transport, wl, "", desc, args, unit)
            for wl in names:
                if wl in RESTART:
                    self.run_restart(transport, wl,
                                     [s for s in servers if s.name in RESTART_SERVERS])
        finally:
            for srv in servers:
                srv.close()

    def run_restart(self, transport: str, wl: str, servers: list[Server]) -> None:
        """Every round restarts every server (Bench.restart), so each round measures reads
        after a start, not the page cache the round before left."""
        if not shutil.which("fincore"):
            log(f"[{transport}] {wl} skipped: fincore not found: {INSTALL_HINT['fincore']}")
            return
        rw, bs, qd, desc = BASIC[RESTART[wl]]
        args = self.timed([f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}"])
        state = self.args.read_cache
        log(f"[{transport}] {wl}: per round and server: {' '.join(RESTART_BURST)}, stop, "
            f"page cache {state}, start, {self.args.restart_settle:g} s settle, read")
        for pair in range(self.pairs):
            for srv in servers:
                rec = self.measure(srv, args, transport=transport, workload=wl, variant="",
                                   pair=pair, timeout=self.runtime + 60, restart=True)
                if rec is None:
                    continue
                c = rec["cache"]
                replay = ("" if "replayed_records" not in rec
                          else f"; replayed {rec['replayed_records']} journal records")
                who = srv.name + (f" pair {pair}" if self.pairs > 1 else "")
                log(f"   {who}: page cache {fmt_num(c['fraction_before'], '%')} before "
                    f"the read, {fmt_num(c['fraction_after'], '%')} after{replay}"
                    + (f"  <- NOT AS STATED: {c['note']}" if c["note"] else ""))
                if rec.get("replayed_records") == 0:
                    log(f"   {who}: replayed no journal records: the burst was destaged "
                        "before the stop, so this run does not measure a restart over "
                        "small writes")
        unit = "iops" if bs == "4k" else "mbps"
        self.table(transport, wl, "", f"{desc}, after a restart, page cache {state}", args,
                   unit)

    def run_sync(self, transport: str) -> None:
        servers: list[Server] = []
        try:
            candidates: list[Server] = []
            if self.jsnap_ok:
                candidates.append(Jsnap(self, transport, "sync"))
            candidates.append(NbdkitFile(self, transport, fua=True))
            log(f"[{transport}] {SYNC}: starting {', '.join(s.name for s in candidates)}")
            self.bring_up(candidates, servers)
            # No fio --fsync: with the nbd engine at QD>1 it does not flush every N writes.
            # Durability is the server's: every write is durable when acknowledged.
            args = self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=32"])
            for pair in range(self.pairs):
                for srv in servers:
                    self.measure(srv, args, transport=transport, workload=SYNC, variant="",
                                 pair=pair, timeout=self.runtime + 60)
            self.table(transport, SYNC, "", "4 KiB random writes QD32, each durable when "
                       "acknowledged", args, "iops")
        finally:
            for srv in servers:
                srv.close()

    def run_infront(self, transport: str) -> None:
        """jsnap in front of nbdkit-file against nbdkit-file alone (issue 21): each on a
        file of its own, the same workload."""
        servers: list[Server] = []
        try:
            candidates: list[Server] = []
            if self.jsnap_ok:
                candidates.append(JsnapInFront(self, transport))
            candidates.append(NbdkitFile(self, transport))
            log(f"[{transport}] {INFRONT}: starting {', '.join(s.name for s in candidates)}")
            self.bring_up(candidates, servers)
            # A burst that fits in half of jsnap's default journal (it destages lazily, from
            # half full), then sustained runs, where destage to the export bounds jsnap.
            burst = ["--rw=randwrite", "--bs=4k", "--iodepth=32", f"--io_size={64 * MiB}"]
            runs = [("QD32 burst 64M", burst, "a burst of 64 MiB"),
                    ("QD32", self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
                     f"{self.runtime:g} s"),
                    ("QD1", self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
                     f"{self.runtime:g} s")]
            for variant, args, what in runs:
                for pair in range(self.pairs):
                    for srv in servers:
                        srv.quiesce()  # jsnap: the journal destaged first
                        self.measure(srv, args, transport=transport, workload=INFRONT,
                                     variant=variant, pair=pair, timeout=self.runtime + 120)
                self.table(transport, INFRONT, variant, f"4 KiB random writes, {what}, jsnap "
                           "in front of nbdkit-file against it alone", args, "iops")
        finally:
            for srv in servers:
                srv.close()

    def snapcost_plan(self) -> tuple[list[str], list[str], int] | None:
        """fio args for the burst and the sustained phase, on disjoint regions, and where
        those regions end (the tail past it takes the warm-up writes).

        fio cannot visit 64 KiB chunks in random order with 4 KiB writes (blockalign= turns
        its random map off, so ~40% of writes repeat a chunk; lfsr+blockalign issues no I/O in
        fio 3.33; iolog replay drops the last ~30 I/Os at QD32). So: zonemode=strided with
        zonesize=4k, zonerange=64k: one 4 KiB write at a random 4 KiB slot of each 64 KiB
        chunk, chunks in ascending order, QD32. Every write is the first to its chunk.
        Both phases run after the same snapshot, so their regions must not overlap.
        """
        j = self.journal_size
        burst_ios, sust_ios = j // 2 // (4 * KiB), 2 * j // (4 * KiB)
        burst_region, sust_region = burst_ios * CHUNK, sust_ios * CHUNK
        if burst_region + sust_region > self.size:
            return None
        common = ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--zonemode=strided",
                  "--zonesize=4k", f"--zonerange={CHUNK // KiB}k"]
        burst = [*common, "--offset=0", f"--size={burst_region}",
                 f"--io_size={burst_ios * 4 * KiB}"]
        sust = [*common, f"--offset={burst_region}", f"--size={sust_region}",
                f"--io_size={sust_ios * 4 * KiB}"]
        return burst, sust, burst_region + sust_region

    def run_snapcost(self, transport: str) -> None:
        plan = self.snapcost_plan()
        if plan is None:
            log(f"[{transport}] {SNAPCOST} skipped: needs --size >= 40 x --journal-size "
                f"(burst and sustained writes each on a distinct 64 KiB chunk)")
            return
        burst, sust, used = plan
        phases = [("burst", burst), ("sustained", sust)]
        j = fmt_size(self.journal_size)
        log(f"[{transport}] {SNAPCOST}: journal {j}; burst {fmt_size(self.journal_size // 2)} "
            f"and sustained {fmt_size(2 * self.journal_size)} of 4 KiB writes, "
            f"one per 64 KiB chunk; snapshots {','.join(map(str, self.args.snap_counts))}")
        for pair in range(self.pairs):
            # Fresh pool/image per pair: snapshot counts must be exactly 0, 1, 10, 100.
            servers: list[Server] = []
            try:
                candidates: list[Server] = []
                if self.jsnap_ok:
                    candidates.append(Jsnap(self, transport, journal_size=self.journal_size))
                candidates.append(QemuNbd(self, transport, "qcow2", initial_snapshot=False))
                self.bring_up(candidates, servers)
                for srv in servers:
                    self._snapcost_warmup(srv, used)
                taken = {s.name: 0 for s in servers}
                for n in self.args.snap_counts:
                    # Servers take their snapshots concurrently: not measured, and jsnap's
                    # CLI start-up (~0.14 s x 100) would otherwise dominate a --quick run.
                    # A server that restarts to snapshot (qcow2) does so on this thread:
                    # PR_SET_PDEATHSIG fires when the *thread* that spawned a child exits.
                    with ThreadPoolExecutor(max(1, len(servers))) as ex:
                        futures = {srv.name: ex.submit(self._snap_to, srv, taken[srv.name], n)
                                   for srv in servers if not srv.restarts_to_snapshot}
                        local = {srv.name: self._snap_to(srv, taken[srv.name], n)
                                 for srv in servers if srv.restarts_to_snapshot}
                        outcomes = [local[s.name] if s.name in local
                                    else futures[s.name].result() for s in servers]
                    for srv, (secs, err) in zip(list(servers), outcomes, strict=True):
                        if err:
                            self.note_skip(srv.name, f"snapshot create failed: {err}")
                            servers.remove(srv)
                            srv.close()
                            continue
                        if n > taken[srv.name]:
                            self.records.append({
                                "transport": transport, "workload": SNAPCOST,
                                "variant": f"take {n - taken[srv.name]} snapshots",
                                "server": srv.name, "pair": pair, "seconds": secs})
                        taken[srv.name] = n
                    for phase, args in phases:
                        for srv in servers:
                            self.measure(srv, args, transport=transport, workload=SNAPCOST,
                                         variant=f"{n} snapshots {phase}", pair=pair,
                                         timeout=300)
            finally:
                for srv in servers:
                    srv.close()
        for phase, args in phases:
            for n in self.args.snap_counts:
                self.table(transport, SNAPCOST, f"{n} snapshots {phase}",
                           f"first write to each 64 KiB chunk after {n} snapshots, {phase}",
                           args, "iops", peer_label="qcow2 internal snapshots")

    def _snapcost_warmup(self, srv: Server, used: int) -> None:
        """Writes into the volume's tail, past both measured regions, before the first phase:
        without them the 0-snapshot burst (the ratios' denominator) was a server's first
        writes after start and varied 1.7x between pairs (run 9: 37.6k..64.0k IOPS)."""
        spare = self.size - used
        if spare < MiB:
            return
        try:
            self.fio_run(srv, ["--rw=randwrite", "--bs=4k", "--iodepth=32", f"--offset={used}",
                               f"--size={spare}", f"--io_size={min(spare, 8 * MiB)}"],
                         timeout=60)
        except ServerError as e:
            log(f"  {srv.name} warm-up failed: {e}")

    @staticmethod
    def _snap_to(srv: Server, have: int, want: int) -> tuple[float, str]:
        t0 = time.monotonic()
        try:
            srv.take_snapshots([f"s{i}" for i in range(have + 1, want + 1)])
        except ServerError as e:
            return time.monotonic() - t0, str(e)
        return time.monotonic() - t0, ""

    def run_snapcreate(self, transport: str) -> None:
        if not self.jsnap_ok:
            log(f"[{transport}] {SNAPCREATE} skipped: jsnap only (qemu-nbd cannot snapshot "
                "live; no other peer has snapshots)")
            return
        servers: list[Server] = []
        try:
            self.bring_up([Jsnap(self, transport)], servers)
            if not servers:
                return
            srv = servers[0]
            # Interpreter start-up is inside every `snapshot create` wall time: measure it.
            startup = [self._wall([*srv.cli, "--help"]) for _ in range(3)]
            idle = [self._wall(srv.snapshot_cmd(f"idle{i}"), check=True) for i in range(5)]
            self.records.append({"transport": transport, "workload": SNAPCREATE,
                                 "variant": "idle", "server": srv.name,
                                 "cli_startup_ms": startup, "create_ms": idle})
            args = self.timed(["--rw=randwrite", "--bs=4k", "--iodepth=32"])
            rows = []
            for pair in range(self.pairs):
                self.settle(srv)
                rows.append(self._snapcreate_run(srv, args, transport, pair))
            self._snapcreate_table(transport, args, startup, idle, rows)
        except ServerError as e:
            self.note_skip("jsnap", f"{SNAPCREATE}: {e}")
        finally:
            for srv in servers:
                srv.close()

    @staticmethod
    def _admin_create(srv: Jsnap, name: str) -> float:
        """Wall ms of one snapshot create through the admin API of the running server."""
        from jsnap.admin import api as admin  # the installed jsnap's client for POOL/admin.sock

        t0 = time.perf_counter()
        admin.call(srv.pool, "POST", f"/v1/volumes/{EXPORT}/snapshots", {"name": name})
        return (time.perf_counter() - t0) * 1000

    def _wall(self, argv: list[str], check: bool = False) -> float:
        t0 = time.perf_counter()
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
        dt = (time.perf_counter() - t0) * 1000
        if check and cp.returncode != 0:
            raise ServerError(f"{shlex.join(argv[-4:])} exited {cp.returncode}: "
                              f"{cp.stderr.strip()[-200:]}")
        return dt

    def _snapcreate_run(self, srv: Jsnap, args: list[str], transport: str, pair: int) -> dict:
        out = os.path.join(self.workdir, f"fio-{next(self.fio_seq)}.json")
        cpu0 = tree_cpu_seconds(srv.pid)
        fio = subprocess.Popen(self.fio_argv(srv.uri(), args, out), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lat, errors = [], []
        try:
            t_start = time.monotonic()
            # Let the load reach steady state, stop before it winds down.
            time.sleep(min(1.0, self.runtime / 4))
            # One create every 0.1 s through the admin API (POST on POOL/admin.sock, what
            # an orchestrator does): the figure is the server's, without the ~0.15 s a
            # `jsnap snapshot create` process spends starting Python (measured apart above).
            i = 0
            t_next = time.monotonic()
            while time.monotonic() < t_start + self.runtime - min(0.5, self.runtime / 4):
                i += 1
                try:
                    lat.append(self._admin_create(srv, f"p{pair}-{i}"))
                except Exception as e:  # noqa: BLE001 - recorded and reported as a failure
                    errors.append(str(e))
                t_next += 0.1
                time.sleep(max(0.0, t_next - time.monotonic()))
            _, err = fio.communicate(timeout=self.runtime + 60)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        cpu1 = tree_cpu_seconds(srv.pid)
        rec = {"transport": transport, "workload": SNAPCREATE, "variant": "under QD32 load",
               "server": srv.name, "pair": pair, "fio_args": args, "create_ms": lat,
               "create_errors": errors}
        try:
            rec.update(self.fio_parse(out, fio.returncode, err))
            # includes the snapshot work the server did
            rec["server_cpu_s"] = cpu1[0] - cpu0[0]
            rec["server_cpu_s_ns"] = cpu1[1] - cpu0[1]
        except ServerError as e:
            rec["error"] = str(e)
            self.jsnap_failed.append(f"{SNAPCREATE} fio: {e}")
        if errors:
            self.jsnap_failed.append(f"{SNAPCREATE}: {len(errors)} snapshot creates failed: "
                                     f"{errors[0]}")
        if lat:
            rec["create_p50_ms"] = statistics.median(lat)
            rec["create_p99_ms"] = pct(lat, 99)
        self.records.append(rec)
        return rec

    # ---- output

    def table(self, transport: str, wl: str, variant: str, desc: str, fio_args: list[str],
              unit: str, peer_label: str = "") -> None:
        recs = [r for r in self.records if r["transport"] == transport and r["workload"] == wl
                and r["variant"] == variant and "ios" in r]
        order: list[str] = []
        for r in recs:
            if r["server"] not in order:
                order.append(r["server"])
        title = f"{wl}{' / ' + variant if variant else ''} [{transport}]: {desc}"
        log(f"\n== {title}")
        log(f"   fio {' '.join(fio_args)}; {self.pairs} pair(s)")
        fails = [r for r in self.records if r["transport"] == transport and r["workload"] == wl
                 and r["variant"] == variant and "error" in r]
        if not order:
            log("   no results" + (f": {fails[0]['error']}" if fails else ""))
            return
        base = next((s for s in order if s.startswith("jsnap")), None)
        note = ""
        if base is None:
            # jsnap skipped: still show ratios so the harness is checkable, against the first peer.
            base = order[0]
            note = f"  (jsnap absent: ratios are {base}/peer)"
        by = {s: {r["pair"]: r for r in recs if r["server"] == s} for s in order}
        key = "iops" if unit == "iops" else "mbps"
        head = "IOPS" if unit == "iops" else "MB/s"
        cached = any("cache" in r for r in recs)  # restart workloads: page cache around runs
        notes = {s: "; ".join((f"pair {p}: " if self.pairs > 1 else "") + r["cache"]["note"]
                              for p, r in by[s].items() if r.get("cache", {}).get("note"))
                 for s in order}
        rows = [["server", f"{head} median (min..max)", "p50 us", "p99 us", "CPU us/IO",
                 f"ratio {'jsnap' if base.startswith('jsnap') else base}/peer",
                 *(["cache before", "cache after", "page cache"] if cached else [])]]
        for s in order:
            rs = list(by[s].values())
            ratios = {}
            for k in (key, "p50_us", "p99_us", "cpu_us_per_io"):
                ratios[k] = [by[base][p][k] / r[k] for p, r in by[s].items()
                             if p in by[base] and r.get(k)]
            rows.append([s, fmt_mmm([r[key] for r in rs], unit),
                         fmt_mmm([r["p50_us"] for r in rs], "us"),
                         fmt_mmm([r["p99_us"] for r in rs], "us"),
                         fmt_mmm([r["cpu_us_per_io"] for r in rs], "us"),
                         "-" if s == base else fmt_mmm(ratios[key], "ratio")])
            if cached:
                rows[-1] += [fmt_mmm([r["cache"]["fraction_before"] for r in rs], "%"),
                             fmt_mmm([r["cache"]["fraction_after"] for r in rs], "%"),
                             notes[s] or f"as stated ({self.args.read_cache})"]
            if s != base:
                for k, label in ((key, head), ("p50_us", "p50 us"), ("p99_us", "p99 us"),
                                 ("cpu_us_per_io", "CPU us/IO")):
                    if not ratios[k]:
                        continue
                    lo, med, hi = mmm(ratios[k])
                    self.figures.append({
                        "transport": transport, "workload": wl, "variant": variant,
                        "metric": label, "base": base, "peer": s,
                        "base_median": statistics.median(r[k] for r in by[base].values()),
                        "peer_median": statistics.median(r[k] for r in rs),
                        "ratio_median": med, "ratio_min": lo, "ratio_max": hi,
                        "unit": unit if k == key else "us", "peer_label": peer_label,
                        "note": "; ".join(f"{n} {notes[n]}" for n in (base, s) if notes[n])})
        print_rows(rows)
        if note:
            log(note)
        for r in fails:
            log(f"   FAILED {r['server']} pair {r['pair']}: {r['error']}")

    def _snapcreate_table(self, transport: str, args: list[str], startup: list[float],
                          idle: list[float], rows: list[dict]) -> None:
        log(f"\n== {SNAPCREATE} [{transport}]: wall time of a snapshot create: idle rows "
            "through the CLI (process start-up included), loaded rows through the admin API")
        log(f"   load: fio {' '.join(args)}; {self.pairs} run(s)")
        good = [r for r in rows if r.get("create_ms")]
        table = [["condition", "p50 ms median (min..max)", "p99 ms", "creates", "load IOPS"],
                 ["CLI start-up (--help)", fmt_mmm(startup, "ms"), "-", str(len(startup)), "-"],
                 ["idle", fmt_num(statistics.median(idle), "ms"), fmt_num(pct(idle, 99), "ms"),
                  str(len(idle)), "-"],
                 ["under QD32 writes", fmt_mmm([r["create_p50_ms"] for r in good], "ms"),
                  fmt_mmm([r["create_p99_ms"] for r in good], "ms"),
                  str(sum(len(r["create_ms"]) for r in good)),
                  fmt_mmm([r["iops"] for r in rows if "iops" in r], "iops")]]
        print_rows(table)
        log("   p99 of a run is its worst create when a run has fewer than 100 creates")
        for label, vals in (("p50 ms", [r["create_p50_ms"] for r in good]),
                            ("p99 ms", [r["create_p99_ms"] for r in good])):
            if vals:
                lo, med, hi = mmm(vals)
                self.figures.append({"transport": transport, "workload": SNAPCREATE,
                                     "variant": "under QD32 load", "metric": label,
                                     "base": "jsnap", "peer": "", "base_median": med,
                                     "peer_median": None, "ratio_median": None,
                                     "ratio_min": lo, "ratio_max": hi, "unit": "ms",
                                     "peer_label": ""})

    def markdown(self) -> None:
        log("\n## Benchmark figures (markdown)\n")
        log(f"{self.pairs} pair(s) of {self.runtime:g} s runs, {fmt_size(self.size)} volumes, "
            f"medians of per-pair ratios. Generated by `python bench/run.py "
            f"{' '.join(sys.argv[1:])}`.\n")
        log("| figure | jsnap median | peer median | ratio median | ratio min..max |")
        log("|---|---:|---:|---:|---:|")
        for f in self.figures:
            wl = f["workload"] + (f" {f['variant']}" if f["variant"] else "")
            u = f["unit"]
            if f["peer"]:
                peer = f["peer"] + (f" ({f['peer_label']})" if f["peer_label"] else "")
                base = "" if f["base"].startswith("jsnap") else f" [{f['base']} as base]"
                note = f" ({f['note']})" if f.get("note") else ""
                log(f"| {wl} [{f['transport']}] {f['metric']} vs {peer}{base}{note} | "
                    f"{fmt_num(f['base_median'], u)} | {fmt_num(f['peer_median'], u)} | "
                    f"{f['ratio_median']:.2f} | {f['ratio_min']:.2f}..{f['ratio_max']:.2f} |")
            else:
                log(f"| {wl} [{f['transport']}] {f['metric']} | {fmt_num(f['base_median'], u)}"
                    f" | - | - | {fmt_num(f['ratio_min'], u)}..{fmt_num(f['ratio_max'], u)} |")

    def write_json(self, path: str) -> None:
        meta = {
            "argv": sys.argv, "size": self.size, "journal_size": self.journal_size,
            "runtime_s": self.runtime, "pairs": self.pairs,
            "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "workdir_fs": self.fstype},
            "tools": tool_versions(), "servers": self.servers_seen, "skipped": self.skipped,
            "jsnap_cmd": self.jsnap_argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(path, "w") as f:
            json.dump({"meta": meta, "runs": self.records, "figures": self.figures}, f,
                      indent=1)
        log(f"raw figures written to {path}")


def pct(vals: list[float], p: float) -> float:
    """Nearest-rank percentile: with few samples p99 is simply the worst one."""
    s = sorted(vals)
    k = max(0, min(len(s) - 1, -(-len(s) * p // 100) - 1))
    return s[int(k)]


def print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        log("   " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def tool_versions() -> dict:
    out = {}
    for name, argv in (("fio", ["fio", "--version"]), ("nbdkit", ["nbdkit", "--version"]),
                       ("qemu-nbd", ["qemu-nbd", "--version"]),
                       ("nbd-server", ["nbd-server", "-V"])):
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (cp.stdout + cp.stderr).strip().splitlines()
            out[name] = next((line for line in text if any(c.isdigit() for c in line)), "")
        except (OSError, subprocess.TimeoutExpired):
            out[name] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="jsnap vs nbdkit, qemu-nbd, nbd-server over NBD, driven by fio")
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                    help=f"comma list (default all): {', '.join(ALL_WORKLOADS)}")
    ap.add_argument("--runtime", type=float, help="seconds per timed run (default 10)")
    ap.add_argument("--pairs", type=int, help="A/B rounds per workload (default 3)")
    ap.add_argument("--size", type=parse_size, help="volume size per server (default 1G)")
    ap.add_argument("--journal-size", type=parse_size,
                    help="jsnap --journal-size for snapcost (default size/40, so its burst and "
                         "sustained writes each fit distinct 64 KiB chunks)")
    ap.add_argument("--transport", choices=["unix", "tcp", "both"], default="unix")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: runtime 2, pairs 1, size 256M, restart settle 1 s")
    ap.add_argument("--read-cache", choices=["warm", "cold"], default="warm",
                    help="restart workloads: page cache of every server's backing files when "
                         "it starts: warm (read whole) or cold (fsync + POSIX_FADV_DONTNEED)")
    ap.add_argument("--restart-settle", type=float,
                    help="restart workloads: seconds between a server accepting connections "
                         "and its read run (jsnap also drains its journal first) (default 3, "
                         "--quick: 1)")
    ap.add_argument("--snap-counts", help="snapcost snapshot counts (default 0,1,10,100; "
                    "--quick: 0,1,10 to keep it short)")
    ap.add_argument("--jsnap-cmd", help="command for jsnap, e.g. 'python -m jsnap' "
                    "(default: jsnap on PATH, else python -m jsnap from src/)")
    ap.add_argument("--json", metavar="OUT", help="write all raw figures as JSON")
    ap.add_argument("--markdown", action="store_true",
                    help="also print a table for BENCHMARKS.md")
    ap.add_argument("--workdir", help="parent of the temp dir for backing files (default $TMPDIR "
                    "or /tmp); must be on the disk, not tmpfs")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    ap.add_argument("--journal-dir", help="put each jsnap pool's journal in this directory, "
                    "on another device (jsnap init --journal-path); /dev/shm stands in for "
                    "NVRAM in an experiment, but is not durable")
    ap.add_argument("--volume-type", choices=["thin", "raw"], default="thin",
                    help="jsnap volume type (default thin, the CLI's default)")
    ap.add_argument("--chunk-size", type=parse_size, default=None,
                    help="jsnap init --chunk-size (default: jsnap's, 16K)")
    a = ap.parse_args(argv)
    q = a.quick
    a.runtime = a.runtime if a.runtime is not None else (2 if q else 10)
    a.pairs = a.pairs if a.pairs is not None else (1 if q else 3)
    a.size = a.size if a.size is not None else (256 * MiB if q else GiB)
    if a.restart_settle is None:
        a.restart_settle = 1 if q else 3
    if a.journal_size is None:
        a.journal_size = max(MiB, a.size // 40 // MiB * MiB)
    if a.runtime <= 0 or a.pairs < 1 or a.size < 16 * MiB or a.size % CHUNK \
            or a.restart_settle < 0:
        ap.error("need --runtime > 0, --pairs >= 1, --size >= 16M and a multiple of 64K, "
                 "--restart-settle >= 0")
    try:
        counts = (a.snap_counts.split(",") if a.snap_counts
                  else QUICK_SNAP_COUNTS if q else SNAP_COUNTS)
        a.snap_counts = sorted({int(c) for c in counts})
    except ValueError:
        ap.error(f"--snap-counts wants integers, e.g. 0,1,10,100, not {a.snap_counts!r}")
    if not a.snap_counts or a.snap_counts[0] < 0:
        ap.error("--snap-counts must be >= 0")
    wls = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in wls if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {', '.join(bad)}; choose from {', '.join(ALL_WORKLOADS)}")
    a.workload_list = wls
    return a


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. CI timeout) takes the same path as Ctrl-C, so servers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    b = Bench(args)
    t0 = time.monotonic()
    try:
        b.check_tools()
        b.resolve_jsnap()
        if not b.jsnap_ok:
            log(f"jsnap skipped: {b.skipped['jsnap']}; running the peers only")
        b.make_workdir()
        log(f"jsnap bench: {fmt_size(b.size)} volumes, runtime {b.runtime:g}s, {b.pairs} pair(s), "
            f"jsnap journal {fmt_size(b.journal_size)}, workdir {b.workdir} ({b.fstype})"
            + (f", jsnap journals in {args.journal_dir}" if args.journal_dir else ""))
        transports = ["unix", "tcp"] if args.transport == "both" else [args.transport]
        basic = [w for w in args.workload_list if w in BASIC or w in RESTART]
        for tr in transports:
            steps = [(b.run_basic, (tr, basic)) if basic else None,
                     (b.run_sync, (tr,)) if SYNC in args.workload_list else None,
                     (b.run_snapcost, (tr,)) if SNAPCOST in args.workload_list else None,
                     (b.run_snapcreate, (tr,)) if SNAPCREATE in args.workload_list else None,
                     (b.run_infront, (tr,)) if INFRONT in args.workload_list else None]
            for fn, fargs in filter(None, steps):
                t1 = time.monotonic()
                fn(*fargs)
                log(f"   ({time.monotonic() - t1:.0f}s; {time.monotonic() - t0:.0f}s so far)")
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130
    finally:
        if b.workdir and not args.keep:
            shutil.rmtree(b.workdir, ignore_errors=True)
        elif b.workdir:
            log(f"kept {b.workdir}")
    log("\nservers (as started):")
    for name, cmd in b.servers_seen.items():
        log(f"   {name}: {cmd}")
    for name, why in b.skipped.items():
        log(f"   {name}: skipped ({why})")
    if args.markdown:
        b.markdown()
    if args.json:
        b.write_json(args.json)
    log(f"done in {time.monotonic() - t0:.0f}s")
    if b.jsnap_failed:
        log("jsnap failures:\n   " + "\n   ".join(b.jsnap_failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
