"""DKIM (RFC 6376) verification through dkimpy, with every key lookup going
through our resolver, reported as RFC 8601 results (pass, fail, neutral,
permerror, temperror) with the key's DNSSEC state.
"""
from __future__ import annotations

import base64
import binascii
import functools
import importlib
import re
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dkim
import dkim.crypto
import nacl.exceptions
from dkim.canonicalization import (CanonicalizationPolicy, InvalidCanonicalizationPolicyError,
                                   Relaxed, correct_empty_body, strip_trailing_lines)

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes as _hashes
    from cryptography.hazmat.primitives.asymmetric import padding as _padding
    from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
    from cryptography.hazmat.primitives.asymmetric import utils as _asym_utils
except ImportError:     # optional: without it RSA stays on dkimpy's arithmetic
    # Ignored for mypy: the module or None, which _openssl_rsa_key checks.
    _rsa = None   # type: ignore[assignment]
else:
    try:
        # Loaded now, not by the first key: a daemon imports this before it
        # forks its workers, which then share it instead of each loading
        # its 50 modules (some 25 ms of CPU) at its first signed message.
        # (cryptography 38's place for it; elsewhere, the first key loads it.)
        importlib.import_module("cryptography.hazmat.backends.openssl.backend")
    except ImportError:
        pass

from ..dns import DnsTempError, Lookups
from ..dns import query_all as dns_query_all
from ..model import DkimCheck, DkimResult

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

# RFC 6376 §6.1 lets a verifier limit the signatures it checks; each one
# costs a key lookup and an RSA operation, and a message with more than a
# handful of signatures is an attack on the verifier, not mail.
MAX_SIGNATURES = 5

# RFC 8301 §3.2: verifiers MUST NOT consider keys shorter than 1024 bits.
MIN_KEY_BITS = 1024

# RFC 6008 §2: enough of b= to tell several signatures apart.
B_PREFIX = 8

# Distinct key records whose parse is kept (see _parse_key); a key is a
# few hundred bytes parsed, so this bounds the cache at well under 1 MB.
KEY_CACHE_SIZE = 512

_BARE_LF = re.compile(rb"(?<!\r)\n")

# RFC 6376 §3.4.2/§3.4.4 "compress WSP to a single SP": dkimpy substitutes
# every run of WSP, the single spaces between words included; runs other
# than one lone space are the same set of changes, far fewer of them.
_WSP_TO_COMPRESS = re.compile(rb" [\t ]+|\t[\t ]*")

# RFC 6376 §3.5 b=: dkimpy's RE_BTAG, which empties the b= value before the
# signature field is hashed.  Its FWS, (?:(?:\s*\r?\n)?\s+)?, matches exactly
# the strings \s* does, and its loop of (FWS, one base64 character) ends at
# the last base64 character of the run; one character class backtracking
# to that character is the same match without a regex step per character.
_B_TAG_VALUE = re.compile(rb"([;\s]b\s*=)(?:[\sA-Za-z0-9+/=]*[A-Za-z0-9+/=])?(?:\r?\n\Z)?")

# RFC 8017 §9.2 note 1: the DER DigestInfo is a 15-octet (SHA-1) or
# 19-octet (SHA-256) prefix and the digest; EMSA-PKCS1-v1_5 needs 11 more.
_DIGEST_INFO_LENGTH = {"sha1": 15 + 20, "sha256": 19 + 32}

# OpenSSL's limits for an RSA public key operation (rsa_ossl_public_decrypt,
# OPENSSL_RSA_MAX_MODULUS_BITS and _MAX_PUBEXP_BITS above
# _SMALL_MODULUS_BITS); a key past them stays on dkimpy's arithmetic, which
# has none, so that the result never depends on which one runs.
_OPENSSL_MAX_MODULUS_BITS = 16384
_OPENSSL_SMALL_MODULUS_BITS = 3072
_OPENSSL_MAX_EXPONENT_BITS = 64


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
    """The `dnsfunc` for one signature: TXT through our resolver.

    dkimpy's `DKIM.verify` folds three outcomes into `False`: a signature
    that does not verify, a key that is missing or unusable, and a DNS
    failure.  RFC 8601 §2.7.1 reports them differently (fail, permerror,
    temperror), so the lookup is ours and remembers what the DNS said and
    whether the answer was DNSSEC-authenticated.  dkimpy's two steps are
    called one by one for the same reason: `verify_headerprep` parses the
    signature (a syntax error is `neutral`), `verify_sig` fetches the key
    and checks the hashes."""

    def __init__(self, resolver: Lookups):
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


