"""Per-volume access rules (`jsnap acl set|list|clear`) against real clients.

A rule lists allowed client networks and/or certificate common names; it covers the volume
and its snapshots, is checked when a client names an export (NBD_REP_ERR_POLICY, or a close
for NBD_OPT_EXPORT_NAME), hides the export from NBD_OPT_LIST, and never applies to
unix-socket clients. The CLI works on a stopped pool and, through the admin API, on a
running server, where a change applies to the next connection.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
from certs import make_pki
from interop_util import require_tool, run
from raw_nbd import (
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    REP_ACK,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_INFO,
    REP_SERVER,
    RawClient,
    go_data,
)
from test_tls import nbds, qemu_io, tls_args

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tcp(srv, export: str = "") -> str:
    return f"nbd://127.0.0.1:{srv.port}/{export}"


def _size_ok(uri: str) -> bool:
    p = run([require_tool("nbdinfo"), "--size", uri], check=False)
    return p.returncode == 0


def _listed(uri: str) -> set[str]:
    p = run([require_tool("nbdinfo"), "--list", "--json", uri])
    return {e["export-name"] for e in json.loads(p.stdout)["exports"]}


def _acl_json(srv) -> list[dict]:
    return json.loads(srv.cli("acl", "list", "--json").stdout)


def _cli_error(srv, *args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "jsnap", "-p", srv.pool, *args],
                       capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return p.returncode, lines[0]


def test_acl_by_address_offline_live_and_across_restart(jsnap_server):
    srv = jsnap_server({"vol": "8M", "other": "8M"}, tcp=True, start=False)
    # Without a server: the CLI opens the pool itself.
    out = srv.cli("acl", "set", "vol", "--allow-address", "10.0.0.0/8",
                  "--allow-address", "192.168.1.7").stdout
    assert "10.0.0.0/8" in out
    assert _acl_json(srv) == [{"volume": "vol", "addresses": ["10.0.0.0/8", "192.168.1.7/32"],
                               "subjects": []}]
    assert _cli_error(srv, "acl", "set", "nosuch", "--allow-address", "10.0.0.0/8") == (
        1, "jsnap: error: no volume named 'nosuch'")
    rc, line = _cli_error(srv, "acl", "set", "vol", "--allow-address", "10.0.0.300/8")
    assert rc == 2 and "invalid address '10.0.0.300/8'" in line
    rc, line = _cli_error(srv, "acl", "set", "vol")
    assert rc == 1 and "at least one address or subject" in line

    srv.start()
    srv.cli("snapshot", "create", "vol", "s1")
    # 127.0.0.1 is not in the rule: vol and its snapshot are refused and hidden.
    assert not _size_ok(_tcp(srv, "vol"))
    assert not _size_ok(_tcp(srv, "vol@s1"))
    assert _size_ok(_tcp(srv, "other"))
    assert _listed(_tcp(srv)) == {"other"}
    # Unix-socket clients are local: always admitted.
    assert _size_ok(srv.uri("vol")) and _size_ok(srv.uri("vol@s1"))
    assert _listed(srv.uri()) == {"vol", "vol@s1", "other"}

    # Through the running server: effective for the next connection, no restart.
    srv.cli("acl", "set", "vol", "--allow-address", "127.0.0.0/8")
    assert _size_ok(_tcp(srv, "vol")) and _size_ok(_tcp(srv, "vol@s1"))
    assert _listed(_tcp(srv)) == {"vol", "vol@s1", "other"}
    srv.cli("acl", "set", "vol", "--allow-address", "::1/128")
    assert not _size_ok(_tcp(srv, "vol"))
    srv.cli("acl", "clear", "vol")
    assert _size_ok(_tcp(srv, "vol"))
    srv.cli("acl", "clear", "vol")  # nothing to clear: fine
    assert _acl_json(srv) == []
    assert "VOLUME" in srv.cli("acl", "list").stdout

    srv.cli("acl", "set", "other", "--allow-address", "10.1.0.0/16")
    srv.restart()  # the rule was stored by the live server: it survives
    assert not _size_ok(_tcp(srv, "other"))
    assert _acl_json(srv) == [{"volume": "other", "addresses": ["10.1.0.0/16"],
                               "subjects": []}]
    assert "Traceback" not in srv.log_text()


def test_acl_refusals_on_the_wire(jsnap_server):
    """GO / INFO of a refused export get NBD_REP_ERR_POLICY with no NBD_REP_INFO; the old
    NBD_OPT_EXPORT_NAME, which cannot be refused, gets the connection closed."""
    srv = jsnap_server({"vol": "8M", "other": "8M"}, tcp=True)
    srv.cli("acl", "set", "vol", "--allow-address", "10.0.0.0/8")
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    for opt in (OPT_GO, OPT_INFO):
        raw.send_option(opt, go_data("vol"))
        assert [t for t, _ in raw.option_replies(opt)] == [REP_ERR_POLICY]
    raw.send_option(OPT_LIST)
    replies = raw.option_replies(OPT_LIST)
    assert [t for t, _ in replies] == [REP_SERVER, REP_ACK]
    (name_len,) = struct.unpack(">I", replies[0][1][:4])
    assert replies[0][1][4:4 + name_len] == b"other"
    raw.send_option(OPT_GO, go_data("other"))  # the session goes on: another export is fine
    assert [t for t, _ in raw.option_replies(OPT_GO)][-2:] == [REP_INFO, REP_ACK]
    assert raw.read(0, 4096) == bytes(4096)
    raw.close()

    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    raw.send_option(OPT_EXPORT_NAME, b"vol")
    assert raw.wait_closed(10)
    raw.close()
    raw = RawClient(srv.socket)  # the same through the unix socket works
    assert raw.handshake("vol") == 8 * MiB
    raw.close()


def test_acl_by_certificate_subject(jsnap_server, pki):
    srv = jsnap_server({"vol": "8M", "other": "8M"}, tcp=True, start=False)
    srv.start(*tls_args(pki))
    alice, bob = pki.clients["alice"], pki.clients["bob"]
    srv.cli("acl", "set", "vol", "--allow-subject", "alice")
    qemu_io(srv, "vol", alice, "write -P 0x61 0 64k")
    qemu_io(srv, "vol", alice, "read -P 0x61 0 64k")
    p = qemu_io(srv, "vol", bob, "read 0 64k", check=False)
    assert p.returncode != 0
    assert not _size_ok(nbds(srv, "vol", bob))
    assert _size_ok(nbds(srv, "other", bob))
    assert _listed(nbds(srv, "", bob)) == {"other"}
    assert _listed(nbds(srv, "", alice)) == {"vol", "other"}

    srv.cli("acl", "set", "vol", "--allow-subject", "alice", "--allow-subject", "CN=bob")
    assert _acl_json(srv)[0]["subjects"] == ["alice", "bob"]
    qemu_io(srv, "vol", bob, "read -P 0x61 0 64k")
    # Both kinds: from 10/8 AND with alice's certificate; alice on 127.0.0.1 is refused.
    srv.cli("acl", "set", "vol", "--allow-address", "10.0.0.0/8", "--allow-subject", "alice")
    assert not _size_ok(nbds(srv, "vol", alice))
    srv.cli("acl", "set", "vol", "--allow-address", "127.0.0.1/32", "--allow-subject", "alice")
    assert _size_ok(nbds(srv, "vol", alice)) and not _size_ok(nbds(srv, "vol", bob))
    log = srv.log_text()
    assert "denied export 'vol'" in log and "Traceback" not in log


def test_acl_subject_rule_makes_an_export_tls_only_in_allow_mode(jsnap_server, pki):
    """With --tls=allow a plain client may use other exports, but an export only
    certificate holders may use is TLS-only: GO/INFO get NBD_REP_ERR_TLS_REQD (the spec's
    SELECTIVETLS answer), and LIST does not show it."""
    srv = jsnap_server({"vol": "8M", "other": "8M"}, tcp=True, start=False)
    srv.start(*tls_args(pki, mode="allow"))
    srv.cli("acl", "set", "vol", "--allow-subject", "alice")
    raw = RawClient(("127.0.0.1", srv.port))
    raw.start_options()
    raw.send_option(OPT_GO, go_data("vol"))
    assert [t for t, _ in raw.option_replies(OPT_GO)] == [REP_ERR_TLS_REQD]
    raw.send_option(OPT_LIST)
    assert [t for t, _ in raw.option_replies(OPT_LIST)] == [REP_SERVER, REP_ACK]
    raw.close()
    assert _listed(_tcp(srv)) == {"other"}
    assert _size_ok(_tcp(srv, "other"))
    assert _size_ok(nbds(srv, "vol", pki.clients["alice"]))
