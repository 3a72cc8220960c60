"""The two socketmap tables policyd serves to Postfix's smtp client,
`dns-reply-filter` and `delivery-status-filter` (Tables: what each
answers), and the learning of IPv4-only routes from the refusals the
second one sees.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..model import domain_matches
from ..service import log_value
from .refusals import Classifier, Refusal, is_host_name
from .socketmap import NOTFOUND, Reply, Request, Status
from .store import Route, RouteStore

if TYPE_CHECKING:
    from .settings import RoutingConfig

log = logging.getLogger("policyd.routing")

DNS_TABLE = "dns-reply-filter"
STATUS_TABLE = "delivery-status-filter"
TABLES = (DNS_TABLE, STATUS_TABLE)

IGNORE = Reply(Status.OK, "IGNORE")

# What an MX record tells (this domain's mail goes to that host) is kept
# for the AAAA lookups that follow it, and for learning the domain when
# the host refuses: at most the record's TTL and this long.
MX_MEMORY_SECONDS = 3600.0
MX_MEMORY_ENTRIES = 20000
# Domains kept per host: a big provider's host is named by more domains
# than a relay mails in an hour, and recipients choose them at will; past
# this the expired go, then the oldest (the host's own route still covers
# them: their MX lookups name it, and its AAAA records are ignored).
MX_DOMAINS_PER_HOST = 1000
# What a route keeps of the reply it was learned from (the log line quotes
# as much).
EVIDENCE_CHARS = 1000


# The refusing host of a learned route's evidence ("host NAME[ADDRESS] said: ...").
_REFUSED_BY = re.compile(r"host (\S+?)\[")


class _MxMemory:
    """host -> {domain: until}, from recent MX records; bounded."""

    def __init__(self, capacity: int = MX_MEMORY_ENTRIES):
        self.capacity = capacity
        self._hosts: collections.OrderedDict[str, dict[str, float]] = collections.OrderedDict()

    def note(self, host: str, domain: str, until: float, now: float) -> None:
        domains = self._hosts.pop(host, None) or {}
        domains.pop(domain, None)
        domains[domain] = until        # at the end: the dict in order of mention
        if len(domains) > MX_DOMAINS_PER_HOST:
            domains = {name: when for name, when in domains.items() if when > now}
            while len(domains) > MX_DOMAINS_PER_HOST:
                del domains[next(iter(domains))]
        self._hosts[host] = domains
        while len(self._hosts) > self.capacity:
            self._hosts.popitem(last=False)

    def domains(self, host: str, now: float) -> list[str]:
        domains = self._hosts.get(host)
        if not domains:
            return []
        live = {domain: until for domain, until in domains.items() if until > now}
        if len(live) != len(domains):
            self._hosts[host] = live
        return sorted(live)


class RoutingMetrics:
    """Counters in prometheus-client's multiprocess files, when /metrics
    is on (policyd/service.py MULTIPROC_ENV)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter
        registry = CollectorRegistry()
        self.lookups = Counter("policyd_routing_lookups", "Socketmap lookups by table and answer",
                               ["table", "answer"], registry=registry)
        self.learned = Counter("policyd_routing_learned",
                               "IPv4-only routes learned from reverse-DNS refusals",
                               ["matched"], registry=registry)

    @classmethod
    def if_enabled(cls) -> RoutingMetrics | None:
        from ..service import MULTIPROC_ENV
        return cls() if os.environ.get(MULTIPROC_ENV) else None


