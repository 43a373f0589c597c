"""Crash torture: an fsx-style random workload over NBD against a `jsnap serve` that is
SIGKILLed at random moments, checked byte for byte against an in-memory oracle.

    python tools/torture.py --rounds 50 --seed 1234 [--pool DIR] [--ops-per-round 40]
        [--volumes 2] [--durability writeback|sync] [--journal-size 2M] [--verbose]

Why it lives in tools/, outside the package: it is a test client (tests/torture/ runs it in
CI) and a drill run by hand for hours (docs/reliability.md), never part of a server. It uses
jsnap only as any client does (the `jsnap` command, NBD, the admin API), so it needs the
package importable (installed, or PYTHONPATH=src) and nothing in the package needs it.

Model
-----
One pool with a tiny journal (default 2 MiB, chunk 4K or 64K by seed) so that the journal
wraps, writers meet backpressure and the destager runs all the time. A real server process
(`python -m jsnap serve --socket POOL/nbd.sock`) serves K volumes (by default thin and raw
alternately: pool extents and maps, or a file each); the harness talks to it only through
its interfaces: NBD (`jsnap.stores.nbd_client`, one connection per volume) and the admin API
(`jsnap.admin.api.call`).

The oracle holds, per volume, a bytearray of what every *acknowledged* request left, and per
live snapshot the volume image at the moment its create was acknowledged. Each volume has its
own worker thread and connection, issuing one request at a time (writes 512 B-256 KiB at
sector-aligned offsets, FUA writes, write-zeroes with and without NO_HOLE, trims, flushes,
reads checked on the spot, reads of snapshot exports, and snapshot create / delete / rollback
of that volume through the admin API); it applies a request to its volume's oracle only once
the reply arrived. So the server sees concurrent requests (one per volume) while each volume
has at most one request in flight. Each round the main thread SIGKILLs the server at a chosen
moment while the workers keep going, restarts it on the same pool, and verifies every volume
and every snapshot export against the oracle.

Invariants checked after every kill (a SIGKILL is process death, not power loss: whatever the
server wrote to its files is kept, in both durability modes):
  T1  every acknowledged write, zero and trim is present: a volume reads exactly as the
      oracle, except the bytes of its one request in flight at the kill (sent, no reply),
      each of which may hold its old or its new value (a request may be split into several
      journal records, and a rollback rewrites chunk by chunk). The oracle is then resynced
      to what was read for exactly those bytes.
  T2  every snapshot whose create was acknowledged, and whose delete was not, exists and
      reads exactly its oracle image; a snapshot whose create or delete was in flight may or
      may not exist, and reads right if it does; no other snapshot exists.
  T3  the server never fails a valid request, never drops a connection it was not killed
      under, never stalls (no reply within STALL seconds), exits 0 on SIGTERM, and logs no
      traceback.
  T4  `jsnap check` finds the stopped pool consistent: at the end, and with --check after
      every kill (before the restart, so it also recovers a freshly killed pool).

Kill moments: at a random request of one volume ("random"), right after a burst of large
writes that fills the journal past its high-water mark, so the destager is mid-batch
("burst"), right after a snapshot delete that follows such a burst, so it dies mid-reclaim
("reclaim"), after the workers went quiet ("idle"); and some restarts are themselves killed
during recovery.

Reproducing: the seed fixes the pool layout and each round's request streams (volume v in
round r draws from Random(f"{seed}/{r}/{v}")); the kill lands at a wall-clock moment, so a
failure replays statistically, not exactly. A mismatch prints the round, seed, place, offset,
expected and found bytes (and which round/op wrote the found bytes: every written sector
starts with a stamp) and the volume's last requests in that round.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jsnap.admin import api as admin
from jsnap.errors import JsnapError
from jsnap.stores.nbd_client import NbdClient, NbdError
from jsnap.units import format_size, parse_size

SECTOR = 512
MAX_WRITE = 256 << 10
MAX_ZERO = 1 << 20
MAX_SNAPS = 4  # live snapshots per volume: bounds the verify reads per round
STALL = 30.0  # seconds without a reply that count as a hung server
START_TIMEOUT = 30.0
_STAMP = struct.Struct(">4sIII")  # b"JTS1", round, op, sector: opens every written sector
_STAMP_MAGIC = b"JTS1"
_NONZERO = bytes([0] + [1] * 255)  # bytes.translate table: 1 where a byte is non-zero
_MODES = ("random", "burst", "reclaim", "idle")
_MODE_WEIGHTS = (4, 2, 2, 1)


class HarnessError(Exception):
    """The harness cannot go on (the server did not start, a stop failed...)."""


class _Stop(Exception):
    """Ends the worker: the connection went away (the kill), or a failure was recorded."""


@dataclass
class Op:
    kind: str  # write zero trim flush read snapread snap snapdel rollback
    vol: str
    off: int = 0
    length: int = 0
    data: bytes = b""
    fua: bool = False
    no_hole: bool = False
    snap: str = ""
    index: int = 0

    def __str__(self) -> str:
        flags = "".join(f" {f}" for f, on in (("fua", self.fua), ("no_hole", self.no_hole)) if on)
        if self.kind in ("snap", "snapdel", "rollback"):
            return f"#{self.index} {self.kind} {self.vol}@{self.snap}"
        if self.kind == "flush":
            return f"#{self.index} flush"
        where = f"{self.vol}@{self.snap}" if self.snap else self.vol
        return f"#{self.index} {self.kind} {where} {self.off:#x}+{self.length}{flags}"


@dataclass
class VolumeModel:
    name: str
    data: bytearray
    snaps: dict[str, bytes] = field(default_factory=dict)  # creation order
    next_snap: int = 0


@dataclass
class Mismatch:
    round: int
    where: str
    offset: int
    expected: bytes
    found: bytes
    count: int
    note: str = ""


@dataclass
class _Stream:
    """One worker's round: the requests to one volume, at most one of them in flight."""
    round: int
    vol: str
    rng: random.Random
    nops: int
    killed: threading.Event  # shared by the round's streams
    trigger_at: int = -1  # after this request is acknowledged the kill may come
    forced: dict[int, str] = field(default_factory=dict)  # request kinds at fixed indices
    trigger: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    inflight: Op | None = None
    error: str | None = None
    verified: int = 0
    log: list[str] = field(default_factory=list)


