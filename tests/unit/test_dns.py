"""The pure parts of policyd.dns: resolv.conf parsing and the trust rule.

Constructing a Resolver does no network I/O, so none of this needs a
server; one test makes sure of that.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

import pytest

from policyd import config
from policyd.config import DnsConfig
from policyd import dns as dns_module
from policyd.dns import Lookup, Resolver, SharedAnswers, read_resolv_conf


def write(tmp_path, text: str) -> str:
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return str(path)


def dns_config(*nameservers: str, **settings) -> DnsConfig:
    return DnsConfig(nameservers=tuple(ipaddress.ip_address(n) for n in nameservers),
                     **settings)


# --- read_resolv_conf ------------------------------------------------------

def test_nameservers_in_order_and_no_trust_ad(tmp_path):
    path = write(tmp_path, "search example.org\n"
                           "nameserver 192.0.2.53\n"
                           "nameserver 2001:db8::53\n"
                           "options edns0 rotate\n")
    assert read_resolv_conf(path) == (["192.0.2.53", "2001:db8::53"], False)


@pytest.mark.parametrize("options", [
    "options trust-ad", "options edns0 trust-ad", "options trust-ad rotate timeout:1"])
def test_options_trust_ad(tmp_path, options):
    path = write(tmp_path, f"nameserver 192.0.2.53\n{options}\n")
    assert read_resolv_conf(path) == (["192.0.2.53"], True)


def test_trust_ad_on_a_later_options_line(tmp_path):
    path = write(tmp_path, "options edns0\nnameserver 192.0.2.53\noptions trust-ad\n")
    assert read_resolv_conf(path) == (["192.0.2.53"], True)


def test_comments_are_ignored(tmp_path):
    # resolv.conf(5): a line starting with ; or # is a comment.
    path = write(tmp_path, "# options trust-ad\n"
                           "; nameserver 192.0.2.1\n"
                           "#nameserver 192.0.2.2\n"
                           "nameserver 192.0.2.53 # the site resolver\n")
    assert read_resolv_conf(path) == (["192.0.2.53"], False)


def test_trust_ad_needs_the_options_keyword(tmp_path):
    path = write(tmp_path, "nameserver 192.0.2.53\ntrust-ad\nsearch trust-ad\n")
    assert read_resolv_conf(path) == (["192.0.2.53"], False)


def test_scope_id_is_dropped(tmp_path):
    path = write(tmp_path, "nameserver fe80::1%eth0\n")
    assert read_resolv_conf(path) == (["fe80::1"], False)


def test_no_nameserver_line(tmp_path):
    path = write(tmp_path, "search example.org\noptions trust-ad\n")
    assert read_resolv_conf(path) == ([], True)


def test_a_nameserver_keyword_without_address_is_skipped(tmp_path):
    path = write(tmp_path, "nameserver\nnameserver 192.0.2.53\n")
    assert read_resolv_conf(path) == (["192.0.2.53"], False)


def test_missing_file(tmp_path):
    assert read_resolv_conf(str(tmp_path / "absent")) == ([], False)


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_bytes(b"search \xff\xfe.example\nnameserver 192.0.2.53\n")
    assert read_resolv_conf(str(path)) == (["192.0.2.53"], False)


# --- which nameservers the Resolver uses -----------------------------------

def test_configured_nameservers_win_over_resolv_conf(tmp_path):
    path = write(tmp_path, "nameserver 192.0.2.53\n")
    resolver = Resolver(dns_config("127.0.0.201", resolv_conf=path))
    assert resolver.nameservers == ("127.0.0.201",)


def test_resolv_conf_is_used_without_configured_nameservers(tmp_path):
    path = write(tmp_path, "nameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert Resolver(DnsConfig(resolv_conf=path)).nameservers == ("192.0.2.53", "192.0.2.54")


def test_no_nameserver_anywhere_means_the_local_one(tmp_path):
    # resolv.conf(5): without a nameserver line, the server on this machine.
    resolver = Resolver(DnsConfig(resolv_conf=str(tmp_path / "absent")))
    assert resolver.nameservers == ("127.0.0.1",)
    assert resolver.trusted


def test_a_nameserver_that_is_not_an_address_is_skipped(tmp_path):
    path = write(tmp_path, "nameserver localhost\nnameserver 192.0.2.53\n")
    assert Resolver(DnsConfig(resolv_conf=path)).nameservers == ("192.0.2.53",)


def test_settings_reach_dnspython():
    resolver = Resolver(dns_config("127.0.0.201", port=5353, timeout=7.0, cache_size=10))
    assert resolver._resolver.nameservers == ["127.0.0.201"]
    assert resolver._resolver.port == 5353
    assert resolver._resolver.lifetime == 7.0
    assert resolver._resolver.timeout <= 7.0
    assert resolver.cache_statistics() == (0, 0)


def test_constructing_a_resolver_does_no_network_io(tmp_path, monkeypatch):
    def no_sockets(*args, **kwargs):
        raise AssertionError("a socket was opened")
    monkeypatch.setattr(socket, "socket", no_sockets)
    Resolver(dns_config("192.0.2.53"))
    Resolver(DnsConfig(resolv_conf=write(tmp_path, "nameserver 192.0.2.53\n")))


# --- the trust rule (RFC 6840 §5.7) ----------------------------------------

@pytest.mark.parametrize("nameservers, trusted, reason", [
    (("127.0.0.1",), True, "loopback resolver"),
    (("127.0.0.53",), True, "loopback resolver"),
    (("::1",), True, "loopback resolver"),
    (("127.0.0.1", "::1"), True, "loopback resolver"),
    (("192.0.2.53",), False, "resolver not on loopback and no trust-ad"),
    (("2001:db8::53",), False, "resolver not on loopback and no trust-ad"),
    # Every path must be trusted: a lookup may go to any of them.
    (("127.0.0.1", "192.0.2.53"), False, "resolver not on loopback and no trust-ad"),
])
def test_auto_trusts_loopback_only(nameservers, trusted, reason):
    resolver = Resolver(dns_config(*nameservers))
    assert (resolver.trusted, resolver.trust_reason) == (trusted, reason)


@pytest.mark.parametrize("nameservers", [("127.0.0.1",), ("192.0.2.53",)])
def test_explicit_yes_and_no_win(nameservers):
    yes = Resolver(dns_config(*nameservers, trust_ad="yes"))
    no = Resolver(dns_config(*nameservers, trust_ad="no"))
    assert (yes.trusted, yes.trust_reason) == (True, "dns.trust_ad=yes")
    assert (no.trusted, no.trust_reason) == (False, "dns.trust_ad=no")


def test_options_trust_ad_in_resolv_conf_is_trusted(tmp_path):
    path = write(tmp_path, "nameserver 192.0.2.53\noptions trust-ad\n")
    resolver = Resolver(DnsConfig(resolv_conf=path))
    assert (resolver.trusted, resolver.trust_reason) == (True, "options trust-ad")


def test_loopback_from_resolv_conf_is_trusted(tmp_path):
    path = write(tmp_path, "nameserver 127.0.0.53\n")
    resolver = Resolver(DnsConfig(resolv_conf=path))
    assert (resolver.trusted, resolver.trust_reason) == (True, "loopback resolver")


def test_remote_resolver_from_resolv_conf_is_not_trusted(tmp_path):
    path = write(tmp_path, "nameserver 192.0.2.53\n")
    assert not Resolver(DnsConfig(resolv_conf=path)).trusted


def test_options_trust_ad_does_not_cover_configured_nameservers(tmp_path):
    # The option speaks for the servers in that file, not for ours.
    path = write(tmp_path, "nameserver 127.0.0.1\noptions trust-ad\n")
    resolver = Resolver(dns_config("192.0.2.53", resolv_conf=path))
    assert not resolver.trusted


def test_trust_ad_no_overrides_options_trust_ad(tmp_path):
    path = write(tmp_path, "nameserver 192.0.2.53\noptions trust-ad\n")
    assert not Resolver(DnsConfig(resolv_conf=path, trust_ad="no")).trusted


@pytest.mark.parametrize("text, trust_ad", [
    ('dns: {trust_ad: "no"}', "no"), ("dns: {trust_ad: auto}", "auto")])
def test_trust_ad_from_yaml(text, trust_ad):
    assert config.parse(text, "policyd.yaml").dns.trust_ad == trust_ad


@pytest.mark.parametrize("word", ["no", "yes"])
def test_trust_ad_unquoted_in_yaml(word):
    assert config.parse(f"dns: {{trust_ad: {word}}}", "policyd.yaml").dns.trust_ad == word


# --- the answers worker processes share ------------------------------------------

def test_shared_answers_give_back_what_was_put():
    table = SharedAnswers(64)
    table.put("q1", (("v=spf1 -all".encode(),),), True, False, 1234.5)
    table.put("q2", ((10, "mx.example"),), False, False, 99.0)
    assert table.get("q1") == (((b"v=spf1 -all",),), True, False, 1234.5)
    assert table.get("q2") == (((10, "mx.example"),), False, False, 99.0)
    assert table.get("q3") is None


def test_shared_answers_slot_holds_the_last_answer_of_its_key_only():
    table = SharedAnswers(1)               # every key in the one slot
    table.put("first", ("192.0.2.1",), False, False, 1.0)
    table.put("second", ("192.0.2.2",), False, False, 1.0)
    assert table.get("first") is None      # another key's answer is never given
    assert table.get("second") == (("192.0.2.2",), False, False, 1.0)


def test_shared_answers_too_large_for_a_slot_are_not_kept():
    table = SharedAnswers(8, slot_size=128)
    table.put("big", (("x" * 200,),), False, False, 1.0)
    assert table.get("big") is None


def test_a_torn_slot_is_a_miss():
    # What a reader sees while another process writes the slot, or after
    # two wrote it at once: content that does not match its CRC.
    table = SharedAnswers(1)
    table.put("key", ("192.0.2.1",), False, False, 1.0)
    table._memory[20] ^= 0xFF
    assert table.get("key") is None


def test_shared_answers_reach_a_forked_process():
    table = SharedAnswers(64)
    pid = os.fork()
    if pid == 0:   # the child writes, and leaves at once
        table.put("from-child", ("192.0.2.7",), False, False, 5.0)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert table.get("from-child") == (("192.0.2.7",), False, False, 5.0)


class CountingTransport:
    """Stands in for the network: counts the questions asked of it."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def __call__(self, name, rdtype, lifetime):
        self.asked.append((name, rdtype))
        return self.answer


