"""Postfix SMTPD policy delegation, the codec: bytes in, bytes out, no I/O.

A request is `name=value` lines ended by an empty line; the reply is
`action=<access(5) action>` and an empty line (SMTPD_POLICY_README,
`util/attr_scan_plain.c`).  The reply uses LF only: Postfix reads a CR as
part of the value, and `DUNNO\\r` is an unknown restriction to it, which
answers the SMTP client `451 4.3.5 Server configuration error`.
"""
from __future__ import annotations

import ipaddress
import re

from ..config import normalize_address
from ..model import FALLBACK_REPLY, Action, Decision, Header, IPAddress, Request

POLICY_REQUEST = "smtpd_access_policy"

# What a ProtocolError message may quote of the client's bytes.
QUOTE_LIMIT = 40

# Attributes that Postfix leaves out, sends empty, or sends as "0" when it
# has no value (SMTPD_POLICY_README); None then means "the MTA did not say"
# and lets the engine look the name up itself.
_NAME_ATTRIBUTES = ("client_name", "reverse_client_name")
_MISSING = ("", "0")


class ProtocolError(Exception):
    """The client broke the protocol or a limit; the connection must close.

    The message is short and quotes at most QUOTE_LIMIT characters of what
    the client sent, so it is safe for one log line.
    """


def quote(data: bytes | str) -> str:
    """A truncated repr of client data, for a log line."""
    text = repr(data[:QUOTE_LIMIT])
    return text + "..." if len(data) > QUOTE_LIMIT else text


