"""The doctor's checks on a fake resolver: each good case, its planted
fault with the exact fix, and a failed lookup never reported as a missing
record."""
from __future__ import annotations

import io
import ipaddress
import json

import pytest

from policyd.config import NatConfig, SpfConfig
from policyd.doctor import command, domains
from policyd.doctor.addresses import check_address
from policyd.doctor.domains import DomainContext, spf_with
from policyd.doctor.findings import Finding, Status, error, exit_status, ok, warn
from policyd.doctor.lookups import Asker, Outcome
from policyd.doctor.nat import check_nat
from policyd.doctor.resolver import ResolverState
from tests.unit.fakedns import FakeResolver

V4 = ipaddress.ip_address("203.0.113.10")
V6 = ipaddress.ip_address("2001:db8:10::10")
REV6 = V6.reverse_pointer


def asker(zone, **kwargs) -> Asker:
    return Asker(FakeResolver(zone, **kwargs), ("127.0.0.1",), 53, 2.0, progress=None,
                 diagnose=False)


def context(zone, **kwargs) -> DomainContext:
    ask = asker(zone, **kwargs)
    return DomainContext(ask, ask.resolver, SpfConfig(), "mx.own.example", (V4, V6),
                         ResolverState(True, True), selectors=())


def statuses(findings: list[Finding]) -> list[tuple[str, Status]]:
    return [(f.check, f.status) for f in findings]


def test_ask_has_three_outcomes():
    ask = asker({"a.example": {"TXT": "x"}, "b.example": {"A": "192.0.2.1"}},
                temp_errors=[("c.example", "TXT")])
    assert ask.ask("a.example", "TXT").outcome is Outcome.FOUND
    absent = ask.ask("b.example", "TXT")
    assert absent.outcome is Outcome.ABSENT and not absent.nxdomain
    assert ask.ask("nothing.example", "TXT").nxdomain
    failed = ask.ask("c.example", "TXT")
    assert failed.outcome is Outcome.FAILED and "SERVFAIL" in failed.reason


SPF_BOTH = "v=spf1 ip4:203.0.113.10 ip6:2001:db8:10::10 -all"


def test_spf_authorizes_both_addresses():
    found = domains.check_spf(context({"own.example": {"TXT": SPF_BOTH}}), "own.example")
    assert statuses(found) == [("spf", Status.OK), ("spf", Status.OK)]


def test_spf_missing_the_ipv6_address_says_the_record_to_publish():
    found = domains.check_spf(context({"own.example": {"TXT": "v=spf1 ip4:203.0.113.10 -all"}}),
                              "own.example")
    assert statuses(found) == [("spf", Status.OK), ("spf", Status.ERROR)]
    assert found[1].key == "2001:db8:10::10"
    assert found[1].fix == ('publish own.example. TXT '
                            '"v=spf1 ip4:203.0.113.10 ip6:2001:db8:10::10 -all"')


def test_spf_is_evaluated_by_the_engine_through_includes():
    zone = {"own.example": {"TXT": "v=spf1 include:out.example -all"},
            "out.example": {"TXT": "v=spf1 ip4:203.0.113.0/24 ip6:2001:db8::/32 ~all"}}
    assert statuses(domains.check_spf(context(zone), "own.example")) == [
        ("spf", Status.OK), ("spf", Status.OK)]


def test_spf_failed_lookup_is_not_a_missing_record():
    found = domains.check_spf(context({}, temp_errors=[("own.example", "TXT")]), "own.example")
    assert statuses(found) == [("spf", Status.ERROR)]
    assert "cannot check" in found[0].summary and "no SPF record" not in found[0].summary


def test_spf_absent_permissive_and_too_many_lookups():
    absent = domains.check_spf(context({"own.example": {"A": "192.0.2.1"}}), "own.example")
    assert "no SPF record" in absent[0].summary
    assert absent[0].fix == ('publish own.example. TXT '
                             '"v=spf1 ip4:203.0.113.10 ip6:2001:db8:10::10 -all"')
    plus = domains.check_spf(context({"own.example": {"TXT": "v=spf1 +all"}}), "own.example")
    assert plus[0].check == "spf-all" and plus[0].status is Status.ERROR
    assert '"v=spf1 -all"' in plus[0].fix
    neutral = domains.check_spf(context({"own.example": {"TXT": SPF_BOTH.replace("-all", "?all")}}),
                                "own.example")
    assert neutral[0].check == "spf-all" and neutral[0].status is Status.WARN
    zone = {"own.example": {"TXT": "v=spf1 " + " ".join(f"a:h{i}.example" for i in range(11))
                            + " -all"}}
    zone.update({f"h{i}.example": {"A": "192.0.2.1"} for i in range(11)})
    many = domains.check_spf(context(zone), "own.example")
    assert {f.status for f in many} == {Status.ERROR}
    assert "permerror" in many[0].summary and "10" in many[0].fix


