"""The milter front-end: libmilter callbacks -> Request -> the engine ->
setreply, header edits and the DKIM signature; one `PolicyMilter` per SMTP
session.  When it decides and what it asks the MTA for: docs/milter.md,
"The milter's protocol side".
"""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import dkim
import Milter

from ..checks import dkim as dkim_check
from ..config import normalize_address
from ..dns import budget as dns_budget
from ..engine import Engine
from ..model import (FALLBACK_REPLY, Action, Decision, DkimCheck, DkimResult, Header,
                     IPAddress, Reply, Request, internal_form)
from ..service import log_decision, log_value
from ..signing import signer as dkim_signer
from .macros import Macros

log = logging.getLogger("policyd.milter")

# The macros each stage needs, asked for with setsymlist (at most 5 per
# stage).  Names as both Postfix (MILTER_README) and Sendmail (op.me) spell
# them; `i` is the queue id, empty in Postfix until the first RCPT is
# accepted, so it is read again at every later stage.
#
# TLS for relay.require_tls: {tls_version} and {cipher} come at HELO
# unasked (Postfix's milter_helo_macros and Sendmail's defaults), again at
# the EHLO after STARTTLS.  Neither MTA has a macro for a client
# certificate's fingerprint: relay.certificate_fingerprints is the policy
# service's.
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

# A signed message is kept in memory until end of message for DKIM, up to
# milter.dkim.max_held_bytes; past that its body is hashed as it arrives
# (checks/dkim.py BodyHasher) and only its header fields stay.

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

# The same answer when libmilter hands us a message of a connection we never
# saw open (no connect callback: pymilter could not decode its host name,
# or the MTA sent MAIL before CONNECT).  Without the client's address there
# is nothing to check, and accepting unchecked would be the fail-open the
# milter exists to prevent; a 4xx keeps the mail in the sender's queue
# while the admin reads the warning (no MTA we know sends either: Postfix
# and Sendmail pass a validated host name or "[address]").
UNKNOWN_CLIENT = dataclasses.replace(ENGINE_FAILURE, rule="milter.no-connect")

# Outbound mail that should be DKIM-signed and cannot be, with
# signing.on_error: defer (policyd/signing/signer.py says when).
SIGNING_FAILURE = dataclasses.replace(ENGINE_FAILURE, rule="dkim.sign")

