"""The checks of each public address: a PTR that forward-confirms
(FCrDNS, RFC 8601 §3 "iprev").  Gmail and Outlook refuse mail from an
IPv6 address without one (550 5.7.1 ... cannot find your reverse
hostname)."""
from __future__ import annotations

import ipaddress

from ..model import IPAddress
from .findings import Finding, error, ok
from .lookups import Asker

IPV4_ONLY = ("or send mail over IPv4 only until it is fixed: in /etc/postfix/master.cf "
             "add `-o inet_protocols=ipv4` under the `smtp unix ... smtp` line, then "
             "`postfix reload`")


def check_address(asker: Asker, address: IPAddress, ptr_name: str) -> list[Finding]:
    """ptr_name: the host name the fix suggests (the MX host of the first
    own domain, or authserv_id)."""
    subject = str(address)
    reverse = address.reverse_pointer
    family = "AAAA" if address.version == 6 else "A"
    ptr = asker.ptr(reverse)
    advice = (f"ask the provider of {address} to set its PTR: {reverse}. PTR {ptr_name}. "
              f"(and publish {ptr_name}. {family} {address})")
    if address.version == 6:
        advice += "; " + IPV4_ONLY
    if ptr.failed:
        return [error("address", subject, "ptr",
                      f"cannot check: the PTR lookup failed ({ptr.reason})",
                      f"run `dig -x {address}`; the reverse zone's servers do not answer",
                      (ptr.evidence(),))]
    if not ptr.found:
        return [error("address", subject, "ptr",
                      f"no PTR for {address}: receivers refuse or mark mail from it "
                      "(iprev permerror)", advice, (ptr.evidence(),))]
    evidence = [ptr.evidence()]
    failed = None
    for name in ptr.records:
        forward = asker.ask(str(name), family)
        evidence.append(forward.evidence())
        if forward.failed:
            failed = forward
            continue
        if any(ipaddress.ip_address(r) == address for r in forward.records):
            return [ok("address", subject, "ptr", f"PTR {name} forward-confirms", evidence)]
    if failed is not None:
        return [error("address", subject, "ptr",
                      f"cannot check: {failed.rdtype} {failed.name} failed ({failed.reason})",
                      f"run `dig {failed.name} {failed.rdtype}`", evidence)]
    names = ", ".join(map(str, ptr.records))
    return [error("address", subject, "ptr",
                  f"PTR {names} does not resolve back to {address}: forward confirmation "
                  "fails (iprev fail)",
                  f"publish {ptr.records[0]}. {family} {address}, or have the provider point "
                  f"the PTR at a name that has it ({reverse}. PTR {ptr_name}.)"
                  + ("; " + IPV4_ONLY if address.version == 6 else ""), evidence)]
