"""The checks of each own domain: DNSSEC along the chain, MX, SPF (by
policyd's own SPF engine, for every public address), DMARC, DKIM
selectors, MTA-STS, TLS-RPT and TLSA."""
from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdata
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from ..checks import spf as spf_check
from ..config import SpfConfig
from ..dns import Lookups
from ..model import IPAddress, SpfResult
from ..signing import record as keyrecord
from ..signing.keys import KeyFileError, load_key, zone_line
from .findings import Finding, error, ok, warn
from .lookups import Answer, Asker
from .resolver import ResolverState

# Selectors tried when none is given: the usual defaults of signers
# (OpenDKIM's default, rspamd's dkim, Microsoft 365's selector1/2, ...).
COMMON_SELECTORS = ("default", "mail", "dkim", "selector1", "selector2", "s1", "s2")


@dataclass(frozen=True)
class DomainContext:
    asker: Asker
    resolver: Lookups
    spf_config: SpfConfig
    receiver: str
    public_addresses: tuple[IPAddress, ...]
    resolver_state: ResolverState
    selectors: tuple[str, ...] = ()
    # (domain, selector) -> private key file; domain "" for every domain.
    dkim_keys: dict[tuple[str, str], Path] = field(default_factory=dict)
    mta_sts_policy: str | None = None


def _failed(domain: str, check: str, answer: Answer, key: str = "") -> Finding:
    """A lookup that failed is a finding of its own, never a missing record."""
    fix = ("the zone's signatures do not validate: see the dnssec finding" if answer.bogus
           else f"the lookup failed; run `dig {answer.name} {answer.rdtype}` on this "
                "host, and check the zone's nameservers and the resolver")
    return error("domain", domain, check,
                 f"cannot check: {answer.rdtype} {answer.name} failed ({answer.reason})",
                 fix, (answer.evidence(),), key)


def check_domain(context: DomainContext, domain: str) -> list[Finding]:
    domain = domain.rstrip(".").lower()
    findings, usable, signed = check_dnssec(context, domain)
    if not usable:
        return findings
    mx_hosts, mx_findings = check_mx(context, domain)
    findings += mx_findings
    findings += check_spf(context, domain)
    findings += check_dmarc(context, domain)
    findings += check_dkim(context, domain)
    findings += check_mta_sts(context, domain, mx_hosts)
    findings += check_tls_rpt(context, domain)
    if signed:
        findings += check_tlsa(context, domain, mx_hosts)
    return findings


# --- DNSSEC -----------------------------------------------------------------

def _ds_records(domain: str, dnskeys: Answer) -> list[str]:
    """The DS records (SHA-256, RFC 4509) for the zone's key-signing keys."""
    records = []
    name = dns.name.from_text(domain)
    for text in dnskeys.records:
        try:
            key = dns.rdata.from_text("IN", "DNSKEY", str(text))
        except Exception:   # whatever dnspython cannot read is not a DS we can give
            continue
        if isinstance(key, DNSKEY) and key.flags & 0x0001:   # SEP: a key-signing key (RFC 4034 §2.1.1)
            records.append(f"{domain}. IN DS {dns.dnssec.make_ds(name, key, 'SHA256')}")
    return records


def _expired_signatures(records: tuple[str, ...]) -> str:
    """'its signatures expired on ...; ' when an RRSIG of the unchecked
    answer is past its expiration (RFC 4034 §3.1.5), else ''."""
    now = time.strftime("%Y%m%d%H%M%S", time.gmtime())
    for rrset in records:
        for line in rrset.splitlines():
            fields = line.split()
            # owner TTL class RRSIG type algorithm labels original-TTL expiration ...
            if len(fields) > 8 and fields[3] == "RRSIG" and fields[8] < now:
                stamp = fields[8]
                return (f"its signatures expired on {stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} "
                        f"{stamp[8:10]}:{stamp[10:12]} UTC; ")
    return ""


