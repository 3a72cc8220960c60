"""policyd.signing.keys: key files read, refused with one line, made, published."""
from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from policyd.signing import keys

from .keyfiles import write_key


def _write(path, data: bytes, mode: int = 0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("key_type, algorithm", [("rsa", "rsa-sha256"),
                                                  ("ed25519", "ed25519-sha256")])
def test_a_generated_key_reads_back_the_same(tmp_path, key_type, algorithm):
    path, made = write_key(tmp_path, "k.pem", key_type)
    loaded = keys.load_key(str(path))
    assert loaded.algorithm == algorithm
    assert loaded.public == made.public
    assert loaded.record() == made.record()


def test_rsa_is_2048_bits_by_default_and_pkcs1_as_opendkim_writes_it():
    key, pem = keys.generate("rsa")
    assert key.bits == 2048
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def test_pkcs8_rsa_and_a_dkimpy_ed25519_seed_are_read(tmp_path):
    rsa_key = rsa.generate_private_key(65537, 2048)
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    assert keys.load_key(_write(tmp_path / "a", pem)).bits == 2048
    ed_key = ed25519.Ed25519PrivateKey.generate()
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    loaded = keys.load_key(_write(tmp_path / "b", base64.b64encode(seed) + b"\n"))
    assert loaded.public == ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_the_record_holds_the_public_key():
    key, _ = keys.generate("ed25519")
    assert key.record() == "v=DKIM1; k=ed25519; p=" + base64.b64encode(key.public).decode()
    rsa_key, _ = keys.generate("rsa", 1024)
    spki = serialization.load_der_public_key(rsa_key.public)
    assert isinstance(spki, rsa.RSAPublicKey) and spki.key_size == 1024
    assert rsa_key.record().startswith("v=DKIM1; k=rsa; p=MIGfMA0G")


def _refusal(path) -> str:
    with pytest.raises(keys.KeyFileError) as caught:
        keys.load_key(str(path))
    return str(caught.value)


def test_a_key_others_can_read_is_refused(tmp_path):
    path, _ = write_key(tmp_path, "open.pem", mode=0o644)
    assert _refusal(path) == (
        f"{path} is open to every user (mode 0644); a key others can read lets them sign "
        "as the domain: chmod 0600 (owned by policyd) or 0640 (root:policyd)")


def test_unusable_files_say_why(tmp_path):
    assert _refusal(tmp_path / "none") == f"{tmp_path}/none: no such file"
    assert _refusal(tmp_path) == f"{tmp_path} is not a regular file"
    garbage = _write(tmp_path / "g", b"hello\n")
    assert _refusal(garbage) == f"{garbage} is neither a PEM private key nor a base64 Ed25519 seed"
    small = rsa.generate_private_key(65537, 512).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    assert "an RSA key of 512 bits; DKIM needs at least 1024" in _refusal(
        _write(tmp_path / "s", small))
    secret = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"))
    assert "encrypted with a passphrase" in _refusal(_write(tmp_path / "e", secret))
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    assert "DKIM signs with RSA or Ed25519 only" in _refusal(_write(tmp_path / "p", p256))


def test_txt_strings_are_at_most_255_octets_and_join_to_the_record():
    key, _ = keys.generate("rsa", 4096)
    record = key.record()
    strings = keys.txt_strings(record)
    assert len(strings) == 3 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == record
    line = keys.zone_line("example.org", "s1", record)
    assert line.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')


@pytest.mark.parametrize("selector, valid", [("s1", True), ("2026-12.rsa", True),
                                             ("", False), ("-a", False), ("a_b", False),
                                             ("a..b", False), ("a b", False)])
def test_selectors(selector, valid):
    assert keys.valid_selector(selector) is valid


def test_a_key_is_read_once_until_its_file_changes(tmp_path, monkeypatch):
    path, _ = write_key(tmp_path, "k.pem", "ed25519")
    parsed = []
    real_parse = keys.parse_key
    monkeypatch.setattr(keys, "parse_key", lambda data, name: parsed.append(name)
                        or real_parse(data, name))
    first = keys.load_key(str(path))
    assert keys.load_key(str(path)) is first and len(parsed) == 1
    # Replaced by another key (as a rotation in place would): read again.
    other, _ = write_key(tmp_path, "other.pem", "ed25519")
    os.replace(other, path)
    assert keys.load_key(str(path)).public != first.public and len(parsed) == 2
    # Opened to others after it was read: refused all the same.
    os.chmod(path, 0o644)
    with pytest.raises(keys.KeyFileError, match="open to every user"):
        keys.load_key(str(path))


def test_a_pem_armour_around_no_key_is_refused():
    with pytest.raises(keys.KeyFileError, match="is not a PEM private key that can be read"):
        keys.parse_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
