"""The `jsnap` command line: `main` parses the arguments (parser.py), runs the command's
function and turns every error into one readable line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence

from jsnap.cli.common import EXIT_ERROR, EXIT_USAGE
from jsnap.cli.parser import build_parser
from jsnap.errors import JsnapError
from jsnap.stores.device import open_store
from jsnap.stores.files import FileOpener


def main(argv: Sequence[str] | None = None, *, opener: FileOpener = open_store) -> int:
    """Run one `jsnap` command (`argv`: its arguments, default sys.argv[1:]). `opener` opens
    the pool's files wherever a command opens the pool itself (stores.device.open_store, a
    file or a block device; a tool that wraps the files, e.g. tools/faulty_jsnap.py
    injecting errors, passes its own)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.opener = opener
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "needs_pool", True) and not args.pool:
        print("jsnap: error: no pool given: use -p POOL or set JSNAP_POOL", file=sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except JsnapError as e:
        print(f"jsnap: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `jsnap ... | head`: the reader is gone, not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"jsnap: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as e:  # e.g. a read-only pool.db or pool directory
        print(f"jsnap: error: pool catalog {os.path.join(args.pool or '', 'pool.db')}: {e}",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
