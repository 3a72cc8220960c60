"""Postfix wiring, read with `postconf` (postconf(1)): policyd's
check_policy_service after the relay check and not behind a
permit_mynetworks that covers the NAT networks, and its milter in
smtpd_milters."""
from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

from ..config import Config
from .findings import Finding, error, ok, warn

POSTCONF_TIMEOUT = 10.0
RELAY_CHECKS = ("reject_unauth_destination", "defer_unauth_destination")


@dataclass(frozen=True)
class PostfixSettings:
    recipient: tuple[str, ...]
    relay: tuple[str, ...]
    milters: tuple[str, ...]
    mynetworks: tuple[str, ...]


def restriction_items(value: str) -> tuple[str, ...]:
    """A restriction list as its items; `check_policy_service { ... }` and
    `check_policy_service inet:...` are one item each (Postfix 3.0's
    braces group a service's settings)."""
    tokens, depth, current = [], 0, ""
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        if depth == 0 and (char in ", \t\n"):
            if current:
                tokens.append(current)
            current = ""
            continue
        current += char
    if current:
        tokens.append(current)
    items: list[str] = []
    for token in tokens:
        if items and items[-1].startswith("check_") and " " not in items[-1] \
                and not token.startswith(("check_", "permit", "reject", "defer", "warn_")):
            items[-1] += " " + token   # the argument of check_*_access/service
        else:
            items.append(token)
    return tuple(items)


def _service_of(item: str) -> str:
    argument = item.split(None, 1)[1] if " " in item else ""
    return argument.strip("{} ").split(",", 1)[0].strip()


def postfix_forms(listen: str) -> set[str]:
    """The spellings Postfix may use for one of policyd's listen addresses."""
    kind, _, rest = listen.partition(":")
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        hosts = {host, host.strip("[]")}
        if host in ("127.0.0.1", "[::1]"):
            hosts.add("localhost")
        return {f"inet:{h}:{port}" for h in hosts}
    if kind == "unix":
        names = {f"unix:{rest}"}
        if "/private/" in rest or "/policyd/" in rest:
            names.add(f"unix:private/{rest.rsplit('/', 1)[1]}")
        return names
    return {listen}


def milter_forms(listen: str) -> set[str]:
    """libmilter's inet:PORT@HOST as Postfix writes it (inet:HOST:PORT)."""
    kind, _, rest = listen.partition(":")
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        host = host or "127.0.0.1"
        return {f"inet:{host}:{port}", f"inet:[{host}]:{port}", f"{kind}:{host}:{port}"}
    if kind in ("unix", "local"):
        return {f"unix:{rest}", f"unix:private/{rest.rsplit('/', 1)[1]}"}
    return {listen}