@dataclass(frozen=True)
class _PublicKey:
    """A key record parsed, as dkimpy's `evaluate_pk` gives it, and the same
    RSA key for OpenSSL when it can take it."""
    pk: Any             # RSA: {'modulus', 'publicExponent'} read-only; nacl VerifyKey
    keysize: int        # evaluate_pk raises for a key type it has no size for
    ktag: bytes
    seqtlsrpt: bool
    openssl: RSAPublicKey | None = None


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def _parse_key(record: bytes) -> _PublicKey:
    """The key record parsed by dkimpy, kept by the exact record bytes: a
    pure function of them, so the cache can never answer for another
    record, and DNS TTLs stay the resolver's business.  lru_cache is
    bounded and thread-safe (two threads may parse the same record at
    once, harmlessly); a record that does not parse raises each time and
    is not kept."""
    pk, keysize, ktag, seqtlsrpt = dkim.evaluate_pk(b"", record)
    openssl = None
    if ktag == b"rsa":
        openssl = _openssl_rsa_key(pk["modulus"], pk["publicExponent"])
        pk = types.MappingProxyType(pk)     # shared between threads: read-only
    return _PublicKey(pk, keysize, ktag, seqtlsrpt, openssl)


def _openssl_rsa_key(modulus: int, exponent: int) -> RSAPublicKey | None:
    if _rsa is None:
        return None
    bits = modulus.bit_length()
    if bits > _OPENSSL_MAX_MODULUS_BITS or (bits > _OPENSSL_SMALL_MODULUS_BITS and
                                            exponent.bit_length() > _OPENSSL_MAX_EXPONENT_BITS):
        return None
    try:
        # cryptography refuses an even modulus or exponent, e < 3 and e >= n.
        return _rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        return None


def _rsa_verify(key: _PublicKey, hasher, signature: bytes) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify (RFC 8017 §8.2.2), by OpenSSL when
    the key allows.  Raises dkimpy's DigestTooLargeError as it does."""
    if key.openssl is None:
        return dkim.crypto.RSASSA_PKCS1_v1_5_verify(hasher, signature, key.pk)
    modulus = key.pk["modulus"]
    length = (modulus.bit_length() + 7) // 8
    if _DIGEST_INFO_LENGTH[hasher.name] + 11 > length:
        raise dkim.crypto.DigestTooLargeError()
    # dkimpy takes the signature as an integer of any length and works
    # modulo n; OpenSSL wants exactly k octets below n (RFC 8017 §5.2.2).
    # The same integer modulo n, written in k octets, is the same check.
    value = int.from_bytes(signature, "big")
    if value >= modulus:
        value %= modulus
    algorithm = _hashes.SHA256() if hasher.name == "sha256" else _hashes.SHA1()
    try:
        key.openssl.verify(value.to_bytes(length, "big"), hasher.digest(),
                           _padding.PKCS1v15(), _asym_utils.Prehashed(algorithm))
    except InvalidSignature:
        return False
    return True


def _compress_wsp(data: bytes) -> bytes:
    """dkimpy's compress_whitespace: each run of WSP becomes one space."""
    if b"\t" in data or b"  " in data:    # two C scans, cheaper than the regex's
        return _WSP_TO_COMPRESS.sub(b" ", data)
    return data


def _relaxed_headers(headers):
    """Relaxed.canonicalize_headers (RFC 6376 §3.4.2), with fewer substitutions."""
    return [(name.lower().rstrip(), _compress_wsp(value.replace(b"\r\n", b"")).strip() + b"\r\n")
            for name, value in headers]


def _relaxed_body(body: bytes) -> bytes:
    """Relaxed.canonicalize_body (RFC 6376 §3.4.4).  dkimpy removes WSP
    before each CRLF, then compresses WSP; compressed first, each such run
    is one space, removed by a plain replace (what precedes it is no WSP,
    so no new " CRLF" appears)."""
    return correct_empty_body(strip_trailing_lines(
        _compress_wsp(body).replace(b" \r\n", b"\r\n")))


