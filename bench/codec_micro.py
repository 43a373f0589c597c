"""The NBD codec alone, per request: parse a stream of 4 KiB WRITE and READ requests and build
their replies, as the server's dispatch loop does (issue 24, item 2: compiled or not).

    python bench/codec_micro.py                   # the jsnap on sys.path, once
    python bench/codec_micro.py --trees A B --rounds 5
        # alternates `src` trees A and B (e.g. a tree with mypyc's .so files and a copy with
        # only the .py files), one fresh process per measurement, and prints the medians

Per round, N requests (half WRITE with a 4 KiB payload, half READ of 4 KiB; structured
replies negotiated) are fed to one ServerConnection in 256 KiB receives (the server's receive
size); every event is validated and answered (`reply_ok`, `reply_read` with one data chunk).
The figure is wall time per request, best of the repeats within a process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
REQUEST_MAGIC = 0x25609513
CMD_READ, CMD_WRITE = 0, 1
BLOCK = 4096
RECV = 256 * 1024


def stream(n: int) -> bytes:
    out = bytearray()
    payload = bytes(range(256)) * (BLOCK // 256)
    for i in range(n):
        offset = (i * 7919 % 4096) * BLOCK
        if i % 2:
            out += REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, i, offset, BLOCK)
        else:
            out += REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, i, offset, BLOCK) + payload
    return bytes(out)


def measure(n: int, repeats: int) -> dict[str, object]:
    from jsnap import nbd
    from jsnap.nbd import wire

    info = nbd.ExportInfo("disk", 1 << 30, can_flush=True, can_fua=True, can_trim=True,
                          can_write_zeroes=True)
    data = stream(n)
    read_data = bytes(BLOCK)
    best = float("inf")
    for _ in range(repeats):
        conn = nbd.ServerConnection()
        conn.receive_data(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        conn.receive_data(b"IHAVEOPT" + struct.pack(">II", 8, 0))  # STRUCTURED_REPLY
        conn.next_event()
        conn.reply_ack()
        go = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
        conn.receive_data(b"IHAVEOPT" + struct.pack(">II", 7, len(go)) + go)
        conn.next_event()
        conn.reply_export(info)
        view = memoryview(data)
        answered = 0
        out: list[object] = []
        t0 = time.perf_counter()
        for start in range(0, len(data), RECV):
            chunk = view[start:start + RECV]
            buf = conn.get_buffer(len(chunk))
            buf[:len(chunk)] = chunk
            conn.buffer_updated(len(chunk))
            while (ev := conn.next_event()) is not nbd.NEED_DATA:
                assert isinstance(ev, nbd.Request), ev
                if nbd.validate_request(ev, info) is not None:
                    raise AssertionError(ev)
                if type(ev) is nbd.Write:
                    out.append(conn.reply_ok(ev))
                else:
                    out.extend(conn.reply_read(ev, [(ev.offset, ev.length, read_data)]))
                answered += 1
            out.clear()
        elapsed = time.perf_counter() - t0
        assert answered == n, answered
        best = min(best, elapsed)
    return {"us_per_request": best / n * 1e6, "compiled": wire.__file__.endswith(".so"),
            "module": wire.__file__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3, help="within one process; best taken")
    ap.add_argument("--trees", nargs="*", help="src directories to alternate")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not args.trees:
        print(json.dumps(measure(args.requests, args.repeats)))
        return 0
    figures: dict[str, list[float]] = {t: [] for t in args.trees}
    kind: dict[str, str] = {}
    for r in range(args.rounds):
        for tree in args.trees:
            env = {**os.environ, "PYTHONPATH": tree}
            p = subprocess.run([sys.executable, __file__, "--requests", str(args.requests),
                                "--repeats", str(args.repeats)],
                               env=env, capture_output=True, text=True, check=True)
            res = json.loads(p.stdout)
            figures[tree].append(res["us_per_request"])
            kind[tree] = "compiled" if res["compiled"] else "interpreted"
            print(f"round {r + 1} {tree} ({kind[tree]}): {res['us_per_request']:.2f} us/request",
                  flush=True)
    for tree, xs in figures.items():
        print(f"{tree} ({kind[tree]}): median {statistics.median(xs):.2f} us/request "
              f"(min {min(xs):.2f}, max {max(xs):.2f}, {len(xs)} rounds)")
    if len(args.trees) == 2:
        a, b = (figures[t] for t in args.trees)
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        print(f"ratio {args.trees[0]} / {args.trees[1]}: median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
