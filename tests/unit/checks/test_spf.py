"""policyd.checks.spf: the NAT relaxation, our limits, and the adapter's
edges, against the standard test world served by the fake resolver."""
from __future__ import annotations

import ipaddress
import time

import pytest

from policyd.checks import spf as spf_check
from policyd.config import NatConfig, SpfConfig
from policyd.dns import SharedAnswers
from policyd.model import SpfResult
from tests.unit.fakedns import FakeClock, FakeResolver, standard_world

ip = ipaddress.ip_address
RECEIVER = "mx.receiver.example"

NAT = NatConfig(own_domains=("own.example",),
                networks=(ipaddress.ip_network("192.168.1.0/24"),
                          ipaddress.ip_network("fd00::/8")),
                public_addresses=(ip("203.0.113.7"),))
NAT_PASS_MODE = NatConfig(own_domains=NAT.own_domains, networks=NAT.networks, mode="pass")


def check(address, sender, helo="client.example", identity="mailfrom", nat=NAT,
          resolver=None, spf_config=SpfConfig()):
    resolver = resolver if resolver is not None else standard_world()
    return spf_check.check_identity(resolver, spf_config, nat, ip(address), identity,
                                    sender, helo, RECEIVER)


# --- plain SPF through the adapter ---------------------------------------

@pytest.mark.parametrize("address, sender, result", [
    ("198.51.100.20", "a@other.example", SpfResult.PASS),
    ("2001:db8:6::25", "a@other.example", SpfResult.PASS),
    ("192.0.2.1", "a@other.example", SpfResult.FAIL),
    ("198.51.100.20", "a@include.example", SpfResult.PASS),
    ("192.0.2.1", "a@softfail.example", SpfResult.SOFTFAIL),
    ("192.0.2.1", "a@neutral.example", SpfResult.NEUTRAL),
    ("192.0.2.1", "a@nospf.example", SpfResult.NONE),
    ("192.0.2.1", "a@nowhere.example", SpfResult.NONE),
    ("192.0.2.1", "a@permerror.example", SpfResult.PERMERROR),
    ("192.0.2.1", "a@temperror.example", SpfResult.TEMPERROR),
])
def test_plain_results(address, sender, result):
    outcome = check(address, sender)
    assert outcome.result is result
    assert outcome.identity == "mailfrom"
    assert outcome.domain == sender.rpartition("@")[2]
    assert outcome.relaxed_mode == "" and outcome.relaxed_via is None


def test_mechanism_is_reported():
    assert check("198.51.100.20", "a@other.example").mechanism == "ip4:198.51.100.0/24"


def test_null_sender_is_checked_as_postmaster_at_helo():
    # RFC 7208 §2.4: with MAIL FROM:<>, the mailfrom identity is postmaster@helo.
    resolver = standard_world()
    outcome = check("198.51.100.10", "", helo="helo.other.example", resolver=resolver)
    assert (outcome.identity, outcome.domain, outcome.result) == \
        ("mailfrom", "helo.other.example", SpfResult.PASS)
    assert resolver.asked("helo.other.example", "TXT")
    failing = check("192.0.2.1", "", helo="helo.other.example")
    assert failing.result is SpfResult.FAIL


def test_helo_identity_ignores_the_sender():
    outcome = check("198.51.100.10", "a@own.example", helo="helo.other.example",
                    identity="helo")
    assert (outcome.identity, outcome.domain, outcome.result) == \
        ("helo", "helo.other.example", SpfResult.PASS)


# --- the NAT relaxation ---------------------------------------------------

@pytest.mark.parametrize("client", ["192.168.1.10", "fd00::25", "::ffff:192.168.1.10"])
def test_own_domain_from_nat_network_is_evaluated_as_public_address(client):
    resolver = standard_world()
    outcome = check(client, "alice@own.example", resolver=resolver)
    assert outcome.result is SpfResult.PASS
    assert outcome.relaxed_mode == "reevaluate"
    assert outcome.relaxed_via == ip("203.0.113.7")
    assert outcome.mechanism == "ip4:203.0.113.7"