class _Verifier(dkim.DKIM):
    """dkim.DKIM, faster and with dkimpy's results.  The two methods below
    follow dkimpy 1.1's `DomainSigner.verify_sig` and `verify_sig_process`
    (the methods dkimpy itself splits out so that its asyncio variant can
    replace the lookup) step by step, so that each outcome is the same
    exception or answer; tests/unit/checks/test_dkim.py holds them to
    dkimpy's own.  What is faster: the key record is parsed once per
    distinct record (`_parse_key`), only the signed header fields are
    canonicalized, relaxed canonicalization uses a regular expression that
    leaves a lone space alone, the body hash is computed once per message
    and canonicalization, and an RSA signature is checked by OpenSSL
    through `cryptography` (dkimpy's pure-Python RSA is ten times slower).
    Nothing in dkimpy is patched."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._body_hashes: dict[tuple, bytes] = {}

    def verify_headerprep(self, idx=0):
        """dkimpy 1.1's verify_headerprep without its debug line, whose
        `%r` of the parsed signature is formatted even when nothing logs it."""
        sigheaders = [(x, y) for x, y in self.headers if x.lower() == b"dkim-signature"]
        if len(sigheaders) <= idx:
            return False
        try:
            sig = dkim.util.parse_tag_value(sigheaders[idx][1])
            self.signature_fields = sig
        except dkim.util.InvalidTagValueList as error:
            raise dkim.MessageFormatError(error)
        dkim.validate_signature_fields(sig)
        self.domain = sig[b"d"]
        self.selector = sig[b"s"]
        include_headers = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"])]
        self.include_headers = tuple(include_headers)
        return sig, include_headers, sigheaders

    def verify_sig(self, sig, include_headers, sig_header, dnsfunc):
        name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
        try:
            record = dnsfunc(name, timeout=self.timeout)
            if not record:
                return False      # dkimpy: "missing public key"
            key = _parse_key(record)
        except (dkim.KeyFormatError, binascii.Error, dkim.DnsTimeoutError):
            return False
        self.key = key
        self.pk, self.keysize, self.ktag, self.seqtlsrpt = (key.pk, key.keysize, key.ktag,
                                                            key.seqtlsrpt)
        return self.verify_sig_process(sig, include_headers, sig_header, dnsfunc)

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        # RFC 8460 §3: a key for TLS reports only; self.tlsrpt is never set.
        if not self.tlsrpt and self.seqtlsrpt:
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            canon_policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as error:
            raise dkim.MessageFormatError("invalid c= value: %s" % error.args[0])
        hasher = dkim.HASH_ALGORITHMS[sig[b"a"]]

        if b"bh" in sig:
            body_hash = self._body_hash(canon_policy.body_algorithm, hasher, sig.get(b"l"))
            try:
                expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except TypeError as error:
                raise dkim.MessageFormatError(str(error))
            if body_hash != expected:
                # Ignored for mypy: dkimpy's own text, b'...' and all.
                raise dkim.ValidationError(
                    "body hash mismatch (got %s, expected %s)"
                    % (base64.b64encode(body_hash), sig[b"bh"]))  # type: ignore[str-bytes-safe]

        # dkimpy bug#644046: a second From field is hashed too.
        if b"from" in include_headers:
            include_headers.append(b"from")
        # dkimpy canonicalizes every field, then selects by lowercased name;
        # field names from rfc822_parse hold no WSP, so selecting first picks
        # the same fields and canonicalizes only those.
        signed = dkim.select_headers(self.headers, include_headers)
        signature_field = [(sig_header[0], _B_TAG_VALUE.sub(b"\\1", sig_header[1]))]
        if canon_policy.header_algorithm is Relaxed:
            signed = _relaxed_headers(signed)
            signature_field = _relaxed_headers(signature_field)
        else:
            signed = canon_policy.canonicalize_headers(signed)
            signature_field = canon_policy.canonicalize_headers(signature_field)
        self.signed_headers = signed
        h = hasher()
        # RFC 6376 §3.7: the signature field is hashed without its CRLF.
        for field_name, value in signed + [(x, y.rstrip()) for x, y in signature_field]:
            h.update(field_name)
            h.update(b":")
            h.update(value)
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        if self.ktag == b"rsa":
            try:
                valid = _rsa_verify(self.key, h, signature)
                if valid and self.keysize < self.minkey:
                    raise dkim.KeyFormatError("public key too small: %d" % self.keysize)
                return valid
            except (TypeError, dkim.crypto.DigestTooLargeError) as error:
                raise dkim.KeyFormatError("digest too large for modulus: %s" % error)
        if self.ktag == b"ed25519":
            try:
                self.pk.verify(h.digest(), signature)
                return True
            except nacl.exceptions.BadSignatureError:
                return False
        raise dkim.UnknownKeyTypeError(self.ktag)

    def _body_hash(self, algorithm, hasher, length: bytes | None) -> bytes:
        """The body hash, once per canonicalization, hash and l= (a second
        signature usually shares them); for a body that was not kept, the
        one BodyHasher computed as it arrived."""
        limit = _limit(length) if not self.tlsrpt else None   # ValueError as dkimpy's int()
        memo = (algorithm, hasher, limit)
        if memo not in self._body_hashes:
            if self.body is None:
                raise dkim.MessageFormatError("body not kept")
            if algorithm is Relaxed:
                body = _relaxed_body(self.body)
            else:
                body = algorithm.canonicalize_body(self.body)
            if limit is not None:
                body = body[:limit]
            self._body_hashes[memo] = hasher(body).digest()
        return self._body_hashes[memo]


def _limit(length: bytes | None) -> int | None:
    return None if length is None else int(length)


class BodyHasher:
    """The body hash of each signature (its c= body canonicalization, a=
    hash and l=), computed chunk by chunk as the body arrives, so that a
    large body need not be kept (RFC 6376 §3.4.3/§3.4.4 work line by line;
    only the empty lines at the end need the whole body, and they are
    counted, not kept).  The DKIM-Signature fields come before the body,
    so the hashes are known before the first chunk.  Holds at most one
    line, or FLUSH octets of it, between chunks.

    `headers` as verify_parsed takes them; a signature that does not parse
    gets no hash here and is reported by verify_parsed as before."""

    FLUSH = 65536

    def __init__(self, headers: list):
        self._streams: dict[object, _CanonicalStream] = {}
        signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
        for value in signatures[:MAX_SIGNATURES]:
            try:
                sig = dkim.util.parse_tag_value(value)
                algorithm = CanonicalizationPolicy.from_c_value(
                    sig.get(b"c", b"simple/simple")).body_algorithm
                hasher = dkim.HASH_ALGORITHMS[sig[b"a"]]
                limit = _limit(sig.get(b"l"))
            except (dkim.util.InvalidTagValueList, InvalidCanonicalizationPolicyError,
                    KeyError, ValueError):
                continue
            stream = self._streams.setdefault(algorithm, _CanonicalStream(algorithm is Relaxed,
                                                                          self.FLUSH))
            stream.add((algorithm, hasher, limit), hasher(), limit)

    def update(self, chunk: bytes) -> None:
        for stream in self._streams.values():
            stream.feed(chunk)

    def digests(self) -> dict[tuple, bytes]:
        """The hashes by (algorithm, hash, l=), as _Verifier keeps them."""
        result = {}
        for stream in self._streams.values():
            result.update(stream.finish())
        return result


class _CanonicalStream:
    """One body canonicalization, fed in pieces, into the hashes that use it.

    The same text as _relaxed_body / Simple.canonicalize_body of the whole
    body with crlf_body's line ends: whole lines are canonicalized as they
    complete; the empty lines at the end of what came so far are counted
    (`held`) and written only when a line with content follows them."""

    def __init__(self, relaxed: bool, flush: int):
        self.relaxed, self.flush = relaxed, flush
        self.sinks: list[list] = []     # [memo, hash object, octets still to hash or None]
        self.pending = b""              # the line begun, without its end
        self.held = 0                   # empty lines not yet written
        self.mid_line = False           # part of the current line was written
        self.written = False            # a line with content was written

    def add(self, memo, hash_object, limit: int | None) -> None:
        if all(sink[0] != memo for sink in self.sinks):
            self.sinks.append([memo, hash_object, limit])

    def _write_held(self) -> None:
        """The empty lines held back, now that content follows them; in
        pieces, so that a body of empty lines costs no body-sized string."""
        while self.held:
            count = min(self.held, 32768)
            self._write(b"\r\n" * count)
            self.held -= count

    def _write(self, data: bytes) -> None:
        for sink in self.sinks:
            if sink[2] is None:
                sink[1].update(data)
            elif sink[2] > 0:
                sink[1].update(data[:sink[2]])
                sink[2] -= min(len(data), sink[2])

    def _line_text(self, data: bytes) -> bytes:
        if self.relaxed:
            return _compress_wsp(data).replace(b" \r\n", b"\r\n")
        return data

    def feed(self, chunk: bytes) -> None:
        data = self.pending + chunk
        end = data.rfind(b"\n") + 1
        if end == 0:
            self.pending = data
            if len(data) > self.flush:
                self._flush_partial()
            return
        self.pending = data[end:]
        text = self._line_text(crlf_body(data[:end]))
        # The CRLFs at the end: after crlf_body every LF follows a CR, so
        # what rstrip takes is CRLFs and lone CRs; the last lone CR (one
        # followed by a CR) belongs to the content.
        stripped = text[len(text.rstrip(b"\r\n")):]
        lone = stripped.rfind(b"\r\r")
        tail = len(stripped) - lone - 1 if lone >= 0 else len(stripped)
        content, empty = text[:len(text) - tail], tail // 2
        if not content and not self.mid_line:
            self.held += empty
        else:
            self._write_held()
            self._write(content + b"\r\n")
            self.held, self.written, self.mid_line = empty - 1, True, False
        if len(self.pending) > self.flush:
            self._flush_partial()

    def _flush_partial(self) -> None:
        """Writes most of an over-long line: all but a trailing CR (its LF
        may follow) and, relaxed, its trailing WSP, kept as one space."""
        data = self.pending
        keep = len(data) - (1 if data.endswith(b"\r") else 0)
        if self.relaxed:
            start = len(data[:keep].rstrip(b" \t"))
            tail = (b" " if start < keep else b"") + data[keep:]
            keep = start
        else:
            tail = data[keep:]
        if keep:
            self._write_held()
            self._write(self._line_text(data[:keep]))
            self.written, self.mid_line = True, True
        self.pending = tail

    def finish(self) -> dict:
        if self.pending or self.mid_line:
            # The body does not end with CRLF: strip_trailing_lines adds one.
            self._write_held()
            self._write(self._line_text(self.pending) + b"\r\n")
        elif not self.written and not self.relaxed:
            self._write(b"\r\n")    # simple: an empty body is one CRLF (§3.4.3)
        return {memo: hash_object.digest() for memo, hash_object, _ in self.sinks}


def verify(message: bytes, resolver: Lookups, timeout: float = 5.0) -> tuple[DkimCheck, ...]:
    """One DkimCheck per DKIM-Signature (at most MAX_SIGNATURES), in the
    order they appear; a single `none` result when the message is unsigned.

    `message` is the whole message as received, CRLF or LF line ends.
    """
    header_block, body = _split(message)
    try:
        # Only the header block goes through dkimpy's parser, which splits
        # everything it gets into lines and joins them again: for the body
        # that is work (and memory) for nothing.
        headers, _ = dkim.rfc822_parse(header_block)
    except dkim.MessageFormatError:
        # The header block does not parse (RFC 5322 §2.2); a signature in it
        # could not be processed even if there is one.
        if b"dkim-signature" in header_block.lower():
            return (DkimCheck(DkimResult.NEUTRAL, reason="message header does not parse"),)
        return (DkimCheck(DkimResult.NONE),)
    return verify_parsed(headers, body, resolver, timeout)


def verify_parsed(headers: list, body: bytes | BodyHasher, resolver: Lookups,
                  timeout: float = 5.0) -> tuple[DkimCheck, ...]:
    """`verify` for a message already split into header fields, as the
    milter receives it: `headers` as dkimpy's rfc822_parse gives them,
    [name, value] with the value from after the colon through its last
    CRLF, its lines joined by CRLF; `body` with CRLF line ends, or the
    BodyHasher that hashed it as it came (made from the same headers)."""
    verifier = _Verifier(None, logger=_SILENT, minkey=MIN_KEY_BITS, timeout=timeout)
    verifier.headers = headers
    if isinstance(body, BodyHasher):
        verifier.body = None
        verifier._body_hashes.update(body.digests())
    else:
        verifier.body = body
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if not signatures:
        return (DkimCheck(DkimResult.NONE),)
    signatures = signatures[:MAX_SIGNATURES]
    _prefetch_keys(signatures, resolver)
    return tuple(_verify_one(verifier, index, value, resolver)
                 for index, value in enumerate(signatures))


def _prefetch_keys(signatures: list[bytes], resolver: Lookups) -> None:
    """The key records of several signatures asked at once, into the
    cache the verification then reads: one wait for all of them, not one
    after another within the stage's DNS budget (dns.budget)."""
    names = []
    for value in signatures:
        domain, selector, _ = _tags(value)
        # The name as dkimpy asks it (s._domainkey.d.), so the cache hits.
        name = f"{selector}._domainkey.{domain}.".lower()
        if domain and selector and name.isascii() and (name, "TXT") not in names:
            names.append((name, "TXT"))
    if len(names) > 1:
        for _ in dns_query_all(resolver, names):
            pass   # an error is the verification's to report, as it asks again


