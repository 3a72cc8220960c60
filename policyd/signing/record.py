"""DKIM key records (RFC 6376 §3.6.1, RFC 8301, RFC 8463): reading one,
and judging what a selector's name publishes against a private key.  The
one place for both: `policyd dkim test` and `rotate` (signing/command.py)
and `policyd check` (doctor/domains.py) call the same functions."""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Sequence

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .keys import PrivateKey

# RFC 8301 §3.2: verifiers MUST NOT take RSA keys under 1024 bits;
# signers SHOULD use 2048.
MIN_RSA_BITS = 1024
GOOD_RSA_BITS = 2048

KEY_TYPES = ("rsa", "ed25519")   # RFC 6376 §3.6.1, RFC 8463 §4

# RFC 6376 §3.2: tag-name = ALPHA *ALNUMPUNC
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# RFC 6376 §3.2: tag-value = [ tval *( 1*(WSP / FWS) tval ) ], tval = 1*VALCHAR,
# VALCHAR = %x21-3A / %x3C-7E.
_TAG_VALUE = re.compile(r"^[\x21-\x3a\x3c-\x7e \t\r\n]*$")
_WHITE = re.compile(r"\s+")


@dataclass(frozen=True)
class KeyRecord:
    """One key record, read.  problems: what makes verifiers discard it
    (every signature with it fails); empty when it is usable."""
    key_type: str = "rsa"            # k=, "rsa" when absent
    public: bytes = b""              # p=, decoded: RSA DER SubjectPublicKeyInfo, Ed25519 32 octets
    key_bits: int = 0                # RSA modulus size; 256 for Ed25519
    hashes: tuple[str, ...] = ()     # h=, empty: any
    services: tuple[str, ...] = ("*",)   # s=
    flags: tuple[str, ...] = ()      # t=: "y" testing, "s" no subdomains in i=
    revoked: bool = False            # p= present and empty
    problems: tuple[str, ...] = ()

    @property
    def testing(self) -> bool:
        return "y" in self.flags


def parse_tags(text: str) -> tuple[dict[str, str], list[str]]:
    """RFC 6376 §3.2 tag-list: the tags (white space around names and
    values dropped) and what breaks the grammar.  A tag given twice makes
    the whole list invalid; so does a tag-spec without '=' or an empty one
    between two ';' (only a final ';' may end the list)."""
    tags: dict[str, str] = {}
    problems: list[str] = []
    parts = text.split(";")
    for index, part in enumerate(parts):
        if not part.strip():
            if index < len(parts) - 1:
                problems.append("an empty tag between two ';'")
            continue
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not _TAG_NAME.match(name):
            problems.append(f"{part.strip()[:40]!r} is not a tag=value pair")
            continue
        if name in tags:
            problems.append(f"the tag {name}= is given twice")
            continue
        if not _TAG_VALUE.match(value):
            problems.append(f"{name}= holds a character RFC 6376 §3.2 does not allow")
        tags[name] = value.strip()
    return tags, problems


def _listed(tags: dict[str, str], name: str, default: str = "") -> tuple[str, ...]:
    """A colon-separated tag value (h=, s=, t=), with FWS around the
    colons, lower case (ABNF literals are case-insensitive, RFC 5234)."""
    return tuple(item.strip().lower() for item in tags.get(name, default).split(":")
                 if item.strip())


