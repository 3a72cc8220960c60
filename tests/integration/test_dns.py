"""policyd.dns.Resolver against a real unbound serving the standard world."""
from __future__ import annotations

import ipaddress
import os
import socket
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import pytest

import policyd.dns
from policyd import config, dnswire
from policyd.checks import dkim as dkim_check
from policyd.checks import iprev as iprev_check
from policyd.dns import CacheMiss, DnsTempError, Lookup, Resolver, _value
from policyd.engine import Engine
from policyd.model import Action, DkimResult, IprevResult, Request, SpfResult
from tests.integration.dnsworld import (BOGUS_NAME, NO_SOA_ZONES, REFUSED_ZONES,
                                        Datagram, QueryCountingProxy, ScriptedServer,
                                        free_port, load_zones, reply, write_config)
from tests.integration.test_policy_server import (  # noqa: F401 (daemon_factory: a fixture)
    PolicyClient, daemon_config, daemon_factory)
from tests.unit.milter.signing import ed25519_key, message
from tests.unit.test_dnswire import QUERY_ID, same_as_dnspython


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


def test_negative_answers_do_not_push_out_records(tmp_path, unbound, proxy):
    # Forged mail brings a new HELO name with nearly every message: its
    # NXDOMAIN answers must not flush the senders' SPF records.
    resolver = make_resolver(tmp_path, unbound,
                             dns_yaml([proxy.address], proxy.port, cache_size=8))
    resolver.query("own.example", "TXT")
    for n in range(20):
        assert resolver.query(f"forged-helo-{n}.example", "TXT").nxdomain
    asked = len(proxy.questions)
    resolver.query("own.example", "TXT")
    assert len(proxy.questions) == asked


def test_cache_size_zero_keeps_nothing(tmp_path, unbound, proxy):
    resolver = make_resolver(tmp_path, unbound,
                             dns_yaml([proxy.address], proxy.port, cache_size=0))
    for _ in range(2):
        resolver.query("own.example", "TXT")
        resolver.query("no-such-name.example", "TXT")
    assert len(proxy.questions) == 4


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


def test_no_server_listening_is_a_temporary_error_at_once(tmp_path, unbound):
    # A stopped resolver: the ICMP port unreachable reaches the connected
    # socket (ECONNREFUSED).  Nobody serves there, so waiting out the
    # timeout cannot help; the decision gets its temperror at once.
    port = free_port("127.0.0.1")
    resolver = make_resolver(tmp_path, unbound, dns_yaml(["127.0.0.1"], port, timeout=1.0))
    started = time.monotonic()
    with pytest.raises(DnsTempError, match="NoNameservers"):
        resolver.query("own.example", "TXT")
    assert time.monotonic() - started < 0.2


def test_a_closed_first_nameserver_passes_to_the_second_at_once(tmp_path, unbound):
    # Same port as unbound (one port for all nameservers), an address
    # nobody listens on.
    resolver = make_resolver(tmp_path, unbound, dns_yaml(
        ["127.0.0.204", unbound.address], unbound.port, timeout=2.0))
    started = time.monotonic()
    assert resolver.query("own.example", "TXT").records
    assert time.monotonic() - started < 0.2


def test_a_dead_first_nameserver_does_not_hide_the_second(tmp_path, unbound):
    # Same port as unbound (one port for all nameservers), another address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        dead.bind(("127.0.0.202", unbound.port))
        dead.setblocking(False)
        resolver = make_resolver(tmp_path, unbound, dns_yaml(
            ["127.0.0.202", unbound.address], unbound.port, timeout=2.0))
        assert resolver.query("own.example", "TXT").records
        assert received_datagram(dead)


def test_two_nameservers_waited_for_with_descriptors_past_fd_setsize(tmp_path, unbound):
    # With the descriptor limit raised (service.raise_descriptor_limit), a
    # busy worker's DNS sockets get numbers past FD_SETSIZE (1024), which
    # select(2) cannot wait for: ValueError, and the decision failed.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"hard descriptor limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while not held or held[-1] < 1030:
            held.append(os.open("/dev/null", os.O_RDONLY))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
            dead.bind(("127.0.0.202", unbound.port))
            resolver = make_resolver(tmp_path, unbound, dns_yaml(
                ["127.0.0.202", unbound.address], unbound.port, timeout=2.0))
            assert resolver.query("own.example", "TXT").records
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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


