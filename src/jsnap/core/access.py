"""Per-volume access control for NBD clients (`jsnap acl set|list|clear`).

Model
-----
A rule names a volume and lists allowed client addresses (CIDR networks) and/or allowed
certificate subjects (the common name, CN, of a client certificate verified against
`serve --tls-ca`). It covers the volume's export and every snapshot export (`VOL@SNAP`).

* No rule for a volume: every client may use it.
* A rule: a TCP client is admitted only if its address is in one of the networks (when any
  are listed) AND its certificate's CN is one of the subjects (when any are listed).
  Listing both therefore means "from there, with that certificate".
* Unix-socket clients are local and always admitted: the socket file's permissions are
  their access control (as they are for POOL/admin.sock).

Checked at NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME and the metadata-context options
(denied: NBD_REP_ERR_POLICY, or closing the connection for EXPORT_NAME); NBD_OPT_LIST shows
only admitted exports. Rules are matched by volume name, so a rule outlives its volume and
applies again to a volume created later under that name (the safe side).

Storage: JSON under the catalog `meta` key "acl", `{"VOL": {"addresses": [...],
"subjects": [...]}}`. The engine owns one AccessRules (`engine.access`): readers use its
in-memory copy, replaced (never mutated) by `set_rule` / `clear_rule`, so a running server
sees a change on its next connection, and NBD connection threads never open SQLite
connections of their own (the catalog gives each thread one, kept until the pool closes).
The admission checks themselves are the transport's (transport/connection.py).
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from jsnap.errors import InvalidRequest, PoolError
from jsnap.stores.catalog import Catalog

META_KEY = "acl"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_network(text: str) -> IPNetwork:
    """`10.0.0.0/8`, `192.168.1.7` (one host), `fd00::/8`; ValueError with a readable
    message otherwise. Host bits are allowed and dropped (`10.1.2.3/8` is `10.0.0.0/8`)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid address {text!r} (expected an IP address or CIDR "
                         f"network, e.g. 10.0.0.0/8)") from None


def parse_subject(text: str) -> str:
    """A certificate common name; a leading `CN=` is accepted and dropped."""
    name = text.strip()
    if name[:3].upper() == "CN=":
        name = name[3:].strip()
    if not name or not name.isprintable():
        raise ValueError(f"invalid subject {text!r} (expected a certificate common name, "
                         f"e.g. CN=backup-host)")
    return name


@dataclass(frozen=True)
class Rule:
    addresses: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "networks", tuple(parse_network(a) for a in self.addresses))

    def admits(self, address: IPAddress | None, common_names: Iterable[str] = ()) -> bool:
        """Whether a client may use the volume: `address` None means a unix-socket client."""
        if address is None:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # an IPv4 client on a dual-stack listener
        if self.networks and not any(address in n for n in self.networks):
            return False
        if self.subjects and not set(common_names) & set(self.subjects):
            return False
        return True

    def to_json(self) -> dict[str, list[str]]:
        return {"addresses": list(self.addresses), "subjects": list(self.subjects)}


class AccessRules:
    """The pool's access rules, loaded once and replaced whole on every change."""

    def __init__(self, catalog: Catalog, pool_path: str,
                 known: Callable[[str], object]) -> None:
        self.catalog, self.pool_path = catalog, pool_path
        self.known = known  # raises NotFound for a volume name the pool does not have
        self._table: Mapping[str, Rule] | None = None
        self._lock = threading.Lock()

    def _load(self) -> Mapping[str, Rule]:
        raw = self.catalog.get(META_KEY)
        if raw is None:
            return MappingProxyType({})
        try:
            data = json.loads(str(raw))
            return MappingProxyType({
                str(vol): Rule(tuple(str(a) for a in r.get("addresses", ())),
                               tuple(str(s) for s in r.get("subjects", ())))
                for vol, r in data.items()})
        except (ValueError, TypeError, AttributeError) as e:
            raise PoolError(f"{self.pool_path}: the stored access control list is damaged "
                            f"({e}); 'jsnap acl clear' each volume to reset it") from None

    def rules(self) -> Mapping[str, Rule]:
        """Every volume's rule (read-only; cached: call once in the serving thread first)."""
        current = self._table
        if current is None:
            with self._lock:
                current = self._locked()
        return current

    def rule_for(self, volume: str) -> Rule | None:
        return self.rules().get(volume)

    def _locked(self) -> Mapping[str, Rule]:
        # For callers holding _lock (rules() would take it again).
        if self._table is None:
            self._table = self._load()
        return self._table

    def _store(self, table: dict[str, Rule]) -> None:
        self.catalog.set_many({META_KEY: json.dumps(
            {vol: table[vol].to_json() for vol in sorted(table)})})
        self._table = MappingProxyType(table)

    def set_rule(self, volume: str, addresses: Iterable[str], subjects: Iterable[str]) -> Rule:
        """Replace `volume`'s rule. InvalidRequest for a bad address or subject or an empty
        rule, NotFound for an unknown volume."""
        self.known(volume)  # NotFound: a typo must not create a rule nobody uses
        try:
            nets = tuple(dict.fromkeys(str(parse_network(a)) for a in addresses))
            subs = tuple(dict.fromkeys(parse_subject(s) for s in subjects))
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if not nets and not subs:
            raise InvalidRequest("an access rule needs at least one address or subject "
                                 "('acl clear' lets every client in again)")
        rule = Rule(nets, subs)
        with self._lock:
            table = dict(self._locked())
            table[volume] = rule
            self._store(table)
        return rule

    def clear_rule(self, volume: str) -> None:
        """Remove `volume`'s rule (every client may use it again)."""
        with self._lock:
            table = dict(self._locked())
            if volume not in table:
                self.known(volume)  # NotFound for an unknown name; else nothing to do
                return
            del table[volume]
            self._store(table)
