"""Which of jsnap's modules this process runs compiled (issue 24, item 2).

Where it can, `pip install` compiles some modules with mypyc from their ordinary source
(setup.py says which, and when it falls back). Python then imports the extension module
(`wire.cpython-311-x86_64-linux-gnu.so`) instead of the `wire.py` beside it. `jsnap status
--json` reports what this finds ("compiled"), so a user and the tests can tell.
"""

from __future__ import annotations

import sys
from importlib.machinery import EXTENSION_SUFFIXES


def compiled_packages() -> list[str]:
    """The folders of jsnap (`nbd`, ...) with a module imported compiled in this process,
    sorted; [] when all of it runs interpreted. It reads sys.modules only: the caller
    imports the packages it asks about."""
    found = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if name.startswith("jsnap.") and path.endswith(tuple(EXTENSION_SUFFIXES)):
            found.add(name.split(".")[1])
    return sorted(found)