# --- the transport: what it sends, and what it takes as the answer ---------

@pytest.fixture
def scripted():
    """Start ScriptedServers; stop them after the test."""
    servers = []

    def start(script, address="127.0.0.1", port=0):
        server = ScriptedServer(script, address, port).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def answering(*records, **reply_settings):
    """A script that answers every query with records (zone-file lines)."""
    def script(query, number):
        return [Datagram(reply(query, answer=records, **reply_settings))]
    return script


def scripted_resolver(tmp_path, unbound, server, **settings) -> Resolver:
    return make_resolver(tmp_path, unbound, dns_yaml([f"'{server.address}'"], server.port,
                                                     **settings))


def test_the_query_asks_for_dnssec_and_the_ad_bit(tmp_path, unbound, scripted):
    server = scripted(answering("a.example. 60 IN A 192.0.2.1"))
    scripted_resolver(tmp_path, unbound, server).query("a.example", "A")
    (query, _), = server.queries
    # RFC 6840 §5.7 (AD), RFC 3225 (DO), RFC 6891 (EDNS0, our payload).
    assert query.flags == dns.flags.RD | dns.flags.AD
    assert (query.edns, query.ednsflags, query.payload) == (0, dns.flags.DO, 1232)
    assert [(q.name.to_text(), q.rdtype) for q in query.question] == [
        ("a.example.", dns.rdatatype.A)]


def test_a_nameserver_off_this_host_gets_a_new_source_port_per_query(
        tmp_path, unbound, scripted, monkeypatch):
    # RFC 5452 §9.2: a fresh random port per query, against spoofing.  Tests
    # reach loopback only, so this server is taken for one off the host.
    monkeypatch.setattr(policyd.dns, "_keeps_sockets", lambda server: False)
    server = scripted(answering())
    resolver = scripted_resolver(tmp_path, unbound, server)
    for number in range(4):
        resolver.query(f"n{number}.example", "A")
    ports = [port for _, port in server.queries]
    assert len(ports) == 4 and len(set(ports)) > 1


def test_a_loopback_nameserver_is_asked_from_a_kept_socket(tmp_path, unbound, scripted):
    # Nothing off the host can send from a loopback address: a new port
    # per query would buy nothing there.
    server = scripted(answering())
    resolver = scripted_resolver(tmp_path, unbound, server)
    for number in range(4):
        resolver.query(f"n{number}.example", "A")
    ports = [port for _, port in server.queries]
    assert len(ports) == 4 and len(set(ports)) == 1


def test_a_socket_that_got_no_answer_is_not_kept(tmp_path, unbound, scripted):
    # Its late answer may still come; the next query gets a socket of its own.
    def script(query, number):
        silent = query.question[0].name.to_text() == "silent.example."
        return [] if silent else [Datagram(reply(query))]
    server = scripted(script)
    resolver = scripted_resolver(tmp_path, unbound, server, timeout=0.3)
    resolver.query("before.example", "A")
    with pytest.raises(DnsTempError):
        resolver.query("silent.example", "A")
    resolver.query("after.example", "A")
    ports = [(query.question[0].name.to_text(), port) for query, port in server.queries]
    assert ports[0][1] == ports[1][1]       # the kept socket asked first
    assert ports[-1][0] == "after.example." and ports[-1][1] not in {p for _, p in ports[1:-1]}


def test_a_child_after_fork_does_not_share_the_parents_kept_sockets(tmp_path, unbound,
                                                                    scripted):
    # Two processes reading one socket would take each other's answers.
    server = scripted(answering())
    resolver = scripted_resolver(tmp_path, unbound, server)
    resolver.query("parent-before.example", "A")
    child = os.fork()
    if child == 0:   # pragma: no cover (the child's result is its exit status)
        try:
            resolver.query("child.example", "A")
            os._exit(0)
        finally:
            os._exit(1)
    assert os.waitpid(child, 0)[1] == 0
    resolver.query("parent-after.example", "A")
    ports = {query.question[0].name.to_text(): port for query, port in server.queries}
    assert ports["parent-before.example."] == ports["parent-after.example."]
    assert ports["child.example."] != ports["parent-before.example."]


