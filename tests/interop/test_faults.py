"""Fault injection against a live `jsnap serve` (started through tools/faulty_jsnap.py with
the rules of tools/faults.py).

What must hold when a disk fails under the server:
- a failing read fails that request only (EIO reply); other volumes keep being served;
- a failing journal fdatasync is never retried and ignored (fsyncgate): the FLUSH fails, the
  pool turns read-only with a status and a log line saying why, reads keep working;
- a failing destage (production, snapshot store: EIO) turns the pool read-only but loses
  nothing: every acknowledged write is still read back, and after a restart on a healthy
  disk the journal replays and destages it;
- a destage that lacks space (ENOSPC) is waited out, not turned into a read-only pool: the
  status says so, reads keep working, and the pool resumes by itself (issue 25).
"""

from __future__ import annotations

import json
import time

import pytest
from interop_util import require_tool, run, wait_destaged

pytestmark = pytest.mark.interop


def _qemu_io(uri: str, *cmds: str, ro: bool = False):
    args = [require_tool("qemu-io"), "-f", "raw"] + (["-r"] if ro else [])
    for c in cmds:
        args += ["-c", c]
    p = run([*args, uri], check=False)
    ok = p.returncode == 0 and "failed" not in p.stdout.lower()
    return ok, p.stdout + p.stderr


def _state(srv) -> str:
    return json.loads(srv.cli("status", "--json").stdout)["state"]


def _start_with_faults(srv, rules: str) -> None:
    srv.start(faults=rules)


def test_read_error_fails_the_request_not_the_server(jsnap_server):
    srv = jsnap_server({}, start=False)
    srv.cli("volume", "create", "a", "--size", "4M", "--raw")  # vol-1.img
    srv.cli("volume", "create", "b", "--size", "4M", "--raw")  # vol-2.img
    srv.start()
    assert _qemu_io(srv.uri("a"), "write -P 0x61 0 1M")[0]
    assert _qemu_io(srv.uri("b"), "write -P 0x62 0 1M")[0]
    wait_destaged(srv)
    srv.stop()
    _start_with_faults(srv, "vol-1.img:read:EIO")
    ok, out = _qemu_io(srv.uri("a"), "read -P 0x61 0 64k")
    assert not ok and "Input/output error" in out, out
    ok, out = _qemu_io(srv.uri("b"), "read -P 0x62 0 1M", "write -P 0x63 1M 64k")
    assert ok, out
    assert _state(srv) == "ok"
    srv.stop()


def test_journal_fsync_failure_is_never_ignored(jsnap_server):
    srv = jsnap_server({"v": "4M"}, start=False)
    _start_with_faults(srv, "journal:sync:EIO")
    ok, out = _qemu_io(srv.uri("v"), "write -P 0x71 0 256k", "flush")
    assert not ok and "Input/output error" in out, out
    state = _state(srv)
    assert state.startswith("read-only") and "fdatasync" in state, state
    ok, out = _qemu_io(srv.uri("v"), "write -P 0x72 512k 4k")  # no more writes taken
    assert not ok, out
    ok, out = _qemu_io(srv.uri("v"), "read -P 0x71 0 256k")  # reads still served
    assert ok, out
    srv.stop()
    assert "fdatasync failed" in srv.log_text() and "read-only" in srv.log_text()
    srv.start()  # a healthy disk again: nothing the journal file holds was lost
    ok, out = _qemu_io(srv.uri("v"), "read -P 0x71 0 256k")
    assert ok, out
    assert _state(srv) == "ok"


@pytest.mark.parametrize("kind, rule", [
    ("raw", "vol-1.img:sync:EIO"),
    ("raw-snap", "snapstore.dat:write:EIO"),
])
def test_destage_failure_loses_no_acknowledged_write(jsnap_server, kind, rule):
    srv = jsnap_server({}, start=False)
    srv.cli("volume", "create", "v", "--size", "8M", *([] if kind == "thin" else ["--raw"]))
    uri = srv.uri("v")
    if kind == "raw-snap":  # production data first, so the snapshot needs copies
        srv.start()
        assert _qemu_io(uri, "write -P 0x41 0 2M")[0]
        wait_destaged(srv)
        srv.stop()
    _start_with_faults(srv, rule)
    if kind == "raw-snap":
        srv.cli("snapshot", "create", "v", "s1")
    # Not chunk aligned: journaled, so the data file is first written by the destager (an
    # aligned 1M write to a thin volume goes to the data file at once: see the next test).
    ok, out = _qemu_io(uri, "write -P 0x51 512 1M", "write -P 0x52 3146240 1M", "flush")
    assert ok, out  # acknowledged and durable in the journal
    for _ in range(100):  # the destager drains when writes pause: wait for it to fail
        if _state(srv) != "ok":
            break
        time.sleep(0.1)
    state = _state(srv)
    assert state.startswith("read-only"), state
    ok, out = _qemu_io(uri, "read -P 0x51 512 1M", "read -P 0x52 3146240 1M")
    assert ok, out
    srv.stop()
    assert "destage failed" in srv.log_text()
    srv.start()
    wait_destaged(srv)
    ok, out = _qemu_io(uri, "read -P 0x51 512 1M", "read -P 0x52 3146240 1M")
    assert ok, out
    if kind == "raw-snap":
        ok, out = _qemu_io(srv.uri("v@s1"), "read -P 0x41 0 2M", ro=True)
        assert ok, out
    assert _state(srv) == "ok"
    srv.stop()
    assert "pool is consistent" in srv.cli("check").stdout


