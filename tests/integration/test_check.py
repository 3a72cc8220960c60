"""`policyd check` against the real DNSSEC chain of
tests/integration/dnssec_chain.py (nsd behind a validating unbound with
the test trust anchor): the chain itself, the clean domain with only OK
lines, every planted fault with its fix, a resolver that does not
validate, one that is not on a trusted path (in a network namespace of
the test's own), one that does not answer, the Postfix wiring through
`postconf -c`, the CLI's JSON and exit status."""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyd.checks import spf as spf_check
from policyd.config import DnsConfig, SpfConfig
from policyd.dns import DnsTempError, Resolver
from policyd.doctor import command
from policyd.doctor.findings import Finding, Status
from policyd.model import SpfResult
from tests.integration import dnssec_chain as chain_module
from tests.integration.dnssec_chain import (BOGUS_NAME, CLEAN_DOMAIN, DKIM_SELECTOR,
                                            NO_PTR_ADDRESS, PUBLIC_ADDRESSES, SIGNED_NAME,
                                            UNCONFIRMED_PTR_ADDRESS, Chain, NetworkNamespace,
                                            start_chain, start_resolver, write_config)
from tests.integration.dnsworld import ScriptedServer

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("clean", "nov6spf", "dkimbad", "nodmarc", "expired", "unsigned")


def private_keys(chain: Chain) -> Chain:
    """The chain's key files as an admin keeps them, and as policyd reads
    them: a key others may read is refused (policyd.signing.keys.load_key)."""
    for path in chain.signed.dkim_keys.values():
        os.chmod(path, 0o600)
    return chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    started = private_keys(start_chain(tmp_path_factory.mktemp("chain")))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def plain_resolver(chain) -> chain_module.Server:
    """unbound without its validator, in front of the same nsd."""
    server = start_resolver(chain.signed, chain.nsd, chain_module.PLAIN_RESOLVER_ADDRESS,
                            validating=False, name="plain")
    yield server
    server.stop()


@pytest.fixture
def postfix_dir(tmp_path) -> Path:
    """A Postfix config directory wired as contrib/postfix/main.cf.tcp says."""
    directory = tmp_path / "postfix"
    directory.mkdir()
    (directory / "master.cf").write_text("")
    (directory / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        "mynetworks = 127.0.0.0/8 [::1]/128\n"
        "smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated,\n"
        "    reject_unauth_destination,\n"
        "    check_policy_service { inet:127.0.0.1:10023, timeout=30s, default_action=DUNNO }\n"
        "smtpd_milters = inet:127.0.0.1:10025\n")
    return directory


def dkim_keys(chain: Chain) -> list[str]:
    return [f"{name}.chain.example:{DKIM_SELECTOR}:{chain.dkim_key(name)}" for name in DOMAINS]


def check(chain: Chain, config: Path, domains=(), addresses=(), postfix: Path | None = None,
          keys: list[str] | None = None, selectors=(DKIM_SELECTOR,),
          **extra) -> tuple[int, list[Finding]]:
    """`policyd check` in this process: its exit status and findings."""
    findings: list[Finding] = []
    real_gather = command.gather

    def gather(*args, **kwargs):
        findings.extend(real_gather(*args, **kwargs))
        return findings
    args = argparse.Namespace(
        config=str(config), domains=list(domains), address=list(addresses),
        dkim_selector=list(selectors), json=True,
        dkim_key=dkim_keys(chain) if keys is None else keys,
        probe_signed=SIGNED_NAME, probe_bogus=BOGUS_NAME,
        postfix_config=str(postfix) if postfix else None, mta_sts_policy=None, **extra)
    command.gather = gather
    try:
        status = command.run(args)
    finally:
        command.gather = real_gather
    return status, findings


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.status is not Status.OK]


# --- the chain itself ---------------------------------------------------------

