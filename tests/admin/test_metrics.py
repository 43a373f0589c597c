"""Metrics, snapshot held space, the oldest-record age and JSON logs, on an engine in process.

The exposition is parsed with prometheus_client's own parser (a test dependency only: the
server writes the format by hand). tests/interop/test_operate.py checks the same numbers
against a real `jsnap serve` driven by real clients.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from jsnap.admin import metrics
from jsnap.cli import logs
from jsnap.core import stats, usage
from jsnap.core.engine import Engine
from jsnap.core.layout import init_pool

parser = pytest.importorskip("prometheus_client.parser")

CS = 4096


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of an exposition."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(m: dict, name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


class FakeServer:
    """What metrics.render reads from an NbdServer."""

    def __init__(self, conns: list[stats.ConnStats]) -> None:
        self.lock = threading.Lock()
        self.clients = [type("C", (), {"stats": c})() for c in conns]
        self.closed_stats = stats.ConnStats()
        self.connections_total = len(conns)


@pytest.fixture
def thin_pool(tmp_path):
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CS, pool_size=256 * CS)
    return path


def test_request_histogram_buckets_counts_and_sums_parse_as_prometheus(thin_pool):
    live, closed = stats.ConnStats(), stats.ConnStats()
    stats.observe_batch(live.lat, live.lat_sum, [0, 0, 0], 0.00003)  # 3 reads, le=5e-05
    stats.observe_batch(live.lat, live.lat_sum, [1, 0], 0.002)  # mixed batch, le=0.0025
    stats.observe_batch(live.dlat, live.dlat_sum, [3], 7.0)  # a flush past the last bound
    live.errors[0] += 1
    live.read_bytes, live.written_bytes = 4096 * 4, 4096
    stats.observe_batch(closed.lat, closed.lat_sum, [0], 0.0001)  # a closed connection's
    closed.read_bytes = 512
    srv = FakeServer([live])
    srv.closed_stats = closed
    with Engine.open(thin_pool, start_destager=False) as e:
        m = parse(metrics.render(e, srv))
    h = "jsnap_request_duration_seconds"
    assert one(m, "jsnap_requests_total", op="read") == 5
    assert one(m, "jsnap_requests_total", op="write") == 1
    assert one(m, "jsnap_requests_total", op="flush") == 1
    assert one(m, "jsnap_requests_total", op="trim") == 0
    assert one(m, "jsnap_request_errors_total", op="read") == 1
    assert one(m, f"{h}_bucket", op="read", le="2.5e-05") == 0
    assert one(m, f"{h}_bucket", op="read", le="5e-05") == 3
    assert one(m, f"{h}_bucket", op="read", le="0.0001") == 4  # cumulative, closed included
    assert one(m, f"{h}_bucket", op="read", le="0.0025") == 5
    assert one(m, f"{h}_bucket", op="read", le="+Inf") == one(m, f"{h}_count", op="read") == 5
    assert one(m, f"{h}_sum", op="read") == pytest.approx(3 * 0.00003 + 0.002 + 0.0001)
    assert one(m, f"{h}_bucket", op="flush", le="2.5") == 0
    assert one(m, f"{h}_bucket", op="flush", le="+Inf") == 1
    assert one(m, "jsnap_read_bytes_total") == 4096 * 4 + 512
    assert one(m, "jsnap_written_bytes_total") == 4096
    assert one(m, "jsnap_connections_open") == 1
    assert one(m, "jsnap_connections_total") == 1


def test_engine_metrics_move_with_writes_snapshots_and_destage(thin_pool):
    with Engine.open(thin_pool, start_destager=False) as e:
        before = parse(metrics.render(e))
        assert one(before, "jsnap_pool_ok") == 1
        assert one(before, "jsnap_journal_pending_records") == 0
        assert one(before, "jsnap_journal_fill_ratio") == 0
        v = e.volume_create("t", 64 * CS, thin=True)
        e.write(v, 0, b"a" * 8 * CS)
        e.snapshot_create(v, "s1")
        e.write(v, 0, b"b" * 2 * CS + b"c")  # two chunks remapped, one partial copy
        mid = parse(metrics.render(e))
        assert one(mid, "jsnap_journal_pending_records") == 3
        assert one(mid, "jsnap_journal_fill_ratio") > 0
        assert one(mid, "jsnap_journal_used_bytes") > 10 * CS
        assert one(mid, "jsnap_pool_reserved_bytes") > 0
        assert one(mid, "jsnap_snapshots") == 1
        e.destage()
        after = parse(metrics.render(e))
    assert one(after, "jsnap_journal_pending_records") == 0
    assert one(after, "jsnap_destaged_records_total") == 3
    assert one(after, "jsnap_destaged_bytes_total") == 10 * CS + 1
    assert one(after, "jsnap_preserved_chunks_total") == 1
    assert one(after, "jsnap_destage_batch_duration_seconds_count") >= 2  # the marker ends one
    assert one(after, "jsnap_destage_batch_duration_seconds_sum") > 0
    assert one(after, "jsnap_pool_allocated_bytes") == (8 + 3) * CS
    assert one(after, "jsnap_pool_preserved_bytes") == 3 * CS
    assert one(after, "jsnap_pool_reserved_bytes") == 0
    jpath = e.journal_path
    assert one(after, "jsnap_store_used_bytes", role="journal", path=jpath, kind="file") == 0
    assert one(after, "jsnap_store_size_bytes", role="journal", path=jpath,
               kind="file") == e.journal.end
    data = e.pool.files[0].path
    assert one(after, "jsnap_store_used_bytes", role="data", path=data,
               kind="file") == e.pool.backed() * CS


def test_garbage_collections_are_counted_by_generation(thin_pool):
    """jsnap serve runs full collections itself (jsnap.cli.gcpolicy): /metrics shows them."""
    import gc

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    with Engine.open(thin_pool, start_destager=False) as e:
        before = parse(metrics.render(e))
        for _ in range(3):
            Cycle()
        gc.collect()
        after = parse(metrics.render(e))
    assert sorted(before["python_gc_collections_total"]) == [
        (("generation", g),) for g in ("0", "1", "2")]
    assert one(after, "python_gc_collections_total", generation="2") == \
        one(before, "python_gc_collections_total", generation="2") + 1
    assert one(after, "python_gc_objects_collected_total", generation="2") >= \
        one(before, "python_gc_objects_collected_total", generation="2") + 3


def test_label_values_and_special_floats_are_escaped():
    w = metrics._Writer()
    w.metric("jsnap_x", "gauge", "x", float("inf"), {"v": 'a"b\\c\nd'})
    fam = next(iter(parser.text_string_to_metric_families(w.text())))
    assert fam.samples[0].labels == {"v": 'a"b\\c\nd'}
    assert fam.samples[0].value == float("inf")


@pytest.mark.parametrize("thin", [True, False], ids=["thin", "raw"])
def test_held_space_is_what_deleting_that_snapshot_alone_frees(tmp_path, thin):
    """s1 alone holds the old chunks 0-1, s2 alone chunk 0's next copy; the copy of chunk 1
    made after s3 serves s2 and s3 both, so neither holds it. Deleting s1 then frees exactly
    what s1 held."""
    path = str(tmp_path / "pool")
    init_pool(path, journal_size=1 << 20, chunk_size=CS, pool_size=256 * CS)
    with Engine.open(path, start_destager=False) as e:
        v = e.volume_create("v", 16 * CS, thin=thin)
        e.write(v, 0, b"0" * 4 * CS)
        e.snapshot_create(v, "s1")
        e.write(v, 0, b"1" * 2 * CS)  # chunks 0, 1: preserved for s1
        e.snapshot_create(v, "s2")
        e.write(v, 0, b"2" * CS)  # chunk 0 again: preserved for s2
        e.snapshot_create(v, "s3")
        e.write(v, CS, b"3" * CS)  # chunk 1 again: this copy serves s2 and s3
        e.destage()
        held = {s["name"]: s for s in usage.snapshots(e)}
        assert {n: s["held_chunks"] for n, s in held.items()} == {"s1": 2, "s2": 1, "s3": 0}
        assert held["s1"]["held_bytes"] == 2 * CS
        assert held["s3"]["age"] >= 0
        preserved = e.pool_stats()["pool_preserved"]
        free_slots = len(e.slots.free_slots())
        e.snapshot_delete(v, "s1")
        e.destage()
        if thin:
            assert preserved - e.pool_stats()["pool_preserved"] == held["s1"]["held_bytes"]
        else:
            assert len(e.slots.free_slots()) - free_slots == held["s1"]["held_chunks"]
        after = {s["name"]: s["held_chunks"] for s in usage.snapshots(e)}
        assert after == {"s2": 1, "s3": 0}


def test_oldest_record_age_tracks_the_oldest_pending_record(thin_pool):
    with Engine.open(thin_pool, start_destager=False) as e:
        v = e.volume_create("t", 64 * CS, thin=True)
        assert e.stats()["journal_oldest_age"] == 0.0
        e.write(v, 0, b"x" * CS)
        time.sleep(0.2)
        e.write(v, CS, b"y" * CS)  # newer records must not make the oldest look younger
        age = e.stats()["journal_oldest_age"]
        assert 0.2 <= age < 5, age
        e.destage(max_records=1)  # the oldest goes: the age is now the second record's
        assert e.stats()["journal_oldest_age"] < age - 0.15
        e.destage()
        assert e.stats()["journal_oldest_age"] == 0.0
        for i in range(3000):  # many appends over time: the marks stay few
            e.write(v, (i % 64) * CS, b"z")
        assert len(e.backlog.append_marks) <= 4097


def test_rate_window_averages_over_the_last_minute():
    w = stats.RateWindow(start=1000.0)
    w.add(1000.5, 10, 1000)
    assert w.rate(1001.0) == (10.0, 1000.0)  # one second in: divided by one, not sixty
    w.add(1030.0, 50, 5000)
    assert w.rate(1050.0) == pytest.approx((60 / 50, 6000 / 50))  # both, over 50 s
    assert w.rate(1075.0) == pytest.approx((50 / 60, 5000 / 60))  # the first has aged out
    assert w.rate(1200.0) == (0.0, 0.0)


def test_json_log_lines_carry_ts_level_logger_msg_and_fields(capsys):
    logs.setup("info", "json")
    try:
        log = logging.getLogger("jsnap.test")
        log.info("client %s done", "unix", extra={"peer": "unix", "requests": 3})
        log.debug("not shown")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        logs.announce("jsnap: serving", "json", event="serving")
    finally:
        logging.getLogger().handlers.clear()
    lines = capsys.readouterr().err.strip().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 3
    first = recs[0]
    assert first["level"] == "info" and first["logger"] == "jsnap.test"
    assert first["msg"] == "client unix done"
    assert first["peer"] == "unix" and first["requests"] == 3
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert recs[1]["level"] == "error" and "ValueError: boom" in recs[1]["exc"]
    assert recs[2]["msg"] == "jsnap: serving" and recs[2]["event"] == "serving"
