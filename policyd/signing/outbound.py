"""Which mail is outbound, so ours to sign: a pure function of what the
milter knows.  Mail from a client policyd did not authorize to relay is
never signed, whatever it claims: a signature is our word for the message.
"""
from __future__ import annotations

import enum

from ..config import Config
from ..model import IPAddress, domain_matches, in_networks


class Origin(enum.StrEnum):
    RELAY = "relay"   # an authorized relay client: SASL, relay network, certificate
    NAT = "nat"       # a client in nat.networks: own-domain From only


def origin(authorized_by: str, client_address: IPAddress | None,
           config: Config) -> Origin | None:
    """At RCPT, once the envelope is accepted: may this client's mail be
    signed at all?  `authorized_by` is how the engine authorized the
    client to relay ("sasl", "network", "certificate"), "" when it did
    not.  None: never sign (the usual case, inbound mail, costs nothing
    more).  Mail without a client address (Postfix's non_smtpd_milters,
    local submission) is not an SMTP client's: it needs a relay
    authorization like any other."""
    if not config.signing.table:
        return None
    if authorized_by:
        return Origin.RELAY
    if (config.signing.nat_own_domains and client_address is not None
            and config.nat.own_domains and in_networks(client_address, config.nat.networks)):
        return Origin.NAT
    return None


def may_sign(origin: Origin, from_domain: str, own_domains: tuple[str, ...]) -> bool:
    """At end of message, with the From domain: a relay client's mail is
    signed whatever its From (the table decides with which key, if any);
    a NAT client's only when From is one of nat.own_domains (at label
    boundaries, as the NAT rule of SPF)."""
    if origin is Origin.RELAY:
        return True
    return bool(from_domain) and domain_matches(from_domain, own_domains)
