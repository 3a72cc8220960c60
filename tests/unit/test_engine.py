"""policyd.engine as decision tables, against the standard test world.

Each row of DECISIONS is one request, the config it runs under (YAML
overrides on BASE_CONFIG, read by the real config parser) and what must
come out: the action, the SMTP reply, the rule, and what the headers say.
The resolver is the fake one serving the standard world, so a row is the
engine's decision and nothing else.
"""
from __future__ import annotations

import copy
import dataclasses
import ipaddress

import pytest
import yaml

from policyd import config as config_module
from policyd import dns as dns_module
from policyd.engine import Engine
from policyd.model import Action, DkimCheck, DkimResult, IprevResult, Request, SpfResult
from tests.unit.fakedns import STANDARD_TEMP_ERRORS, standard_world

BASE_CONFIG = {
    "authserv_id": "mx.receiver.example",
    "nat": {"own_domains": ["own.example"],
            "networks": ["192.168.1.0/24", "fd00::/8"],
            "public_addresses": ["203.0.113.7"]},
}

# Short names for the override dicts below.
NEUTRAL_SENDER = "a@neutral.example"   # mailfrom neutral: verdict none by default
PASSING_V6_SENDER = "a@other.example"  # passes from 2001:db8:6::/64
# A client whose PTR lookup fails (SERVFAIL), so iprev is temperror.
PTR_SERVFAIL_CLIENT = "2001:db8:7::99"
PTR_SERVFAIL_NAME = "9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.7.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"


def row(id, *, client, sender="", helo="client.example", config=None, action="ACCEPT",
        reply=None, rule=None, headers=(), absent=(), would=None, text=(), temp_errors=(),
        **request):
    """One decision.  reply is (code, enhanced status), given for every row
    that does not accept; temp_errors adds names that answer SERVFAIL."""
    assert (reply is None) == (action == "ACCEPT"), id
    return pytest.param(dict(client=client, sender=sender, helo=helo, request=request,
                             config=config or {}, action=action, reply=reply, rule=rule,
                             headers=headers, absent=absent, would=would, text=text,
                             temp_errors=temp_errors), id=id)


def spf_mailfrom(**actions):
    return {"spf": {"mailfrom": {f"on_{k}": v for k, v in actions.items()}}}


def spf_helo(**settings):
    return {"spf": {"helo": {k if k == "check" else f"on_{k}": v
                             for k, v in settings.items()}}}


def iprev(**settings):
    return {"iprev": settings}