def test_own_domain_from_nat_network_without_relaxation_fails():
    # The control: the same client with no NAT config is an ordinary fail,
    # so the pass above is the relaxation's doing.
    outcome = check("192.168.1.10", "alice@own.example", nat=NatConfig())
    assert outcome.result is SpfResult.FAIL and outcome.relaxed_mode == ""


@pytest.mark.parametrize("sender", ["alice@sub.own.example", "Alice@OWN.Example",
                                    "alice@SUB.own.example"])
def test_subdomains_and_case_are_own_domains(sender):
    outcome = check("192.168.1.10", sender)
    assert outcome.result is SpfResult.PASS and outcome.relaxed_mode == "reevaluate"


@pytest.mark.parametrize("sender", ["mallory@evilown.example",
                                    "mallory@own.example.evil.example",
                                    "mallory@xown.example"])
def test_own_domain_matches_at_label_boundaries_only(sender):
    # nat.mode=pass would pass anything the rule covers without DNS, so a
    # domain that merely ends in "own.example" must not get that far.
    outcome = check("192.168.1.10", sender, nat=NAT_PASS_MODE)
    assert outcome.relaxed_mode == ""
    assert outcome.result is not SpfResult.PASS


def test_own_domain_from_outside_the_nat_networks_is_plain_spf():
    resolver = standard_world()
    outcome = check("198.51.100.50", "spoofer@own.example", resolver=resolver)
    assert outcome.result is SpfResult.FAIL
    assert outcome.relaxed_mode == "" and outcome.relaxed_via is None


def test_own_domain_from_outside_in_pass_mode_is_plain_spf():
    outcome = check("198.51.100.50", "spoofer@own.example", nat=NAT_PASS_MODE)
    assert outcome.result is SpfResult.FAIL and outcome.relaxed_mode == ""


def test_other_domain_from_nat_network_is_plain_spf():
    # other.example allows 198.51.100.0/24, not our public address; and it
    # must not be evaluated as our public address at all.
    outcome = check("192.168.1.10", "a@other.example")
    assert outcome.result is SpfResult.FAIL and outcome.relaxed_mode == ""
    passing_as_public = NatConfig(own_domains=("own.example",), networks=NAT.networks,
                                  public_addresses=(ip("198.51.100.20"),))
    outcome = check("192.168.1.10", "a@other.example", nat=passing_as_public)
    assert outcome.result is SpfResult.FAIL and outcome.relaxed_mode == ""


def test_pass_mode_passes_without_dns():
    resolver = standard_world()
    outcome = check("192.168.1.10", "alice@own.example", nat=NAT_PASS_MODE,
                    resolver=resolver)
    assert outcome.result is SpfResult.PASS
    assert outcome.relaxed_mode == "pass" and outcome.relaxed_via is None
    assert resolver.queries == []
    assert outcome.dnssec is False


def test_first_public_address_that_passes_is_used():
    nat = NatConfig(own_domains=NAT.own_domains, networks=NAT.networks,
                    public_addresses=(ip("203.0.113.99"), ip("2001:db8:7::7")))
    outcome = check("192.168.1.10", "alice@own.example", nat=nat)
    assert outcome.result is SpfResult.PASS
    assert outcome.relaxed_via == ip("2001:db8:7::7")


def test_no_public_address_passes_gives_the_real_result():
    nat = NatConfig(own_domains=NAT.own_domains, networks=NAT.networks,
                    public_addresses=(ip("203.0.113.99"),))
    outcome = check("192.168.1.10", "alice@own.example", nat=nat)
    assert outcome.result is SpfResult.FAIL
    assert outcome.relaxed_mode == "" and outcome.relaxed_via is None


def test_helo_identity_is_relaxed_for_own_domain():
    outcome = check("192.168.1.10", "", helo="own.example", identity="helo")
    assert (outcome.identity, outcome.result, outcome.relaxed_mode) == \
        ("helo", SpfResult.PASS, "reevaluate")


def test_null_sender_from_nat_uses_helo_domain_for_the_rule():
    outcome = check("192.168.1.10", "", helo="sub.own.example")
    assert (outcome.identity, outcome.domain, outcome.result, outcome.relaxed_mode) == \
        ("mailfrom", "sub.own.example", SpfResult.PASS, "reevaluate")


