"""The vocabulary of `policyd check`: a Finding (what was checked, its
status, the evidence, the exact fix) and what a list of them exits with."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    ERROR = "error"


# The exit status of a run, by its worst finding.
EXIT_STATUS = {Status.OK: 0, Status.WARN: 1, Status.ERROR: 2}
_RANK = {Status.OK: 0, Status.WARN: 1, Status.ERROR: 2}

# The groups, in the order they are printed.
GROUPS = ("resolver", "domain", "address", "nat", "postfix")


@dataclass(frozen=True)
class Finding:
    """One line of the report.

    group: resolver, domain, address, nat or postfix; subject: what in
    the group (a nameserver, a domain, an address, a config directory);
    check: the check's short name; key: what inside the subject when a
    check gives several findings (an address, a selector, an MX host).
    evidence: what was asked and what came back; fix: for a problem,
    exactly what to publish, add or run ("" when ok).
    """
    group: str
    subject: str
    check: str
    status: Status
    summary: str
    evidence: tuple[str, ...] = ()
    fix: str = ""
    key: str = ""

    @property
    def id(self) -> str:
        """Stable across runs: monitoring keys on it."""
        parts = [self.group, self.subject, self.check] + ([self.key] if self.key else [])
        return "/".join(parts)

    def as_json(self) -> dict:
        return {"id": self.id, "group": self.group, "subject": self.subject,
                "check": self.check, "status": self.status.value,
                "summary": self.summary, "evidence": list(self.evidence), "fix": self.fix}


def ok(group: str, subject: str, check: str, summary: str, evidence=(), key: str = "") -> Finding:
    return Finding(group, subject, check, Status.OK, summary, tuple(evidence), "", key)


def warn(group: str, subject: str, check: str, summary: str, fix: str, evidence=(),
         key: str = "") -> Finding:
    return Finding(group, subject, check, Status.WARN, summary, tuple(evidence), fix, key)


def error(group: str, subject: str, check: str, summary: str, fix: str, evidence=(),
          key: str = "") -> Finding:
    return Finding(group, subject, check, Status.ERROR, summary, tuple(evidence), fix, key)


def worst(findings: list[Finding]) -> Status:
    return max((f.status for f in findings), key=_RANK.__getitem__, default=Status.OK)


def exit_status(findings: list[Finding]) -> int:
    return EXIT_STATUS[worst(findings)]


def printable(text: str) -> str:
    """text with every control character escaped: DNS data is the world's,
    and must not drive the admin's terminal (escape sequences) or split a
    finding's line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
