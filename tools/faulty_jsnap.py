"""The `jsnap` command line with fault injection: its pool's files fail as RULES say.

    python tools/faulty_jsnap.py RULES [--] JSNAP-ARGS...
    python tools/faulty_jsnap.py journal:sync:EIO -- -p POOL serve --socket POOL/nbd.sock

RULES: see faults.py (FILE:OP:ERRNO[:after=N][:count=M], comma-separated). Everything after
them goes to `jsnap.cli.main` unchanged, with a FaultOpener as its `opener`: every command
that opens the pool itself (serve, check, export, import, the admin commands when no server
runs) opens its files through the rules. A command that goes to a running server through its
admin socket reaches that server's files, not these. Exit codes are jsnap's; 2 for bad rules.

The warning `fault injection active (RULES)` is logged when the pool opens its first file,
so a server's log says it in the server's log format.
"""

from __future__ import annotations

import logging
import sys

from faults import FaultOpener, parse

from jsnap.cli import commands as cli
from jsnap.cli.common import EXIT_USAGE
from jsnap.errors import JsnapError
from jsnap.stores.files import BlockFile, FileOpener

log = logging.getLogger("jsnap.faults")


class AnnouncingOpener:
    """Delegates to `inner`; logs the warning at the first file it opens (by then `jsnap
    serve` has set up its logging, which it does before opening the pool)."""

    def __init__(self, inner: FileOpener, rules: str) -> None:
        self.inner, self.rules = inner, rules
        self.announced = False

    def __call__(self, path: str, create: bool = False) -> BlockFile:
        if not self.announced:
            self.announced = True
            log.warning("fault injection active (%s)", self.rules)
        return self.inner(path, create=create)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else EXIT_USAGE
    rules, rest = args[0], args[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        opener = AnnouncingOpener(FaultOpener(parse(rules)), rules)
    except JsnapError as e:
        print(f"faulty_jsnap: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return cli.main(rest, opener=opener)


if __name__ == "__main__":
    sys.exit(main())