def test_nat_applies_is_the_whole_rule():
    assert spf_check.nat_applies(NAT, ip("192.168.1.200"), "own.example")
    assert spf_check.nat_applies(NAT, ip("::ffff:192.168.1.200"), "a.own.example")
    assert not spf_check.nat_applies(NAT, ip("192.168.2.1"), "own.example")
    assert not spf_check.nat_applies(NAT, ip("192.168.1.1"), "")
    assert not spf_check.nat_applies(NatConfig(), ip("192.168.1.1"), "own.example")


# --- limits ---------------------------------------------------------------

VOID_WORLD = {"voids.example": {"TXT": "v=spf1 a:nx1.voids.example a:nx2.voids.example "
                                        "a:nx3.voids.example ?all"},
              "other.voids.example": {"A": "192.0.2.99"}}


@pytest.mark.parametrize("limit, result", [(2, SpfResult.PERMERROR),
                                           (3, SpfResult.NEUTRAL)])
def test_void_lookup_limit_is_configurable(limit, result):
    # RFC 7208 §4.6.4: three lookups answering NXDOMAIN; the default limit
    # of 2 makes that a permerror.
    outcome = check("192.0.2.1", "a@voids.example", nat=NatConfig(),
                    resolver=FakeResolver(VOID_WORLD),
                    spf_config=SpfConfig(void_lookup_limit=limit))
    assert outcome.result is result


def test_evaluation_time_limit_gives_temperror(monkeypatch):
    # RFC 7208 §4.6.4: the whole evaluation is bounded in time.  Each lookup
    # takes 8 s of a 20 s budget: the fourth is never asked.
    clock = FakeClock()
    monkeypatch.setattr(spf_check, "time", clock)
    world = {"slow.example": {"TXT": "v=spf1 a:a1.slow.example a:a2.slow.example "
                                     "a:a3.slow.example -all"},
             "a1.slow.example": {"A": "192.0.2.11"}, "a2.slow.example": {"A": "192.0.2.12"},
             "a3.slow.example": {"A": "192.0.2.13"}}
    resolver = FakeResolver(world, clock=clock, latency=8.0)
    outcome = check("192.0.2.1", "a@slow.example", nat=NatConfig(), resolver=resolver,
                    spf_config=SpfConfig(lookup_time_limit=20.0))
    assert outcome.result is SpfResult.TEMPERROR
    assert not resolver.asked("a3.slow.example")
    # Each lookup may take at most the time left.
    assert resolver.lifetimes == [20.0, 12.0, 4.0]


