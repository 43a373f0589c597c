"""Optional compiled modules (issue 24, item 2): mypyc compiles the per-request modules
listed in COMPILED from their ordinary annotated source, where it can.

pyproject.toml is the metadata; this file only adds the extension modules. Where there is no
C compiler, no Python headers, a compile that fails, or JSNAP_NO_COMPILE=1 in the
environment, the build still succeeds and installs the interpreted modules alone (the same
source). Which ones a process runs compiled: `jsnap status --json` ("compiled").

Python imports an extension module (`wire.cpython-311-x86_64-linux-gnu.so`) before the
`wire.py` beside it. An editable install (`pip install -e .`) builds them into src/ (git
ignores them there): after editing a compiled module, run the install again; a build
that does not compile (JSNAP_NO_COMPILE=1, or a failure) removes them.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Measured before being kept (BENCHMARKS.md, run 18). Not compiled: modules the tests
# monkeypatch; nbd/__init__.py (re-exports, run once); nbd/events.py, whose dataclasses declare
# `ClassVar` defaults (`Read.command`), which mypyc 2.4 hands to @dataclass as plain fields.
NOT_COMPILED = {"__init__.py", "events.py"}
COMPILED = sorted(p for p in glob.glob("src/jsnap/nbd/*.py")
                  if os.path.basename(p) not in NOT_COMPILED)


def why_not_compiled() -> str | None:
    """None if mypyc may be tried here, else why not."""
    if os.environ.get("JSNAP_NO_COMPILE", "") not in ("", "0"):
        return "JSNAP_NO_COMPILE is set"
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, not {sys.implementation.name}"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python headers (Debian: python3-dev)"
    return None


def remove_inplace() -> None:
    """Remove what an earlier editable install compiled into src/: Python would import those
    before the interpreted modules this build installs."""
    for path in [*glob.glob("src/jsnap__mypyc.*"),
                 *(g for py in COMPILED for g in glob.glob(py[:-3] + ".*.so"))]:
        os.remove(path)
        print(f"jsnap: removed {path}", file=sys.stderr)


def extensions() -> list:
    why = why_not_compiled()
    if why is None:
        try:
            from mypyc.build import mypycify
        except ImportError:
            why = "mypyc (mypy) is not installed in the build environment"
        else:
            try:
                # mypy reads [tool.mypy] from pyproject.toml; its overrides name modules this
                # build does not check, which warn_unused_configs would make an error.
                exts = mypycify(["--no-warn-unused-configs", *COMPILED], group_name="jsnap")
            except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
                why = f"mypyc failed: {exc!r}"
            else:
                for ext in exts:
                    ext.optional = True  # a failing compiler leaves the interpreted modules
                return exts
    print(f"jsnap: installing the interpreted modules only: {why}", file=sys.stderr)
    remove_inplace()
    return []


class OptionalBuildExt(build_ext):
    """All or nothing: if any module fails to compile (no compiler, a compiler error), none
    is installed, so a compiled module never imports without the shared runtime library
    mypyc builds beside them (`jsnap__mypyc`)."""

    def run(self) -> None:
        # setuptools' run() builds into build_lib, then copies into src/ for an editable
        # install (inplace): here the check comes between the two.
        inplace, self.inplace = self.inplace, False
        try:
            super(build_ext, self).run()  # distutils' run: build only
        except Exception as exc:  # setuptools' and distutils' compile and link errors
            self._give_up(f"{exc}")
            return
        finally:
            self.inplace = inplace
        missing = [e.name for e in self.extensions if not os.path.exists(self._built(e.name))]
        if missing:
            self._give_up(f"not built: {', '.join(missing)}")
        elif inplace:
            self.copy_extensions_to_source()

    def _built(self, name: str) -> str:
        return os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(name)))

    def _give_up(self, why: str) -> None:
        for ext in self.extensions:
            if os.path.exists(self._built(ext.name)):
                os.remove(self._built(ext.name))
        self.extensions = []
        self.distribution.ext_modules = []
        remove_inplace()
        print(f"jsnap: compiling failed, installing the interpreted modules only: {why}",
              file=sys.stderr)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