# The session whose callback runs in this thread: libmilter runs each MTA
# connection in a thread of its own, and report_callback_error needs it.
_current = threading.local()


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
    if value.isascii() and value.replace("\n\t", " ").isprintable():
        # The usual case: headers.py and the DKIM signer made it so already,
        # folded (if at all) as "\n\t".
        return value
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
    max_held: int = 1048576            # milter.dkim.max_held_bytes
    queue_id: str = ""
    sasl_username: str = ""
    encryption_protocol: str = ""
    encryption_cipher: str = ""
    # Names the message to the rate limits, which count a message once
    # however many recipients it has (Postfix's policy `instance`).
    instance: str = ""
    recipient: str = ""
    request: Request | None = None
    envelope: Decision | None = None
    logged: bool = False
    results_fields: int = 0            # Authentication-Results fields seen
    forged_results: list[int] = field(default_factory=list)
    signed: bool = False               # a DKIM-Signature field was seen
    # DKIM signing of an outbound message, begun once its envelope is
    # accepted (dkim_signer.start_message); None for inbound mail.
    signing: dkim_signer.MessageSigning | dkim_signer.SigningResult | None = None
    # Ignored for mypy: mypy 1.0 takes default_factory=list for a List[_T]
    # that does not match an Optional field.
    fields: list[tuple[str, bytes, bool]] | None = field(
        default_factory=list)  # type: ignore[assignment]
    chunks: list[bytes] | None = field(default_factory=list)  # type: ignore[assignment]
    size: int = 0                      # octets kept so far
    in_body: bool = False
    unverifiable: str = ""             # why DKIM cannot be verified, "" if it can
    hasher: dkim_check.BodyHasher | None = None   # the body past max_held, hashed
    hashed_headers: list | None = None            # the fields the hasher was made from

    def add_header(self, name: str, value: bytes, leading_space: bool,
                   authserv_id: str) -> None:
        if isinstance(self.signing, dkim_signer.MessageSigning):
            self.signing.add_header(name, value, leading_space)
        if self.in_body:
            # libmilter passes no field after the body; should one come,
            # the fields kept are not the message's.
            self._drop("message fields out of order")
            return
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
            if self.size > self.max_held:
                # The fields themselves past the ceiling: the signed ones
                # cannot be hashed without keeping them all.
                self._drop("message header too large to verify")
            else:
                self.fields.append((name, value, leading_space))

    def add_body(self, chunk: bytes) -> None:
        if isinstance(self.signing, dkim_signer.MessageSigning):
            self.signing.add_body(chunk)
        if not self.in_body:
            self.in_body = True
            if not self.signed:
                self._drop()   # nothing to verify: no reason to keep it
        if self.hasher is not None:
            self.hasher.update(chunk)
        elif self.chunks is not None:
            self.size += len(chunk)
            self.chunks.append(chunk)
            if self.size > self.max_held and self.fields is not None:
                self._stream(self.fields, self.chunks)

    def _stream(self, fields: list[tuple[str, bytes, bool]], chunks: list[bytes]) -> None:
        """Past the ceiling: the body so far and from now on goes into
        each signature's body hash, and is no longer kept."""
        headers = self.dkim_headers()
        if headers is None:
            try:
                headers, _ = dkim.rfc822_parse(self._head(fields))
            except dkim.MessageFormatError:
                self._drop("message header does not parse")
                return
        self.hasher, self.hashed_headers = dkim_check.BodyHasher(headers), headers
        for chunk in chunks:
            self.hasher.update(chunk)
        self.chunks = None
        self.size = sum(len(name) + len(value) + 4 for name, value, _ in fields)

    def message_bytes(self) -> bytes | None:
        """The message as received, CRLF line ends, for DKIM; None when it
        was not kept (unsigned, too large, or verification is off)."""
        if self.fields is None or self.chunks is None:
            return None
        return self._head(self.fields) + b"\r\n" + b"".join(self.chunks)

    def _head(self, fields: list[tuple[str, bytes, bool]]) -> bytes:
        # The field as received: MTAs send continuation lines separated
        # by "\n" and, without SMFIP_HDR_LEADSPC, eat one space after
        # the colon.
        head = b"".join(
            name.encode("latin-1", "replace") + b":" + (value if leading_space else b" " + value)
            + b"\r\n" for name, value, leading_space in fields)
        if b"\n" in head.replace(b"\r\n", b""):
            head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return head

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

    def _drop(self, unverifiable: str = "") -> None:
        self.fields = self.chunks = self.hasher = self.hashed_headers = None
        self.unverifiable = self.unverifiable or unverifiable


# --- the callbacks ----------------------------------------------------------

def _guarded(callback):
    """A callback that never raises into pymilter, whose exception policy is
    CONTINUE (server.py says why): a fault of ours is logged with its
    traceback, and the session's mail is answered 451 4.3.0 at the next
    callback that answers (RCPT, end of message), never accepted unchecked."""
    @functools.wraps(callback)
    def guarded(self, *args):
        try:
            return callback(self, *args)
        except Exception:
            log.exception("the milter failed in its %s callback; this session's mail "
                          "is answered 451 4.3.0", callback.__name__)
            self.failed = True
            if callback.__name__ in ("envrcpt", "eom"):
                return self._failed()
            return Milter.CONTINUE
    return guarded


