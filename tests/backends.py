"""NBD servers as production backends in tests: `nbdkit` started in the foreground on a
unix socket (the `nbdkit` fixture makes them), killed by PID at the end."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest


def _require_nbdkit() -> str:
    from conftest import require_tool  # noqa: PLC0415 - the top conftest, at run time

    return require_tool("nbdkit")


class Nbdkit:
    """`nbdkit -f -U SOCK ARGS...` in the foreground, killed by PID at the end."""

    def __init__(self, sock: Path, *args: str) -> None:
        self.sock, self.args = sock, args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Nbdkit:
        exe = _require_nbdkit()
        if self.sock.exists():
            self.sock.unlink()
        log = self.sock.with_suffix(".log")
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([exe, "-f", "-U", str(self.sock), *self.args],
                                         stderr=err)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert self.proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def nbdkit(tmp_path):
    started: list[Nbdkit] = []

    def make(*args: str, name: str = "nbdkit.sock") -> Nbdkit:
        k = Nbdkit(tmp_path / name, *args).start()
        started.append(k)
        return k

    yield make
    for k in started:
        k.kill()