def check_dnssec(context: DomainContext, domain: str) -> tuple[list[Finding], bool, bool]:
    """(findings, whether the domain's other records can be had, signed)."""
    asker, state = context.asker, context.resolver_state
    soa = asker.ask(domain, "SOA")
    if soa.failed:
        if soa.bogus:
            expired = _expired_signatures(soa.unchecked)
            fix = (f"{expired}re-sign {domain} and reload the zone (expired or broken signatures), "
                   "and automate re-signing (knot or BIND automatic signing, or "
                   "`ldns-signzone` from cron before the signatures expire); check with "
                   f"`dig +dnssec {domain} SOA @<resolver>` and `dig +cd`; if the keys are "
                   f"lost, remove the DS of {domain} at the registrar and wait out its TTL")
            return [error("domain", domain, "dnssec",
                          "DNSSEC bogus: validating resolvers answer SERVFAIL for it, so "
                          "mail to it is deferred and its SPF and DMARC are temperror; "
                          "other checks skipped", fix, (soa.evidence(),))], False, False
        return [_failed(domain, "dnssec", soa)], False, False
    if soa.absent and soa.nxdomain:
        return [error("domain", domain, "exists", f"{domain} does not exist (NXDOMAIN)",
                      f"register or delegate {domain}, or remove it from nat.own_domains",
                      (soa.evidence(),))], False, False
    if soa.secure:
        ds = asker.ask(domain, "DS")
        return [ok("domain", domain, "dnssec",
                   "signed, validated along the chain from the trust anchor (DS at the parent)",
                   (soa.evidence(), ds.evidence()))], True, True
    if not state.trusted or not state.validates:
        return [warn("domain", domain, "dnssec",
                     "cannot tell whether it is signed: the resolver's AD bit is not usable "
                     "(see the resolver findings)", "fix the resolver findings first",
                     (soa.evidence(),))], True, False
    dnskey = asker.ask(domain, "DNSKEY")
    if dnskey.failed:
        return [_failed(domain, "dnssec", dnskey)], True, False
    if dnskey.found:
        ds_lines = _ds_records(domain, dnskey)
        return [error("domain", domain, "dnssec",
                      "signed, but no chain of trust: the parent has no DS for it, so "
                      "nobody can validate it",
                      "publish at the registrar (parent zone): " + "; ".join(ds_lines)
                      if ds_lines else "publish the DS of its key-signing key at the registrar",
                      (soa.evidence(), dnskey.evidence()))], True, False
    return [warn("domain", domain, "dnssec",
                 "not DNSSEC-signed: rules out DANE for mail to it (RFC 7672), and its "
                 "SPF, DKIM and DMARC records are not authenticated",
                 f"sign {domain} (your DNS host's DNSSEC switch, or knot/BIND automatic "
                 "signing) and publish its DS at the registrar",
                 (soa.evidence(), dnskey.evidence()))], True, False


# --- MX ---------------------------------------------------------------------

def check_mx(context: DomainContext, domain: str) -> tuple[list[str], list[Finding]]:
    asker = context.asker
    mx = asker.ask(domain, "MX")
    publics = {str(a) for a in context.public_addresses}
    suggested = f"mx.{domain}"
    if mx.failed:
        return [], [_failed(domain, "mx", mx)]
    if mx.absent:
        return [], [warn("domain", domain, "mx",
                         "no MX: senders fall back to its own A/AAAA (RFC 5321 §5.1)",
                         f"publish {domain}. MX 10 {suggested}. (and {suggested}'s A/AAAA: "
                         f"{', '.join(sorted(publics)) or 'your public addresses'})",
                         (mx.evidence(),))]
    records = sorted(mx.records)
    if records == [(0, "")] or records == [(0, ".")]:
        return [], [warn("domain", domain, "mx", "null MX: the domain accepts no mail "
                         "(RFC 7505)", f"remove the null MX of {domain} if it should "
                         "receive mail", (mx.evidence(),))]
    hosts = [host for _preference, host in records]
    findings, evidence, addresses = [], [mx.evidence()], set()
    for host in hosts:
        answers = [asker.ask(host, "A"), asker.ask(host, "AAAA")]
        evidence += [a.evidence() for a in answers]
        failed = [a for a in answers if a.failed]
        if failed:
            findings.append(_failed(domain, "mx", failed[0], key=host))
            continue
        found = {str(ipaddress.ip_address(r)) for a in answers for r in a.records}
        if not found:
            findings.append(error("domain", domain, "mx", f"MX host {host} has no address",
                                  f"publish {host}. A/AAAA "
                                  f"{', '.join(sorted(publics)) or '<its address>'}",
                                  evidence, key=host))
        addresses |= found
    if findings:
        return hosts, findings
    if publics and not addresses & publics:
        return hosts, [warn("domain", domain, "mx",
                            f"its MX hosts ({', '.join(hosts)}) do not resolve to a public "
                            "address of this server: is it served here?",
                            f"point {domain}'s MX at this server ({domain}. MX 10 "
                            f"{suggested}. with {suggested} A/AAAA {', '.join(sorted(publics))}),"
                            " or remove it from nat.own_domains", evidence)]
    return hosts, [ok("domain", domain, "mx",
                      f"MX {', '.join(hosts)} -> {', '.join(sorted(addresses))}", evidence)]


