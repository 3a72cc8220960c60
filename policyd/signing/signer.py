"""DKIM signing (RFC 6376 §5, RFC 8463): from the header fields and body a
milter is handed to the DKIM-Signature fields to insert at the top.
Signer holds one config's keys (signer_for), MessageSigning one message
on its way, start_message decides whether a message is ours to sign.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..checks.dkim import _CanonicalStream, _relaxed_headers
from ..config import Config
from ..model import Header, IPAddress
from . import outbound
from .keys import KeyFileError, PrivateKey, kept, load_key
from .settings import OnSigningError, SigningConfig
from .table import Pattern, Table, from_address, parse_pattern

if TYPE_CHECKING:
    from ..relay.authorization import RelayPolicy

log = logging.getLogger("policyd.signing")

FIELD_NAME = "DKIM-Signature"

# Existing DKIM-Signature fields looked at for one of ours (resign: false);
# as checks/dkim.MAX_SIGNATURES, more is an attack, not mail.
MAX_OWN_CHECKS = 5

# The signature field is folded to lines of about this many characters
# (RFC 5322 §2.1.1: SHOULD be no more than 78).
FOLD_AT = 76

_LINE_BREAK = re.compile(rb"\r?\n")
_WSP = re.compile(rb"\s+")


@dataclass(frozen=True)
class SigningResult:
    """What signing one message came to.

    status: "signed"; "unsigned" (nothing of ours to sign: not outbound
    after all, or no line of the table for its From); "already" (it
    carries a valid signature of ours); "error" (it should have been
    signed and cannot be: `on_error` says what the milter does)."""
    status: str
    headers: tuple[Header, ...] = ()
    reason: str = ""
    defer: bool = False      # on_error: defer and status error

    def log_value(self) -> str:
        """For the decision's log line: sign=signed:example.org/s1+s2."""
        return f"{self.status}:{self.reason}" if self.reason else self.status


@dataclass(frozen=True)
class _Line:
    """A table line with its key, read."""
    domain: str
    selector: str
    key: PrivateKey


