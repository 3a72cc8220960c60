"""The vocabulary shared by the engine and both front-ends.

A front-end turns its protocol into a `Request`, the engine turns a
`Request` into a `Decision`, and the front-end turns the `Decision` back
into its protocol.  Nothing here does I/O.
"""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Action(enum.Enum):
    """What the MTA should do with the transaction.

    Ordered by severity: the engine combines checks by taking the worst.
    """
    ACCEPT = 0   # go on with the MTA's other checks (Postfix DUNNO)
    DEFER = 1    # temporary failure, 4xx
    REJECT = 2   # permanent failure, 5xx

    @property
    def severity(self) -> int:
        return self.value


class Verdict(enum.Enum):
    """What the admin configured for one check result (`spf.on_fail: reject`)."""
    REJECT = "reject"
    DEFER = "defer"
    FLAG = "flag"      # accept, say so in the header and the log
    NONE = "none"      # accept silently


class SpfResult(enum.Enum):
    """RFC 7208 §2.6 results."""
    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"

    @property
    def received_spf_word(self) -> str:
        # RFC 7208 §9.1 spells the results with capitals in Received-SPF.
        return {"softfail": "SoftFail", "temperror": "TempError",
                "permerror": "PermError"}.get(self.value, self.value.capitalize())


class IprevResult(enum.Enum):
    """RFC 8601 §2.7.3 results."""
    PASS = "pass"
    FAIL = "fail"            # PTR found, forward lookup does not confirm it
    PERMERROR = "permerror"  # no PTR published
    TEMPERROR = "temperror"  # DNS trouble


class DkimResult(enum.Enum):
    """RFC 8601 §2.7.1 results."""
    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    NEUTRAL = "neutral"
    POLICY = "policy"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True)
class Request:
    """One SMTP transaction as far as the front-end has seen it.

    Values are as the client sent them, already decoded to str (bytes that
    are not UTF-8 are kept with surrogateescape and never reach a header
    unsanitized).  `client_name`/`reverse_client_name` are None when the
    MTA did not tell us, "unknown" when it looked and found nothing.
    """
    client_address: IPAddress
    helo: str = ""
    sender: str = ""                 # MAIL FROM without <>; "" is the null sender
    recipient: str = ""
    queue_id: str = ""
    instance: str = ""               # Postfix: one value per message
    sasl_username: str = ""
    client_name: str | None = None          # forward-confirmed name, or "unknown"
    reverse_client_name: str | None = None  # PTR name, or "unknown"
    protocol_state: str = "RCPT"

    @property
    def sender_domain(self) -> str:
        return domain_of(self.sender)


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased, without a trailing dot."""
    _, at, domain = address.rpartition("@")
    return domain.rstrip(".").lower() if at else ""


@dataclass(frozen=True)
class Header:
    name: str
    value: str   # already sanitized; may contain folding "\n\t" only

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, RFC 3463 enhanced status, and the text."""
    code: str
    status: str
    text: str


# Used by both front-ends only when a Decision carries no usable reply of
# its own, so that a broken reply degrades the same way through either.  A
# bad code must never reach an MTA: to Postfix an all-digits action such
# as "250" means OK.
FALLBACK_REPLY = {
    Action.REJECT: Reply("550", "5.7.1", "Rejected by policy"),
    # RFC 3463 §3.8: 4.7.1 delivery not authorized, temporary.
    Action.DEFER: Reply("451", "4.7.1", "Temporarily rejected by policy, try again later"),
}


@dataclass(frozen=True)
class SpfCheck:
    identity: str                 # "mailfrom" or "helo"
    domain: str                   # the checked domain (postmaster@ stripped)
    result: SpfResult
    explanation: str = ""         # pyspf's text; logged, sent only for fail
    mechanism: str = ""
    dnssec: bool = False          # every answer it used was authenticated
    relaxed_via: IPAddress | None = None   # NAT rule: the public address that passed
    relaxed_mode: str = ""        # "" (not applied), "reevaluate" or "pass"


@dataclass(frozen=True)
class IprevCheck:
    result: IprevResult
    ptr_name: str = ""
    reason: str = ""
    dnssec: bool = False


@dataclass(frozen=True)
class DkimCheck:
    result: DkimResult
    domain: str = ""
    selector: str = ""
    b: str = ""          # first 8 characters of b=, RFC 6008 §2
    reason: str = ""
    dnssec: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    reply: Reply | None = None        # set when action is not ACCEPT
    rule: str = "default"             # which check decided, e.g. "spf.fail"
    headers: tuple[Header, ...] = ()
    reason: str = ""                  # logged, never sent
    would: Action | None = None       # test mode: what would have happened
    spf: tuple[SpfCheck, ...] = ()
    iprev: IprevCheck | None = None
    dkim: tuple[DkimCheck, ...] = ()
    trace: tuple[str, ...] = field(default=(), compare=False)

    def log_fields(self, request: Request) -> list[tuple[str, str]]:
        """key=value pairs for the one log line per decision."""
        fields = [("action", self.action.name), ("rule", self.rule),
                  ("client", str(request.client_address)),
                  ("helo", request.helo), ("sender", request.sender or "<>")]
        if self.would is not None:
            fields.append(("would", self.would.name))
        for check in self.spf:
            fields.append((f"spf.{check.identity}", check.result.value))
            if check.relaxed_mode:
                fields.append(("nat", f"{check.relaxed_mode}:{check.relaxed_via or '-'}"))
        if self.iprev is not None:
            fields.append(("iprev", self.iprev.result.value))
        for check in self.dkim:
            fields.append(("dkim", f"{check.result.value}:{check.domain or '-'}"))
        secure = [c.dnssec for c in self.spf] + ([self.iprev.dnssec] if self.iprev else [])
        if secure:
            fields.append(("dnssec", "yes" if all(secure) else "no"))
        return fields
