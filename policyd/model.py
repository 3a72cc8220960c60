"""The vocabulary shared by the engine and both front-ends.

A front-end turns its protocol into a `Request`, the engine turns a
`Request` into a `Decision`, and the front-end turns the `Decision` back
into its protocol.  Nothing here does I/O.
"""
from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field

import dns.exception
import dns.name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_address(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:192.0.2.1) is the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def normalize_network(network: Network) -> Network:
    if (isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96
            and network.network_address.ipv4_mapped):
        return ipaddress.IPv4Network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def in_networks(address: IPAddress, networks: tuple[Network, ...]) -> bool:
    address = normalize_address(address)
    return any(address.version == n.version and address in n for n in networks)


def domain_matches(domain: str, domains: tuple[str, ...]) -> bool:
    """True when domain is one of domains or a subdomain of one.

    Matching is at label boundaries: evilexample.com is not example.com.
    """
    domain = domain.rstrip(".").lower()
    return any(domain == d or domain.endswith("." + d) for d in domains)


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
    # TLS, as Postfix's policy attributes name it (the milter sees the
    # protocol and cipher only): "" when the session is not encrypted or
    # the MTA did not say.  Fingerprints are Postfix's AB:CD:... form.
    encryption_protocol: str = ""
    encryption_cipher: str = ""
    ccert_fingerprint: str = ""
    ccert_pubkey_fingerprint: str = ""

    @property
    def sender_domain(self) -> str:
        return domain_of(self.sender)


def domain_of(address: str) -> str:
    """The domain of a MAIL FROM address as parse_mail_from reads it; ""
    for the null sender and for a malformed address."""
    return parse_mail_from(address).domain if address else ""


@dataclass(frozen=True)
class MailFrom:
    """A MAIL FROM address as the MTA will deliver it, and SPF evaluates it.

    One reading for everything that names the sender's domain (the SPF
    evaluation, the NAT own-domain match, the reply, the headers), so that
    what is reported is what was evaluated.
    """
    local: str            # "" for "@domain" (RFC 7208 §4.3: then "postmaster")
    domain: str           # lower-cased, its one trailing dot removed; "" if malformed
    malformed: str = ""   # why the address has no usable domain; "" when it has one

    @property
    def literal(self) -> bool:
        """An address literal (RFC 5321 §4.1.3), which SPF cannot evaluate."""
        return self.domain.startswith("[")


# RFC 5321 §4.1.2 sub-domain, with "_" (seen in real mail domains) and, for
# SMTPUTF8 (RFC 6531 §3.3), any non-ASCII character of a U-label; nothing
# else: no space, no control character, no byte that was not UTF-8 (those
# arrive as surrogates, see Request).
_LABEL = re.compile(r"(?![-])[A-Za-z0-9_\u0080-\ud7ff\ue000-\U0010ffff-]{1,63}(?<![-])")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def internal_form(address: str) -> str:
    """An address as the client wrote it (RFC 5321/822 external form) in
    Postfix's internal form, as tok822 reads it: quoted strings unquoted,
    quoted pairs unescaped, comments (nested, or unclosed to the end) and
    white space outside them dropped.  The milter gets MAIL FROM as the
    client sent it; the policy service gets it from Postfix already so
    ('<a@own.example(x@evil.example>' is delivered as a@own.example)."""
    out: list[str] = []
    index, length = 0, len(address)
    while index < length:
        char = address[index]
        if char == "\\":
            out.append(address[index + 1:index + 2])
            index += 2
        elif char == '"':
            index += 1
            while index < length and address[index] != '"':
                if address[index] == "\\":
                    index += 1
                out.append(address[index:index + 1])
                index += 1
            index += 1
        elif char == "(":
            depth, index = 1, index + 1
            while index < length and depth:
                if address[index] == "\\":
                    index += 1
                elif address[index] == "(":
                    depth += 1
                elif address[index] == ")":
                    depth -= 1
                index += 1
        elif char in " \t\r\n":
            index += 1
        else:
            out.append(char)
            index += 1
    return "".join(out)


