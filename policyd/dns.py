"""The one DNS layer (Resolver): DNS messages over our own transport, with
a shared TTL cache, bounded time (budget), and the DNSSEC trust rule.
Plain questions and ordinary answers go through our small codec
(policyd.dnswire), the rest through dnspython.
"""
from __future__ import annotations

import contextvars
import functools
import ipaddress
import marshal
import mmap
import os
import secrets
import select
import socket
import threading
import typing
import struct
import time
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename

from . import dnswire
from .config import DnsConfig
from .dnswire import EDNS_PAYLOAD, Answer
from .model import IPAddress


class DnsTempError(Exception):
    """SERVFAIL, a timeout, no reachable nameserver: try again later."""


class CacheMiss(BaseException):
    """Raised by `Resolver.cached_only` when an answer is not in the cache.

    A BaseException, so that the `except Exception` of the code in between
    (pyspf's included) lets it through; code that swallows it anyway (a
    bare `except:`) cannot hide it either, since the miss is also noted.
    `resume`, when given, is the rest of the work to run where waiting is
    allowed (the engine's rate-limit charge), so nothing decided already
    is decided again.
    """

    def __init__(self, resume: "typing.Callable[[], typing.Any] | None" = None):
        super().__init__()
        self.resume = resume


# The DNS budget of the decision stage running in this thread or task (see
# `budget`); None outside any stage.  A ContextVar, not a Resolver
# attribute: one resolver serves every thread, each with its own stage;
# query_all's threads run in a copy of their caller's context, and so
# charge the same Budget.
_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "policyd_dns_budget", default=None)

# Held only to charge a lookup that got no answer (rare, and brief): one
# lock for every budget rather than one made with each stage.
_CHARGING = threading.Lock()


