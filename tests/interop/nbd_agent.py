"""A libnbd client driven line by line: one connection kept open across commands.

Run by Debian's /usr/bin/python3 (which has the `nbd` module): `nbd_agent.py URI`. Reads one
JSON command per stdin line, answers one JSON line on stdout:

    {"op": "write", "off": O, "len": N, "seed": S}   pwrite seeded bytes
    {"op": "check", "off": O, "len": N, "seed": S}   pread and compare with the seeded bytes
    {"op": "flush"}
    {"op": "quit"}

Answers {"ok": true} or {"ok": false, "error": "..."}; "check" adds "match".
"""

import json
import random
import sys

import nbd


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def main():
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    print(json.dumps({"ok": True, "size": h.get_size()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "write":
                h.pwrite(pattern(cmd["seed"], cmd["len"]), cmd["off"])
                out = {"ok": True}
            elif op == "check":
                got = h.pread(cmd["len"], cmd["off"])
                out = {"ok": True, "match": got == pattern(cmd["seed"], cmd["len"])}
            elif op == "flush":
                h.flush()
                out = {"ok": True}
            elif op == "quit":
                h.shutdown()
                print(json.dumps({"ok": True}), flush=True)
                return
            else:
                out = {"ok": False, "error": f"unknown op {op}"}
        except nbd.Error as e:
            out = {"ok": False, "error": str(e), "errno": e.errno}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