def test_datagrams_that_are_not_the_answer_are_ignored(tmp_path, unbound, scripted):
    # RFC 5452 §9.1: a datagram that does not match the query (another ID,
    # another question, not DNS at all, from elsewhere) may be a spoofing
    # attempt; it is dropped and the wait for the real answer goes on.
    def script(query, number):
        forged = ("a.example. 60 IN A 192.0.2.66",)
        return [Datagram(b"\x00\x01 not DNS"),
                Datagram(reply(query, answer=forged, id=query.id ^ 1)),
                Datagram(reply(dns.message.make_query("b.example.", "A"), answer=forged,
                               id=query.id)),
                Datagram(reply(query, answer=forged), from_another_port=True),
                Datagram(b""),
                Datagram(reply(query, answer=("a.example. 60 IN A 192.0.2.1",)))]
    server = scripted(script)
    resolver = scripted_resolver(tmp_path, unbound, server)
    assert resolver.query("a.example", "A") == Lookup(("192.0.2.1",), secure=False)
    assert len(server.queries) == 1


def test_a_server_that_only_sends_noise_times_out(tmp_path, unbound, scripted):
    server = scripted(lambda query, number: [
        Datagram(reply(query, id=query.id ^ 1)), Datagram(b"junk")])
    resolver = scripted_resolver(tmp_path, unbound, server, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DnsTempError, match="LifetimeTimeout"):
        resolver.query("a.example", "A")
    assert 0.9 <= time.monotonic() - started <= 2.0
    # Asked again in the next round (dnspython's backoff), within the lifetime.
    assert len(server.queries) == 2


def test_a_lost_query_is_asked_again_in_the_next_round(tmp_path, unbound, scripted):
    def script(query, number):
        return [] if number == 0 else [
            Datagram(reply(query, answer=("a.example. 60 IN A 192.0.2.1",)))]
    server = scripted(script)
    resolver = scripted_resolver(tmp_path, unbound, server, timeout=2.0)
    started = time.monotonic()
    assert resolver.query("a.example", "A").records == ("192.0.2.1",)
    # One nameserver: half the lifetime for the first try, then 0.1 s backoff.
    assert 1.0 <= time.monotonic() - started <= 1.5
    assert len(server.queries) == 2


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.FORMERR,
                                   dns.rcode.NOTIMP])
def test_an_error_rcode_from_the_first_nameserver_asks_the_second(
        tmp_path, unbound, scripted, rcode):
    # Same port as unbound (one port for all nameservers), another address.
    first = scripted(lambda query, number: [Datagram(reply(query, rcode))],
                     "127.0.0.203", unbound.port)
    resolver = make_resolver(tmp_path, unbound, dns_yaml(
        [first.address, unbound.address], unbound.port, timeout=2.0))
    started = time.monotonic()
    assert resolver.query("own.example", "TXT").records
    assert time.monotonic() - started < 0.5
    assert len(first.queries) == 1


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_a_server_that_failed_is_not_asked_again(tmp_path, unbound, scripted, rcode):
    # dnspython's retry_servfail=False: SERVFAIL takes the server out too.
    server = scripted(lambda query, number: [Datagram(reply(query, rcode))])
    resolver = scripted_resolver(tmp_path, unbound, server, timeout=2.0)
    started = time.monotonic()
    with pytest.raises(DnsTempError, match="A a.example: NoNameservers"):
        resolver.query("a.example", "A")
    assert time.monotonic() - started < 0.5
    assert len(server.queries) == 1


def test_a_cname_chain_is_followed_and_its_shortest_ttl_kept(tmp_path, unbound, scripted):
    server = scripted(answering("a.example. 300 IN CNAME b.example.",
                                "b.example. 60 IN CNAME c.example.",
                                "c.example. 600 IN A 192.0.2.1",
                                "c.example. 600 IN A 192.0.2.2"))
    resolver = scripted_resolver(tmp_path, unbound, server)
    lookup = resolver.query("a.example", "A")
    assert lookup == Lookup(("192.0.2.1", "192.0.2.2"), secure=False)
    assert time.time() + 58 <= lookup.expires <= time.time() + 60