def sharing_resolvers(monkeypatch, answer, count=2, **settings):
    monkeypatch.setattr(dns_module, "_shared_answers", SharedAnswers(64))
    resolvers = []
    for _ in range(count):
        resolver = Resolver(DnsConfig(nameservers=(ipaddress.ip_address("127.0.0.1"),),
                                      **settings))
        resolver._resolve = CountingTransport(answer)
        resolvers.append(resolver)
    return resolvers


def test_a_resolver_takes_an_answer_another_one_got(monkeypatch):
    answer = Lookup(("192.0.2.1",), False, expires=time.time() + 60)
    first, second = sharing_resolvers(monkeypatch, answer)
    assert first.query("a.example", "A") == answer
    assert second.query("A.Example", "A") == answer
    assert second._resolve.asked == []
    assert second.cache_statistics() == (1, 0)
    # And keeps it in its own cache: the table is not needed again.
    monkeypatch.setattr(second, "_shared", None)
    assert second.query("a.example", "A").records == ("192.0.2.1",)


def test_an_expired_shared_answer_is_asked_again(monkeypatch):
    answer = Lookup(("192.0.2.1",), False, expires=time.time() + 0.05)
    first, second = sharing_resolvers(monkeypatch, answer)
    first.query("a.example", "A")
    time.sleep(0.1)
    second.query("a.example", "A")
    assert second._resolve.asked == [("a.example", "A")]


