"""Fixtures for the interop suite (helpers live in interop_util.py).

`jsnap_server` is a factory fixture: each call inits a pool in tmp_path with the CLI, creates
volumes and starts `jsnap serve` on it (see `interop_util.JsnapServer`). At teardown every
server still running gets SIGTERM and must exit 0 unless the test killed it or said otherwise;
a failing test gets every server's log appended to its report. Every test here is marked
`interop`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from interop_util import HERE, JsnapServer, require_tool

_SERVERS = pytest.StashKey[list]()


@pytest.fixture
def jsnap_server(request, tmp_path) -> Iterator[Callable[..., JsnapServer]]:
    """Factory: `jsnap_server(volumes={"vol": "64M"}, durability=..., tcp=..., chunk_size=...)`.

    Returns a started JsnapServer. Each call gets its own pool directory.
    """
    require_tool("qemu-img")  # every interop test needs at least the basic tools installed
    servers: list[JsnapServer] = []
    request.node.stash[_SERVERS] = servers

    def make(volumes: dict[str, str] | None = None, *, durability: str = "writeback",
             journal_size: str = "64M", chunk_size: str | None = None, tcp: bool = False,
             start: bool = True, pool_size: str | None = None) -> JsnapServer:
        base = tmp_path / f"srv{len(servers)}"
        base.mkdir()
        srv = JsnapServer(base, tcp=tcp)
        servers.append(srv)
        srv.init(journal_size, durability, chunk_size, pool_size)
        for name, size in (volumes if volumes is not None else {"vol": "64M"}).items():
            srv.cli("volume", "create", name, "--size", size)
        if start:
            srv.start()
        return srv

    try:
        yield make
    finally:
        errors = []
        for srv in servers:
            try:
                srv.teardown()
            except BaseException as e:  # stop every server even if one misbehaved
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for i, srv in enumerate(item.stash.get(_SERVERS, [])):
            rep.sections.append((f"jsnap serve #{i} log ({rep.when})", srv.log_text()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.interop)
