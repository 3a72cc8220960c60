"""Every question `policyd check` asks, with its three outcomes: found,
absent (NXDOMAIN or NODATA) or failed (SERVFAIL, a timeout); a failed
lookup is never taken for a missing record.  Asker asks through
policyd's own resolver, and asks a nameserver directly (raw) what that
resolver does not tell.
"""
from __future__ import annotations

import enum
import sys
import threading
from dataclasses import dataclass
from typing import Callable, TextIO

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from ..dns import DnsTempError, Lookups, Resolver
from .findings import printable

# RFC 8914 §4: the extended errors a validating resolver gives, by code.
EDE_NAMES = {1: "Unsupported DNSKEY Algorithm", 2: "Unsupported DS Digest Type",
             5: "DNSSEC Indeterminate", 6: "DNSSEC Bogus", 7: "Signature Expired",
             8: "Signature Not Yet Valid", 9: "DNSKEY Missing", 10: "RRSIGs Missing",
             12: "NSEC Missing", 22: "No Reachable Authority"}

# A lookup still unanswered after this long (or half of dns.timeout) is
# announced on stderr, so a slow run says what it waits for.
SLOW_AFTER = 1.0


class Outcome(enum.Enum):
    FOUND = "found"
    ABSENT = "absent"
    FAILED = "failed"


@dataclass(frozen=True)
class Answer:
    name: str
    rdtype: str
    outcome: Outcome
    records: tuple = ()
    secure: bool = False          # authenticated, by policyd's trust rule
    nxdomain: bool = False
    reason: str = ""              # why it failed
    bogus: bool = False           # failed DNSSEC validation
    unchecked: tuple[str, ...] = ()   # bogus: the answer with checking disabled

    @property
    def found(self) -> bool:
        return self.outcome is Outcome.FOUND

    @property
    def absent(self) -> bool:
        return self.outcome is Outcome.ABSENT

    @property
    def failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    def texts(self) -> list[str]:
        """TXT records as text, each record's strings joined (RFC 7208 §3.3)."""
        return [b"".join(strings).decode("utf-8", "backslashreplace")
                for strings in self.records if isinstance(strings, tuple)]

    def evidence(self) -> str:
        asked = f"{self.rdtype} {self.name}"
        if self.failed:
            return printable(f"{asked}: failed: {self.reason}")
        if self.absent:
            return f"{asked}: {'NXDOMAIN' if self.nxdomain else 'no record (NODATA)'}" + (
                ", authenticated" if self.secure else "")
        shown = self.texts() if self.rdtype == "TXT" else [
            " ".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in self.records]
        text = "; ".join(f'"{t}"' if self.rdtype == "TXT" else t for t in shown)
        if len(text) > 300:
            text = text[:300] + "..."
        return printable(f"{asked}: {text}" + (" (authenticated)" if self.secure else ""))


@dataclass(frozen=True)
class Raw:
    """A nameserver's own answer, its flags as it set them."""
    server: str
    rcode: str                    # NOERROR, SERVFAIL, ...; TIMEOUT or ERROR when none came
    ad: bool = False
    records: tuple[str, ...] = ()
    ede: str = ""                 # RFC 8914 extended errors, as text

    @property
    def answered(self) -> bool:
        return self.rcode == "NOERROR" and bool(self.records)

    def evidence(self, name: str, rdtype: str, cd: bool = False) -> str:
        text = f"{rdtype} {name}{' (CD)' if cd else ''} from {self.server}: {self.rcode}"
        if self.ad:
            text += ", AD"
        if self.ede:
            text += f", {self.ede}"
        return printable(text)