def test_the_chain_authenticates_signed_zones_only_and_fails_the_bogus_one(chain):
    resolver = Resolver(DnsConfig(nameservers=(ipaddress.ip_address(chain.resolver.address),),
                                  port=chain.resolver.port, timeout=2.0))
    assert resolver.query(CLEAN_DOMAIN, "TXT").secure            # anchor -> DS -> DNSKEY
    assert resolver.query("_dmarc.nodmarc.chain.example", "TXT").secure   # NXDOMAIN proven
    unsigned = resolver.query("unsigned.chain.example", "TXT")
    assert unsigned.records and not unsigned.secure
    with pytest.raises(DnsTempError):
        resolver.query("expired.chain.example", "TXT")
    # What incoming mail gets: the bogus domain's SPF is temperror, never pass.
    outcome = spf_check.evaluate(resolver, SpfConfig(), ipaddress.ip_address("203.0.113.10"),
                                 "a@expired.chain.example", "mx.example", "mx.test")
    assert outcome.result is SpfResult.TEMPERROR and not outcome.secure
    signed = spf_check.evaluate(resolver, SpfConfig(), ipaddress.ip_address("203.0.113.10"),
                                f"a@{CLEAN_DOMAIN}", "mx.example", "mx.test")
    assert signed.result is SpfResult.PASS and signed.secure


# --- the clean deployment -----------------------------------------------------

def test_the_clean_domain_gets_only_ok_lines(chain, tmp_path, postfix_dir):
    status, findings = check(chain, write_config(tmp_path / "policyd.yaml", chain.resolver),
                             postfix=postfix_dir)
    assert problems(findings) == []
    assert status == 0
    checks = {(f.group, f.check) for f in findings}
    for expected in [("resolver", "validates"), ("resolver", "trusted-path"),
                     ("domain", "dnssec"), ("domain", "mx"), ("domain", "spf"),
                     ("domain", "dmarc"), ("domain", "dkim"), ("domain", "mta-sts"),
                     ("domain", "tls-rpt"), ("domain", "tlsa"), ("address", "ptr"),
                     ("nat", "config"), ("postfix", "policy-service"), ("postfix", "milter")]:
        assert expected in checks
    spf = [f for f in findings if f.check == "spf"]
    assert sorted(f.key for f in spf) == sorted(PUBLIC_ADDRESSES)   # IPv4 and IPv6
    dkim = next(f for f in findings if f.check == "dkim")
    assert "matches" in dkim.summary


# --- each planted fault, with its fix -----------------------------------------

def only_problem(findings: list[Finding]) -> Finding:
    found = problems(findings)
    assert len(found) == 1, [f.summary for f in found]
    return found[0]


def test_spf_missing_the_ipv6_address(chain, tmp_path):
    status, findings = check(chain, write_config(tmp_path / "p.yaml", chain.resolver),
                             domains=["nov6spf.chain.example"])
    finding = only_problem(findings)
    assert (finding.check, finding.key, finding.status) == ("spf", "2001:db8:10::10", Status.ERROR)
    assert finding.fix == ('publish nov6spf.chain.example. TXT '
                           '"v=spf1 ip4:203.0.113.10 ip6:2001:db8:10::10 -all"')
    assert status == 2


def test_dkim_key_mismatch(chain, tmp_path):
    _, findings = check(chain, write_config(tmp_path / "p.yaml", chain.resolver),
                        domains=["dkimbad.chain.example"])
    finding = only_problem(findings)
    assert (finding.check, finding.status) == ("dkim", Status.ERROR)
    assert "another key" in finding.summary
    from policyd.signing.keys import load_key
    wanted = load_key(str(chain.dkim_key("dkimbad"))).record()
    assert finding.fix.startswith("publish mail._domainkey.dkimbad.chain.example. IN TXT ")
    assert wanted in finding.fix.replace('" "', "")


def signing_config(chain: Chain, path: Path, names: tuple[str, ...],
                   own_domains: tuple[str, ...] = (CLEAN_DOMAIN,)) -> Path:
    """A config whose signing.table signs each NAME.chain.example with
    selector mail and the chain's key for it."""
    lines = "".join(f"    - {{match: {name}.chain.example, selector: {DKIM_SELECTOR}, "
                    f"key_file: {chain.dkim_key(name)}}}\n" for name in names)
    return write_config(path, chain.resolver, own_domains,
                        extra="milter: {dkim: {nat_requires_aligned_pass: flag}}\n"
                              f"signing:\n  table:\n{lines}")


