"""Helpers for the interop suite: a real `jsnap serve` process driven by real NBD clients.

`JsnapServer` (made by the `jsnap_server` factory fixture in conftest.py) is one pool in
tmp_path, initialised with the CLI, and the `python -m jsnap -p POOL serve --socket PATH
[--listen 127.0.0.1:0]` process on it, started once its "jsnap: serving" line is out. It
knows the pool, the socket, the TCP port (when asked for), builds URIs, runs CLI commands
and admin-socket requests against the live pool, and can be stopped (a signal), killed and
restarted on the same pool. `start(faults=RULES)` and `cli(..., faults=RULES)` run the
command through tools/faulty_jsnap.py instead, so the pool's files fail as RULES say
(tools/faults.py).

At teardown every server still running gets SIGTERM and must exit 0 within the timeout
(a test that killed its server, or expects another code, says so with `srv.kill()` or
`srv.stop(expect_rc=None)`). A failing test gets each server's log appended to its report.

External clients: `libnbd` belongs to Debian's /usr/bin/python3 (LIBNBD_PYTHON), so libnbd
scripts run as subprocesses of that interpreter (`run_libnbd`).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FAULTY_JSNAP = HERE.parent.parent / "tools" / "faulty_jsnap.py"
LIBNBD_PYTHON = "/usr/bin/python3"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 30.0


def _load_top_conftest():
    # tests/conftest.py is not a package module and "conftest" is ambiguous here: load it by path.
    spec = importlib.util.spec_from_file_location("_jsnap_tests_conftest",
                                                  HERE.parent / "conftest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


require_tool: Callable[[str], str] = _load_top_conftest().require_tool


def require_libnbd_python() -> str:
    """Debian's python3 with the `nbd` module; skip (or fail in CI) when missing."""
    require_tool("nbdsh")  # same package family; gives the CI-aware skip/fail message
    try:
        ok = subprocess.run([LIBNBD_PYTHON, "-c", "import nbd"], capture_output=True,
                            timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        if os.environ.get("JSNAP_REQUIRE_TOOLS"):
            pytest.fail(f"{LIBNBD_PYTHON} cannot import nbd (python3-libnbd) but CI requires it")
        pytest.skip(f"{LIBNBD_PYTHON} cannot import nbd (install python3-libnbd)")
    return LIBNBD_PYTHON


def jsnap_command(faults: str | None = None) -> list[str]:
    """The command line that runs `jsnap`: `python -m jsnap`, or, with fault RULES, the
    launcher that runs it with those faults injected."""
    if faults is None:
        return [sys.executable, "-m", "jsnap"]
    return [sys.executable, str(FAULTY_JSNAP), faults, "--"]


def run(cmd: list[str], *, timeout: float = 60.0, check: bool = True,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client tool; on an unexpected exit code fail with its output."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                    f"stderr:\n{p.stderr}")
    return p


def run_libnbd(script: str, *args: str, timeout: float = 60.0,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a Python script with libnbd's interpreter (`sys.argv[1:]` = args)."""
    py = require_libnbd_python()
    return run([py, "-c", script, *args], timeout=timeout, check=check)


def run_libnbd_json(script: str, *args: str, timeout: float = 60.0):
    """Run a libnbd script whose last stdout line is JSON; return it decoded."""
    p = run_libnbd(script, *args, timeout=timeout)
    lines = p.stdout.strip().splitlines()
    assert lines, f"libnbd script printed nothing; stderr:\n{p.stderr}"
    return json.loads(lines[-1])


class JsnapServer:
    """One pool and the `jsnap serve` process on it (with `pool` and `owner`: the process
    serving that owner's volumes of another server's pool)."""

    def __init__(self, base: Path, *, tcp: bool = False, pool: str | None = None,
                 owner: str = "") -> None:
        self.base = base
        self.pool = pool or str(base / "pool")
        self.owner = owner
        self.socket = str(base / "nbd.sock")
        self.tcp = tcp
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.logs: list[Path] = []
        self.expect_rc: int | None = 0
        self.returncodes: list[int] = []

    # -- CLI ----------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT,
            faults: str | None = None) -> subprocess.CompletedProcess[str]:
        """`python -m jsnap -p POOL ARGS...` (through the admin socket while serving; with
        `faults`, through tools/faulty_jsnap.py)."""
        cmd = [*jsnap_command(faults), "-p", self.pool, *self._owner_args(), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            pytest.fail(f"jsnap {' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                        f"stderr:\n{p.stderr}\nserver log:\n{self.log_text()}")
        return p

    def admin(self, method: str, path: str, body: dict | None = None) -> object:
        """One request to the live server's admin API (HTTP + JSON on POOL/admin.sock), made
        here rather than through the CLI: no process start-up inside a timed window."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CLI_TIMEOUT)
        sock.connect(os.path.join(self.pool, f"admin.{self.owner}.sock" if self.owner
                                  else "admin.sock"))
        conn = http.client.HTTPConnection("localhost", timeout=CLI_TIMEOUT)
        conn.sock = sock
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, f"admin {method} {path}: {resp.status} {payload!r}"
        return json.loads(payload or b"null")

    def _owner_args(self) -> list[str]:
        return ["--owner", self.owner] if self.owner else []

    def init(self, journal_size: str, durability: str, chunk_size: str | None,
             pool_size: str | None = None) -> None:
        cmd = [sys.executable, "-m", "jsnap", "init", self.pool, "--journal-size", journal_size,
               "--durability", durability]
        if chunk_size:
            cmd += ["--chunk-size", chunk_size]
        if pool_size:
            cmd += ["--pool-size", pool_size]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if p.returncode != 0:
            pytest.fail(f"jsnap init failed ({p.returncode}): {p.stderr}")

    # -- addresses ----------------------------------------------------------------------------

    def uri(self, export: str = "", *, tcp: bool = False) -> str:
        if tcp:
            assert self.port is not None, "server was started without TCP"
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.socket}"

    # -- process ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *extra: str, faults: str | None = None) -> JsnapServer:
        """Start `jsnap serve` (with `faults`: through tools/faulty_jsnap.py, so the pool's
        files fail as those rules say) and wait for its readiness line."""
        assert not self.running, "server already running"
        log = self.base / f"serve-{self.starts}.log"
        self.starts += 1
        self.logs.append(log)
        cmd = [*jsnap_command(faults), "-p", self.pool, *self._owner_args(), "serve",
               "--socket", self.socket, *extra]
        if self.tcp:
            cmd += ["--listen", "127.0.0.1:0"]  # the kernel picks a free port; the log names it
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.expect_rc = 0
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = log.read_text(errors="replace")
            if "jsnap: serving" in text and os.path.exists(self.socket):
                break
            if self.proc.poll() is not None:
                pytest.fail(f"jsnap serve exited {self.proc.returncode} before serving:\n{text}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"jsnap serve not ready after {START_TIMEOUT} s:\n{text}")
            time.sleep(0.02)
        if self.tcp:
            m = re.search(r"nbd://127\.0\.0\.1:(\d+)", text)
            assert m, f"no TCP address in the serving line:\n{text}"
            self.port = int(m.group(1))
        return self

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT,
             expect_rc: int | None = 0) -> int:
        """Signal the server, wait for it; return its exit code (asserted if expect_rc set)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.expect_rc = None
                self.returncodes.append(self.proc.returncode)
                pytest.fail(f"jsnap serve did not exit within {timeout} s of signal {sig}; "
                            f"killed.\n{self.log_text()}")
        rc = self.proc.returncode
        self.returncodes.append(rc)
        self.expect_rc = None  # checked here, not again at teardown
        if expect_rc is not None:
            assert rc == expect_rc, (f"jsnap serve exited {rc}, expected {expect_rc}\n"
                                     f"{self.log_text()}")
        return rc

    def kill(self) -> None:
        """SIGKILL (the test means it: no exit-code check at teardown)."""
        self.expect_rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, *extra: str) -> JsnapServer:
        if self.running:
            self.stop()
        return self.start(*extra)

    def log_text(self) -> str:
        parts = []
        for log in self.logs:
            try:
                parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')}")
            except OSError:
                pass
        return "\n".join(parts)

    def teardown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            expect = self.expect_rc
            self.stop(expect_rc=expect)
        elif self.expect_rc is not None:
            rc = self.proc.returncode
            self.expect_rc = None
            assert rc == 0, f"jsnap serve died with exit code {rc}\n{self.log_text()}"


def make_image(path: Path, size: int, seed: int) -> bytes:
    """A raw image of `size` bytes: random data, zero runs and byte-pattern runs, with run
    boundaries at unaligned offsets; written to `path` and returned."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = min(size - len(out), rng.choice([rng.randrange(1, 4096),
                                             rng.randrange(4096, 300_000)]))
        kind = rng.random()
        if kind < 0.45:
            out += rng.randbytes(n)
        elif kind < 0.85:
            out += bytes(n)
        else:
            out += bytes([rng.randrange(1, 256)]) * n
    path.write_bytes(out)
    return bytes(out)


def wait_destaged(srv: JsnapServer, timeout: float = 20.0) -> None:
    """Poll `jsnap status --json` until the destager has emptied the journal."""
    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(srv.cli("status", "--json").stdout)
        if st["journal_records"] == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"journal not destaged after {timeout} s: {st}")
        time.sleep(0.1)