def test_spf_with_inserts_before_all_or_redirect():
    assert spf_with("v=spf1 mx ~all", V6) == "v=spf1 mx ip6:2001:db8:10::10 ~all"
    assert spf_with("v=spf1 redirect=x.example", V4) == "v=spf1 ip4:203.0.113.10 redirect=x.example"
    assert spf_with("v=spf1 mx", V4) == "v=spf1 mx ip4:203.0.113.10"


def test_dmarc_present_missing_inherited_and_rua_authorization():
    good = {"_dmarc.own.example": {"TXT": "v=DMARC1; p=reject"}}
    assert statuses(domains.check_dmarc(context(good), "own.example")) == [("dmarc", Status.OK)]
    missing = domains.check_dmarc(context({}), "own.example")
    assert statuses(missing) == [("dmarc", Status.WARN)]
    assert missing[0].fix.startswith('publish _dmarc.own.example. TXT "v=DMARC1; p=quarantine;')
    inherited = domains.check_dmarc(context({"_dmarc.own.example": {
        "TXT": "v=DMARC1; p=none; sp=reject"}}), "sub.own.example")
    assert inherited[0].status is Status.OK and "inherited" in inherited[0].summary
    outside = {"_dmarc.own.example": {"TXT": "v=DMARC1; p=reject; rua=mailto:r@reports.example"}}
    found = domains.check_dmarc(context(outside), "own.example")
    assert statuses(found) == [("dmarc", Status.OK), ("dmarc-rua", Status.ERROR)]
    assert found[1].fix == ('publish at reports.example: '
                            'own.example._report._dmarc.reports.example. TXT "v=DMARC1"')
    outside["own.example._report._dmarc.reports.example"] = {"TXT": "v=DMARC1"}
    assert statuses(domains.check_dmarc(context(outside), "own.example"))[1] == (
        "dmarc-rua", Status.OK)
    failed = domains.check_dmarc(context({}, temp_errors=[("_dmarc.own.example", "TXT")]),
                                 "own.example")
    assert "cannot check" in failed[0].summary


def test_dkim_selector_checks(tmp_path):
    import os

    from policyd.signing import keys

    def key(bits):
        return keys.generate("rsa", bits)

    (signing, pem), (other, _), (weak, _) = key(2048), key(2048), key(1024)
    path = tmp_path / "signing.pem"
    path.write_bytes(pem)
    os.chmod(path, 0o600)

    def run(record, keys=None, selectors=("mail",), texts=None):
        zone = ({"mail._domainkey.own.example": {"TXT": texts or [_strings(record)]}}
                if record or texts else {})
        base = context(zone)
        ctx = DomainContext(base.asker, base.resolver, base.spf_config, base.receiver,
                            base.public_addresses, base.resolver_state, selectors, keys or {})
        return domains.check_dkim(ctx, "own.example")

    assert statuses(run(signing.record(), {("", "mail"): path})) == [("dkim", Status.OK)]
    mismatch = run(other.record(), {("own.example", "mail"): path})
    assert statuses(mismatch) == [("dkim", Status.ERROR)]
    assert signing.record()[:60] in mismatch[0].fix.replace('" "', "")
    assert statuses(run(weak.record())) == [("dkim", Status.WARN)]
    testing = run(signing.record().replace("v=DKIM1;", "v=DKIM1; t=y;"))
    assert statuses(testing) == [("dkim", Status.OK), ("dkim-testing", Status.WARN)]
    assert statuses(run(None)) == [("dkim", Status.ERROR)]
    assert statuses(run(None, selectors=())) == [("dkim", Status.WARN)]
    assert "--dkim-selector" in run(None, selectors=())[0].fix
    # The same judgement as `policyd dkim test`: two records at the name,
    # a revoked key, an s= not for email are each an error.
    two = run(None, {("", "mail"): path}, texts=[_strings(signing.record()), ("v=spf1 -all",)])
    assert statuses(two) == [("dkim", Status.ERROR)] and "2 TXT records" in two[0].summary
    revoked = run("v=DKIM1; p=")
    assert statuses(revoked) == [("dkim", Status.ERROR)] and "revoked" in revoked[0].summary
    assert statuses(run(signing.record() + "; s=tlsrpt")) == [("dkim", Status.ERROR)]
    # A key file others may read is refused, as the signer refuses it.
    os.chmod(path, 0o644)
    opened = run(signing.record(), {("", "mail"): path})
    assert statuses(opened) == [("dkim", Status.ERROR)]
    assert "open to every user" in opened[0].summary and "0600" in opened[0].fix


def _strings(record: str) -> tuple[str, ...]:
    return tuple(record[i:i + 250] for i in range(0, len(record), 250))


def test_ptr_confirmed_missing_and_unconfirmed():
    zone = {REV6: {"PTR": "mx.own.example"}, "mx.own.example": {"AAAA": str(V6)}}
    assert statuses(check_address(asker(zone), V6, "mx.own.example")) == [("ptr", Status.OK)]
    missing = check_address(asker({}), V6, "mx.own.example")
    assert statuses(missing) == [("ptr", Status.ERROR)] and "no PTR" in missing[0].summary
    assert f"{REV6}. PTR mx.own.example." in missing[0].fix
    assert "inet_protocols=ipv4" in missing[0].fix
    zone["mx.own.example"] = {"AAAA": "2001:db8:10::99"}
    unconfirmed = check_address(asker(zone), V6, "mx.own.example")
    assert "does not resolve back" in unconfirmed[0].summary
    assert "publish mx.own.example. AAAA 2001:db8:10::10" in unconfirmed[0].fix
    failed = check_address(asker({}, temp_errors=[(REV6, "PTR")]), V6, "mx.own.example")
    assert "cannot check" in failed[0].summary and "no PTR" not in failed[0].summary


