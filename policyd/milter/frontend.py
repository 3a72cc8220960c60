"""The milter front-end: libmilter callbacks -> Request -> the engine ->
setreply and header edits.

libmilter (through pymilter) creates one `PolicyMilter` per MTA connection,
that is per SMTP session, and runs its callbacks in a thread of its own; a
session may carry several messages.  The engine is shared and immutable, so
each session only keeps the engine it started with (a reload swaps the
engine for the sessions that start after it) and its own state.

When to decide.  The envelope verdict comes at the first RCPT, as the policy
service gives it (Postfix evaluates its restrictions there with the default
`smtpd_delay_reject=yes`), and the same verdict answers every recipient of
the message.  At end of message the engine adds DKIM (`decide_message`);
only then can headers be edited (milter API: header changes are EOM-only).

What the MTA tells us.  The client address comes with the connect callback.
The MTA's own reverse lookup comes in macros that neither Postfix nor
Sendmail sends by default, so `negotiate` asks for them with setsymlist
(Postfix 2.6+, Sendmail 8.14+).  Without it an admin configures them
(contrib/sendmail/README, contrib/postfix/main.cf.*) and, when they are
missing, the engine does its own PTR and forward lookups.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import Callable

import Milter

from ..checks import dkim as dkim_check
from ..config import normalize_address
from ..engine import Engine
from ..model import (FALLBACK_REPLY, Action, Decision, DkimCheck, DkimResult, Header,
                     IPAddress, Reply, Request)
from ..service import log_decision

log = logging.getLogger("policyd.milter")

# The macros each stage needs, asked for with setsymlist (at most 5 per
# stage).  Names as both Postfix (MILTER_README) and Sendmail (op.me) spell
# them; `i` is the queue id, empty in Postfix until the first RCPT is
# accepted, so it is read again at every later stage.
MACROS = {
    Milter.M_CONNECT: ("{client_name}", "{client_ptr}", "{client_resolve}"),
    Milter.M_ENVFROM: ("i", "{auth_authen}"),
    Milter.M_ENVRCPT: ("i",),
    Milter.M_EOM: ("i",),
}

# The actions we use; asking for no more tells the MTA we never touch the
# body or the recipients.
ACTIONS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.SETSYMLIST

AUTHENTICATION_RESULTS = "Authentication-Results"

# A signed message is kept in memory until end of message for DKIM (dkimpy
# verifies whole messages).  Three times Postfix's default
# message_size_limit (10240000 octets) is room for any message an MTA with
# default limits accepts; a bigger one gets dkim=neutral.
DKIM_MESSAGE_LIMIT = 3 * 10240000

# RFC 5322 §3.6.8 field-name: printable ASCII but the colon; dkimpy reads
# a field's name the same way, up to the first colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_LINE_BREAK = re.compile(rb"\r?\n")

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its code
# and CRLF; libmilter refuses longer text (MAXREPLYLEN).
MAX_REPLY_TEXT = 400

# What an SMTP client hears when the engine itself fails: try again later
# (RFC 3463 §3.4: 4.3.0 other or undefined mail system status).
ENGINE_FAILURE = Decision(Action.DEFER, Reply("451", "4.3.0", "Temporary local problem, "
                                              "try again later"), rule="error")


# --- the one mapping from a Decision to the milter protocol -----------------

@dataclass(frozen=True)
class MilterResponse:
    """What one callback answers: a status, maybe a reply, header edits.

    deletions: (field name, index) for chgheader with an empty value, in
    the order to send them; the index counts fields of that name from 1 in
    the message as received (Postfix cleanup_milter.c, Sendmail milter.c).
    insertions: headers to insert at the top, top-down as they must end up.
    """
    status: int
    reply: tuple[str, str, str] | None = None
    deletions: tuple[tuple[str, int], ...] = ()
    insertions: tuple[Header, ...] = ()


def respond(decision: Decision, end_of_message: bool,
            forged_results: tuple[int, ...] = ()) -> MilterResponse:
    """The milter answer for a Decision, at RCPT or at end of message.

    forged_results: indexes (from 1) of the incoming Authentication-Results
    fields that carry our authserv-id; RFC 8601 §5 has them removed.
    """
    match decision.action:
        case Action.ACCEPT:
            if not end_of_message:
                # CONTINUE, never ACCEPT: ACCEPT before end of message skips
                # the rest of the message, and with it our headers.
                return MilterResponse(Milter.CONTINUE)
            # Deleting from the last one keeps the indexes of the others
            # valid whether the MTA counts deleted fields or not.
            deletions = tuple((AUTHENTICATION_RESULTS, index)
                              for index in sorted(set(forged_results), reverse=True))
            insertions = tuple(Header(h.name, _header_value(h)) for h in decision.headers)
            return MilterResponse(Milter.ACCEPT, deletions=deletions, insertions=insertions)
        case Action.REJECT:
            return MilterResponse(Milter.REJECT, reply=_smtp_reply(decision))
        case Action.DEFER:
            return MilterResponse(Milter.TEMPFAIL, reply=_smtp_reply(decision))
        case _:
            raise AssertionError(f"no milter answer for {decision.action!r}")


def _smtp_reply(decision: Decision) -> tuple[str, str, str]:
    fallback = FALLBACK_REPLY[decision.action]
    reply = decision.reply or fallback
    # RFC 5321 §4.2: a 4yz reply defers, a 5yz reply rejects; libmilter
    # and Postfix refuse a reply code that does not start with 4 or 5.
    wanted_class = "5" if decision.action is Action.REJECT else "4"
    if not (len(reply.code) == 3 and reply.code.isdigit() and reply.code[0] == wanted_class):
        reply = fallback
    status = reply.status or ""
    parts = status.split(".")
    # RFC 3463 §2: class.subject.detail, the class matching the reply code.
    if not (len(parts) == 3 and all(p.isdigit() and 0 < len(p) <= 3 for p in parts)
            and parts[0] == reply.code[0]):
        status = ""
    return reply.code, status, _reply_text(reply.text)


def _reply_text(text: str) -> str:
    """Printable ASCII on one line.  Sendmail reads the text as a printf
    format and Postfix turns "%%" back into "%" (milter8.c), so a '%' is
    doubled: the SMTP client sees it once, through either MTA."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text.strip())
    return printable[:MAX_REPLY_TEXT].replace("%", "%%")