class Signer:
    """The keys of one `signing:` config, read once, when it is made
    (signer_for: once per config a process is given, so at start and at
    each reload); thread-safe (each message gets a MessageSigning of its
    own).

    The hashes follow RFC 6376 §3.7 exactly as checks/dkim.py verifies them
    (tests/unit/signing holds the output to dkimpy's and OpenDKIM's
    verifiers); the private-key operation is OpenSSL's, through
    cryptography."""

    def __init__(self, config: SigningConfig, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        lines: list[tuple[Pattern, _Line]] = []
        # The keys the config load read and checked; a file is read here
        # only for a section made otherwise (tests, the benchmark).
        loaded: dict[str, PrivateKey] = dict(kept(config) or {})
        for line in config.table:
            if line.key_file not in loaded:
                loaded[line.key_file] = load_key(line.key_file)
            lines.append((parse_pattern(line.match),
                          _Line(line.signing_domain, line.selector, loaded[line.key_file])))
        # RSA first, the signature every verifier knows.
        lines.sort(key=lambda item: item[1].key.algorithm != "rsa-sha256")
        self.table = Table(lines)
        self.ours = {(line.domain, line.selector.lower()): line for _, line in lines}
        header_c, body_c = config.canonicalization.value.split("/")
        self.relaxed_header = header_c == "relaxed"
        self.relaxed_body = body_c == "relaxed"
        oversigned = [name.lower() for name in config.oversign]
        self.oversign = frozenset(oversigned)
        self.signed = tuple(dict.fromkeys([name.lower() for name in config.headers]
                                          + oversigned))
        self.canonicalization = config.canonicalization.value

    def start(self, origin: outbound.Origin, nat_own_domains: tuple[str, ...] = (),
              max_held: int = 1048576,
              from_check: Callable[[str], str] | None = None) -> MessageSigning:
        """`from_check`: the From address -> why it may not be signed, or
        "" (outbound.from_not_owned for a login's message)."""
        return MessageSigning(self, origin, nat_own_domains, max_held, from_check)

    # -- the hashes -------------------------------------------------------

    def header_hash(self, fields: list[tuple[bytes, bytes]], names: list[bytes],
                    signature_field: bytes, relaxed: bool):
        """RFC 6376 §3.7: the signed fields, chosen from the bottom up for a
        name listed several times (§5.4.2), a name listed more often than
        it occurs adding nothing (§5.4), then the signature field without
        its b= value and without its final CRLF.  `fields`: (name, value
        as in the message: leading space, CRLF folding, final CRLF)."""
        positions: dict[bytes, list[int]] = {}
        for index, (name, _) in enumerate(fields):
            positions.setdefault(name.lower(), []).append(index)
        chosen = []
        for name in names:
            stack = positions.get(name)
            if stack:
                chosen.append(fields[stack.pop()])
        signature = [(FIELD_NAME.encode(), signature_field)]
        if relaxed:
            chosen = _relaxed_headers(chosen)
            signature = _relaxed_headers(signature)
        hasher = hashlib.sha256()
        for name, value in chosen:
            hasher.update(name + b":" + value)
        for name, value in signature:
            hasher.update(name + b":" + value.rstrip(b"\r\n"))
        return hasher


class MessageSigning:
    """One message on its way through the milter, taken as it arrives: the
    header fields are kept (bounded by max_held), the body is
    canonicalized and hashed chunk by chunk and never kept, so a message
    of any size is signed in the memory of its header.  At end of message
    (finish) the From address picks the table's lines, and each line makes
    one signature over the same body hash: an RSA and an Ed25519 line make
    a dual signature (RFC 8463)."""

    def __init__(self, signer: Signer, origin: outbound.Origin,
                 nat_own_domains: tuple[str, ...], max_held: int,
                 from_check: Callable[[str], str] | None = None):
        self.signer = signer
        self.from_check = from_check
        self.origin = origin
        self.nat_own_domains = nat_own_domains
        self.max_held = max_held
        self.fields: list[tuple[bytes, bytes]] | None = []
        self.size = 0
        self.stream = _CanonicalStream(signer.relaxed_body, 65536)
        self.stream.add("body", hashlib.sha256(), None)
        self.unsignable = ""
        self.in_body = False

    def add_header(self, name: str, value: bytes, leading_space: bool = True) -> None:
        """One field as the milter gets it: its value with the space after
        the colon when `leading_space` (SMFIP_HDR_LEADSPC), its lines joined
        by LF or CRLF."""
        if self.fields is None:
            return
        if self.in_body:
            # libmilter passes no field after the body; should one come, the
            # fields kept are not the message's.
            self.fields = None
            self.unsignable = "header fields out of order"
            return
        self.size += len(name) + len(value) + 4
        if self.size > self.max_held:
            self.fields = None
            self.unsignable = "header too large to sign"
            return
        if not leading_space:
            value = b" " + value
        if b"\n" in value:
            value = b"\r\n".join(_LINE_BREAK.split(value))
        self.fields.append((name.encode("latin-1", "replace"), value + b"\r\n"))

    def add_body(self, chunk: bytes) -> None:
        self.in_body = True
        self.stream.feed(chunk)

    def finish(self) -> SigningResult:
        signer = self.signer
        fail = signer.config.on_error is OnSigningError.DEFER
        if self.fields is None:
            return SigningResult("error", reason=self.unsignable, defer=fail)
        froms = [value for name, value in self.fields if name.lower() == b"from"]
        address, why = from_address(froms)
        if not address:
            return SigningResult("unsigned", reason=why)
        domain = address.rpartition("@")[2].rstrip(".").lower()
        if not outbound.may_sign(self.origin, domain, self.nat_own_domains):
            return SigningResult("unsigned", reason="nat client, From not an own domain")
        if self.from_check is not None:
            why = self.from_check(address)
            if why:
                return SigningResult("unsigned", reason=why)
        lines: list[_Line] = signer.table.lookup(address)
        if not lines:
            return SigningResult("unsigned", reason=f"no key for {domain}")
        body_hash = self.stream.finish()["body"]
        if not signer.config.resign:
            own = self._own_valid_signature(body_hash)
            if own:
                return SigningResult("already", reason=own)
        try:
            headers = tuple(self._sign(line, body_hash) for line in lines)
        except Exception:
            log.exception("DKIM signing failed")
            return SigningResult("error", reason="signing failed", defer=fail)
        return SigningResult("signed", headers, f"{lines[0].domain}/" +
                             "+".join(line.selector for line in lines))

    # -- one signature ----------------------------------------------------

    def _sign(self, line: _Line, body_hash: bytes) -> Header:
        signer = self.signer
        assert self.fields is not None
        present: dict[bytes, int] = {}
        for field_name, _ in self.fields:
            lowered = field_name.lower()
            present[lowered] = present.get(lowered, 0) + 1
        names: list[bytes] = []
        for name in signer.signed:
            encoded = name.encode("ascii")
            count = present.get(encoded, 0) + (1 if name in signer.oversign else 0)
            names += [encoded] * count
        tags = [f"v=1; a={line.key.algorithm}; c={signer.canonicalization};",
                f"d={line.domain}; s={line.selector};", f"t={int(signer.clock())};"]
        unsigned = _fold(tags, [name.decode() + ":" for name in names],
                         "bh=" + base64.b64encode(body_hash).decode() + ";")
        # RFC 6376 §3.7: hashed with b= empty, as the verifier sees it after
        # removing its value; the value is then folded in after "b=".
        hasher = signer.header_hash(self.fields, names,
                                    b" " + unsigned.replace("\n", "\r\n").encode() + b"\r\n",
                                    signer.relaxed_header)
        signature = base64.b64encode(line.key.sign(hasher.digest())).decode()
        return Header(FIELD_NAME, unsigned + _fold_b(signature))

    def _own_valid_signature(self, body_hash: bytes) -> str:
        """"d/s" of a DKIM-Signature already in the message that one of our
        keys made and that still verifies (checked with the key itself, no
        DNS); "" if there is none."""
        assert self.fields is not None
        checked = 0
        for name, value in self.fields:
            if name.lower() != b"dkim-signature":
                continue
            checked += 1
            if checked > MAX_OWN_CHECKS:
                break
            try:
                tags = dkim.util.parse_tag_value(value.replace(b"\r\n", b""))
                key = (tags[b"d"].decode("ascii").lower().rstrip("."),
                       tags[b"s"].decode("ascii").lower())
            except (dkim.util.InvalidTagValueList, KeyError, UnicodeDecodeError):
                continue
            line = self.signer.ours.get(key)
            if line is None or b"l" in tags or tags.get(b"a") != line.key.algorithm.encode():
                continue
            if self._verifies(line, tags, value, body_hash):
                return f"{key[0]}/{key[1]}"
        return ""

    def _verifies(self, line: _Line, tags: dict, value: bytes, body_hash: bytes) -> bool:
        assert self.fields is not None
        c = tags.get(b"c", b"simple/simple").decode("ascii", "replace")
        header_c, _, body_c = c.partition("/")
        if (body_c or "simple") != self.signer.canonicalization.split("/")[1]:
            return False   # another body hash than the one computed: sign again
        try:
            if base64.b64decode(_WSP.sub(b"", tags.get(b"bh", b""))) != body_hash:
                return False
            signature = base64.b64decode(_WSP.sub(b"", tags.get(b"b", b"")))
        except ValueError:
            return False
        names = [name.strip().lower() for name in tags.get(b"h", b"").split(b":")]
        emptied = _B_VALUE.sub(b"\\1", value)
        digest = self.signer.header_hash(self.fields, names, emptied,
                                         header_c == "relaxed").digest()
        public = line.key.key.public_key()
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            elif isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signature, digest)
            else:
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


