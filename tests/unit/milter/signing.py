"""DKIM keys and signatures made at test time, for the DKIM and milter tests.

RSA keys come from the openssl command (unbound, which the integration
tests need anyway, depends on it); Ed25519 keys from PyNaCl, which dkimpy
depends on.  dkimpy signs: a signature is what a real signer would send.
"""
from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass

import dkim
import nacl.encoding
import nacl.signing


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private: bytes          # what dkim.sign takes
    record: str             # the TXT record to publish
    algorithm: bytes

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def record_strings(self) -> list[str]:
        """The record cut into TXT strings of at most 255 octets (RFC 1035
        §3.3.14); RFC 6376 §3.6.2.2 joins them back."""
        return [self.record[i:i + 255] for i in range(0, len(self.record), 255)]

    def sign(self, message: bytes, include_headers=None, canonicalize=(b"relaxed", b"simple"),
             domain: str | None = None) -> bytes:
        """The message with a DKIM-Signature field on top."""
        signature = dkim.sign(message, self.selector.encode(), (domain or self.domain).encode(),
                              self.private, include_headers=include_headers,
                              canonicalize=canonicalize, signature_algorithm=self.algorithm)
        return signature + message


def rsa_key(domain: str, selector: str, bits: int = 2048) -> SigningKey:
    private = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)],
                             capture_output=True, check=True).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=private,
                            capture_output=True, check=True).stdout
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode("ascii")
    return SigningKey(domain, selector, private, record, b"rsa-sha256")


def ed25519_key(domain: str, selector: str) -> SigningKey:
    """RFC 8463: the public key is the 32 raw octets, base64."""
    key = nacl.signing.SigningKey.generate()
    private = key.encode(encoder=nacl.encoding.Base64Encoder)
    public = key.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode("ascii")
    return SigningKey(domain, selector, private, f"v=DKIM1; k=ed25519; p={public}",
                      b"ed25519-sha256")


def message(sender: str = "user@own.example", subject: str = "test",
            body: str = "Hello.\r\n", extra_headers: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: rcpt@other.example\r\nSubject: {subject}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@test>\r\n"
            f"{extra_headers}\r\n{body}").encode("utf-8")