# --- SPF --------------------------------------------------------------------

def _is_spf(text: str) -> bool:
    # RFC 7208 §4.5: "v=spf1" exactly, then a space or the end.
    lowered = text.lower()
    return lowered == "v=spf1" or lowered.startswith("v=spf1 ")


def spf_with(record: str, address: IPAddress) -> str:
    """record with a mechanism for address before its `all` or `redirect=`."""
    mechanism = f"ip{address.version}:{address}"
    terms = record.split()
    for index, term in enumerate(terms):
        bare = term.lower().lstrip("+-~?")
        if bare == "all" or term.lower().startswith("redirect="):
            return " ".join(terms[:index] + [mechanism] + terms[index:])
    return " ".join(terms + [mechanism])


def check_spf(context: DomainContext, domain: str) -> list[Finding]:
    txt = context.asker.ask(domain, "TXT")
    publics = context.public_addresses
    fresh = " ".join(["v=spf1", *(f"ip{a.version}:{a}" for a in publics), "-all"])
    if txt.failed:
        return [_failed(domain, "spf", txt)]
    records = [t for t in txt.texts() if _is_spf(t)]
    if not records:
        return [error("domain", domain, "spf", "no SPF record: receivers cannot tell your "
                      "mail from forgeries (RFC 7208)",
                      f'publish {domain}. TXT "{fresh}"', (txt.evidence(),))]
    if len(records) > 1:
        return [error("domain", domain, "spf",
                      f"{len(records)} SPF records: every evaluation is permerror "
                      "(RFC 7208 §4.5)", f"merge them into one TXT record at {domain}",
                      (txt.evidence(),))]
    record = records[0]
    findings = []
    terms = [t.lower() for t in record.split()[1:]]
    alls = [t for t in terms if t.lstrip("+-~?") == "all"]
    if any(t in ("all", "+all") for t in alls):
        findings.append(error("domain", domain, "spf-all",
                              "the record ends in +all: it authorizes every host on the "
                              "internet", f'publish {domain}. TXT "'
                              + record.replace("+all", "-all").replace(" all", " -all") + '"',
                              (txt.evidence(),)))
    elif "?all" in alls:
        findings.append(warn("domain", domain, "spf-all",
                             "the record ends in ?all (neutral): forgeries are not failed",
                             f'publish {domain}. TXT "{record.replace("?all", "-all")}"',
                             (txt.evidence(),)))
    elif not alls and not any(t.startswith("redirect=") for t in terms):
        findings.append(warn("domain", domain, "spf-all",
                             "the record has no all: other hosts get neutral",
                             f'publish {domain}. TXT "{record} -all"', (txt.evidence(),)))
    for address in publics:
        # The engine that judges incoming mail, on this server's resolver:
        # what a receiver evaluating our mail from `address` gets.
        outcome = spf_check.evaluate(context.resolver, context.spf_config, address,
                                     f"postmaster@{domain}", domain, context.receiver)
        evidence = (txt.evidence(),
                    f"check_host({address}, {domain}) = {outcome.result.value}"
                    + (f" ({outcome.mechanism})" if outcome.mechanism else "")
                    + (f": {outcome.explanation}" if outcome.explanation
                       and outcome.result is not SpfResult.PASS else ""))
        key = str(address)
        if outcome.result is SpfResult.PASS:
            findings.append(ok("domain", domain, "spf",
                               f"SPF authorizes {address}", evidence, key=key))
        elif outcome.result is SpfResult.TEMPERROR:
            findings.append(error("domain", domain, "spf",
                                  f"cannot check {address}: a lookup failed (temperror)",
                                  "run the check again; if it persists, a domain the record "
                                  "includes does not answer", evidence, key=key))
        elif outcome.result is SpfResult.PERMERROR:
            findings.append(error("domain", domain, "spf",
                                  f"the record is broken (permerror) for {address}: "
                                  f"{outcome.explanation}",
                                  "correct the record: at most 10 DNS-querying terms "
                                  "(include, a, mx, ptr, exists, redirect) and at most 2 "
                                  "that find nothing (RFC 7208 §4.6.4); e.g. "
                                  f'{domain}. TXT "{fresh}"', evidence, key=key))
        else:
            findings.append(error("domain", domain, "spf",
                                  f"SPF does not authorize public address {address} "
                                  f"({outcome.result.value}): mail sent from it fails SPF",
                                  f'publish {domain}. TXT "{spf_with(record, address)}"',
                                  evidence, key=key))
    return findings


