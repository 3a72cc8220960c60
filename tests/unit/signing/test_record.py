"""policyd.signing.record: key records parsed and held against a key."""
from __future__ import annotations

import re

import pytest

from policyd.signing import keys
from policyd.signing.record import RecordError, parse_record, parse_tags, problems


@pytest.fixture(scope="module")
def rsa_key():
    return keys.generate("rsa", 1024)[0]


def test_the_record_genkey_prints_matches_its_key(rsa_key):
    assert problems(parse_record(rsa_key.record()), rsa_key) == []
    ed = keys.generate("ed25519")[0]
    assert problems(parse_record(ed.record()), ed) == []


def test_white_space_and_folded_base64_are_read(rsa_key):
    text = rsa_key.record().replace("p=", " p = ").replace("; ", " ;\t")
    text = text[:60] + " " + text[60:] + " ;"
    assert problems(parse_record(text), rsa_key) == []


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
    assert problems(parse_record(rsa_key.record() + "; h=sha1; s=tlsrpt"), rsa_key) == [
        "h=sha1 does not allow sha256", "s=tlsrpt is not for email"]


@pytest.mark.parametrize("text, message", [
    ("v=spf1 -all", "v= must come first and say DKIM1"),
    ("hello", "'hello' is not a tag=value pair"),
    ("k=rsa; v=DKIM1; p=AA==", "v= must come first and say DKIM1"),
    ("v=DKIM1; k=rsa", "no p= (the public key)"),
    ("v=DKIM1; p=!!", "p= is not base64"),
    ("p=AA==; p=AA==", "the tag p= is given twice")])
def test_records_that_are_none(text, message):
    with pytest.raises(RecordError, match="^" + re.escape(message) + "$"):
        parse_record(text)


def test_tags():
    assert parse_tags(" a = 1 ;b=2;") == {"a": "1", "b": "2"}
