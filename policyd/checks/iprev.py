"""iprev (RFC 8601 §3): a PTR name whose forward lookup gives the address back."""
from __future__ import annotations

import ipaddress

from ..dns import DnsTempError, Lookups, query_all
from ..model import IPAddress, IprevCheck, IprevResult

# RFC 8601 §3 leaves the count open; like SPF's ptr mechanism (RFC 7208
# §5.5) we look at no more than 10 PTR names.
MAX_PTR_NAMES = 10


def from_mta(client_name: str, reverse_client_name: str) -> IprevCheck:
    """Use what Postfix already found (client_name is forward-confirmed)."""
    if client_name and client_name != "unknown":
        return IprevCheck(IprevResult.PASS, client_name)
    if reverse_client_name and reverse_client_name != "unknown":
        return IprevCheck(IprevResult.FAIL, reverse_client_name,
                          "PTR not confirmed by forward lookup")
    return IprevCheck(IprevResult.PERMERROR, "", "no PTR")


def lookup(resolver: Lookups, address: IPAddress) -> IprevCheck:
    """Our own PTR lookup plus forward confirmation."""
    try:
        ptr = resolver.ptr(address)
    except DnsTempError:
        return IprevCheck(IprevResult.TEMPERROR, "", "PTR lookup failed")
    if not ptr.records:
        # RFC 8601 §2.7.3: permerror when no PTR is published.
        return IprevCheck(IprevResult.PERMERROR, "", "no PTR", ptr.secure)
    rdtype = "AAAA" if address.version == 6 else "A"
    first_name, temporary = ptr.records[0], False
    names = ptr.records[:MAX_PTR_NAMES]
    # The names' forward lookups at once: their waits do not add up.
    for name, forward in zip(names, query_all(resolver, [(n, rdtype) for n in names])):
        if isinstance(forward, DnsTempError):
            temporary = True
            continue
        if any(ipaddress.ip_address(a) == address for a in forward.records):
            return IprevCheck(IprevResult.PASS, name, "", ptr.secure and forward.secure)
    if temporary:
        return IprevCheck(IprevResult.TEMPERROR, first_name, "forward lookup failed")
    return IprevCheck(IprevResult.FAIL, first_name,
                      "PTR not confirmed by forward lookup", ptr.secure)
