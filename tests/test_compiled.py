"""The compiled hot path (issue 24, item 2; setup.py): where `pip install` compiled the codec
with mypyc, status says so, and the build falls back to the interpreted modules when it
cannot compile (no compiler, JSNAP_NO_COMPILE=1) instead of failing.

CI sets JSNAP_REQUIRE_COMPILED=1: there the codec must run compiled (.ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import jsnap
from jsnap.compiled import compiled_packages
from jsnap.nbd import wire

ROOT = Path(__file__).resolve().parent.parent
PKG = Path(jsnap.__file__).parent
COMPILED = wire.__file__.endswith(".so")


def test_compiled_packages_says_whether_the_codec_is_compiled():
    assert compiled_packages() == (["nbd"] if COMPILED else [])
    if os.environ.get("JSNAP_REQUIRE_COMPILED") == "1":
        assert COMPILED, f"the codec runs interpreted: {wire.__file__}"


def test_compiled_modules_are_not_older_than_their_source():
    """An editable install leaves the .so files in src/, where Python imports them before the
    .py beside them: after an edit to a compiled module, its old code would run. mypyc puts
    every module's code in one library beside the package (`jsnap__mypyc...so`)."""
    if not COMPILED:
        pytest.skip("the codec runs interpreted here")
    (lib,) = PKG.parent.glob("jsnap__mypyc.*")
    stale = [str(py) for so in PKG.rglob("*.so")
             if (py := so.with_name(so.name.split(".")[0] + ".py")).stat().st_mtime
             > lib.stat().st_mtime]
    assert not stale, (f"edited since compiled: {stale}; run the pip install again, or "
                       "JSNAP_NO_COMPILE=1 pip install -e . to run the source")


def test_compiled_packages_is_empty_for_a_copy_without_extension_modules(tmp_path):
    shutil.copytree(PKG, tmp_path / "jsnap", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    p = subprocess.run([sys.executable, "-c", "import jsnap.nbd, jsnap.compiled as c; "
                        "print(c.compiled_packages(), jsnap.nbd.__file__)"],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert p.stdout.split() == ["[]", str(tmp_path / "jsnap" / "nbd" / "__init__.py")]


def test_status_json_reports_compiled(tmp_path):
    def jsnap_cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "jsnap", *args], capture_output=True,
                              text=True, check=True).stdout
    jsnap_cli("init", str(tmp_path / "pool"))
    st = json.loads(jsnap_cli("-p", str(tmp_path / "pool"), "status", "--json"))
    assert st["compiled"] == (["nbd"] if COMPILED else [])


def _build(tmp_path: Path, stale: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """setup.py build_ext on a copy of the tree, with `env` added, and `stale` there as an
    earlier editable install would have left it."""
    pytest.importorskip("mypyc")
    pytest.importorskip("setuptools")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src" / "jsnap", tree / "src" / "jsnap",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    stale.write_bytes(b"")
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", "out",
                           "--build-temp", "tmp"], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.mark.parametrize("env", [{"CC": "false"}, {"JSNAP_NO_COMPILE": "1"}],
                         ids=["no-compiler", "JSNAP_NO_COMPILE"])
def test_build_falls_back_to_the_interpreted_modules(tmp_path, env):
    stale = tmp_path / "tree" / "src" / "jsnap" / "nbd" / "wire.cpython-311-x86_64-linux-gnu.so"
    p = _build(tmp_path, stale=stale, **env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "installing the interpreted modules only" in p.stderr, p.stderr[-2000:]
    assert not list((tmp_path / "tree").rglob("*.so"))  # the stale one removed too