DECISIONS = [
    # --- SPF, MAIL FROM identity, default actions ---------------------------
    row("mailfrom-pass", client="198.51.100.20", sender="a@other.example", rule="pass",
        headers=["spf=pass", "smtp.mailfrom=other.example"]),
    row("mailfrom-fail", client="192.0.2.1", sender="a@other.example", action="REJECT",
        reply=("550", "5.7.23"), rule="spf.mailfrom.fail",
        text=["other.example", "(mailfrom)"]),
    row("mailfrom-softfail-flags", client="192.0.2.1", sender="a@softfail.example",
        rule="spf.mailfrom.softfail", headers=["spf=softfail", "smtp.mailfrom=softfail.example"]),
    row("mailfrom-neutral", client="192.0.2.1", sender="a@neutral.example", rule="none",
        headers=["spf=neutral"]),
    row("mailfrom-none", client="192.0.2.1", sender="a@nospf.example", rule="none",
        headers=["spf=none", "smtp.mailfrom=nospf.example"]),
    row("mailfrom-permerror-flags", client="192.0.2.1", sender="a@permerror.example",
        rule="spf.mailfrom.permerror", headers=["spf=permerror"]),
    row("mailfrom-temperror-defers", client="192.0.2.1", sender="a@temperror.example",
        action="DEFER", reply=("451", "4.7.24"), rule="spf.mailfrom.temperror",
        text=["temperror.example", "try again later"]),

    # --- SPF, MAIL FROM identity, overridden actions --------------------------
    row("mailfrom-fail-defer", client="192.0.2.1", sender="a@other.example",
        config=spf_mailfrom(fail="defer"), action="DEFER", reply=("451", "4.7.23"),
        rule="spf.mailfrom.fail"),
    row("mailfrom-fail-flag", client="192.0.2.1", sender="a@other.example",
        config=spf_mailfrom(fail="flag"), rule="spf.mailfrom.fail",
        headers=["spf=fail", "smtp.mailfrom=other.example"]),
    row("mailfrom-fail-none", client="192.0.2.1", sender="a@other.example",
        config=spf_mailfrom(fail="none"), rule="none", headers=["spf=fail"]),
    row("mailfrom-softfail-reject", client="192.0.2.1", sender="a@softfail.example",
        config=spf_mailfrom(softfail="reject"), action="REJECT", reply=("550", "5.7.23"),
        rule="spf.mailfrom.softfail"),
    row("mailfrom-softfail-defer", client="192.0.2.1", sender="a@softfail.example",
        config=spf_mailfrom(softfail="defer"), action="DEFER", reply=("451", "4.7.23"),
        rule="spf.mailfrom.softfail"),
    row("mailfrom-neutral-reject", client="192.0.2.1", sender="a@neutral.example",
        config=spf_mailfrom(neutral="reject"), action="REJECT", reply=("550", "5.7.1"),
        rule="spf.mailfrom.neutral"),
    row("mailfrom-neutral-defer", client="192.0.2.1", sender="a@neutral.example",
        config=spf_mailfrom(neutral="defer"), action="DEFER", reply=("450", "4.7.1"),
        rule="spf.mailfrom.neutral"),
    row("mailfrom-none-reject", client="192.0.2.1", sender="a@nospf.example",
        config=spf_mailfrom(none="reject"), action="REJECT", reply=("550", "5.7.1"),
        rule="spf.mailfrom.none"),
    row("mailfrom-permerror-reject", client="192.0.2.1", sender="a@permerror.example",
        config=spf_mailfrom(permerror="reject"), action="REJECT", reply=("550", "5.7.24"),
        rule="spf.mailfrom.permerror"),
    row("mailfrom-permerror-defer", client="192.0.2.1", sender="a@permerror.example",
        config=spf_mailfrom(permerror="defer"), action="DEFER", reply=("451", "4.7.24"),
        rule="spf.mailfrom.permerror"),
    row("mailfrom-temperror-reject", client="192.0.2.1", sender="a@temperror.example",
        config=spf_mailfrom(temperror="reject"), action="REJECT", reply=("550", "5.7.24"),
        rule="spf.mailfrom.temperror"),
    row("mailfrom-temperror-flag", client="192.0.2.1", sender="a@temperror.example",
        config=spf_mailfrom(temperror="flag"), rule="spf.mailfrom.temperror",
        headers=["spf=temperror"]),
    row("mailfrom-temperror-none", client="192.0.2.1", sender="a@temperror.example",
        config=spf_mailfrom(temperror="none"), rule="none", headers=["spf=temperror"]),
    row("mailfrom-pass-reject", client="198.51.100.20", sender="a@other.example",
        config=spf_mailfrom(**{"pass": "reject"}), action="REJECT", reply=("550", "5.7.1"),
        rule="spf.mailfrom.pass"),

    # --- SPF, HELO identity (RFC 7208 §2.3) ----------------------------------
    row("helo-fail-rejects", client="192.0.2.1", helo="helo.other.example",
        sender=NEUTRAL_SENDER, action="REJECT", reply=("550", "5.7.23"), rule="spf.helo.fail",
        text=["helo.other.example", "(helo)"]),
    row("helo-fail-flag", client="192.0.2.1", helo="helo.other.example",
        sender=NEUTRAL_SENDER, config=spf_helo(fail="flag"), rule="spf.helo.fail",
        headers=["spf=fail (without dnssec) smtp.helo=helo.other.example",
                 "spf=neutral (without dnssec) smtp.mailfrom=neutral.example"]),
    row("helo-softfail-flags", client="192.0.2.1", helo="softfail.example",
        sender=NEUTRAL_SENDER, rule="spf.helo.softfail", headers=["smtp.helo=softfail.example"]),
    row("helo-temperror-ignored", client="192.0.2.1", helo="temperror.example",
        sender=NEUTRAL_SENDER, rule="none", headers=["spf=temperror"]),
    row("helo-temperror-defer", client="192.0.2.1", helo="temperror.example",
        sender=NEUTRAL_SENDER, config=spf_helo(temperror="defer"), action="DEFER",
        reply=("451", "4.7.24"), rule="spf.helo.temperror"),
    row("helo-permerror-flags", client="192.0.2.1", helo="permerror.example",
        sender=NEUTRAL_SENDER, rule="spf.helo.permerror"),
    row("helo-softfail-reject", client="192.0.2.1", helo="softfail.example",
        sender=NEUTRAL_SENDER, config=spf_helo(softfail="reject"), action="REJECT",
        reply=("550", "5.7.23"), rule="spf.helo.softfail"),
    row("helo-check-off", client="192.0.2.1", helo="helo.other.example",
        sender=NEUTRAL_SENDER, config=spf_helo(check=False), rule="none",
        absent=["smtp.helo"]),
    # A trailing dot makes the HELO name a root-anchored FQDN, the same domain.
    row("helo-fail-trailing-dot", client="192.0.2.1", helo="helo.other.example.",
        sender=NEUTRAL_SENDER, action="REJECT", reply=("550", "5.7.23"),
        rule="spf.helo.fail"),
    row("null-sender-helo-trailing-dot", client="192.0.2.1", helo="helo.other.example.",
        sender="", action="REJECT", reply=("550", "5.7.23"), rule="spf.mailfrom.fail"),
    row("helo-address-literal-not-checked", client="192.0.2.1", helo="[192.0.2.1]",
        sender=NEUTRAL_SENDER, rule="none", absent=["smtp.helo"]),
    # CVE-2019-20790: a HELO pass must not read as a MAIL FROM pass.
    row("helo-pass-mailfrom-fail", client="198.51.100.10", helo="helo.other.example",
        sender="a@own.example", action="REJECT", reply=("550", "5.7.23"),
        rule="spf.mailfrom.fail"),
    row("helo-pass-mailfrom-fail-flagged", client="198.51.100.10", helo="helo.other.example",
        sender="a@own.example", config=spf_mailfrom(fail="flag"), rule="spf.mailfrom.fail",
        headers=["spf=pass (without dnssec) smtp.helo=helo.other.example",
                 "spf=fail (without dnssec) smtp.mailfrom=own.example"],
        absent=["smtp.mailfrom=helo.other.example"]),
    # RFC 7208 §2.4: the null sender is checked as postmaster@helo, once.
    row("null-sender-uses-helo", client="192.0.2.1", helo="helo.other.example", sender="",
        action="REJECT", reply=("550", "5.7.23"), rule="spf.mailfrom.fail"),
    row("null-sender-helo-pass", client="198.51.100.10", helo="helo.other.example", sender="",
        rule="pass", headers=["spf=pass"]),
    row("null-sender-literal-helo", client="192.0.2.1", helo="[192.0.2.1]", sender="",
        rule="none", absent=["spf="]),

    # --- the NAT relaxation ---------------------------------------------------
    row("nat-own-domain", client="192.168.1.10", sender="alice@own.example",
        helo="laptop.example", rule="nat.relaxed",
        headers=["spf=pass", "policy.nat-relaxed=203.0.113.7", "smtp.mailfrom=own.example",
                 "NAT network 192.168.1.10"]),
    row("nat-own-subdomain", client="192.168.1.10", sender="alice@sub.own.example",
        rule="nat.relaxed", headers=["smtp.mailfrom=sub.own.example"]),
    row("nat-own-domain-ipv6", client="fd00::25", sender="alice@own.example",
        rule="nat.relaxed", absent=["iprev="]),
    row("nat-own-domain-ipv4-mapped", client="::ffff:192.168.1.10",
        sender="alice@own.example", rule="nat.relaxed", headers=["NAT network 192.168.1.10"]),
    row("nat-pass-mode", client="192.168.1.10", sender="alice@own.example",
        config={"nat": {"mode": "pass", "public_addresses": []}}, rule="nat.relaxed",
        headers=["policy.nat-relaxed=pass"]),
    row("outside-spoof-of-own-domain", client="198.51.100.50", sender="spoofer@own.example",
        action="REJECT", reply=("550", "5.7.23"), rule="spf.mailfrom.fail"),
    row("outside-spoof-of-own-domain-ipv6", client="2001:db8:6::25",
        sender="spoofer@own.example", action="REJECT", reply=("550", "5.7.23"),
        rule="spf.mailfrom.fail"),
    row("nat-lookalike-domain", client="192.168.1.10", sender="mallory@evilown.example",
        action="REJECT", reply=("550", "5.7.23"), rule="spf.mailfrom.fail"),
    row("nat-other-domain", client="192.168.1.10", sender="a@other.example",
        action="REJECT", reply=("550", "5.7.23"), rule="spf.mailfrom.fail"),
    row("nat-helo-own-domain-other-sender", client="192.168.1.10", helo="own.example",
        sender="a@other.example", action="REJECT", reply=("550", "5.7.23"),
        rule="spf.mailfrom.fail"),

    # --- iprev for IPv6 clients -------------------------------------------------
    row("ipv6-no-ptr-flags", client="2001:db8:6::26", sender=PASSING_V6_SENDER,
        rule="iprev.permerror",
        headers=["iprev=permerror", 'policy.iprev="2001:db8:6::26"', "spf=pass"]),
    row("ipv6-no-ptr-reject", client="2001:db8:6::26", sender=PASSING_V6_SENDER,
        config=iprev(on_fail="reject"), action="REJECT", reply=("550", "5.7.25"),
        rule="iprev.permerror", text=["reverse hostname"]),
    row("ipv6-ptr-not-confirmed-reject", client="2001:db8:6::27", sender=PASSING_V6_SENDER,
        config=iprev(on_fail="reject"), action="REJECT", reply=("550", "5.7.25"),
        rule="iprev.fail"),
    row("ipv6-ptr-not-confirmed-defer", client="2001:db8:6::27", sender=PASSING_V6_SENDER,
        config=iprev(on_fail="defer"), action="DEFER", reply=("450", "4.7.25"),
        rule="iprev.fail"),
    row("ipv6-fcrdns-pass", client="2001:db8:6::25", sender=PASSING_V6_SENDER,
        config=iprev(on_fail="reject"), rule="pass",
        headers=["iprev=pass", "mail6.other.example", 'policy.iprev="2001:db8:6::25"']),
    row("ipv6-ptr-temperror-ignored", client=PTR_SERVFAIL_CLIENT, sender="a@neutral.example",
        temp_errors=[PTR_SERVFAIL_NAME], config=iprev(on_fail="reject"), rule="none",
        headers=["iprev=temperror"]),
    row("ipv6-ptr-temperror-defer", client=PTR_SERVFAIL_CLIENT, sender="a@neutral.example",
        temp_errors=[PTR_SERVFAIL_NAME], config=iprev(on_temperror="defer"),
        action="DEFER", reply=("450", "4.7.25"), rule="iprev.temperror"),
    row("ipv6-custom-reject-text", client="2001:db8:6::26", sender=PASSING_V6_SENDER,
        config=iprev(on_fail="reject", reject_text="no rDNS (RFC 8601)\r\nX: y"),
        action="REJECT", reply=("550", "5.7.25"), text=["no rDNS"]),
    row("iprev-reject-beats-spf-defer", client="2001:db8:6::26", sender="a@temperror.example",
        config=iprev(on_fail="reject"), action="REJECT", reply=("550", "5.7.25"),
        rule="iprev.permerror"),
    # What Postfix says wins over our own lookups.
    row("mta-fcrdns-pass", client="2001:db8:6::26", sender=PASSING_V6_SENDER,
        client_name="mail6.other.example", reverse_client_name="mail6.other.example",
        config=iprev(on_fail="reject"), rule="pass", headers=["iprev=pass"]),
    row("mta-no-ptr", client="2001:db8:6::25", sender=PASSING_V6_SENDER,
        client_name="unknown", reverse_client_name="unknown",
        config=iprev(on_fail="reject"), action="REJECT", reply=("550", "5.7.25"),
        rule="iprev.permerror"),
    row("mta-ptr-not-confirmed", client="2001:db8:6::25", sender=PASSING_V6_SENDER,
        client_name="unknown", reverse_client_name="liar.other.example",
        config=iprev(on_fail="reject"), action="REJECT", reply=("550", "5.7.25"),
        rule="iprev.fail"),
    row("ipv4-iprev-off-by-default", client="198.51.100.11", sender="a@other.example",
        rule="pass", absent=["iprev="]),
    row("ipv4-iprev-on", client="198.51.100.11", sender="a@other.example",
        config=iprev(ipv4=True, on_fail="reject"), action="REJECT", reply=("550", "5.7.25"),
        rule="iprev.permerror"),
    row("ipv4-iprev-fcrdns", client="198.51.100.10", sender="a@other.example",
        config=iprev(ipv4=True, on_fail="reject"), rule="pass", headers=["iprev=pass"]),
    row("ipv6-iprev-off", client="2001:db8:6::26", sender=PASSING_V6_SENDER,
        config=iprev(ipv6=False), rule="pass", absent=["iprev="]),

    # --- exemptions -------------------------------------------------------------
    row("sasl-exempt", client="192.0.2.1", sender="spoofer@own.example",
        sasl_username="alice", rule="sasl", absent=["spf=", "iprev="]),
    row("allowlist-exempt", client="192.0.2.1", sender="spoofer@own.example",
        config={"allowlist": ["192.0.2.0/24"]}, rule="allowlist", absent=["spf="]),
    row("allowlist-ipv4-mapped", client="::ffff:192.0.2.1", sender="spoofer@own.example",
        config={"allowlist": ["192.0.2.0/24"]}, rule="allowlist"),
    row("allowlist-other-network", client="198.51.100.50", sender="spoofer@own.example",
        config={"allowlist": ["192.0.2.0/24"]}, action="REJECT", reply=("550", "5.7.23"),
        rule="spf.mailfrom.fail"),
    row("nat-exempt-from-iprev", client="fd00::26", sender="a@neutral.example",
        config=iprev(on_fail="reject"), rule="none", absent=["iprev="]),
    row("spf-disabled", client="192.0.2.1", sender="a@other.example",
        config={"spf": {"enabled": False}}, rule="none", absent=["spf="]),

    # --- test mode: everything accepted, the would-be action logged ------------
    row("test-mode-reject", client="192.0.2.1", sender="a@other.example",
        config={"test_mode": True}, would="REJECT", rule="spf.mailfrom.fail",
        headers=["spf=fail", "smtp.mailfrom=other.example"]),
    row("test-mode-defer", client="192.0.2.1", sender="a@temperror.example",
        config={"test_mode": True}, would="DEFER", rule="spf.mailfrom.temperror",
        headers=["spf=temperror"]),
    row("test-mode-iprev-reject", client="2001:db8:6::26", sender=PASSING_V6_SENDER,
        config={"test_mode": True, "iprev": {"on_fail": "reject"}}, would="REJECT",
        rule="iprev.permerror", headers=["iprev=permerror"]),
    row("test-mode-pass", client="198.51.100.20", sender="a@other.example",
        config={"test_mode": True}, rule="pass", headers=["spf=pass"]),

    # --- which headers ------------------------------------------------------------
    row("received-spf", client="192.0.2.1", sender="a@softfail.example",
        config={"headers": {"received_spf": True}}, rule="spf.mailfrom.softfail",
        headers=["Received-SPF: SoftFail", "client-ip=192.0.2.1",
                 'envelope-from="a@softfail.example"', "identity=mailfrom"]),
    row("no-authentication-results", client="192.0.2.1", sender="a@softfail.example",
        config={"headers": {"authentication_results": False}}, rule="spf.mailfrom.softfail",
        absent=["Authentication-Results"]),
]

