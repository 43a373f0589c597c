"""TLS (`serve --tls-cert/--tls-key/--tls-ca/--tls`) against real clients: nbdinfo, nbdcopy,
libnbd, qemu-img and qemu-io over `nbds://`, plain clients refused (and told nothing) by a
TLS-only server, client certificates checked, and bad CLI arguments reported in one line.

Certificates come from the openssl CLI (certs.py). libnbd reads a client's credentials from a
directory (`?tls-certificates=DIR`), qemu from `tls-creds-x509,dir=DIR`: the same layout.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from certs import Pki, make_pki
from interop_util import make_image, require_tool, run, run_libnbd_json
from raw_nbd import (
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_STARTTLS,
    REP_ACK,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_INFO,
    REP_SERVER,
    RawClient,
    go_data,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_args(pki: Pki, *, ca: bool = True, mode: str | None = None) -> list[str]:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    if ca:
        args += ["--tls-ca", str(pki.ca_cert)]
    if mode:
        args += ["--tls", mode]
    return args


def nbds(srv, export: str, creds: Path) -> str:
    return f"nbds://127.0.0.1:{srv.port}/{export}?tls-certificates={creds}"


def qemu_opts(srv, export: str, creds: Path | None) -> list[str]:
    """qemu-img / qemu-io arguments opening `export` (over TLS when `creds` is given)."""
    opts = f"driver=nbd,host=127.0.0.1,port={srv.port},export={export}"
    if creds is None:
        return ["--image-opts", opts]
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts", opts + ",tls-creds=tls0"]


def qemu_io(srv, export: str, creds: Path | None, *commands: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("qemu-io"), *qemu_opts(srv, export, creds)]
    for c in commands:
        cmd += ["-c", c]
    p = run(cmd, check=check)
    if check:
        out = p.stdout + p.stderr
        assert "failed" not in out.lower() and "error" not in out.lower(), out
    return p


def wait_for_log(srv, *needles: str, timeout: float = 10.0) -> str:
    """The server log once it contains one of `needles` (the server logs a connection's
    end just after closing it, so a client may see the close first)."""
    deadline = time.monotonic() + timeout
    while True:
        log = srv.log_text()
        if any(n in log for n in needles):
            return log
        if time.monotonic() > deadline:
            pytest.fail(f"none of {needles} in the server log:\n{log}")
        time.sleep(0.05)


def tls_server(jsnap_server, pki: Pki, volumes=None, **kw):
    srv = jsnap_server(volumes or {"disk0": "32M", "other": "8M"}, tcp=True, start=False)
    return srv.start(*tls_args(pki, **kw))


# -- TLS clients ------------------------------------------------------------------------------


def test_tls_nbdinfo_qemu_io_and_qemu_img_read_and_write(jsnap_server, pki, tmp_path):
    nbdinfo = require_tool("nbdinfo")
    srv = tls_server(jsnap_server, pki)
    alice = pki.clients["alice"]
    info = json.loads(run([nbdinfo, "--json", nbds(srv, "disk0", alice)]).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 32 * MiB
    listed = json.loads(run([nbdinfo, "--list", "--json",
                             nbds(srv, "", alice)]).stdout)["exports"]
    assert {e["export-name"] for e in listed} == {"disk0", "other"}
    # The unix socket speaks TLS too.
    unix = f"nbds+unix:///disk0?socket={srv.socket}&tls-certificates={alice}"
    assert run([nbdinfo, "--size", unix]).stdout.strip() == str(32 * MiB)

    # qemu-io writes patterns over TLS; separate qemu-io processes read them back (-P).
    qemu_io(srv, "disk0", alice, "write -P 0xa5 0 4M", "write -P 0x3c -f 5000000 3000001",
            "write -z 9M 1M", "flush")
    qemu_io(srv, "disk0", alice, "read -P 0xa5 0 4M", "read -P 0x3c 5000000 3000001",
            "read -P 0 9M 1M", "read -P 0 4M 800000")
    # A pattern that is not there must fail: the check above can tell.
    p = qemu_io(srv, "disk0", alice, "read -P 0x77 0 4096", check=False)
    assert "Pattern verification failed" in p.stdout + p.stderr

    # qemu-img: a whole image in over TLS, compared back over TLS.
    img = require_tool("qemu-img")
    src = tmp_path / "src.raw"
    make_image(src, 8 * MiB, seed=41)
    obj = ["--object", f"tls-creds-x509,id=tls0,dir={alice},endpoint=client"]
    target = (f"driver=nbd,host=127.0.0.1,port={srv.port},export=other,tls-creds=tls0")
    run([img, "convert", "-n", *obj, "--image-opts", f"driver=file,filename={src}",
         "--target-image-opts", target])
    run([img, "compare", *obj, "--image-opts", f"driver=raw,file.filename={src}",
         f"driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={srv.port},"
         f"file.export=other,file.tls-creds=tls0"])
    log = srv.log_text()
    assert "over TLSv1.3" in log or "over TLSv1.2" in log
    assert "Traceback" not in log


def test_tls_nbdcopy_many_connections_and_libnbd_mixed_traffic(jsnap_server, pki, tmp_path):
    """nbdcopy (several connections, many requests in flight, 1+ MiB requests) copies an
    image in and out over TLS; then one libnbd connection keeps 64 requests in flight mixing
    FUA writes (answered by the server's durable sender thread), plain writes, flushes and
    verified reads (answered by the connection thread): both threads write TLS records on
    one session, so any interleaving bug breaks the stream or the data."""
    nbdcopy = require_tool("nbdcopy")
    srv = tls_server(jsnap_server, pki)
    alice = pki.clients["alice"]
    src = tmp_path / "src.raw"
    data = make_image(src, 32 * MiB, seed=42)
    run([nbdcopy, "--connections=4", "--requests=16", str(src), nbds(srv, "disk0", alice)],
        timeout=120)
    out = tmp_path / "out.raw"
    run([nbdcopy, "--connections=4", nbds(srv, "disk0", alice), str(out)], timeout=120)
    assert out.read_bytes() == data

    r = run_libnbd_json(r"""
import json, random, sys
import nbd
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated()
rng = random.Random(5)
size = h.get_size()
A = rng.randbytes(8 << 20)
h.pwrite(A, 0)
blocks = list(range((8 << 20) // 65536, size // 65536))
rng.shuffle(blocks)
written, reads, bad = {}, [], 0
for i, b in enumerate(blocks):
    d = rng.randbytes(65536)
    h.aio_pwrite(d, b * 65536, flags=nbd.CMD_FLAG_FUA if i % 3 == 0 else 0)
    written[b] = d
    if i % 40 == 0:
        h.aio_flush()
    off = rng.randrange(0, (8 << 20) - 300000)
    n = rng.randrange(1, 300000)
    buf = nbd.Buffer(n)
    h.aio_pread(buf, off)
    reads.append((buf, off, n))
    while h.aio_in_flight() >= 64:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
for buf, off, n in reads:
    bad += buf.to_bytearray() != A[off:off + n]
h.flush()
wrong = [b for b, d in written.items() if h.pread(65536, b * 65536) != d]
print(json.dumps({"reads": len(reads), "bad_reads": bad, "writes": len(written),
                  "wrong": len(wrong)}))
""", nbds(srv, "disk0", alice), timeout=180)
    assert r == {"reads": 384, "bad_reads": 0, "writes": 384, "wrong": 0}
    assert "Traceback" not in srv.log_text()


# -- plain clients against TLS ----------------------------------------------------------------


def test_tls_require_refuses_plain_clients_and_tells_them_nothing(jsnap_server, pki):
    nbdinfo = require_tool("nbdinfo")
    srv = tls_server(jsnap_server, pki)
    for args in (["--list", f"nbd://127.0.0.1:{srv.port}"], [f"nbd://127.0.0.1:{srv.port}/disk0"],
                 ["--list", srv.uri()]):  # the unix socket requires TLS too
        p = run([nbdinfo, *args], check=False)
        assert p.returncode != 0, p.stdout
        assert "disk0" not in p.stdout and "other" not in p.stdout
    p = qemu_io(srv, "disk0", None, "read 0 4096", check=False)
    assert p.returncode != 0 and "read 4096/4096" not in p.stdout

    # On the wire: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, with no
    # NBD_REP_SERVER or NBD_REP_INFO before it; the message names no export.
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    for opt, data in [(OPT_LIST, b""), (OPT_GO, go_data("disk0")), (OPT_INFO, go_data("disk0")),
                      (OPT_GO, go_data("")), (0x4242, b"whatever"), (OPT_GO, b"\x00")]:
        raw.send_option(opt, data)
        replies = raw.option_replies(opt)
        assert [t for t, _ in replies] == [REP_ERR_TLS_REQD], (opt, replies)
        assert b"disk0" not in replies[0][1] and b"other" not in replies[0][1]
    raw.send_option(OPT_ABORT)
    assert [t for t, _ in raw.option_replies(OPT_ABORT)] == [REP_ACK]
    raw.close()
    # NBD_OPT_EXPORT_NAME cannot be refused: the connection is closed, nothing sent.
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    raw.send_option(OPT_EXPORT_NAME, b"disk0")
    raw.sock.settimeout(10)
    assert raw.sock.recv(100) == b""
    raw.close()
    assert "Traceback" not in srv.log_text()


def test_tls_plaintext_sent_behind_starttls_is_not_obeyed(jsnap_server, pki):
    """STARTTLS with an NBD_OPT_GO queued right behind it in the clear: the server must not
    take the GO as if it came over TLS (the STARTTLS injection bug class)."""
    srv = tls_server(jsnap_server, pki)
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    opt = b"IHAVEOPT"
    raw.sock.sendall(opt + struct.pack(">II", OPT_STARTTLS, 0)
                     + opt + struct.pack(">II", OPT_GO, len(go_data("disk0"))) + go_data("disk0"))
    got = b""
    raw.sock.settimeout(10)
    while chunk := raw.sock.recv(65536):
        got += chunk
    raw.close()
    # At most the STARTTLS ACK (20 bytes) if the GO arrived late, never an NBD_REP_INFO.
    assert len(got) <= 20, got
    assert struct.pack(">I", REP_INFO) not in got
    wait_for_log(srv, "after NBD_OPT_STARTTLS", "TLS error")


def test_tls_handshake_timeout_covers_the_tls_handshake(jsnap_server, pki):
    """A client that gets the STARTTLS ACK and then never starts TLS is closed at the
    handshake timeout, like one that stalls in the clear."""
    srv = jsnap_server({"disk0": "8M"}, tcp=True, start=False)
    srv.start(*tls_args(pki), "--handshake-timeout", "2")
    raw = RawClient(("127.0.0.1", srv.port))
    t0 = time.monotonic()
    raw.start_options()
    raw.send_option(OPT_STARTTLS)
    assert [t for t, _ in raw.option_replies(OPT_STARTTLS)] == [REP_ACK]
    assert raw.wait_closed(10)
    assert 1.5 < time.monotonic() - t0 < 6
    raw.close()
    wait_for_log(srv, "handshake not finished within 2 s")


def test_tls_client_certificate_required_with_ca(jsnap_server, pki):
    nbdinfo = require_tool("nbdinfo")
    srv = tls_server(jsnap_server, pki)
    ok = run([nbdinfo, "--size", nbds(srv, "disk0", pki.clients["bob"])])
    assert ok.stdout.strip() == str(32 * MiB)
    for who in (pki.anonymous, pki.clients["mallory"]):  # no certificate; another CA's
        p = run([nbdinfo, "--size", nbds(srv, "disk0", who)], check=False)
        assert p.returncode != 0 and p.stdout.strip() == "", (who, p.stdout)
        p = qemu_io(srv, "disk0", who, "read 0 4096", check=False)
        assert p.returncode != 0 and "read 4096/4096" not in p.stdout
    wait_for_log(srv, "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    log = wait_for_log(srv, "CERTIFICATE_VERIFY_FAILED")
    assert "Traceback" not in log


def test_tls_without_ca_accepts_clients_without_certificates(jsnap_server, pki, tmp_path):
    # Also: certificate and key in one file, no --tls-key.
    both = tmp_path / "server-both.pem"
    both.write_bytes(pki.server_cert.read_bytes() + pki.server_key.read_bytes())
    srv = jsnap_server({"disk0": "32M"}, tcp=True, start=False)
    srv.start("--tls-cert", str(both))
    nbdinfo = require_tool("nbdinfo")
    p = run([nbdinfo, "--size", nbds(srv, "disk0", pki.anonymous)])
    assert p.stdout.strip() == str(32 * MiB)


def test_tls_allow_serves_plain_and_tls_clients_the_same_data(jsnap_server, pki):
    nbdinfo = require_tool("nbdinfo")
    srv = tls_server(jsnap_server, pki, mode="allow")
    alice = pki.clients["alice"]
    qemu_io(srv, "disk0", None, "write -P 0x11 0 1M")  # plain
    qemu_io(srv, "disk0", alice, "read -P 0x11 0 1M", "write -P 0x22 1M 1M")  # TLS
    qemu_io(srv, "disk0", None, "read -P 0x22 1M 1M")
    plain = json.loads(run([nbdinfo, "--json", f"nbd://127.0.0.1:{srv.port}/disk0"]).stdout)
    assert plain["TLS"] is False
    secure = json.loads(run([nbdinfo, "--json", nbds(srv, "disk0", alice)]).stdout)
    assert secure["TLS"] is True
    names = json.loads(run([nbdinfo, "--list", "--json",
                            f"nbd://127.0.0.1:{srv.port}"]).stdout)["exports"]
    assert {e["export-name"] for e in names} == {"disk0", "other"}


def test_tls_off_answers_starttls_with_policy(jsnap_server, pki):
    """A server without --tls-cert is NOTLS: STARTTLS gets NBD_REP_ERR_POLICY, the session
    goes on in the clear; a client that requires TLS gives up."""
    srv = jsnap_server({"disk0": "8M"}, tcp=True)
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    raw.send_option(OPT_STARTTLS)
    assert [t for t, _ in raw.option_replies(OPT_STARTTLS)] == [REP_ERR_POLICY]
    raw.send_option(OPT_LIST)
    replies = raw.option_replies(OPT_LIST)
    assert [t for t, _ in replies] == [REP_SERVER, REP_ACK]
    raw.close()
    p = run([require_tool("nbdinfo"), "--size", nbds(srv, "disk0", pki.clients["alice"])],
            check=False)
    assert p.returncode != 0


# -- CLI errors ------------------------------------------------------------------------------


def _serve_error(srv, *args: str) -> str:
    cmd = [sys.executable, "-m", "jsnap", "-p", srv.pool, "serve", "--socket",
           str(srv.base / "x.sock"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_tls_bad_arguments_are_one_line_errors(jsnap_server, pki, tmp_path):
    srv = jsnap_server({"disk0": "8M"}, start=False)
    cert, key = str(pki.server_cert), str(pki.server_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted-key.pem"
    run([require_tool("openssl"), "pkey", "-in", key, "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)])
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem")], "missing.pem: no such file"),
        (["--tls-cert", cert], "no private key in it (give --tls-key)"),
        (["--tls-cert", cert, "--tls-key", str(tmp_path / "nokey.pem")], "no such file"),
        (["--tls-cert", str(garbage), "--tls-key", key], "garbage.pem: no PEM CERTIFICATE"),
        (["--tls-cert", str(broken), "--tls-key", key], "cannot use TLS certificate"),
        (["--tls-cert", cert, "--tls-key", str(garbage)], "garbage.pem: no PEM PRIVATE KEY"),
        (["--tls-cert", cert, "--tls-key", str(pki.clients["alice"] / "client-key.pem")],
         "key does not match the certificate"),
        (["--tls-cert", cert, "--tls-key", str(encrypted)], "encrypted"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-ca", str(garbage)],
         "garbage.pem: no PEM CERTIFICATE"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-ca", str(broken)],
         "cannot use TLS CA file"),
        (["--tls-key", key], "--tls-key needs --tls-cert"),
        (["--tls", "allow"], "--tls needs --tls-cert"),
        (["--tls-cert", cert, "--tls", "sometimes"], "invalid choice"),
        (["--handshake-timeout", "soon"], "invalid duration"),
        (["--max-connections", "0"], "invalid count"),
        (["--max-inflight-bytes", "lots"], "--max-inflight-bytes"),
        (["--max-inflight-bytes", "0"], "must be positive"),
    ]
    if os.geteuid() != 0:  # root reads any file: an unreadable key cannot be made
        unreadable = tmp_path / "unreadable-key.pem"
        unreadable.write_bytes(Path(key).read_bytes())
        unreadable.chmod(0)
        cases.append((["--tls-cert", cert, "--tls-key", str(unreadable)], "not readable"))
    for args, expected in cases:
        line = _serve_error(srv, *args)
        assert expected in line, (args, line)
    assert not os.path.exists(os.path.join(srv.pool, "admin.sock"))