def test_a_cname_loop_is_a_temporary_error(tmp_path, unbound, scripted):
    # dnspython follows at most dns.message.MAX_CHAIN CNAMEs (ChainTooLong).
    server = scripted(answering("a.example. 60 IN CNAME b.example.",
                                "b.example. 60 IN CNAME a.example."))
    resolver = scripted_resolver(tmp_path, unbound, server)
    with pytest.raises(DnsTempError, match="NoNameservers"):
        resolver.query("a.example", "A")
    assert len(server.queries) == 1


def test_a_cname_to_nowhere_is_nodata(tmp_path, unbound, scripted):
    server = scripted(answering("a.example. 60 IN CNAME b.example."))
    assert scripted_resolver(tmp_path, unbound, server).query("a.example", "A") == Lookup(
        (), secure=False)


def test_an_answer_the_codec_leaves_to_dnspython_reads_the_same(tmp_path, unbound, scripted):
    # policyd.dnswire reads no NS record: dnspython reads this one.
    server = scripted(answering("a.example. 60 IN A 192.0.2.1",
                                authority=("example. 60 IN NS ns.example.",)))
    lookup = scripted_resolver(tmp_path, unbound, server).query("a.example", "A")
    assert lookup == Lookup(("192.0.2.1",), secure=False)
    assert time.time() + 58 <= lookup.expires <= time.time() + 60


def test_negative_answers_live_for_the_soa_minimum(tmp_path, unbound, scripted):
    # RFC 2308 §5: min(SOA TTL, SOA MINIMUM).
    soa = ("example. 3600 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 300",)

    def script(query, number):
        name = query.question[0].name.to_text()
        rcode = dns.rcode.NXDOMAIN if name.startswith("nx.") else dns.rcode.NOERROR
        return [Datagram(reply(query, rcode, authority=soa))]
    resolver = scripted_resolver(tmp_path, unbound, scripted(script))
    for name, nxdomain in (("nx.example", True), ("nodata.example", False)):
        lookup = resolver.query(name, "TXT")
        assert lookup == Lookup((), secure=False, nxdomain=nxdomain)
        assert time.time() + 298 <= lookup.expires <= time.time() + 300


def test_nxdomain_with_an_answer_is_not_believed(tmp_path, unbound, scripted):
    server = scripted(answering("a.example. 60 IN A 192.0.2.1", rcode=dns.rcode.NXDOMAIN))
    with pytest.raises(DnsTempError, match="NoNameservers"):
        scripted_resolver(tmp_path, unbound, server).query("a.example", "A")


def test_yxdomain_is_nxdomain(tmp_path, unbound, scripted):
    # RFC 6672 §2.2: the name became too long by DNAME substitution.
    server = scripted(answering(rcode=dns.rcode.YXDOMAIN))
    assert scripted_resolver(tmp_path, unbound, server).query("a.example", "A") == Lookup(
        (), secure=False, nxdomain=True)


def test_the_ad_bit_of_a_scripted_answer_counts(tmp_path, unbound, scripted):
    server = scripted(answering("a.example. 60 IN A 192.0.2.1", ad=True))
    assert scripted_resolver(tmp_path, unbound, server).query("a.example", "A").secure


def test_an_ipv6_nameserver(tmp_path, unbound, scripted):
    try:
        server = scripted(answering("a.example. 60 IN AAAA 2001:db8::1"), "::1")
    except OSError:
        pytest.skip("no IPv6 on loopback")
    resolver = scripted_resolver(tmp_path, unbound, server)
    assert resolver.query("a.example", "AAAA") == Lookup(("2001:db8::1",), secure=False)


# --- the same answers as dnspython's own resolver ---------------------------