# --- relay authorization (relay:, issue 11) -------------------------------------
# Every path that authorizes and every reject, with the recipient forms of
# the open-relay battery (docs/protocols.md §6) as Postfix hands them over
# (internal form: quotes gone).
FINGERPRINT = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01"
RELAY = {"relay": {"enabled": True, "local_domains": ["receiver.example", "own.example"],
                   "networks": ["10.20.0.0/16", "2001:db8:20::/48"],
                   "certificate_fingerprints": [FINGERPRINT],
                   "senders": [{"login": "alice", "addresses": ["alice@own.example",
                                                                "@alice.example"]},
                               {"login": "bob", "addresses": ["bob@own.example"]}]}}
STRANGER = dict(client="198.51.100.20", sender="a@other.example")   # SPF passes


def relay(**settings):
    return {"relay": {**RELAY["relay"], **settings}}


def denied(id, recipient, **fields):
    return row(id, **{**STRANGER, **fields}, config=RELAY, recipient=recipient,
               action="REJECT", reply=("554", "5.7.1"), rule="relay.denied",
               text=["Relay access denied"])


RELAY_DECISIONS = [
    row("relay-stranger-to-local-domain", **STRANGER, config=RELAY, rule="pass",
        recipient="postmaster@own.example", headers=["spf=pass"]),
    row("relay-stranger-to-bare-postmaster", **STRANGER, config=RELAY, rule="pass",
        recipient="postmaster"),
    row("relay-stranger-upper-case-local", **STRANGER, config=RELAY, rule="pass",
        recipient="X@OWN.EXAMPLE"),
    row("relay-stranger-trailing-dot-local", **STRANGER, config=RELAY, rule="pass",
        recipient="x@own.example."),
    denied("relay-stranger-plain", "relaytest@target.example"),
    denied("relay-stranger-trailing-dot", "relaytest@target.example."),
    denied("relay-stranger-subdomain-of-local", "x@sub.own.example"),
    denied("relay-stranger-percent-hack", "relaytest%target.example@own.example"),
    denied("relay-stranger-percent-hack-bare", "relaytest%target.example"),
    denied("relay-stranger-quoted-at", "relaytest@target.example@own.example"),
    denied("relay-stranger-double-at-literal", "relaytest@target.example@[192.0.2.1]"),
    denied("relay-stranger-source-route", "@own.example:relaytest@target.example"),
    denied("relay-stranger-bang-path", "target.example!relaytest"),
    denied("relay-stranger-bang-path-at-local", "target.example!relaytest@own.example"),
    denied("relay-stranger-ipv4-literal", "relaytest@[192.0.2.1]"),
    denied("relay-stranger-ipv6-literal", "relaytest@[IPv6:2001:db8::1]"),
    denied("relay-stranger-one-label", "relaytest@localhost"),
    denied("relay-stranger-wrong-certificate", "relaytest@target.example",
           ccert_fingerprint=FINGERPRINT.replace("AB", "00")),
    row("relay-network", client="10.20.1.1", sender="app@own.example", config=RELAY,
        recipient="x@target.example", rule="relay.network"),
    row("relay-network-ipv6", client="2001:db8:20::5", sender="app@own.example",
        config=RELAY, recipient="x@target.example", rule="relay.network"),
    row("relay-certificate", client="198.51.100.99", sender="app@own.example", config=RELAY,
        recipient="x@target.example", rule="relay.certificate",
        ccert_fingerprint=FINGERPRINT.replace(":", "").lower()),
    row("relay-certificate-pubkey", client="198.51.100.99", sender="app@own.example",
        config=RELAY, recipient="x@target.example", rule="relay.certificate",
        ccert_fingerprint="00:11", ccert_pubkey_fingerprint=FINGERPRINT),
    row("relay-sasl", client="198.51.100.99", sender="alice@own.example", config=RELAY,
        recipient="x@target.example", rule="relay.sasl", sasl_username="alice"),
    row("relay-sasl-login-case", client="198.51.100.99", sender="alice@own.example",
        config=RELAY, recipient="x@target.example", rule="relay.sasl", sasl_username="Alice"),
    row("relay-sasl-subaddress", client="198.51.100.99", sender="alice+news@own.example",
        config=RELAY, recipient="x@target.example", rule="relay.sasl", sasl_username="alice"),
    row("relay-sasl-address-case", client="198.51.100.99", sender="ALICE@Own.Example",
        config=RELAY, recipient="x@target.example", rule="relay.sasl", sasl_username="alice"),
    row("relay-sasl-own-domain", client="198.51.100.99", sender="anyone@alice.example",
        config=RELAY, recipient="x@target.example", rule="relay.sasl", sasl_username="alice"),
    row("relay-sasl-null-sender", client="198.51.100.99", sender="", config=RELAY,
        recipient="x@target.example", rule="relay.sasl", sasl_username="alice"),
    row("relay-sasl-as-someone-else", client="198.51.100.99", sender="bob@own.example",
        config=RELAY, recipient="x@target.example", sasl_username="alice", action="REJECT",
        reply=("553", "5.7.1"), rule="relay.sender-not-owned", text=["not owned by user alice"]),
    row("relay-sasl-as-someone-else-to-local", client="198.51.100.99", sender="bob@own.example",
        config=RELAY, recipient="x@own.example", sasl_username="alice", action="REJECT",
        reply=("553", "5.7.1"), rule="relay.sender-not-owned"),
    row("relay-sasl-as-someone-else-trailing-dot", client="198.51.100.99",
        sender="bob@own.example.", config=RELAY, recipient="x@target.example",
        sasl_username="alice", action="REJECT", reply=("553", "5.7.1"),
        rule="relay.sender-not-owned"),
    row("relay-sasl-own-local-part-other-domain", client="198.51.100.99",
        sender="alice@own.example@evil.example", config=RELAY, recipient="x@target.example",
        sasl_username="alice", action="REJECT", reply=("553", "5.7.1"),
        rule="relay.sender-not-owned"),
    row("relay-sasl-bare-local-part", client="198.51.100.99", sender="alice", config=RELAY,
        recipient="x@target.example", sasl_username="alice", action="REJECT",
        reply=("553", "5.7.1"), rule="relay.sender-not-owned"),
    row("relay-sasl-unlisted-sender", client="198.51.100.99", sender="x@nowhere.example",
        config=RELAY, recipient="x@target.example", sasl_username="alice", action="REJECT",
        reply=("553", "5.7.1"), rule="relay.sender-not-owned"),
    row("relay-sasl-unlisted-sender-known-mode", client="198.51.100.99",
        sender="x@nowhere.example", config=relay(sender_ownership="known"),
        recipient="x@target.example", sasl_username="alice", rule="relay.sasl"),
    row("relay-sasl-other-owner-known-mode", client="198.51.100.99", sender="bob@own.example",
        config=relay(sender_ownership="known"), recipient="x@target.example",
        sasl_username="alice", action="REJECT", reply=("553", "5.7.1"),
        rule="relay.sender-not-owned"),
    row("relay-sasl-ownership-off", client="198.51.100.99", sender="bob@own.example",
        config=relay(sender_ownership="off"), recipient="x@target.example",
        sasl_username="alice", rule="relay.sasl"),
    row("relay-tls-required-missing", client="10.20.1.1", sender="app@own.example",
        config=relay(require_tls=True), recipient="x@target.example", action="REJECT",
        reply=("554", "5.7.10"), rule="relay.tls-required", text=["TLS is required"]),
    row("relay-tls-required-present", client="10.20.1.1", sender="app@own.example",
        config=relay(require_tls=True), recipient="x@target.example", rule="relay.network",
        encryption_protocol="TLSv1.3", encryption_cipher="TLS_AES_256_GCM_SHA384"),
    row("relay-tls-too-old", client="10.20.1.1", sender="app@own.example",
        config=relay(require_tls=True, tls_minimum="TLSv1.2"), recipient="x@target.example",
        encryption_protocol="TLSv1", action="REJECT", reply=("554", "5.7.10"),
        rule="relay.tls-required"),
    row("relay-tls-not-needed-for-local", client="10.20.1.1", sender="a@nospf.example",
        config=relay(require_tls=True, skip_checks=False), recipient="x@own.example",
        rule="none"),
    row("relay-destination-allowed", client="10.20.1.1", sender="app@own.example",
        config=relay(destinations=["example.net"]), recipient="x@mx.example.net",
        rule="relay.network"),
    row("relay-destination-refused", client="10.20.1.1", sender="app@own.example",
        config=relay(destinations=["example.net"]), recipient="x@target.example",
        action="REJECT", reply=("554", "5.7.1"), rule="relay.destination"),
    row("relay-network-with-checks", client="10.20.1.1", sender="a@other.example",
        config=relay(skip_checks=False), recipient="x@target.example", action="REJECT",
        reply=("550", "5.7.23"), rule="spf.mailfrom.fail"),
    row("relay-test-mode-stranger", **STRANGER, config={**RELAY, "test_mode": True},
        recipient="x@target.example", would="REJECT", rule="relay.denied"),
    row("relay-allowlist-is-no-relay-client", client="10.9.0.1", sender="a@other.example",
        config={**RELAY, "allowlist": ["10.9.0.0/16"]}, recipient="x@target.example",
        action="REJECT", reply=("554", "5.7.1"), rule="relay.denied"),
]
DECISIONS += RELAY_DECISIONS


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_config(overrides: dict):
    text = yaml.safe_dump(deep_merge(BASE_CONFIG, overrides))
    return config_module.parse(text, "decisions.yaml")


