"""DKIM key records (RFC 6376 §3.6.1): reading one, and whether it
publishes a given private key.  One place for both, for `policyd check`
and for DKIM signing (`policyd dkim test`) alike."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# RFC 8301 §3.2: verifiers MUST NOT consider keys under 1024 bits valid;
# signers MUST use at least 1024 and SHOULD use 2048.
MIN_RSA_BITS = 1024
GOOD_RSA_BITS = 2048

KEY_TYPES = ("rsa", "ed25519")   # RFC 6376 §3.6.1, RFC 8463


@dataclass(frozen=True)
class KeyRecord:
    """One selector's key record, read.

    problems: what makes it unusable (a verifier fails every signature);
    an empty `public_key` with no problems is impossible.  key_bits: RSA
    modulus size (256 for ed25519).
    """
    tags: dict[str, str] = field(default_factory=dict)
    key_type: str = "rsa"
    public_key: bytes = b""      # RSA: DER SubjectPublicKeyInfo; ed25519: 32 octets
    key_bits: int = 0
    testing: bool = False        # t=y
    hashes: tuple[str, ...] = ()   # h=, empty: any
    revoked: bool = False        # p= empty (RFC 6376 §3.6.1)
    problems: tuple[str, ...] = ()


def parse_key_record(text: str | bytes) -> KeyRecord:
    """The record's tags and key, with every problem found; never raises."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    tags: dict[str, str] = {}
    problems: list[str] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not name:
            problems.append(f"not a tag=value pair: {part[:40]!r}")
            continue
        if name in tags:
            # RFC 6376 §3.2: a tag duplicated makes the whole list invalid.
            problems.append(f"tag {name}= appears twice")
        tags[name] = "".join(value.split())   # folding whitespace inside values
    version = tags.get("v")
    if version is not None and version != "DKIM1":
        problems.append(f"v={version}: must be DKIM1")
    if version is not None and not text.lstrip().startswith("v="):
        problems.append("v= must be the first tag")
    key_type = tags.get("k", "rsa").lower()
    if key_type not in KEY_TYPES:
        problems.append(f"k={key_type}: unknown key type (rsa, ed25519)")
    hashes = tuple(h.lower() for h in tags["h"].split(":") if h) if "h" in tags else ()
    if hashes and "sha256" not in hashes:
        # RFC 8301 §3.1: rsa-sha1 MUST NOT be used for signing or verifying.
        problems.append(f"h={tags['h']}: no sha256 (RFC 8301: sha1 is not accepted)")
    flags = tuple(f.lower() for f in tags.get("t", "").split(":") if f)
    if "p" not in tags:
        problems.append("no p= tag")
        return KeyRecord(tags, key_type, b"", 0, "y" in flags, hashes, False, tuple(problems))
    if tags["p"] == "":
        return KeyRecord(tags, key_type, b"", 0, "y" in flags, hashes, True,
                         (*problems, "p= is empty: the key is revoked"))
    try:
        public = base64.b64decode(tags["p"], validate=True)
    except (binascii.Error, ValueError):
        return KeyRecord(tags, key_type, b"", 0, "y" in flags, hashes, False,
                         (*problems, "p= is not base64"))
    bits = 0
    if key_type == "ed25519":
        if len(public) != 32:
            problems.append(f"ed25519 key of {len(public)} octets, not 32 (RFC 8463 §4.2)")
        bits = 256
    elif key_type == "rsa":
        try:
            key = serialization.load_der_public_key(public)
        except (ValueError, UnsupportedAlgorithm):
            problems.append("p= is not an RSA public key (DER SubjectPublicKeyInfo)")
        else:
            if isinstance(key, rsa.RSAPublicKey):
                bits = key.key_size
            else:
                problems.append("p= is not an RSA key, but k=rsa")
    return KeyRecord(tags, key_type, public, bits, "y" in flags, hashes, False, tuple(problems))


def public_key_of(private_pem: bytes) -> tuple[str, bytes]:
    """(key type, the p= octets) of a PEM private key, as a key record
    publishes them.  Raises ValueError for anything else."""
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (TypeError, UnsupportedAlgorithm) as failure:
        raise ValueError(str(failure) or failure.__class__.__name__) from None
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa", key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise ValueError("neither an RSA nor an ed25519 key")


def key_matches(record: KeyRecord, private_pem: bytes) -> bool:
    """Whether the record publishes the public half of the private key.
    Raises ValueError when the private key cannot be read."""
    key_type, public = public_key_of(private_pem)
    return record.key_type == key_type and record.public_key == public


def record_for_key(private_pem: bytes) -> str:
    """The key record that publishes the private key's public half."""
    key_type, public = public_key_of(private_pem)
    return f"v=DKIM1; k={key_type}; p={base64.b64encode(public).decode()}"


def zone_strings(record: str) -> str:
    """A record as zone-file strings of at most 255 octets each (RFC 1035
    §3.3.14; a 2048-bit key does not fit one string)."""
    return " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