def crlf_body(body: bytes) -> bytes:
    """The body with CRLF line ends (RFC 6376 §3.4): a bare LF becomes one."""
    # One pass for the usual CRLF body (count() of b"\n" and of b"\r\n"
    # were two, the first a slow byte loop); the regular expression only
    # for a body that has a bare LF.
    if b"\n" in body.replace(b"\r\n", b""):
        return _BARE_LF.sub(b"\r\n", body)
    return body


def _split(message: bytes) -> tuple[bytes, bytes]:
    """(header block with its final CRLF, body), CRLF line ends throughout
    (RFC 6376 §3.4 canonicalizes CRLF lines; a bare LF becomes one)."""
    message = crlf_body(message)
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[:end + 2], message[end + 4:]


def _verify_one(verifier: _Verifier, index: int, header_value: bytes,
                resolver: Lookups) -> DkimCheck:
    try:
        prepared = verifier.verify_headerprep(index)
    except (dkim.DKIMException, ValueError, KeyError, IndexError) as error:
        # RFC 6376 §6.1.1 makes a signature that fails its syntax checks a
        # PERMFAIL for the verifier; RFC 8601 §2.7.1, which says how to
        # report it, names exactly this case neutral: "the signature ...
        # contained syntax errors or [was] not otherwise able to be
        # processed" (permerror is for errors of the message or the key,
        # "such as a required header field being absent").  So a b= with no
        # base64 in it is neutral, as every other signature that does not
        # parse.
        domain, selector, b = _tags(header_value)
        return DkimCheck(DkimResult.NEUTRAL, domain, selector, b,
                         f"signature does not parse: {_syntax_words(error)}")
    signature, include_headers, signature_headers = prepared
    # Parsed, the signature has d=, s= and b= (validate_signature_fields),
    # tag names case-sensitive (RFC 6376 §3.2); _tags, for a signature that
    # did not parse, reads what it can.
    domain, selector = _text(signature[b"d"]), _text(signature[b"s"])
    b = _b_prefix(signature[b"b"])
    if not (domain and selector):
        tags = _tags(header_value)
        domain, selector = domain or tags[0], selector or tags[1]
    key = _KeyLookup(resolver)
    try:
        valid = verifier.verify_sig(signature, include_headers,
                                    signature_headers[index], key)
    except dkim.KeyFormatError as error:
        # A key that is too short (RFC 8301 §3.2) or does not fit the digest.
        return DkimCheck(DkimResult.PERMERROR, domain, selector, b,
                         _key_words(error), key.secure)
    except dkim.ValidationError as error:
        # The body hash does not match: the body changed since signing.
        return DkimCheck(DkimResult.FAIL, domain, selector, b,
                         _words(error, _VERIFY_WORDS, "signature does not verify"), key.secure)
    except (dkim.DKIMException, ValueError, KeyError, IndexError, TypeError) as error:
        return DkimCheck(DkimResult.NEUTRAL, domain, selector, b,
                         "cannot verify: " + ("unknown key type"
                                             if isinstance(error, dkim.UnknownKeyTypeError)
                                             else _words(error, _VERIFY_WORDS,
                                                         "malformed signature")),
                         key.secure)
    if valid:
        return DkimCheck(DkimResult.PASS, domain, selector, b, "", key.secure)
    if key.temporary:
        return DkimCheck(DkimResult.TEMPERROR, domain, selector, b, "key lookup failed")
    if key.record is None:
        # RFC 6376 §6.1.2: no key record is a permanent failure.
        return DkimCheck(DkimResult.PERMERROR, domain, selector, b, "no key published",
                         key.secure)
    try:
        # dkimpy answers False, not an exception, for a key it cannot use;
        # a key that parses is in the cache.
        _parse_key(key.record)
    except (dkim.DKIMException, ValueError) as error:
        return DkimCheck(DkimResult.PERMERROR, domain, selector, b,
                         _key_words(error), key.secure)
    return DkimCheck(DkimResult.FAIL, domain, selector, b, "signature does not verify",
                     key.secure)


