"""A pool whose journal is a block device (issue 21), served by a real `jsnap serve` and
killed with SIGKILL under writes: every acknowledged write that a FLUSH or FUA covered
reads back after the restart, and `jsnap check` finds the pool consistent. The journal
device (a loop device) is smaller than the data written, so it wraps and the destager
drains it from the device while the writes go on. Needs root and losetup: required in CI."""

from __future__ import annotations

import json
import random
import re
import subprocess

import pytest
from interop_util import CLI_TIMEOUT, JsnapServer, jsnap_command
from loopdev import loop_device

from jsnap.stores.nbd_client import NbdClient

MiB = 1 << 20
VOLUME = 32 * MiB
SIZES = (512, 4096, 4096 + 512, 16 << 10, 64 << 10, 200_000)


def load(srv: JsnapServer, export: str, image: bytearray, rng: random.Random,
         total: int) -> None:
    """About `total` bytes of writes (and a few zeroes and trims), a quarter with FUA and a
    FLUSH every 16, ending with a FLUSH: afterwards every one is durable, so `image` is
    what the volume must read."""
    with NbdClient(srv.socket, export) as c:
        done = n = 0
        while done < total:
            length = rng.choice(SIZES)
            off = rng.randrange(0, (VOLUME - length) // 512) * 512
            what = rng.random()
            if what < 0.05:
                c.zero(length, off, fua=rng.random() < 0.25)
                image[off : off + length] = bytes(length)
            elif what < 0.08:
                c.trim(length, off)
                image[off : off + length] = bytes(length)
            else:
                data = rng.randbytes(length)
                c.pwrite(data, off, fua=rng.random() < 0.25)
                image[off : off + length] = data
            done += length
            n += 1
            if n % 16 == 0:
                c.flush()
        c.flush()


def verify(srv: JsnapServer, export: str, image: bytearray) -> None:
    with NbdClient(srv.socket, export) as c:
        for off in range(0, VOLUME, 4 * MiB):
            got = c.pread(4 * MiB, off)
            if got != image[off : off + 4 * MiB]:
                bad = next(i for i in range(4 * MiB) if got[i] != image[off + i])
                pytest.fail(f"{export}: byte {off + bad} lost an acknowledged write\n"
                            f"{srv.log_text()}")


@pytest.mark.crash
@pytest.mark.parametrize("durability", ["writeback", "sync"])
def test_journal_on_a_device_keeps_every_acknowledged_write_through_sigkill(tmp_path,
                                                                            durability):
    with loop_device(tmp_path / "journal.img", 8 * MiB) as dev:
        srv = JsnapServer(tmp_path)
        try:
            p = subprocess.run([*jsnap_command(), "init", srv.pool, "--journal-path", dev,
                                "--durability", durability], capture_output=True, text=True,
                               timeout=CLI_TIMEOUT)
            assert p.returncode == 0, p.stderr
            srv.cli("volume", "create", "thin", "--size", str(VOLUME))
            srv.cli("volume", "create", "raw", "--size", str(VOLUME), "--raw")
            images = {name: bytearray(VOLUME) for name in ("thin", "raw")}
            rng = random.Random(f"device-{durability}")
            srv.start()
            for _ in range(2):
                for name, image in images.items():
                    load(srv, name, image, rng, 12 * MiB)
                srv.kill()  # SIGKILL: what is not destaged lives only on the device
                srv.start()
                m = re.search(r"replayed (\d+) journal records", srv.logs[-1].read_text())
                assert m and int(m.group(1)) > 0, "the restart replayed from the device"
                for name, image in images.items():
                    verify(srv, name, image)
            srv.stop()
            p = srv.cli("check")
            assert "pool is consistent" in p.stdout, p.stdout
            st = json.loads(srv.cli("status", "--json").stdout)
            assert st["journal_size"] == 8 * MiB
        finally:
            srv.kill()  # before the device goes away
