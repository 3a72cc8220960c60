"""The `routing:` config section (read by policyd/config.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# The refusal texts of receivers that will not take mail from an IPv6
# address without reverse DNS, matched case-insensitively against the
# reply with its continuation prefixes ("550-5.7.1 ") taken out and its
# white space folded (routing/refusals.py).  Each is a real text:
DEFAULT_REFUSAL_PATTERNS = (
    # Gmail: "550-5.7.1 [2001:db8::25] Our system has detected that this
    # message does not meet IPv6 sending guidelines regarding PTR records
    # and authentication. Please review
    # https://support.google.com/mail/?p=IPv6AuthError for more information."
    r"does not meet IPv6 sending guidelines regarding PTR records",
    # Gmail: "550-5.7.25 [2001:db8::25] The IP address sending this message
    # does not have a PTR record setup, or the corresponding forward DNS
    # entry does not point to the sending IP."
    r"does not have a PTR record setup",
    # Microsoft (Outlook.com, Exchange Online): "450 4.7.25 Service
    # unavailable, sending IPv6 address [2001:db8::25] must have reverse
    # DNS record." (earlier with 550 5.7.25)
    r"sending IPv6 address \S* ?must have reverse DNS record",
    # Postfix receivers, reject_unknown_reverse_client_hostname (and
    # reject_unknown_client_hostname, its "cannot find your hostname"):
    # "554 5.7.1 <a@b>: Client host rejected: cannot find your reverse
    # hostname, [2001:db8::25]" (smtpd_check.c; 450 4.7.25 since 3.x).
    r"Client host rejected: cannot find your (?:reverse )?hostname",
    # Others (e.g. mail.ru, various appliances): "550 inconsistent or no
    # DNS PTR record for 2001:db8::25"
    r"inconsistent or no DNS PTR record",
)

# Learned routes are kept 30 days unless refreshed (issue 13): long enough
# that a destination is not refused again every week, short enough that
# one whose receiver has changed its rules is tried over IPv6 again.
DEFAULT_LEARNED_TTL = 30 * 86400


@dataclass(frozen=True)
class RoutingConfig:
    """IPv4-only outbound delivery per destination (docs/routing.md)."""
    listen: tuple[str, ...] = field(default=(), metadata={
        "kind": "socket",
        "doc": "Where the socketmap service listens (inet:HOST:PORT or unix:PATH); "
               "empty: off.  Postfix's smtp runs chrooted on Debian: loopback TCP, "
               "or a UNIX socket under /var/spool/postfix."})
    socket_mode: str = field(default="0660", metadata={
        "kind": "mode", "doc": "Mode of a unix: socket."})
    socket_group: str = field(default="", metadata={
        "doc": "Group of a unix: socket (postfix, for Postfix to connect)."})
    ipv4_only: bool = field(default=False, metadata={
        "doc": "Deliver all outbound mail over IPv4 (every AAAA record of the SMTP "
               "client's lookups is ignored)."})
    ipv4_only_domains: tuple[str, ...] = field(default=(), metadata={
        "kind": "domain",
        "doc": "Recipient domains (and their subdomains) delivered over IPv4 only: "
               "the AAAA records of their MX hosts are ignored."})
    ipv4_only_hosts: tuple[str, ...] = field(default=(), metadata={
        "kind": "domain",
        "doc": "MX host names (and names below them) delivered to over IPv4 only."})
    learn: bool = field(default=True, metadata={
        "doc": "Learn IPv4-only routes from refusals of deliveries over IPv6 "
               "(smtp_delivery_status_filter) and defer such a refusal with 4.x.x."})
    learned_ttl: int = field(default=DEFAULT_LEARNED_TTL, metadata={
        "doc": "Seconds a learned route is kept (30 days)."})
    refusal_patterns: tuple[str, ...] = field(default=DEFAULT_REFUSAL_PATTERNS, metadata={
        "doc": "Regular expressions (Python, case-insensitive) for the reply texts of "
               "reverse-DNS refusals; an X.7.25 status (RFC 7372) always counts."})
    max_routes: int = field(default=100000, metadata={
        "doc": "Learned routes kept in memory (without redis); the oldest go first."})
    # A socketmap request is "name SPACE key"; the longest key is a delivery
    # status text, one SMTP reply of a few lines (smtp_line_length_limit
    # 990 per line): 16 KiB is far above any real one.
    max_request_size: int = field(default=16384, metadata={
        "doc": "Longest socketmap request (netstring payload) in octets."})
    idle_timeout: float = field(default=330.0, metadata={
        "doc": "Seconds a connection may stay idle between requests."})
    request_timeout: float = field(default=30.0, metadata={
        "doc": "Seconds a request may take to arrive from its first octet."})
    max_connections: int = field(default=1000, metadata={
        "doc": "Connections served at once; more are closed at once."})
    drain_timeout: float = field(default=5.0, metadata={
        "doc": "Seconds requests in flight may take at a stop."})

    def problems(self, config):
        for number, pattern in enumerate(self.refusal_patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                yield "refusal_patterns", f"pattern {number + 1} {pattern!r}: {error}"
        if self.learned_ttl < 60:
            yield "learned_ttl", f"{self.learned_ttl} is less than 60 seconds"
        if self.max_request_size < 512:
            yield "max_request_size", f"{self.max_request_size} is less than 512"
        if self.max_connections < 1:
            yield "max_connections", f"{self.max_connections} is not at least 1"