class Asker:
    """Asks through policyd's resolver and says when a question is slow.

    Questions go through policyd's own resolver (policyd.dns.Resolver), so
    the answers, the time bound (`dns.timeout`) and the DNSSEC trust rule
    are those incoming mail gets.  Two things that resolver does not do
    are asked directly of each nameserver (raw), each bounded by
    `dns.timeout` too: whether a failure is a DNSSEC validation failure
    (the same question with CD set, RFC 4035 §3.2.2, answers while the
    plain one fails, and RFC 8914's extended error says why: _failed),
    and what the resolver itself set in its answer (the AD bit, which
    policyd may not trust)."""

    def __init__(self, resolver: Lookups, nameservers: tuple[str, ...], port: int,
                 timeout: float, progress: TextIO | None = sys.stderr,
                 diagnose: bool = True):
        self.resolver = resolver
        # Whether a failure is looked into by asking the nameservers
        # directly (off for a resolver that is not a real one).
        self.diagnose = diagnose
        self.nameservers = nameservers
        self.port = port
        self.timeout = timeout
        self.progress = progress
        self.asked = 0

    @classmethod
    def for_resolver(cls, resolver: Resolver, progress: TextIO | None = sys.stderr) -> Asker:
        return cls(resolver, resolver.nameservers, resolver.config.port,
                   resolver.config.timeout, progress)

    def _slow(self, what: str) -> Callable[[], None]:
        """Starts the notice for a slow lookup; returns its cancel."""
        if self.progress is None:
            return lambda: None
        stream = self.progress

        def say() -> None:
            stream.write(f"policyd check: waiting for {what} "
                         f"(at most {self.timeout:g} s, dns.timeout)\n")
            stream.flush()
        timer = threading.Timer(min(SLOW_AFTER, self.timeout / 2), say)
        timer.daemon = True
        timer.start()
        return timer.cancel

    def ask(self, name: str, rdtype: str) -> Answer:
        name = name.rstrip(".").lower()
        self.asked += 1
        cancel = self._slow(f"{rdtype} {name}")
        try:
            lookup = self.resolver.query(name, rdtype)
        except DnsTempError as failure:
            cancel()
            return self._failed(name, rdtype, str(failure))
        except (ValueError, UnicodeError):
            cancel()
            return Answer(name, rdtype, Outcome.ABSENT, nxdomain=True)
        cancel()
        if lookup.records:
            return Answer(name, rdtype, Outcome.FOUND, lookup.records, lookup.secure)
        return Answer(name, rdtype, Outcome.ABSENT, (), lookup.secure, lookup.nxdomain)

    def ptr(self, reverse_name: str) -> Answer:
        return self.ask(reverse_name, "PTR")

    def _failed(self, name: str, rdtype: str, reason: str) -> Answer:
        """A failed lookup, and whether it is DNSSEC's doing."""
        reason = reason.removeprefix(f"{rdtype} {name}: ")
        if not self.diagnose:
            return Answer(name, rdtype, Outcome.FAILED, reason=reason)
        if "Timeout" in reason or "spent" in reason:
            return Answer(name, rdtype, Outcome.FAILED,
                          reason=f"no answer within dns.timeout ({self.timeout:g} s)")
        plain = self.raw(name, rdtype)
        if plain.rcode == "SERVFAIL":
            checking_disabled = self.raw(name, rdtype, cd=True)
            if checking_disabled.rcode in ("NOERROR", "NXDOMAIN"):
                detail = f" ({plain.ede})" if plain.ede else ""
                return Answer(name, rdtype, Outcome.FAILED, bogus=True,
                              reason=f"SERVFAIL: DNSSEC validation failed{detail}; "
                                     "with checking disabled (CD) it answers",
                              unchecked=checking_disabled.records)
            return Answer(name, rdtype, Outcome.FAILED,
                          reason="SERVFAIL" + (f" ({plain.ede})" if plain.ede else ""))
        return Answer(name, rdtype, Outcome.FAILED, reason=plain.rcode if plain.rcode not in (
            "NOERROR", "NXDOMAIN") else reason)

    def raw(self, name: str, rdtype: str, cd: bool = False, server: str | None = None) -> Raw:
        """The first nameserver's (or server's) own answer, bounded by dns.timeout."""
        target = server or self.nameservers[0]
        query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=1232)
        # RFC 6840 §5.7: AD in the query asks for it; CD asks the resolver
        # not to validate (RFC 4035 §3.2.2).
        query.flags = dns.flags.RD | dns.flags.AD | (dns.flags.CD if cd else 0)
        cancel = self._slow(f"{rdtype} {name}{' (CD)' if cd else ''} from {target}")
        try:
            response = dns.query.udp(query, target, port=self.port, timeout=self.timeout)
            if response.flags & dns.flags.TC:
                response = dns.query.tcp(query, target, port=self.port, timeout=self.timeout)
        except dns.exception.Timeout:
            return Raw(target, "TIMEOUT")
        except (dns.exception.DNSException, OSError, EOFError, ValueError) as failure:
            return Raw(target, f"ERROR {failure.__class__.__name__}")
        finally:
            cancel()
        ede = "; ".join(
            f"EDE {option.code} {EDE_NAMES.get(option.code, '')}".rstrip()
            + (f": {option.text}" if option.text else "")
            for option in response.options if isinstance(option, dns.edns.EDEOption))
        records = tuple(rrset.to_text() for rrset in response.answer)
        return Raw(target, dns.rcode.to_text(response.rcode()),
                   bool(response.flags & dns.flags.AD), records, ede)
