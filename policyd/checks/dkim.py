"""DKIM (RFC 6376) verification through dkimpy, with every key lookup going
through our resolver.

dkimpy's `DKIM.verify` folds three different outcomes into `False`: a
signature that does not verify, a key that is missing or unusable, and a
DNS failure.  RFC 8601 §2.7.1 reports them differently (fail, permerror,
temperror), so the key lookup is ours: `_KeyLookup` is the `dnsfunc` dkimpy
calls, and it remembers what the DNS said and whether the answer was
DNSSEC-authenticated.  dkimpy's two steps are called one by one for the
same reason: `verify_headerprep` parses the signature (a syntax error is
`neutral`), `verify_sig` fetches the key and checks the hashes.
"""
from __future__ import annotations

import re

import dkim

from ..dns import DnsTempError, Resolver
from ..model import DkimCheck, DkimResult

# RFC 6376 §6.1 lets a verifier limit the signatures it checks; each one
# costs a key lookup and an RSA operation, and a message with more than a
# handful of signatures is an attack on the verifier, not mail.
MAX_SIGNATURES = 5

# RFC 8301 §3.2: verifiers MUST NOT consider keys shorter than 1024 bits.
MIN_KEY_BITS = 1024

# RFC 6008 §2: enough of b= to tell several signatures apart.
B_PREFIX = 8

_BARE_LF = re.compile(rb"(?<!\r)\n")


class _Silent:
    """dkimpy logs each failure at error level; we report it in the result
    instead, so its log lines would only say the same thing twice."""

    def debug(self, *args, **kwargs) -> None:
        pass

    info = warning = error = debug

    def isEnabledFor(self, level) -> bool:
        return False


_SILENT = _Silent()


class _KeyLookup:
    """The `dnsfunc` for one signature: TXT through our resolver."""

    def __init__(self, resolver: Resolver):
        self.resolver = resolver
        self.temporary = False    # the lookup failed for now: temperror
        self.record: bytes | None = None   # the key record, when published
        self.secure = False       # the answer was DNSSEC-authenticated

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            lookup = self.resolver.query(name.decode("ascii"), "TXT", lifetime=timeout)
        except DnsTempError as error:
            self.temporary = True
            raise dkim.DnsTimeoutError(str(error)) from None
        except (ValueError, UnicodeError):
            return None    # d= or s= that is no DNS name: no key
        self.secure = lookup.secure
        if not lookup.records:
            return None
        # RFC 6376 §3.6.2.2: the strings of one TXT record are concatenated.
        self.record = b"".join(lookup.records[0])
        return self.record


def verify(message: bytes, resolver: Resolver, timeout: float = 5.0) -> tuple[DkimCheck, ...]:
    """One DkimCheck per DKIM-Signature (at most MAX_SIGNATURES), in the
    order they appear; a single `none` result when the message is unsigned.

    `message` is the whole message as received, CRLF or LF line ends.
    """
    header_block, body = _split(message)
    try:
        # Only the header block goes through dkimpy's parser, which splits
        # everything it gets into lines and joins them again: for the body
        # that is work (and memory) for nothing.
        verifier = dkim.DKIM(header_block, logger=_SILENT, minkey=MIN_KEY_BITS,
                             timeout=timeout)
    except dkim.MessageFormatError:
        # The header block does not parse (RFC 5322 §2.2); a signature in it
        # could not be processed even if there is one.
        if b"dkim-signature" in header_block.lower():
            return (DkimCheck(DkimResult.NEUTRAL, reason="message header does not parse"),)
        return (DkimCheck(DkimResult.NONE),)
    verifier.body = body
    signatures = [value for name, value in verifier.headers
                  if name.lower() == b"dkim-signature"]
    if not signatures:
        return (DkimCheck(DkimResult.NONE),)
    return tuple(_verify_one(verifier, index, value, resolver)
                 for index, value in enumerate(signatures[:MAX_SIGNATURES]))


def _split(message: bytes) -> tuple[bytes, bytes]:
    """(header block with its final CRLF, body), CRLF line ends throughout
    (RFC 6376 §3.4 canonicalizes CRLF lines; a bare LF becomes one)."""
    if message.count(b"\n") != message.count(b"\r\n"):
        message = _BARE_LF.sub(b"\r\n", message)
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[:end + 2], message[end + 4:]


def _verify_one(verifier: dkim.DKIM, index: int, header_value: bytes,
                resolver: Resolver) -> DkimCheck:
    domain, selector, b = _tags(header_value)
    try:
        prepared = verifier.verify_headerprep(index)
    except (dkim.DKIMException, ValueError, KeyError, IndexError) as error:
        # RFC 8601 §2.7.1 neutral: "the signature ... contained syntax errors
        # or [was] not otherwise able to be processed".
        return DkimCheck(DkimResult.NEUTRAL, domain, selector, b,
                         f"signature does not parse: {_reason(error)}")
    signature, include_headers, signature_headers = prepared
    domain = _text(signature.get(b"d", b"")) or domain
    selector = _text(signature.get(b"s", b"")) or selector
    key = _KeyLookup(resolver)
    try:
        valid = verifier.verify_sig(signature, include_headers,
                                    signature_headers[index], key)
    except dkim.KeyFormatError as error:
        # A key that is too short (RFC 8301 §3.2) or does not fit the digest.
        return DkimCheck(DkimResult.PERMERROR, domain, selector, b,
                         f"unusable key: {_reason(error)}", key.secure)
    except dkim.ValidationError as error:
        # The body hash does not match: the body changed since signing.
        return DkimCheck(DkimResult.FAIL, domain, selector, b, _reason(error), key.secure)
    except (dkim.DKIMException, ValueError, KeyError, IndexError, TypeError) as error:
        return DkimCheck(DkimResult.NEUTRAL, domain, selector, b,
                         f"cannot verify: {_reason(error)}", key.secure)
    if valid:
        return DkimCheck(DkimResult.PASS, domain, selector, b, "", key.secure)
    if key.temporary:
        return DkimCheck(DkimResult.TEMPERROR, domain, selector, b, "key lookup failed")
    if key.record is None:
        # RFC 6376 §6.1.2: no key record is a permanent failure.
        return DkimCheck(DkimResult.PERMERROR, domain, selector, b, "no key published",
                         key.secure)
    try:
        # dkimpy answers False, not an exception, for a key it cannot use.
        dkim.evaluate_pk(b"", key.record)
    except (dkim.DKIMException, ValueError) as error:
        return DkimCheck(DkimResult.PERMERROR, domain, selector, b,
                         f"unusable key: {_reason(error)}", key.secure)
    return DkimCheck(DkimResult.FAIL, domain, selector, b, "signature does not verify",
                     key.secure)


def _tags(header_value: bytes) -> tuple[str, str, str]:
    """d=, s= and the start of b= without trusting the rest of the syntax,
    so that even a signature that does not parse is reported by domain."""
    tags = {}
    for part in header_value.split(b";"):
        name, equals, value = part.partition(b"=")
        if equals:
            tags.setdefault(name.strip().lower(), b"".join(value.split()))
    return (_text(tags.get(b"d", b"")), _text(tags.get(b"s", b"")),
            _text(tags.get(b"b", b""))[:B_PREFIX])


def _text(value: bytes) -> str:
    # headers.py sanitizes for the header; here only the bytes become str.
    return value.decode("ascii", "replace").strip()


def _reason(error: Exception) -> str:
    """dkimpy's message, short: it may quote the whole key or signature."""
    text = str(error).splitlines()[0] if str(error) else error.__class__.__name__
    return text[:80]