def dnspython_lookup(resolver: Resolver, name: str, rdtype: str) -> Lookup | str:
    """What Resolver.query answered when it sent through dns.resolver
    (until policyd had its own transport): a Lookup, or the text of the
    DnsTempError.  The reference the transport is held to."""
    reference = dns.resolver.Resolver(configure=False)
    reference.nameservers = list(resolver.nameservers)
    reference.port = resolver.config.port
    reference.use_edns(0, dns.flags.DO, 1232)
    reference.flags = dns.flags.RD | dns.flags.AD
    reference.timeout = resolver.config.timeout / (len(resolver.nameservers) + 1)
    reference.lifetime = resolver.config.timeout
    reference.retry_servfail = False
    reference.cache = None
    try:
        qname = dns.name.from_text(name)
        answer = reference.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as error:
        response = error.response(qname)
        return Lookup((), resolver._secure(response), nxdomain=True,
                      expires=_reference_expiry(response))
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
            dns.resolver.YXDOMAIN):
        return Lookup((), False, nxdomain=True)
    except dns.exception.DNSException as error:
        return f"{rdtype} {name}: {error.__class__.__name__}"
    secure = resolver._secure(answer.response)
    if answer.rrset is None:
        return Lookup((), secure, expires=_reference_expiry(answer.response))
    return Lookup(tuple(_value(rdtype, r) for r in answer.rrset), secure,
                  expires=answer.expiration)