def test_the_signing_tables_keys_are_checked_without_dkim_key(chain, tmp_path):
    """With signing configured, each signing selector is held against its
    key, and a signing domain outside nat.own_domains is checked too."""
    config = signing_config(chain, tmp_path / "p.yaml", ("clean", "dkimbad"))
    status, findings = check(chain, config, keys=[], selectors=())
    dkim = {f.subject: f for f in findings if f.check == "dkim"}
    assert set(dkim) == {CLEAN_DOMAIN, "dkimbad.chain.example"}
    clean = dkim[CLEAN_DOMAIN]
    assert clean.status is Status.OK
    assert clean.summary.endswith(f"matches {chain.dkim_key('clean')}")
    bad = dkim["dkimbad.chain.example"]
    assert bad.status is Status.ERROR and bad.key == DKIM_SELECTOR
    assert f"another key than {chain.dkim_key('dkimbad')}" in bad.summary
    assert status == 2
    # Without the table, nothing says which key signs: no match is claimed.
    plain = write_config(tmp_path / "plain.yaml", chain.resolver)
    _, findings = check(chain, plain, keys=[], selectors=())
    assert [f.subject for f in findings if f.check == "dkim"] == [CLEAN_DOMAIN]
    assert "matches" not in next(f for f in findings if f.check == "dkim").summary


def test_dkim_key_adds_to_the_signing_table(chain, tmp_path):
    config = signing_config(chain, tmp_path / "p.yaml", ("clean",))
    flag = [f"dkimbad.chain.example:{DKIM_SELECTOR}:{chain.dkim_key('dkimbad')}"]
    _, findings = check(chain, config, domains=[CLEAN_DOMAIN, "dkimbad.chain.example"],
                        keys=flag, selectors=())
    dkim = {f.subject: f for f in findings if f.check == "dkim"}
    assert dkim[CLEAN_DOMAIN].status is Status.OK
    assert str(chain.dkim_key("clean")) in dkim[CLEAN_DOMAIN].summary
    assert dkim["dkimbad.chain.example"].status is Status.ERROR
    assert str(chain.dkim_key("dkimbad")) in dkim["dkimbad.chain.example"].summary
    # DOMAIN arguments narrow the run: the table's other domains wait.
    _, findings = check(chain, signing_config(chain, tmp_path / "q.yaml", ("clean", "dkimbad")),
                        domains=[CLEAN_DOMAIN], keys=[], selectors=())
    assert {f.subject for f in findings if f.check == "dkim"} == {CLEAN_DOMAIN}


def test_dmarc_missing(chain, tmp_path):
    status, findings = check(chain, write_config(tmp_path / "p.yaml", chain.resolver),
                             domains=["nodmarc.chain.example"])
    finding = only_problem(findings)
    assert (finding.check, finding.status) == ("dmarc", Status.WARN)
    assert finding.fix.startswith('publish _dmarc.nodmarc.chain.example. TXT "v=DMARC1; ')
    assert status == 1


def test_bogus_signature(chain, tmp_path):
    _, findings = check(chain, write_config(tmp_path / "p.yaml", chain.resolver),
                        domains=["expired.chain.example"])
    finding = only_problem(findings)
    assert (finding.check, finding.status) == ("dnssec", Status.ERROR)
    assert "bogus" in finding.summary
    assert "EDE" in finding.evidence[0]   # the resolver's RFC 8914 reason
    assert finding.fix.startswith("its signatures expired on 2020-02-01 00:00 UTC; "
                                  "re-sign expired.chain.example")


def test_unsigned_own_domain(chain, tmp_path):
    _, findings = check(chain, write_config(tmp_path / "p.yaml", chain.resolver),
                        domains=["unsigned.chain.example"])
    finding = only_problem(findings)
    assert (finding.check, finding.status) == ("dnssec", Status.WARN)
    assert "DANE" in finding.summary
    assert "publish its DS at the registrar" in finding.fix
    assert not any(f.check == "tlsa" for f in findings)   # no DANE on an unsigned zone


