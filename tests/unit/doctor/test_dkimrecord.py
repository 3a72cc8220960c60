"""DKIM key records read (RFC 6376 §3.6.1, RFC 8301, RFC 8463) and matched
against private keys."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from policyd.doctor.dkimrecord import (key_matches, parse_key_record, public_key_of,
                                       record_for_key, zone_strings)


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def rsa_2048():
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def rsa_1024():
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))


def test_a_record_made_for_a_key_reads_back_and_matches(rsa_2048):
    record = parse_key_record(record_for_key(rsa_2048))
    assert record.problems == ()
    assert (record.key_type, record.key_bits, record.testing) == ("rsa", 2048, False)
    assert key_matches(record, rsa_2048)


def test_another_key_does_not_match(rsa_2048, rsa_1024):
    record = parse_key_record(record_for_key(rsa_1024))
    assert record.key_bits == 1024
    assert not key_matches(record, rsa_2048)


def test_ed25519_keys_are_raw_32_octets():
    private = _pem(ed25519.Ed25519PrivateKey.generate())
    key_type, public = public_key_of(private)
    assert (key_type, len(public)) == ("ed25519", 32)
    record = parse_key_record(record_for_key(private))
    assert record.problems == () and key_matches(record, private)
    assert parse_key_record("v=DKIM1; k=ed25519; p=" + base64.b64encode(b"x" * 31).decode()
                            ).problems


@pytest.mark.parametrize("text, problem", [
    ("v=DKIM1; k=rsa", "no p= tag"),
    ("v=DKIM1; p=", "revoked"),
    ("v=DKIM1; p=!!!", "not base64"),
    ("v=DKIM1; p=" + base64.b64encode(b"not a key").decode(), "not an RSA public key"),
    ("v=DKIM1; k=dsa; p=AAAA", "unknown key type"),
    ("v=DKIM1; h=sha1; p=AAAA", "no sha256"),
    ("v=DKIM2; p=AAAA", "must be DKIM1"),
    ("k=rsa; v=DKIM1; p=AAAA", "v= must be the first tag"),
    ("v=DKIM1; p=AAAA; p=BBBB", "appears twice"),
    ("v=DKIM1; nonsense; p=AAAA", "not a tag=value pair"),
])
def test_each_problem_is_named(text, problem):
    assert any(problem in found for found in parse_key_record(text).problems)


def test_flags_hashes_and_folding_whitespace(rsa_2048):
    _, public = public_key_of(rsa_2048)
    encoded = base64.b64encode(public).decode()
    folded = " ".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    record = parse_key_record(f"v=DKIM1; t=y:s; h=sha1:sha256; p={folded}")
    assert record.problems == ()
    assert record.testing and record.hashes == ("sha1", "sha256")
    assert key_matches(record, rsa_2048)


def test_unreadable_private_key_is_a_value_error():
    with pytest.raises(ValueError):
        public_key_of(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_zone_strings_are_at_most_255_octets(rsa_2048):
    record = record_for_key(rsa_2048)
    strings = zone_strings(record).split('" "')
    assert all(len(s.strip('"')) <= 255 for s in strings)
    assert "".join(s.strip('"') for s in strings) == record
