"""`policyd check`: gather the findings for the deployment the config
describes, print them (a table grouped by resolver / domain / address /
nat / postfix, colour only on a terminal; or JSON), exit by the worst.

Exit status: 0 all ok, 1 warnings, 2 errors; 64 (EX_USAGE) for a bad
argument; a bad config is the CLI's exit 78.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from ..config import Config, normalize_address
from ..dns import Resolver
from ..model import IPAddress
from ..runtime.engines import load_config
from . import resolver as resolver_checks
from .addresses import check_address
from .domains import DomainContext, check_domain
from .findings import GROUPS, Finding, Status, exit_status, printable
from .lookups import Asker
from .nat import check_nat
from .postfix import check_postfix

EX_USAGE = 64   # sysexits.h
EX_SOFTWARE = 70

_COLOURS = {Status.OK: "\033[32m", Status.WARN: "\033[33m", Status.ERROR: "\033[31m"}
_RESET = "\033[0m"


class UsageError(Exception):
    """A bad argument: one line, exit 64."""


def _addresses(values: list[str], config: Config) -> tuple[IPAddress, ...]:
    if not values:
        return config.nat.public_addresses
    addresses = []
    for value in values:
        try:
            addresses.append(normalize_address(ipaddress.ip_address(value.strip("[]"))))
        except ValueError:
            raise UsageError(f"--address {value!r} is not an IP address") from None
    return tuple(addresses)


def _dkim_keys(values: list[str]) -> dict[tuple[str, str], Path]:
    """--dkim-key [DOMAIN:]SELECTOR:FILE"""
    keys = {}
    for value in values:
        parts = value.split(":", 2)
        if len(parts) == 2:
            parts = ["", *parts]
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UsageError(f"--dkim-key {value!r}: expected [DOMAIN:]SELECTOR:FILE")
        keys[(parts[0].rstrip(".").lower(), parts[1])] = Path(parts[2])
    return keys


def signing_keys(config: Config) -> dict[tuple[str, str], Path]:
    """The keys policyd signs with (signing.table): (d=, s=) -> key file,
    so that `policyd check` holds each signing selector's record against
    the key that signs, as `policyd dkim test` does."""
    return {(line.signing_domain, line.selector): Path(line.key_file)
            for line in config.signing.table}


def default_domains(config: Config) -> list[str]:
    """nat.own_domains, then each signing domain not among them: a domain
    policyd signs for is an own domain too."""
    domains = [d.rstrip(".").lower() for d in config.nat.own_domains]
    for line in config.signing.table:
        if line.signing_domain not in domains:
            domains.append(line.signing_domain)
    return domains


def _mta_sts_policy(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as failure:
        raise UsageError(f"--mta-sts-policy {path}: {failure.strerror}") from None


def gather(config: Config, domains: list[str], addresses: tuple[IPAddress, ...],
           selectors: tuple[str, ...] = (), dkim_keys: dict | None = None,
           mta_sts_policy: str | None = None, postfix_config: str | None = None,
           signed_name: str = resolver_checks.SIGNED_NAME,
           bogus_name: str = resolver_checks.BOGUS_NAME,
           progress: TextIO | None = sys.stderr) -> list[Finding]:
    """Every finding, in the order printed."""
    resolver = Resolver(config.dns)
    asker = Asker.for_resolver(resolver, progress)
    findings: list[Finding] = []
    # Each part waits at most dns.timeout for answers that do not come
    # (policyd.dns.budget): a dead resolver costs each part that much.
    with resolver.budget():
        found, state = resolver_checks.check_resolver(
            asker, resolver.trusted, resolver.trust_reason, signed_name, bogus_name)
    findings += found
    context = DomainContext(asker, resolver, config.spf, config.authserv_id or "localhost",
                            addresses, state, selectors, dict(dkim_keys or {}),
                            mta_sts_policy)
    for domain in domains:
        with resolver.budget():
            findings += check_domain(context, domain)
    ptr_name = _ptr_name(asker, domains, config)
    for address in addresses:
        with resolver.budget():
            findings += check_address(asker, address, ptr_name)
    findings += check_nat(config.nat, config.source)
    findings += check_postfix(config, postfix_config)
    return findings


def _ptr_name(asker: Asker, domains: list[str], config: Config) -> str:
    """The name a PTR fix suggests: the first domain's first MX host."""
    if domains:
        mx = asker.ask(domains[0], "MX")
        if mx.found:
            host = sorted(mx.records)[0][1]
            if host and host != ".":
                return host
        return f"mx.{domains[0]}"
    return config.authserv_id or "mx.example.org"


