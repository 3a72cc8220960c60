"""policyd.dns.Resolver against a real unbound serving the standard world."""
from __future__ import annotations

import ipaddress
import socket
import time

import dns.flags
import dns.message
import dns.query
import pytest

from policyd import config
from policyd.dns import CacheMiss, DnsTempError, Lookup, Resolver
from policyd.engine import Engine
from policyd.model import Request
from tests.integration.dnsworld import (BOGUS_NAME, QueryCountingProxy,
                                        free_port, write_config)


def make_resolver(tmp_path, unbound, extra_yaml: str = "") -> Resolver:
    """A Resolver built the way the daemon builds it: from a config file."""
    return Resolver(config.load(str(write_config(tmp_path, unbound, extra_yaml))).dns)


def dns_yaml(nameservers: list[str], port: int, **settings) -> str:
    lines = [f"  nameservers: [{', '.join(nameservers)}]", f"  port: {port}"]
    lines += [f"  {key}: {value}" for key, value in settings.items()]
    return "dns:\n" + "\n".join(lines) + "\n"


@pytest.fixture
def resolver(tmp_path, unbound) -> Resolver:
    return make_resolver(tmp_path, unbound)


@pytest.fixture
def proxy(unbound):
    """A query-counting forwarder in front of unbound."""
    forwarder = QueryCountingProxy((unbound.address, unbound.port)).start()
    yield forwarder
    forwarder.stop()


@pytest.fixture
def proxied_resolver(tmp_path, unbound, proxy) -> Resolver:
    return make_resolver(tmp_path, unbound, dns_yaml([proxy.address], proxy.port))