def _reference_expiry(response: dns.message.Message) -> float:
    """RFC 2308 §5 as the reference read it: min(TTL, MINIMUM) of the
    first SOA in the authority section; 0 (not kept) without one."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and rrset:
            return time.time() + min(rrset.ttl, rrset[0].minimum)
    return 0.0


def world_questions() -> list[tuple[str, str]]:
    names = {name.to_text() for zone in load_zones().values() for name in zone.nodes}
    names |= {"no-such-name.example.", "no-such-name.signed.example.", BOGUS_NAME,
              "big.example.", "example.com.", "a." + REFUSED_ZONES[0], NO_SOA_ZONES[0],
              "x" * 64 + ".example.", "a..example"}
    return [(name, rdtype) for name in sorted(names)
            for rdtype in ("A", "AAAA", "TXT", "MX", "PTR", "SOA")]


@pytest.mark.parametrize("trust_ad", ["auto", "no"])
def test_every_answer_of_the_world_is_what_dnspython_answered(tmp_path, unbound, trust_ad):
    resolver = make_resolver(tmp_path, unbound, f'dns: {{trust_ad: "{trust_ad}"}}')
    differences = []
    for name, rdtype in world_questions():
        expected = dnspython_lookup(resolver, name, rdtype)
        try:
            got = resolver.query(name, rdtype)
        except DnsTempError as error:
            got = str(error)
        same_expiry = (isinstance(got, str)
                       or (got.expires == 0) == (expected.expires == 0)
                       and abs(got.expires - expected.expires) < 2)
        # unbound rotates the order of a set's records (rrset-roundrobin).
        if got != expected and not (isinstance(got, Lookup) and isinstance(expected, Lookup)
                                    and sorted(got.records) == sorted(expected.records)
                                    and (got.secure, got.nxdomain)
                                    == (expected.secure, expected.nxdomain)):
            differences.append((name, rdtype, expected, got))
        elif not same_expiry:
            differences.append((name, rdtype, expected, got))
    assert differences == []


def test_the_codec_reads_every_answer_of_the_world_as_dnspython_does(unbound):
    # Real responses (signed ones with RRSIGs included) to dnswire's own
    # queries; tests/unit/test_dnswire.py has the made-up and damaged ones.
    read = 0
    for name, rdtype in world_questions():
        query = dnswire.query_wire(name, dns.rdatatype.from_text(rdtype), QUERY_ID)
        if query is None:
            continue   # a name only dnspython's errors speak for
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2.0)
            sock.connect((unbound.address, unbound.port))
            sock.send(query)
            datagram = sock.recv(65535)
        read += same_as_dnspython(datagram, name, rdtype) is not None
    assert read >= 100


def test_an_expired_answer_does_not_hide_a_newer_negative_one(tmp_path, unbound, scripted):
    # The name had an A record (TTL 1 s); now it is gone (NXDOMAIN, with an
    # SOA so the denial may be cached for 60 s): once the record has
    # expired, the denial answers, not another query.
    def script(query, number):
        if number == 0:
            return [Datagram(reply(query, answer=("gone.example. 1 IN A 192.0.2.1",)))]
        return [Datagram(reply(query, dns.rcode.NXDOMAIN, authority=(
            "example. 60 IN SOA ns.example. host.example. 1 3600 900 604800 60",)))]

    server = scripted(script)
    resolver = scripted_resolver(tmp_path, unbound, server)
    assert resolver.query("gone.example", "A").records == ("192.0.2.1",)
    deadline = time.monotonic() + 5
    while resolver.query("gone.example", "A").records:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    asked = len(server.queries)
    for _ in range(3):
        assert resolver.query("gone.example", "A").nxdomain
    assert len(server.queries) == asked == 2


def test_an_attempt_that_missed_leaves_no_memo_entry(tmp_path, unbound, proxy):
    # The HELO check is answered from the cache, the MAIL FROM one is not:
    # the attempt is abandoned, and the HELO outcome it computed must not
    # reach the SPF memo (which keeps outcomes at once while it has room).
    dns_settings = dns_yaml([proxy.address], proxy.port)
    warming = Engine(config.load(str(write_config(tmp_path, unbound, dns_settings))),
                     make_resolver(tmp_path, unbound, dns_settings))
    helo_only = Request(client_address=ipaddress.ip_address("192.0.2.99"),
                        helo="helo.other.example", sender="")
    warming.decide(helo_only)                      # the HELO answers are cached now
    assert len(warming.spf_memo) == 1
    engine = Engine(warming.config, warming.resolver)   # the same cache, an empty memo
    request = Request(client_address=ipaddress.ip_address("192.0.2.99"),
                      helo="helo.other.example", sender="a@softfail.example")
    with pytest.raises(CacheMiss):
        engine.decide_cached(request)
    assert len(engine.spf_memo) == 0   # the abandoned attempt counted for nothing
    engine.decide(request)
    assert len(engine.spf_memo) == 2   # HELO and MAIL FROM, decided for real


# --- one DNS budget per decision stage (issue #15) ---------------------------

def test_a_late_answer_to_the_first_try_is_taken(tmp_path, unbound):
    # One nameserver, an answer 65 % into dns.timeout: the query was sent
    # again at half of it, and the first one's answer is still listened for.
    proxy = QueryCountingProxy((unbound.address, unbound.port), delay=0.65).start()
    try:
        resolver = make_resolver(tmp_path, unbound, dns_yaml([proxy.address], proxy.port,
                                                             timeout=1.0))
        started = time.monotonic()
        assert resolver.query("own.example", "TXT").records
        assert 0.6 <= time.monotonic() - started < 0.9
        assert proxy.questions == [("own.example.", "TXT")] * 2
    finally:
        proxy.stop()


def test_a_late_answer_from_the_first_nameserver_is_taken_after_the_second_was_asked(
        tmp_path, unbound):
    # Two nameservers, the first slow (half of dns.timeout), the second
    # silent: the second is asked at a third of it, and the first one's
    # socket is still listened to.  Same port for both, as in the config.
    proxy = QueryCountingProxy((unbound.address, unbound.port), delay=0.5).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.205", proxy.port))
            silent.setblocking(False)
            resolver = make_resolver(tmp_path, unbound, dns_yaml(
                [proxy.address, "127.0.0.205"], proxy.port, timeout=1.0))
            started = time.monotonic()
            assert resolver.query("own.example", "TXT").records
            assert 0.45 <= time.monotonic() - started < 0.7
            assert received_datagram(silent)
    finally:
        proxy.stop()


def test_a_late_answer_passes_the_rcpt_stage(tmp_path, unbound):
    # The same through the engine: the SPF record comes 65 % into the
    # stage's budget and the sender passes, no temperror.
    proxy = QueryCountingProxy((unbound.address, unbound.port), delay=0.65).start()
    try:
        loaded = config.load(str(write_config(tmp_path, unbound, dns_yaml(
            [proxy.address], proxy.port, timeout=1.0) + "spf:\n  helo: {check: false}\n")))
        engine = Engine(loaded, Resolver(loaded.dns))
        decision = engine.decide(Request(
            client_address=ipaddress.ip_address("203.0.113.7"), helo="mx.own.example",
            sender="a@sub.own.example", recipient="b@own.example"))
        assert (decision.action, decision.rule) == (Action.ACCEPT, "pass"), decision.trace
        assert [c.result for c in decision.spf] == [SpfResult.PASS]
    finally:
        proxy.stop()


def slow_resolver_decision(tmp_path, unbound, proxy, extra_yaml: str = ""):
    """someone@include.example from 198.51.100.25, HELO helo.other.example,
    through proxy: (the decision, the seconds it took)."""
    loaded = config.load(str(write_config(tmp_path, unbound, dns_yaml(
        [proxy.address], proxy.port, timeout=0.5) + extra_yaml)))
    engine = Engine(loaded, Resolver(loaded.dns))
    started = time.monotonic()
    decision = engine.decide(Request(
        client_address=ipaddress.ip_address("198.51.100.25"), helo="helo.other.example",
        sender="someone@include.example", recipient="b@own.example"))
    return decision, time.monotonic() - started


def test_slow_answers_pass_the_rcpt_stage(tmp_path, unbound):
    # A resolver that answers every question, each 0.4 s late (a cold
    # cache), with dns.timeout 0.5: the stage's three lookups (the HELO's
    # TXT, include.example's, and other.example's it includes) take 1.2 s,
    # and no answer is thrown away for the time the others took.  (It was
    # a 451 4.7.24 temperror once 0.5 s were spent.)
    proxy = QueryCountingProxy((unbound.address, unbound.port), delay=0.4).start()
    try:
        decision, elapsed = slow_resolver_decision(tmp_path, unbound, proxy)
        assert (decision.action, decision.rule) == (Action.ACCEPT, "pass"), decision.trace
        assert [(c.identity, c.result) for c in decision.spf] == [
            ("helo", SpfResult.PASS), ("mailfrom", SpfResult.PASS)]
        assert {"include.example.", "other.example.", "helo.other.example."} <= {
            name for name, _ in proxy.questions}
        assert elapsed >= 3 * 0.4
    finally:
        proxy.stop()


def test_a_stage_of_slow_answers_ends_within_the_spf_time_limit_and_dns_timeout(
        tmp_path, unbound):
    # The same with spf.lookup_time_limit 1.0 and our own iprev lookup: the
    # PTR question, asked 1.2 s in, has 0.3 s left of 1.0 + 0.5 and times
    # out; its answer would have come at 1.6 s.
    proxy = QueryCountingProxy((unbound.address, unbound.port), delay=0.4).start()
    try:
        decision, elapsed = slow_resolver_decision(
            tmp_path, unbound, proxy,
            "spf:\n  lookup_time_limit: 1.0\niprev:\n  ipv4: true\n")
        assert [c.result for c in decision.spf] == [SpfResult.PASS] * 2, decision.trace
        assert decision.iprev.result is IprevResult.TEMPERROR
        assert 1.45 <= elapsed < 1.5 + 0.2
    finally:
        proxy.stop()


def hung_resolver_engine(tmp_path, unbound, proxy, timeout: float) -> Engine:
    loaded = config.load(str(write_config(tmp_path, unbound, dns_yaml(
        [proxy.address], proxy.port, timeout=timeout))))
    return Engine(loaded, Resolver(loaded.dns))


def test_a_hung_resolver_costs_one_dns_timeout_for_the_whole_rcpt_stage(tmp_path, unbound):
    # MAIL FROM, HELO and the iprev of an IPv6 client (our own PTR lookup,
    # no names from the MTA) each time out: together within dns.timeout,
    # not one after another, and the configured temperror action.
    proxy = QueryCountingProxy((unbound.address, unbound.port),
                               drop=lambda name, rdtype: True).start()
    try:
        engine = hung_resolver_engine(tmp_path, unbound, proxy, timeout=0.5)
        started = time.monotonic()
        decision = engine.decide(Request(
            client_address=ipaddress.ip_address("2001:db8:6::25"),
            helo="mail6.other.example", sender="a@other.example", recipient="b@own.example"))
        elapsed = time.monotonic() - started
        assert (decision.action, decision.reply.status) == (Action.DEFER, "4.7.24")
        assert [(c.identity, c.result) for c in decision.spf] == [
            ("helo", SpfResult.TEMPERROR), ("mailfrom", SpfResult.TEMPERROR)]
        assert decision.iprev.result is IprevResult.TEMPERROR
        assert 0.45 <= elapsed < 0.5 + 0.2
        # The first lookup had the whole budget; the rest were not sent.
        assert len(proxy.questions) == 2
    finally:
        proxy.stop()


def test_a_spent_budget_leaves_cache_hits_answered(tmp_path, unbound, proxied_resolver, proxy):
    proxied_resolver.query("own.example", "TXT")
    with policyd.dns.budget(0.0):
        assert proxied_resolver.query("own.example", "TXT").records
        with pytest.raises(DnsTempError, match="spent"):
            proxied_resolver.query("sub.own.example", "TXT")
    assert proxy.questions == [("own.example.", "TXT")]


def test_the_forward_lookups_of_several_ptr_names_wait_together(tmp_path, unbound, scripted):
    # Three PTR names, every answer 0.3 s late: the PTR lookup, then the
    # three forward lookups at once, 0.6 s in all rather than 1.2 s.
    ptr = dns.reversename.from_address("2001:db8::1").to_text()
    def script(query, number):
        name = query.question[0].name.to_text()
        if name == ptr:
            return [Datagram(reply(query, answer=tuple(
                f"{ptr} 60 IN PTR n{i}.example." for i in range(3))))]
        return [Datagram(reply(query, answer=(f"{name} 60 IN AAAA 2001:db8::{name[1]}",)))]
    server = scripted(script)
    proxy = QueryCountingProxy((server.address, server.port), delay=0.3).start()
    try:
        resolver = make_resolver(tmp_path, unbound, dns_yaml([proxy.address], proxy.port,
                                                             timeout=2.0))
        started = time.monotonic()
        check = iprev_check.lookup(resolver, ipaddress.ip_address("2001:db8::1"))
        elapsed = time.monotonic() - started
        assert (check.result, check.ptr_name) == (IprevResult.PASS, "n1.example")
        assert 0.6 <= elapsed < 0.9
        assert sorted(proxy.questions[1:]) == [(f"n{i}.example.", "AAAA") for i in range(3)]
    finally:
        proxy.stop()


def test_the_policy_service_answers_within_one_dns_timeout(tmp_path, unbound, daemon_factory):
    # The whole RCPT decision through `policyd serve`: an IPv6 client
    # without names from Postfix (our own iprev lookup), a HELO name and a
    # sender, against a resolver that answers nothing.
    proxy = QueryCountingProxy((unbound.address, unbound.port),
                               drop=lambda name, rdtype: True).start()
    try:
        daemon = daemon_factory(daemon_config(tmp_path, unbound, dns_yaml(
            [proxy.address], proxy.port, timeout=0.5)))
        client = PolicyClient(daemon.address)
        started = time.monotonic()
        answer = client.ask(client_address="2001:db8:6::25", helo_name="mail6.other.example",
                            sender="a@other.example", client_name="", reverse_client_name="")
        elapsed = time.monotonic() - started
        client.close()
        assert answer == ("451 4.7.24 SPF temporary error for other.example (mailfrom), "
                          "try again later")
        assert elapsed < 0.5 + 0.3
    finally:
        proxy.stop()


def test_dkim_key_lookups_inside_a_budget_end_within_it(tmp_path, unbound):
    # What the milter's end of message does: every key lookup of a message
    # with five signatures, inside one budget, against a resolver that
    # answers nothing: one dns.timeout in all, each signature temperror.
    signed = message()
    for number in range(5):
        signed = ed25519_key("other.example", f"s{number}").sign(signed)
    proxy = QueryCountingProxy((unbound.address, unbound.port),
                               drop=lambda name, rdtype: True).start()
    try:
        resolver = make_resolver(tmp_path, unbound, dns_yaml([proxy.address], proxy.port,
                                                             timeout=0.5))
        started = time.monotonic()
        with resolver.budget():
            checks = dkim_check.verify(signed, resolver)
        elapsed = time.monotonic() - started
        assert [c.result for c in checks] == [DkimResult.TEMPERROR] * 5
        assert elapsed < 0.5 + 0.2
    finally:
        proxy.stop()
