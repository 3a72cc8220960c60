"""Postfix's socketmap protocol without I/O: netstrings in, requests out,
replies to netstrings.

socketmap_table(5): a request is the netstring of "name SPACE key", a
reply the netstring of "OK SPACE data", "NOTFOUND SPACE", "TEMP SPACE
reason", "TIMEOUT SPACE reason" or "PERM SPACE reason".  A netstring is
"LENGTH:DATA," with LENGTH in decimal (D. J. Bernstein's netstrings).
"""
from __future__ import annotations

import enum
import re
import typing
from dataclasses import dataclass


class ProtocolError(Exception):
    """Input no socketmap client sends; the connection must close.  The
    message is for the log only."""


class Status(enum.Enum):
    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    PERM = "PERM"


@dataclass(frozen=True)
class Reply:
    status: Status
    data: str = ""   # the value for OK, the reason for TEMP and PERM

    def encode(self) -> bytes:
        return encode_reply(self)


NOTFOUND = Reply(Status.NOTFOUND)

# What may go back in a reply: printable ASCII and spaces.  Postfix puts
# an OK's data into its own records (a DSN text, a DNS filter action);
# no control character from a key we echo may end up there.
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def encode_reply(reply: Reply) -> bytes:
    data = _UNSAFE.sub("?", reply.data)
    payload = f"{reply.status.value} {data}".encode("ascii")
    return b"%d:%s," % (len(payload), payload)


def encode_request(name: str, key: str) -> bytes:
    """What Postfix sends (for tests and `policyd routes`' own checks)."""
    payload = f"{name} {key}".encode()
    return b"%d:%s," % (len(payload), payload)


class NetstringReader:
    """Splits a byte stream into netstring payloads, whatever the chunk
    boundaries, within `max_size` octets of payload; a length longer than
    that fails as soon as its digits say so, not once the data arrived.
    After a ProtocolError the reader is spent."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._digits = len(str(max_size))
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> bool:
        """Part of a request has arrived."""
        return bool(self._buffer)

    def push(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> bytes | None:
        """The next payload, or None until more arrives; ProtocolError on
        bad input."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        colon = buffer.find(b":", 0, self._digits + 1)
        if colon < 0:
            head = buffer[:self._digits + 1]
            if head and not head.isdigit():
                self._fail("not a netstring length")
            if len(head) > self._digits:
                self._fail(f"netstring longer than {self.max_size} octets")
            return None
        length_text = bytes(buffer[:colon])
        if not length_text.isdigit() or (len(length_text) > 1 and length_text[0:1] == b"0"):
            # Netstrings: no sign, no leading zeros, at least one digit.
            self._fail("not a netstring length")
        length = int(length_text)
        if length > self.max_size:
            self._fail(f"netstring longer than {self.max_size} octets")
        end = colon + 1 + length
        if len(buffer) <= end:
            return None
        if buffer[end] != ord(","):
            self._fail("netstring not ended by a comma")
        payload = bytes(buffer[colon + 1:end])
        del buffer[:end + 1]
        return payload

    def _fail(self, message: str) -> typing.NoReturn:
        self._error = ProtocolError(message)
        raise self._error


@dataclass(frozen=True)
class Request:
    name: str
    key: str


def parse_request(payload: bytes) -> Request | Reply:
    """A request, or the reply for one that is framed well but says
    nothing we can look up (the connection goes on)."""
    name, space, key = payload.partition(b" ")
    if not space or not name or not key:
        return Reply(Status.PERM, "expected: name key")
    try:
        # A key is DNS text or a delivery status (ASCII, or UTF-8 with
        # SMTPUTF8); undecodable octets become U+FFFD, never an error.
        return Request(name.decode("ascii"), key.decode("utf-8", "replace"))
    except UnicodeDecodeError:
        return Reply(Status.PERM, "unknown map name")
