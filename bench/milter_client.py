"""A minimal MTA side of the milter protocol (version 6), for the
benchmark and the integration tests.

It speaks to a milter the way Postfix's milter8.c does: option
negotiation first, macros before the event they belong to (sent even when
the milter skips the event), no wait for a reply the milter said it will
not send (SMFIP_NR_*), no event the milter asked not to get (SMFIP_NO*).
Every packet is a 4-octet big-endian length, a command octet, and data;
strings are NUL-terminated.  No I/O happens beyond the socket it is given.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

VERSION = 6

# Commands, MTA to milter (libmilter/mfdef.h).
SMFIC_ABORT, SMFIC_BODY, SMFIC_CONNECT, SMFIC_MACRO = b"A", b"B", b"C", b"D"
SMFIC_BODYEOB, SMFIC_HELO, SMFIC_HEADER, SMFIC_MAIL = b"E", b"H", b"L", b"M"
SMFIC_EOH, SMFIC_OPTNEG, SMFIC_QUIT, SMFIC_RCPT, SMFIC_DATA = b"N", b"O", b"Q", b"R", b"T"

# Replies, milter to MTA.
SMFIR_ADDRCPT, SMFIR_DELRCPT, SMFIR_ACCEPT, SMFIR_REPLBODY = b"+", b"-", b"a", b"b"
SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_CHGHEADER, SMFIR_PROGRESS = b"c", b"d", b"m", b"p"
SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_ADDHEADER, SMFIR_INSHEADER = b"r", b"t", b"h", b"i"
SMFIR_REPLYCODE, SMFIR_QUARANTINE, SMFIR_SKIP = b"y", b"q", b"s"
FINAL_REPLIES = {SMFIR_ACCEPT, SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_REJECT,
                 SMFIR_TEMPFAIL, SMFIR_REPLYCODE, SMFIR_SKIP}

# Protocol steps and their "no reply" bits (mfdef.h).
SMFIP_NOCONNECT, SMFIP_NOHELO, SMFIP_NOMAIL, SMFIP_NORCPT = 0x1, 0x2, 0x4, 0x8
SMFIP_NOBODY, SMFIP_NOHDRS, SMFIP_NOEOH, SMFIP_NR_HDR = 0x10, 0x20, 0x40, 0x80
SMFIP_NOUNKNOWN, SMFIP_NODATA, SMFIP_SKIP, SMFIP_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
SMFIP_NR_CONN, SMFIP_NR_HELO, SMFIP_NR_MAIL, SMFIP_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
SMFIP_NR_DATA, SMFIP_NR_UNKN, SMFIP_NR_EOH, SMFIP_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
SMFIP_HDR_LEADSPC = 0x100000
ALL_PROTOCOL = 0x1FFFFF
ALL_ACTIONS = 0x1FF

# Macro stages in SETSYMLIST (mfapi.h SMFIM_*).
SMFIM_CONNECT, SMFIM_HELO, SMFIM_ENVFROM, SMFIM_ENVRCPT = 0, 1, 2, 3
SMFIM_DATA, SMFIM_EOM, SMFIM_EOH = 4, 5, 6

# Postfix's milter8.c refuses larger packets (XXX_MAX_DATA).
MAX_PACKET = 2 * 65535
BODY_CHUNK = 65535


class ProtocolError(Exception):
    pass


@dataclass
class Reply:
    """One final reply and the modifications sent before it."""
    command: bytes
    data: bytes = b""
    modifications: list[tuple[bytes, bytes]] = field(default_factory=list)

    @property
    def smtp(self) -> tuple[str, str, str] | None:
        """(code, enhanced status, text) of a SMFIR_REPLYCODE, else None."""
        if self.command != SMFIR_REPLYCODE:
            return None
        text = self.data.rstrip(b"\0").decode("utf-8", "replace")
        code, _, rest = text.partition(" ")
        first, _, remainder = rest.partition(" ")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return code, first, remainder
        return code, "", rest

    def headers(self, kind: bytes) -> list[tuple[int | None, str, str]]:
        """(index, name, value) of the modifications of one kind."""
        result = []
        for command, data in self.modifications:
            if command != kind:
                continue
            index = None
            if command in (SMFIR_INSHEADER, SMFIR_CHGHEADER):
                index, data = struct.unpack("!I", data[:4])[0], data[4:]
            name, _, value = data.partition(b"\0")
            value = value[:-1] if value.endswith(b"\0") else value
            result.append((index, name.decode("latin-1"), value.decode("latin-1")))
        return result


class MilterClient:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.actions = 0
        self.protocol = 0
        self.symlists: dict[int, list[str]] = {}
        self._buffer = bytearray()

    @classmethod
    def connect_to(cls, spec: str, timeout: float = 30.0) -> MilterClient:
        """libmilter's socket syntax: inet:PORT@HOST, inet6:PORT@HOST, unix:PATH."""
        kind, _, rest = spec.partition(":")
        if kind in ("unix", "local"):
            sock, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), rest
        else:
            port, _, host = rest.partition("@")
            family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
            sock, address = socket.socket(family, socket.SOCK_STREAM), (host.strip("[]"),
                                                                        int(port))
            # Postfix's side is the same: no Nagle delay on our small writes.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    # -- packets -----------------------------------------------------------

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + command + data)

    def read(self) -> tuple[bytes, bytes]:
        header = self._read_exactly(4)
        length = struct.unpack("!I", header)[0]
        if not 1 <= length <= MAX_PACKET:
            raise ProtocolError(f"bad packet length {length}")
        packet = self._read_exactly(length)
        return packet[:1], packet[1:]

    def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            data = self.sock.recv(65536)
            if not data:
                raise ProtocolError("connection closed by the milter")
            self._buffer += data
        result = bytes(self._buffer[:count])
        del self._buffer[:count]
        return result

    def reply(self) -> Reply:
        """Modifications up to a final reply (progress packets skipped)."""
        modifications = []
        while True:
            command, data = self.read()
            if command == SMFIR_PROGRESS:
                continue
            if command in FINAL_REPLIES:
                return Reply(command, data, modifications)
            modifications.append((command, data))

    # -- the session -----------------------------------------------------

    def negotiate(self, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL) -> None:
        self.send(SMFIC_OPTNEG, struct.pack("!III", VERSION, actions, protocol))
        command, data = self.read()
        if command != SMFIC_OPTNEG or len(data) < 12:
            raise ProtocolError(f"bad negotiation reply {command!r}")
        _version, self.actions, self.protocol = struct.unpack("!III", data[:12])
        rest = data[12:]
        while len(rest) >= 4:
            stage = struct.unpack("!I", rest[:4])[0]
            names, _, rest = rest[4:].partition(b"\0")
            self.symlists[stage] = names.decode("ascii").split()

    def macro(self, command: bytes, macros: dict[str, str]) -> None:
        data = b"".join(_cstring(name) + _cstring(value) for name, value in macros.items())
        self.send(SMFIC_MACRO, command + data)

    def _event(self, command: bytes, data: bytes, skip_bit: int, no_reply_bit: int,
               macros: dict[str, str] | None) -> Reply | None:
        if macros:
            self.macro(command, macros)
        if self.protocol & skip_bit:
            return None
        self.send(command, data)
        if self.protocol & no_reply_bit:
            return None
        return self.reply()

    def conninfo(self, hostname: str, address: str | None, port: int = 25,
                 macros: dict[str, str] | None = None) -> Reply | None:
        """address None: a non-IP client (SMFIA_UNKNOWN)."""
        if address is None:
            data = _cstring(hostname) + b"U"
        else:
            family = b"6" if ":" in address else b"4"
            data = _cstring(hostname) + family + struct.pack("!H", port) + _cstring(address)
        return self._event(SMFIC_CONNECT, data, SMFIP_NOCONNECT, SMFIP_NR_CONN, macros)

    def helo(self, name: str, macros: dict[str, str] | None = None) -> Reply | None:
        return self._event(SMFIC_HELO, _cstring(name), SMFIP_NOHELO, SMFIP_NR_HELO, macros)

    def mail(self, sender: str | bytes, *esmtp: str,
             macros: dict[str, str] | None = None) -> Reply | None:
        data = _cstring(sender) + b"".join(_cstring(p) for p in esmtp)
        return self._event(SMFIC_MAIL, data, SMFIP_NOMAIL, SMFIP_NR_MAIL, macros)

    def rcpt(self, recipient: str | bytes, *esmtp: str,
             macros: dict[str, str] | None = None) -> Reply | None:
        data = _cstring(recipient) + b"".join(_cstring(p) for p in esmtp)
        return self._event(SMFIC_RCPT, data, SMFIP_NORCPT, SMFIP_NR_RCPT, macros)

    def data(self, macros: dict[str, str] | None = None) -> Reply | None:
        return self._event(SMFIC_DATA, b"", SMFIP_NODATA, SMFIP_NR_DATA, macros)

    def header(self, name: str, value: str | bytes) -> Reply | None:
        """value as it follows "Name:" in the message; the one space after
        the colon is removed unless SMFIP_HDR_LEADSPC was negotiated."""
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if not self.protocol & SMFIP_HDR_LEADSPC and raw.startswith(b" "):
            raw = raw[1:]
        return self._event(SMFIC_HEADER, _cstring(name) + raw + b"\0", SMFIP_NOHDRS,
                           SMFIP_NR_HDR, None)

    def eoh(self) -> Reply | None:
        return self._event(SMFIC_EOH, b"", SMFIP_NOEOH, SMFIP_NR_EOH, None)

    def body(self, content: bytes) -> Reply | None:
        last = None
        for start in range(0, len(content), BODY_CHUNK):
            last = self._event(SMFIC_BODY, content[start:start + BODY_CHUNK], SMFIP_NOBODY,
                               SMFIP_NR_BODY, None)
            if last is not None and last.command == SMFIR_SKIP:
                break
        return last

    def eom(self, macros: dict[str, str] | None = None) -> Reply:
        if macros:
            self.macro(SMFIC_BODYEOB, macros)
        self.send(SMFIC_BODYEOB)
        return self.reply()

    def message(self, message: bytes) -> list[Reply | None]:
        """Headers, end of headers and body of a whole message (CRLF or LF
        line ends), the way an MTA splits it; the replies in order."""
        head, _, body = message.replace(b"\r\n", b"\n").partition(b"\n\n")
        replies = []
        fields: list[list[bytes]] = []
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1].append(line)
            elif line:
                fields.append([line])
        for lines in fields:
            name, _, first = lines[0].partition(b":")
            # MTAs send continuation lines separated by "\n" (milter8.c).
            value = b"\n".join([first] + lines[1:])
            replies.append(self.header(name.decode("latin-1"), value))
        replies.append(self.eoh())
        if body:
            replies.append(self.body(body.replace(b"\n", b"\r\n")))
        return replies

    def abort(self) -> None:
        self.send(SMFIC_ABORT)

    def quit(self) -> None:
        self.send(SMFIC_QUIT)
        self.close()


def _cstring(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return raw + b"\0"
