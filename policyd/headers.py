"""Authentication-Results (RFC 8601) and Received-SPF (RFC 7208 §9.1).

Every value a client chose (HELO name, sender) passes through `safe_value`
before it reaches a header: only printable ASCII survives, so no CR or LF
can start a new header line, and quoting is left to authres, which quotes
anything that is not an RFC 2045 token.  Values come out single-line:
Postfix's PREPEND takes one line, and the milter folds nothing either.
"""
from __future__ import annotations

import re

import authres

from .model import DkimCheck, Header, IPAddress, IprevCheck, SpfCheck

# RFC 5321 §4.5.3.1.2: a domain is at most 255 octets; nothing we copy
# needs to be longer.
MAX_VALUE = 255
# RFC 5322 §2.1.1: a line is at most 998 characters.
MAX_LINE = 998

_DOMAIN = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                     r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


_UNSAFE = re.compile(r'[^ -~]|["\\()]')


def safe_value(text: str) -> str:
    """Printable ASCII only, without the characters that end a quoted
    string or a comment; anything else becomes '?'."""
    return _UNSAFE.sub("?", text[:MAX_VALUE])


def safe_domain(text: str) -> str:
    """A domain as-is when it is one; otherwise a value authres will quote.
    Never contains '@', since authres leaves anything with '@' unquoted."""
    text = text.rstrip(".")
    return text.lower() if _DOMAIN.match(text) else safe_value(text).replace("@", "?")


def _comment(*parts: str) -> str:
    return "; ".join(safe_value(p) for p in parts if p)


def _dnssec(secure: bool) -> str:
    return "with dnssec" if secure else "without dnssec"


def authentication_results(authserv_id: str, client_address: IPAddress,
                           spf: tuple[SpfCheck, ...] = (), iprev: IprevCheck | None = None,
                           dkim: tuple[DkimCheck, ...] = ()) -> Header | None:
    results = []
    for check in spf:
        comment = []
        properties = []
        if check.relaxed_mode == "reevaluate":
            comment.append(f"own domain from NAT network {client_address}, "
                           f"evaluated as {check.relaxed_via}")
            properties.append(authres.AuthenticationResultProperty(
                "policy", "nat-relaxed", str(check.relaxed_via)))
        elif check.relaxed_mode == "pass":
            comment.append(f"own domain from NAT network {client_address}, passed by policy")
            properties.append(authres.AuthenticationResultProperty(
                "policy", "nat-relaxed", "pass"))
        comment.append(_dnssec(check.dnssec))
        # CVE-2019-20790: a HELO result is reported only as smtp.helo, so
        # nothing reads it as a verdict on the MAIL FROM domain.
        result = authres.SPFAuthenticationResult(
            result=check.result.value, result_comment=_comment(*comment),
            **({"smtp_mailfrom": safe_domain(check.domain)} if check.identity == "mailfrom"
               else {"smtp_helo": safe_domain(check.domain)}))
        # After smtp.*: a quoted pvalue (an IPv6 address) followed by another
        # property is dropped by authres's parser, which others use to read us.
        result.properties.extend(properties)
        results.append(result)
    if iprev is not None:
        results.append(authres.IPRevAuthenticationResult(
            result=iprev.result.value,
            result_comment=_comment(iprev.ptr_name, iprev.reason, _dnssec(iprev.dnssec)),
            policy_iprev=str(client_address)))
    for check in dkim:
        kwargs = {}
        if check.domain:
            kwargs["header_d"] = safe_domain(check.domain)
        if check.selector:
            kwargs["header_s"] = safe_domain(check.selector)
        result = authres.DKIMAuthenticationResult(
            result=check.result.value,
            result_comment=_comment(check.reason, _dnssec(check.dnssec) if check.domain else ""),
            **kwargs)
        if check.b:
            # RFC 6008 §4: header.b, enough of the signature to tell several apart.
            result.properties.append(authres.AuthenticationResultProperty(
                "header", "b", re.sub(r"[^A-Za-z0-9+/]", "", check.b)[:8]))
        results.append(result)
    if not results:
        return None
    return Header("Authentication-Results", _fit("Authentication-Results", authserv_id, results))


def _fit(name: str, authserv_id: str, results: list) -> str:
    """The value on one line if it fits (Postfix's PREPEND cannot fold);
    else without the comments, which are for people; else folded between
    results, where RFC 8601 §2.2 allows CFWS (only the milter's field, with
    a message's DKIM results, gets that long)."""
    budget = MAX_LINE - len(name) - 2
    value = "; ".join([authserv_id] + [str(r) for r in results])
    if len(value) <= budget:
        return value
    for result in results:
        result.result_comment = None
    clauses = [authserv_id] + [str(r) for r in results]
    lines = [clauses[0]]
    for clause in clauses[1:]:
        if len(lines[-1]) + 2 + len(clause) > budget:
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
    return Header("Received-SPF", value)


def _kv_value(text: str) -> str:
    # RFC 7208 §9.1: key-value-pair = key "=" ( dot-atom / quoted-string )
    if _DOT_ATOM.match(text) and len(text) <= MAX_VALUE:
        return text
    return '"' + safe_value(text) + '"'
