"""When the serving process runs CPython's full (oldest-generation) garbage collections.

Model
-----
A serving jsnap holds one `Record` per pending journal record and a piece list per journaled
chunk: with the default 256 MiB journal full of 4 KiB writes, about 64k records and 40k lists,
four times that with a 1 GiB journal. They live until destaged, so they all reach the oldest
generation, and CPython starts a full collection whenever the objects promoted since the
last one exceed a quarter of it: under a steady write load, about once a second. A full
collection visits every tracked object while holding the GIL: measured 6-70 ms each (growing
with the journal's fill), during which no request is parsed or answered. Almost nothing it
finds is garbage: the engine frees by reference counting, and the few reference cycles (tens
of objects a second: exception tracebacks, admin request threads) mostly die young, where
the young-generation collections, left automatic, find them.

Policy
------
G0. No collection runs while the pool opens: replay creates one long-lived Record per
    journal record (258k for a full 1 GiB journal), and the full collections those
    allocations trigger would visit the growing set again and again.
G1. Start-up objects (modules, the catalog, the open pool) are frozen out of every
    collection (`gc.freeze`): they stay for the life of the process.
G2. Automatic full collections are off. `tick()`, called by the serve loop every half
    second, runs one when the journal holds few records (so it is short) and at least
    QUIET_INTERVAL has passed, or, whatever the fill, once LOUD_INTERVAL has passed: cyclic
    garbage that reached the oldest generation is still freed, at a bounded rate.
Only `jsnap serve` installs this; the library and the tests keep CPython's defaults.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("jsnap.gc")

QUIET_INTERVAL = 60.0  # seconds between full collections when the journal is nearly empty
LOUD_INTERVAL = 600.0  # at the latest, whatever the journal holds
QUIET_RECORDS = 4096  # "nearly empty": a full collection then costs a few milliseconds
_NEVER = 2**31 - 1  # a generation-2 threshold no count reaches


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """G0: the collector off for the block (as it was before, after it)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class FullCollections:
    def __init__(self, pending: Callable[[], int], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.pending = pending
        self.clock = clock
        self.last = clock()
        self.runs = 0

    def install(self) -> None:
        # No collection first: opening leaves a handful of unreachable objects (5 measured
        # after a full 1 GiB journal's replay), and one collection over that journal's
        # records would add 0.1 s to the restart.
        gc.freeze()  # G1
        young0, young1, _ = gc.get_threshold()
        gc.set_threshold(young0, young1, _NEVER)  # G2

    def tick(self) -> bool:
        """Run a full collection if G2 says it is time; True if one ran."""
        since = self.clock() - self.last
        if since < QUIET_INTERVAL or (since < LOUD_INTERVAL and self.pending() > QUIET_RECORDS):
            return False
        t0 = time.perf_counter()
        found = gc.collect()
        self.last = self.clock()
        self.runs += 1
        log.debug("full garbage collection: %d unreachable objects, %.1f ms", found,
                  (time.perf_counter() - t0) * 1000)
        return True
