"""The MAIL FROM domain, whatever its spelling: one reading for the SPF
evaluation, the NAT own-domain match, the reply and the headers (issue 15,
item 1: 'a@own.example.', '"a@b"@own.example', 'a@evil@own.example' and
'"x@own.example"@own.example' were accepted from outside with spf=none).
"""
from __future__ import annotations

import authres
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.engine import Engine
from policyd.model import Action, MailFrom, SpfResult, internal_form, parse_mail_from
from tests.unit.fakedns import standard_world
from tests.unit.test_engine import make_config, make_request

OUTSIDE = "198.51.100.50"      # neither in nat.networks nor in own.example's SPF
NAT_CLIENT = "192.168.1.10"    # in nat.networks; own.example passes as 203.0.113.7

# The four forms the adversarial test delivered through a real Postfix, in
# the internal form Postfix sends the policy service ("a@b"@own.example
# arrives as a@b@own.example), and others of the same families.
OWN_DOMAIN_SPELLINGS = [
    "a@own.example.",
    "a@b@own.example",
    "a@evil.example@own.example",
    '"x@own.example"@own.example',
    "a@OWN.Example",
    "a@own.example.@own.example",
    '"a@b"@own.example',
    'a"@evil.example@own.example',     # from "a\"@evil.example"@own.example
    "a\\@own.example",
    "@relay.example:a@own.example",
    "@own.example",
    "own.example!a",          # Postfix swap_bangpath: a@own.example
    "a%own.example",          # Postfix allow_percent_hack: a@own.example
    "a%evil.example%own.example",
    "a@sub.own.example.",
]


@pytest.mark.parametrize("sender, local, domain", [
    ("a@own.example", "a", "own.example"),
    ("a@own.example.", "a", "own.example"),
    ("a@b@own.example", "a@b", "own.example"),
    ('a"b@own.example', 'a"b', "own.example"),
    ('"a@b"@own.example', '"a@b"', "own.example"),
    ("@r1.example,@r2.example:a@own.example", "a", "own.example"),
    ("own.example!a", "a", "own.example"),
    ("x.example!own.example!a", "own.example!a", "x.example"),   # the first "!"
    ("a%b%own.example", "a%b", "own.example"),
    ("@own.example", "", "own.example"),
    ("a@[192.0.2.1]", "a", "[192.0.2.1]"),
    ("a@[IPv6:2001:db8::1]", "a", "[IPv6:2001:db8::1]"),
    # SMTPUTF8: a U-label is the A-label the resolver asks (IDNA, UTS #46).
    ("a@m\u00fcller.example", "a", "xn--mller-kva.example"),
    ("a@M\u00dcLLER.example", "a", "xn--mller-kva.example"),
    ("a@\u043ewn.example", "a", "xn--wn-emc.example"),          # Cyrillic o: not own
])
def test_parse_mail_from(sender, local, domain):
    assert parse_mail_from(sender) == MailFrom(local, domain)


@pytest.mark.parametrize("external, internal", [
    ("a@own.example", "a@own.example"),
    ('"a@b"@own.example', "a@b@own.example"),
    ('"a\\"b"@own.example', 'a"b@own.example'),
    ("a\\@own.example", "a@own.example"),
    ("a@own.example(x@evil.example", "a@own.example"),      # an unclosed comment
    ("a@own.example(x\\)@evil.example", "a@own.example"),
    ("a@other.example(x@own.example", "a@other.example"),
    ("(c (nested) )a@own.example", "a@own.example"),
    ("a@own .example (x)", "a@own.example"),
    ('"a@own.example', "a@own.example"),                     # an unclosed quote
])
def test_internal_form_reads_as_postfix_tok822_does(external, internal):
    assert internal_form(external) == internal


@pytest.mark.parametrize("sender", [
    "a",                      # Postfix qualifies it with $myorigin
    "a@www",                  # one label: Postfix may append .$mydomain
    "a@own.example..",        # Postfix strips one dot, not two
    "a@", "@", "a@.", "a@own..example", "a@-own.example", "a@own-.example",
    "a@own.example ", "a@own.example\r\nX: y", "a@own.example(x)", "a@own.example>",
    '"a@own.example"',
    "a@own.ex\udcffample",    # a byte that was not UTF-8
    "a@" + "x" * 64 + ".example",
    # Non-ASCII that IDNA maps to ASCII or to a dot: another name than the
    # one delivered, read as own.example by DNS.
    "a@\uff4f\uff57\uff4e.example",   # fullwidth
    "a@own.example\u3002", "a@own\uff0eexample", "a@ow\u200bn.example",
    "a@\u212aernel.example",          # KELVIN SIGN, which str.lower() makes "k"
])
def test_malformed_mail_from_has_no_domain(sender):
    parsed = parse_mail_from(sender)
    assert parsed.domain == "" and parsed.malformed