class Budget:
    """The waiting for answers that do not come which every lookup of one
    decision stage shares (`budget`)."""

    __slots__ = ("seconds", "limit", "left", "deadline", "_outer", "_unanswered",
                 "_token")

    def __init__(self, seconds: float, limit: float | None = None):
        self.seconds = seconds
        self.limit = limit

    def __enter__(self) -> Budget:
        outer = _BUDGET.get()
        self.left = self.seconds   # seconds of unanswered waiting left
        self.deadline = float("inf") if self.limit is None \
            else time.monotonic() + self.limit
        if outer is not None:
            # A stage inside another cannot outlast it, and what it
            # charges it charges the outer one too.
            self.left = min(self.left, outer.left)
            self.deadline = min(self.deadline, outer.deadline)
        self._outer = outer
        self._unanswered: tuple[tuple[float, float], ...] = ()
        self._token = _BUDGET.set(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _BUDGET.reset(self._token)

    def charge(self, started: float, ended: float) -> None:
        """A lookup of the stage waited from started to ended
        (time.monotonic()) and got no answer."""
        with _CHARGING:
            stage: Budget | None = self
            while stage is not None:
                stage._charge(started, ended)
                stage = stage._outer

    def _charge(self, started: float, ended: float) -> None:
        # Only the part of the wait not charged yet: lookups that wait side
        # by side (query_all's threads) spend the stage's time once, not
        # once each.  The waits charged are kept as disjoint intervals, a
        # handful per stage (each lookup at most one).
        waited = ended - started
        merged_start, merged_end, kept = started, ended, []
        for start, end in self._unanswered:
            if start <= ended and started <= end:
                waited -= min(end, ended) - max(start, started)
                merged_start, merged_end = min(merged_start, start), max(merged_end, end)
            else:
                kept.append((start, end))
        kept.append((merged_start, merged_end))
        self._unanswered = tuple(kept)
        self.left -= waited


def budget(seconds: float, limit: float | None = None) -> Budget:
    """`with budget(seconds):` the lookups this thread (or asyncio task)
    makes inside share `seconds` of waiting for answers that do not come.

    A lookup waits at most `dns.timeout`, its lifetime and what is left of
    the budget; one that ends without an answer (a timeout, or a failure
    after some waiting) charges the budget the time it waited, one that
    gets an answer charges nothing, however long it took: a resolver that
    answers slowly (a cold cache, an SPF record with many includes) costs
    time, not the stage's verdict.  Once the budget is spent, a lookup that
    is not in the cache fails at once (DnsTempError); cache hits are
    answered as ever.  So a resolver that hangs costs a whole decision
    stage `seconds`, however many lookups time out in it.

    `limit`: the stage's lookups end that many seconds from now, answered
    or not (a ceiling on a stage of slow answers, within what the MTA
    waits for us).
    """
    return Budget(seconds, limit)


def budget_left() -> float:
    """Seconds a lookup of the current stage may still wait for an answer
    that does not come; infinity outside one."""
    stage = _BUDGET.get()
    if stage is None:
        return float("inf")
    return min(stage.left, stage.deadline - time.monotonic())


class _CacheOnly(threading.local):
    active = False
    missed = False
    hits = 0
    deferred: list | None = None   # effects kept for when the attempt succeeds


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


class SharedAnswers:
    """Answers the worker processes of one daemon share: a fixed table in
    an anonymous shared mapping, made by the parent before it forks them.

    Each worker keeps its own cache of answers (a dict: a hit costs well
    under a microsecond), but the MTA hands a session to whichever worker
    accepts it, so with 4 workers the answers for a sender seen three
    times were new to the worker that got it about 4 times in 10, and
    were asked of the resolver again (the figures: bench/README.md, "Why
    the code is as it is").  A worker's miss looks here before it asks
    the network.

    One slot per hash of the question, the last answer written wins.  No
    lock: a slot holds its length and a CRC-32 of its content, written
    after the content, so a reader that meets a slot being written (or
    two workers writing one slot at once) sees a CRC that does not match
    and takes it as a miss; a worker killed mid-write leaves the same.
    Only our own forked processes can map it.
    """

    _HEADER = struct.Struct("=II")   # content length, CRC-32 of the content

    def __init__(self, slots: int, slot_size: int = 768):
        self.slots, self.slot_size = slots, slot_size
        # mmap(-1): MAP_SHARED | MAP_ANONYMOUS, inherited by fork; pages
        # are only backed once written.
        self._memory = mmap.mmap(-1, slots * slot_size)
        self._room = slot_size - self._HEADER.size

    def _start(self, key: str) -> int:
        return (zlib.crc32(key.encode()) % self.slots) * self.slot_size

    def get(self, key: str) -> tuple | None:
        """The entry last put under key, or None."""
        start = self._start(key)
        slot = self._memory[start:start + self.slot_size]   # one copy, then checked
        length, crc = self._HEADER.unpack_from(slot)
        if not 0 < length <= self._room:
            return None
        content = slot[self._HEADER.size:self._HEADER.size + length]
        if zlib.crc32(content) != crc:
            return None   # being written, or torn by two writers: a miss
        try:
            entry = marshal.loads(content)
        except (ValueError, EOFError, TypeError):
            return None
        return entry[1:] if entry[0] == key else None

    def put(self, key: str, *values) -> None:
        """Values of marshal's types; an entry too large for a slot is not kept."""
        content = marshal.dumps((key, *values))
        if len(content) > self._room:
            return
        start = self._start(key)
        header = self._HEADER.size
        # Invalidate, write the content, then its length and CRC.
        self._memory[start:start + header] = self._HEADER.pack(0, 0)
        self._memory[start + header:start + header + len(content)] = content
        self._memory[start:start + header] = self._HEADER.pack(len(content),
                                                               zlib.crc32(content))


# The table this process's resolvers use: set by a parent about to fork its
# workers (share_answers_between_workers); None in a single process.
_shared_answers: SharedAnswers | None = None


def share_answers_between_workers(slots: int) -> None:
    """Called once by a daemon's parent before it forks its workers: the
    resolvers they create share their answers (SharedAnswers)."""
    global _shared_answers
    _shared_answers = SharedAnswers(slots) if slots > 0 else None


_T = TypeVar("_T")


class Lookups(Protocol):
    """What the checks (policyd.checks) ask of a resolver: `Resolver`, or
    tests/unit/fakedns.py's FakeResolver."""

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> Lookup: ...

    def ptr(self, address: IPAddress) -> Lookup: ...

    def when_decided(self, effect: Callable[..., object], *args: Any) -> None: ...


class EngineResolver(Lookups, Protocol):
    """What the engine and the front-ends ask of the engine's resolver
    beyond the checks' `Lookups`."""

    nameservers: tuple[str, ...]
    trust_reason: str
    observers: list[Callable[[float], object]]

    def cached_only(self, function: Callable[..., _T], *args: Any) -> _T: ...

    def cache_statistics(self) -> tuple[int, int]: ...


class Resolver:
    """Thread-safe; one instance is shared by every request and both front-ends.

    The DNSSEC trust rule: an answer counts as authenticated (`secure`)
    only when the resolver set the AD bit *and* the path to the resolver
    is trusted (RFC 6840 §5.7: a stub must not believe AD from a resolver
    it cannot trust the path to).  The path is trusted when every
    nameserver is on loopback, when resolv.conf says `options trust-ad`
    (glibc's switch, which dnspython does not read), or when the config
    says so (dns.trust_ad)."""

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
        # Leave every nameserver a share of the lookup, so a dead first one
        # does not use the whole lifetime before the second is asked.
        self._resolver = _Transport(nameservers, config.port,
                                    timeout=config.timeout / (len(nameservers) + 1),
                                    lifetime=config.timeout)
        # The cache is ours: converted answers by (name, type).  A hit
        # costs a dict lookup instead of a resolution (tens of
        # microseconds, on the hot path of every request), and a Lookup is
        # a few strings where a cached response message is several
        # kilobytes.
        self._lookups: dict[tuple[str, str], Lookup] = {}    # answers with records
        self._negative: dict[tuple[str, str], Lookup] = {}   # NXDOMAIN, NODATA
        self._negative_room = max(1, config.cache_size // 4)
        self._lookup_hits = 0
        self._lookup_misses = 0
        self._cache_only = _CacheOnly()
        self.observers: list[Callable[[float], object]] = []   # callables(seconds) for metrics
        self._shared = _shared_answers
        # Answers from another resolver config (servers, port, trust) are
        # not ours: the shared keys say which config asked.
        self._shared_prefix = f"{','.join(self.nameservers)}:{config.port}:{self.trusted:d}|"

    def budget(self, seconds: float | None = None, limit: float | None = None) -> Budget:
        """`budget(seconds, limit)`, by default `dns.timeout` and no limit."""
        return Budget(self.config.timeout if seconds is None else seconds, limit)

    def cached_only(self, function: Callable[..., _T], *args: Any) -> _T:
        """function(*args) with every question answered from the cache.

        Raises CacheMiss when one was not cached: the caller then runs it
        again where waiting for the network is allowed (a thread).  What
        it did until then must be free of effects other than caching,
        which the engine is.  The hits of an attempt that missed are not
        counted, so the hit ratio is that of the decisions made.
        """
        state = self._cache_only
        state.active, state.missed, state.hits, state.deferred = True, False, 0, []
        try:
            result = function(*args)
        finally:
            state.active = False
            deferred, state.deferred = state.deferred, None
        if state.missed:
            raise CacheMiss()
        self._lookup_hits += state.hits
        for effect, effect_args in deferred:
            effect(*effect_args)
        return result

    def when_decided(self, effect: Callable[..., object], *args: Any) -> None:
        """effect(*args) now, or, inside `cached_only`, once the attempt has
        succeeded: an attempt that missed (even one whose miss some code
        swallowed, as pyspf's bare except around exp= does) leaves nothing
        behind, such as an SPF memo entry made from incomplete answers."""
        state = self._cache_only
        deferred = state.deferred
        if state.active and deferred is not None:   # a list while active
            deferred.append((effect, args))
        else:
            effect(*args)

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> Lookup:
        """One question; raises DnsTempError on anything temporary.

        It waits at most `lifetime`, `dns.timeout` and what is left of the
        current stage's `budget`, whichever is least; with the budget spent
        a question not in the cache fails at once, and one that gets no
        answer charges the budget the time it waited.
        """
        key = (name.lower(), rdtype)
        now = time.time()
        cached = self._lookups.get(key)
        if cached is None or cached.expires <= now:
            # An expired answer with records must not hide a newer negative one.
            cached = self._negative.get(key)
        if (cached is None or cached.expires <= now) and self._shared is not None:
            cached = self._from_shared(key, now)
        state = self._cache_only
        if cached is not None and cached.expires > now:
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
        if lookup.expires and self._shared is not None:
            self._shared.put(self._shared_key(key), lookup.records, lookup.secure,
                             lookup.nxdomain, lookup.expires)
        self._keep(key, lookup)
        return lookup

    def _from_shared(self, key: tuple[str, str], now: float) -> Lookup | None:
        """Another worker's answer to the question, kept here too; None."""
        if self._shared is None:
            return None
        entry = self._shared.get(self._shared_key(key))
        if entry is None or entry[3] <= now:
            return None
        lookup = Lookup(*entry)
        self._keep(key, lookup)
        return lookup

    def _shared_key(self, key: tuple[str, str]) -> str:
        return f"{self._shared_prefix}{key[1]} {key[0]}"

    def _keep(self, key: tuple[str, str], lookup: Lookup) -> None:
        # RFC 2308 §5: a negative answer without SOA has expires 0 and is
        # not kept.
        if lookup.expires and self.config.cache_size:
            # Negative answers apart, in a quarter of the room: forged mail
            # brings a new HELO name (an NXDOMAIN) with nearly every
            # message, and must not flush the senders' SPF records.
            if lookup.records:
                store, room = self._lookups, self.config.cache_size - self._negative_room
                self._negative.pop(key, None)
            else:
                store, room = self._negative, self._negative_room
                self._lookups.pop(key, None)
            if len(store) >= room:
                store.clear()   # crude, bounded, and rare
            store[key] = lookup

    def _resolve(self, name: str, rdtype: str, lifetime: float | None) -> Lookup:
        started = time.monotonic()
        limit = min(lifetime, self.config.timeout) if lifetime else self.config.timeout
        stage = _BUDGET.get()
        if stage is not None:
            left = min(stage.left, stage.deadline - started)
            if left < limit:
                if left <= 0:
                    # The stage's budget is spent: no more waiting in it.
                    raise DnsTempError(f"{rdtype} {name}: DNS time of the stage spent")
                limit = left
        try:
            answer = self._resolver.exchange(_Question(name, rdtype), limit)
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            # Not a name DNS can carry, so nothing can exist there.
            return Lookup((), False, nxdomain=True)
        except _Yxdomain:
            return Lookup((), False, nxdomain=True)
        except _Failure as error:
            if stage is not None:
                stage.charge(started, time.monotonic())
            raise DnsTempError(f"{rdtype} {name}: {error}") from None
        except dns.exception.DNSException as error:
            if stage is not None:
                stage.charge(started, time.monotonic())
            raise DnsTempError(f"{rdtype} {name}: {error.__class__.__name__}") from None
        finally:
            for observe in self.observers:
                observe(time.monotonic() - started)
        secure = self._secure(answer)
        if answer.rcode == dns.rcode.NXDOMAIN:
            return Lookup((), secure, nxdomain=True, expires=_expiry(answer.negative_ttl))
        if not answer.records:
            return Lookup((), secure, expires=_expiry(answer.negative_ttl))
        return Lookup(answer.records, secure, expires=time.time() + answer.ttl)

    def _waits(self, questions: list[tuple[str, str]]) -> bool:
        """Whether more than one of the questions is not in this process's cache."""
        now, waiting = time.time(), 0
        for name, rdtype in questions:
            key = (name.lower(), rdtype)
            cached = self._lookups.get(key) or self._negative.get(key)
            if cached is None or cached.expires <= now:
                waiting += 1
        return waiting > 1

    def ptr(self, address: IPAddress) -> Lookup:
        return self.query(dns.reversename.from_address(str(address)).to_text(), "PTR")

    def _secure(self, response: Answer | dns.message.Message | None) -> bool:
        return bool(self.trusted and response is not None
                    and response.flags & dns.flags.AD)

    def cache_statistics(self) -> tuple[int, int]:
        return self._lookup_hits, self._lookup_misses


def query_all(resolver: Lookups, questions: list[tuple[str, str]]
              ) -> Iterator[Lookup | DnsTempError]:
    """Each (name, type)'s Lookup, or the DnsTempError it raised, in order.

    Independent lookups that must wait for the network are asked at once,
    each in a thread of its own within the current stage's budget (they
    charge it together: waits side by side, once), so they cost the time
    of the slowest instead of the sum (the forward lookups of several PTR
    names, say).  Otherwise, and for a resolver that is not
    ours, one after another as the caller takes them: one who stops early
    asks no more.  A caller inside `Resolver.cached_only` gets them one by
    one in its own thread, which alone answers from the cache only.
    """
    if len(questions) > 1 and isinstance(resolver, Resolver) \
            and not resolver._cache_only.active and resolver._waits(questions):
        outcomes: list = [None] * len(questions)

        def ask(index: int, name: str, rdtype: str) -> None:
            try:
                outcomes[index] = resolver.query(name, rdtype)
            except DnsTempError as error:
                outcomes[index] = error
            except Exception as error:   # as if raised in the caller's thread
                outcomes[index] = error

        threads = [threading.Thread(target=contextvars.copy_context().run,
                                    args=(ask, index, name, rdtype), daemon=True)
                   for index, (name, rdtype) in enumerate(questions[1:], 1)]
        for thread in threads:
            thread.start()
        ask(0, *questions[0])
        for thread in threads:
            thread.join()   # each query ends within its lifetime
        for outcome in outcomes:
            if not isinstance(outcome, (Lookup, DnsTempError)):
                raise outcome
            yield outcome
        return
    for name, rdtype in questions:
        try:
            yield resolver.query(name, rdtype)
        except DnsTempError as error:
            yield error


class _Failure(Exception):
    """No nameserver gave an answer; the text names the case as dnspython does."""


class _Unusable(Exception):
    """dnspython could not follow the response's CNAME chain."""


class _Yxdomain(Exception):
    """RFC 6672 §2.2: the name grew too long by DNAME substitution."""


class _Question:
    """One question: the query we send, built by dnswire when the name and
    type are plain, and dnspython's message of it, made only when needed
    (a name dnswire leaves alone, a response it leaves to dnspython, the
    retry over TCP).

    Raises dnspython's errors for a question it cannot send.
    """

    def __init__(self, name: str, rdtype: str):
        self.name = name
        self.rdtype = rdtype
        self.id = secrets.randbits(16)   # RFC 5452 §9.2: random, like the port
        self.qtype = dnswire.TYPES.get(rdtype)   # None: dnspython reads the answers
        wire = None if self.qtype is None else dnswire.query_wire(name, self.qtype, self.id)
        self.wire = self.message.to_wire() if wire is None else wire
        self.qname_wire = dnswire.question_name(self.wire)

    @functools.cached_property
    def message(self) -> dns.message.Message:
        qname = dns.name.from_text(self.name)   # relative names become absolute: no search list
        rdtype = dns.rdatatype.RdataType.make(self.rdtype)
        if dns.rdatatype.is_metatype(rdtype):
            raise _Failure("NoMetaqueries")
        query = dns.message.make_query(qname, rdtype, want_dnssec=True, payload=EDNS_PAYLOAD)
        # RFC 6840 §5.7: set AD in queries to ask for it; DO (RFC 3225,
        # from want_dnssec) so a validating resolver validates for us.
        query.flags = dns.flags.RD | dns.flags.AD
        query.id = self.id
        return query


# Idle sockets kept per loopback nameserver: about the queries in flight at
# once in one process (a thread per SMTP session).
IDLE_SOCKETS = 32

# Every transport, so that a child after fork drops the idle sockets it
# shares with its parent.
_TRANSPORTS: weakref.WeakSet = weakref.WeakSet()


def _keeps_sockets(server: str) -> bool:
    """Whether queries to server may reuse a socket (see _Transport._udp)."""
    return ipaddress.ip_address(server).is_loopback


def _forget_sockets_after_fork() -> None:
    for transport in list(_TRANSPORTS):
        transport.close()


os.register_at_fork(after_in_child=_forget_sockets_after_fork)


class _Transport:
    """Asks the nameservers one question: the sending is ours, the
    messages dnswire's or, for anything unusual, dnspython's.

    The tries: the nameservers are asked in order, one more every `timeout`
    (a share of the lifetime, so a dead first server leaves the others
    theirs), round after round, all within `lifetime`.  A try's socket
    stays open and is listened to until the lifetime ends, so an answer
    that comes late for its try is still taken; a server asked again gets
    the same query (the same ID, as dnspython resends it) on the same
    socket, so with one nameserver the retry costs the first try nothing.
    A server that fails for good (an error rcode, SERVFAIL included, an
    answer whose CNAME chain cannot be followed, a network error such as
    the ICMP port unreachable of a stopped resolver) is not asked again and
    the next one is asked at once; when none is left the lookup fails at
    once.  A truncated answer (RFC 1035 §4.1.1 TC) is asked again of the
    same server over TCP (RFC 7766 §5).  Otherwise the rules are those of
    dnspython 2.3's Resolver.resolve with our settings (no search list, no
    rotation, retry_servfail off).

    What it does not take from dnspython is `dns.query.udp` and the
    Resolver around it: a selectors object per wait and the resolution
    bookkeeping cost more CPU than building, sending and parsing the query
    together.  It differs on purpose in what it accepts as the answer: a
    datagram that is not one (unparsable, another ID or question, from
    another address) is dropped and the wait goes on, where dns.query.udp
    gave up on the server (RFC 5452 §9.1: such a datagram may be a
    spoofing attempt, and must not cost the real answer).
    """

    def __init__(self, nameservers: list[str], port: int, timeout: float, lifetime: float):
        self.nameservers = list(nameservers)
        self.port = port
        self.timeout = timeout
        self.lifetime = lifetime
        self._families = {
            server: socket.AF_INET6 if ipaddress.ip_address(server).version == 6
            else socket.AF_INET
            for server in nameservers}
        # Idle sockets, for the loopback nameservers only (see _socket).
        self._idle: dict[str, list[socket.socket]] = {
            server: [] for server in nameservers if _keeps_sockets(server)}
        _TRANSPORTS.add(self)

    def close(self) -> None:
        """Closes the idle sockets.  Also in a child after fork: they are
        the parent's too, and two processes reading one socket would take
        each other's answers."""
        idle, self._idle = self._idle, {server: [] for server in self._idle}
        for sockets in idle.values():
            for sock in sockets:
                sock.close()

    def __del__(self):
        self.close()

    def exchange(self, question: _Question, lifetime: float | None) -> Answer:
        """The NOERROR or NXDOMAIN answer, its CNAME chain followed.

        Raises _Yxdomain and _Failure.
        """
        lifetime = self.lifetime if lifetime is None else lifetime
        now = time.monotonic()
        deadline = now + lifetime
        step = min(self.timeout, lifetime / (len(self.nameservers) + 1))
        usable = self.nameservers[:]     # those not failed for good
        this_round = usable[1:]
        asking: dict[str, socket.socket] = {}   # the servers asked, their sockets
        next_try = now + step
        try:
            server = usable[0]
            try:
                sock = asking[server] = self._socket(server)
                sock.send(question.wire)
            except OSError:
                self._drop(asking, usable, server)
            while True:
                if now >= next_try or not asking:
                    if not this_round:
                        if not usable:
                            raise _Failure("NoNameservers")
                        this_round = usable[:]
                    server = this_round.pop(0)
                    if server not in usable:
                        continue
                    next_try = now + step
                    try:
                        asked = asking.get(server)
                        if asked is None:
                            asked = asking[server] = self._socket(server)
                        asked.send(question.wire)
                    except OSError:
                        self._drop(asking, usable, server)
                        next_try = now
                        continue
                wait = min(next_try, deadline) - now
                if wait <= 0:
                    if now >= deadline:
                        raise _Failure("LifetimeTimeout")
                    now = time.monotonic()
                    continue
                if len(asking) == 1:
                    # The usual case, one socket: its own timeout waits in poll(2).
                    (server, sock), = asking.items()
                    sock.settimeout(wait)
                    ready: tuple[tuple[str, socket.socket], ...] = ((server, sock),)
                else:
                    # poll(2), not select(2): with the descriptor limit
                    # raised, a busy worker's sockets pass FD_SETSIZE (1024).
                    poller = select.poll()
                    for sock in asking.values():
                        poller.register(sock, select.POLLIN)
                    readable = {fd for fd, _ in poller.poll(wait * 1000)}
                    ready = tuple((s, k) for s, k in asking.items() if k.fileno() in readable)
                    for _, sock in ready:
                        sock.settimeout(0)
                for server, sock in ready:
                    try:
                        answer = self._receive(question, server, sock, deadline)
                    except (TimeoutError, BlockingIOError):
                        continue
                    except (dns.exception.DNSException, EOFError, OSError,
                            NotImplementedError, _Unusable):
                        # ICMP port unreachable reaches a connected socket
                        # as ECONNREFUSED: nobody serves there, no use
                        # waiting for it.
                        self._drop(asking, usable, server)
                        next_try = time.monotonic()
                        continue
                    if answer is None:
                        continue
                    # Kept only after an answer: a socket that got none may
                    # still get its late answer, one that failed is of no
                    # more use.
                    self._keep(asking.pop(server), server)
                    if answer.rcode == dns.rcode.NOERROR or answer.rcode == dns.rcode.NXDOMAIN:
                        return answer
                    if answer.rcode == dns.rcode.YXDOMAIN:
                        raise _Yxdomain()
                    usable.remove(server)
                    next_try = time.monotonic()
                now = time.monotonic()
                if now >= deadline:
                    raise _Failure("LifetimeTimeout")
        finally:
            for sock in asking.values():
                sock.close()

    def _socket(self, server: str) -> socket.socket:
        """A socket connected to server.

        A new socket for every query, so a new random source port (RFC
        5452 §9.2); connected, so the kernel drops datagrams from anywhere
        but the server.  A loopback server is the exception: no datagram
        from off this host can carry a loopback source (RFC 1122 §3.2.1.3
        (g); Linux drops such martians), so a new port buys nothing there,
        and a socket that got its answer is kept for the next query (three
        system calls fewer, socket, connect and close).  A datagram left
        over in a kept socket (a late answer) fails the ID and question
        checks like any other stray one.
        """
        idle = self._idle.get(server)
        if idle:
            try:
                return idle.pop()
            except IndexError:     # another thread took the last one
                pass
        sock = socket.socket(self._families[server], socket.SOCK_DGRAM)
        try:
            sock.connect((server, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _keep(self, sock: socket.socket, server: str) -> None:
        idle = self._idle.get(server)
        if idle is not None and len(idle) < IDLE_SOCKETS:
            idle.append(sock)
        else:
            sock.close()

    @staticmethod
    def _drop(asking: dict[str, socket.socket], usable: list[str], server: str) -> None:
        """server failed for good: not asked again, its socket closed."""
        sock = asking.pop(server, None)
        if sock is not None:
            sock.close()
        if server in usable:
            usable.remove(server)

    def _receive(self, question: _Question, server: str, sock: socket.socket,
                 deadline: float) -> Answer | None:
        """The answer in the next datagram on sock; None when it is not one
        (the wait goes on).  A truncated one is asked again over TCP.

        Raises TimeoutError when nothing came, OSError when the server is
        unreachable, _Unusable for an answer whose CNAME chain cannot be
        followed, and for TCP what dns.query.tcp raises.
        """
        datagram = sock.recv(65535)
        if question.qtype is not None:
            answer = dnswire.parse_response(datagram, question.id,
                                            question.qname_wire, question.qtype)
            if answer is not None:
                return answer
        # Not the common case (or not an answer to us at all): dnspython
        # parses it, and decides.
        try:
            response = dns.message.from_wire(datagram, raise_on_truncation=True)
        except dns.message.Truncated as truncated:
            if not question.message.is_response(truncated.message()):
                return None
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError() from None
            try:
                response = dns.query.tcp(question.message, server, timeout=timeout,
                                         port=self.port)
            except dns.exception.Timeout:
                raise TimeoutError() from None   # no answer from this try
            except (dns.exception.DNSException, EOFError, OSError, NotImplementedError):
                raise
            except Exception:   # anything else dnspython raises over TCP: the same
                raise TimeoutError() from None
            return _from_message(response, question.rdtype)
        except Exception:   # not a DNS message
            return None
        if question.message.is_response(response):
            return _from_message(response, question.rdtype)
        return None


def _from_message(response: dns.message.Message, rdtype: str) -> Answer:
    """dnspython's reading of a response to our question, as dnswire gives it.

    Raises _Unusable when the CNAME chain cannot be followed.
    """
    rcode = response.rcode()
    records: tuple = ()
    ttl = 0
    # resolve_chaining finds no answer in an empty answer section (QR is
    # set: is_response checked it), after walking up the name for an SOA
    # TTL, which a negative answer does not use (see _expiry).
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) and (
            response.answer or len(response.question) != 1):
        try:
            # Raises on a CNAME loop (ChainTooLong past
            # dns.message.MAX_CHAIN), on an answer with NXDOMAIN, on a
            # question count other than 1.
            # Ignored for mypy: from_wire's Message is a QueryMessage here
            # (a query's opcode), which dnspython's annotations do not say.
            chain = response.resolve_chaining()   # type: ignore[attr-defined]
        except Exception as error:
            raise _Unusable(error.__class__.__name__) from None
        if chain.answer is not None:
            records = tuple(_value(rdtype, r) for r in chain.answer)
            ttl = chain.minimum_ttl
    return Answer(int(rcode), int(response.flags), records, ttl, _negative_ttl(response))


def _expiry(negative_ttl: int | None) -> float:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA minimum);
    without an SOA it is not cached at all (0)."""
    return 0.0 if negative_ttl is None else time.time() + negative_ttl


def _negative_ttl(response: dns.message.Message) -> int | None:
    """min(TTL, MINIMUM) of the first SOA in the authority section."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and rrset:
            return min(rrset.ttl, rrset[0].minimum)
    return None


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