def test_answers_not_to_be_cached_are_not_shared(monkeypatch):
    answer = Lookup((), False, nxdomain=True, expires=0.0)   # RFC 2308 §5: no SOA
    first, second = sharing_resolvers(monkeypatch, answer)
    first.query("gone.example", "A")
    second.query("gone.example", "A")
    assert second._resolve.asked == [("gone.example", "A")]


def test_answers_are_shared_only_between_resolvers_of_the_same_servers(monkeypatch):
    answer = Lookup(("192.0.2.1",), True, expires=time.time() + 60)
    first, = sharing_resolvers(monkeypatch, answer, count=1)
    other = Resolver(DnsConfig(nameservers=(ipaddress.ip_address("127.0.0.2"),)))
    other._resolve = CountingTransport(answer)
    first.query("a.example", "A")
    other.query("a.example", "A")
    assert other._resolve.asked == [("a.example", "A")]


def test_a_shared_answer_is_a_hit_for_a_cache_only_attempt(monkeypatch):
    answer = Lookup(("192.0.2.1",), False, expires=time.time() + 60)
    first, second = sharing_resolvers(monkeypatch, answer)
    first.query("a.example", "A")
    assert second.cached_only(second.query, "a.example", "A").records == ("192.0.2.1",)


# --- one DNS budget per decision stage -------------------------------------

