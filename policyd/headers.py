"""Authentication-Results (RFC 8601) and Received-SPF (RFC 7208 §9.1).

Every value that reaches a header goes through one quoting path: `safe_value`
keeps printable ASCII without the characters that end a quoted string or a
comment (so no CR or LF can start a new header line), then `_pvalue`,
`_kv_value` or `_comment` writes it as its grammar asks.  Values come out
single-line: Postfix's PREPEND takes one line, and the milter folds nothing
either.
"""
from __future__ import annotations

import re

from .model import DkimCheck, Header, IPAddress, IprevCheck, SpfCheck

# RFC 5321 §4.5.3.1.2: a domain is at most 255 octets; nothing we copy
# needs to be longer.
MAX_VALUE = 255
# RFC 5322 §2.1.1: a line is at most 998 characters.
MAX_LINE = 998

# \Z, not $: "$" also matches before a final "\n", which would then reach
# the header and end it.
_DOMAIN = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                     r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\Z")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


_UNSAFE = re.compile(r'[^ -~]|["\\()]')
# RFC 2045 §5.1 token: printable ASCII but space and tspecials.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]")


def safe_value(text: str) -> str:
    """Printable ASCII only, without the characters that end a quoted
    string or a comment; anything else becomes '?'."""
    return _UNSAFE.sub("?", text[:MAX_VALUE])


def safe_domain(text: str) -> str:
    """A domain as-is when it is one; otherwise a value `_pvalue` will
    quote.  Never contains '@': a reader may take "x@y" for local@domain."""
    text = text.rstrip(".")
    return text.lower() if _DOMAIN.match(text) else safe_value(text).replace("@", "?")


def _quoted(text: str) -> str:
    """RFC 5322 §3.2.4 quoted-string; safe_value leaves nothing to escape."""
    return '"' + safe_value(text) + '"'


def _pvalue(text: str) -> str:
    """RFC 8601 §2.2 pvalue and authserv-id: value = token / quoted-string
    (RFC 2045 §5.1).  An empty value is "", since a token has one character
    at least and the grammar wants a value after "="."""
    if len(text) <= MAX_VALUE and _TOKEN.fullmatch(text):
        return text
    return _quoted(text)


def _comment(*parts: str) -> str:
    return "; ".join(safe_value(p) for p in parts if p)


def _dnssec(secure: bool) -> str:
    return "with dnssec" if secure else "without dnssec"


def _resinfo(method: str, result: str, comment: str,
             properties: list[tuple[str, str]]) -> tuple[str, str]:
    """One result (RFC 8601 §2.2 resinfo) with its comment and without.

    authres's parser, which mail systems use to read us, takes a quoted
    pvalue only at the end of its result and silently drops one another
    property follows (and reads `x="" y=z` as x of "y=z").  So the tokens
    come first, in the order given, then one quoted value only: a policy
    one if there is one, since it qualifies the result (RFC 8601 §2.4: an
    spf=pass without its policy.nat-relaxed reads as SPF's own), else the
    first.  The others are said in the comment.  Ordinary values are all
    tokens but an IPv6 address or a header.b with "/", which come last
    anyway."""
    text = [f"{method}={result}"]
    quoted = []
    for name, value in properties:
        value = _pvalue(value)
        if value[0] != '"':
            text.append(f" {name}={value}")
        else:
            quoted.append(f" {name}={value}")
    if len(quoted) > 1:
        # Stable: among the others, the first given.
        quoted.sort(key=lambda pair: not pair.startswith(" policy."))
        # In the comment without "=", which a reader by pattern could
        # take for the property itself; the value is safe_value's already.
        comment = "; ".join(([comment] if comment else [])
                            + [pair[1:].replace("=", " ", 1) for pair in quoted[1:]])
    text.extend(quoted[:1])
    bare = "".join(text)
    if not comment:
        return bare, bare
    text[0] += f" ({comment})"
    return "".join(text), bare