# checks/dkim.py's b= pattern: the value emptied, its "b=" kept.
_B_VALUE = re.compile(rb"([;\s]b\s*=)(?:[\sA-Za-z0-9+/=]*[A-Za-z0-9+/=])?(?:\r?\n\Z)?")


def _fold(tags: list[str], header_names: list[str], body_hash: str) -> str:
    """The signature field's value up to and including "b=", folded with
    "\\n\\t" to lines of about FOLD_AT characters: between tags, and
    inside h= (RFC 6376 §3.5: FWS is allowed around h='s colons)."""
    # (text, separator from the piece before it on the same line)
    pieces = [(tag, " ") for tag in tags]
    for n, name in enumerate(header_names):
        last = n == len(header_names) - 1
        pieces.append(((name.rstrip(":") + ";") if last else name, " " if n == 0 else ""))
        if n == 0:
            pieces[-1] = ("h=" + pieces[-1][0], " ")
    pieces.append((body_hash, " "))
    lines, current = [], " " * len(FIELD_NAME + ": ")   # the first line's field name
    for text, separator in pieces:
        if current.strip() and len(current) + len(separator) + len(text) > FOLD_AT:
            lines.append(current)
            current = text
        else:
            current = current + separator + text if current.strip() else current + text
    lines.append(current)
    lines[0] = lines[0].lstrip()
    return "\n\t".join(lines) + "\n\tb="


