"""Fault injection: make chosen file operations of a live pool fail, for tests and drills.

Run the command line through the launcher next to this file, with a comma-separated list of
rules before the `jsnap` arguments (see faulty_jsnap.py):

    python tools/faulty_jsnap.py RULES -- -p POOL serve --socket PATH

RULES is a comma-separated list of

    FILE:OP:ERRNO[:after=N][:count=M]

FILE   a glob on the file's base name: `journal`, `data-*.dat` (thin pool data), `vol-3.img`
       (a raw volume), `snapstore.dat` (raw volumes' snapshot store), `*`
OP     read | write | sync   (write covers pwrite, pwritev, copies into, hole punching and
       zeroing; read covers reads and copies out of the file)
ERRNO  EIO | ENOSPC | EROFS | any errno name
after  let the first N matching calls succeed (default 0)
count  fail M calls, then succeed again (default: every call from then on)

e.g. `journal:sync:EIO:after=5` fails the sixth journal fdatasync. A failing call raises
OSError before touching the file, as a failing disk would: the engine's answer to it is
what is under test (tests/interop/test_faults.py). The launcher logs a warning once the
pool opens its first file while rules are active. In a program, pass
`FaultOpener(parse(RULES))` as the `opener` of `Engine.open` or `jsnap.cli.main`.

Why it lives here, outside the package: it is test and drill tooling. The jsnap package
never imports it and no environment variable switches it on; it reaches the engine only
through the explicit FileOpener seam (`Engine.open(opener=...)`, `jsnap.cli.main(opener=...)`),
so production code has no path into it.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from jsnap.errors import InvalidRequest
from jsnap.stores.device import open_store
from jsnap.stores.files import PLAIN_CAPS, BlockFile, Buffer, FileOpener

_OPS = ("read", "write", "sync")


@dataclass
class Rule:
    pattern: str
    op: str
    err: int
    after: int = 0
    count: int = -1  # -1: forever
    calls: int = 0

    def hit(self, name: str, op: str) -> bool:
        if op != self.op or not fnmatch.fnmatchcase(name, self.pattern):
            return False
        self.calls += 1
        if self.calls <= self.after:
            return False
        return self.count < 0 or self.calls <= self.after + self.count


def parse(text: str) -> list[Rule]:
    rules = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        parts = item.split(":")
        if len(parts) < 3 or parts[1] not in _OPS:
            raise InvalidRequest(f"bad fault rule {item!r}: use FILE:read|write|sync:ERRNO"
                                 "[:after=N][:count=M]")
        err = getattr(errno, parts[2], None)
        if not isinstance(err, int):
            raise InvalidRequest(f"bad fault rule {item!r}: unknown errno {parts[2]!r}")
        rule = Rule(parts[0], parts[1], err)
        for opt in parts[3:]:
            key, _, value = opt.partition("=")
            if key not in ("after", "count") or not value.isdigit():
                raise InvalidRequest(f"bad fault rule {item!r}: option {opt!r}")
            setattr(rule, key, int(value))
        rules.append(rule)
    return rules


class FaultyFile:
    """A BlockFile that consults the rules before each call, then delegates."""

    def __init__(self, inner: BlockFile, rules: list[Rule], lock: threading.Lock) -> None:
        self.inner, self.rules, self.lock = inner, rules, lock
        self.path = inner.path
        self.name = os.path.basename(inner.path)
        self.fd = getattr(inner, "fd", -1)  # SEEK_HOLE still reaches the file
        # Growth by truncate() only, as before the store interface: injected write errors
        # count the same calls.
        self.caps = PLAIN_CAPS

    def _check(self, op: str) -> None:
        with self.lock:
            for rule in self.rules:
                if rule.hit(self.name, op):
                    raise OSError(rule.err, f"{os.strerror(rule.err)} (injected)", self.path)

    def pread(self, length: int, offset: int) -> bytes:
        self._check("read")
        return self.inner.pread(length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> int:
        self._check("read")
        return self.inner.preadinto(buf, offset)

    def pwrite(self, data: Buffer, offset: int) -> None:
        self._check("write")
        self.inner.pwrite(data, offset)

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> None:
        self._check("write")
        self.inner.pwritev(bufs, offset)

    def copy_from(self, src: BlockFile, src_offset: int, length: int, offset: int) -> None:
        if isinstance(src, FaultyFile):
            src._check("read")
            src = src.inner
        self._check("write")
        self.inner.copy_from(src, src_offset, length, offset)

    def punch_hole(self, offset: int, length: int) -> None:
        self._check("write")
        self.inner.punch_hole(offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        self._check("write")
        self.inner.zero_range(offset, length)

    def zero_allocated(self, offset: int, length: int) -> None:
        self.zero_range(offset, length)

    def allocate(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "fault-injected files do not preallocate", self.path)

    def truncate(self, size: int) -> None:
        self._check("write")
        self.inner.truncate(size)

    def size(self) -> int:
        return self.inner.size()

    def sync(self) -> None:
        self._check("sync")
        self.inner.sync()

    def drop_cache(self, offset: int, length: int) -> bool:
        return self.inner.drop_cache(offset, length)

    def close(self) -> None:
        self.inner.close()


class FaultOpener:
    """Opens files with `inner`, wrapped in FaultyFile when a rule could match them."""

    def __init__(self, rules: list[Rule], inner: FileOpener = open_store) -> None:
        self.rules, self.inner = rules, inner
        self.lock = threading.Lock()

    def __call__(self, path: str, create: bool = False) -> BlockFile:
        f = self.inner(path, create=create)
        name = os.path.basename(path)
        if any(fnmatch.fnmatchcase(name, r.pattern) for r in self.rules):
            return FaultyFile(f, self.rules, self.lock)
        return f