def test_evaluation_within_time_limit_is_not_cut_short(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(spf_check, "time", clock)
    resolver = standard_world(clock=clock, latency=1.0)
    outcome = check("198.51.100.20", "a@include.example", nat=NatConfig(),
                    resolver=resolver, spf_config=SpfConfig(lookup_time_limit=20.0))
    assert outcome.result is SpfResult.PASS


# --- DNSSEC ---------------------------------------------------------------

def test_secure_only_when_every_answer_is_secure():
    assert check("198.51.100.20", "a@signed.example").dnssec is True
    assert check("198.51.100.20", "a@other.example").dnssec is False
    untrusted = standard_world(trusted=False)
    assert check("198.51.100.20", "a@signed.example", resolver=untrusted).dnssec is False
    # include: a signed record pulling in an unsigned one is not secure.
    world = {"signed.example": {"TXT": "v=spf1 include:other.example -all"},
             "other.example": {"TXT": "v=spf1 ip4:198.51.100.0/24 -all"}}
    mixed = FakeResolver(world, secure=["signed.example"])
    outcome = check("198.51.100.20", "a@signed.example", resolver=mixed)
    assert outcome.result is SpfResult.PASS and outcome.dnssec is False


def test_result_without_any_dns_answer_is_not_secure():
    # A malformed domain is "none" without a lookup (RFC 7208 §4.3); no
    # answer was authenticated, so the result must not claim DNSSEC.
    resolver = standard_world(secure=True)
    outcome = check("192.0.2.1", "a@" + "x" * 64 + ".example", resolver=resolver)
    assert outcome.result is SpfResult.NONE
    assert resolver.queries == []
    assert outcome.dnssec is False


# --- names the resolver cannot ask for ----------------------------------

@pytest.mark.parametrize("domain", [
    pytest.param(".".join(["a" * 60] * 5) + ".example", id="name-over-255-octets"),
    pytest.param("ex\udcffample.com", id="non-utf8-byte-surrogateescaped"),
])
def test_domain_that_is_not_a_dns_name_is_none(domain):
    # RFC 7208 §4.3: a malformed domain gives "none"; it must not escape as
    # an exception from dnspython's name parser.
    outcome = check("192.0.2.1", "a@" + domain, nat=NatConfig())
    assert outcome.result is SpfResult.NONE


def test_idna_domain_is_asked_as_a_lookup():
    resolver = FakeResolver({"xn--exmple-cua.example": {"TXT": "v=spf1 ip4:192.0.2.1 -all"}})
    outcome = check("192.0.2.1", "a@exämple.example", nat=NatConfig(), resolver=resolver)
    assert outcome.result is SpfResult.PASS


# --- the outcome memo -------------------------------------------------------

def memo_evaluate(memo, resolver, address, sender, helo="client.example"):
    return spf_check.evaluate(resolver, SpfConfig(), ip(address), sender, helo, RECEIVER,
                              memo)


def test_memo_answers_a_repeated_question_without_dns():
    memo, resolver = spf_check.SpfMemo(), standard_world()
    first = memo_evaluate(memo, resolver, "192.0.2.1", "a@other.example")
    asked = len(resolver.queries)
    again = memo_evaluate(memo, resolver, "192.0.2.1", "b@other.example")
    assert first == again and first.result is SpfResult.FAIL
    assert len(resolver.queries) == asked


def test_memo_keeps_outcomes_at_once_while_less_than_half_full():
    memo, resolver = spf_check.SpfMemo(size=8), standard_world()
    for host in range(1, 10):
        memo_evaluate(memo, resolver, f"192.0.2.{host}", "a@other.example")
    assert len(memo) == 4


def test_memo_past_half_keeps_an_outcome_only_when_its_question_comes_again():
    # Botnet mail from a new address every time never repeats: its
    # outcomes must not push the real senders' out.
    memo, resolver = spf_check.SpfMemo(size=4), standard_world()
    for host in range(1, 10):
        memo_evaluate(memo, resolver, f"192.0.2.{host}", "a@other.example")
    assert len(memo) == 2           # the first two, kept at once
    memo_evaluate(memo, resolver, "192.0.2.9", "a@other.example")
    assert len(memo) == 3           # asked again: kept
    memo_evaluate(memo, resolver, "192.0.2.20", "a@other.example")
    assert len(memo) == 3


def test_memo_is_per_client_address():
    memo, resolver = spf_check.SpfMemo(), standard_world()
    assert memo_evaluate(memo, resolver, "192.0.2.1", "a@other.example").result \
        is SpfResult.FAIL
    assert memo_evaluate(memo, resolver, "198.51.100.20", "a@other.example").result \
        is SpfResult.PASS


def test_memo_keeps_nothing_that_may_not_be_cached():
    memo, resolver = spf_check.SpfMemo(), standard_world(ttl=0)
    memo_evaluate(memo, resolver, "192.0.2.1", "a@other.example")
    asked = len(resolver.queries)
    memo_evaluate(memo, resolver, "192.0.2.1", "a@other.example")
    assert len(resolver.queries) == 2 * asked


def test_memo_keeps_no_temperror():
    memo, resolver = spf_check.SpfMemo(), standard_world()
    memo_evaluate(memo, resolver, "192.0.2.1", "a@temperror.example")
    memo_evaluate(memo, resolver, "192.0.2.1", "a@temperror.example")
    assert resolver.queries.count(("temperror.example", "TXT")) == 2


MACRO_WORLD = {
    "macro.example": {"TXT": "v=spf1 exists:%{l}.allowed.macro.example -all"},
    "alice.allowed.macro.example": {"A": "127.0.0.2"},
    "outer.example": {"TXT": "v=spf1 include:macro.example -all"},
}


@pytest.mark.parametrize("domain", ["macro.example", "outer.example"])
def test_memo_keys_macro_outcomes_by_sender(domain):
    # RFC 7208 §7: %{l} makes the outcome depend on the local part, also
    # when the macro is in an included record.
    memo, resolver = spf_check.SpfMemo(), FakeResolver(MACRO_WORLD)
    for _ in range(2):   # the second answered by the memo
        assert memo_evaluate(memo, resolver, "192.0.2.1", f"alice@{domain}").result \
            is SpfResult.PASS
    assert len(memo) == 1
    assert memo_evaluate(memo, resolver, "192.0.2.1", f"mallory@{domain}").result \
        is SpfResult.FAIL
    assert memo_evaluate(memo, resolver, "192.0.2.1", f"alice@{domain}").result \
        is SpfResult.PASS


@pytest.mark.parametrize("first_sender, first_helo, kept", [
    # The domain follows the *last* "@" (a quoted local part may hold one,
    # RFC 5321 §4.1.2): own.example itself, which fails from here.  pyspf
    # alone would evaluate 'y"@own.example', which does not exist: "none".
    pytest.param('"x@y"@own.example', "client.example", 1, id="quoted-local-part-with-at"),
    pytest.param("x@y@own.example", "client.example", 1, id="two-at-signs"),
    # No "@": malformed, evaluated as nothing (pyspf alone would take the
    # whole sender, "own", for the domain).
    pytest.param("own", "own.example", 0, id="sender-without-at"),
])
def test_memo_is_keyed_by_the_domain_checked(first_sender, first_helo, kept):
    # An outcome for one domain must never answer for another: here an
    # attacker's odd sender would otherwise store "none" for own.example,
    # and the next spoofed own.example sender would not fail.
    memo, resolver = spf_check.SpfMemo(), standard_world()
    for _ in range(2):   # the second answered by the memo
        first = memo_evaluate(memo, resolver, "198.51.100.50", first_sender, first_helo)
    assert len(memo) == kept
    assert first.result is (SpfResult.FAIL if kept else SpfResult.NONE)
    spoof = memo_evaluate(memo, resolver, "198.51.100.50", "ceo@own.example")
    assert spoof.result is SpfResult.FAIL


# --- outcomes shared between worker processes ---------------------------------

def sharing_memos(monkeypatch, scopes=("a|", "a|")):
    monkeypatch.setattr(spf_check, "_shared_outcomes", SharedAnswers(64, slot_size=512))
    return [spf_check.SpfMemo(scope=scope) for scope in scopes]


def test_a_memo_answers_with_what_another_worker_kept(monkeypatch):
    first, second = sharing_memos(monkeypatch)
    kept = memo_evaluate(first, standard_world(), "192.0.2.1", "a@other.example")
    resolver = standard_world()
    assert memo_evaluate(second, resolver, "192.0.2.1", "b@other.example") == kept
    assert resolver.queries == [] and len(second) == 1


def test_an_outcome_of_another_scope_is_not_taken(monkeypatch):
    first, second = sharing_memos(monkeypatch, scopes=("a|", "b|"))
    memo_evaluate(first, standard_world(), "192.0.2.1", "a@other.example")
    resolver = standard_world()
    memo_evaluate(second, resolver, "192.0.2.1", "a@other.example")
    assert resolver.queries != []


def test_a_shared_outcome_ends_with_its_first_answer(monkeypatch):
    first, second = sharing_memos(monkeypatch)
    memo_evaluate(first, standard_world(ttl=0.05), "192.0.2.1", "a@other.example")
    time.sleep(0.1)
    resolver = standard_world()
    memo_evaluate(second, resolver, "192.0.2.1", "a@other.example")
    assert resolver.queries != []


def test_a_macro_outcome_is_shared_under_its_sender(monkeypatch):
    first, second = sharing_memos(monkeypatch)
    memo_evaluate(first, FakeResolver(MACRO_WORLD), "192.0.2.1", "alice@macro.example")
    resolver = FakeResolver(MACRO_WORLD)
    assert memo_evaluate(second, resolver, "192.0.2.1", "mallory@macro.example").result \
        is SpfResult.FAIL    # evaluated, not alice's pass
    assert resolver.queries != []
    resolver = FakeResolver(MACRO_WORLD)
    assert memo_evaluate(second, resolver, "192.0.2.1", "alice@macro.example").result \
        is SpfResult.PASS
    assert resolver.queries == []