def test_no_ptr_and_ptr_not_confirming(chain, tmp_path):
    _, findings = check(chain, write_config(tmp_path / "p.yaml", chain.resolver),
                        addresses=[NO_PTR_ADDRESS, UNCONFIRMED_PTR_ADDRESS, "203.0.113.10"])
    by_address = {f.subject: f for f in findings if f.group == "address"}
    missing = by_address[NO_PTR_ADDRESS]
    assert missing.status is Status.ERROR and "no PTR" in missing.summary
    reverse = ipaddress.ip_address(NO_PTR_ADDRESS).reverse_pointer
    assert f"{reverse}. PTR mx.clean.chain.example." in missing.fix
    assert "-o inet_protocols=ipv4" in missing.fix
    unconfirmed = by_address[UNCONFIRMED_PTR_ADDRESS]
    assert unconfirmed.status is Status.ERROR and "does not resolve back" in unconfirmed.summary
    assert "publish mx.clean.chain.example. AAAA 2001:db8:10::30" in unconfirmed.fix
    assert by_address["203.0.113.10"].status is Status.OK


def test_resolver_not_validating(chain, plain_resolver, tmp_path):
    status, findings = check(chain, write_config(tmp_path / "p.yaml", plain_resolver))
    validates = next(f for f in findings if f.check == "validates")
    assert validates.status is Status.ERROR
    assert "does not validate" in validates.summary
    assert 'module-config: "validator iterator"' in validates.fix
    assert "unbound-anchor" in validates.fix
    dnssec = next(f for f in findings if f.check == "dnssec")
    assert dnssec.status is Status.WARN and "cannot tell" in dnssec.summary
    assert status == 2


def test_a_resolver_that_never_answers_costs_bounded_time_and_fails_not_misses(tmp_path):
    silent = ScriptedServer(lambda query, number: []).start()
    try:
        config = tmp_path / "p.yaml"
        config.write_text(
            f"dns: {{nameservers: [127.0.0.1], port: {silent.port}, timeout: 0.5}}\n"
            "nat: {own_domains: [own.example], networks: [192.168.1.0/24],\n"
            "      public_addresses: [203.0.113.10]}\n")
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from policyd.doctor.command import gather; "
             "from policyd.runtime.engines import load_config; import ipaddress; "
             f"f = gather(load_config({str(config)!r}), ['own.example'], "
             "(ipaddress.ip_address('203.0.113.10'),), postfix_config=None, "
             "signed_name='chain.example', bogus_name='expired.chain.example'); "
             "print('\\n'.join(x.status.value + ' ' + x.summary for x in f))"],
            capture_output=True, text=True, cwd=REPO, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        silent.stop()
    assert result.returncode == 0, result.stderr
    assert elapsed < 8, elapsed
    out = result.stdout
    assert "does not answer (TIMEOUT)" in out
    assert "cannot check: SOA own.example failed (no answer within dns.timeout (0.5 s))" in out
    assert "cannot check: the PTR lookup failed" in out
    assert "no PTR" not in out and "no SPF" not in out and "no DMARC" not in out
    assert "waiting for" in result.stderr   # said what it waited for