def authentication_results(authserv_id: str, client_address: IPAddress,
                           spf: tuple[SpfCheck, ...] = (), iprev: IprevCheck | None = None,
                           dkim: tuple[DkimCheck, ...] = ()) -> Header | None:
    results = []
    for check in spf:
        comment = []
        # CVE-2019-20790: a HELO result is reported only as smtp.helo, so
        # nothing reads it as a verdict on the MAIL FROM domain.  The
        # identity is there even when empty (a malformed sender, no HELO
        # name): an spf result naming neither could be read as either.
        properties = [("smtp.mailfrom" if check.identity == "mailfrom" else "smtp.helo",
                       safe_domain(check.domain))]
        # RFC 8601 §2.4: the policy ptype says a local policy changed the
        # result.  After smtp.*, which must survive authres's parser.
        if check.relaxed_mode == "reevaluate":
            comment.append(f"own domain from NAT network {client_address}, "
                           f"evaluated as {check.relaxed_via}")
            properties.append(("policy.nat-relaxed", str(check.relaxed_via)))
        elif check.relaxed_mode == "pass":
            comment.append(f"own domain from NAT network {client_address}, passed by policy")
            properties.append(("policy.nat-relaxed", "pass"))
        comment.append(_dnssec(check.dnssec))
        results.append(_resinfo("spf", check.result.value, _comment(*comment), properties))
    if iprev is not None:
        results.append(_resinfo(
            "iprev", iprev.result.value,
            _comment(iprev.ptr_name, iprev.reason, _dnssec(iprev.dnssec)),
            [("policy.iprev", str(client_address))]))
    for signature in dkim:
        # header.d and header.s are optional: an empty one is left out, not
        # written "", which no reader could match to a signature.
        properties = []
        domain = safe_domain(signature.domain)
        if domain:
            properties.append(("header.d", domain))
        selector = safe_domain(signature.selector)
        if selector:
            properties.append(("header.s", selector))
        # RFC 6008 §4: header.b, enough of the signature to tell several
        # apart; left out when none of b= is base64 (b=@, b==, b="): an
        # empty header.b would tell nothing apart.
        b = _NOT_BASE64.sub("", signature.b)[:8]
        if b:
            properties.append(("header.b", b))
        results.append(_resinfo(
            "dkim", signature.result.value,
            _comment(signature.reason, _dnssec(signature.dnssec) if signature.domain else ""),
            properties))
    if not results:
        return None
    return Header("Authentication-Results",
                  _fit("Authentication-Results", _pvalue(authserv_id), results))


def _fit(name: str, authserv_id: str, results: list[tuple[str, str]]) -> str:
    """The value on one line if it fits (Postfix's PREPEND cannot fold);
    else without the comments, which are for people; else folded between
    results, where RFC 8601 §2.2 allows CFWS (only the milter's field, with
    a message's DKIM results, gets that long)."""
    budget = MAX_LINE - len(name) - 2
    value = "; ".join([authserv_id] + [full for full, _ in results])
    if len(value) <= budget:
        return value
    clauses = [authserv_id] + [bare for _, bare in results]
    lines = [clauses[0]]
    for clause in clauses[1:]:
        # Room is kept for the ";" that ends a line when the next does not fit.
        if len(lines[-1]) + 2 + len(clause) >= budget:
            lines[-1] += ";"
            lines.append(clause)
        else:
            lines[-1] += "; " + clause
    return "\n\t".join(lines)


def received_spf(check: SpfCheck, client_address: IPAddress, helo: str, sender: str,
                 receiver: str) -> Header:
    """RFC 7208 §9.1; the comment is informational, the pairs are for machines."""
    if check.relaxed_via:
        comment = (f"{receiver}: own domain {check.domain} from NAT network, "
                   f"{check.relaxed_via} is a permitted sender")
    else:
        comment = f"{receiver}: {check.identity} {check.domain} {check.result.value}"
    pairs = [("client-ip", str(client_address)),
             ("envelope-from", sender or "<>"),
             ("helo", helo),
             ("receiver", receiver),
             ("identity", check.identity)]
    if check.mechanism:
        pairs.append(("mechanism", check.mechanism))
    body = "; ".join(f"{key}={_kv_value(value)}" for key, value in pairs)
    value = f"{check.result.received_spf_word} ({_comment(comment)}) {body}"
    if len("Received-SPF: ") + len(value) > MAX_LINE:
        # RFC 5322 §2.1.1; the comment is optional (RFC 7208 §9.1).
        value = f"{check.result.received_spf_word} {body}"
    if len("Received-SPF: ") + len(value) > MAX_LINE:
        # Then the mechanism, the last pair, given "where applicable":
        # without it the pairs fit whatever their values (each at most
        # MAX_VALUE).
        body = "; ".join(f"{key}={_kv_value(text)}" for key, text in pairs[:5])
        value = f"{check.result.received_spf_word} {body}"
    return Header("Received-SPF", value)


def _kv_value(text: str) -> str:
    # RFC 7208 §9.1: key-value-pair = key "=" ( dot-atom / quoted-string )
    if _DOT_ATOM.match(text) and len(text) <= MAX_VALUE:
        return text
    return _quoted(text)
