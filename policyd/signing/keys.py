"""DKIM private keys: reading a key file, making a new one, and the DNS
TXT record of its public half (RFC 6376 §3.6.1).

A key file is PEM (PKCS#1 or PKCS#8, as `policyd dkim genkey`,
opendkim-genkey and rspamadm write it) or, for Ed25519, the base64 seed
dkimpy's dknewkey writes.  A key anyone else on the machine could read
is refused: it would let them sign as the domain.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from dataclasses import dataclass
from typing import Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits and
# SHOULD use at least 2048; verifiers need not take longer than 4096.
MIN_RSA_BITS = 1024
DEFAULT_RSA_BITS = 2048
MAX_RSA_BITS = 4096

# A PEM RSA key of 4096 bits is about 3.3 KB; anything far past that is no key.
MAX_KEY_FILE_SIZE = 65536

# RFC 6376 §3.1: selector = sub-domain *( "." sub-domain ) (RFC 5321 §4.1.2).
_SELECTOR = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

_SHA256 = hashes.SHA256()

AnyPrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

# Keys read, by the file's identity: reading an RSA key costs some 35 ms
# of CPU (OpenSSL checks the key), so a file read at config load in the
# parent is not read again by each worker it forks, nor twice by one
# load; a file replaced, rewritten, chmod-ed or chown-ed (new inode,
# size, mtime or ctime) is read again.
_loaded: dict[tuple, PrivateKey] = {}
_LOADED_MAX = 64


class KeyFileError(Exception):
    """A key file that cannot be used; the text says which and why."""


def valid_selector(selector: str) -> bool:
    return len(selector) <= 63 and bool(_SELECTOR.match(selector))


@dataclass(frozen=True)
class PrivateKey:
    algorithm: str        # a= (RFC 6376 §3.5): "rsa-sha256" or "ed25519-sha256"
    key: AnyPrivateKey
    public: bytes         # what p= holds, before base64
    bits: int = 0         # RSA only

    @property
    def key_type(self) -> str:
        """k= (RFC 6376 §3.6.1, RFC 8463 §4)."""
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    @property
    def description(self) -> str:
        return f"RSA {self.bits}-bit" if self.bits else "Ed25519"

    def sign(self, digest: bytes) -> bytes:
        """The signature of a SHA-256 digest of the canonicalized header
        fields: RSASSA-PKCS1-v1_5 (RFC 6376 §3.3.1), or PureEdDSA Ed25519
        over the digest itself (RFC 8463 §3)."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(digest, padding.PKCS1v15(), Prehashed(_SHA256))
        return self.key.sign(digest)

    def record(self) -> str:
        """The DNS TXT record of the public key (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={self.key_type}; p={base64.b64encode(self.public).decode()}"


def from_private(key: object) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise KeyFileError(f"an RSA key of {bits} bits; DKIM needs at least "
                               f"{MIN_RSA_BITS} (RFC 8301 §3.2), {DEFAULT_RSA_BITS} advised")
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return PrivateKey("rsa-sha256", key, public, bits)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        return PrivateKey("ed25519-sha256", key, public)
    raise KeyFileError(f"a {type(key).__name__.lstrip('_')} key; DKIM signs with RSA or "
                       "Ed25519 only")


def parse_key(data: bytes, name: str = "the key") -> PrivateKey:
    """A key from the text of a key file; raises KeyFileError."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise KeyFileError(f"{name} is encrypted with a passphrase; policyd needs it "
                               "unencrypted (and readable by policyd alone)") from None
        except (ValueError, UnsupportedAlgorithm):
            raise KeyFileError(f"{name} is not a PEM private key that can be read") from None
        return from_private(key)
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise KeyFileError(f"{name} is neither a PEM private key nor a base64 "
                           "Ed25519 seed")
    return from_private(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def load_key(path: str) -> PrivateKey:
    """The key in a file; raises KeyFileError with one line saying why not."""
    try:
        with open(path, "rb") as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"{path} is not a regular file")
            if info.st_mode & 0o007:
                raise KeyFileError(
                    f"{path} is open to every user (mode {stat.S_IMODE(info.st_mode):04o}); "
                    "a key others can read lets them sign as the domain: chmod 0600 "
                    "(owned by policyd) or 0640 (root:policyd)")
            identity = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                        info.st_ctime_ns)
            known = _loaded.get(identity)
            if known is not None:
                return known
            data = stream.read(MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    except PermissionError:
        raise KeyFileError(f"{path}: permission denied (it must be readable by the user "
                           "policyd runs as)") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path} is not a regular file") from None
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"{path} is too large to be a key")
    key = parse_key(data, path)
    if len(_loaded) >= _LOADED_MAX:
        _loaded.clear()
    _loaded[identity] = key
    return key


# The keys a config load read, by the config section that names them (by
# identity: each load makes its own), so that what signs is what the load
# checked, never a file read again later (by then it may have changed or
# been opened to others).  A section pickled for a worker process takes
# its keys along (settings.SigningConfig.__reduce__).
_kept: list[tuple[object, dict[str, PrivateKey]]] = []
_KEPT_MAX = 8


def keep(owner: object, loaded: dict[str, PrivateKey]) -> None:
    _kept.insert(0, (owner, loaded))
    del _kept[_KEPT_MAX:]


def kept(owner: object) -> dict[str, PrivateKey] | None:
    for known, loaded in _kept:
        if known is owner:
            return loaded
    return None


def to_der(key: PrivateKey) -> bytes:
    return key.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def from_der(data: bytes) -> PrivateKey:
    return from_private(serialization.load_der_private_key(data, password=None))


def generate(key_type: str, bits: int = DEFAULT_RSA_BITS) -> tuple[PrivateKey, bytes]:
    """A new key and its PEM text."""
    key: AnyPrivateKey
    if key_type == "rsa":
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise KeyFileError(f"--bits {bits}: from {MIN_RSA_BITS} to {MAX_RSA_BITS} "
                               f"(RFC 8301 §3.2; {DEFAULT_RSA_BITS} advised)")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        # PKCS#1, the form opendkim-genkey writes, which every signer reads.
        pem_format = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem_format = serialization.PrivateFormat.PKCS8
    pem = key.private_bytes(serialization.Encoding.PEM, pem_format,
                            serialization.NoEncryption())
    return from_private(key), pem


def txt_strings(record: str, size: int = 255) -> list[str]:
    """The record as the character-strings of one TXT record: each at most
    255 octets (RFC 1035 §3.3), concatenated by the verifier (RFC 6376
    §3.6.2.2)."""
    return [record[start:start + size] for start in range(0, len(record), size)] or [""]


def zone_line(domain: str, selector: str, record: str) -> str:
    """The record as a zone file line, ready to paste."""
    strings = " ".join(f'"{part}"' for part in txt_strings(record))
    return f"{selector}._domainkey.{domain}. IN TXT ( {strings} )"