# --- DMARC ------------------------------------------------------------------

def _dmarc_tags(text: str) -> dict[str, str]:
    tags = {}
    for part in text.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            tags[name.strip().lower()] = value.strip()
    return tags


def _related(one: str, other: str) -> bool:
    """Same domain, or one under the other.  No public suffix list here,
    so a report address in a sibling subdomain is asked about too."""
    return one == other or one.endswith("." + other) or other.endswith("." + one)


def check_dmarc(context: DomainContext, domain: str) -> list[Finding]:
    asker = context.asker
    # RFC 7489 §6.6.3: no record at the domain, then the organizational
    # domain's applies; without a public suffix list, each parent with at
    # least two labels is tried.
    candidates = [domain]
    labels = domain.split(".")
    candidates += [".".join(labels[i:]) for i in range(1, len(labels) - 1)]
    evidence = []
    for candidate in candidates:
        answer = asker.ask(f"_dmarc.{candidate}", "TXT")
        evidence.append(answer.evidence())
        if answer.failed:
            return [_failed(domain, "dmarc", answer)]
        records = [t for t in answer.texts() if t.replace(" ", "").startswith("v=DMARC1")]
        if answer.absent or not records:
            continue
        if len(records) > 1:
            return [error("domain", domain, "dmarc", f"{len(records)} DMARC records at "
                          f"_dmarc.{candidate}: receivers ignore them all (RFC 7489 §6.6.3)",
                          f"keep one TXT record at _dmarc.{candidate}", evidence)]
        return _dmarc_record(context, domain, candidate, records[0], evidence)
    return [warn("domain", domain, "dmarc",
                 "no DMARC record: receivers cannot reject forgeries of it, and Gmail and "
                 "Yahoo require one of bulk senders",
                 f'publish _dmarc.{domain}. TXT "v=DMARC1; p=quarantine; '
                 f'rua=mailto:postmaster@{domain}" (p=none first if you want reports only)',
                 evidence)]


