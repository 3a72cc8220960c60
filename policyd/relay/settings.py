"""The `relay:` and `limits:` config sections (read by policyd/config.py)."""
from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..model import Network
from .senders import MapError, load_map


class Config(Protocol):
    """What the rules here read of the whole config (policyd.config.Config,
    not imported: config.py imports this module)."""
    @property
    def relay(self) -> RelayConfig: ...


class SenderOwnership(enum.StrEnum):
    ENFORCE = "enforce"   # Postfix reject_sender_login_mismatch, for logins
    KNOWN = "known"       # reject_known_sender_login_mismatch: unlisted senders pass
    OFF = "off"


class TlsVersion(enum.StrEnum):
    """Postfix's encryption_protocol values, in order."""
    ANY = "any"
    TLS1 = "TLSv1"
    TLS1_1 = "TLSv1.1"
    TLS1_2 = "TLSv1.2"
    TLS1_3 = "TLSv1.3"


class LimitScope(enum.StrEnum):
    RELAY = "relay"   # only mail of authorized relay clients is counted
    ALL = "all"       # every accepted recipient, inbound mail too


class RedisDown(enum.StrEnum):
    LOCAL = "local"   # this process's own counters until Redis is back
    ACCEPT = "accept"
    DEFER = "defer"


_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){15,63}")
MAP_TYPES = ("hash", "texthash", "regexp")


def fingerprint_key(text: str) -> str:
    """A certificate fingerprint as compared: hex digits, upper case, no
    colons (Postfix prints them as AB:CD:..., admins paste either form)."""
    return text.replace(":", "").upper()


@dataclass(frozen=True)
class SenderLogin:
    """One login and the sender addresses it may use."""
    login: str = field(default="", metadata={
        "doc": "The SASL login name (compared without regard to case)."})
    addresses: tuple[str, ...] = field(default=(), metadata={
        "doc": "Addresses (user@example.org) and whole domains (@example.org)."})

    def problems(self, config: Config) -> Iterator[tuple[str, str]]:
        if not self.login:
            yield "login", "a login name is needed"
        for address in self.addresses:
            local, at, domain = address.rpartition("@")
            if not at or not domain or "." not in domain or " " in address:
                yield "addresses", f"{address!r} is not user@domain or @domain"


@dataclass(frozen=True)
class RelayConfig:
    enabled: bool = field(default=False, metadata={
        "doc": "Check relaying and sender ownership (docs/relay.md).  Off: no relay "
               "check, no cost."})
    local_domains: tuple[str, ...] = field(default=(), metadata={
        "kind": "domain",
        "doc": "Domains this server receives mail for (exact names, as Postfix's "
               "mydestination and relay_domains list them).  A recipient elsewhere, or "
               "one with routing in its local part (%, !, @, a source route), is relaying."})
    networks: tuple[Network, ...] = field(default=(), metadata={
        "kind": "network", "doc": "Clients that may relay without a login."})
    certificate_fingerprints: tuple[str, ...] = field(default=(), metadata={
        "doc": "Client certificates that may relay: Postfix's ccert_fingerprint or "
               "ccert_pubkey_fingerprint (smtpd_tls_fingerprint_digest), with or "
               "without colons.  The policy service only; the milter is not told."})
    require_tls: bool = field(default=False, metadata={
        "doc": "Relaying needs an encrypted session (Postfix's encryption_protocol)."})
    tls_minimum: TlsVersion = field(default=TlsVersion.ANY, metadata={
        "doc": "With require_tls, the lowest protocol accepted: any, TLSv1, TLSv1.1, "
               "TLSv1.2 or TLSv1.3."})
    destinations: tuple[str, ...] = field(default=(), metadata={
        "kind": "domain",
        "doc": "If given, the only recipient domains (and their subdomains) relay "
               "clients may send to."})
    sender_ownership: SenderOwnership = field(default=SenderOwnership.ENFORCE, metadata={
        "doc": "What a login may use as MAIL FROM: enforce (only what senders and "
               "sender_login_maps give it; 553 5.7.1 otherwise), known (addresses "
               "owned by another login are refused, unlisted ones pass) or off."})
    senders: tuple[SenderLogin, ...] = field(default=(), metadata={
        "doc": "Logins and their addresses: a list of {login: NAME, addresses: "
               "[user@example.org, \"@example.net\"]}."})
    sender_login_maps: tuple[str, ...] = field(default=(), metadata={
        "doc": "Postfix sender_login_maps files, address to owning logins: "
               "hash:/etc/postfix/sender_login (the source file postmap reads, not "
               "the .db), texthash:PATH or regexp:PATH."})
    recipient_delimiter: str = field(default="+", metadata={
        "doc": "Postfix's recipient_delimiter: user+tag@example.org is owned as "
               "user@example.org.  Empty: no extensions."})
    skip_checks: bool = field(default=True, metadata={
        "doc": "Authorized relay clients (by network or certificate; logins always) "
               "skip SPF, iprev and the NAT rule: they are your own senders, whose "
               "mail leaves from wherever they are."})

    def problems(self, config: Config) -> Iterator[tuple[str, str]]:
        for text in self.certificate_fingerprints:
            if not _FINGERPRINT.fullmatch(text):
                yield "certificate_fingerprints", f"{text!r} is not a hex fingerprint"
        if self.tls_minimum is not TlsVersion.ANY and not self.require_tls:
            yield "tls_minimum", "needs require_tls: true"
        if len(self.recipient_delimiter) > 1 or self.recipient_delimiter in "@%!\"":
            if self.recipient_delimiter:
                yield "recipient_delimiter", f"{self.recipient_delimiter!r} is not one " \
                    "character other than @ % ! \""
        for source in self.sender_login_maps:
            try:
                load_map(source)
            except MapError as error:
                yield "sender_login_maps", str(error)
        if self.enabled and self.sender_ownership is not SenderOwnership.OFF \
                and not self.senders and not self.sender_login_maps:
            yield "sender_ownership", f"{self.sender_ownership.value} needs senders or " \
                "sender_login_maps (or say off)"


