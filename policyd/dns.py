"""The one DNS layer: dnspython with a shared TTL cache, bounded time, and
the DNSSEC trust rule.

An answer counts as authenticated only when the resolver set the AD bit
*and* the path to the resolver is trusted (RFC 6840 §5.7: a stub must not
believe AD from a resolver it cannot trust the path to).  The path is
trusted when every nameserver is on loopback, when resolv.conf says
`options trust-ad` (glibc's switch, which dnspython does not read), or
when the config says so.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename

from .config import DnsConfig
from .model import IPAddress

# RFC 6891 §6.2.5 / DNS flag day 2020: 1232 octets avoids fragmentation.
EDNS_PAYLOAD = 1232


class DnsTempError(Exception):
    """SERVFAIL, a timeout, no reachable nameserver: try again later."""


class CacheMiss(BaseException):
    """Raised by `Resolver.cached_only` when an answer is not in the cache.

    A BaseException, so that the `except Exception` of the code in between
    (pyspf's included) lets it through; code that swallows it anyway (a
    bare `except:`) cannot hide it either, since the miss is also noted.
    """


class _CacheOnly(threading.local):
    active = False
    missed = False
    hits = 0


@dataclass(frozen=True)
class Lookup:
    """The answer to one question.

    records: A/AAAA address strings; MX (preference, exchange) tuples;
    PTR/CNAME names without the final dot; TXT tuples of bytes strings.
    Empty for NXDOMAIN and NODATA (`nxdomain` tells them apart).
    """
    records: tuple
    secure: bool
    nxdomain: bool = False
    expires: float = field(default=0.0, compare=False)   # time.time(); 0: not cached


def read_resolv_conf(path: str) -> tuple[list[str], bool]:
    """Nameservers and the trust-ad option, as glibc reads them."""
    nameservers, trust_ad = [], False
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                words = line.split("#", 1)[0].split(";", 1)[0].split()
                if len(words) >= 2 and words[0] == "nameserver":
                    address = words[1].split("%", 1)[0]
                    try:
                        ipaddress.ip_address(address)
                    except ValueError:
                        continue   # glibc skips what is not an address
                    nameservers.append(address)
                elif words and words[0] == "options" and "trust-ad" in words[1:]:
                    trust_ad = True
    except OSError:
        pass
    return nameservers, trust_ad


class Resolver:
    """Thread-safe; one instance is shared by every request and both front-ends."""

    def __init__(self, config: DnsConfig):
        self.config = config
        if config.nameservers:
            nameservers = [str(a) for a in config.nameservers]
            file_trust_ad = False
        else:
            nameservers, file_trust_ad = read_resolv_conf(config.resolv_conf)
            if not nameservers:
                # resolv(5): no nameserver line means the local one.
                nameservers = ["127.0.0.1"]
        self.nameservers = tuple(nameservers)
        loopback = all(ipaddress.ip_address(n).is_loopback for n in nameservers)
        self.trusted = {"yes": True, "no": False}.get(
            config.trust_ad, loopback or file_trust_ad)
        self.trust_reason = (
            f"dns.trust_ad={config.trust_ad}" if config.trust_ad != "auto"
            else "loopback resolver" if loopback
            else "options trust-ad" if file_trust_ad
            else "resolver not on loopback and no trust-ad")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = config.port
        # RFC 6840 §5.7: set AD in queries to ask for it; DO (RFC 3225) so a
        # validating resolver validates for us.
        resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        resolver.flags = dns.flags.RD | dns.flags.AD
        # Leave every nameserver a share of the lookup, so a dead first one
        # does not use the whole lifetime before the second is asked.
        resolver.timeout = config.timeout / (len(nameservers) + 1)
        resolver.lifetime = config.timeout
        resolver.retry_servfail = False
        # The cache is ours, not dnspython's: converted answers by (name,
        # type).  A hit costs a dict lookup instead of a dnspython
        # resolution (tens of microseconds, on the hot path of every
        # request), and a Lookup is a few strings where dnspython keeps the
        # whole response message, several kilobytes each.
        resolver.cache = None
        self._resolver = resolver
        self._lookups: dict[tuple[str, str], Lookup] = {}
        self._lookup_hits = 0
        self._lookup_misses = 0
        self._cache_only = _CacheOnly()
        self.observers: list = []   # callables(seconds) for metrics

    def cached_only(self, function, *args):
        """function(*args) with every question answered from the cache.

        Raises CacheMiss when one was not cached: the caller then runs it
        again where waiting for the network is allowed (a thread).  What
        it did until then must be free of effects other than caching,
        which the engine is.  The hits of an attempt that missed are not
        counted, so the hit ratio is that of the decisions made.
        """
        state = self._cache_only
        state.active, state.missed, state.hits = True, False, 0
        try:
            result = function(*args)
        finally:
            state.active = False
        if state.missed:
            raise CacheMiss()
        self._lookup_hits += state.hits
        return result

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> Lookup:
        """One question; raises DnsTempError on anything temporary."""
        key = (name.lower(), rdtype)
        cached = self._lookups.get(key)
        state = self._cache_only
        if cached is not None and cached.expires > time.time():
            if state.active:
                state.hits += 1
            else:
                self._lookup_hits += 1
            return cached
        if state.active:
            state.missed = True
            raise CacheMiss()
        self._lookup_misses += 1
        lookup = self._resolve(name, rdtype, lifetime)
        # RFC 2308 §5: a negative answer without SOA has expires 0 and is
        # not kept.
        if lookup.expires:
            if len(self._lookups) >= self.config.cache_size:
                self._lookups.clear()   # crude, bounded, and rare
            self._lookups[key] = lookup
        return lookup

    def _resolve(self, name: str, rdtype: str, lifetime: float | None) -> Lookup:
        started = time.monotonic()
        try:
            qname = dns.name.from_text(name)   # relative names become absolute: no search list
            answer = self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False,
                lifetime=min(lifetime, self.config.timeout) if lifetime else None)
        except dns.resolver.NXDOMAIN as error:
            response = _nx_response(error, qname)
            return Lookup((), self._secure(response), nxdomain=True,
                          expires=_negative_expiry(response))
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            # Not a name DNS can carry, so nothing can exist there.
            return Lookup((), False, nxdomain=True)
        except dns.resolver.YXDOMAIN:
            return Lookup((), False, nxdomain=True)
        except (dns.exception.Timeout, dns.resolver.NoNameservers,
                dns.resolver.LifetimeTimeout) as error:
            raise DnsTempError(f"{rdtype} {name}: {error.__class__.__name__}") from None
        except dns.exception.DNSException as error:
            raise DnsTempError(f"{rdtype} {name}: {error.__class__.__name__}") from None
        finally:
            for observe in self.observers:
                observe(time.monotonic() - started)
        secure = self._secure(answer.response)
        if answer.rrset is None:
            return Lookup((), secure, expires=_negative_expiry(answer.response))
        return Lookup(tuple(_value(rdtype, r) for r in answer.rrset), secure,
                      expires=answer.expiration)

    def ptr(self, address: IPAddress) -> Lookup:
        return self.query(dns.reversename.from_address(str(address)).to_text(), "PTR")

    def _secure(self, response: dns.message.Message | None) -> bool:
        return bool(self.trusted and response is not None
                    and response.flags & dns.flags.AD)

    def cache_statistics(self) -> tuple[int, int]:
        return self._lookup_hits, self._lookup_misses


def _negative_expiry(response: dns.message.Message | None) -> float:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA minimum);
    without an SOA it is not cached at all (0)."""
    if response is None:
        return 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and rrset:
            return time.time() + min(rrset.ttl, rrset[0].minimum)
    return 0.0


def _nx_response(error: dns.resolver.NXDOMAIN, qname: dns.name.Name):
    try:
        return error.response(qname)
    except (KeyError, AttributeError, IndexError):
        responses = error.kwargs.get("responses") or {}
        return next(iter(responses.values()), None)


def _value(rdtype: str, rdata):
    if rdtype in ("A", "AAAA"):
        return rdata.address
    if rdtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if rdtype in ("PTR", "CNAME"):
        return rdata.target.to_text(omit_final_dot=True)
    if rdtype in ("TXT", "SPF"):
        return tuple(rdata.strings)
    return rdata.to_text()