def parse_mail_from(sender: str) -> MailFrom:
    """The local part and domain of a (non-null) MAIL FROM address in
    Postfix's internal form (what the policy service is sent; the milter
    converts with `internal_form`).

    The domain follows the last "@" (RFC 5321 §4.1.2: a quoted local part
    may hold "@", and the internal form has no quotes left to say so).
    Forms Postfix still accepts are read as Postfix delivers them
    (trivial-rewrite, rewrite.c), since that is the domain the message
    leaves with and DMARC aligns to:
    - one trailing dot is removed ("a@example.com." is a@example.com), but
      not a second one or one right after "@";
    - without "@": "example.com!a" is a@example.com (swap_bangpath, the
      first "!") and "a%example.com" is a@example.com (allow_percent_hack,
      the last "%"); a bare local part is qualified with $myorigin, a
      domain we do not know: malformed.
    A domain of one label is malformed too: RFC 7208 §4.3 evaluates it as
    nothing, and Postfix may qualify it (append_dot_mydomain).  Anything
    without a valid domain is malformed, and never read as another domain.
    """
    local, at, domain = sender.rpartition("@")
    if at:
        if local.startswith("@") and ":" in local:
            local = local[local.rfind(":") + 1:]   # a source route (RFC 5321 §4.1.2)
    elif "!" in sender:
        domain, _, local = sender.partition("!")
    elif "%" in sender:
        local, _, domain = sender.rpartition("%")
    else:
        return MailFrom(sender, "", "no domain")
    if domain.endswith(".") and not domain.endswith("..") and domain != ".":
        domain = domain[:-1]
    if _ADDRESS_LITERAL.fullmatch(domain):
        return MailFrom(local, domain)
    labels = domain.split(".")
    if len(domain) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return MailFrom(local, "", "not a domain name")
    if len(labels) < 2:
        return MailFrom(local, "", "a domain of one label")
    if not domain.isascii():
        labels = [_a_label(label) for label in labels]
        if not all(labels) or len(".".join(labels)) > 253:
            return MailFrom(local, "", "not a domain name")
    # ASCII case only: str.lower() folds KELVIN SIGN into "k", another name.
    return MailFrom(local, ".".join(labels).translate(_ASCII_UPPER))


def _a_label(label: str) -> str:
    """An ASCII label as it is; a U-label (SMTPUTF8, RFC 6531) as the
    A-label the resolver asks (IDNA with UTS #46 mapping), so that what
    SPF evaluates is what is reported.  "" when it is no U-label of its
    own: a label that maps to ASCII (fullwidth "ｏｗｎ", KELVIN SIGN, a
    zero-width character) or to several labels ("。" is a dot to IDNA)
    would be read as another name than the one delivered."""
    if label.isascii():
        return label
    try:
        encoded = dns.name.from_text(label).labels
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return ""
    if len(encoded) != 2 or not encoded[0].startswith(b"xn--"):
        return ""
    return encoded[0].decode("ascii")


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
    malformed: bool = False       # the sender has no usable domain (parse_mail_from)


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
class LimitCheck:
    """A rate limit that refused (or, in dry run, would have refused)."""
    name: str              # "user.recipients", "client.messages", ...
    key: str               # what was counted: the login, network or domain
    retry_after: float     # seconds until one more fits
    backend: str = "local"   # "redis", "local", or "local-fallback" (Redis down)


@dataclass(frozen=True)
class RelayCheck:
    """Who may relay, and what the relay check found for one recipient.

    `authorized_by` says how the client is a relay client: "sasl",
    "certificate", "network", or "" (not one: inbound mail).  Other
    checks (DKIM signing) tell outbound mail by it."""
    authorized_by: str = ""
    login: str = ""                # the SASL login, if any
    relaying: bool = False         # the recipient is outside relay.local_domains
    result: str = "pass"           # "pass", or the rule that refused ("relay.denied", ...)
    limit: LimitCheck | None = None  # a limit reached, refused or (dry run) logged
    limits_backend: str = ""       # where the counters were: "redis", "local", "local-fallback", "off"


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
    relay: RelayCheck | None = None   # None: relay and limits not configured
    signing: str = ""                 # DKIM signing at end of message: "signed:d/s1+s2", ...
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
        for signature in self.dkim:
            fields.append(("dkim", f"{signature.result.value}:{signature.domain or '-'}"))
        if self.signing:
            fields.append(("dkim.sign", self.signing))
        relay = self.relay
        if relay is not None:
            fields.append(("rcpt", request.recipient or "<>"))
            fields.append(("relay", relay.authorized_by or "none"))
            if relay.login:
                fields.append(("login", relay.login))
            if relay.limit is not None:
                fields.append(("limit", f"{relay.limit.name}:{relay.limit.key}"))
            if relay.limits_backend not in ("", "redis", "local"):
                fields.append(("limits", relay.limits_backend))
        secure = [c.dnssec for c in self.spf] + ([self.iprev.dnssec] if self.iprev else [])
        if secure:
            fields.append(("dnssec", "yes" if all(secure) else "no"))
        return fields