class RequestReader:
    """Splits a byte stream into requests, whatever the chunk boundaries.

    Limits are checked as bytes arrive: a line that is too long fails as
    soon as it is longer than allowed, not when its newline finally comes.
    After a ProtocolError the reader is spent; the connection must close.
    """

    def __init__(self, max_line_length: int, max_attributes: int, max_request_size: int):
        self.max_line_length = max_line_length
        self.max_attributes = max_attributes
        self.max_request_size = max_request_size
        self._line = bytearray()          # the line being received, no LF yet
        self._attributes: dict[str, str] = {}
        self._attribute_lines = 0
        self._request_size = 0            # octets of the request so far, LFs included
        self._error: ProtocolError | None = None
        # Octets pushed and not parsed yet: _data from _start on.  Kept as
        # the chunk and an offset, so that taking one request at a time
        # from a chunk of many copies nothing.
        self._data = b""
        self._start = 0

    @property
    def error(self) -> ProtocolError | None:
        """The error found after the requests the last feed() returned."""
        return self._error

    @property
    def pending(self) -> bool:
        """True when part of a request has arrived (parsed or not)."""
        return bool(self._line) or self._request_size > 0 or self._start < len(self._data)

    @property
    def buffered(self) -> bool:
        """True when pushed octets are not parsed yet: next() may have a request."""
        return self._start < len(self._data)

    @property
    def partial(self) -> bool:
        """True when everything pushed is parsed and ends inside a request:
        the rest of it is the client's to send."""
        return (bool(self._line) or self._request_size > 0) and self._start >= len(self._data)

    def push(self, data: bytes) -> None:
        """Takes more bytes without parsing them; next() parses."""
        if self._start < len(self._data):
            self._data = self._data[self._start:] + data
        else:
            self._data = data
        self._start = 0

    def next(self) -> dict[str, str] | None:
        """The next request in what was pushed, or None until more arrives.

        Raises ProtocolError on bad input; the reader is spent then.
        """
        if self._error is not None:
            raise self._error
        if self._start >= len(self._data):
            return None
        try:
            return self._consume()
        except ProtocolError as error:
            self._error = error
            self._data, self._start = b"", 0
            raise

    def feed(self, data: bytes) -> list[dict[str, str]]:
        """Takes more bytes, returns the requests they complete, in order.

        Raises ProtocolError on bad input.  When requests were completed
        before the bad input in the same chunk, they are returned first and
        the error is kept in `error` (and raised by the next feed), so what
        happens does not depend on how the stream was chunked.
        """
        if self._error is not None:
            raise self._error
        self.push(data)
        requests: list[dict[str, str]] = []
        try:
            while (request := self.next()) is not None:
                requests.append(request)
        except ProtocolError:
            if not requests:
                raise
        return requests

    def _consume(self) -> dict[str, str] | None:
        """Parses from _start until one request is complete (returned) or
        the pushed octets are used up (None)."""
        data, start = self._data, self._start
        while start < len(data):
            if not self._line and not self._request_size:
                # A whole request in the chunk, as Postfix sends them: parsed
                # at once.  Anything unusual (a limit reached, a bad line, a
                # CR) is left to the line-by-line path below, which says
                # exactly what is wrong.
                end = data.find(b"\n\n", start)
                if end >= 0:
                    attributes = self._whole_request(data, start, end)
                    if attributes is not None:
                        self._start = end + 2
                        return attributes
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            self._line += data[start:end]
            self._start = end
            self._check_partial()
            if newline < 0:
                return None
            start = self._start = newline + 1
            line = bytes(self._line)
            self._line.clear()
            self._request_size += len(line) + 1
            if self._request_size > self.max_request_size:
                raise ProtocolError(f"request larger than {self.max_request_size} octets")
            if line.endswith(b"\r"):
                # Tolerated on input (a hand-typed test through socat); never sent.
                line = line[:-1]
            if line:
                self._add_attribute(line)
            else:
                attributes = self._attributes
                self._attributes = {}
                self._attribute_lines = 0
                self._request_size = 0
                return attributes
        return None

    def _whole_request(self, data: bytes, start: int, end: int) -> dict[str, str] | None:
        """The request in data[start:end] (its empty line at `end`), or None
        to leave it to the line-by-line path."""
        block = data[start:end]
        if end - start + 2 > self.max_request_size or b"\r" in block:
            return None
        # Decoded once: surrogateescape maps each byte that is not UTF-8 to
        # one code point, so a line of N octets that is ASCII stays N long,
        # and the length check below is on octets whenever it matters.
        text = block.decode("utf-8", "surrogateescape")
        lines = text.split("\n")
        if len(lines) > self.max_attributes or not lines[0]:
            return None
        limit = self.max_line_length
        if text.isascii():
            if max(map(len, lines)) > limit:
                return None
        elif any(len(line.encode("utf-8", "surrogateescape")) > limit for line in lines):
            return None
        attributes = {}
        for line in lines:
            name, equals, value = line.partition("=")
            if not equals or not name:
                return None
            attributes[name] = value
        return attributes

    def _check_partial(self) -> None:
        line = self._line[:-1] if self._line.endswith(b"\r") else self._line
        if len(line) > self.max_line_length:
            raise ProtocolError(f"line longer than {self.max_line_length} octets: "
                                f"{quote(bytes(line))}")
        if self._request_size + len(self._line) > self.max_request_size:
            raise ProtocolError(f"request larger than {self.max_request_size} octets")

    def _add_attribute(self, line: bytes) -> None:
        self._attribute_lines += 1
        if self._attribute_lines > self.max_attributes:
            raise ProtocolError(f"more than {self.max_attributes} attributes in one request")
        name, equals, value = line.partition(b"=")
        if not equals:
            raise ProtocolError(f"line without '=': {quote(line)}")
        if not name:
            raise ProtocolError(f"attribute without a name: {quote(line)}")
        # surrogateescape: an address that is not UTF-8 reaches the engine
        # intact instead of failing here or turning into U+FFFD.
        self._attributes[name.decode("utf-8", "surrogateescape")] = \
            value.decode("utf-8", "surrogateescape")


def _client_address(text: str):
    candidate = text.strip()
    if candidate[:5].lower() == "ipv6:":
        # Postfix sends bare addresses; a milter-style "IPv6:" prefix from a
        # home-made client is still the same address.
        candidate = candidate[5:]
    if not candidate or "%" in candidate:
        # A zone index (fe80::1%eth0) names no host the DNS knows.
        raise ProtocolError(f"client_address is not an IP address: {quote(text)}")
    try:
        # The family by its look: ip_address() would try IPv4 first and
        # build an exception for every IPv6 address.
        address: IPAddress = (ipaddress.IPv6Address(candidate) if ":" in candidate
                              else ipaddress.IPv4Address(candidate))
    except ValueError:
        raise ProtocolError(f"client_address is not an IP address: {quote(text)}") from None
    return normalize_address(address)