@pytest.mark.parametrize("sender", OWN_DOMAIN_SPELLINGS)
@pytest.mark.parametrize("on_malformed", ["reject", "flag"])
def test_own_domain_spelling_from_outside_is_rejected(sender, on_malformed):
    engine = Engine(make_config({"spf": {"mailfrom": {"on_malformed": on_malformed}}}),
                    standard_world())
    decision = engine.decide(make_request(OUTSIDE, sender, helo="client.example"))
    assert decision.action is Action.REJECT, "\n".join(decision.trace)
    assert decision.rule == "spf.mailfrom.fail"
    assert (decision.reply.code, decision.reply.status) == ("550", "5.7.23")
    # The reply names the domain that was evaluated.
    mailfrom = next(c for c in decision.spf if c.identity == "mailfrom")
    assert f"SPF fail: {mailfrom.domain} does not designate" in decision.reply.text
    assert mailfrom.domain in ("own.example", "sub.own.example")


@pytest.mark.parametrize("sender", OWN_DOMAIN_SPELLINGS)
def test_own_domain_spelling_from_a_nat_network_is_relaxed(sender):
    decision = Engine(make_config({}), standard_world()).decide(
        make_request(NAT_CLIENT, sender, helo="client.example"))
    assert decision.action is Action.ACCEPT, "\n".join(decision.trace)
    assert decision.rule == "nat.relaxed"
    header = str(decision.headers[0])
    assert "smtp.mailfrom=own.example" in header or "smtp.mailfrom=sub.own.example" in header
    assert "policy.nat-relaxed=203.0.113.7" in header


def test_a_bare_local_part_is_rejected_as_malformed_by_default():
    # Postfix would deliver it as a@$myorigin: one of your own domains.
    decision = Engine(make_config({}), standard_world()).decide(make_request(OUTSIDE, "a"))
    assert decision.action is Action.REJECT
    assert decision.rule == "spf.mailfrom.malformed"
    assert (decision.reply.code, decision.reply.status) == ("553", "5.1.7")


@pytest.mark.parametrize("verdict, action", [("defer", Action.DEFER), ("flag", Action.ACCEPT),
                                             ("none", Action.ACCEPT)])
def test_on_malformed_is_configurable(verdict, action):
    engine = Engine(make_config({"spf": {"mailfrom": {"on_malformed": verdict}}}),
                    standard_world())
    decision = engine.decide(make_request(OUTSIDE, "a@own.example.."))
    assert decision.action is action
    if action is Action.DEFER:
        assert (decision.reply.code, decision.reply.status) == ("451", "4.1.7")
    else:
        # Nothing was evaluated, and the header says of no domain that it was.
        header = str(decision.headers[0])
        assert "spf=none" in header and "own.example" not in header


# --- the property: whatever the spelling ------------------------------------

_PIECES = st.sampled_from([
    "a", "@", ".", "..", '"', "\\", "!", "%", ":", ",", " ", "\t", "(", ")", "<", ">",
    "[", "]", "own.example", "OWN.EXAMPLE", "own", "example", "evil.example",
    "other.example", "sub.own.example", "evilown.example", "192.0.2.1", "IPv6:", "\udcff",
    "\u00fc", "\r\n", "xn--", "-", "_", "\uff4f\uff57\uff4e", "\u3002", "\uff0e", "\u043e",
])
_SENDERS = st.one_of(
    st.lists(_PIECES, min_size=1, max_size=8).map("".join),
    st.text(min_size=1, max_size=40),
    # An own-domain address with something around it.
    st.tuples(st.lists(_PIECES, max_size=4).map("".join),
              st.sampled_from(["own.example", "Own.Example.", "sub.own.example"]),
              st.lists(_PIECES, max_size=3).map("".join))
    .map(lambda parts: f"{parts[0]}@{parts[1]}{parts[2]}"),
)
_ENGINE = Engine(make_config({"spf": {"mailfrom": {"on_malformed": "flag"}},
                              "headers": {"received_spf": True}}), standard_world())


def _is_own(domain: str) -> bool:
    # The own domains that publish SPF in the standard world (a subdomain
    # that publishes nothing is "none" by DNS, whatever its spelling).
    return domain.lower().rstrip(".") in ("own.example", "sub.own.example")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=_SENDERS)
def test_reported_domain_is_the_evaluated_one_and_own_never_passes_from_outside(sender):
    parsed = parse_mail_from(sender)
    decision = _ENGINE.decide(make_request(OUTSIDE, sender, helo="client.example"))
    mailfrom = next(c for c in decision.spf if c.identity == "mailfrom")
    # What was evaluated is the parsed domain, nothing else.
    assert mailfrom.domain == parsed.domain
    if _is_own(parsed.domain):
        assert decision.action is Action.REJECT
        assert mailfrom.result is SpfResult.FAIL
    if decision.action is Action.ACCEPT:
        # An accepted own-domain spelling could only be a malformed address
        # (no domain, nothing evaluated); its header then names none.
        header = str(decision.headers[0])
        parsed_header = authres.AuthenticationResultsHeader.parse(header)
        spf_results = [r for r in parsed_header.results if r.method == "spf"]
        reported = {p.name: p.value for p in spf_results[-1].properties}
        reported_domain = reported.get("mailfrom", "")
        assert not _is_own(reported_domain)
        if not parsed.malformed and not parsed.literal:
            assert reported_domain == parsed.domain