def test_resolver_not_on_a_trusted_path(tmp_path_factory, tmp_path):
    """A validating unbound in a network namespace of the test's own, on a
    198.18.x address: it sets AD, policyd ignores it (no trust-ad), and
    the doctor says so with the fix."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    namespace = NetworkNamespace.create()
    try:
        remote = private_keys(start_chain(tmp_path_factory.mktemp("netns-chain"),
                                          netns=namespace))
        try:
            status, findings = check(remote, write_config(tmp_path / "p.yaml", remote.resolver))
            # policyd's own resolver: AD set on the wire, not believed.
            resolver = Resolver(DnsConfig(
                nameservers=(ipaddress.ip_address(remote.resolver.address),),
                port=remote.resolver.port, timeout=2.0))
            assert not resolver.query(CLEAN_DOMAIN, "TXT").secure
        finally:
            remote.stop()
    finally:
        namespace.delete()
    assert namespace.name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                text=True).stdout
    validates = next(f for f in findings if f.check == "validates")
    assert validates.status is Status.OK and "(AD)" in validates.summary
    trusted = next(f for f in findings if f.check == "trusted-path")
    assert trusted.status is Status.WARN
    assert "the resolver sets AD, policyd ignores it" in trusted.summary
    assert 'dns: {trust_ad: "yes"}' in trusted.fix and "nameservers: [127.0.0.1]" in trusted.fix
    assert status == 1


# --- Postfix wiring -------------------------------------------------------------

def test_postfix_misplacements_get_the_corrected_line(chain, tmp_path, postfix_dir):
    config = write_config(tmp_path / "p.yaml", chain.resolver)
    main = postfix_dir / "main.cf"
    main.write_text(
        "compatibility_level = 3.6\n"
        "smtpd_relay_restrictions =\n"
        "mynetworks = 127.0.0.0/8 192.168.0.0/16\n"
        "smtpd_recipient_restrictions = permit_mynetworks,\n"
        "    check_policy_service { inet:127.0.0.1:10023, timeout=30s }, "
        "reject_unauth_destination\n")
    _, findings = check(chain, config, postfix=postfix_dir)
    wiring = {f.check: f for f in findings if f.group == "postfix"}
    assert wiring["policy-order"].status is Status.ERROR
    assert wiring["policy-order"].fix == (
        "in main.cf: smtpd_recipient_restrictions = permit_mynetworks, "
        "reject_unauth_destination, check_policy_service { inet:127.0.0.1:10023, "
        "timeout=30s }; then `postfix reload`")
    assert wiring["milter"].status is Status.WARN
    assert "smtpd_milters = inet:127.0.0.1:10025" in wiring["milter"].fix

    main.write_text(
        "compatibility_level = 3.6\n"
        "mynetworks = 127.0.0.0/8 192.168.0.0/16\n"
        "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,\n"
        "    check_policy_service inet:127.0.0.1:10023\n"
        "smtpd_milters = inet:127.0.0.1:10025\n")
    _, findings = check(chain, config, postfix=postfix_dir)
    wiring = {f.check: f for f in findings if f.group == "postfix"}
    assert wiring["mynetworks"].status is Status.ERROR
    assert "192.168.1.0/24" in wiring["mynetworks"].summary
    assert wiring["mynetworks"].fix.startswith("in main.cf: mynetworks = 127.0.0.0/8 ")

    main.write_text("compatibility_level = 3.6\nsmtpd_recipient_restrictions = "
                    "reject_unauth_destination\n")
    _, findings = check(chain, config, postfix=postfix_dir)
    never = next(f for f in findings if f.check == "policy-service")
    assert never.status is Status.ERROR and "never asked" in never.summary
    assert "check_policy_service { inet:127.0.0.1:10023" in never.fix


# --- the CLI --------------------------------------------------------------------

def test_cli_json_and_exit_status(chain, tmp_path, postfix_dir):
    config = write_config(tmp_path / "p.yaml", chain.resolver)
    base = [sys.executable, "-m", "policyd", "check", "-c", str(config),
            "--dkim-selector", DKIM_SELECTOR]
    help_text = subprocess.run([*base[:4], "--help"], capture_output=True, text=True,
                               cwd=REPO).stdout
    if "--probe-signed" not in help_text:
        pytest.skip("policyd/cli.py does not have check --probe-signed yet "
                    "(/tmp/prompts/requests-h4.md)")
    probes = ["--probe-signed", SIGNED_NAME, "--probe-bogus", BOGUS_NAME,
              "--postfix-config", str(postfix_dir)]
    clean = subprocess.run([*base, *probes, "--json"], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    data = json.loads(clean.stdout)
    assert clean.returncode == 0 == data["exit"], clean.stdout
    assert {f["status"] for f in data["findings"]} == {"ok"}
    assert all(set(f) >= {"id", "status", "evidence", "fix"} for f in data["findings"])
    ids = [f["id"] for f in data["findings"]]
    assert len(ids) == len(set(ids))
    assert f"domain/{CLEAN_DOMAIN}/spf/2001:db8:10::10" in ids

    faults = subprocess.run([*base, *probes, "nov6spf.chain.example", "nodmarc.chain.example"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert faults.returncode == 2
    assert "Traceback" not in faults.stderr
    assert "\033[" not in faults.stdout   # no colour off a terminal
    lines = faults.stdout.splitlines()
    assert "domain nov6spf.chain.example" in lines
    assert any(line.startswith("  ERROR spf ") for line in lines)
    assert any(line.startswith("  WARN  dmarc ") for line in lines)
    assert any('fix: publish nov6spf.chain.example. TXT "v=spf1 ip4:203.0.113.10 '
               'ip6:2001:db8:10::10 -all"' in line for line in lines)

    bad = subprocess.run([*base, "--address", "nonsense"], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 64
    assert bad.stderr == "policyd: check: --address 'nonsense' is not an IP address\n"