def parse_record(text: str | bytes) -> KeyRecord:
    """The record read, with every problem found; never raises."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    tags, problems = parse_tags(text)
    # RFC 6376 §3.6.1: v= is optional; if present it MUST be the first tag
    # and exactly "DKIM1" (a case-sensitive string, not an ABNF literal).
    if "v" in tags:
        if tags["v"] != "DKIM1":
            problems.append(f"v={tags['v'][:20]}: must be DKIM1")
        if next(iter(tags)) != "v":
            problems.append("v= must be the first tag")
    key_type = tags.get("k", "rsa").lower()
    if key_type not in KEY_TYPES:
        problems.append(f"k={key_type[:20]}: unknown key type (rsa, ed25519)")
    hashes = _listed(tags, "h")
    if hashes and "sha256" not in hashes:
        # RFC 8301 §3.1: rsa-sha1 MUST NOT be used; every signer uses sha256.
        problems.append(f"h={':'.join(hashes)} does not allow sha256 (RFC 8301 §3.1)")
    services = _listed(tags, "s", "*")
    if not {"*", "email"} & set(services):
        problems.append(f"s={':'.join(services)} is not for email")
    flags = _listed(tags, "t")
    if "p" not in tags:
        problems.append("no p= tag (the public key)")
        return KeyRecord(key_type, b"", 0, hashes, services, flags, False, tuple(problems))
    encoded = _WHITE.sub("", tags["p"])   # base64string allows FWS (RFC 6376 §3.6.1)
    if not encoded:
        problems.append("p= is empty: the key is revoked (RFC 6376 §3.6.1)")
        return KeyRecord(key_type, b"", 0, hashes, services, flags, True, tuple(problems))
    try:
        public = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        problems.append("p= is not base64")
        return KeyRecord(key_type, b"", 0, hashes, services, flags, False, tuple(problems))
    bits = 0
    if key_type == "ed25519":
        # RFC 8463 §4.2: p= is the raw 32-octet public key, no ASN.1 around it.
        if len(public) != 32:
            problems.append(f"an ed25519 key of {len(public)} octets, not 32 (RFC 8463 §4.2)")
        bits = 256
    elif key_type == "rsa":
        try:
            loaded = serialization.load_der_public_key(public)
        except (ValueError, UnsupportedAlgorithm):
            problems.append("p= is not an RSA public key (DER SubjectPublicKeyInfo)")
        else:
            if not isinstance(loaded, rsa.RSAPublicKey):
                problems.append("p= is not an RSA key, but k=rsa")
            else:
                bits = loaded.key_size
                if bits < MIN_RSA_BITS:
                    problems.append(f"an RSA key of {bits} bits, which verifiers reject "
                                    f"(RFC 8301 §3.2: at least {MIN_RSA_BITS})")
    return KeyRecord(key_type, public, bits, hashes, services, flags, False, tuple(problems))


def problems(record: KeyRecord, key: PrivateKey) -> list[str]:
    """What keeps a verifier from taking `key`'s signatures with this
    record; empty when it matches."""
    found = list(record.problems)
    if record.public and not found:
        if record.key_type != key.key_type:
            found.append(f"k={record.key_type}, but the key is {key.key_type}")
        elif record.public != key.public:
            found.append("p= is another public key than the private key's")
    return found


def warnings(record: KeyRecord) -> list[str]:
    """What works, but should not stay so."""
    found = []
    if record.key_type == "rsa" and MIN_RSA_BITS <= record.key_bits < GOOD_RSA_BITS:
        found.append(f"an RSA key of {record.key_bits} bits (RFC 8301 §3.2: SHOULD be "
                     f"{GOOD_RSA_BITS})")
    if record.testing:
        found.append("t=y: the domain is testing DKIM, and verifiers may treat its "
                     "failures as unsigned mail (RFC 6376 §3.6.1)")
    return found


@dataclass(frozen=True)
class Judgement:
    """What a selector's name publishes, held against a key (or not).

    status: "match" (the key's record, usable), "usable" (no key to hold
    it against, and nothing wrong with it), "mismatch" (another key),
    "unusable" (verifiers discard it, or cannot tell which record is the
    key), "missing" (no TXT record)."""
    status: str
    record: KeyRecord | None = None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def judge(texts: Sequence[str | bytes], key: PrivateKey | None) -> Judgement:
    """The TXT records at a selector's name (each record's strings already
    joined, RFC 6376 §3.6.2.2), judged against `key` when there is one."""
    if not texts:
        return Judgement("missing", None, ("no TXT record",))
    records = [parse_record(text) for text in texts]
    if key is not None:
        found = [problems(record, key) for record in records]
    else:
        found = [list(record.problems) for record in records]
    best = min(range(len(records)), key=lambda i: len(found[i]))
    record, trouble = records[best], found[best]
    if len(texts) > 1:
        # RFC 6376 §3.6.2.2: a verifier may take any one of several records
        # (dkimpy and OpenDKIM take the first the DNS returns, whose order
        # rotates): every other record fails some of the signatures.
        trouble = [f"{len(texts)} TXT records at the name: verifiers take any one of them "
                   "(RFC 6376 §3.6.2.2) and fail when it is not the key; keep only the "
                   "key record", *trouble]
        status = "unusable"
    elif not trouble:
        status = "match" if key is not None else "usable"
    elif record.problems:
        status = "unusable"
    else:
        status = "mismatch"
    return Judgement(status, record, tuple(trouble), tuple(warnings(record)))