class RecordingTransport:
    """Stands in for the transport: records the lifetime each question got,
    takes `delay` seconds, and then answers `answer`, or fails when there
    is none (SERVFAIL after a wait, say); a question whose lifetime ends
    first times out.  `script` maps a name to its own (delay, answer)."""

    def __init__(self, delay: float = 0.0, answer=None, script=None):
        self.delay, self.answer, self.script, self.lifetimes = delay, answer, script, []

    def exchange(self, question, lifetime):
        self.lifetimes.append(lifetime)
        delay, answer = (self.script or {}).get(question.name, (self.delay, self.answer))
        time.sleep(min(delay, lifetime))
        if answer is None or delay > lifetime:
            raise dns_module._Failure("LifetimeTimeout")
        return answer


def budgeted_resolver(timeout: float = 2.0, **transport) -> Resolver:
    resolver = Resolver(dns_config("127.0.0.1", timeout=timeout))
    resolver._resolver = RecordingTransport(**transport)
    return resolver


def test_no_budget_outside_a_stage():
    assert dns_module.budget_left() == float("inf")


def test_a_budget_holds_for_its_block_only():
    with dns_module.budget(1.5):
        assert 1.4 < dns_module.budget_left() <= 1.5
    assert dns_module.budget_left() == float("inf")


def test_an_inner_budget_cannot_outlast_the_outer_one():
    with dns_module.budget(0.5):
        with dns_module.budget(10):
            assert dns_module.budget_left() <= 0.5
        with dns_module.budget(0.1):
            assert dns_module.budget_left() <= 0.1
        assert 0.1 < dns_module.budget_left() <= 0.5


def test_the_resolvers_budget_is_dns_timeout_by_default():
    resolver = budgeted_resolver(timeout=0.75)
    with resolver.budget():
        assert 0.7 < dns_module.budget_left() <= 0.75
    with resolver.budget(0.25):
        assert dns_module.budget_left() <= 0.25


def test_each_thread_has_its_own_budget():
    # One resolver serves every thread: one thread's stage must not end
    # another's.
    seen = []
    with dns_module.budget(0.0):
        thread = threading.Thread(target=lambda: seen.append(dns_module.budget_left()))
        thread.start()
        thread.join()
    assert seen == [float("inf")]


