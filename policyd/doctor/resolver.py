"""The resolver checks: does each nameserver validate DNSSEC, and does
policyd trust the path to it (RFC 6840 §5.7: a stub believes AD only from
a resolver it trusts the path to)?"""
from __future__ import annotations

from dataclasses import dataclass

from .findings import Finding, error, ok, warn
from .lookups import Asker

# Real-world probes: the root zone is signed (its SOA validates against
# the root trust anchor), and dnssec-failed.org is kept deliberately bogus
# by Comcast for exactly this test.
SIGNED_NAME = "."
BOGUS_NAME = "dnssec-failed.org"

UNBOUND_FIX = """\
make the resolver validate; for unbound, in /etc/unbound/unbound.conf.d/policyd.conf:
    server:
        module-config: "validator iterator"
        auto-trust-anchor-file: "/var/lib/unbound/root.key"
        ede: yes
        val-log-level: 2
then run: unbound-anchor -a /var/lib/unbound/root.key; unbound-checkconf && systemctl restart unbound"""

TRUST_FIX = """\
policyd ignores the AD bit of a resolver it cannot trust the path to (RFC 6840 §5.7).
Best: run a validating unbound on this host and set in policyd.yaml
    dns: {nameservers: [127.0.0.1]}
or, if the path to the resolver is protected (same host, IPsec, WireGuard), say so in policyd.yaml:
    dns: {trust_ad: "yes"}
(or, with dns.nameservers empty, add `options trust-ad` to /etc/resolv.conf)"""


@dataclass(frozen=True)
class ResolverState:
    """What the domain checks need to know of the resolver."""
    trusted: bool          # policyd believes its AD bit
    validates: bool        # it validated both probes


def check_resolver(asker: Asker, trusted: bool, trust_reason: str,
                   signed_name: str = SIGNED_NAME,
                   bogus_name: str = BOGUS_NAME) -> tuple[list[Finding], ResolverState]:
    findings: list[Finding] = []
    validates = True
    subject = ", ".join(f"{server}:{asker.port}" for server in asker.nameservers)
    any_ad = False
    for server in asker.nameservers:
        where = f"{server}:{asker.port}"
        signed = asker.raw(signed_name, "SOA", server=server)
        bogus = asker.raw(bogus_name, "SOA", server=server)
        evidence = (signed.evidence(signed_name, "SOA"), bogus.evidence(bogus_name, "SOA"))
        if signed.rcode in ("TIMEOUT",) or signed.rcode.startswith("ERROR"):
            validates = False
            findings.append(error(
                "resolver", subject, "answers",
                f"{where} does not answer ({signed.rcode})",
                f"start the resolver, or correct dns.nameservers / dns.port in policyd.yaml "
                f"(now {where})", evidence, key=server))
            continue
        if bogus.answered:
            validates = False
            findings.append(error(
                "resolver", subject, "validates",
                f"{where} does not validate DNSSEC: it answers {bogus_name}, whose "
                "signatures are broken", UNBOUND_FIX, evidence, key=server))
            continue
        if not signed.ad:
            validates = False
            findings.append(error(
                "resolver", subject, "validates",
                f"{where} does not authenticate the signed {signed_name} (no AD): "
                "no validator or no trust anchor", UNBOUND_FIX, evidence, key=server))
            continue
        if bogus.rcode != "SERVFAIL":
            validates = False
            findings.append(warn(
                "resolver", subject, "validates",
                f"{where}: {bogus_name} gave {bogus.rcode}, not SERVFAIL: cannot tell "
                "whether it rejects bogus answers", UNBOUND_FIX, evidence, key=server))
            continue
        any_ad = True
        findings.append(ok(
            "resolver", subject, "validates",
            f"{where} validates: {signed_name} authenticated (AD), "
            f"{bogus_name} refused (SERVFAIL)", evidence, key=server))
    if trusted:
        findings.append(ok("resolver", subject, "trusted-path",
                           f"policyd trusts its AD bit: {trust_reason}"))
    else:
        said = ("; the resolver sets AD, policyd ignores it" if any_ad else "")
        findings.append(warn(
            "resolver", subject, "trusted-path",
            f"policyd does not trust its AD bit ({trust_reason}){said}: every result is "
            "'without dnssec'", TRUST_FIX))
    return findings, ResolverState(trusted=trusted, validates=validates)