def test_nat_sanity():
    net = ipaddress.ip_network
    good = NatConfig(("own.example",), (net("192.168.1.0/24"), net("fd00::/8")), (V4, V6))
    assert statuses(check_nat(good)) == [("config", Status.OK)]
    bad = NatConfig(("own.example",), (net("198.51.100.0/24"), net("192.168.1.0/24")),
                    (ipaddress.ip_address("192.168.1.5"), ipaddress.ip_address("10.0.0.1")))
    assert statuses(check_nat(bad)) == [("networks", Status.WARN),
                                        ("public-addresses", Status.ERROR),
                                        ("public-addresses", Status.WARN)]


def test_sts_mx_patterns():
    assert domains.sts_matches("*.own.example", "mx.own.example")
    assert not domains.sts_matches("*.own.example", "a.mx.own.example")
    assert not domains.sts_matches("*.own.example", "own.example")
    assert domains.sts_matches("MX.own.example.", "mx.own.example")


def test_exit_status_follows_the_worst_finding():
    assert exit_status([]) == 0
    assert exit_status([ok("domain", "d", "x", "")]) == 0
    assert exit_status([ok("domain", "d", "x", ""), warn("domain", "d", "y", "", "f")]) == 1
    assert exit_status([warn("domain", "d", "y", "", "f"), error("address", "a", "z", "", "f")]) == 2


def test_output_text_colour_and_json():
    findings = [ok("resolver", "127.0.0.1:53", "validates", "fine"),
                error("domain", "own.example", "spf", "bad \x1b[2J", "publish this",
                      ("TXT own.example: x",), key="2001:db8::1")]
    plain = command.render_text(findings, colour=False)
    assert "\x1b" not in plain and "\\x1b[2J" in plain   # DNS data cannot drive the terminal
    assert "  ERROR spf" in plain and "fix: publish this" in plain
    assert plain.index("resolver 127.0.0.1:53") < plain.index("domain own.example")
    assert "\x1b[31mERROR" in command.render_text(findings, colour=True)
    data = json.loads(command.render_json(findings))
    assert data["exit"] == 2 and data["status"] == "error"
    assert data["findings"][1] == {
        "id": "domain/own.example/spf/2001:db8::1", "group": "domain",
        "subject": "own.example", "check": "spf", "status": "error",
        "summary": "bad \x1b[2J", "evidence": ["TXT own.example: x"], "fix": "publish this"}


def test_slow_lookups_are_announced(monkeypatch):
    from policyd.doctor import lookups
    monkeypatch.setattr(lookups, "SLOW_AFTER", 0.01)
    stream = io.StringIO()

    class Slow(FakeResolver):
        def query(self, name, rdtype, lifetime=None):
            import time
            time.sleep(0.1)
            return super().query(name, rdtype, lifetime)
    ask = Asker(Slow({}), ("127.0.0.1",), 53, 2.0, progress=stream, diagnose=False)
    ask.ask("own.example", "MX")
    assert "waiting for MX own.example (at most 2 s, dns.timeout)" in stream.getvalue()


def test_bad_arguments_are_one_line_usage_errors(tmp_path, capsys):
    import argparse
    config = tmp_path / "policyd.yaml"
    config.write_text("nat: {own_domains: [own.example], networks: [192.168.1.0/24], "
                      "public_addresses: [203.0.113.10]}\n")
    args = argparse.Namespace(config=str(config), domains=[], address=["not-an-ip"],
                              dkim_selector=[], json=False)
    assert command.run(args) == command.EX_USAGE
    assert capsys.readouterr().err == "policyd: check: --address 'not-an-ip' is not an IP address\n"
    args = argparse.Namespace(config=str(config), domains=[], address=[], dkim_selector=[],
                              json=False, dkim_key=["nofile"])
    assert command.run(args) == command.EX_USAGE
    assert "expected [DOMAIN:]SELECTOR:FILE" in capsys.readouterr().err


@pytest.mark.parametrize("value, items", [
    ("permit_mynetworks, reject_unauth_destination, check_policy_service "
     "{ inet:127.0.0.1:10023, timeout=30s, default_action=DUNNO }",
     ("permit_mynetworks", "reject_unauth_destination",
      "check_policy_service { inet:127.0.0.1:10023, timeout=30s, default_action=DUNNO }")),
    ("check_policy_service inet:127.0.0.1:10023 permit",
     ("check_policy_service inet:127.0.0.1:10023", "permit")),
    ("", ()),
])
def test_restriction_items(value, items):
    from policyd.doctor.postfix import restriction_items
    assert restriction_items(value) == items