def _header_value(header: Header) -> str:
    """A value the MTA inserts as one field, whatever it holds: printable
    ASCII, and a line break only as folding (followed by white space;
    headers.py folds an over-long Authentication-Results that way)."""
    value = header.value
    if value.isascii() and value.isprintable():
        return value   # the usual case: headers.py made it so already
    value = "".join(c if c in "\t\n" or " " <= c <= "~" else "?"
                    for c in value.replace("\r\n", "\n").replace("\r", "\n"))
    lines = value.split("\n")
    return lines[0] + "".join("\n" + (line if line[:1] in (" ", "\t") else " " + line)
                              for line in lines[1:])


# --- what the MTA tells us --------------------------------------------------

def client_address(family: int, hostaddr) -> IPAddress | None:
    """The SMTP client's address from the connect callback, or None when the
    connection is not TCP/IP (Postfix's non_smtpd_milters, Sendmail -bs):
    such mail is not an SMTP client's to judge, as for the policy service,
    which Postfix never asks about it either."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    # pymilter gives (address, port[, flow, scope]); Milter.testctx a string.
    text = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else hostaddr
    if not isinstance(text, str) or "%" in text:
        return None   # a zone index (fe80::1%eth0) names no host the DNS knows
    try:
        return normalize_address(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        return None


def names_from_macros(resolve: str | None, ptr: str | None,
                      name: str | None) -> tuple[str | None, str | None]:
    """(client_name, reverse_client_name) in the sense of Postfix's policy
    attributes, from the MTA's own lookup: the forward-confirmed name or
    "unknown", and the PTR name or "unknown".

    {client_resolve} says how the lookup went in both MTAs: OK (confirmed),
    FORGED (PTR not confirmed), FAIL (no usable PTR), TEMP.  (None, None)
    means "look it up yourself": the macro is missing, TEMP, or unknown.
    """
    verdict = (resolve or "").strip().upper()
    ptr_name = _host_name(ptr)
    if verdict == "OK":
        confirmed = _host_name(name) or ptr_name
        return (confirmed, ptr_name or confirmed) if confirmed else (None, None)
    if verdict == "FORGED":
        return "unknown", ptr_name or "unknown"
    if verdict == "FAIL":
        return "unknown", "unknown"
    return None, None


def _host_name(value: str | None) -> str:
    """A host name from a macro; "" for "unknown" and for Sendmail's
    bracketed address, which it uses when there is no name."""
    value = (value or "").strip().rstrip(".")
    if not value or value.lower() == "unknown" or value.startswith("["):
        return ""
    return value


def envelope_address(text: str) -> str:
    """MAIL FROM / RCPT TO argument without the angle brackets; "" for <>."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 §2.2:
    [CFWS] authserv-id, a token or quoted-string), "" if there is none."""
    position, length, depth = 0, len(value), 0
    while position < length:   # CFWS: white space and (nested) comments
        char = value[position]
        if char == "\\" and depth:
            position += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and not char.isspace():
            break
        position += 1
    if position < length and value[position] == '"':
        result, position = [], position + 1
        while position < length and value[position] != '"':
            if value[position] == "\\":
                position += 1
            result.append(value[position:position + 1])
            position += 1
        return "".join(result)
    end = position
    while end < length and not value[end].isspace() and value[end] not in ';(':
        end += 1
    return value[position:end]


# --- one message ------------------------------------------------------------

@dataclass
class _Message:
    """Per-message state; a new one at every MAIL FROM.

    The fields and body chunks are kept as the MTA sent them and put
    together only at end of message, and only for a signed message: most
    of what a header callback does is then a list append (one Python call
    per field is what the milter protocol costs already).
    """
    sender: str
    queue_id: str = ""
    sasl_username: str = ""
    recipient: str = ""
    request: Request | None = None
    envelope: Decision | None = None
    logged: bool = False
    results_fields: int = 0            # Authentication-Results fields seen
    forged_results: list[int] = field(default_factory=list)
    signed: bool = False               # a DKIM-Signature field was seen
    fields: list[tuple[str, bytes, bool]] | None = field(default_factory=list)
    chunks: list[bytes] | None = field(default_factory=list)
    size: int = 0                      # octets kept so far
    in_body: bool = False
    too_large: bool = False

    def add_header(self, name: str, value: bytes, leading_space: bool,
                   authserv_id: str) -> None:
        lowered = name.lower()
        if lowered == "authentication-results":
            self.results_fields += 1
            found = authserv_id_of(value.decode("latin-1"))
            if found.lower() == authserv_id.lower():
                self.forged_results.append(self.results_fields)
        elif lowered == "dkim-signature":
            self.signed = True
        if self.fields is not None:
            self.size += len(name) + len(value) + 4
            if self.size > DKIM_MESSAGE_LIMIT:
                self._drop(too_large=True)
            else:
                self.fields.append((name, value, leading_space))

    def add_body(self, chunk: bytes) -> None:
        if not self.in_body:
            self.in_body = True
            if not self.signed:
                self._drop()   # nothing to verify: no reason to keep it
        if self.chunks is not None:
            self.size += len(chunk)
            if self.size > DKIM_MESSAGE_LIMIT:
                self._drop(too_large=True)
            else:
                self.chunks.append(chunk)

    def message_bytes(self) -> bytes | None:
        """The message as received, CRLF line ends, for DKIM; None when it
        was not kept (unsigned, too large, or verification is off)."""
        if self.fields is None or self.chunks is None:
            return None
        # The field as received: MTAs send continuation lines separated
        # by "\n" and, without SMFIP_HDR_LEADSPC, eat one space after
        # the colon.
        head = b"".join(
            name.encode("latin-1", "replace") + b":" + (value if leading_space else b" " + value)
            + b"\r\n" for name, value, leading_space in self.fields)
        if b"\n" in head.replace(b"\r\n", b""):
            head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        content = head + b"\r\n" + b"".join(self.chunks)
        if len(content) > DKIM_MESSAGE_LIMIT:
            self.too_large = True
            return None
        return content

    def dkim_headers(self) -> list[list[bytes]] | None:
        """The fields as dkimpy reads them from message_bytes()
        (rfc822_parse: [name, value], the value's lines joined by CRLF and
        ended by one), made directly, without a message to parse; None when
        a field is not plain (a name dkimpy would read otherwise, an empty
        or unindented line in a value), or when nothing was kept."""
        if self.fields is None or self.chunks is None:
            return None
        headers = []
        for name, value, leading_space in self.fields:
            if not _FIELD_NAME.fullmatch(name):
                return None
            if not leading_space:
                value = b" " + value
            if b"\n" in value:
                lines = _LINE_BREAK.split(value)
                if not all(line[:1] in (b" ", b"\t") for line in lines[1:]):
                    return None
                value = b"\r\n".join(lines)
            headers.append([name.encode("ascii"), value + b"\r\n"])
        return headers

    def body_bytes(self) -> bytes:
        """The body as received, CRLF line ends, for DKIM."""
        return dkim_check.crlf_body(b"".join(self.chunks or ()))

    def skip_content(self) -> None:
        """DKIM verification is off: nothing of the message is kept."""
        self._drop()

    def _drop(self, too_large: bool = False) -> None:
        self.fields = self.chunks = None
        self.too_large = self.too_large or too_large


# --- the callbacks ----------------------------------------------------------

@Milter.header_leading_space
class PolicyMilter(Milter.Base):
    """One MTA connection.

    engine: the engine current when the connection opened.  on_close:
    called once when libmilter closes the connection (the runner counts
    sessions in flight for a graceful stop).
    """

    def __init__(self, engine: Engine, on_close: Callable[[], None] | None = None):
        self.engine = engine
        self._on_close = on_close
        self.client_address: IPAddress | None = None
        self.client_name: str | None = None
        self.reverse_client_name: str | None = None
        self.helo = ""
        self.message: _Message | None = None

    def negotiate(self, opts):
        """Ask for the macros we read and say which actions we use.

        Like Milter.Base.negotiate, except that an MTA without setsymlist
        still gets our protocol choices (no reply to header, ...) instead of
        libmilter's defaults."""
        offered_actions, offered_protocol = opts[0], opts[1]
        self._actions = offered_actions & ACTIONS
        if self._actions & Milter.SETSYMLIST:
            for stage, macros in MACROS.items():
                # Straight to the context: Milter.Base.setsymlist (pymilter
                # 1.0.5) hands it bytes where it takes str, and fails.
                self._ctx.setsymlist(stage, " ".join(macros))
        else:
            log.info("the MTA cannot be asked for macros (no setsymlist); "
                     "it sends what it is configured to send")
        protocol = offered_protocol & ~self.protocol_mask()
        if not self.engine.config.milter.dkim.verify:
            # Without DKIM verification the body is of no use to us: the
            # MTA need not send it, nor we take it chunk by chunk.
            protocol |= offered_protocol & Milter.P_NOBODY
        opts[0] = self._actions
        opts[1] = self._protocol = protocol
        opts[2] = opts[3] = 0
        return Milter.CONTINUE

    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        self.client_address = client_address(family, hostaddr)
        if self.client_address is None:
            log.debug("connect from %r: not an IP client, not checked", hostname)
            return Milter.CONTINUE
        self.client_name, self.reverse_client_name = names_from_macros(
            self.getsymval("{client_resolve}"), self.getsymval("{client_ptr}"),
            self.getsymval("{client_name}"))
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, name):
        self.helo = name
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, sender, *parameters):
        self._end_message()
        self.message = _Message(envelope_address(sender),
                                queue_id=self.getsymval("i") or "",
                                sasl_username=self.getsymval("{auth_authen}") or "")
        if not self.engine.config.milter.dkim.verify:
            self.message.skip_content()
        return Milter.CONTINUE

    def envrcpt(self, recipient, *parameters):
        message = self.message
        if message is None or self.client_address is None:
            return Milter.CONTINUE
        message.queue_id = self.getsymval("i") or message.queue_id
        if message.envelope is None:
            message.recipient = envelope_address(recipient)
            message.request = self._request(message, "RCPT")
            message.envelope = self._decide(message.request)
            if message.envelope.action is not Action.ACCEPT:
                # The message ends here: one log line now.  An accepted one
                # is logged at end of message, with its DKIM results.
                log_decision(message.request, message.envelope)
                message.logged = True
        return self._send(respond(message.envelope, end_of_message=False))

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name, value):
        if self.message is not None:
            self.message.add_header(name, value, bool(self._protocol & Milter.P_HDR_LEADSPC),
                                    self.engine.config.authserv_id)
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        if self.message is not None:
            self.message.add_body(chunk)
        return Milter.CONTINUE

    def eom(self):
        message = self.message
        if message is None:
            return Milter.CONTINUE
        message.queue_id = self.getsymval("i") or message.queue_id
        if self.client_address is None:
            # Not ours to judge, but a forged result is removed all the same.
            response = respond(Decision(Action.ACCEPT), True, tuple(message.forged_results))
        else:
            request = message.request or self._request(message, "RCPT")
            envelope = message.envelope or self._decide(request)
            request = dataclasses.replace(request, queue_id=message.queue_id,
                                          protocol_state="END-OF-MESSAGE")
            final = self._decide_message(request, envelope, message)
            log_decision(request, final)
            message.logged = True
            response = respond(final, True, tuple(message.forged_results))
        self.message = None
        return self._send(response)

    def abort(self):
        self._end_message()
        return Milter.CONTINUE

    def close(self):
        self._end_message()
        if self._on_close is not None:
            self._on_close()
        return Milter.CONTINUE

    # -- helpers -------------------------------------------------------------

    def _request(self, message: _Message, state: str) -> Request:
        return Request(client_address=self.client_address, helo=self.helo,
                       sender=message.sender, recipient=message.recipient,
                       queue_id=message.queue_id, sasl_username=message.sasl_username,
                       client_name=self.client_name,
                       reverse_client_name=self.reverse_client_name,
                       protocol_state=state)

    def _decide(self, request: Request) -> Decision:
        try:
            # Headers come at end of message, with the DKIM results.
            return self.engine.decide(request, with_headers=False)
        except Exception:
            log.exception("%s: the engine failed; answering 451 4.3.0",
                          request.queue_id or "NOQUEUE")
            return ENGINE_FAILURE

    def _decide_message(self, request: Request, envelope: Decision,
                        message: _Message) -> Decision:
        try:
            return self.engine.decide_message(request, envelope,
                                              self._dkim(message))
        except Exception:
            log.exception("%s: the engine failed at end of message; answering 451 4.3.0",
                          request.queue_id or "NOQUEUE")
            return ENGINE_FAILURE

    def _dkim(self, message: _Message) -> tuple[DkimCheck, ...]:
        if not self.engine.config.milter.dkim.verify:
            return ()
        if not message.signed:
            return (DkimCheck(DkimResult.NONE),)
        try:
            headers = message.dkim_headers()
            if headers is not None:
                # The usual case: no message to put together and parse again.
                return dkim_check.verify_parsed(headers, message.body_bytes(),
                                                self.engine.resolver)
            content = message.message_bytes()
            if content is None:
                # RFC 8601 §2.7.1 neutral: a signature not otherwise able to
                # be processed.
                return (DkimCheck(DkimResult.NEUTRAL, reason="message too large to verify"),)
            return dkim_check.verify(content, self.engine.resolver)
        except Exception:
            # dkimpy tripping over a message is no reason to hold mail back:
            # the signature is reported as not processed (RFC 8601 §2.7.1).
            log.exception("%s: DKIM verification failed", message.queue_id or "NOQUEUE")
            return (DkimCheck(DkimResult.NEUTRAL, reason="verification failed"),)

    def _end_message(self) -> None:
        """A message that ends without end of message (RSET, QUIT, a
        rejected RCPT): its envelope decision gets its one log line."""
        message = self.message
        if message is not None and message.envelope is not None and not message.logged:
            log_decision(message.request, message.envelope)
        self.message = None

    def _send(self, response: MilterResponse) -> int:
        if response.reply is not None:
            self.setreply(*response.reply)
        if response.deletions and not self._actions & Milter.CHGHDRS:
            log.warning("the MTA does not let us delete headers; "
                        "forged Authentication-Results stay")
        else:
            for name, index in response.deletions:
                self.chgheader(name, index, "")
        # With SMFIP_HDR_LEADSPC the MTA takes the value as is, space included.
        lead = " " if self._protocol & Milter.P_HDR_LEADSPC else ""
        for header in reversed(response.insertions):
            self.addheader(header.name, lead + header.value, 0)
        return response.status
