"""Workload process for test_sigkill.py: run until SIGKILLed, report every acknowledged op.

Usage: python sigkill_worker.py '<json config>'

Config keys: pool (path), seed, version (last version number already used: this run stamps
version+1, version+2, ...), snapno (next snapshot number: names are s<snapno>, ...),
flush_every (0: never call flush; N: call flush() every N operations).

The worker opens the pool with the destager thread running and loops forever over a seeded
random mix of operations on volumes "a" and "b". Every 4 KiB block it writes is a `stamp`
naming (volume, block, version) and carrying a CRC, so the test can tell any block's origin
and detect a torn one. Around each operation it prints one JSON line to stdout, flushed:

    {"intent": {...op...}}    before the call (at most one op is ever in flight)
    {...op...}                after the call returned: the op is acknowledged

where op is one of
    {"op":"write","vol":"a","block":12,"nblocks":3,"version":57}
    {"op":"zero","how":"trim"|"zeroes","vol":"b","block":3,"nblocks":2,"version":58}
    {"op":"snap","vol":"a","name":"s4"}
    {"op":"snapdel","vol":"a","name":"s2"}
    {"op":"flush"}                     (its ack line means: flushed)
A line {"op":"ready"} is printed once the pool is open.

This module is also imported by the test for `stamp`/`decode` and the constants.
"""

from __future__ import annotations

import json
import random
import struct
import sys
import zlib

BLOCK = 4096
VOL_SIZE = 1 << 20
NBLOCKS = VOL_SIZE // BLOCK
VOLUMES = ("a", "b")
MAX_LIVE_SNAPS = 5  # per volume; keeps the test's per-round image checks cheap

_MAGIC = b"JSBK"
_HEAD = struct.Struct("<4sIIQ")  # magic, volume index, block number, version: 20 bytes
_UNIT_SIZE = _HEAD.size + 4  # + crc32 of the head
_NUNITS = (BLOCK - 4) // _UNIT_SIZE
_ZERO = bytes(BLOCK)
_cache: dict[tuple[str, int, int], bytes] = {}


def stamp(vol: str, block: int, version: int) -> bytes:
    """The 4 KiB content of `block` of `vol` as written by the op with `version`."""
    key = (vol, block, version)
    data = _cache.get(key)
    if data is None:
        head = _HEAD.pack(_MAGIC, VOLUMES.index(vol), block, version)
        unit = head + struct.pack("<I", zlib.crc32(head))
        body = unit * _NUNITS
        body += bytes(BLOCK - 4 - len(body))
        data = body + struct.pack("<I", zlib.crc32(body))
        if len(_cache) < 200_000:
            _cache[key] = data
    return data


def decode(data: bytes) -> str:
    """Human-readable origin of a block's content, for failure messages."""
    data = bytes(data)
    if data == _ZERO:
        return "zeroes"
    head = data[: _HEAD.size]
    try:
        magic, vidx, block, version = _HEAD.unpack(head)
    except struct.error:
        return "garbage"
    if magic != _MAGIC or vidx >= len(VOLUMES):
        return f"garbage (starts {data[:16].hex()})"
    name = f"{VOLUMES[vidx]}:block{block}:v{version}"
    if data == stamp(VOLUMES[vidx], block, version):
        return name
    return f"TORN (starts as {name})"


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from jsnap.core.engine import Engine
    from jsnap.stores.journal import replay as jreplay

    out = sys.stdout

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        out.flush()

    if cfg.get("fork_scan"):  # replay with the scan in a forked child from the first record
        jreplay.FORK_SCAN_AFTER = 0
    e = Engine.open(cfg["pool"], start_destager=True)
    vols = {name: e.volume(name) for name in VOLUMES}
    rng = random.Random(cfg["seed"])
    version = int(cfg["version"])
    snapno = int(cfg["snapno"])
    flush_every = int(cfg.get("flush_every", 0))
    emit({"op": "ready"})
    n = 0
    while True:
        n += 1
        vol = rng.choice(VOLUMES)
        v = vols[vol]
        live = [s.name for s in e.snapshot_list(v)]
        r = rng.random()
        if flush_every and n % flush_every == 0:
            op: dict = {"op": "flush"}
        elif len(live) > MAX_LIVE_SNAPS or (r < 0.04 and len(live) >= 2):
            op = {"op": "snapdel", "vol": vol, "name": rng.choice(live[:-1])}
        elif r < 0.10:
            op = {"op": "snap", "vol": vol, "name": f"s{snapno}"}
            snapno += 1
        else:
            nblocks = rng.randint(1, 4)
            block = rng.randrange(0, NBLOCKS - nblocks + 1)
            version += 1
            if r < 0.18:
                op = {"op": "zero", "how": rng.choice(("trim", "zeroes")), "vol": vol,
                      "block": block, "nblocks": nblocks, "version": version}
            else:
                op = {"op": "write", "vol": vol, "block": block, "nblocks": nblocks,
                      "version": version}
        emit({"intent": op})
        kind = op["op"]
        if kind == "write":
            data = b"".join(stamp(vol, b, version) for b in range(block, block + nblocks))
            e.write(v, block * BLOCK, data)
        elif kind == "zero":
            fn = e.trim if op["how"] == "trim" else e.write_zeroes
            fn(v, op["block"] * BLOCK, op["nblocks"] * BLOCK)
        elif kind == "snap":
            e.snapshot_create(v, op["name"])
        elif kind == "snapdel":
            e.snapshot_delete(v, op["name"])
        elif kind == "flush":
            e.flush()
        emit(op)


if __name__ == "__main__":
    main()