@dataclass(frozen=True)
class Rate:
    """At most `messages` and `recipients` per `period`, as a steady rate
    with bursts up to the whole amount (GCRA)."""
    messages: int = field(default=0, metadata={
        "doc": "Messages per period (a message counts once, however many recipients); "
               "0: not limited."})
    recipients: int = field(default=0, metadata={
        "doc": "Recipients per period; 0: not limited."})
    period: float = field(default=3600.0, metadata={
        "doc": "The period in seconds; the whole amount may come at once, then it "
               "comes back at an even rate over the period."})

    @property
    def limited(self) -> bool:
        return bool(self.messages or self.recipients)


@dataclass(frozen=True)
class LimitOverride:
    """Other rates for some logins or client networks."""
    users: tuple[str, ...] = field(default=(), metadata={
        "doc": "Logins whose per_user rate this is."})
    networks: tuple[Network, ...] = field(default=(), metadata={
        "kind": "network", "doc": "Client networks whose per_client rate this is."})
    messages: int = field(default=0, metadata={"doc": "Messages per period; 0: none."})
    recipients: int = field(default=0, metadata={"doc": "Recipients per period; 0: none."})
    period: float = field(default=3600.0, metadata={"doc": "The period in seconds."})

    @property
    def rate(self) -> Rate:
        return Rate(self.messages, self.recipients, self.period)

    def problems(self, config: Config) -> Iterator[tuple[str, str]]:
        if not self.users and not self.networks:
            yield "", "an override needs users or networks"


@dataclass(frozen=True)
class LimitsConfig:
    enabled: bool = field(default=False, metadata={
        "doc": "Rate limits (docs/relay.md); off: no counting, no Redis."})
    scope: LimitScope = field(default=LimitScope.RELAY, metadata={
        "doc": "relay: count the mail of authorized relay clients (needs relay.enabled); "
               "all: every accepted recipient."})
    dry_run: bool = field(default=False, metadata={
        "doc": "Log what a limit would refuse, refuse nothing."})
    ipv4_prefix: int = field(default=32, metadata={
        "doc": "IPv4 clients are counted by this prefix."})
    ipv6_prefix: int = field(default=64, metadata={
        "doc": "IPv6 clients are counted by this prefix (a /64 is usually one site)."})
    per_user: Rate = field(default=Rate(), metadata={"doc": "Per SASL login."})
    per_client: Rate = field(default=Rate(), metadata={
        "doc": "Per client address (grouped by ipv4_prefix/ipv6_prefix)."})
    per_sender_domain: Rate = field(default=Rate(), metadata={
        "doc": "Per MAIL FROM domain."})
    per_recipient_domain: Rate = field(default=Rate(), metadata={
        "doc": "Per recipient domain."})
    overrides: tuple[LimitOverride, ...] = field(default=(), metadata={
        "doc": "Other rates for some logins or networks: a list of {users: [...], "
               "networks: [...], messages: N, recipients: N, period: S}; the first "
               "that matches applies."})
    on_redis_down: RedisDown = field(default=RedisDown.LOCAL, metadata={
        "doc": "With redis.url set and Redis not answering within redis.timeout: "
               "local (count in this process until it is back; limits then hold per "
               "process, not across hosts), accept (no limits) or defer (452 4.7.1)."})
    local_max_keys: int = field(default=100000, metadata={
        "doc": "Counters kept in memory per process (without Redis, or while it is "
               "down); past it the oldest expired ones go first."})

    def problems(self, config: Config) -> Iterator[tuple[str, str]]:
        if not self.enabled:
            return
        if not 0 < self.ipv4_prefix <= 32:
            yield "ipv4_prefix", f"{self.ipv4_prefix} is not 1 to 32"
        if not 0 < self.ipv6_prefix <= 128:
            yield "ipv6_prefix", f"{self.ipv6_prefix} is not 1 to 128"
        if self.scope is LimitScope.RELAY and not config.relay.enabled:
            yield "scope", "relay needs relay.enabled: true (or say all)"
        if not (self.per_user.limited or self.per_client.limited
                or self.per_sender_domain.limited or self.per_recipient_domain.limited
                or any(o.rate.limited for o in self.overrides)):
            yield "enabled", "no rate is set (per_user, per_client, ...)"
        if self.local_max_keys < 1000:
            yield "local_max_keys", f"{self.local_max_keys} is less than 1000"