def make_request(client, sender="", helo="client.example", **fields) -> Request:
    fields.setdefault("recipient", "postmaster@receiver.example")
    return Request(client_address=ipaddress.ip_address(client), helo=helo, sender=sender,
                   **fields)


@pytest.mark.parametrize("case", DECISIONS)
def test_decision(case):
    resolver = standard_world(temp_errors=STANDARD_TEMP_ERRORS + tuple(case["temp_errors"]))
    engine = Engine(make_config(case["config"]), resolver)
    request = make_request(case["client"], case["sender"], case["helo"], **case["request"])
    decision = engine.decide(request)
    trace = "\n".join(decision.trace)

    assert decision.action is Action[case["action"]], trace
    if case["reply"] is None:
        assert decision.reply is None, trace
    else:
        assert (decision.reply.code, decision.reply.status) == case["reply"], trace
        assert decision.reply.code[0] == decision.reply.status[0]   # RFC 3463 §3.1
        for fragment in case["text"]:
            assert fragment in decision.reply.text
        assert "\r" not in decision.reply.text and "\n" not in decision.reply.text
    if case["rule"] is not None:
        assert decision.rule == case["rule"], trace
    assert decision.would == (Action[case["would"]] if case["would"] else None)

    headers = "\n".join(str(h) for h in decision.headers)
    if decision.action is not Action.ACCEPT:
        assert decision.headers == ()
    for fragment in case["headers"]:
        assert fragment in headers, headers
    for fragment in case["absent"]:
        assert fragment not in headers, headers
    if case["rule"] in ("sasl", "allowlist") or (case["rule"] or "").startswith("relay."):
        # Exempt clients cost no DNS at all; nor does a refused relay.
        assert resolver.queries == [] and decision.headers == ()