def _dmarc_record(context: DomainContext, domain: str, at: str, text: str,
                  evidence: list[str]) -> list[Finding]:
    tags = _dmarc_tags(text)
    policy = tags.get("sp", tags.get("p")) if at != domain else tags.get("p")
    where = "" if at == domain else f" (inherited from _dmarc.{at})"
    findings = []
    if policy not in ("none", "quarantine", "reject"):
        return [error("domain", domain, "dmarc", f"DMARC record without a valid p= "
                      f"(RFC 7489 §6.3){where}",
                      f'publish _dmarc.{at}. TXT "v=DMARC1; p=quarantine; '
                      f'rua=mailto:postmaster@{at}"', evidence)]
    if policy == "none":
        findings.append(warn("domain", domain, "dmarc",
                             f"DMARC policy none{where}: monitoring only, forgeries are "
                             "delivered", f"once the reports show your mail aligned, set p="
                             f"quarantine or p=reject in _dmarc.{at}", evidence))
    else:
        findings.append(ok("domain", domain, "dmarc", f"DMARC p={policy}{where}", evidence))
    for uri in tags.get("rua", "").split(","):
        uri = uri.strip()
        if not uri.lower().startswith("mailto:") or "@" not in uri:
            continue
        target = uri[7:].split("!", 1)[0].rsplit("@", 1)[1].rstrip(".").lower()
        if _related(target, at):
            continue
        # RFC 7489 §7.1: a report address outside the domain must consent.
        name = f"{at}._report._dmarc.{target}"
        answer = context.asker.ask(name, "TXT")
        if answer.failed:
            findings.append(_failed(domain, "dmarc-rua", answer, key=target))
        elif any(t.replace(" ", "").startswith("v=DMARC1") for t in answer.texts()):
            findings.append(ok("domain", domain, "dmarc-rua",
                               f"report address {uri[7:]} authorized", (answer.evidence(),),
                               key=target))
        else:
            findings.append(error("domain", domain, "dmarc-rua",
                                  f"aggregate reports go to {target}, which has not "
                                  "authorized them (RFC 7489 §7.1): none are sent",
                                  f'publish at {target}: {name}. TXT "v=DMARC1"',
                                  (answer.evidence(),), key=target))
    return findings


# --- DKIM -------------------------------------------------------------------

def _key_file(context: DomainContext, domain: str, selector: str) -> Path | None:
    return context.dkim_keys.get((domain, selector)) or context.dkim_keys.get(("", selector))


def check_dkim(context: DomainContext, domain: str) -> list[Finding]:
    selectors = list(dict.fromkeys(
        [*context.selectors, *(s for (d, s) in context.dkim_keys if d in ("", domain))]))
    findings = []
    if not selectors:
        found = []
        for selector in COMMON_SELECTORS:
            answer = context.asker.ask(f"{selector}._domainkey.{domain}", "TXT")
            if answer.found:
                found.append(selector)
        if not found:
            return [warn("domain", domain, "dkim",
                         "no DKIM selector given, none of the usual ones found",
                         "name your selector: policyd check --dkim-selector SELECTOR")]
        selectors = found
    for selector in selectors:
        findings += _check_selector(context, domain, selector)
    return findings


