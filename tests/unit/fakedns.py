"""A stand-in for policyd.dns.Resolver, answering from a dict: unit tests only.

It speaks the real resolver's interface (`query`, `ptr`, `trusted`, `when_decided`,
`observers`, `cache_statistics`) and returns the same shapes (see
`policyd.dns.Lookup`), so the code under test cannot tell the difference
except by the answers.  Where the real resolver's behaviour comes from
dnspython rather than from the server, the fake borrows dnspython:

- names go through `dns.name.from_text`; one it refuses for its length
  or an empty label cannot exist (NXDOMAIN), anything else it refuses is
  a temporary error, as in `Resolver.query`;
- every answer, positive or negative, carries an expiry `ttl` seconds
  ahead (a negative answer as if the server sent its SOA, RFC 2308 §5),
  so caches above the resolver behave as with a real server;
- a CNAME is followed inside one answer, as a recursive server and
  dnspython's `resolve_chaining` do; a CNAME loop is a temporary error
  (unbound 1.17 answers SERVFAIL, checked; a server that returns the
  chain makes dnspython raise ChainTooLong past `MAX_CHAIN`);
- NXDOMAIN is told apart from NODATA: a name with names below it exists
  (RFC 8020 empty non-terminal).

The zone is `{name: entries}`.  entries is either a mapping
`{"TXT": "v=spf1 -all", "A": ["192.0.2.1", "192.0.2.2"]}` or, when order
matters, a list of `(rdtype, value)` pairs and bare `TIMEOUT` markers, read
the way pyspf's testspf.py reads the openspf suites (docs/protocols.md §5): a
TIMEOUT makes every query of a type with no record before it fail
temporarily, and `(rdtype, TIMEOUT)` makes queries of that type fail.
"""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping

import dns.exception
import dns.message
import dns.name
import dns.reversename

from policyd.dns import DnsTempError, Lookup

TIMEOUT = "TIMEOUT"


def _key(name: str) -> str:
    """The zone key of a name, as dnspython would send it."""
    return dns.name.from_text(name).to_text(omit_final_dot=True).lower()


def _target(name: str) -> str:
    # dns.py turns a target into text with omit_final_dot; the root stays ".".
    return dns.name.from_text(name).to_text(omit_final_dot=True)


def _rdata(rdtype: str, value):
    """A zone value in the shape `policyd.dns._value` gives for that type."""
    if value == TIMEOUT:
        return TIMEOUT
    if rdtype in ("A", "AAAA"):
        address = ipaddress.ip_address(value)
        if address.version != (4 if rdtype == "A" else 6):
            raise ValueError(f"{value!r} is not an {rdtype} address")
        return str(address)
    if rdtype == "MX":
        preference, exchange = value
        return (int(preference), _target(exchange))
    if rdtype in ("PTR", "CNAME"):
        return _target(value)
    if rdtype in ("TXT", "SPF"):
        strings = (value,) if isinstance(value, (str, bytes)) else tuple(value)
        return tuple(s if isinstance(s, bytes) else s.encode("utf-8") for s in strings)
    raise ValueError(f"the fake resolver has no rdtype {rdtype}")


def _entries(entries) -> list:
    if isinstance(entries, Mapping):
        pairs = []
        for rdtype, values in entries.items():
            if isinstance(values, (str, bytes)) or rdtype == "MX" and \
                    isinstance(values, tuple):
                values = [values]
            pairs.extend((rdtype, v) for v in values)
        entries = pairs
    return [TIMEOUT if e == TIMEOUT else (e[0].upper(), _rdata(e[0].upper(), e[1]))
            for e in entries]