@pytest.mark.parametrize("case", DECISIONS)
def test_decision_without_headers_differs_only_in_headers(case):
    # The milter decides at RCPT without headers (they come at end of
    # message): the verdict must be the same one.
    def decide_once(with_headers):
        resolver = standard_world(temp_errors=STANDARD_TEMP_ERRORS + tuple(case["temp_errors"]))
        engine = Engine(make_config(case["config"]), resolver)
        request = make_request(case["client"], case["sender"], case["helo"], **case["request"])
        return engine.decide(request, with_headers=with_headers)

    full, bare = decide_once(True), decide_once(False)
    assert bare.headers == ()
    assert bare == dataclasses.replace(full, headers=())


# --- properties the table relies on ------------------------------------------

def decide(client, sender, helo="client.example", config=None, resolver=None, **fields):
    resolver = resolver or standard_world()
    engine = Engine(make_config(config or {}), resolver)
    return engine.decide(make_request(client, sender, helo, **fields)), resolver


def test_null_sender_is_checked_once():
    decision, _ = decide("198.51.100.10", "", "helo.other.example")
    assert [(c.identity, c.domain) for c in decision.spf] == \
        [("mailfrom", "helo.other.example")]


def test_both_identities_are_checked_when_there_is_a_sender():
    decision, _ = decide("198.51.100.10", "a@other.example", "helo.other.example")
    assert [(c.identity, c.domain, c.result) for c in decision.spf] == [
        ("helo", "helo.other.example", SpfResult.PASS),
        ("mailfrom", "other.example", SpfResult.PASS)]