def _tags(header_value: bytes) -> tuple[str, str, str]:
    """d=, s= and the start of b= without trusting the rest of the syntax,
    so that even a signature that does not parse is reported by domain."""
    tags: dict[bytes, bytes] = {}
    for part in header_value.split(b";"):
        name, equals, value = part.partition(b"=")
        if equals:
            tags.setdefault(name.strip().lower(), b"".join(value.split()))
    return (_text(tags.get(b"d", b"")), _text(tags.get(b"s", b"")),
            _b_prefix(tags.get(b"b", b"")))


# RFC 6376 §3.5 b= is base64 (RFC 2045 §6.8) with FWS anywhere in it.
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+=*")


def _b_prefix(value: bytes) -> str:
    """RFC 6008 §2 header.b: the first characters of b=, "" when b= is not
    base64 at all (b=@, b==): nothing there tells signatures apart."""
    value = b"".join(value.split())
    return value[:B_PREFIX].decode("ascii") if _BASE64.fullmatch(value) else ""


def _text(value: bytes) -> str:
    # headers.py sanitizes for the header; here only the bytes become str.
    return value.decode("ascii", "replace").strip()


# Our words for dkimpy's exceptions: its messages quote tag values, keys
# and hashes as bytes reprs, none of which belongs in a header or a log.
# The first entry whose text starts dkimpy's message gives the words.
_SYNTAX_WORDS = (
    ("unknown signature algorithm", "unknown a= algorithm"),
    ("b= value is not valid base64", "b= is not base64"),
    ("bh= value is not valid base64", "bh= is not base64"),
    ("d= value is not valid", "d= is not a domain"),
    ("i= domain is not a subdomain", "i= is outside d="),
    ("l= value", "l= is not a number"),
    ("q= value", "q= is not dns/txt"),
    ("t= value is in the future", "t= is in the future"),
    ("t= value", "t= is not a number"),
    ("v= value", "v= is not 1"),
    ("x= value is past", "signature expired"),
    ("x= value", "x= is not a number"),
    ("invalid c= value", "c= is not a canonicalization"),
)
_KEY_WORDS = (
    ("public key too small", "key too short"),
    ("digest too large for modulus", "key too short for the hash"),
    ("missing public key", "no key published"),
    ("unknown algorithm in k= tag", "unknown key type"),
    ("unknown service type in s= tag", "key not for email"),
)
_VERIFY_WORDS = (
    ("body hash mismatch", "body hash mismatch"),
    ("Message is not tlsrpt", "key is for TLS reports only"),
    ("invalid c= value", "c= is not a canonicalization"),
    ("body not kept", "body not kept"),
)
_MISSING_TAG = re.compile(r"missing (?:b')?([a-z]{1,2})'?=")   # dkimpy: "missing b'd'="


def _words(error: Exception, table: tuple[tuple[str, str], ...], default: str) -> str:
    text = str(error)
    for start, words in table:
        if text.startswith(start):
            return words
    return default


def _syntax_words(error: Exception) -> str:
    """Why a signature does not parse (verify_headerprep's exceptions)."""
    cause = error.args[0] if error.args else None
    if isinstance(cause, dkim.util.DuplicateTag):
        return "duplicate tag"
    missing = _MISSING_TAG.fullmatch(str(error))
    if missing:
        return f"missing {missing.group(1)}= tag"
    return _words(error, _SYNTAX_WORDS, "tag list does not parse")


def _key_words(error: Exception) -> str:
    if isinstance(error, dkim.UnknownKeyTypeError):
        return "unknown key type"
    return _words(error, _KEY_WORDS, "key does not parse")
