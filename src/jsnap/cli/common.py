"""What the command modules share: running an operation on the live pool through the admin API
or on the pool opened here (`run`, `open_pool`), quoting names into API paths (`q`), printing
tables, and the exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from jsnap.admin import api as admin
from jsnap.core.engine import Engine

# main()'s exit codes; here, not beside it, because the parser exits with EXIT_USAGE too.
EXIT_ERROR = 1
EXIT_USAGE = 2


def open_pool(args: argparse.Namespace, *, start_destager: bool = False,
              **kwargs: Any) -> Engine:
    """Open the owner's part of the pool here, its files through the opener main() was
    given."""
    return Engine.open(args.pool, owner=args.owner, start_destager=start_destager,
                       opener=args.opener, **kwargs)


def run(args: argparse.Namespace, local: Callable[[Engine], Any], method: str, path: str,
        body: dict[str, Any] | None = None) -> Any:
    """Run an operation on the live pool through the server's admin API, or, with no server
    running, on the pool opened here (the same ops function either way)."""
    try:
        return admin.call(args.pool, method, path, body, owner=args.owner)
    except admin.ServerNotRunning:
        pass
    with open_pool(args) as e:
        return local(e)


def q(name: str) -> str:
    return quote(name, safe="")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
