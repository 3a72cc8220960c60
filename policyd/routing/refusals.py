"""Which delivery statuses are reverse-DNS refusals of a delivery over
IPv6 (Classifier): the reading of smtp_delivery_status_filter's key.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3}) (.*)\Z", re.DOTALL)
# smtp(8)'s "host %s[%s] said: %s" (smtp_proto.c, smtp_rcpt_fail and the
# other *_fail functions through smtp_mesg_fail), read from the start of
# the text only: other texts of smtp(8) quote the remote server after a
# prefix of their own ("host %s refused to talk to me: %s" for a greeting,
# "connect to %s[%s]: server refused to talk to me: %s", TLS failures),
# and a server could write a "host X[IPv6] said:" of its own into them to
# teach a route for another destination.
_SAID = re.compile(r"host (\S+?)\[([^\]\s]+)\] said: (.*)\Z", re.DOTALL)
_TRAILER = re.compile(r"\s*\(in reply to [^()]*\)\s*\Z")
# A reply line's code and optional enhanced status: "550-5.7.1 " or "450 4.7.25 ".
_LINE_PREFIX = re.compile(r"(?:^|(?<=\s))[245]\d\d[- ](?:[245]\.\d{1,3}\.\d{1,3}(?:\s|\Z))?")
# RFC 7372 §3.3: X.7.25 "Reverse DNS validation failed".
_REVERSE_DNS_STATUS = re.compile(r"(?:^|(?<=\s))[245]\d\d[- ][45]\.7\.25(?:\s|\Z)")


@dataclass(frozen=True)
class Refusal:
    """A reverse-DNS refusal of a delivery to an IPv6 address."""
    status: str       # Postfix's enhanced status, "5.7.1"
    host: str         # the MX host name, lower case, no final dot
    address: str      # its IPv6 address we were refused at
    reply: str        # the remote server's reply, as Postfix gave it
    matched: str      # what made it one: "X.7.25" or the pattern

    def deferred(self) -> str:
        """The status filter's replacement: the same text under a 4.x.x
        status, so that Postfix keeps the message and retries it (then
        over IPv4) instead of bouncing it."""
        text = f"host {self.host}[{self.address}] said: {self.reply}"
        return (f"4{self.status[1:]} {text} "
                "(policyd: reverse DNS refusal over IPv6; the next attempt goes over IPv4)")


class Classifier:
    """Built once per config: the patterns compiled."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = tuple((pattern, re.compile(pattern, re.IGNORECASE))
                              for pattern in patterns)

    def classify(self, key: str) -> Refusal | None:
        """The refusal in a status filter key, or None: a success, a
        failure that is no reply (connect errors, timeouts), a reply from
        an IPv4 address, or a reply that is no reverse-DNS refusal.

        Postfix queries the filter once per recipient with
        "enhanced-status SPACE text" (postconf(5)
        default_delivery_status_filter); for a reply of the remote server
        the text is the one smtp(8) builds, "host NAME[ADDRESS] said: REPLY
        (in reply to COMMAND command)", with the lines of a multi-line
        reply joined by spaces, each keeping its "550-5.7.1 " prefix."""
        status = _STATUS.match(key)
        if status is None or status.group(1) == "2":
            return None
        said = _SAID.match(status.group(4))
        if said is None:
            return None
        host, address_text, reply = said.groups()
        try:
            address = ipaddress.ip_address(address_text)
        except ValueError:
            return None
        if address.version != 6 or address.ipv4_mapped is not None:
            return None
        reply = _TRAILER.sub("", reply)
        matched = self.match(reply)
        if matched is None:
            return None
        host = host.rstrip(".").lower()
        return Refusal(".".join(status.groups()[:3]), host, address.compressed, reply, matched)

    def match(self, reply: str) -> str | None:
        """What in a reply says "reverse DNS refused", or None."""
        if _REVERSE_DNS_STATUS.search(reply):
            return "X.7.25"
        # The lines' prefixes out and white space folded, so that a pattern
        # matches across the line breaks of a multi-line reply.
        text = " ".join(_LINE_PREFIX.sub(" ", reply).split())
        for pattern, compiled in self.patterns:
            if compiled.search(text):
                return pattern
        return None


def is_host_name(host: str) -> bool:
    """A name a route can be kept for (not "[2001:db8::1]", not an address)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return bool(host) and "[" not in host
    return False
