"""Which mail is outbound, so ours to sign: a pure function of what the
milter knows.  Mail from a client policyd did not authorize to relay is
never signed, whatever it claims: a signature is our word for the message;
nor is a login's message whose From address the login does not own.
"""
from __future__ import annotations

import enum
from typing import Callable

from ..config import Config
from ..headers import safe_value
from ..model import IPAddress, domain_matches, in_networks, internal_form
from ..relay.settings import SenderOwnership

# (address, login) -> True owned by the login, False owned by others (or
# no usable domain), None listed for nobody: relay.senders.SenderOwners.owned_by.
OwnedBy = Callable[[str, str], "bool | None"]


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


def from_not_owned(login: str, from_address: str, ownership: SenderOwnership,
                   owned_by: OwnedBy) -> str:
    """At end of message, for a SASL login's message: why its From address
    may not be signed ("From not owned by LOGIN"), or "" when it may.

    The rule relay.sender_ownership applies to MAIL FROM (relay/
    authorization.py), with the same lookup (relay.senders and
    sender_login_maps): enforce, the login must own the address; known,
    no other login may own it; off, anything.  Postfix's
    reject_sender_login_mismatch reads only the envelope, and a DKIM
    signature with d= of the From domain (RFC 6376, DMARC alignment
    RFC 7489 §3.1.1) is the domain's word for whoever the From names: a
    login that may not use bob@ as MAIL FROM does not get bob@'s mail
    signed by writing it into the header instead."""
    if not login or ownership is SenderOwnership.OFF:
        return ""
    # The lookups hold addresses in Postfix's internal form, as MAIL FROM
    # arrives at the policy service: '"alice"@own.example' is alice@own.example
    # to every receiver, and must be to the owners' table too.
    owned = owned_by(internal_form(from_address), login)
    if owned or (owned is None and ownership is SenderOwnership.KNOWN):
        return ""
    return f"From not owned by {safe_value(login)}"
