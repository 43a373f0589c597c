"""Test certificates made with the openssl CLI: a CA, a server certificate for 127.0.0.1 and
localhost, client certificates, and a second ("rogue") CA with a client of its own.

`make_pki(base)` writes PEM files under `base` and returns their paths. Client credentials
are laid out as both libnbd and qemu's tls-creds-x509 (endpoint=client) expect them: one
directory per client holding `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
EC P-256 keys: key generation takes milliseconds, and GnuTLS (libnbd, qemu) accepts them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from interop_util import require_tool


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    #: client name -> directory with ca-cert.pem, client-cert.pem, client-key.pem
    clients: dict[str, Path]
    #: a CA directory only (ca-cert.pem): a client that can verify the server, no identity
    anonymous: Path


def _openssl(*args: str) -> None:
    p = subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr}"


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path))


def _ca(d: Path, cn: str) -> tuple[Path, Path]:
    key, cert = d / "ca-key.pem", d / "ca-cert.pem"
    _key(key)
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "3",
             "-subj", f"/CN={cn}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _leaf(d: Path, stem: str, cn: str, ca_key: Path, ca_cert: Path, ext: str) -> tuple[Path,
                                                                                         Path]:
    key, csr, cert, extfile = (d / f"{stem}-key.pem", d / f"{stem}.csr",
                               d / f"{stem}-cert.pem", d / f"{stem}.ext")
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=jsnap tests/CN={cn}")
    extfile.write_text(ext)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "3", "-extfile", str(extfile))
    return key, cert


def _client_dir(d: Path, name: str, ca_key: Path, ca_cert: Path, trust: Path) -> Path:
    out = d / name
    out.mkdir()
    key, cert = _leaf(d, name, name, ca_key, ca_cert,
                      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                      "extendedKeyUsage=clientAuth\n")
    (out / "ca-cert.pem").write_bytes(trust.read_bytes())  # to verify the server
    (out / "client-cert.pem").write_bytes(cert.read_bytes())
    (out / "client-key.pem").write_bytes(key.read_bytes())
    return out


def make_pki(base: Path, clients: tuple[str, ...] = ("alice", "bob")) -> Pki:
    base.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(base, "jsnap test CA")
    server_key, server_cert = _leaf(
        base, "server", "localhost", ca_key, ca_cert,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    made = {name: _client_dir(base, name, ca_key, ca_cert, ca_cert) for name in clients}
    rogue = base / "rogue-ca"
    rogue.mkdir()
    rogue_key, rogue_cert = _ca(rogue, "rogue CA")
    # Signed by another CA, but trusts the real one, so only the server's check can fail.
    made["mallory"] = _client_dir(base, "mallory", rogue_key, rogue_cert, ca_cert)
    anonymous = base / "anonymous"
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    return Pki(ca_cert, server_cert, server_key, made, anonymous)