def read_postfix(config_dir: str | None) -> PostfixSettings | str:
    """The settings, or a one-line reason they could not be read."""
    postconf = shutil.which("postconf", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if postconf is None:
        return "postconf not found"
    values = {}
    for name in ("smtpd_recipient_restrictions", "smtpd_relay_restrictions",
                 "smtpd_milters", "mynetworks"):
        command = [postconf, *(["-c", config_dir] if config_dir else []), "-h", "-x", name]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=POSTCONF_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as failure:
            return f"{' '.join(command)}: {failure.__class__.__name__}"
        if done.returncode != 0:
            lines = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()
            return f"{' '.join(command)}: {lines[-1]}"
        values[name] = done.stdout.strip()
    return PostfixSettings(restriction_items(values["smtpd_recipient_restrictions"]),
                           restriction_items(values["smtpd_relay_restrictions"]),
                           restriction_items(values["smtpd_milters"]),
                           tuple(values["mynetworks"].replace(",", " ").split()))


def _networks(entries: tuple[str, ...]):
    for entry in entries:
        text = entry.replace("[", "").replace("]", "")
        try:
            yield entry, ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue   # a table or a host name: not judged


def _line(name: str, items: list[str]) -> str:
    return f"{name} = {', '.join(items)}"


def check_postfix(config: Config, config_dir: str | None) -> list[Finding]:
    subject = config_dir or "/etc/postfix"
    settings = read_postfix(config_dir)
    if isinstance(settings, str):
        if config_dir is None and ("postconf not found" in settings
                                   or "No such file" in settings):
            # No Postfix here (another MTA, or policyd on a host of its own).
            return [ok("postfix", subject, "wiring",
                       f"Postfix wiring not checked: {settings.rsplit(': ', 1)[-1]}")]
        return [error("postfix", subject, "wiring", f"cannot read Postfix settings: {settings}",
                      "give the Postfix config directory: policyd check --postfix-config DIR")]
    findings = []
    policy_names = set().union(*(postfix_forms(listen) for listen in config.policy.listen))
    example = f"check_policy_service {{ {sorted(policy_names)[0]}, timeout=30s, " \
              "default_action=DUNNO }"
    lists = {"smtpd_recipient_restrictions": list(settings.recipient),
             "smtpd_relay_restrictions": list(settings.relay)}
    placed = [(name, items, index) for name, items in lists.items()
              for index, item in enumerate(items)
              if item.startswith("check_policy_service") and _service_of(item) in policy_names]
    evidence = tuple(_line(name, items) for name, items in lists.items())
    if not placed:
        findings.append(error(
            "postfix", subject, "policy-service",
            f"policyd is never asked: no check_policy_service for "
            f"{', '.join(sorted(policy_names))}",
            "in main.cf: " + _line("smtpd_recipient_restrictions",
                                   [*(lists["smtpd_recipient_restrictions"] or
                                      ["permit_mynetworks", "permit_sasl_authenticated",
                                       "reject_unauth_destination"]), example])
            + "; then `postfix reload`", evidence))
    for name, items, index in placed:
        relay_before = any(item in RELAY_CHECKS for item in items[:index])
        relay_in_relay_list = name == "smtpd_recipient_restrictions" and any(
            item in RELAY_CHECKS for item in settings.relay)
        if not relay_before and not relay_in_relay_list:
            rest = [item for i, item in enumerate(items) if i != index]
            after = next((i for i, item in enumerate(rest) if item in RELAY_CHECKS), None)
            if after is None:
                rest.append("reject_unauth_destination")
                after = len(rest) - 1
            corrected = rest[:after + 1] + [items[index]] + rest[after + 1:]
            findings.append(error(
                "postfix", subject, "policy-order",
                f"check_policy_service comes before reject_unauth_destination in {name}: "
                "a policy answer of OK there would relay for anyone",
                f"in main.cf: {_line(name, corrected)}; then `postfix reload`", evidence))
            continue
        covering = []
        if "permit_mynetworks" in items[:index]:
            for entry, network in _networks(settings.mynetworks):
                covering += [(entry, nat) for nat in config.nat.networks
                             if nat.version == network.version and nat.overlaps(network)]
        if covering:
            kept = [e for e in settings.mynetworks if e not in {c[0] for c in covering}]
            findings.append(error(
                "postfix", subject, "mynetworks",
                f"permit_mynetworks comes before policyd in {name} and mynetworks covers "
                f"NAT network {covering[0][1]} ({covering[0][0]}): policyd never sees "
                "mail from it",
                f"in main.cf: {_line('mynetworks', kept or ['127.0.0.0/8', '[::1]/128'])} "
                f"(NAT networks out), or move {items[index].split()[0]} before "
                "permit_mynetworks and keep the relay check in "
                "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
                "reject_unauth_destination; then `postfix reload`",
                (*evidence, _line("mynetworks", list(settings.mynetworks)))))
            continue
        findings.append(ok("postfix", subject, "policy-service",
                           f"{name} asks policyd after the relay check", evidence))
    milter_names = milter_forms(config.milter.listen)
    milters = (_line("smtpd_milters", list(settings.milters)),)
    if any(m.strip("{} ").split(",", 1)[0].strip() in milter_names for m in settings.milters):
        findings.append(ok("postfix", subject, "milter", "smtpd_milters has policyd's milter",
                           milters))
    elif config.milter.dkim.verify:
        wanted = sorted(milter_names)[0]
        findings.append(warn(
            "postfix", subject, "milter",
            "smtpd_milters lacks policyd's milter: no DKIM verification, and own-domain mail "
            "through the NAT rule cannot be held to an aligned DKIM pass",
            "in main.cf: " + _line("smtpd_milters", [*settings.milters, wanted])
            + "; then `postfix reload`", milters))
    return findings