FORGER_V6 = "2001:db8:9::1"   # no PTR; outside other.example and helo.other.example


def test_a_mail_from_reject_ends_the_checks():
    # Nothing can undo a reject: the HELO name (a forger's is typically new,
    # a DNS miss per message) is not looked up, nor the client's PTR.
    decision, resolver = decide(FORGER_V6, "a@other.example", "helo.other.example")
    assert (decision.action, decision.rule) == (Action.REJECT, "spf.mailfrom.fail")
    assert [c.identity for c in decision.spf] == ["mailfrom"]
    assert decision.iprev is None
    assert [name for name, _ in resolver.queries] == ["other.example"]
    assert any("spf helo helo.other.example: not checked" in line for line in decision.trace)


def test_a_mail_from_result_short_of_reject_leaves_the_helo_check_to_decide():
    # MAIL FROM temperror defers; the HELO fail rejects, which is worse.
    decision, resolver = decide(FORGER_V6, "a@temperror.example", "helo.other.example")
    assert (decision.action, decision.rule) == (Action.REJECT, "spf.helo.fail")
    assert [c.identity for c in decision.spf] == ["helo", "mailfrom"]
    assert decision.iprev is None    # the HELO reject ended it


def test_test_mode_makes_every_check_for_its_headers():
    decision, resolver = decide(FORGER_V6, "a@other.example", "helo.other.example",
                                config={"test_mode": True})
    assert (decision.action, decision.would) == (Action.ACCEPT, Action.REJECT)
    assert [c.identity for c in decision.spf] == ["helo", "mailfrom"]
    assert decision.iprev is not None and decision.iprev.result is IprevResult.PERMERROR
    assert any(rdtype == "PTR" for _, rdtype in resolver.queries)