def _check_selector(context: DomainContext, domain: str, selector: str) -> list[Finding]:
    """The selector's record judged as `policyd dkim test` judges it
    (signing/record.py, judge), against the private key when there is one."""
    name = f"{selector}._domainkey.{domain}"
    answer = context.asker.ask(name, "TXT")
    key_path = _key_file(context, domain, selector)
    private = None
    if key_path is not None:
        try:
            # As the signer reads it: PEM or a dkimpy Ed25519 seed, and
            # refused when others may read it.
            private = load_key(str(key_path))
        except KeyFileError as failure:
            return [error("domain", domain, "dkim",
                          f"cannot use the private key: {failure}",
                          f"give a PEM private key readable by policyd alone (chmod 0600): "
                          f"--dkim-key {domain}:{selector}:FILE, or fix signing.table",
                          key=selector)]
    publish = (f"publish {zone_line(domain, selector, private.record())}"
               if private else
               f"publish the selector's key record at {name} (your signer prints it)")
    if answer.failed:
        return [_failed(domain, "dkim", answer, key=selector)]
    texts = answer.texts()
    evidence = (answer.evidence(),)
    judged = keyrecord.judge(texts, private)
    if judged.status == "missing" or answer.absent:
        return [error("domain", domain, "dkim", f"no key record for selector {selector}: "
                      "receivers fail its signatures", publish, evidence, key=selector)]
    if judged.status == "unusable":
        fix = publish
        if private is None and judged.record is not None and \
                0 < judged.record.key_bits < keyrecord.MIN_RSA_BITS:
            fix = "make a 2048-bit key and publish it under a new selector"
        return [error("domain", domain, "dkim",
                      f"selector {selector}: unusable key record: {'; '.join(judged.problems)}",
                      fix, evidence, key=selector)]
    if judged.status == "mismatch":
        return [error("domain", domain, "dkim",
                      f"selector {selector} publishes another key than {key_path} "
                      f"({'; '.join(judged.problems)}): every signature fails (dkim=fail)",
                      publish, evidence, key=selector)]
    found = judged.record
    assert found is not None   # match or usable: one record, read
    findings = []
    if found.key_type == "rsa" and found.key_bits < keyrecord.GOOD_RSA_BITS:
        findings.append(warn("domain", domain, "dkim",
                             f"selector {selector}: {found.key_bits}-bit RSA key "
                             "(RFC 8301 §3.2: SHOULD be 2048)",
                             "make a 2048-bit key and publish it under a new selector",
                             evidence, key=selector))
    if found.testing:
        findings.append(warn("domain", domain, "dkim-testing",
                             f"selector {selector} has t=y: verifiers may treat its "
                             "failures as unsigned mail (RFC 6376 §3.6.1)",
                             f"remove t=y from {name} once signing works", evidence,
                             key=selector))
    if not any(f.check == "dkim" for f in findings):
        matched = f", matches {key_path}" if private is not None else ""
        findings.insert(0, ok("domain", domain, "dkim",
                              f"selector {selector}: {found.key_type} "
                              f"{found.key_bits}-bit key{matched}", evidence, key=selector))
    return findings


# --- MTA-STS, TLS-RPT, TLSA -------------------------------------------------

_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def parse_sts_policy(text: str) -> dict[str, list[str]]:
    """RFC 8461 §3.2: key: value lines; mx may repeat."""
    policy: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            policy.setdefault(key.strip().lower(), []).append(value.strip())
    return policy


def sts_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: a literal name, or *.suffix matching one label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.count(".") >= 1 and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def check_mta_sts(context: DomainContext, domain: str, mx_hosts: list[str]) -> list[Finding]:
    answer = context.asker.ask(f"_mta-sts.{domain}", "TXT")
    if answer.failed:
        return [_failed(domain, "mta-sts", answer)]
    records = [t for t in answer.texts() if t.replace(" ", "").startswith("v=STSv1")]
    findings = []
    if not records:
        findings.append(ok("domain", domain, "mta-sts", "no MTA-STS record (optional, "
                           "RFC 8461)", (answer.evidence(),)))
    else:
        tags = _dmarc_tags(records[0])
        if len(records) > 1 or not _STS_ID.match(tags.get("id", "")):
            findings.append(error("domain", domain, "mta-sts",
                                  "MTA-STS record unusable (one record, with id= of 1 to 32 "
                                  "letters and digits, RFC 8461 §3.1)",
                                  f'publish _mta-sts.{domain}. TXT "v=STSv1; id=20260101T0000"'
                                  " (a new id each time the policy changes)",
                                  (answer.evidence(),)))
        else:
            findings.append(ok("domain", domain, "mta-sts", f"MTA-STS id={tags['id']}",
                               (answer.evidence(),)))
    if context.mta_sts_policy is not None and mx_hosts:
        policy = parse_sts_policy(context.mta_sts_policy)
        patterns = policy.get("mx", [])
        unmatched = [h for h in mx_hosts if not any(sts_matches(p, h) for p in patterns)]
        evidence = (f"policy mx: {', '.join(patterns) or '(none)'}",
                    f"MX hosts: {', '.join(mx_hosts)}")
        if policy.get("version") != ["STSv1"]:
            findings.append(error("domain", domain, "mta-sts-policy",
                                  "the MTA-STS policy has no version: STSv1 line",
                                  "begin the policy file with: version: STSv1", evidence))
        elif unmatched:
            lines = "\n".join(f"    mx: {h}" for h in mx_hosts)
            findings.append(error("domain", domain, "mta-sts-policy",
                                  f"the MTA-STS policy does not list MX {', '.join(unmatched)}: "
                                  "senders in enforce mode refuse to deliver there",
                                  f"list every MX in the policy file:\n{lines}\n"
                                  f"and change the id= of _mta-sts.{domain}", evidence))
        else:
            findings.append(ok("domain", domain, "mta-sts-policy",
                               "the MTA-STS policy lists every MX", evidence))
    return findings