class FakeClock:
    """A monotonic clock that only moves when told to; stands in for the
    `time` module of the code under test (`monkeypatch.setattr(module,
    "time", clock)`), so time limits are tested without sleeping."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeResolver:
    """Answers from `zone`.

    temp_errors: names (every type) or (name, rdtype) pairs that raise
    DnsTempError, as SERVFAIL or a timeout would.  Names starting with
    "error." and absent from the zone raise it too (testspf.py's rule).
    secure: names whose answers are DNSSEC-authenticated, or True for all;
    like the real resolver, nothing is secure unless `trusted`.
    clock/latency: each query advances `clock` by `latency` seconds.
    ttl: seconds every answer may be kept (its `expires`, by `clock` if
    given); 0 for answers that must not be cached.
    """

    def __init__(self, zone: Mapping[str, object] | None = None, *,
                 temp_errors: Iterable = (), secure: Iterable[str] | bool = (),
                 trusted: bool = True, clock: FakeClock | None = None,
                 latency: float = 0.0, ttl: float = 300.0):
        self.zone = {_key(name): _entries(entries) for name, entries in (zone or {}).items()}
        self.temp_errors = {(_key(e), None) if isinstance(e, str) else (_key(e[0]), e[1].upper())
                            for e in temp_errors}
        self.secure_names = secure if isinstance(secure, bool) else {_key(n) for n in secure}
        self.trusted = trusted
        self.trust_reason = "fake resolver"
        self.clock, self.latency, self.ttl = clock, latency, ttl
        self.observers: list = []
        self.queries: list[tuple[str, str]] = []
        self.lifetimes: list[float | None] = []

    # -- the Resolver interface ------------------------------------------

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> Lookup:
        rdtype = rdtype.upper()
        self.lifetimes.append(lifetime)
        try:
            key = _key(name)
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            self.queries.append((name, rdtype))
            return Lookup((), False, nxdomain=True)
        except dns.exception.DNSException as error:
            self.queries.append((name, rdtype))
            raise DnsTempError(f"{rdtype} {name}: {error.__class__.__name__}") from None
        self.queries.append((key, rdtype))
        if self.clock is not None:
            self.clock.advance(self.latency)
        for observe in self.observers:
            observe(self.latency)
        expires = (self.clock.time() if self.clock else time.time()) + self.ttl \
            if self.ttl else 0.0
        chain = [key]
        while True:
            records, cname = self._answer(chain[-1], rdtype)
            if records is None:   # the name does not exist
                return Lookup((), self._secure(chain), nxdomain=True, expires=expires)
            if records or cname is None or rdtype == "CNAME":
                return Lookup(tuple(records), self._secure(chain), expires=expires)
            if cname in chain or len(chain) >= dns.message.MAX_CHAIN:
                raise DnsTempError(f"{rdtype} {name}: ChainTooLong")
            chain.append(cname)

    def ptr(self, address) -> Lookup:
        return self.query(dns.reversename.from_address(str(address)).to_text(), "PTR")

    def cache_statistics(self) -> tuple[int, int]:
        return 0, len(self.queries)   # no cache: every question is a miss

    def when_decided(self, effect, *args) -> None:
        effect(*args)   # no cache-only attempts here: always decided

    # -- helpers for tests -----------------------------------------------

    def asked(self, name: str, rdtype: str | None = None) -> bool:
        key = _key(name)
        return any(k == key and (rdtype is None or t == rdtype.upper())
                   for k, t in self.queries)

    def _secure(self, chain: list[str]) -> bool:
        if not self.trusted:
            return False
        return self.secure_names is True or (
            self.secure_names is not False and all(n in self.secure_names for n in chain))

    def _answer(self, key: str, rdtype: str):
        """(records, cname target) for one owner name; records None: NXDOMAIN."""
        if (key, None) in self.temp_errors or (key, rdtype) in self.temp_errors:
            raise DnsTempError(f"{rdtype} {key}: SERVFAIL")
        entries = self.zone.get(key)
        if entries is None:
            if key.startswith("error."):
                raise DnsTempError(f"{rdtype} {key}: timeout")
            if any(other.endswith("." + key) for other in self.zone) or key == ".":
                return [], None   # an empty non-terminal exists
            return None, None
        records, cname, timeout_pending = [], None, True
        for entry in entries:
            if entry == TIMEOUT:
                if timeout_pending:
                    raise DnsTempError(f"{rdtype} {key}: timeout")
                break
            type_, value = entry
            if type_ == rdtype:
                timeout_pending = False
                if value == TIMEOUT:
                    raise DnsTempError(f"{rdtype} {key}: timeout")
                records.append(value)
            elif type_ == "CNAME" and value != TIMEOUT and cname is None:
                cname = _key(value)
        return records, cname


def zone_from_spf_suite(zonedata: Mapping[str, list]) -> dict[str, list]:
    """An openspf test-suite `zonedata` as a FakeResolver zone, read as
    pyspf's testspf.py `getrdata` reads it (docs/protocols.md §5): a TXT given as
    a string is a one-string record, `TXT: NONE` means no TXT, and an SPF
    record is also served as TXT unless the name has a TXT of its own."""
    zone = {}
    for name, items in zonedata.items():
        entries, generated, has_txt = [], [], False
        for item in items:
            if item == TIMEOUT:
                entries.append(TIMEOUT)
                continue
            for rdtype, value in item.items():
                if rdtype in ("TXT", "SPF") and isinstance(value, str):
                    value = (value,)
                if rdtype == "TXT":
                    has_txt = True
                elif rdtype == "SPF":
                    generated.append(("TXT", value))
                if value != ("NONE",):
                    entries.append((rdtype, value))
        if not has_txt:
            entries.extend(generated)
        zone[name] = entries
    return zone


# The standard test world of the project (the same names and records the
# integration tests serve from unbound), for unit tests that need a world
# but not a DNS server.  temperror.example is not here: pass it in
# `temp_errors`, as SERVFAIL is a property of the server, not of a record.
STANDARD_WORLD = {
    "own.example": {"TXT": "v=spf1 ip4:203.0.113.7 ip6:2001:db8:7::7 -all"},
    "mx.own.example": {"A": "203.0.113.7"},
    "sub.own.example": {"TXT": "v=spf1 ip4:203.0.113.7 -all"},
    "evilown.example": {"TXT": "v=spf1 ip4:198.51.100.99 -all"},
    "other.example": {"TXT": "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8:6::/64 -all"},
    "include.example": {"TXT": "v=spf1 include:other.example -all"},
    "softfail.example": {"TXT": "v=spf1 ~all"},
    "neutral.example": {"TXT": "v=spf1 ?all"},
    "permerror.example": {"TXT": "v=spf1 foo:bar -all"},
    "nospf.example": {"A": "192.0.2.80"},
    "helo.other.example": {"TXT": "v=spf1 ip4:198.51.100.0/24 -all", "A": "198.51.100.10"},
    "mail6.other.example": {"AAAA": "2001:db8:6::25"},
    "liar.other.example": {"AAAA": "2001:db8:6::99"},
    "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa":
        {"PTR": "mail6.other.example"},
    "7.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa":
        {"PTR": "liar.other.example"},
    "10.100.51.198.in-addr.arpa": {"PTR": "helo.other.example"},
    "signed.example": {"TXT": "v=spf1 ip4:198.51.100.0/24 -all"},
}
STANDARD_TEMP_ERRORS = ("temperror.example",)
STANDARD_SECURE = ("signed.example",)


def standard_world(extra_zone: Mapping[str, object] | None = None,
                   **overrides) -> FakeResolver:
    """A FakeResolver serving STANDARD_WORLD plus extra_zone; keyword
    arguments as FakeResolver's."""
    settings = {"temp_errors": STANDARD_TEMP_ERRORS, "secure": STANDARD_SECURE}
    settings.update(overrides)
    return FakeResolver({**STANDARD_WORLD, **(extra_zone or {})}, **settings)