def test_mta_names_mean_no_ptr_lookup():
    decision, resolver = decide("2001:db8:6::26", PASSING_V6_SENDER,
                                client_name="mail6.other.example",
                                reverse_client_name="mail6.other.example")
    assert decision.iprev.result is IprevResult.PASS
    assert not any(rdtype == "PTR" for _, rdtype in resolver.queries)


def test_nat_client_gets_no_iprev_lookup():
    decision, resolver = decide("fd00::25", "alice@own.example")
    assert decision.iprev is None
    assert not any(rdtype == "PTR" for _, rdtype in resolver.queries)


def test_the_rcpt_stage_is_one_dns_budget():
    # Every lookup of the stage (MAIL FROM, HELO, our own iprev) waits
    # within one dns.timeout from its start, and the budget ends with it.
    resolver = standard_world()
    left, query = [], resolver.query
    def timed_query(name, rdtype, lifetime=None):
        left.append(dns_module.budget_left())
        return query(name, rdtype, lifetime)
    resolver.query = timed_query
    engine = Engine(make_config({"dns": {"timeout": 0.7}}), resolver)
    decision = engine.decide(make_request("2001:db8:6::25", PASSING_V6_SENDER,
                                          helo="mail6.other.example"))
    assert [c.identity for c in decision.spf] == ["helo", "mailfrom"]
    assert decision.iprev.result is IprevResult.PASS
    assert any(rdtype == "PTR" for _, rdtype in resolver.queries)
    assert len(left) == len(resolver.queries) and all(0 < s <= 0.7 for s in left)
    assert dns_module.budget_left() == float("inf")


def test_log_fields_name_the_relaxation():
    decision, _ = decide("192.168.1.10", "alice@own.example")
    fields = dict(decision.log_fields(make_request("192.168.1.10", "alice@own.example")))
    assert fields["action"] == "ACCEPT" and fields["rule"] == "nat.relaxed"
    assert fields["nat"] == "reevaluate:203.0.113.7"


def test_same_request_same_decision():
    # No state between requests: the engine is shared by every connection.
    engine = Engine(make_config({}), standard_world())
    request = make_request("192.0.2.1", "a@other.example")
    first, second = engine.decide(request), engine.decide(request)
    assert first == second


@pytest.mark.parametrize("odd_sender, helo, config", [
    pytest.param('"x@y"@own.example', "client.example", {}, id="quoted-local-part-with-at"),
    pytest.param("own", "own.example", {"spf": {"helo": {"check": False}}},
                 id="sender-without-at"),
])
def test_odd_sender_cannot_make_a_spoof_pass(odd_sender, helo, config):
    # One SMTP client, two transactions: an address pyspf reads differently
    # from the engine first, then a plain spoof of own.example.  The second
    # must fail as it would alone (SPF outcomes are memoized per engine).
    engine = Engine(make_config(config), standard_world())
    engine.decide(make_request("198.51.100.50", odd_sender, helo))
    spoof = engine.decide(make_request("198.51.100.50", "ceo@own.example", helo))
    assert spoof.action is Action.REJECT, "\n".join(spoof.trace)
    assert spoof.rule == "spf.mailfrom.fail"


def test_hostile_helo_and_sender_never_break_a_header():
    decision, _ = decide("192.0.2.1", "a@evil.example\r\nX-Injected: yes",
                         helo="evil\r\n.example; dkim=pass",
                         config={"headers": {"received_spf": True},
                                 "spf": {"mailfrom": {"on_none": "flag",
                                                      "on_malformed": "flag"}}})
    assert decision.action is Action.ACCEPT
    for header in decision.headers:
        assert "\r" not in str(header) and "\n" not in str(header)


# --- decide_message: DKIM at end of message ----------------------------------

def dkim(result, domain, selector="sel1"):
    return DkimCheck(DkimResult(result), domain, selector, "AbCdEfGh")


