"""Operating a real `jsnap serve`: /metrics, status, the TCP admin listener, logs.

Every number is read from a live server while real clients (qemu-io, fio, a raw-socket
client kept connected) drive it, and must move the way the workload moved. /metrics is
parsed with prometheus_client's parser, so a malformed exposition fails here too.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time

import pytest
from interop_util import require_tool, run, wait_destaged
from raw_nbd import CMD_READ, RawClient
from test_fio import fio

pytestmark = pytest.mark.interop
parser = pytest.importorskip("prometheus_client.parser")

MiB = 1 << 20
OPS = ("read", "write", "flush", "trim", "cache", "write_zeroes", "block_status")
HIST = "jsnap_request_duration_seconds"


def _unix_get(srv, path: str) -> tuple[int, str, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(os.path.join(srv.pool, "admin.sock"))
    conn = http.client.HTTPConnection("localhost", timeout=30)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def scrape(srv) -> dict[str, dict[tuple, float]]:
    status, ctype, body = _unix_get(srv, "/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype, body[:200])
    out: dict[str, dict[tuple, float]] = {}
    for fam in parser.text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def val(m: dict, name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


def status(srv) -> dict:
    return srv.admin("GET", "/v1/status")  # type: ignore[return-value]


def poll(what, pred, timeout: float = 15.0):
    """Call `what()` until `pred(result)`; return that result (fail with the last one)."""
    deadline = time.monotonic() + timeout
    while True:
        r = what()
        if pred(r):
            return r
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s; last value: {r}")
        time.sleep(0.05)


def test_metrics_count_real_io_by_op_and_engine_work(jsnap_server, tmp_path):
    qemu_io = require_tool("qemu-io")
    srv = jsnap_server({"vol": "64M"})
    m0 = scrape(srv)
    assert val(m0, "jsnap_pool_ok") == 1
    for op in OPS:
        assert val(m0, "jsnap_requests_total", op=op) == 0
    run([qemu_io, "-f", "raw", "-c", "write -P 7 0 1M", "-c", "read -P 7 0 1M", "-c", "flush",
         "-c", "write -z 1M 64k", "-c", "discard 2M 64k", srv.uri("vol")])
    raw = RawClient(srv.socket)
    raw.handshake("vol")
    raw.send_request(CMD_READ, 63 * MiB, 2 * MiB)  # past the end: EINVAL
    assert raw.reply()[0] != 0
    raw.close()
    report = fio(srv.uri("vol"), tmp_path, "rr", "--rw=randrw", "--bs=4k", "--size=8M",
                 "--iodepth=16", "--offset=8M")
    fio_r = sum(j["read"]["total_ios"] for j in report["jobs"])
    fio_w = sum(j["write"]["total_ios"] for j in report["jobs"])
    assert fio_r > 100 and fio_w > 100, (fio_r, fio_w)
    m1 = poll(lambda: scrape(srv), lambda m: val(m, "jsnap_connections_open") == 0)
    # qemu-io splits nothing here; fio's reads and writes are all 4 KiB requests.
    assert val(m1, "jsnap_requests_total", op="read") >= fio_r + 2
    assert val(m1, "jsnap_requests_total", op="write") >= fio_w + 1
    assert val(m1, "jsnap_request_errors_total", op="read") == 1
    assert val(m1, "jsnap_request_errors_total", op="write") == 0
    for op in ("flush", "write_zeroes", "trim"):
        assert val(m1, "jsnap_requests_total", op=op) >= 1, op
    for op in OPS:  # every answered request is in its op's histogram
        n = val(m1, "jsnap_requests_total", op=op)
        assert val(m1, f"{HIST}_count", op=op) == n
        assert val(m1, f"{HIST}_bucket", op=op, le="+Inf") == n
        assert (val(m1, f"{HIST}_sum", op=op) > 0) == (n > 0), op
    assert val(m1, "jsnap_read_bytes_total") >= MiB + fio_r * 4096
    assert val(m1, "jsnap_written_bytes_total") >= MiB + fio_w * 4096
    assert val(m1, "jsnap_connections_total") >= 3
    wait_destaged(srv)
    m2 = scrape(srv)
    assert val(m2, "jsnap_journal_pending_records") == 0
    assert val(m2, "jsnap_journal_fill_ratio") == 0
    assert val(m2, "jsnap_destaged_records_total") >= fio_w + 3
    assert val(m2, "jsnap_destaged_bytes_total") == val(m1, "jsnap_written_bytes_total")
    assert val(m2, "jsnap_destage_batch_duration_seconds_count") >= 1
    assert val(m2, "jsnap_pool_allocated_bytes") >= MiB
    assert val(m2, "jsnap_snapshots") == 0
    # A snapshot, then a partial-chunk overwrite: one chunk copied for the snapshot.
    srv.cli("snapshot", "create", "vol", "s1")
    run([qemu_io, "-f", "raw", "-c", "write -P 9 512 512", srv.uri("vol")])
    wait_destaged(srv)
    m3 = scrape(srv)
    assert val(m3, "jsnap_snapshots") == 1
    assert val(m3, "jsnap_preserved_chunks_total") == val(m2, "jsnap_preserved_chunks_total") + 1
    assert val(m3, "jsnap_pool_preserved_bytes") > 0


class Writer(threading.Thread):
    """A raw NBD client kept connected, writing 4 KiB blocks until stopped."""

    def __init__(self, srv) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(srv.socket)
        self.client.handshake("vol")
        self.stop = threading.Event()
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                assert self.client.write((i % 2048) * 4096, bytes([i % 251 + 1]) * 4096) == 0
                self.written += 1
                i += 1
        except BaseException as e:  # reported by the test
            self.error = e

    def halt(self) -> None:
        self.stop.set()
        self.join(10)
        assert self.error is None, self.error


def test_status_moves_with_the_workload_and_lists_the_connected_client(jsnap_server):
    srv = jsnap_server({"vol": "64M"}, journal_size="64M")
    st0 = status(srv)
    assert st0["serving"] is True and st0["clients"] == []
    assert st0["journal_records"] == 0 and st0["journal_fill"] == 0
    w = Writer(srv)
    w.start()
    try:
        # While it writes, the journal holds records and the client is listed.
        st1 = poll(lambda: status(srv), lambda s: s["journal_records"] > 0
                   and s["clients"] and s["clients"][0]["requests"] > 0)
        assert st1["journal_fill"] > 0 and st1["journal_used"] > 0
        assert st1["journal_oldest_age"] >= 0
        (c,) = st1["clients"]
        assert c["peer"] == "unix" and c["export"] == "vol"
        assert time.time() - 60 < c["since"] <= time.time()
        st2 = poll(lambda: status(srv),
                   lambda s: s["clients"][0]["requests"] > c["requests"] + 10)
        assert st2["clients"][0]["written_bytes"] > c["written_bytes"]
    finally:
        w.halt()
    # Writes stopped, client still connected and idle: the journal drains, the client stays.
    wait_destaged(srv)
    st3 = status(srv)
    assert st3["journal_fill"] == 0 and st3["journal_oldest_age"] == 0
    assert st3["destaged_records"] >= w.written
    assert st3["destage_rate_records"] > 0 and st3["destage_rate_bytes"] > 0
    assert [x["requests"] for x in st3["clients"]] == [w.written]
    # The CLI (a separate process) shows the same, as JSON and as a table.
    js = json.loads(srv.cli("status", "--json").stdout)
    assert js["serving"] and [x["export"] for x in js["clients"]] == ["vol"]
    text = srv.cli("status").stdout
    assert re.search(r"^CLIENT\s+EXPORT\s+CONNECTED\s+REQUESTS$", text, re.M), text
    assert re.search(rf"^unix\s+vol\s+\S+ ago\s+{w.written}$", text, re.M), text
    # A snapshot, then overwrites: after destage the snapshot holds the old chunks.
    srv.cli("snapshot", "create", "vol", "s1")
    w.client.write(0, b"\xee" * 65536)
    wait_destaged(srv)
    (snap,) = status(srv)["snapshots"]
    assert snap["name"] == "s1" and snap["held_bytes"] >= 65536 and snap["age"] >= 0
    assert re.search(r"^vol@s1\s+\S+\s+64K$", srv.cli("status").stdout, re.M)
    w.client.close()
    poll(lambda: status(srv), lambda s: s["clients"] == [])


def _start_with_tcp_admin(jsnap_server, tmp_path, token: str = "t0k3n-" + "x" * 20):
    srv = jsnap_server({"vol": "16M"}, start=False)
    tok = tmp_path / "admin.token"
    tok.write_text(token + "\n")
    tok.chmod(0o600)
    srv.start("--admin-listen", "127.0.0.1:0", "--admin-token-file", str(tok))
    m = re.search(r"admin API on http://127\.0\.0\.1:(\d+) \(token required\)", srv.log_text())
    assert m, srv.log_text()
    return srv, int(m.group(1)), token


def _tcp(port: int, method: str, path: str, headers: dict | None = None,
         body: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_tcp_admin_refuses_requests_without_the_token(jsnap_server, tmp_path):
    srv, port, token = _start_with_tcp_admin(jsnap_server, tmp_path)
    good = {"Authorization": f"Bearer {token}"}
    for path in ("/metrics", "/v1/status", "/v1/volumes"):
        code, headers, body = _tcp(port, "GET", path)
        assert code == 401, (path, code, body)
        assert headers.get("WWW-Authenticate", "").startswith("Bearer")
        assert "token" in json.loads(body)["error"]
    for bad in (f"Bearer {token}x", token, f"Basic {token}", "Bearer "):
        assert _tcp(port, "GET", "/metrics", {"Authorization": bad})[0] == 401, bad
    # A refused write changes nothing.
    code, _, _ = _tcp(port, "POST", "/v1/volumes", {"Content-Type": "application/json"},
                      {"name": "sneaky", "size": MiB})
    assert code == 401
    assert [v["name"] for v in json.loads(srv.cli("volume", "list", "--json").stdout)] == ["vol"]
    # With the token: the same API, and metrics that parse.
    code, headers, body = _tcp(port, "GET", "/metrics", good)
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    names = {f.name for f in parser.text_string_to_metric_families(body.decode())}
    assert {"jsnap_requests", "jsnap_pool_ok", "jsnap_request_duration_seconds"} <= names
    code, _, body = _tcp(port, "POST", "/v1/volumes", {**good, "Content-Type":
                                                          "application/json"},
                         {"name": "v2", "size": MiB})
    assert code == 200 and json.loads(body)["name"] == "v2"
    code, _, body = _tcp(port, "GET", "/v1/status", good)
    assert code == 200 and json.loads(body)["serving"] is True
    # The unix socket needs no token (its file mode guards it).
    assert _unix_get(srv, "/metrics")[0] == 200
    assert "refused GET /metrics" in srv.log_text()
    assert token not in srv.log_text()


def test_json_logs_one_object_per_line_with_connection_summary(jsnap_server):
    qemu_io = require_tool("qemu-io")
    srv = jsnap_server({"vol": "16M"}, start=False)
    srv.start("--log-format", "json")
    run([qemu_io, "-f", "raw", "-c", "write -P 1 0 256k", "-c", "read -P 1 0 64k",
         srv.uri("vol")])
    srv.stop()
    recs = [json.loads(line) for line in srv.logs[-1].read_text().splitlines()]
    for r in recs:
        assert {"ts", "level", "logger", "msg"} <= r.keys(), r
        assert r["level"] in ("debug", "info", "warning", "error", "critical")
    assert any(r.get("event") == "serving" for r in recs)
    (opened,) = [r for r in recs if r.get("event") == "open"]
    assert opened["export"] == "vol" and opened["peer"] == "unix"
    (closed,) = [r for r in recs if r.get("event") == "close"]
    assert closed["export"] == "vol" and closed["requests"] >= 2
    assert closed["written_bytes"] == 256 << 10 and closed["read_bytes"] == 64 << 10
    assert closed["duration_s"] >= 0 and closed["reason"]


def test_text_log_close_line_has_duration_requests_and_bytes(jsnap_server):
    qemu_io = require_tool("qemu-io")
    srv = jsnap_server({"vol": "16M"})
    run([qemu_io, "-f", "raw", "-c", "write -P 1 0 128k", "-c", "read -P 1 0 64k",
         srv.uri("vol")])
    line = poll(srv.log_text, lambda t: "bytes written" in t)
    assert re.search(r"client unix export 'vol': .+ after \d+\.\d s, \d+ requests, "
                     r"65536 bytes read, 131072 bytes written", line), line
