"""The codec keeps 100% branch coverage (STYLE: pure packages stay fully covered)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(os.environ.get("JSNAP_NBD_COVERAGE_RUN") == "1", reason="nested run")
def test_nbd_codec_branch_coverage_is_complete(tmp_path):
    env = {**os.environ, "JSNAP_NBD_COVERAGE_RUN": "1", "COVERAGE_FILE": str(tmp_path / "cov")}
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", HERE,
         "--cov=jsnap.nbd", "--cov-branch", "--cov-report=term-missing", "--cov-fail-under=100"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