def check_tls_rpt(context: DomainContext, domain: str) -> list[Finding]:
    answer = context.asker.ask(f"_smtp._tls.{domain}", "TXT")
    if answer.failed:
        return [_failed(domain, "tls-rpt", answer)]
    records = [t for t in answer.texts() if t.replace(" ", "").startswith("v=TLSRPTv1")]
    if not records:
        return [ok("domain", domain, "tls-rpt", "no TLS-RPT record (optional, RFC 8460)",
                   (answer.evidence(),))]
    tags = _dmarc_tags(records[0])
    if len(records) > 1 or not tags.get("rua"):
        return [warn("domain", domain, "tls-rpt", "TLS-RPT record without rua= "
                     "(RFC 8460 §3): no reports can be sent",
                     f'publish _smtp._tls.{domain}. TXT "v=TLSRPTv1; '
                     f'rua=mailto:tlsrpt@{domain}"', (answer.evidence(),))]
    return [ok("domain", domain, "tls-rpt", f"TLS-RPT rua={tags['rua']}", (answer.evidence(),))]


# RFC 7672 §3.1.3 (usages for SMTP) and RFC 6698 §2.1 (fields).
_TLSA_DIGEST_HEX = {1: 64, 2: 128}


def check_tlsa(context: DomainContext, domain: str, mx_hosts: list[str]) -> list[Finding]:
    findings = []
    for host in mx_hosts:
        name = f"_25._tcp.{host}"
        answer = context.asker.ask(name, "TLSA")
        if answer.failed:
            findings.append(_failed(domain, "tlsa", answer, key=host))
            continue
        if not answer.found:
            findings.append(ok("domain", domain, "tlsa", f"no TLSA for MX {host}: DANE not "
                               "used (optional, RFC 7672)", (answer.evidence(),), key=host))
            continue
        problems = []
        for text in answer.records:
            fields = str(text).split()
            try:
                usage, selector, matching = (int(f) for f in fields[:3])
                data = "".join(fields[3:])
            except ValueError:
                problems.append(f"unreadable: {text}")
                continue
            if usage in (0, 1):
                problems.append(f"usage {usage} (PKIX) is not for SMTP: use 3 (DANE-EE) or "
                                "2 (DANE-TA) (RFC 7672 §3.1.3)")
            elif usage not in (2, 3):
                problems.append(f"usage {usage} is undefined")
            if selector not in (0, 1):
                problems.append(f"selector {selector} is undefined (0 or 1)")
            if matching not in (0, 1, 2):
                problems.append(f"matching type {matching} is undefined (0, 1 or 2)")
            elif matching in _TLSA_DIGEST_HEX and len(data) != _TLSA_DIGEST_HEX[matching]:
                problems.append(f"matching type {matching} needs {_TLSA_DIGEST_HEX[matching]} "
                                f"hex digits, not {len(data)}")
        if problems:
            findings.append(error("domain", domain, "tlsa",
                                  f"TLSA for MX {host}: {'; '.join(problems)}",
                                  f"publish {name}. TLSA 3 1 1 <SHA-256 of the server key's "
                                  "SubjectPublicKeyInfo> (e.g. from `openssl x509 -pubkey "
                                  "-noout | openssl pkey -pubin -outform DER | sha256sum`)",
                                  (answer.evidence(),), key=host))
        elif not answer.secure:
            findings.append(error("domain", domain, "tlsa",
                                  f"TLSA for MX {host} is not authenticated: senders ignore it "
                                  "(RFC 7672 §2.2)", f"sign the zone of {host}",
                                  (answer.evidence(),), key=host))
        else:
            findings.append(ok("domain", domain, "tlsa", f"TLSA for MX {host} sane",
                               (answer.evidence(),), key=host))
    return findings
