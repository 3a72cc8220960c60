"""policyd.signing.record: key records read (RFC 6376 §3.6.1, RFC 8301,
RFC 8463) and judged against a private key, as `policyd dkim test` and
`policyd check` both judge them."""
from __future__ import annotations

import base64
import re

import pytest

from policyd.signing import keys
from policyd.signing.record import judge, parse_record, parse_tags, problems


@pytest.fixture(scope="module")
def rsa_key():
    return keys.generate("rsa", 1024)[0]


@pytest.fixture(scope="module")
def rsa_2048():
    return keys.generate("rsa", 2048)[0]


def test_the_record_genkey_prints_matches_its_key(rsa_key):
    assert problems(parse_record(rsa_key.record()), rsa_key) == []
    ed = keys.generate("ed25519")[0]
    assert problems(parse_record(ed.record()), ed) == []


def test_a_record_made_for_a_key_reads_back(rsa_2048):
    record = parse_record(rsa_2048.record())
    assert record.problems == ()
    assert (record.key_type, record.key_bits, record.testing) == ("rsa", 2048, False)
    assert parse_record(rsa_2048.record().encode()).public == rsa_2048.public


def test_ed25519_keys_are_raw_32_octets():
    ed = keys.generate("ed25519")[0]
    assert len(ed.public) == 32
    record = parse_record(ed.record())
    assert (record.key_type, record.key_bits, record.problems) == ("ed25519", 256, ())
    short = parse_record("v=DKIM1; k=ed25519; p=" + base64.b64encode(b"x" * 31).decode())
    assert short.problems == ("an ed25519 key of 31 octets, not 32 (RFC 8463 §4.2)",)


def test_white_space_and_folded_base64_are_read(rsa_key):
    text = rsa_key.record().replace("p=", " p = ").replace("; ", " ;\t")
    text = text[:60] + " " + text[60:] + " ;"
    assert problems(parse_record(text), rsa_key) == []
    # v= may be preceded by FWS and still be the first tag (RFC 6376 §3.2 tag-spec).
    assert problems(parse_record("  v =  DKIM1 ;" + rsa_key.record()[8:]), rsa_key) == []


def test_flags_hashes_and_folding_whitespace(rsa_2048):
    encoded = base64.b64encode(rsa_2048.public).decode()
    folded = " ".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    record = parse_record(f"v=DKIM1; t=y:s; h=sha1 : SHA256; p={folded}")
    assert record.problems == ()
    assert record.testing and record.flags == ("y", "s")
    assert record.hashes == ("sha1", "sha256")
    assert problems(record, rsa_2048) == []


def test_k_defaults_to_rsa_and_v_is_optional(rsa_key):
    bare = rsa_key.record().replace("v=DKIM1; k=rsa; ", "")
    assert problems(parse_record(bare), rsa_key) == []


def test_what_does_not_match_says_why(rsa_key):
    other = keys.generate("rsa", 1024)[0]
    ed = keys.generate("ed25519")[0]
    assert problems(parse_record(other.record()), rsa_key) == [
        "p= is another public key than the private key's"]
    assert problems(parse_record(ed.record()), rsa_key) == ["k=ed25519, but the key is rsa"]
    assert problems(parse_record("v=DKIM1; p="), rsa_key) == [
        "p= is empty: the key is revoked (RFC 6376 §3.6.1)"]
    assert parse_record("v=DKIM1; p=").revoked
    assert problems(parse_record(rsa_key.record() + "; h=sha1; s=tlsrpt"), rsa_key) == [
        "h=sha1 does not allow sha256 (RFC 8301 §3.1)", "s=tlsrpt is not for email"]


@pytest.mark.parametrize("text, message", [
    ("v=spf1 -all", "v=spf1 -all: must be DKIM1"),
    ("hello", "'hello' is not a tag=value pair"),
    ("v=DKIM1; nonsense; p=AAAA", "'nonsense' is not a tag=value pair"),
    ("v=DKIM1; 1x=2; p=AAAA", "'1x=2' is not a tag=value pair"),
    ("k=rsa; v=DKIM1; p=AA==", "v= must be the first tag"),
    ("v=DKIM2; p=AAAA", "v=DKIM2: must be DKIM1"),
    ("v=DKIM1; k=rsa", "no p= tag (the public key)"),
    ("v=DKIM1; p=!!", "p= is not base64"),
    ("v=DKIM1; p=" + base64.b64encode(b"not a key").decode(),
     "p= is not an RSA public key (DER SubjectPublicKeyInfo)"),
    ("v=DKIM1; k=dsa; p=AAAA", "k=dsa: unknown key type (rsa, ed25519)"),
    ("v=DKIM1; h=sha1; p=AAAA", "h=sha1 does not allow sha256 (RFC 8301 §3.1)"),
    ("p=AA==; p=AA==", "the tag p= is given twice"),
    ("v=DKIM1;; p=AAAA", "an empty tag between two ';'"),
    ("v=DKIM1; n=caf\u00e9; p=AAAA", "n= holds a character RFC 6376 §3.2 does not allow")])
def test_records_that_are_none(text, message):
    found = parse_record(text).problems
    assert message in found, found


def test_a_short_rsa_key_is_a_problem_and_one_under_2048_a_warning(rsa_key):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    small = rsa.generate_private_key(public_exponent=65537, key_size=512).public_key()
    der = small.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo)
    record = parse_record("v=DKIM1; p=" + base64.b64encode(der).decode())
    assert record.problems == ("an RSA key of 512 bits, which verifiers reject "
                               "(RFC 8301 §3.2: at least 1024)",)
    judged = judge([rsa_key.record()], rsa_key)
    assert judged.status == "match" and judged.problems == ()
    assert judged.warnings == ("an RSA key of 1024 bits (RFC 8301 §3.2: SHOULD be 2048)",)


def test_judge(rsa_2048, rsa_key):
    assert judge([], rsa_2048).status == "missing"
    assert (judge([rsa_2048.record()], None).status,
            judge([rsa_2048.record()], rsa_2048).status) == ("usable", "match")
    other = judge([rsa_key.record()], rsa_2048)
    assert (other.status, other.problems) == (
        "mismatch", ("p= is another public key than the private key's",))
    assert judge(["v=DKIM1; p="], rsa_2048).status == "unusable"
    assert judge(["v=DKIM1; p="], None).status == "unusable"
    testing = judge([rsa_2048.record().replace("v=DKIM1;", "v=DKIM1; t=y;")], rsa_2048)
    assert testing.status == "match" and "t=y" in testing.warnings[0]
    # Two records at one name: verifiers take either (RFC 6376 §3.6.2.2).
    both = judge(["v=spf1 -all", rsa_2048.record()], rsa_2048)
    assert both.status == "unusable" and both.record.public == rsa_2048.public
    assert re.match(r"^2 TXT records at the name: verifiers take any one", both.problems[0])
    assert len(both.problems) == 1


def test_tags():
    assert parse_tags(" a = 1 ;b=2;") == ({"a": "1", "b": "2"}, [])
    assert parse_tags("a=1; a=2")[1] == ["the tag a= is given twice"]