def _stamped(rng: random.Random, rnd: int, op: int, off: int, n: int) -> bytes:
    """Random bytes whose every sector opens with (round, op, sector): found bytes can be
    traced to the request that wrote them."""
    buf = bytearray(rng.randbytes(n))
    for pos in range(0, n, SECTOR):
        _STAMP.pack_into(buf, pos, _STAMP_MAGIC, rnd, op, (off + pos) // SECTOR)
    return bytes(buf)


def _whose(sector: bytes) -> str:
    if len(sector) >= _STAMP.size and sector[:4] == _STAMP_MAGIC:
        _, rnd, op, sec = _STAMP.unpack_from(sector)
        return f"written by round {rnd} op #{op} for sector {sec}"
    return "zeroes" if not any(sector) else "no stamp"


def _diff_mask(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """An int with byte i = 1 where a[i] != b[i] (big endian): count and find in C speed."""
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return int.from_bytes(x.to_bytes(len(a), "big").translate(_NONZERO), "big")


def _first(mask: int, n: int) -> int:
    return mask.to_bytes(n, "big").find(1)


class ServerProcess:
    """`python -m jsnap -p POOL serve --socket SOCK`, its log appended to one file."""

    def __init__(self, pool: str, sock: str, log: str) -> None:
        self.pool, self.sock, self.log = pool, sock, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    def spawn(self) -> None:
        with open(self.log, "ab") as f:
            self._log_from = f.tell()
            cmd = [sys.executable, "-m", "jsnap", "-p", self.pool, "serve",
                   "--socket", self.sock, "--log-level", "info"]
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def wait_ready(self) -> bytes:
        """Wait for the serving line; return this start's log so far."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(self.log, "rb") as f:
                f.seek(self._log_from)
                text = f.read()
            if b"jsnap: serving" in text:
                return text
            if self.proc.poll() is not None:
                raise HarnessError(f"jsnap serve exited {self.proc.returncode} before serving:"
                                   f"\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise HarnessError(f"jsnap serve not ready after {START_TIMEOUT} s\n{self.tail()}")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM, wait: the exit code (a clean stop must give 0)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError(f"jsnap serve ignored SIGTERM for {START_TIMEOUT} s") from None

    def tail(self, n: int = 30) -> str:
        with open(self.log, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")


class Torture:
    def __init__(self, pool: str, *, seed: int, rounds: int = 20, ops_per_round: int = 40,
                 volumes: int = 2, volume_size: int = 4 << 20, durability: str = "writeback",
                 journal_size: str = "2M", chunk_size: str | None = None,
                 volume_kind: str = "mixed", check: bool = False,
                 journal_path: str | None = None, data_path: str | None = None,
                 snapshot_path: str | None = None, verbose: bool = False) -> None:
        self.pool = os.path.abspath(pool)
        self.seed = seed
        self.rounds = rounds
        self.ops_per_round = max(1, ops_per_round)
        self.volume_size = volume_size
        self.durability = durability
        self.journal_size = journal_size
        # Where init puts the stores (block devices, say): --journal-path, --data-path,
        # --snapshot-path.
        self.stores = {opt: path for opt, path in (("--journal-path", journal_path),
                                                   ("--data-path", data_path),
                                                   ("--snapshot-path", snapshot_path))
                       if path}
        self.chunk_size = chunk_size or random.Random(seed).choice(["4K", "64K"])
        self.volume_kind = volume_kind
        self.check = check
        # mixed: v0, v2, ... thin (pool extents, maps), v1, v3, ... raw (a file each);
        # nbd: raw, each on an nbdkit file export the harness keeps up (volume create --nbd)
        self.thin = {f"v{i}": volume_kind == "thin" or (volume_kind == "mixed" and i % 2 == 0)
                     for i in range(volumes)}
        self.backends: list[subprocess.Popen[bytes]] = []
        self.verbose = verbose
        self.sock = os.path.join(self.pool, "nbd.sock")
        self.server = ServerProcess(self.pool, self.sock, os.path.join(self.pool, "serve.log"))
        self.vols = {f"v{i}": VolumeModel(f"v{i}", bytearray(volume_size))
                     for i in range(volumes)}
        self.done_rounds = 0
        self.kills = 0
        self.verified = 0
        self.lost = 0
        self.mismatches: list[Mismatch] = []
        self.failures: list[str] = []
        self.outcomes: Counter[str] = Counter()  # how in-flight requests turned out
        self._lock = threading.Lock()
        self.replayed: list[int] = []  # journal records replayed at each restart after a kill

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """A fresh pool (the CLI's init), the server, empty volumes (the admin API)."""
        p = subprocess.run([sys.executable, "-m", "jsnap", "init", self.pool, "--journal-size",
                            self.journal_size, "--chunk-size", self.chunk_size,
                            "--durability", self.durability,
                            *[x for kv in self.stores.items() for x in kv]],
                           capture_output=True, text=True)
        if p.returncode:
            raise HarnessError(f"jsnap init failed: {p.stderr.strip()}")
        self.server.spawn()
        try:
            self.server.wait_ready()
            for vm in self.vols.values():
                body: dict[str, Any] = {"name": vm.name, "size": self.volume_size,
                                        "thin": self.thin[vm.name]}
                if self.volume_kind == "nbd":
                    body["device"] = self._backend(vm.name)
                self._admin("POST", "/v1/volumes", body)
        except (HarnessError, OSError, JsnapError, http.client.HTTPException,
                admin.ServerNotRunning) as e:
            self.server.kill()
            raise HarnessError(f"setup failed: {type(e).__name__}: {e}") from e

    def _backend(self, name: str) -> str:
        """An nbdkit file export of the volume's size, zeroed, started here and kept up
        while jsnap is killed; its URI."""
        exe = shutil.which("nbdkit")
        if exe is None:
            raise HarnessError("--volume-kind nbd needs nbdkit (apt-get install nbdkit)")
        image = os.path.join(self.pool, f"{name}.backend.raw")
        with open(image, "wb") as f:
            f.truncate(self.volume_size)
        sock = os.path.join(self.pool, f"{name}.backend.sock")
        with open(os.path.join(self.pool, f"{name}.backend.log"), "ab") as log:
            proc = subprocess.Popen([exe, "-f", "-U", sock, "file", image],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.backends.append(proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"nbdkit for {name} did not start")
            time.sleep(0.02)
        return f"nbd+unix:///?socket={sock}"

    def close_backends(self) -> None:
        for proc in self.backends:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return admin.call(self.pool, method, path, body, timeout=STALL)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Every round, then a clean stop and restart checked once more; the exit code."""
        try:
            for r in range(self.done_rounds, self.rounds):
                if self.failed:
                    break
                self.run_round(r)
            if not self.failed:
                # A clean stop must exit 0 and lose nothing either.
                self._stop_cleanly()
                self.server.spawn()
                self.server.wait_ready()
                self.verify(self.rounds)
                self._stop_cleanly()
                self.offline_check("after the last clean stop")
        except (HarnessError, OSError, NbdError, JsnapError, http.client.HTTPException,
                admin.ServerNotRunning) as e:  # the server died or refused under the checks
            self.failures.append(f"round {self.done_rounds} (seed {self.seed}): "
                                 f"{type(e).__name__}: {e}\n{self.server.tail()}")
        finally:
            self.server.kill()
        self._check_log()
        return 1 if self.failed else 0

    def _stop_cleanly(self) -> None:
        rc = self.server.stop()
        if rc != 0:
            raise HarnessError(f"jsnap serve exited {rc} on SIGTERM")

    def offline_check(self, when: str) -> None:
        """`jsnap check` on the stopped pool (it recovers the pool itself, then checks thin
        maps, extents and store slots): consistency that reading data back cannot see,
        e.g. an extent owned twice or leaked."""
        p = subprocess.run([sys.executable, "-m", "jsnap", "-p", self.pool, "check"],
                           capture_output=True, text=True, timeout=START_TIMEOUT)
        if p.returncode == 2 and "invalid choice" in p.stderr:
            return  # a jsnap without the check command
        if p.returncode != 0:
            self.failures.append(f"jsnap check {when} (seed {self.seed}) exited "
                                 f"{p.returncode}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")

    @property
    def failed(self) -> bool:
        return bool(self.lost or self.mismatches or self.failures)

    def run_round(self, r: int) -> None:
        """One worker per volume (so several requests are in flight at once, one per volume),
        a SIGKILL at the round's chosen moment, a restart, the checks."""
        rng = random.Random(f"{self.seed}/{r}")
        mode = rng.choices(_MODES, _MODE_WEIGHTS)[0]
        killed = threading.Event()
        per = max(1, self.ops_per_round // len(self.vols))
        streams = {name: _Stream(r, name, random.Random(f"{self.seed}/{r}/{name}"),
                                 rng.randint(max(1, per // 2), per), killed)
                   for name in sorted(self.vols)}
        st = streams[rng.choice(sorted(streams))]  # the stream whose progress sets the kill
        st.trigger_at, delay = rng.randrange(st.nops), rng.uniform(0, 0.004)
        if mode in ("burst", "reclaim"):
            # Enough large writes to fill half the journal: the destager is mid-batch.
            burst = rng.randint(6, 16)
            st.trigger_at = rng.randrange(st.nops // 2 + 1) + burst + 1
            st.nops = st.trigger_at + rng.randint(2, 8)  # the worker goes on past the kill
            for i in range(st.trigger_at - burst, st.trigger_at + 1):
                st.forced[i] = "bigwrite"
            delay = rng.uniform(0, 0.002)
            if mode == "reclaim":
                # A snapshot, writes that make the destager preserve chunks for it, its
                # delete: the kill lands while the delete's slots are being reclaimed.
                st.forced[st.trigger_at - burst - 1] = "snap"
                st.forced[st.trigger_at] = "snapdel"
                delay = rng.uniform(0, 0.02)
        elif mode == "idle":
            st.trigger_at, delay = st.nops - 1, rng.uniform(0, 0.6)
        clients = {name: NbdClient(self.sock, name, timeout=STALL) for name in streams}
        workers = {name: threading.Thread(target=self._work, args=(s, clients[name]),
                                          daemon=True, name=f"torture-{r}-{name}")
                   for name, s in streams.items()}
        t0 = time.monotonic()
        for w in workers.values():
            w.start()
        if not st.trigger.wait(STALL + 5):
            st.error = st.error or f"no progress for {STALL + 5:.0f} s at {st.inflight}"
        if mode == "idle":
            for w in workers.values():
                w.join(STALL + 5)
        time.sleep(delay)
        killed.set()  # before the kill: a connection lost after it is the kill's doing
        self.server.kill()
        self.kills += 1
        for w in workers.values():
            w.join(STALL + 5)
        for c in clients.values():
            c.sock.close()
        for name, s in streams.items():
            if s.error is None and workers[name].is_alive():
                s.error = f"worker stuck after the kill, at {s.inflight}"
            self.verified += s.verified
            if s.error:
                self.failures.append(f"round {r} (seed {self.seed}) {s.vol}: {s.error}\n"
                                     + self._recent(s))
        if self.check:
            self.offline_check(f"after the kill of round {r}")
        self._restart(rng)
        self.verify(r, {s.vol: s.inflight for s in streams.values()})
        self.done_rounds = r + 1
        if self.verbose:
            print(f"round {r} mode={mode} {time.monotonic() - t0:.2f}s", "  ".join(
                f"{s.vol}: ops={s.done}/{s.nops} snaps={len(self.vols[s.vol].snaps)} "
                f"inflight={s.inflight or '-'}" for s in streams.values()), flush=True)

    def _restart(self, rng: random.Random) -> None:
        if rng.random() < 0.1:  # kill a recovery too: the next one recovers a recovery
            self.server.spawn()
            time.sleep(rng.uniform(0.05, 0.4))
            self.server.kill()
            self.kills += 1
        self.server.spawn()
        m = re.search(rb"replayed (\d+) journal records", self.server.wait_ready())
        # Evidence the kills land with work pending: records the destager had not finished.
        self.replayed.append(int(m.group(1)) if m else -1)

    def _recent(self, st: _Stream, n: int = 12) -> str:
        lines = st.log[-n:] + ([f"in flight: {st.inflight}"] if st.inflight else [])
        return "last requests of the round on that volume:\n  " + "\n  ".join(lines)

    # -- the workers ------------------------------------------------------------------------

    def _work(self, st: _Stream, client: NbdClient) -> None:
        try:
            for i in range(st.nops):
                op = self._next_op(st, i)
                st.inflight = op
                self._execute(st, op, client)
                self._apply(op)
                st.log.append(str(op))
                st.inflight = None
                st.done = i + 1
                if i == st.trigger_at:
                    st.trigger.set()
                if st.error:
                    return
        except _Stop:
            pass
        except Exception as e:  # a harness bug must still end the round with a report
            st.error = f"worker failed: {type(e).__name__}: {e}"
        finally:
            st.trigger.set()

    def _next_op(self, st: _Stream, i: int) -> Op:
        rng = st.rng
        kind = st.forced.get(i) or rng.choices(
            ["write", "zero", "trim", "flush", "read", "snapread", "snap", "snapdel",
             "rollback"], [48, 8, 7, 5, 6, 3, 6, 4, 2])[0]
        vm, size = self.vols[st.vol], self.volume_size
        op = Op(kind, st.vol, index=i)
        if kind in ("snapdel", "rollback", "snapread") and not vm.snaps:
            kind = op.kind = "snap" if kind == "snapdel" else "write"
        if kind == "snap" and len(vm.snaps) >= MAX_SNAPS:
            kind = op.kind = "snapdel"
        if kind in ("snapdel", "rollback", "snapread"):
            op.snap = rng.choice(list(vm.snaps))
        if kind == "snap":
            op.snap = f"s{vm.next_snap}"
            vm.next_snap += 1
        if kind in ("write", "bigwrite", "zero", "trim", "read", "snapread"):
            align = SECTOR
            if kind == "bigwrite" and rng.random() < 0.5:
                # whole chunks, 64 KiB or more: thin volumes take the REMAP path
                align = parse_size(self.chunk_size)
                n = rng.randrange(max(64 << 10, align), 2 * MAX_WRITE + 1, align)
            elif kind == "bigwrite":
                n = rng.randrange(64 << 10, MAX_WRITE + 1, SECTOR)
            else:
                top = MAX_ZERO if kind in ("zero", "trim") else MAX_WRITE
                n = rng.choice([rng.randrange(SECTOR, 8192 + 1, SECTOR),
                                rng.randrange(SECTOR, 65536 + 1, SECTOR),
                                rng.randrange(SECTOR, top + 1, SECTOR)])
            op.off = rng.randrange(0, size - n + 1, align)
            op.length = n
            op.fua = kind not in ("read", "snapread") and rng.random() < 0.15
            op.no_hole = kind == "zero" and rng.random() < 0.5
            if kind in ("write", "bigwrite"):
                op.kind = "write"
                op.data = _stamped(rng, st.round, i, op.off, n)
        return op

    def _execute(self, st: _Stream, op: Op, c: NbdClient) -> None:
        """One request, its reply awaited. Connection loss after the kill raises _Stop;
        anything else wrong (an error reply, a timeout, a loss before the kill) is T3."""
        path = f"/v1/volumes/{op.vol}/snapshots"
        try:
            if op.kind == "write":
                c.pwrite(op.data, op.off, fua=op.fua)
            elif op.kind == "zero":
                c.zero(op.length, op.off, fua=op.fua, no_hole=op.no_hole)
            elif op.kind == "trim":
                c.trim(op.length, op.off, fua=op.fua)
            elif op.kind == "flush":
                c.flush()
            elif op.kind == "read":
                got = c.pread(op.length, op.off)
                want = bytes(self.vols[op.vol].data[op.off : op.off + op.length])
                st.verified += op.length
                if got != want:
                    self._compare(st.round, op.vol, op.off, want, got, note=f"live read {op}")
                    st.error = f"live read mismatch: {op}"
            elif op.kind == "snapread":
                with NbdClient(self.sock, f"{op.vol}@{op.snap}", timeout=STALL) as sc:
                    got = sc.pread(op.length, op.off)
                want = self.vols[op.vol].snaps[op.snap][op.off : op.off + op.length]
                st.verified += op.length
                if got != want:
                    self._compare(st.round, f"{op.vol}@{op.snap}", op.off, want, got,
                                  note=f"live read {op}")
                    st.error = f"live snapshot read mismatch: {op}"
            elif op.kind == "snap":
                self._admin("POST", path, {"name": op.snap})
            elif op.kind == "snapdel":
                self._admin("DELETE", f"{path}/{op.snap}")
            elif op.kind == "rollback":
                self._admin("POST", f"{path}/{op.snap}/rollback")
        except (TimeoutError, NbdError, JsnapError) as e:
            st.error = f"{op} failed: {type(e).__name__}: {e}"
            raise _Stop from e
        except (OSError, http.client.HTTPException, admin.ServerNotRunning) as e:
            if not st.killed.is_set():
                st.error = f"connection lost before any kill, at {op}: {type(e).__name__}: {e}"
            raise _Stop from e

    def _apply(self, op: Op) -> None:
        """The request was acknowledged: the oracle takes its effect."""
        vm = self.vols[op.vol]
        if op.kind == "write":
            vm.data[op.off : op.off + op.length] = op.data
        elif op.kind in ("zero", "trim"):
            vm.data[op.off : op.off + op.length] = bytes(op.length)
        elif op.kind == "snap":
            vm.snaps[op.snap] = bytes(vm.data)
        elif op.kind == "snapdel":
            del vm.snaps[op.snap]
        elif op.kind == "rollback":
            vm.data[:] = vm.snaps[op.snap]

    # -- verification -----------------------------------------------------------------------

    def verify(self, r: int, inflight: dict[str, Op | None] | None = None) -> None:
        """T1 and T2 against the restarted server; resync the in-flight request's bytes."""
        listed = self._admin("GET", "/v1/snapshots")
        present: dict[str, set[str]] = {name: set() for name in self.vols}
        for s in listed:
            if s["volume"] not in present:
                self.failures.append(f"round {r}: unexpected volume {s['volume']!r}")
                continue
            present[s["volume"]].add(s["name"])
        for vm in self.vols.values():
            self._verify_volume(r, vm, (inflight or {}).get(vm.name), present[vm.name])

    def _verify_volume(self, r: int, vm: VolumeModel, fl: Op | None,
                       present: set[str]) -> None:
        expected = dict(vm.snaps)  # acknowledged and live: must exist
        optional: dict[str, bytes] = {}  # create or delete in flight: may exist
        if fl is not None and fl.kind == "snap":
            optional[fl.snap] = bytes(vm.data)
        if fl is not None and fl.kind == "snapdel":
            optional[fl.snap] = expected.pop(fl.snap)
        for name in expected:
            if name not in present:
                self.lost += self.volume_size
                self.failures.append(f"round {r} (seed {self.seed}): snapshot {vm.name}@{name}"
                                     f" was acknowledged but is gone after the restart")
        for name in sorted(present - set(expected) - set(optional)):
            self.failures.append(f"round {r} (seed {self.seed}): unexpected snapshot "
                                 f"{vm.name}@{name}")
        with NbdClient(self.sock, vm.name, timeout=STALL) as c:
            found = c.pread(self.volume_size, 0)
        self.verified += len(found)
        lo, hi, new = 0, 0, b""
        if fl is not None and fl.kind in ("write", "zero", "trim"):
            lo, hi = fl.off, fl.off + fl.length
            new = fl.data if fl.kind == "write" else bytes(fl.length)
        elif fl is not None and fl.kind == "rollback":
            lo, hi, new = 0, self.volume_size, vm.snaps[fl.snap]
        note = f"after the kill{f', {fl} in flight' if fl else ''}"
        self._compare(r, vm.name, 0, vm.data[:lo], found[:lo], note=note)
        self._compare(r, vm.name, hi, vm.data[hi:], found[hi:], note=note)
        outcome = ""
        if hi > lo:
            outcome = self._compare_maybe(r, vm.name, lo, vm.data[lo:hi], new, found[lo:hi], fl)
            vm.data[lo:hi] = found[lo:hi]  # resync: either value was right
        elif fl is not None and fl.kind in ("snap", "snapdel"):
            outcome = "exists" if fl.snap in present else "absent"
        if fl is not None:
            self.outcomes[f"{fl.kind}:{outcome or 'no effect'}"] += 1
        kept: dict[str, bytes] = {}
        for name, image in list(vm.snaps.items()) + [
                (n, i) for n, i in optional.items() if n not in vm.snaps]:
            if name not in present:
                continue
            with NbdClient(self.sock, f"{vm.name}@{name}", timeout=STALL) as c:
                got = c.pread(self.volume_size, 0)
            self.verified += len(got)
            self._compare(r, f"{vm.name}@{name}", 0, image, got, note=note)
            kept[name] = image
        vm.snaps = kept

    def _compare(self, r: int, where: str, off: int, want: bytes | bytearray,
                 got: bytes | bytearray, note: str = "") -> None:
        if want == got:
            return
        n = min(len(want), len(got))
        mask = _diff_mask(want[:n], got[:n])
        count = mask.bit_count() + abs(len(want) - len(got))
        i = _first(mask, n) if mask else n
        self._mismatch(r, where, off, i, want, got, count, note)

    def _compare_maybe(self, r: int, where: str, off: int, old: bytes | bytearray,
                       new: bytes, got: bytes, fl: Op | None) -> str:
        """T1 for the in-flight request's bytes: each holds its old or its new value."""
        if got == new:
            return "landed"
        if got == old:
            return "not landed"
        bad = _diff_mask(old, got) & _diff_mask(new, got)
        if not bad:
            return "partly landed"
        count = bad.bit_count()
        i = _first(bad, len(got))
        self._mismatch(r, where, off, i, new, got, count,
                       f"{fl} was in flight: neither old ({bytes(old[i:i + 16]).hex(' ')}) "
                       f"nor new")
        return "MISMATCH"

    def _mismatch(self, r: int, where: str, base: int, i: int, want: bytes | bytearray,
                  got: bytes | bytearray, count: int, note: str) -> None:
        """Count `count` lost bytes; keep the place of the first at `i` (live reads call this
        from worker threads, hence the lock)."""
        sec = i - i % SECTOR
        m = Mismatch(
            r, where, base + i, bytes(want[i : i + 16]), bytes(got[i : i + 16]), count,
            f"{note}; found sector: {_whose(bytes(got[sec : sec + SECTOR]))}, expected "
            f"sector: {_whose(bytes(want[sec : sec + SECTOR]))}")
        with self._lock:
            self.lost += count
            self.mismatches.append(m)

    def _check_log(self) -> None:
        try:
            with open(self.server.log, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return
        if "Traceback" in text:
            at = text.index("Traceback")
            self.failures.append(f"the server log shows a traceback:\n{text[at:at + 3000]}")

    # -- report -----------------------------------------------------------------------------

    def summary(self) -> str:
        return (f"rounds={self.done_rounds} kills={self.kills} verified_bytes={self.verified} "
                f"lost={self.lost}")

    def report(self) -> str:
        """The first mismatch and the first failure, with what it takes to rerun."""
        out = []
        if self.mismatches:
            m = self.mismatches[0]
            out.append(f"MISMATCH round={m.round} seed={self.seed} {m.where} "
                       f"offset={m.offset:#x} ({m.count} bytes differ; {len(self.mismatches)}"
                       f" mismatching range(s) in all)\n"
                       f"  expected {m.expected.hex(' ')}\n  found    {m.found.hex(' ')}\n"
                       f"  {m.note}")
        if self.failures:
            out.append(f"FAILURE {self.failures[0]}")
        if out:
            out.append(f"rerun: python tools/torture.py --seed {self.seed} --rounds "
                       f"{self.rounds} --ops-per-round {self.ops_per_round} --volumes "
                       f"{len(self.vols)} --volume-size {self.volume_size} --volume-kind "
                       f"{self.volume_kind} --durability "
                       f"{self.durability} --journal-size {self.journal_size} --chunk-size "
                       f"{self.chunk_size}"
                       + "".join(f" {opt} {path}" for opt, path in self.stores.items())
                       + f"  (pool kept at {self.pool}, server log "
                       f"{self.server.log})")
        return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/torture.py",
                                description="SIGKILL torture of jsnap serve, checked "
                                            "byte for byte against an oracle.")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--pool", help="pool directory to create (default: a temporary one, "
                                  "removed unless the run fails)")
    p.add_argument("--ops-per-round", type=int, default=40)
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--volume-size", type=parse_size, default=4 << 20)
    p.add_argument("--volume-kind", choices=("mixed", "thin", "raw", "nbd"), default="mixed",
                   help="mixed (default): even-numbered volumes thin, odd ones raw; nbd: "
                        "each on an nbdkit export of its own (volume create --nbd)")
    p.add_argument("--durability", choices=("writeback", "sync"), default="writeback")
    p.add_argument("--journal-size", default="2M")
    p.add_argument("--chunk-size", default=None, help="4K..1M (default: 4K or 64K by seed)")
    p.add_argument("--journal-path", help="put the journal there, e.g. a block device "
                                          "(init --journal-path; the store kinds differ)")
    p.add_argument("--data-path", help="the thin pool's data there (init --data-path: a "
                                       "block device, say)")
    p.add_argument("--snapshot-path", help="the raw volumes' snapshot store there (init "
                                           "--snapshot-path: a block device, say)")
    p.add_argument("--check", action="store_true",
                   help="also run `jsnap check` on the pool after every kill (slower)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    if args.pool and os.path.exists(args.pool) and os.listdir(args.pool):
        p.error(f"--pool {args.pool} exists and is not empty")
    tmp = None if args.pool else tempfile.mkdtemp(prefix="jsnap-torture-")
    pool = args.pool or os.path.join(tmp or "", "pool")
    t = Torture(pool, seed=seed, rounds=args.rounds, ops_per_round=args.ops_per_round,
                volumes=args.volumes, volume_size=args.volume_size,
                durability=args.durability, journal_size=args.journal_size,
                chunk_size=args.chunk_size, volume_kind=args.volume_kind,
                check=args.check, journal_path=args.journal_path, data_path=args.data_path,
                snapshot_path=args.snapshot_path, verbose=args.verbose)
    print(f"jsnap torture: seed={seed} rounds={args.rounds} durability={args.durability} "
          f"journal={args.journal_size} chunk={t.chunk_size} volumes={args.volumes}x"
          f"{format_size(args.volume_size)} {args.volume_kind} pool={pool}", flush=True)
    t0 = time.monotonic()
    try:
        t.setup()
    except HarnessError as e:
        t.failures.append(str(e))
        rc = 1
    else:
        rc = t.run()
    finally:
        t.close_backends()
    if args.verbose:
        busy = [n for n in t.replayed if n > 0]
        print(f"in-flight outcomes: {dict(sorted(t.outcomes.items()))}", flush=True)
        print(f"restarts replaying journal records: {len(busy)} of {len(t.replayed)} (max "
              f"{max(busy, default=0)}); {time.monotonic() - t0:.1f} s", flush=True)
    if rc:
        print(t.report(), flush=True)
    elif tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(t.summary(), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