@pytest.fixture
def silent_udp():
    """A UDP socket on loopback that takes queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.setblocking(False)
        yield sink


def received_datagram(sink: socket.socket) -> bool:
    try:
        return bool(sink.recv(65535))
    except BlockingIOError:
        return False


# --- the world itself ------------------------------------------------------

def test_write_config_describes_the_standard_world(policyd_config, unbound):
    loaded = config.load(str(policyd_config))
    assert loaded.authserv_id == "mx.test.example"
    assert loaded.dns.nameservers == (ipaddress.ip_address(unbound.address),)
    assert loaded.dns.port == unbound.port
    assert loaded.nat.own_domains == ("own.example",)
    assert loaded.nat.networks == (ipaddress.ip_network("192.168.1.0/24"),
                                   ipaddress.ip_network("fd00::/8"))
    assert loaded.nat.public_addresses == (ipaddress.ip_address("203.0.113.7"),)


def test_names_outside_the_world_are_refused_not_looked_up(resolver):
    with pytest.raises(DnsTempError):
        resolver.query("example.com", "MX")


# --- answers in the documented shapes --------------------------------------

@pytest.mark.parametrize("name, rdtype, records", [
    ("own.example", "TXT", ((b"v=spf1 ip4:203.0.113.7 ip6:2001:db8:7::7 -all",),)),
    ("sub.own.example", "TXT", ((b"v=spf1 ip4:203.0.113.7 -all",),)),
    ("include.example", "TXT", ((b"v=spf1 include:other.example -all",),)),
    ("mx.own.example", "A", ("203.0.113.7",)),
    ("helo.other.example", "A", ("198.51.100.10",)),
    ("mail6.other.example", "AAAA", ("2001:db8:6::25",)),
    ("own.example", "MX", ((10, "mx.own.example"),)),
    ("10.100.51.198.in-addr.arpa", "PTR", ("helo.other.example",)),
])
def test_records_come_back_in_the_documented_shape(resolver, name, rdtype, records):
    assert resolver.query(name, rdtype) == Lookup(records, secure=False, nxdomain=False)


def test_a_final_dot_makes_no_difference(resolver):
    assert resolver.query("own.example.", "TXT") == resolver.query("own.example", "TXT")


def test_ptr_of_an_ipv6_address(resolver):
    lookup = resolver.ptr(ipaddress.ip_address("2001:db8:6::25"))
    assert lookup.records == ("mail6.other.example",)
    assert resolver.ptr(ipaddress.ip_address("2001:db8:6::27")).records == ("liar.other.example",)


def test_ptr_of_an_ipv4_address(resolver):
    assert resolver.ptr(ipaddress.ip_address("198.51.100.10")).records == ("helo.other.example",)


@pytest.mark.parametrize("address", ["2001:db8:6::26", "198.51.100.11"])
def test_no_ptr_is_nxdomain(resolver, address):
    assert resolver.ptr(ipaddress.ip_address(address)) == Lookup((), False, nxdomain=True)


def test_an_answer_larger_than_the_edns_payload_is_fetched_over_tcp(resolver, unbound):
    # The UDP answer really is truncated (RFC 1035 §4.1.1 TC), so a full
    # answer proves the retry over TCP (RFC 7766 §5).
    query = dns.message.make_query("big.example.", "TXT", use_edns=0, payload=1232)
    udp = dns.query.udp(query, unbound.address, port=unbound.port, timeout=2)
    assert udp.flags & dns.flags.TC
    lookup = resolver.query("big.example", "TXT")
    assert len(lookup.records) == 7
    assert sorted(strings[0][-2:] for strings in lookup.records) == [
        b"-1", b"-2", b"-3", b"-4", b"-5", b"-6", b"-7"]


# --- NXDOMAIN and NODATA ---------------------------------------------------

def test_nxdomain(resolver):
    assert resolver.query("no-such-name.example", "TXT") == Lookup((), False, nxdomain=True)


def test_nodata_is_not_nxdomain(resolver):
    # nospf.example has an A record, so a TXT question is NODATA (RFC 2308 §2.2).
    assert resolver.query("nospf.example", "TXT") == Lookup((), False, nxdomain=False)
    assert resolver.query("nospf.example", "A").records == ("198.51.100.20",)


def test_name_with_only_other_types_below_it_is_nodata(resolver):
    assert resolver.query("mx.own.example", "TXT") == Lookup((), False, nxdomain=False)


# --- the TTL cache ---------------------------------------------------------

def test_second_query_is_answered_from_the_cache(proxied_resolver, proxy):
    first = proxied_resolver.query("own.example", "TXT")
    hits, misses = proxied_resolver.cache_statistics()
    second = proxied_resolver.query("own.example", "TXT")
    assert second == first
    assert proxied_resolver.cache_statistics() == (hits + 1, misses)
    assert proxy.questions == [("own.example.", "TXT")]


def test_the_cache_key_includes_the_type(proxied_resolver, proxy):
    proxied_resolver.query("own.example", "TXT")
    proxied_resolver.query("own.example", "MX")
    assert proxy.questions == [("own.example.", "TXT"), ("own.example.", "MX")]


def test_negative_answers_are_cached(proxied_resolver, proxy):
    # RFC 2308 §5: both kinds of negative answer are cached, for the
    # SOA minimum the server sent along.
    for _ in range(2):
        assert proxied_resolver.query("no-such-name.example", "TXT").nxdomain
        assert proxied_resolver.query("nospf.example", "TXT") == Lookup((), False)
    assert proxy.questions == [("no-such-name.example.", "TXT"), ("nospf.example.", "TXT")]


def test_a_cached_answer_expires_with_its_ttl(proxied_resolver, proxy):
    # short-ttl.example has a TTL of 1 s.
    started = time.monotonic()
    proxied_resolver.query("short-ttl.example", "TXT")
    proxied_resolver.query("short-ttl.example", "TXT")
    assert len(proxy.questions) == 1
    deadline = started + 5
    while len(proxy.questions) == 1 and time.monotonic() < deadline:
        proxied_resolver.query("short-ttl.example", "TXT")
        time.sleep(0.05)
    assert len(proxy.questions) == 2
    assert time.monotonic() - started >= 0.9


def test_a_negative_answer_without_soa_is_not_cached(proxied_resolver, proxy):
    for _ in range(2):
        assert proxied_resolver.query("nosoa.example", "TXT").nxdomain
    assert proxy.questions == [("nosoa.example.", "TXT")] * 2


# --- answering from the cache alone (the policy server's event loop) -------

def test_cached_only_answers_what_is_cached(proxied_resolver, proxy):
    first = proxied_resolver.query("own.example", "TXT")
    hits, misses = proxied_resolver.cache_statistics()
    assert proxied_resolver.cached_only(proxied_resolver.query, "own.example", "TXT") == first
    assert proxied_resolver.cache_statistics() == (hits + 1, misses)
    assert proxy.questions == [("own.example.", "TXT")]


def test_cached_only_sends_nothing_on_a_miss_and_counts_nothing(proxied_resolver, proxy):
    proxied_resolver.query("own.example", "TXT")
    before = proxied_resolver.cache_statistics()

    def two_questions():
        proxied_resolver.query("own.example", "TXT")       # a hit
        return proxied_resolver.query("own.example", "MX")  # a miss

    with pytest.raises(CacheMiss):
        proxied_resolver.cached_only(two_questions)
    assert proxied_resolver.cache_statistics() == before
    assert proxy.questions == [("own.example.", "TXT")]
    # The same thread queries normally afterwards.
    proxied_resolver.query("own.example", "MX")
    assert proxy.questions[-1] == ("own.example.", "MX")


def test_a_swallowed_miss_is_still_a_miss(proxied_resolver):
    # pyspf has bare `except:` clauses (around exp= lookups): a miss they
    # swallow must not let an incomplete evaluation pass for a decision.
    def swallowing():
        try:
            proxied_resolver.query("own.example", "TXT")
        except BaseException:
            pass
        return "looks fine"

    with pytest.raises(CacheMiss):
        proxied_resolver.cached_only(swallowing)


def test_engine_decides_from_the_cache_once_it_holds_the_answers(tmp_path, unbound, proxy):
    engine = Engine(config.load(str(write_config(
        tmp_path, unbound, dns_yaml([proxy.address], proxy.port)))),
        make_resolver(tmp_path, unbound, dns_yaml([proxy.address], proxy.port)))
    request = Request(client_address=ipaddress.ip_address("2001:db8:1::25"),
                      helo="mail.other.example", sender="someone@other.example")
    with pytest.raises(CacheMiss):
        engine.decide_cached(request)
    assert proxy.questions == []
    decided = engine.decide(request)
    asked = len(proxy.questions)
    assert asked > 0
    cached = engine.decide_cached(request)
    assert len(proxy.questions) == asked
    assert (cached.action, cached.rule, cached.headers, cached.spf, cached.iprev) == \
        (decided.action, decided.rule, decided.headers, decided.spf, decided.iprev)


# --- temporary errors, and the time they take ------------------------------

def test_refused_is_a_temporary_error(resolver):
    with pytest.raises(DnsTempError, match="TXT temperror.example"):
        resolver.query("temperror.example", "TXT")


def test_a_silent_server_costs_at_most_the_timeout(tmp_path, unbound, silent_udp):
    port = silent_udp.getsockname()[1]
    resolver = make_resolver(tmp_path, unbound, dns_yaml(["127.0.0.1"], port, timeout=1.0))
    started = time.monotonic()
    with pytest.raises(DnsTempError):
        resolver.query("own.example", "TXT")
    elapsed = time.monotonic() - started
    assert received_datagram(silent_udp)
    assert 0.9 <= elapsed <= 2.0


def test_a_shorter_lifetime_per_call_wins(tmp_path, unbound, silent_udp):
    port = silent_udp.getsockname()[1]
    resolver = make_resolver(tmp_path, unbound, dns_yaml(["127.0.0.1"], port, timeout=10.0))
    started = time.monotonic()
    with pytest.raises(DnsTempError):
        resolver.query("own.example", "TXT", lifetime=0.5)
    assert time.monotonic() - started <= 1.5


def test_no_server_listening_is_a_temporary_error(tmp_path, unbound):
    # A stopped resolver.  dnspython's UDP socket is not connected, so the
    # ICMP port unreachable never reaches it: this is a timeout too.
    port = free_port("127.0.0.1")
    resolver = make_resolver(tmp_path, unbound, dns_yaml(["127.0.0.1"], port, timeout=1.0))
    started = time.monotonic()
    with pytest.raises(DnsTempError):
        resolver.query("own.example", "TXT")
    assert time.monotonic() - started <= 2.0


def test_a_dead_first_nameserver_does_not_hide_the_second(tmp_path, unbound):
    # Same port as unbound (one port for all nameservers), another address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.202", unbound.port))
        dead.setblocking(False)
        resolver = make_resolver(tmp_path, unbound, dns_yaml(
            ["127.0.0.202", unbound.address], unbound.port, timeout=2.0))
        assert resolver.query("own.example", "TXT").records
        assert received_datagram(dead)


def test_observers_see_every_lookup(resolver):
    durations = []
    resolver.observers.append(durations.append)
    resolver.query("own.example", "TXT")
    with pytest.raises(DnsTempError):
        resolver.query("temperror.example", "TXT")
    assert len(durations) == 2
    assert all(0 <= seconds < 2 for seconds in durations)


# --- DNSSEC: the AD bit and the trust rule ---------------------------------

def test_ad_is_believed_from_a_loopback_resolver(resolver):
    assert resolver.trusted and resolver.trust_reason == "loopback resolver"
    assert resolver.query("signed.example", "TXT") == Lookup(
        ((b"v=spf1 ip4:198.51.100.0/24 -all",),), secure=True)


def test_unsigned_data_is_not_secure(resolver):
    assert not resolver.query("own.example", "TXT").secure


def test_signed_denials_are_secure(resolver):
    # RFC 4035 §3.1.3: NSEC proves the name or the type does not exist.
    assert resolver.query("no-such-name.signed.example", "TXT") == Lookup(
        (), secure=True, nxdomain=True)
    assert resolver.query("signed.example", "A") == Lookup((), secure=True, nxdomain=False)


def test_cached_answers_keep_their_ad_bit(proxied_resolver, proxy):
    for _ in range(2):
        assert proxied_resolver.query("signed.example", "TXT").secure
        assert proxied_resolver.query("no-such-name.signed.example", "TXT").secure
    assert len(proxy.questions) == 2


def test_ad_is_ignored_when_trust_ad_is_no(tmp_path, unbound):
    resolver = make_resolver(tmp_path, unbound, 'dns: {trust_ad: "no"}')
    assert not resolver.trusted
    assert resolver.query("signed.example", "TXT") == Lookup(
        ((b"v=spf1 ip4:198.51.100.0/24 -all",),), secure=False)
    assert not resolver.query("no-such-name.signed.example", "TXT").secure


def test_bogus_data_is_a_temporary_error_not_an_answer(resolver, unbound):
    # The validator answers SERVFAIL for data whose signature does not
    # verify (RFC 4035 §5.5); the forged TXT must never reach SPF.
    with pytest.raises(DnsTempError):
        resolver.query(BOGUS_NAME, "TXT")
    assert f"validation failure <{BOGUS_NAME} TXT IN>" in unbound.log()