def request_from_attributes(attributes: dict[str, str]) -> Request:
    """The attributes of one policy request as a Request.

    Raises ProtocolError when it is not an smtpd_access_policy request or
    lacks a usable client_address.
    """
    kind = attributes.get("request")
    if kind != POLICY_REQUEST:
        raise ProtocolError(f"not an {POLICY_REQUEST} request: request={quote(kind or '')}")
    if "client_address" not in attributes:
        raise ProtocolError("request without client_address")
    names = {}
    for key in _NAME_ATTRIBUTES:
        value = attributes.get(key)
        names[key] = None if value is None or value in _MISSING else value
    return Request(
        client_address=_client_address(attributes["client_address"]),
        helo=attributes.get("helo_name", ""),
        sender=attributes.get("sender", ""),
        recipient=attributes.get("recipient", ""),
        queue_id=attributes.get("queue_id", ""),
        instance=attributes.get("instance", ""),
        sasl_username=attributes.get("sasl_username", ""),
        client_name=names["client_name"],
        reverse_client_name=names["reverse_client_name"],
        protocol_state=attributes.get("protocol_state", "").upper() or "RCPT",
        # Postfix 2.3 / 2.2 / 2.9 (SMTPD_POLICY_README): empty without TLS
        # or without a client certificate.
        encryption_protocol=attributes.get("encryption_protocol", ""),
        encryption_cipher=attributes.get("encryption_cipher", ""),
        ccert_fingerprint=attributes.get("ccert_fingerprint", ""),
        ccert_pubkey_fingerprint=attributes.get("ccert_pubkey_fingerprint", ""),
    )


# --- replies ---------------------------------------------------------------

_UNSAFE_IN_REPLY = re.compile(r"[\r\n\0]")
_FOLDING = re.compile(r"\r?\n[ \t]*")
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")   # RFC 5322 §2.2 ftext
_REPLY_CODE = {Action.REJECT: re.compile(r"^5[0-9][0-9]$"),
               Action.DEFER: re.compile(r"^4[0-9][0-9]$")}
_STATUS = re.compile(r"^([45])\.[0-9]{1,3}\.[0-9]{1,3}$")   # RFC 3463 §2

def encode_reply(action_text: str) -> bytes:
    """`action=...` and the empty line that ends the reply, LF only.

    CR, LF and NUL in the text become spaces: any of them would end or
    corrupt the reply.  Text that is not UTF-8 (a surrogate-escaped client
    byte) becomes '?': Postfix with smtputf8_enable refuses such a reply.
    """
    text = _UNSAFE_IN_REPLY.sub(" ", action_text).strip()
    if not text:
        # An empty action is OK to Postfix (access(5)): never send one.
        raise ValueError("empty policy action")
    return b"action=" + text.encode("utf-8", "replace") + b"\n\n"


def _reply_text(decision: Decision) -> str:
    fallback = FALLBACK_REPLY[decision.action]
    code, status, text = fallback.code, fallback.status, fallback.text
    reply = decision.reply
    if reply is not None and _REPLY_CODE[decision.action].match(reply.code):
        code, text = reply.code, reply.text
        status_match = _STATUS.match(reply.status or "")
        # RFC 3463 §2: the class digit of the status matches the reply code.
        status = reply.status if status_match and status_match.group(1) == code[0] else ""
    return " ".join(part for part in (code, status, text.strip()) if part)


def _prepend(header: Header) -> str:
    if not _HEADER_NAME.match(header.name):
        raise ValueError(f"not a header field name: {header.name!r}")
    # PREPEND takes one line; unfold (RFC 5322 §2.2.3) rather than cut.
    value = _FOLDING.sub(" ", header.value).strip()
    return f"PREPEND {header.name}: {value}"


def reply_for(decision: Decision, header: Header | None) -> str:
    """The one mapping from a Decision to the policy action text.

    `header` is the header to add with this reply, if any (Postfix adds one
    header per PREPEND reply); it is ignored unless the action accepts.
    """
    match decision.action:
        case Action.REJECT | Action.DEFER:
            return _reply_text(decision)
        case Action.ACCEPT:
            # DUNNO, never OK: the MTA's own restrictions still apply
            # (an OK before reject_unauth_destination would open relaying).
            return _prepend(header) if header is not None else "DUNNO"
        case _:
            raise AssertionError(f"no policy reply for {decision.action!r}")