def _wait_state(srv, prefix: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (state := _state(srv)).startswith(prefix):
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


@pytest.mark.parametrize("rule, end", [
    ("data-*.dat:write:ENOSPC:after=1:count=4", "resumes"),  # space comes back by itself
    ("data-*.dat:write:ENOSPC:after=1", "stop"),  # never: the server stops while it waits
    ("data-*.dat:write:ENOSPC:after=1", "sigkill"),  # ... or is killed while it waits
])
def test_destage_lacking_space_waits_instead_of_failing(jsnap_server, rule, end):
    srv = jsnap_server({}, start=False)
    srv.cli("volume", "create", "v", "--size", "8M")
    uri = srv.uri("v")
    _start_with_faults(srv, rule)
    # Not chunk aligned: journaled, so the data file is first written by the destager.
    ok, out = _qemu_io(uri, "write -P 0x51 512 1M", "write -P 0x52 3146240 1M", "flush")
    assert ok, out
    state = _wait_state(srv, "waiting for space")
    assert "No space left on device" in state, state
    metrics = srv.cli("status", "--json").stdout
    assert json.loads(metrics)["destage_space_waits"] >= 1
    ok, out = _qemu_io(uri, "read -P 0x51 512 1M", "read -P 0x52 3146240 1M")
    assert ok, out
    if end == "resumes":
        _wait_state(srv, "ok")  # no restart
        wait_destaged(srv)
        assert "destage resumed: space is back" in srv.log_text()
    else:
        if end == "stop":
            srv.stop()
            log = srv.log_text()
            assert "stopped while destage waits for space" in log, log
            assert "read-only" not in log, log
        else:
            srv.kill()  # SIGKILL: the acknowledged writes are in the journal alone
        srv.start()  # a disk with room again: the journal replays and destages
        wait_destaged(srv)
    assert _state(srv) == "ok"
    ok, out = _qemu_io(uri, "read -P 0x51 512 1M", "read -P 0x52 3146240 1M")
    assert ok, out
    srv.stop()
    assert "pool is consistent" in srv.cli("check").stdout


def test_failed_remap_write_fails_only_itself(jsnap_server):
    """A large aligned write to a thin volume goes straight to the data file: a write error
    there fails that request, acknowledges nothing, and leaves the pool writable."""
    srv = jsnap_server({}, start=False)
    srv.cli("volume", "create", "v", "--size", "8M")
    uri = srv.uri("v")
    srv.start()
    assert _qemu_io(uri, "write -P 0x41 0 2M", "flush")[0]
    srv.stop()
    _start_with_faults(srv, "data-*.dat:write:EIO:count=1")
    ok, out = _qemu_io(uri, "write -P 0x51 0 1M")
    assert not ok and "Input/output error" in out, out
    assert _state(srv) == "ok"
    ok, out = _qemu_io(uri, "read -P 0x41 0 2M", "write -P 0x52 512 4k", "read -P 0x52 512 4k")
    assert ok, out
    srv.stop()
    assert "pool is consistent" in srv.cli("check").stdout


def test_pool_that_cannot_grow_refuses_writes_up_front(jsnap_server):
    """The filesystem refuses to extend the pool's data file: the write that needed it gets
    ENOSPC before anything is journaled, and the pool stays writable where it has room."""
    srv = jsnap_server({"v": "8M"}, start=False)
    _start_with_faults(srv, "data-*.dat:write:ENOSPC:count=1")
    ok, out = _qemu_io(srv.uri("v"), "write -P 0x61 0 64k")
    assert not ok and "No space left on device" in out, out
    assert _state(srv) == "ok"
    ok, out = _qemu_io(srv.uri("v"), "write -P 0x62 0 64k", "read -P 0x62 0 64k")
    assert ok, out


def test_journal_write_error_fails_the_write_and_stops_writes(jsnap_server):
    srv = jsnap_server({"v": "4M", "w": "4M"}, start=False)
    srv.start()
    assert _qemu_io(srv.uri("w"), "write -P 0x21 0 64k", "flush")[0]
    srv.stop()
    _start_with_faults(srv, "journal:write:EIO")
    ok, out = _qemu_io(srv.uri("v"), "write -P 0x22 0 64k")
    assert not ok and "Input/output error" in out, out
    state = _state(srv)
    assert state.startswith("read-only") and "write failed" in state, state
    ok, out = _qemu_io(srv.uri("w"), "read -P 0x21 0 64k")  # the other volume still reads
    assert ok, out
    srv.stop()


def test_unreadable_journal_at_start_is_one_clear_error(jsnap_server):
    srv = jsnap_server({"v": "4M"}, start=False)
    p = srv.cli("serve", "--socket", srv.socket, check=False, timeout=30,
                faults="journal:read:EIO")
    assert p.returncode == 1, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith("20")]  # not log lines
    assert len(lines) == 1 and "Input/output error" in lines[0], p.stderr
