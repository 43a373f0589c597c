"""The `jsnap` command line: the top of the stack (commands, export/import, progress display,
logging and GC policy of the serving process). `jsnap.cli:main` is the console script."""

from jsnap.cli.commands import main

__all__ = ["main"]
