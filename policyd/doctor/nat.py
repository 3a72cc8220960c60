"""NAT config sanity: networks and public addresses that contradict each
other or the address plan (RFC 1918, RFC 6598, RFC 4193)."""
from __future__ import annotations

import ipaddress

from ..config import NatConfig
from .findings import Finding, error, ok, warn

# Where inside networks live; a NAT network elsewhere is routable public
# space, where the relaxed SPF rule would trust strangers.
INSIDE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918
    "100.64.0.0/10",                                   # RFC 6598, carrier-grade NAT
    "169.254.0.0/16", "127.0.0.0/8",
    "fc00::/7", "fe80::/10", "::1/128"))               # RFC 4193 ULA, link-local


def _inside(network) -> bool:
    return any(network.version == n.version and network.subnet_of(n) for n in INSIDE)


def check_nat(nat: NatConfig, source: str = "nat") -> list[Finding]:
    findings = []
    subject = source
    for network in nat.networks:
        if not _inside(network):
            findings.append(warn(
                "nat", subject, "networks",
                f"nat.networks has {network}, routable public space: own-domain mail from "
                "anyone there gets the relaxed SPF rule",
                "list only your inside networks (RFC 1918, RFC 4193 ULA, RFC 6598) in "
                "nat.networks", key=str(network)))
    for address in nat.public_addresses:
        inside = [n for n in nat.networks
                  if n.version == address.version and address in n]
        if inside:
            findings.append(error(
                "nat", subject, "public-addresses",
                f"public address {address} is inside nat.networks {inside[0]}",
                f"remove {address} from nat.public_addresses or {inside[0]} from nat.networks",
                key=str(address)))
        elif _inside(ipaddress.ip_network(address)):
            findings.append(warn(
                "nat", subject, "public-addresses",
                f"public address {address} is a private address: receivers never see it",
                "list the address your mail leaves from, as receivers see it, in "
                "nat.public_addresses", key=str(address)))
    if nat.own_domains and not nat.public_addresses:
        findings.append(warn("nat", subject, "public-addresses",
                             "nat.own_domains without nat.public_addresses: the relaxed rule "
                             "has no address to evaluate as",
                             "set nat.public_addresses to the address(es) your mail leaves from"))
    if not findings:
        findings.append(ok("nat", subject, "config",
                           f"{len(nat.networks)} NAT networks inside, "
                           f"{len(nat.public_addresses)} public addresses outside them"))
    return findings
