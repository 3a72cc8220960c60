"""The one DNS layer: DNS messages over our own transport, with a shared
TTL cache, bounded time, and the DNSSEC trust rule.  Plain questions and
ordinary answers go through our small codec (policyd.dnswire), the rest
through dnspython.

An answer counts as authenticated only when the resolver set the AD bit
*and* the path to the resolver is trusted (RFC 6840 §5.7: a stub must not
believe AD from a resolver it cannot trust the path to).  The path is
trusted when every nameserver is on loopback, when resolv.conf says
`options trust-ad` (glibc's switch, which dnspython does not read), or
when the config says so.
"""
from __future__ import annotations

import functools
import ipaddress
import marshal
import mmap
import os
import secrets
import socket
import threading
import struct
import time
import weakref
import zlib
from dataclasses import dataclass, field

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
    """


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
    were asked of the resolver again (measured: Python CPU per message
    of a warm replay 499 us with 4 separate caches, 307 us with one).  A
    worker's miss looks here before it asks the network.

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
        self.observers: list = []   # callables(seconds) for metrics
        self._shared = _shared_answers
        # Answers from another resolver config (servers, port, trust) are
        # not ours: the shared keys say which config asked.
        self._shared_prefix = f"{','.join(self.nameservers)}:{config.port}:{self.trusted:d}|"

    def cached_only(self, function, *args):
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

    def when_decided(self, effect, *args) -> None:
        """effect(*args) now, or, inside `cached_only`, once the attempt has
        succeeded: an attempt that missed (even one whose miss some code
        swallowed, as pyspf's bare except around exp= does) leaves nothing
        behind, such as an SPF memo entry made from incomplete answers."""
        state = self._cache_only
        if state.active:
            state.deferred.append((effect, args))
        else:
            effect(*args)

    def query(self, name: str, rdtype: str, lifetime: float | None = None) -> Lookup:
        """One question; raises DnsTempError on anything temporary."""
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
        try:
            answer = self._resolver.exchange(
                _Question(name, rdtype),
                min(lifetime, self.config.timeout) if lifetime else None)
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
            # Not a name DNS can carry, so nothing can exist there.
            return Lookup((), False, nxdomain=True)
        except _Yxdomain:
            return Lookup((), False, nxdomain=True)
        except _Failure as error:
            raise DnsTempError(f"{rdtype} {name}: {error}") from None
        except dns.exception.DNSException as error:
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

    def ptr(self, address: IPAddress) -> Lookup:
        return self.query(dns.reversename.from_address(str(address)).to_text(), "PTR")

    def _secure(self, response: Answer | dns.message.Message | None) -> bool:
        return bool(self.trusted and response is not None
                    and response.flags & dns.flags.AD)

    def cache_statistics(self) -> tuple[int, int]:
        return self._lookup_hits, self._lookup_misses


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

    The retry rules are those of dnspython 2.3's Resolver.resolve with our
    settings (no search list, no rotation, retry_servfail off): the
    nameservers are asked in order, each for at most `timeout` and all
    within `lifetime`; one that times out is asked again in the next
    round, after a backoff of 0.1 s doubling up to 2 s; one that fails for
    good (an error rcode, SERVFAIL included, an answer whose CNAME chain
    cannot be followed, a network error) is not asked again; a truncated
    answer (RFC 1035 §4.1.1 TC) is asked again of the same server over
    TCP (RFC 7766 §5).

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
        # Idle sockets, for the loopback nameservers only (see _udp).
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
        deadline = time.monotonic() + (self.lifetime if lifetime is None else lifetime)
        usable = self.nameservers[:]     # those not failed for good
        this_round = self.nameservers[:]
        backoff = 0.1
        while True:
            if not this_round:
                if not usable:
                    raise _Failure("NoNameservers")
                this_round = usable[:]
                time.sleep(max(min(backoff, deadline - time.monotonic()), 0))
                backoff = min(backoff * 2, 2)
            server = this_round.pop(0)
            tcp = False
            while True:
                timeout = min(deadline - time.monotonic(), self.timeout)
                if timeout <= 0:
                    raise _Failure("LifetimeTimeout")
                try:
                    if tcp:
                        answer = _from_message(dns.query.tcp(
                            question.message, server, timeout=timeout, port=self.port),
                            question.rdtype)
                    else:
                        answer = self._udp(question, server, timeout)
                except dns.message.Truncated:
                    if tcp:
                        usable.remove(server)
                        break
                    tcp = True
                    continue
                except (dns.exception.FormError, EOFError, OSError, NotImplementedError,
                        _Unusable):
                    usable.remove(server)
                    break
                except Exception:   # a timeout over TCP, say: next round
                    break
                if answer is None:
                    break
                if answer.rcode == dns.rcode.NOERROR or answer.rcode == dns.rcode.NXDOMAIN:
                    return answer
                if answer.rcode == dns.rcode.YXDOMAIN:
                    raise _Yxdomain()
                usable.remove(server)
                break

    def _udp(self, question: _Question, server: str, timeout: float) -> Answer | None:
        """The answer from server over UDP; None when none came in time.

        Raises dns.message.Truncated for an answer with TC, _Unusable for
        one whose CNAME chain cannot be followed, OSError when the query
        cannot be sent.
        """
        deadline = time.monotonic() + timeout
        # A new socket for every query, so a new random source port (RFC
        # 5452 §9.2); connected, so the kernel drops datagrams from
        # anywhere but the server.  Its timeout waits in poll(2).  A
        # loopback server is the exception: no datagram from off this host
        # can carry a loopback source (RFC 1122 §3.2.1.3 (g); Linux drops
        # such martians), so a new port buys nothing there, and a socket
        # that got its answer is kept for the next query (three system
        # calls fewer, socket, connect and close).  A datagram left over
        # in a kept socket (a late answer) fails the ID and question
        # checks below like any other stray one.
        idle = self._idle.get(server)
        sock = None
        if idle:
            try:
                sock = idle.pop()
            except IndexError:     # another thread took the last one
                pass
        if sock is None:
            sock = socket.socket(self._families[server], socket.SOCK_DGRAM)
            try:
                sock.connect((server, self.port))
            except BaseException:
                sock.close()
                raise
        answered = False
        try:
            sock.send(question.wire)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                sock.settimeout(remaining)
                try:
                    datagram = sock.recv(65535)
                except (TimeoutError, ConnectionRefusedError):
                    # ICMP port unreachable reaches a connected socket
                    # only: like a lost datagram, it leaves the server in
                    # the next round.
                    return None
                if question.qtype is not None:
                    answer = dnswire.parse_response(datagram, question.id,
                                                    question.qname_wire, question.qtype)
                    if answer is not None:
                        answered = True
                        return answer
                # Not the common case (or not an answer to us at all):
                # dnspython parses it, and decides.
                try:
                    response = dns.message.from_wire(datagram, raise_on_truncation=True)
                except dns.message.Truncated as truncated:
                    if question.message.is_response(truncated.message()):
                        raise
                    continue
                except Exception:   # not a DNS message
                    continue
                if question.message.is_response(response):
                    answer = _from_message(response, question.rdtype)
                    answered = True
                    return answer
        finally:
            # Kept only after an answer: a socket that timed out may still
            # get its late answer, and one that failed is of no more use.
            if answered and idle is not None and len(idle) < IDLE_SOCKETS:
                idle.append(sock)
            else:
                sock.close()


def _from_message(response: dns.message.Message, rdtype: str) -> Answer:
    """dnspython's reading of a response to our question, as dnswire gives it.

    Raises _Unusable when the CNAME chain cannot be followed.
    """
    rcode = response.rcode()
    records, ttl = (), 0
    # resolve_chaining finds no answer in an empty answer section (QR is
    # set: is_response checked it), after walking up the name for an SOA
    # TTL, which a negative answer does not use (see _expiry).
    if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) and (
            response.answer or len(response.question) != 1):
        try:
            # Raises on a CNAME loop (ChainTooLong past
            # dns.message.MAX_CHAIN), on an answer with NXDOMAIN, on a
            # question count other than 1.
            chain = response.resolve_chaining()
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