def _fold_b(signature: str) -> str:
    """b='s value in lines; the FWS in it is removed with the value by
    the verifier (RFC 6376 §3.5), so it does not change the hash."""
    width = FOLD_AT - 8
    return "\n\t ".join(signature[start:start + width]
                        for start in range(0, len(signature), width))


def finish(signing: MessageSigning | SigningResult) -> SigningResult:
    """At end of message: the signatures of a message start_message began,
    or its error.  Never raises: a fault of ours is an error result, which
    `on_error` turns into a deferral or unsigned mail, logged."""
    if isinstance(signing, SigningResult):
        return signing
    try:
        return signing.finish()
    except Exception:
        log.exception("DKIM signing failed")
        return SigningResult("error", reason="signing failed",
                             defer=signing.signer.config.on_error is OnSigningError.DEFER)


# -- one Signer per config a process is given --------------------------------

_lock = threading.Lock()
_signers: list[tuple[SigningConfig, Signer | None, str]] = []
_KEPT = 4   # the current config's and those of sessions still on older ones


def signer_for(config: Config) -> tuple[Signer | None, str]:
    """(the Signer of config.signing, "") or (None, why it could not be
    made).  Made once per config object this process is given (the config
    load in the parent checked the same files; should one have changed
    since, the error is logged here and outbound mail meets on_error),
    never per message."""
    section = config.signing
    with _lock:
        for kept, signer, error in _signers:
            if kept is section:
                return signer, error
        try:
            made: Signer | None = Signer(section)
            error = ""
        except KeyFileError as failure:
            made, error = None, str(failure)
            log.error("DKIM signing keys unusable: %s; outbound mail is %s", error,
                      "deferred" if section.on_error is OnSigningError.DEFER
                      else "passed unsigned")
        _signers.insert(0, (section, made, error))
        del _signers[_KEPT:]
        return made, error


def start_message(config: Config, authorized_by: str, client_address: IPAddress | None,
                  login: str = "", relay: RelayPolicy | None = None,
                  ) -> MessageSigning | SigningResult | None:
    """At RCPT, once the envelope is accepted: a MessageSigning to feed the
    message's fields and body to; None when the message is not ours to
    sign (inbound: the usual case, no cost); a SigningResult "error" when
    it is and the keys cannot be used.  `login` (the SASL login) and
    `relay` (the engine's relay checks): with relay checks on, a login's
    From address is held to relay.sender_ownership as its MAIL FROM is."""
    origin = outbound.origin(authorized_by, client_address, config)
    if origin is None:
        return None
    signer, error = signer_for(config)
    if signer is None:
        return SigningResult("error", reason=f"keys unusable: {error}",
                             defer=config.signing.on_error is OnSigningError.DEFER)
    from_check = None
    if login and relay is not None and relay.relay.enabled:
        from_check = functools.partial(outbound.from_not_owned, login,
                                       ownership=relay.relay.sender_ownership,
                                       owned_by=relay.owners.owned_by)
    return signer.start(origin, config.nat.own_domains, config.milter.dkim.max_held_bytes,
                        from_check)