MESSAGE_CASES = [
    pytest.param("alice@own.example", "laptop.example", (dkim("pass", "own.example"),),
                 {}, "ACCEPT", None, "nat.relaxed", id="nat-aligned-dkim-pass"),
    pytest.param("alice@own.example", "laptop.example", (dkim("pass", "OWN.Example"),),
                 {}, "ACCEPT", None, "nat.relaxed", id="nat-aligned-dkim-pass-case"),
    pytest.param("alice@sub.own.example", "laptop.example", (dkim("pass", "own.example"),),
                 {}, "ACCEPT", None, "nat.relaxed", id="nat-dkim-parent-domain"),
    pytest.param("alice@own.example", "laptop.example", (), {}, "REJECT", ("550", "5.7.20"),
                 "nat.dkim-missing", id="nat-dkim-missing"),
    pytest.param("alice@own.example", "laptop.example", (dkim("pass", "other.example"),),
                 {}, "REJECT", ("550", "5.7.20"), "nat.dkim-missing", id="nat-dkim-unaligned"),
    pytest.param("alice@own.example", "laptop.example",
                 (dkim("pass", "evilown.example"),), {}, "REJECT", ("550", "5.7.20"),
                 "nat.dkim-missing", id="nat-dkim-lookalike"),
    pytest.param("alice@own.example", "laptop.example", (dkim("fail", "own.example"),),
                 {}, "REJECT", ("550", "5.7.20"), "nat.dkim-missing", id="nat-dkim-fail"),
    pytest.param("alice@own.example", "laptop.example", (),
                 {"milter": {"dkim": {"nat_requires_aligned_pass": "defer"}}},
                 "DEFER", ("451", "4.7.20"), "nat.dkim-missing", id="nat-dkim-missing-defer"),
    pytest.param("alice@own.example", "laptop.example", (),
                 {"milter": {"dkim": {"nat_requires_aligned_pass": "flag"}}},
                 "ACCEPT", None, "nat.dkim-missing", id="nat-dkim-missing-flag"),
    # Both identities relaxed (mail.own.example publishes an SPF record for
    # its HELO name, as RFC 7208 §2.3 recommends): the signature must align
    # with the MAIL FROM domain, whatever the HELO name is.
    pytest.param("alice@sub.own.example", "mail.own.example",
                 (dkim("pass", "sub.own.example"),), {}, "ACCEPT", None, "nat.relaxed",
                 id="nat-helo-and-mailfrom-relaxed-dkim-aligned-with-mailfrom"),
]


@pytest.mark.parametrize("sender, helo, dkim_checks, config, action, reply, rule",
                         MESSAGE_CASES)
def test_decide_message_under_nat_relaxation(sender, helo, dkim_checks, config, action,
                                             reply, rule):
    resolver = standard_world({"mail.own.example": {"TXT": "v=spf1 ip4:203.0.113.7 -all"}})
    engine = Engine(make_config(config), resolver)
    request = make_request("192.168.1.10", sender, helo)
    envelope = engine.decide(request)
    assert envelope.action is Action.ACCEPT and envelope.rule == "nat.relaxed"
    decision = engine.decide_message(request, envelope, dkim_checks)
    trace = "\n".join(decision.trace)
    assert decision.action is Action[action], trace
    assert decision.rule == rule, trace
    assert (decision.reply.code, decision.reply.status) == reply if reply else \
        decision.reply is None
    if decision.action is Action.ACCEPT:
        text = str(decision.headers[0])
        assert "policy.nat-relaxed" in text
        for check in dkim_checks:
            assert f"dkim={check.result.value}" in text


def test_decide_message_without_relaxation_needs_no_dkim():
    engine = Engine(make_config({}), standard_world())
    request = make_request("198.51.100.20", "a@other.example")
    decision = engine.decide_message(request, engine.decide(request), ())
    assert decision.action is Action.ACCEPT and decision.rule == "pass"


def test_decide_message_reports_dkim_in_the_header():
    engine = Engine(make_config({}), standard_world())
    request = make_request("198.51.100.20", "a@other.example")
    decision = engine.decide_message(request, engine.decide(request),
                                     (dkim("pass", "other.example"), dkim("fail", "x.example")))
    header = str(decision.headers[0])
    assert "spf=pass" in header
    assert "dkim=pass" in header and "header.d=other.example" in header
    assert "dkim=fail" in header and "header.d=x.example" in header


def test_decide_message_in_test_mode_accepts():
    engine = Engine(make_config({"test_mode": True}), standard_world())
    request = make_request("192.168.1.10", "alice@own.example")
    decision = engine.decide_message(request, engine.decide(request), ())
    assert decision.action is Action.ACCEPT and decision.reply is None
    assert decision.would is Action.REJECT and decision.rule == "nat.dkim-missing"
    assert decision.headers and "policy.nat-relaxed" in str(decision.headers[0])


def test_decide_message_keeps_an_exemption():
    # A SASL-authenticated submission is exempt at RCPT; adding DKIM
    # results at end of message must not turn it into something else.
    engine = Engine(make_config({}), standard_world())
    request = make_request("192.168.1.10", "alice@own.example", sasl_username="alice")
    envelope = engine.decide(request)
    decision = engine.decide_message(request, envelope, ())
    assert decision.action is Action.ACCEPT
    assert decision.rule == "sasl"


def test_shared_spf_outcomes_are_scoped_by_the_config():
    # A worker on another SPF or DNS config (after a reload) must not take
    # the outcomes the others share.
    same = [Engine(make_config({}), standard_world()).spf_memo._scope for _ in range(2)]
    other_spf = Engine(make_config({"spf": {"void_lookup_limit": 5}}), standard_world())
    other_dns = Engine(make_config({"dns": {"timeout": 3}}), standard_world())
    assert same[0] == same[1]
    assert len({same[0], other_spf.spf_memo._scope, other_dns.spf_memo._scope}) == 3
