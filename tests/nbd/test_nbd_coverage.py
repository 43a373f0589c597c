"""The codec keeps 100% branch coverage (STYLE: pure packages stay fully covered).

Coverage sees Python lines only: where `pip install` compiled the codec with mypyc (setup.py),
its modules import as extension modules and no line of them would count. So the nested run
imports jsnap from a copy of its source without them: the codec interpreted, always.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import jsnap

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(os.environ.get("JSNAP_NBD_COVERAGE_RUN") == "1", reason="nested run")
def test_nbd_codec_branch_coverage_is_complete(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.dirname(jsnap.__file__), src / "jsnap",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "JSNAP_NBD_COVERAGE_RUN": "1", "COVERAGE_FILE": str(tmp_path / "cov"),
           "PYTHONPATH": path}
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE,
         "--cov=jsnap.nbd", "--cov-branch", "--cov-report=term-missing", "--cov-fail-under=100"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    # Measured in the copy (paths shown relative to cwd), not in a compiled tree.
    assert os.path.join("src", "jsnap", "nbd", "wire.py") + " " in p.stdout, p.stdout[-4000:]
