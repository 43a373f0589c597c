"""The serving process's full-collection policy (jsnap.cli.gcpolicy), on this interpreter's real
collector: when tick() runs a full collection, and that cyclic garbage which reached the
oldest generation is still freed once automatic full collections are off."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from jsnap.cli.gcpolicy import LOUD_INTERVAL, QUIET_INTERVAL, QUIET_RECORDS, FullCollections


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def installed() -> Iterator[None]:
    """install() changes the process's collector: give the test process its defaults back."""
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_a_quiet_journal_gets_a_full_collection_once_a_quiet_interval_passed() -> None:
    clock, pending = Clock(), [0]
    fc = FullCollections(lambda: pending[0], clock)
    assert not fc.tick()
    clock.now += QUIET_INTERVAL - 1
    assert not fc.tick()
    clock.now += 1
    assert fc.tick() and fc.runs == 1
    assert not fc.tick()  # the interval restarts from the collection


def test_a_busy_journal_postpones_it_up_to_the_loud_interval() -> None:
    clock, pending = Clock(), [QUIET_RECORDS + 1]
    fc = FullCollections(lambda: pending[0], clock)
    clock.now += QUIET_INTERVAL
    assert not fc.tick()
    clock.now += LOUD_INTERVAL - QUIET_INTERVAL - 1
    assert not fc.tick()
    pending[0] = QUIET_RECORDS  # the journal drained: no need to wait for the loud interval
    assert fc.tick()
    pending[0] = 10 * QUIET_RECORDS
    clock.now += LOUD_INTERVAL
    assert fc.tick() and fc.runs == 2


class Node:
    def __init__(self) -> None:
        self.me = self


def test_install_stops_automatic_full_collections_and_tick_frees_old_cycles(installed: None
                                                                             ) -> None:
    clock = Clock()
    fc = FullCollections(lambda: 0, clock)
    fc.install()
    assert gc.get_threshold()[2] >= 2**31 - 1
    assert gc.get_freeze_count() > 0
    node = Node()
    gc.collect(1)
    gc.collect(1)  # survivors of two collections sit in the oldest generation
    ref = weakref.ref(node)
    del node  # now garbage, but only a full collection can see it
    for _ in range(200):  # allocations enough to trigger many young collections
        [[] for _ in range(1000)]
    gc.collect(1)
    assert ref() is not None
    clock.now += QUIET_INTERVAL
    assert fc.tick()
    assert ref() is None

