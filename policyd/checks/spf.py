"""SPF (RFC 7208) through pyspf, with every lookup going through our resolver.

pyspf sends each lookup through the module global `spf.DNSLookup`.  Setting
that global would be a library global mutated for our needs, and it has no
way to report whether an answer was DNSSEC-authenticated.  So we subclass
`spf.query` and replace its one DNS entry point, `dns()`, keeping pyspf's
own per-evaluation cache, CNAME chasing and limits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import reduce

import spf

from ..config import SpfConfig, NatConfig, in_networks, domain_matches
from ..dns import DnsTempError, Lookups, SharedAnswers
from ..model import IPAddress, SpfCheck, SpfResult, parse_mail_from

# RFC 7208 §4.6.4: a DNS lookup timeout.  Each lookup also gets at most the
# time left of the whole evaluation (lookup_time_limit).
MAX_CNAME = spf.MAX_CNAME


class _Query(spf.query):
    """One evaluation; `resolver` answers every question."""

    def __init__(self, resolver: Lookups, void_limit: int, deadline: float, **kwargs):
        super().__init__(**kwargs)
        self.resolver = resolver
        self.void_limit = void_limit
        self.deadline = deadline
        self.all_secure = True
        self.answers = 0   # lookups asked of the resolver
        self.expires = float("inf")   # when the first answer used expires

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        # Mirrors spf.query.dns (pyspf 2.0.14) with our resolver in place of
        # spf.DNSLookup; dnspython already follows CNAMEs inside one answer.
        if not name:
            raise spf.PermError("Invalid query")
        name = str(name).rstrip(".").lower()
        if not reduce(lambda ok, label: ok and 0 < len(label) < 64, name.split("."), True):
            return []   # not a valid DNS name
        result = self.cache.get((name, qtype))
        if result is None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                # RFC 7208 §4.6.4: the evaluation ran out of time.
                raise spf.TempError("DNS: SPF evaluation exceeded its time limit")
            try:
                lookup = self.resolver.query(name, qtype, lifetime=remaining)
            except DnsTempError as error:
                self.all_secure = False
                raise spf.TempError(f"DNS {error}") from None
            except (ValueError, UnicodeError):
                return []   # a name dnspython cannot encode does not exist
            self.answers += 1
            self.all_secure = self.all_secure and lookup.secure
            self.expires = min(self.expires, lookup.expires)
            result = list(lookup.records)
            if qtype in ("TXT", "SPF"):
                result = [list(strings) for strings in result]
            self.cache[(name, qtype)] = result
        if not result and not ignore_void:
            # RFC 7208 §4.6.4: at most void_lookup_limit void lookups.
            self.void_lookups += 1
            if self.void_lookups > self.void_limit:
                raise spf.PermError(f"Void lookup limit of {self.void_limit} exceeded")
        return result

    def validated_ptrs(self):
        # RFC 7208 §5.5: "If a DNS error occurs while doing an A RR lookup,
        # then that domain name is skipped and the search continues."
        # pyspf 2.0.14 lets the TempError end the whole evaluation instead
        # (a CNAME loop under a PTR name is SERVFAIL from unbound).
        validated = []
        for name in self.dns_ptr(self.i)[:spf.MAX_PTR]:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated


@dataclass(frozen=True)
class SpfOutcome:
    result: SpfResult
    explanation: str
    mechanism: str
    secure: bool


# Outcomes an SPF memo keeps: a few hundred bytes each.
MEMO_SIZE = 20000


class SpfMemo:
    """Outcomes of earlier evaluations, each kept only as long as the
    first DNS answer it used (so a changed record is seen at its TTL).

    An outcome without macros depends on the client address and the domain
    alone; one whose records use macros (RFC 7208 §7) also on the sender
    and the HELO name, and is keyed by them too.  Temporary errors are
    never kept.

    While the memo is less than half full, an outcome is kept at once: a
    fresh memo (after a start or a reload) fills with the mail that comes
    first.  Past half, only a question asked before is kept: the first
    time, its key's hash is noted, and the outcome is kept when the
    question comes again.  Mail forged from a new address every time (a
    botnet) never asks twice; kept at once, its outcomes would fill the
    memo and empty it, again and again, taking the real senders' outcomes
    along.  So a flood can take at most half of the room, until the memo
    is next emptied.  Plain dict and set operations only, so threads can
    share it.

    Worker processes share what they keep (share_outcomes_between_workers):
    an outcome one worker kept answers the others, whose own memos miss
    it.  `scope` names what else an outcome depends on (the SPF and DNS
    settings, the receiver), so that a worker on another config, after a
    reload, never takes it.
    """

    def __init__(self, size: int = MEMO_SIZE, scope: str = ""):
        self.size = size
        self._entries: dict[tuple, tuple[float, SpfOutcome]] = {}
        self._seen: set[int] = set()
        self._shared = _shared_outcomes
        self._scope = scope

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, address: str, domain: str, sender: str, helo: str) -> SpfOutcome | None:
        now = time.time()
        keys = ((address, domain), (address, domain, sender, helo))
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                return entry[1]
        if self._shared is None:
            return None
        for key in keys:
            shared = self._shared.get(self._scope + repr(key))
            if shared is not None and shared[0] > now:
                expires, result, explanation, mechanism, secure = shared
                outcome = SpfOutcome(SpfResult(result), explanation, mechanism, secure)
                if len(self._entries) < self.size:
                    self._entries[key] = (expires, outcome)
                return outcome
        return None

    def put(self, key: tuple, expires: float, outcome: SpfOutcome) -> None:
        if len(self._entries) >= self.size // 2:
            mark = hash(key)
            if mark not in self._seen:
                if len(self._seen) >= self.size:
                    self._seen.clear()   # crude, bounded, and rare
                self._seen.add(mark)
                return
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key] = (expires, outcome)
        if self._shared is not None:
            self._shared.put(self._scope + repr(key), expires, outcome.result.value,
                             outcome.explanation, outcome.mechanism, outcome.secure)


# The table this process's SPF memos share with its sibling workers: set by
# a parent about to fork them (share_outcomes_between_workers); None in a
# single process.
_shared_outcomes: SharedAnswers | None = None


def share_outcomes_between_workers(slots: int) -> None:
    """Called once by a daemon's parent before it forks its workers: the
    SPF memos of their engines share what they keep (SpfMemo)."""
    global _shared_outcomes
    # An outcome is a few short strings: 512 octets hold it with its key.
    _shared_outcomes = SharedAnswers(slots, slot_size=512) if slots > 0 else None


def _uses_macros(query: _Query) -> bool:
    return any(b"%" in string for (_name, qtype), records in query.cache.items()
               if qtype in ("TXT", "SPF") for strings in records for string in strings)


def evaluate(resolver: Lookups, config: SpfConfig, address: IPAddress,
             sender: str, helo: str, receiver: str,
             memo: SpfMemo | None = None) -> SpfOutcome:
    """check_host() for one identity.  sender "" means the HELO identity.

    The sender's domain is read once, by model.parse_mail_from, and pyspf
    is told that reading: left to itself it takes the text after the
    *first* "@" with any trailing dot, so '"a@b"@own.example' or
    'a@own.example.' would be evaluated as a domain other than the one the
    MTA delivers, the headers name and the NAT rule matches.
    """
    if sender:
        mailbox = parse_mail_from(sender)
        if mailbox.malformed or mailbox.literal:
            # RFC 7208 §4.3: a malformed domain, or one that is not a
            # multi-label domain name, is "none" without a lookup.
            return SpfOutcome(SpfResult.NONE, "", "", False)
        local, domain = mailbox.local or "postmaster", mailbox.domain
        sender = f"{local}@{domain}"
    else:
        local, domain = "", helo.lower()
    ip = str(address)   # once: an IPv6 address is formatted anew each time
    if memo is not None:
        outcome = memo.get(ip, domain, sender, helo)
        if outcome is not None:
            return outcome
    deadline = time.monotonic() + config.lookup_time_limit
    query = _Query(resolver, config.void_lookup_limit, deadline,
                   i=ip, s=sender, h=helo, receiver=receiver,
                   timeout=config.lookup_time_limit)
    if local:
        # pyspf splits the sender at its first "@" (spf.split_email); the
        # local part may hold "@" (a quoted string, RFC 5321 §4.1.2).
        query.l, query.o = local, domain
        query.d = domain
    try:
        result, _code, explanation = query.check()
    except (spf.AmbiguityWarning, RecursionError, ValueError, UnicodeError) as error:
        result, explanation = "permerror", f"SPF Permanent Error: {error.__class__.__name__}"
    # No answer used, nothing authenticated (a malformed domain is "none"
    # without a lookup, RFC 7208 §4.3).
    secure = query.all_secure and query.answers > 0 and result not in ("temperror", "error")
    outcome = SpfOutcome(SpfResult(_normalize(result)), explanation,
                         query.mechanism or "", secure)
    if memo is not None and outcome.result is not SpfResult.TEMPERROR \
            and time.time() < query.expires < float("inf"):
        key = (ip, domain, sender, helo) if _uses_macros(query) else (ip, domain)
        resolver.when_decided(memo.put, key, query.expires, outcome)
    return outcome


def _normalize(result: str) -> str:
    # pyspf speaks RFC 4408's older names when asked to; map them to RFC 7208.
    return {"unknown": "permerror", "error": "temperror", "deny": "fail"}.get(result, result)


def check_identity(resolver: Lookups, spf_config: SpfConfig, nat: NatConfig,
                   address: IPAddress, identity: str, sender: str, helo: str,
                   receiver: str, memo: SpfMemo | None = None) -> SpfCheck:
    """One identity, with the relaxed rule for own domains behind NAT.

    identity is "mailfrom" (sender may be "" for the null sender, which
    RFC 7208 §2.4 checks as postmaster@helo) or "helo".
    """
    checked_sender = sender if identity == "mailfrom" else ""
    if checked_sender:
        mailbox = parse_mail_from(checked_sender)
        if mailbox.malformed:
            # No domain to evaluate, match or report; the engine decides
            # what a malformed sender gets (spf.mailfrom.on_malformed).
            return SpfCheck(identity, "", SpfResult.NONE,
                            f"malformed sender address: {mailbox.malformed}", malformed=True)
        domain = mailbox.domain
    else:
        domain = helo.rstrip(".").lower()
    if nat_applies(nat, address, domain):
        if nat.mode == "pass":
            return SpfCheck(identity, domain, SpfResult.PASS,
                            "own domain from a NAT network", relaxed_mode="pass")
        # The SNAT idea without iptables: evaluate as if the mail came from
        # the server's public address, and pass if any of them passes.
        for public in nat.public_addresses:
            outcome = evaluate(resolver, spf_config, public, checked_sender, helo, receiver,
                               memo)
            if outcome.result is SpfResult.PASS:
                return SpfCheck(identity, domain, SpfResult.PASS, outcome.explanation,
                                outcome.mechanism, outcome.secure,
                                relaxed_via=public, relaxed_mode="reevaluate")
        # No public address passes either: report what the real address
        # gets, as if the rule did not exist.
    outcome = evaluate(resolver, spf_config, address, checked_sender, helo, receiver, memo)
    return SpfCheck(identity, domain, outcome.result, outcome.explanation,
                    outcome.mechanism, outcome.secure)


def nat_applies(nat: NatConfig, address: IPAddress, domain: str) -> bool:
    """The relaxed rule: an own domain, from a NAT network, and nothing else."""
    # The domain first: it is the cheaper test, and the one that fails for
    # almost all mail.
    return bool(domain and nat.own_domains and domain_matches(domain, nat.own_domains)
                and in_networks(address, nat.networks))

