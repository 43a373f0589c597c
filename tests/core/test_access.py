"""jsnap.core.access: rule matching, validation, storage in the catalog (real clients:
interop)."""

from __future__ import annotations

import ipaddress

import pytest

from jsnap.core import access as acl
from jsnap.core.engine import Engine
from jsnap.errors import InvalidRequest, NotFound, PoolError


def ip(text: str) -> acl.IPAddress:
    return ipaddress.ip_address(text)


def test_acl_rule_needs_every_listed_kind_to_match() -> None:
    by_net = acl.Rule(("10.0.0.0/8", "2001:db8::/32"))
    assert by_net.admits(ip("10.1.2.3")) and by_net.admits(ip("2001:db8::5"))
    assert not by_net.admits(ip("192.168.0.1"))
    assert by_net.admits(ip("::ffff:10.9.9.9"))  # IPv4 client on a dual-stack listener
    assert by_net.admits(None)  # unix socket
    by_cn = acl.Rule((), ("alice",))
    assert by_cn.admits(ip("1.2.3.4"), ["alice"]) and not by_cn.admits(ip("1.2.3.4"), ["bob"])
    assert not by_cn.admits(ip("1.2.3.4"))  # no certificate
    both = acl.Rule(("10.0.0.0/8",), ("alice",))
    assert both.admits(ip("10.0.0.1"), ["alice"])
    assert not both.admits(ip("10.0.0.1"), ["bob"])
    assert not both.admits(ip("127.0.0.1"), ["alice"])


@pytest.mark.parametrize(("text", "expected"), [
    ("10.1.2.3/8", "10.0.0.0/8"), ("192.168.1.7", "192.168.1.7/32"), (" fd00::/8 ", "fd00::/8"),
])
def test_acl_networks_are_normalised(text: str, expected: str) -> None:
    assert str(acl.parse_network(text)) == expected


@pytest.mark.parametrize("text", ["10.0.0.300/8", "10.0.0.0/33", "example.com", ""])
def test_acl_bad_networks_are_refused_readably(text: str) -> None:
    with pytest.raises(ValueError, match="invalid address"):
        acl.parse_network(text)


def test_acl_subjects_accept_a_cn_prefix() -> None:
    assert acl.parse_subject("CN=backup") == acl.parse_subject("backup") == "backup"
    for bad in ("", "CN=", "a\nb"):
        with pytest.raises(ValueError, match="invalid subject"):
            acl.parse_subject(bad)


def test_acl_rules_are_stored_in_the_pool(pool_path: str) -> None:
    with Engine.open(pool_path, start_destager=False) as e:
        e.volume_create("vol", 1 << 20)
        assert e.access.rules() == {}
        rule = e.access.set_rule("vol", ["10.0.0.1/8", "10.0.0.0/8"], ["CN=a", "b"])
        assert rule == acl.Rule(("10.0.0.0/8",), ("a", "b"))  # duplicates dropped
        assert e.access.rule_for("vol") == rule
        with pytest.raises(NotFound):
            e.access.set_rule("nosuch", ["10.0.0.0/8"], [])
        with pytest.raises(InvalidRequest, match="at least one"):
            e.access.set_rule("vol", [], [])
        with pytest.raises(InvalidRequest, match="invalid address"):
            e.access.set_rule("vol", ["nope"], [])
    with Engine.open(pool_path, start_destager=False) as e:  # a fresh Engine reads it back
        assert e.access.rules() == {"vol": rule}
        e.access.clear_rule("vol")
        e.access.clear_rule("vol")
        assert e.access.rules() == {}
        with pytest.raises(NotFound):
            e.access.clear_rule("nosuch")
        e.catalog.set_many({acl.META_KEY: "{not json"})
    with Engine.open(pool_path, start_destager=False) as e:
        with pytest.raises(PoolError, match="damaged"):
            e.access.rules()
