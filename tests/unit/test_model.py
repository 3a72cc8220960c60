"""policyd.model: the small pieces of logic in the shared vocabulary."""
from __future__ import annotations

import ipaddress

import pytest

from policyd.model import (Action, Decision, DkimCheck, DkimResult, IprevCheck, IprevResult,
                           Request, SpfCheck, SpfResult, domain_of)

ip = ipaddress.ip_address


@pytest.mark.parametrize("address, domain", [
    ("user@Example.COM", "example.com"),
    ("user@example.com.", "example.com"),
    ('"a@b"@example.com', "example.com"),   # the domain follows the last "@"
    ("", ""),
    ("postmaster", ""),
])
def test_domain_of(address, domain):
    assert domain_of(address) == domain
    assert Request(client_address=ip("192.0.2.1"), sender=address).sender_domain == domain


def test_actions_are_ordered_by_severity():
    assert Action.ACCEPT.severity < Action.DEFER.severity < Action.REJECT.severity
    assert max([Action.DEFER, Action.REJECT, Action.ACCEPT], key=lambda a: a.severity) \
        is Action.REJECT


def test_received_spf_words():
    # RFC 7208 §9.1 spells the results this way.
    assert [r.received_spf_word for r in SpfResult] == \
        ["None", "Neutral", "Pass", "Fail", "SoftFail", "TempError", "PermError"]


def test_log_fields():
    request = Request(client_address=ip("192.168.1.10"), helo="laptop", sender="")
    decision = Decision(
        Action.ACCEPT, rule="nat.relaxed", would=Action.REJECT,
        spf=(SpfCheck("mailfrom", "own.example", SpfResult.PASS, dnssec=True,
                      relaxed_via=ip("203.0.113.7"), relaxed_mode="reevaluate"),),
        iprev=IprevCheck(IprevResult.PERMERROR, dnssec=False),
        dkim=(DkimCheck(DkimResult.NONE),))
    assert decision.log_fields(request) == [
        ("action", "ACCEPT"), ("rule", "nat.relaxed"), ("client", "192.168.1.10"),
        ("helo", "laptop"), ("sender", "<>"), ("would", "REJECT"),
        ("spf.mailfrom", "pass"), ("nat", "reevaluate:203.0.113.7"),
        ("iprev", "permerror"), ("dkim", "none:-"), ("dnssec", "no")]


def test_log_fields_dnssec_yes_only_when_all_secure():
    request = Request(client_address=ip("192.0.2.1"), sender="a@signed.example")
    secure = Decision(Action.ACCEPT, spf=(SpfCheck("mailfrom", "signed.example",
                                                   SpfResult.PASS, dnssec=True),))
    assert ("dnssec", "yes") in secure.log_fields(request)
    bare = Decision(Action.ACCEPT, rule="sasl")
    assert [k for k, _ in bare.log_fields(request)] == ["action", "rule", "client", "helo",
                                                         "sender"]


def test_decision_equality_ignores_the_trace():
    assert Decision(Action.ACCEPT, trace=("a",)) == Decision(Action.ACCEPT, trace=("b",))