class Tables:
    """The answers for one config; `store` outlives reloads.

    A route applies to an MX host (the name of the AAAA records), or to a
    recipient domain: an MX record of an IPv4-only domain makes its hosts
    IPv4-only for the next AAAA lookups (MX_MEMORY_SECONDS at most).
    Postfix asks for the MX records and then the hosts' addresses of one
    delivery through the same smtp process, whose socketmap connection
    reaches this one process: so what an MX record told is still here
    when its hosts' AAAA records come.
    """

    def __init__(self, config: RoutingConfig, store: RouteStore,
                 metrics: RoutingMetrics | None = None,
                 clock: Callable[[], float] = time.time):
        self.config, self.store, self.metrics, self.clock = config, store, metrics, clock
        self.classifier = Classifier(config.refusal_patterns)
        self.mx = _MxMemory()
        # Hosts named by the MX records of IPv4-only domains: host -> until.
        self._domain_hosts: collections.OrderedDict[str, float] = collections.OrderedDict()

    def reconfigured(self, config: RoutingConfig) -> Tables:
        """The tables of a reloaded config, keeping what was learned."""
        tables = Tables(config, self.store, self.metrics, self.clock)
        tables.mx = self.mx
        return tables

    # -- answering ----------------------------------------------------------

    def answer_now(self, request: Request) -> Reply | None:
        """The answer if it needs nothing that may wait (Redis); else None,
        and `answer` is to be called off the event loop."""
        try:
            return self._answer(request, wait=False)
        except _MustWait:
            return None

    def answer(self, request: Request) -> Reply:
        return self._answer(request, wait=True)

    def _answer(self, request: Request, wait: bool) -> Reply:
        if request.name == DNS_TABLE:
            reply = self._dns_record(request.key, wait)
        elif request.name == STATUS_TABLE:
            reply = self._delivery_status(request.key, wait)
        else:
            return Reply(Status.PERM, "unknown map name")
        if self.metrics is not None:
            self.metrics.lookups.labels(request.name, reply.status.value).inc()
        return reply

    def _learned(self, destination: str, wait: bool) -> Route | None:
        route = self.store.cached(destination)
        if route is False:
            if not wait:
                raise _MustWait
            return self.store.get(destination)
        return route   # type: ignore[return-value]

    def _ipv4_only_host_of(self, domain: str, host: str, wait: bool) -> bool:
        """Whether an MX record of `domain` makes `host` IPv4-only: the
        domain is static, added by hand, or learned from a host beside this
        one (a sibling under the refusing host's parent, as mx2.dest.example
        of mx.dest.example, the l.google.com hosts of one another).  Not any
        host a learned domain names later: a domain's owner may learn its own
        domain (its server refusing over IPv6), then point its MX at another
        provider's host, whose AAAA records would be ignored for every
        delivery that follows."""
        if domain_matches(domain, self.config.ipv4_only_domains):
            return True
        route = self._learned(domain, wait)
        if route is None:
            return False
        refused = _REFUSED_BY.match(route.evidence)
        if refused is None:
            return True   # added by hand (policyd routes add): the admin's word
        refusing = refused.group(1)
        parent = refusing.partition(".")[2]
        return host == refusing or ("." in parent and host.endswith("." + parent))

    def _dns_record(self, key: str, wait: bool) -> Reply:
        """`dns-reply-filter` (smtp_dns_reply_filter): each record of the
        smtp client's MX, A and AAAA lookups, as "name ttl IN type
        [preference] value".  An AAAA record of an IPv4-only destination
        gets `IGNORE`: Postfix then has no IPv6 address to deliver to, and
        uses the IPv4 ones.  Everything else is NOTFOUND (used as is)."""
        # "name ttl class type preference value" (postconf(5) smtp_dns_reply_filter)
        fields = key.split()
        if len(fields) < 5 or fields[2].upper() != "IN":
            return NOTFOUND
        name, kind = fields[0].rstrip(".").lower(), fields[3].upper()
        if kind == "MX" and len(fields) >= 6:
            host = fields[5].rstrip(".").lower()
            if not host or not name:
                return NOTFOUND   # a null MX (RFC 7505) names no host
            now = self.clock()
            ttl = float(fields[1]) if fields[1].isdigit() else 0.0
            until = now + min(max(ttl, 60.0), MX_MEMORY_SECONDS)
            self.mx.note(host, name, until, now)
            if self._ipv4_only_host_of(name, host, wait):
                self._domain_hosts.pop(host, None)
                self._domain_hosts[host] = until
                while len(self._domain_hosts) > MX_MEMORY_ENTRIES:
                    self._domain_hosts.popitem(last=False)
            return NOTFOUND
        if kind != "AAAA":
            return NOTFOUND
        config = self.config
        if config.ipv4_only or domain_matches(name, config.ipv4_only_hosts) \
                or domain_matches(name, config.ipv4_only_domains):
            return IGNORE
        host_until = self._domain_hosts.get(name)
        if host_until is not None and host_until > self.clock():
            return IGNORE
        if self._learned(name, wait) is not None:
            return IGNORE
        return NOTFOUND

    def _delivery_status(self, key: str, wait: bool) -> Reply:
        """`delivery-status-filter` (smtp_delivery_status_filter): once per
        recipient, "enhanced-status text".  A reverse-DNS refusal of a
        delivery to an IPv6 address (routing/refusals.py) is learned, and
        answered with the same text under a 4.x.x status, so that the
        message is retried.  Everything else is NOTFOUND (unchanged)."""
        if not self.config.learn:
            return NOTFOUND
        refusal = self.classifier.classify(key)
        if refusal is None:
            return NOTFOUND
        if not is_host_name(refusal.host):
            # A next hop given as [address]: there is no name to keep a
            # route for, and its AAAA records are never looked up.
            log.info("routing: %s refused delivery over IPv6 (reverse DNS), but it is "
                     "an address, not a host name: no route learned",
                     log_value(refusal.host))
            return NOTFOUND
        if not wait:
            raise _MustWait   # learning writes to the store
        self.learn(refusal)
        return Reply(Status.OK, refusal.deferred())

    # -- learning -------------------------------------------------------------

    def learn(self, refusal: Refusal) -> list[Route]:
        """The routes for the refusing host and the recipient domains whose
        MX records named it lately; one log line with the evidence."""
        now = self.clock()
        expires = now + self.config.learned_ttl
        # Kept with each route (in Redis too, for learned_ttl): a remote's
        # multi-line reply is its own to make long, the evidence is not.
        evidence = f"host {refusal.host}[{refusal.address}] said: " + \
            (refusal.reply if len(refusal.reply) <= EVIDENCE_CHARS
             else refusal.reply[:EVIDENCE_CHARS] + "...")
        destinations = [refusal.host, *self.mx.domains(refusal.host, now)]
        previous = self.store.get(refusal.host)
        routes = [Route(destination, now, expires, evidence) for destination in destinations]
        for route in routes:
            self.store.add(route)
        if self.metrics is not None:
            self.metrics.learned.labels(
                "X.7.25" if refusal.matched == "X.7.25" else "pattern").inc()
        again = previous is not None and now - previous.learned > MX_MEMORY_SECONDS
        log.log(logging.WARNING if again else logging.INFO,
                "routing: learned ipv4-only %s for %d s%s: host=%s address=%s "
                "status=%s matched=%s reply=%s",
                ",".join(destinations), self.config.learned_ttl,
                " (again: refused over IPv6 although already learned; are its AAAA "
                "records looked up under another name, a CNAME?)" if again else "",
                log_value(refusal.host), refusal.address, refusal.status,
                log_value(refusal.matched), _quoted(refusal.reply))
        return routes


def _quoted(text: str) -> str:
    """A remote server's reply, last on a log line: readable, in quotes,
    and on one line whatever it holds."""
    return '"' + _UNQUOTABLE.sub("?", text[:1000]) + '"'


_UNQUOTABLE = re.compile(r'[^\x20-\x7e]|"')


class _MustWait(Exception):
    """The answer needs the store's backend (Redis): off the event loop."""