@Milter.header_leading_space
class PolicyMilter(Milter.Base):
    """One MTA connection.

    engine: the engine current when the connection opened.  on_close:
    called once when libmilter closes the connection (the server counts
    sessions in flight for a graceful stop).
    """

    def __init__(self, engine: Engine, on_close: Callable[[], None] | None = None):
        self.engine = engine
        self._on_close = on_close
        self.client_address: IPAddress | None = None
        self.client_name: str | None = None
        self.reverse_client_name: str | None = None
        self.helo = ""
        self.tls = ("", "")                # {tls_version} and {cipher} at the last HELO
        self.message: _Message | None = None
        self.connected = False             # the connect callback reached us
        self.failed = False                # a callback of ours raised (_guarded)
        self.unreadable_connect = False    # pymilter could not decode the connect
        self.odd_macros: set[str] = set()  # macros warned about as not UTF-8
        self._macros = Macros()
        _current.milter = self

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
        if not self.engine.config.milter.dkim.verify and not self.engine.config.signing.table:
            # Without DKIM verification or signing the body is of no use to
            # us: the MTA need not send it, nor we take it chunk by chunk.
            protocol |= offered_protocol & Milter.P_NOBODY
        opts[0] = self._actions
        opts[1] = self._protocol = protocol
        opts[2] = opts[3] = 0
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def connect(self, hostname, family, hostaddr):
        _current.milter = self   # an MTA without option negotiation starts here
        self.connected = True
        self.client_address = client_address(family, hostaddr)
        if self.client_address is None:
            log.debug("connect from %s: not an IP client, not checked", log_value(hostname))
            return Milter.CONTINUE
        self.client_name, self.reverse_client_name = names_from_macros(
            self.macro("{client_resolve}"), self.macro("{client_ptr}"),
            self.macro("{client_name}"))
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def hello(self, name):
        self.helo = name
        if self.engine.per_recipient:
            self.tls = (self.macro("{tls_version}") or "", self.macro("{cipher}") or "")
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def envfrom(self, sender, *parameters):
        self._end_message()
        # The client's text, not Postfix's internal form that the policy
        # service is sent: read the same way (comments, quotes), so that
        # both front-ends judge the domain the message is delivered with.
        self.message = _Message(envelope_address(internal_form(sender)),
                                self.engine.config.milter.dkim.max_held_bytes,
                                queue_id=self.macro("i") or "",
                                sasl_username=self.macro("{auth_authen}") or "")
        if self.engine.per_recipient:
            self.message.encryption_protocol, self.message.encryption_cipher = self.tls
            self.message.instance = "milter." + secrets.token_hex(8)
        if not self.engine.config.milter.dkim.verify:
            self.message.skip_content()
        return Milter.CONTINUE

    @_guarded
    def envrcpt(self, recipient, *parameters):
        if self.failed:
            return self._failed()
        message = self.message
        if message is not None and not self.connected:
            return self._unknown_client(message, "RCPT")
        if message is None or self.client_address is None:
            return Milter.CONTINUE
        message.queue_id = self.macro("i") or message.queue_id
        if self.engine.per_recipient:
            return self._recipient(message, self.client_address, recipient)
        if message.envelope is None:
            message.recipient = envelope_address(internal_form(recipient))
            message.request = self._request(message, self.client_address, "RCPT")
            message.envelope = self._decide(message.request)
            message.signing = self._start_signing(message, message.envelope)
            if message.envelope.action is not Action.ACCEPT:
                # The message ends here: one log line now.  An accepted one
                # is logged at end of message, with its DKIM results.
                log_decision(message.request, message.envelope)
                message.logged = True
        return self._send(respond(message.envelope, end_of_message=False))

    def _recipient(self, message: _Message, client_address: IPAddress, recipient: str) -> int:
        """With relay checks or limits on, each recipient is decided (is it
        relayed? is it counted?), as the policy service decides each RCPT;
        the first accepted one's decision is the message's."""
        request = self._request(message, client_address, "RCPT",
                                envelope_address(internal_form(recipient)))
        decision = self._decide(request)
        if decision.action is Action.ACCEPT:
            if message.envelope is None:
                message.recipient, message.request = request.recipient, request
                message.envelope = decision
                message.signing = self._start_signing(message, decision)
        else:
            log_decision(request, decision)   # a refused recipient: its line now
        return self._send(respond(decision, end_of_message=False))

    @Milter.noreply
    @Milter.decode("bytes")
    @_guarded
    def header(self, name, value):
        if self.message is not None:
            self.message.add_header(name, value, bool(self._protocol & Milter.P_HDR_LEADSPC),
                                    self.engine.config.authserv_id)
        return Milter.CONTINUE

    @Milter.noreply
    @_guarded
    def body(self, chunk):
        if self.message is not None:
            self.message.add_body(chunk)
        return Milter.CONTINUE

    @_guarded
    def eom(self):
        message = self.message
        if message is None:
            return Milter.CONTINUE
        if self.failed:
            self.message = None
            return self._failed()
        if not self.connected:
            self.message = None
            return self._unknown_client(message, "END-OF-MESSAGE")
        message.queue_id = self.macro("i") or message.queue_id
        if self.client_address is None:
            # Not ours to judge, but a forged result is removed all the same.
            response = respond(Decision(Action.ACCEPT), True, tuple(message.forged_results))
        else:
            request = message.request or self._request(message, self.client_address, "RCPT")
            envelope = message.envelope or self._decide(request)
            request = dataclasses.replace(request, queue_id=message.queue_id,
                                          protocol_state="END-OF-MESSAGE")
            final = self._signed(self._decide_message(request, envelope, message), message)
            log_decision(request, final)
            message.logged = True
            response = respond(final, True, tuple(message.forged_results))
        self.message = None
        return self._send(response)

    @_guarded
    def abort(self):
        self._end_message()
        return Milter.CONTINUE

    @_guarded
    def close(self):
        self._end_message()
        if getattr(_current, "milter", None) is self:
            _current.milter = None
        if self._on_close is not None:
            self._on_close()
        return Milter.CONTINUE

    # -- what pymilter could not decode ----------------------------------------

    def macro(self, name: str) -> str | None:
        """A macro's value; one that is not UTF-8 (pymilter decodes macros
        strictly) as its bytes with surrogateescape, as model.Request
        takes them."""
        try:
            value = self._macros.get(getattr(self, "_ctx", None), name, self.getsymval)
        except UnicodeDecodeError as error:
            value = error.object
        if not isinstance(value, bytes):
            return value
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            value = _escaped(value)
            if name not in self.odd_macros:   # "i" is read at three stages
                self.odd_macros.add(name)
                log.warning("the MTA's macro %s is not UTF-8 (%s); taken as received",
                            name, log_value(value))
            return value

    def undecodable(self, raw: bytes) -> None:
        """pymilter's C module decodes the connect host name, the HELO name
        and a field name as strict UTF-8 before any Python code runs, and,
        when that fails, answers the callback itself (libmilter turns its
        answer into no reply where we negotiated none), so our callback is
        never called.  report_callback_error brings the bytes here; which
        callback it was follows from the session's state (libmilter passes
        HELO only outside a message, fields only inside one)."""
        text = _escaped(raw)
        if not self.connected and not self.unreadable_connect:
            self.unreadable_connect = True
            log.warning("connect: the host name is not UTF-8 (%s), so pymilter passes no "
                        "connect information; this connection's mail is answered 451 4.3.0",
                        log_value(text))
        elif self.message is None:
            # The HELO check runs on the name as received: not UTF-8, it is
            # no domain name, as the policy service finds it too.
            self.helo = text
            log.warning("HELO name is not UTF-8 (%s); checked as received", log_value(text))
        else:
            self.message._drop("message header does not parse")
            log.warning("%s: a header field name is not UTF-8 (%s); DKIM is not verified",
                        self.message.queue_id or "NOQUEUE", log_value(text))

    def _failed(self) -> int:
        try:
            return self._send(respond(ENGINE_FAILURE, end_of_message=False))
        except Exception:
            return Milter.TEMPFAIL

    def _unknown_client(self, message: _Message, stage: str) -> int:
        if not message.logged:
            message.logged = True
            log.warning("%s: %s of a connection whose connect did not reach the milter "
                        "(sender=%s); answering 451 4.3.0", message.queue_id or "NOQUEUE",
                        stage, log_value(message.sender) or "<>")
        return self._send(respond(UNKNOWN_CLIENT, end_of_message=stage == "END-OF-MESSAGE"))

    # -- helpers -------------------------------------------------------------

    def _request(self, message: _Message, client_address: IPAddress, state: str,
                 recipient: str | None = None) -> Request:
        return Request(client_address=client_address, helo=self.helo,
                       sender=message.sender,
                       recipient=message.recipient if recipient is None else recipient,
                       queue_id=message.queue_id, instance=message.instance,
                       sasl_username=message.sasl_username,
                       client_name=self.client_name,
                       reverse_client_name=self.reverse_client_name,
                       protocol_state=state, encryption_protocol=message.encryption_protocol,
                       encryption_cipher=message.encryption_cipher)

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
            # The DKIM key lookups are the DNS of this stage: dns.timeout
            # bounds all their waits for answers that never come, together.
            with dns_budget(self.engine.config.dns.timeout):
                dkim_results = self._dkim(message)
            return self.engine.decide_message(request, envelope, dkim_results)
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
            if message.hasher is not None and message.hashed_headers is not None:
                # Past max_held_bytes: the body was hashed as it came.
                return dkim_check.verify_parsed(message.hashed_headers, message.hasher,
                                                self.engine.resolver)
            headers = message.dkim_headers()
            if headers is not None:
                # The usual case: no message to put together and parse again.
                return dkim_check.verify_parsed(headers, message.body_bytes(),
                                                self.engine.resolver)
            content = message.message_bytes()
            if content is None:
                # RFC 8601 §2.7.1 neutral: a signature not otherwise able to
                # be processed.
                return (DkimCheck(DkimResult.NEUTRAL,
                                  reason=message.unverifiable or "message not kept"),)
            return dkim_check.verify(content, self.engine.resolver)
        except Exception:
            # dkimpy tripping over a message is no reason to hold mail back:
            # the signature is reported as not processed (RFC 8601 §2.7.1).
            log.exception("%s: DKIM verification failed", message.queue_id or "NOQUEUE")
            return (DkimCheck(DkimResult.NEUTRAL, reason="verification failed"),)

    def _start_signing(self, message: _Message, envelope: Decision
                       ) -> dkim_signer.MessageSigning | dkim_signer.SigningResult | None:
        """DKIM signing for a message whose envelope is accepted, when it is
        outbound (signing/outbound.py): its client authorized to relay
        (Decision.relay; without relay checks configured, a SASL login the
        MTA reports), or own-domain mail from nat.networks.  None else."""
        if envelope.action is not Action.ACCEPT or self.client_address is None:
            return None
        authorized_by = (envelope.relay.authorized_by if envelope.relay is not None
                         else "sasl" if message.sasl_username else "")
        # The login and the relay checks: a login's From is held to
        # relay.sender_ownership as its MAIL FROM was (signing/outbound.py).
        return dkim_signer.start_message(self.engine.config, authorized_by, self.client_address,
                                         message.sasl_username, self.engine.relay)

    def _signed(self, final: Decision, message: _Message) -> Decision:
        """The message's DKIM-Signature fields above the other headers; an
        outbound message that cannot be signed is deferred, or with
        signing.on_error: accept passed unsigned, logged either way."""
        if message.signing is None or final.action is not Action.ACCEPT:
            return final
        result = dkim_signer.finish(message.signing)
        if result.status == "error":
            log.error("%s: outbound message not DKIM-signed: %s", message.queue_id or "NOQUEUE",
                      result.reason)
            if result.defer and not self.engine.config.test_mode:
                return dataclasses.replace(SIGNING_FAILURE, signing=result.log_value())
        return dataclasses.replace(final, headers=result.headers + final.headers,
                                   signing=result.log_value())

    def _end_message(self) -> None:
        """A message that ends without end of message (RSET, QUIT, a
        rejected RCPT): its envelope decision gets its one log line."""
        message = self.message
        if message is not None and message.envelope is not None and not message.logged \
                and message.request is not None:   # set with the envelope decision
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


def _escaped(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def report_callback_error(kind, error, traceback) -> None:
    """sys.excepthook of a milter process.  pymilter's C module prints an
    exception of a callback through it (PyErr_Print), in the session's own
    thread; one raised before any Python code ran (no traceback) is input
    it could not decode, a protocol condition of that session: one warning,
    and the session goes on (see PolicyMilter.undecodable).  Anything else
    is a fault of ours and keeps its traceback."""
    session = getattr(_current, "milter", None)
    if traceback is None and isinstance(error, UnicodeDecodeError) and session is not None \
            and isinstance(error.object, bytes):
        session.undecodable(error.object)
        return
    if traceback is None:
        log.error("a milter callback failed before it ran: %s", log_value(str(error)))
        return
    sys.__excepthook__(kind, error, traceback)