def render_text(findings: list[Finding], colour: bool) -> str:
    lines = []
    for group in GROUPS:
        subjects = list(dict.fromkeys(f.subject for f in findings if f.group == group))
        for subject in subjects:
            lines.append(f"{group} {printable(subject)}")
            for finding in (f for f in findings if f.group == group and f.subject == subject):
                word = finding.status.name
                shown = f"{_COLOURS[finding.status]}{word:<5}{_RESET}" if colour \
                    else f"{word:<5}"
                lines.append(f"  {shown} {finding.check:<15} {printable(finding.summary)}")
                if finding.status is not Status.OK:
                    for evidence in finding.evidence:
                        lines.append(f"        {'':<15} asked: {printable(evidence)}")
                    fix_lines = finding.fix.splitlines() or [""]
                    lines.append(f"        {'':<15} fix: {printable(fix_lines[0])}")
                    lines += [f"        {'':<15}      {printable(x)}" for x in fix_lines[1:]]
            lines.append("")
    counts = {status: sum(1 for f in findings if f.status is status) for status in Status}
    lines.append(f"{counts[Status.OK]} ok, {counts[Status.WARN]} warnings, "
                 f"{counts[Status.ERROR]} errors")
    return "\n".join(lines) + "\n"


def render_json(findings: list[Finding]) -> str:
    return json.dumps({"findings": [f.as_json() for f in findings],
                       "status": ("ok", "warn", "error")[exit_status(findings)],
                       "exit": exit_status(findings)}, indent=2) + "\n"


def run(args) -> int:
    """The CLI's entry: args.config, domains, address, dkim_selector, json,
    and, when the CLI has them, dkim_key, postfix_config, mta_sts_policy,
    probe_signed, probe_bogus."""
    config = load_config(args.config)   # ConfigError: the CLI's exit 78
    try:
        addresses = _addresses(list(args.address or []), config)
        # --dkim-key adds to the signing table's keys (and wins for its selector).
        keys = {**signing_keys(config),
                **_dkim_keys(list(getattr(args, "dkim_key", None) or []))}
        policy = _mta_sts_policy(getattr(args, "mta_sts_policy", None))
    except UsageError as failure:
        print(f"policyd: check: {failure}", file=sys.stderr)
        return EX_USAGE
    # DOMAIN arguments narrow the run to those; the default is every own domain.
    domains = ([d.rstrip(".").lower() for d in args.domains] if args.domains
               else default_domains(config))
    if not domains and not addresses:
        print("policyd: check: no domain to check: name one, or set nat.own_domains "
              "or signing.table",
              file=sys.stderr)
        return EX_USAGE
    try:
        findings = gather(config, domains, addresses,
                          tuple(args.dkim_selector or ()), keys, policy,
                          getattr(args, "postfix_config", None),
                          getattr(args, "probe_signed", None) or resolver_checks.SIGNED_NAME,
                          getattr(args, "probe_bogus", None) or resolver_checks.BOGUS_NAME)
    except KeyboardInterrupt:
        print("policyd: check: interrupted", file=sys.stderr)
        return 130
    except Exception as failure:   # a bug of ours: one line, never a traceback
        print(f"policyd: check: internal error: {failure.__class__.__name__}: "
              f"{printable(str(failure))}", file=sys.stderr)
        return EX_SOFTWARE
    if args.json:
        sys.stdout.write(render_json(findings))
    else:
        colour = sys.stdout.isatty() and os.environ.get("NO_COLOR", "") == "" \
            and os.environ.get("TERM") != "dumb"
        sys.stdout.write(render_text(findings, colour))
    return exit_status(findings)
