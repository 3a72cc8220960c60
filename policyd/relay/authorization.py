"""Relay authorization and rate limits for one recipient (RelayPolicy):
who may relay (a SASL login, a client certificate, a network), as whom
(sender ownership), over what (TLS), to where (relay.destinations), and
how much (limits.py).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ..model import (IPAddress, LimitCheck, RelayCheck, Reply, Request, domain_matches,
                     in_networks, parse_mail_from)
from ..config import ConfigError
from ..headers import safe_value
from .limits import LocalLimiter, RedisLimiter, counters, limit_check, retry_seconds
from .senders import MapError, SenderOwners, Table, config_table, load_map
from .settings import (LimitScope, LimitsConfig, RedisDown, RelayConfig, SenderOwnership,
                       TlsVersion, fingerprint_key)

log = logging.getLogger("policyd")

_TLS_ORDER = [v.value for v in TlsVersion if v is not TlsVersion.ANY]

# RFC 5321 §3.6.2 / Postfix's reject_unauth_destination text; RFC 3463
# §3.8 X.7.1: delivery not authorized.  It names nothing of ours.
RELAY_DENIED = Reply("554", "5.7.1", "Relay access denied")
# RFC 5248 registry: X.7.10 encryption needed.
TLS_REQUIRED = Reply("554", "5.7.10", "Relay access denied: TLS is required")
DESTINATION_DENIED = Reply("554", "5.7.1", "Relay access denied for this destination")
# Postfix reject_sender_login_mismatch: 553 5.7.1 (RFC 5321 §4.2.2: 553
# mailbox name not allowed).
SENDER_NOT_OWNED = "Sender address rejected: not owned by user {login}"
REDIS_DOWN = Reply("451", "4.3.0", "Temporary local problem, try again later")
# The per_recipient_domain key of every recipient whose domain is no name.
UNREADABLE_DOMAIN = "(unreadable)"


@dataclass(frozen=True)
class Refused:
    rule: str
    reply: Reply


class RelayPolicy:
    """relay: and limits: as built for one Engine (immutable but for the
    limiter's counters, which are thread-safe)."""

    def __init__(self, relay: RelayConfig, limits: LimitsConfig,
                 limiter: LocalLimiter | RedisLimiter | None):
        self.relay = relay
        self.limits = limits
        self.limiter = limiter if limits.enabled else None
        self.local_domains = frozenset(relay.local_domains)
        self.fingerprints = frozenset(fingerprint_key(f) for f in relay.certificate_fingerprints)
        tables: list[Table] = [config_table(relay.senders)] if relay.senders else []
        try:
            tables += [load_map(source) for source in relay.sender_login_maps]
        except MapError as error:
            # Checked with the config; a file changed since is still a
            # config error, never a traceback (a reload keeps the old one).
            raise ConfigError("relay.sender_login_maps", None, "", str(error)) from None
        self.owners = SenderOwners(tuple(tables), relay.recipient_delimiter,
                                   relay.local_domains)

    @property
    def may_wait(self) -> bool:
        """True when a charge may wait on the network (Redis)."""
        return isinstance(self.limiter, RedisLimiter)

    # -- authorization -------------------------------------------------------

    def authorized_by(self, request: Request, address: IPAddress) -> str:
        if request.sasl_username:
            return "sasl"
        if self.fingerprints and (
                fingerprint_key(request.ccert_fingerprint) in self.fingerprints
                or fingerprint_key(request.ccert_pubkey_fingerprint) in self.fingerprints):
            return "certificate"
        if in_networks(address, self.relay.networks):
            return "network"
        return ""

    def relaying(self, recipient: str) -> bool:
        """The recipient (internal form) is not one of ours to receive.

        Relaying means a recipient outside relay.local_domains, or one that
        carries routing of its own (%, !, a quoted @, a source route):
        Postfix with allow_untrusted_routing=no never relays those for a
        stranger either, and reading `user%remote@own.example` as local
        would let the percent hack through (the nmap smtp-open-relay
        forms, docs/protocols.md §6)."""
        if not recipient:
            return False          # DATA with several recipients: judged at RCPT
        if recipient.startswith("@"):
            return True           # a source route (RFC 5321 §4.1.2 and appendix C)
        if "@" not in recipient:
            # A bare local part is qualified with $myorigin by Postfix; a
            # bang path or percent hack names another host.
            return "!" in recipient or "%" in recipient
        parsed = parse_mail_from(recipient)
        if any(c in parsed.local for c in "@%!") or not parsed.domain:
            return True
        return parsed.domain not in self.local_domains

    def destination(self, recipient: str) -> str:
        """The domain a recipient (internal form) is delivered to, "" if
        none: routing in the local part of an address at one of our
        domains is followed as Postfix follows it (allow_percent_hack,
        swap_bangpath, resolve_dequoted_address, all on by default), so
        "x%evil.example@own.example" goes to evil.example, and is judged
        and counted there."""
        parsed = parse_mail_from(recipient)
        for _ in range(8):   # each step takes one routing operator off
            if parsed.domain not in self.local_domains \
                    or not any(c in parsed.local for c in "@%!"):
                return parsed.domain
            parsed = parse_mail_from(parsed.local)
        return ""   # more routing than any mail has: nowhere we can name

    def check(self, request: Request, address: IPAddress) -> tuple[RelayCheck, Refused | None]:
        relay = self.relay
        if not relay.enabled:
            return RelayCheck(authorized_by=self.authorized_by(request, address),
                              login=request.sasl_username), None
        by = self.authorized_by(request, address)
        login = request.sasl_username
        relaying = self.relaying(request.recipient)
        check = RelayCheck(authorized_by=by, login=login, relaying=relaying)
        if login and request.sender and relay.sender_ownership is not SenderOwnership.OFF:
            owned = self.owners.owned_by(request.sender, login)
            if owned is False or (owned is None
                                  and relay.sender_ownership is SenderOwnership.ENFORCE):
                return self._refused(check, "relay.sender-not-owned", Reply(
                    "553", "5.7.1", SENDER_NOT_OWNED.format(login=safe_value(login))))
        if not relaying:
            return check, None
        if not by:
            return self._refused(check, "relay.denied", RELAY_DENIED)
        if relay.require_tls and not self._tls_enough(request.encryption_protocol):
            return self._refused(check, "relay.tls-required", TLS_REQUIRED)
        if relay.destinations:
            domain = self.destination(request.recipient)
            if not (domain and domain_matches(domain, relay.destinations)):
                return self._refused(check, "relay.destination", DESTINATION_DENIED)
        return check, None

    def _tls_enough(self, protocol: str) -> bool:
        if not protocol:
            return False
        minimum = self.relay.tls_minimum
        if minimum is TlsVersion.ANY:
            return True
        # An unknown newer name (TLSv1.4) is not refused for being new.
        if protocol not in _TLS_ORDER:
            return protocol.startswith("TLSv") and protocol > _TLS_ORDER[-1]
        return _TLS_ORDER.index(protocol) >= _TLS_ORDER.index(minimum.value)

    @staticmethod
    def _refused(check: RelayCheck, rule: str, reply: Reply) -> tuple[RelayCheck, Refused]:
        return dataclasses.replace(check, result=rule), Refused(rule, reply)

    # -- limits --------------------------------------------------------------

    def counted(self, request: Request, check: RelayCheck) -> bool:
        """Whether this accepted recipient is counted at all."""
        return (self.limiter is not None and request.protocol_state == "RCPT"
                and (self.limits.scope is LimitScope.ALL or bool(check.authorized_by)))

    def charge(self, request: Request, address: IPAddress,
               check: RelayCheck) -> tuple[LimitCheck | None, Refused | None, str]:
        """Charges the counters of one accepted recipient: the limit reached
        (if any), the refusal to answer with (None in dry run), and where
        the counters are."""
        limiter = self.limiter
        assert limiter is not None
        recipient = self.destination(request.recipient) if request.recipient else ""
        if not recipient and "@" in request.recipient:
            # A domain we cannot read ("ｖｉｃｔｉｍ.example", which IDNA's
            # mapping, and so Postfix with SMTPUTF8, delivers to
            # victim.example): all such share one counter, rather than
            # none, which let them past per_recipient_domain.
            recipient = UNREADABLE_DOMAIN
        wanted = counters(self.limits, request.sasl_username, address,
                          request.sender_domain, recipient, request.instance)
        if isinstance(limiter, RedisLimiter):
            refusal, backend = limiter.charge(wanted)
        else:
            refusal, backend = limiter.charge(wanted), "local"
        if backend == "unavailable" and self.limits.on_redis_down is RedisDown.DEFER:
            return None, Refused("limit.unavailable", REDIS_DOWN), backend
        if refusal is None:
            return None, None, backend
        seconds = retry_seconds(refusal)
        counter = refusal.counter
        if refusal.first:
            # Once per counter and period (per process without Redis): a
            # line per refused recipient would bury the log.
            log.warning("rate limit %s reached for %s (%s%s); %s", counter.name,
                        safe_value(counter.key), backend,
                        ", dry run" if self.limits.dry_run else "",
                        "logged only" if self.limits.dry_run else
                        f"deferred for {seconds} s")
        limit = limit_check(refusal, backend)
        if self.limits.dry_run:
            return limit, None, backend
        what = counter.name.replace("_", " ").replace(".", " ")
        # RFC 5321 §4.2.2: 452 too many recipients / insufficient storage is
        # what clients retry per recipient; RFC 3463 §3.8 X.7.1.
        return limit, Refused(f"limit.{counter.name}", Reply(
            "452", "4.7.1", f"Rate limit reached ({what}), try again in {seconds} s")), backend