def test_lookups_in_a_stage_share_its_budget():
    # Each lookup waits at most for what is left; the second of two that
    # time out gets the rest, not a dns.timeout of its own.
    resolver = budgeted_resolver(timeout=0.4, delay=10)
    started = time.monotonic()
    with resolver.budget():
        for name in ("a.example", "b.example", "c.example"):
            with pytest.raises(dns_module.DnsTempError):
                resolver.query(name, "TXT")
    assert time.monotonic() - started < 0.55
    first, *rest = resolver._resolver.lifetimes
    assert first == pytest.approx(0.4, abs=0.01) and all(r < 0.05 for r in rest)


def test_a_spent_budget_fails_a_miss_at_once_without_asking():
    resolver = budgeted_resolver(answer=dns_module.Answer(0, 0, ("192.0.2.1",), 60))
    with resolver.budget(0.0):
        with pytest.raises(dns_module.DnsTempError, match="A a.example: .*spent"):
            resolver.query("a.example", "A")
    assert resolver._resolver.lifetimes == []
    # Outside the stage the lookup is asked, with the whole dns.timeout.
    assert resolver.query("a.example", "A").records == ("192.0.2.1",)
    assert resolver._resolver.lifetimes == [2.0]
    # A cached answer costs no time: a spent budget still gets it.
    with resolver.budget(0.0):
        assert resolver.query("a.example", "A").records == ("192.0.2.1",)


ANSWER = dns_module.Answer(0, 0, ("192.0.2.1",), 60)


def test_answers_cost_the_stage_nothing_however_slow():
    # A resolver that answers, but slowly (a cold cache, an SPF record
    # with many includes): each answer takes most of dns.timeout, and
    # together far more; every one is taken, with the whole dns.timeout.
    resolver = budgeted_resolver(timeout=0.3, delay=0.2, answer=ANSWER)
    with resolver.budget():
        for name in ("a.example", "b.example", "c.example", "d.example"):
            assert resolver.query(name, "A").records == ("192.0.2.1",)
        assert dns_module.budget_left() == 0.3
    assert resolver._resolver.lifetimes == [0.3] * 4


def test_a_lookup_without_an_answer_charges_what_it_waited():
    # A failure after 0.15 s (a SERVFAIL, say) charges 0.15 s; the
    # answers around it charge nothing.
    resolver = budgeted_resolver(timeout=1.0, script={
        "a.example": (0.15, ANSWER), "b.example": (0.15, None), "c.example": (0.15, ANSWER)})
    with resolver.budget():
        resolver.query("a.example", "A")
        with pytest.raises(dns_module.DnsTempError):
            resolver.query("b.example", "A")
        left = dns_module.budget_left()
        assert 0.7 < left <= 0.85
        resolver.query("c.example", "A")
        assert dns_module.budget_left() == left
    lifetimes = resolver._resolver.lifetimes
    assert lifetimes[:2] == [1.0, 1.0] and 0.7 < lifetimes[2] <= 0.85


def test_a_lookup_that_times_out_spends_the_budget_and_the_next_answer_is_not_waited_for():
    resolver = budgeted_resolver(timeout=0.3, script={
        "hung.example": (10, None), "a.example": (0.0, ANSWER)})
    with resolver.budget():
        with pytest.raises(dns_module.DnsTempError):
            resolver.query("hung.example", "A")
        assert dns_module.budget_left() <= 0
        with pytest.raises(dns_module.DnsTempError, match="spent"):
            resolver.query("a.example", "A")
    assert resolver._resolver.lifetimes == [0.3]


def test_parallel_waits_without_an_answer_are_charged_once():
    # Four lookups at once, each failing after 0.15 s: the stage waited
    # 0.15 s for answers that did not come, not 0.6 s.
    resolver = budgeted_resolver(timeout=1.0, delay=0.15)
    with resolver.budget():
        outcomes = list(dns_module.query_all(resolver, [(f"n{i}.example", "A")
                                                        for i in range(4)]))
        assert all(isinstance(o, dns_module.DnsTempError) for o in outcomes)
        assert 0.6 < dns_module.budget_left() <= 0.85   # once each: 0.4


@pytest.mark.parametrize("waits, charged", [
    ([(0.0, 1.0)], 1.0),
    ([(0.0, 1.0), (2.0, 3.0)], 2.0),              # apart
    ([(0.0, 1.0), (0.5, 1.5)], 1.5),              # overlapping
    ([(0.2, 0.4), (0.0, 1.0)], 1.0),              # one inside another, charged first
    ([(0.0, 1.0), (0.2, 0.4)], 1.0),              # ... or last
    ([(0.0, 1.0), (2.0, 3.0), (0.5, 2.5)], 3.0),  # one bridging two
])
def test_the_charge_is_the_time_some_lookup_waited_in_vain(waits, charged):
    with dns_module.budget(10) as stage:
        for started, ended in waits:
            stage.charge(started, ended)
        assert dns_module.budget_left() == pytest.approx(10 - charged)


def test_an_inner_stage_charges_the_outer_one_too():
    resolver = budgeted_resolver(timeout=1.0, delay=0.15)
    with resolver.budget(1.0):
        with resolver.budget(0.5):
            with pytest.raises(dns_module.DnsTempError):
                resolver.query("a.example", "A")
            assert 0.2 < dns_module.budget_left() <= 0.35
        assert 0.7 < dns_module.budget_left() <= 0.85


def test_a_stage_limit_ends_slow_answers_too():
    # limit: however the answers come, no lookup of the stage waits past it.
    resolver = budgeted_resolver(timeout=2.0, delay=0.2, answer=ANSWER)
    with resolver.budget(2.0, limit=0.3):
        assert resolver.query("a.example", "A").records   # 0.2 s of the 0.3
        with pytest.raises(dns_module.DnsTempError):
            resolver.query("b.example", "A")              # 0.1 s left: too late
        with pytest.raises(dns_module.DnsTempError, match="spent"):
            resolver.query("c.example", "A")
    first, second = resolver._resolver.lifetimes
    assert first == pytest.approx(0.3, abs=0.01) and second < 0.12


def test_a_shorter_lifetime_than_the_budget_wins():
    resolver = budgeted_resolver(answer=dns_module.Answer(0, 0, ("192.0.2.1",), 60))
    with resolver.budget(1.0):
        resolver.query("a.example", "A", lifetime=0.2)
    assert resolver._resolver.lifetimes == [0.2]


def test_query_all_asks_what_waits_at_once_in_order():
    answer = dns_module.Answer(0, 0, ("192.0.2.1",), 60)
    resolver = budgeted_resolver(delay=0.2, answer=answer)
    started = time.monotonic()
    outcomes = list(dns_module.query_all(resolver, [(f"n{i}.example", "A") for i in range(4)]))
    assert time.monotonic() - started < 0.6   # one after another: 0.8
    assert [o.records for o in outcomes] == [("192.0.2.1",)] * 4


def test_query_all_carries_the_stage_budget_into_its_threads():
    resolver = budgeted_resolver(delay=10)
    with resolver.budget(0.3):
        started = time.monotonic()
        outcomes = list(dns_module.query_all(resolver, [("a.example", "A"), ("b.example", "A")]))
    assert time.monotonic() - started < 0.45
    assert all(isinstance(o, dns_module.DnsTempError) for o in outcomes)
    assert all(lifetime <= 0.3 for lifetime in resolver._resolver.lifetimes)


def test_query_all_in_a_cache_only_attempt_stays_in_its_thread():
    # Only the caller's thread answers from the cache alone; a miss must
    # end the attempt, not go to the network in another thread.
    resolver = budgeted_resolver(answer=dns_module.Answer(0, 0, ("192.0.2.1",), 60))
    with pytest.raises(dns_module.CacheMiss):
        resolver.cached_only(lambda: list(dns_module.query_all(
            resolver, [("a.example", "A"), ("b.example", "A")])))
    assert resolver._resolver.lifetimes == []
