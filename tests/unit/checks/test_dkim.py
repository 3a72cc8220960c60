"""policyd.checks.dkim: RFC 6376 verification through our resolver, each
outcome reported as its RFC 8601 §2.7.1 result, with the DNSSEC flag."""
from __future__ import annotations

import base64
import dataclasses
import random
import re
import subprocess
import sys
from pathlib import Path

import dkim
import dkim.crypto
import hypothesis
import pytest
from dkim.canonicalization import Relaxed

from policyd.checks import dkim as dkim_check
from policyd.model import DkimResult
from tests.unit.fakedns import FakeResolver
from tests.unit.milter.signing import SigningKey, ed25519_key, message, rsa_key


@pytest.fixture(scope="module")
def rsa():
    return rsa_key("own.example", "rsa1", bits=1024)


@pytest.fixture(scope="module")
def ed():
    return ed25519_key("other.example", "ed1")


def resolver_for(*keys, **options) -> FakeResolver:
    return FakeResolver({k.record_name: {"TXT": [k.record_strings()]} for k in keys}, **options)


def test_unsigned_message_is_none():
    checks = dkim_check.verify(message(), FakeResolver({}))
    assert [c.result for c in checks] == [DkimResult.NONE]


@pytest.mark.parametrize("key_name", ["rsa", "ed"])
def test_valid_signature_passes_with_domain_selector_and_b(key_name, request):
    key = request.getfixturevalue(key_name)
    resolver = resolver_for(key)
    signed = key.sign(message())
    (check,) = dkim_check.verify(signed, resolver)
    assert (check.result, check.domain, check.selector) == (DkimResult.PASS, key.domain,
                                                            key.selector)
    b_value = signed.split(b" b=", 1)[1].split(b"\r\n", 1)[0].replace(b"\r\n", b"")
    assert check.b == b_value.strip()[:8].decode()
    assert resolver.asked(key.record_name, "TXT")
    assert check.dnssec is False


def test_lf_line_ends_are_read_as_crlf(ed):
    # RFC 6376 §3.4: canonicalization works on CRLF lines; a message handed
    # over with bare LFs (as some tools write them) verifies all the same.
    signed = ed.sign(message(body="one\r\n\r\ntwo\r\n"), canonicalize=(b"simple", b"simple"))
    (check,) = dkim_check.verify(signed.replace(b"\r\n", b"\n"), resolver_for(ed))
    assert check.result is DkimResult.PASS


def test_message_without_body_separator(ed):
    (check,) = dkim_check.verify(ed.sign(message()).split(b"\r\n\r\n")[0], resolver_for(ed))
    assert check.result is DkimResult.FAIL   # the body hash was over "Hello."


def test_dnssec_flag_follows_the_key_answer(rsa):
    signed = rsa.sign(message())
    (secure,) = dkim_check.verify(signed, resolver_for(rsa, secure=[rsa.record_name]))
    (untrusted,) = dkim_check.verify(signed, resolver_for(rsa, secure=[rsa.record_name],
                                                          trusted=False))
    assert secure.result is untrusted.result is DkimResult.PASS
    assert (secure.dnssec, untrusted.dnssec) == (True, False)


def test_body_changed_after_signing_fails(rsa):
    signed = rsa.sign(message(body="Pay 10 EUR.\r\n")).replace(b"10 EUR", b"99 EUR")
    (check,) = dkim_check.verify(signed, resolver_for(rsa))
    assert (check.result, check.reason) == (DkimResult.FAIL, "body hash mismatch")


def test_signed_header_changed_after_signing_fails(ed):
    signed = ed.sign(message(subject="original")).replace(b"original", b"forged!!")
    (check,) = dkim_check.verify(signed, resolver_for(ed))
    assert (check.result, check.reason) == (DkimResult.FAIL, "signature does not verify")


def test_no_key_published_is_permerror(rsa):
    (check,) = dkim_check.verify(rsa.sign(message()), FakeResolver({"own.example": {"A": "192.0.2.1"}}))
    assert (check.result, check.reason) == (DkimResult.PERMERROR, "no key published")
    assert check.domain == "own.example"


def test_unusable_key_record_is_permerror(rsa):
    resolver = FakeResolver({rsa.record_name: {"TXT": "v=DKIM1; k=rsa; p=bm90IGEga2V5"}})
    (check,) = dkim_check.verify(rsa.sign(message()), resolver)
    assert (check.result, check.reason) == (DkimResult.PERMERROR, "key does not parse")


def test_key_shorter_than_1024_bits_is_permerror():
    # RFC 8301 §3.2: verifiers MUST NOT consider signatures with shorter keys.
    short = rsa_key("own.example", "short", bits=768)
    (check,) = dkim_check.verify(short.sign(message()), resolver_for(short))
    assert (check.result, check.reason) == (DkimResult.PERMERROR, "key too short")


def test_dns_trouble_is_temperror(rsa):
    resolver = FakeResolver({}, temp_errors=[rsa.record_name])
    (check,) = dkim_check.verify(rsa.sign(message()), resolver)
    assert (check.result, check.domain, check.selector) == (DkimResult.TEMPERROR,
                                                            "own.example", "rsa1")


def test_signature_with_syntax_error_is_neutral(rsa):
    signed = rsa.sign(message())
    broken = signed.replace(b" d=own.example;", b" d=own.example; d=twice.example;", 1)
    assert broken != signed
    (check,) = dkim_check.verify(broken, resolver_for(rsa))
    assert check.result is DkimResult.NEUTRAL
    assert check.domain == "own.example"   # reported by domain all the same


def test_signature_missing_a_tag_is_neutral(rsa):
    signed = rsa.sign(message())
    stripped = signed.replace(b" a=rsa-sha256;", b"", 1)
    assert stripped != signed
    (check,) = dkim_check.verify(stripped, resolver_for(rsa))
    assert check.result is DkimResult.NEUTRAL


def test_each_signature_is_reported_in_order(rsa, ed):
    twice = ed.sign(rsa.sign(message()), domain=ed.domain)
    checks = dkim_check.verify(twice, resolver_for(rsa, ed))
    assert [(c.result, c.domain) for c in checks] == [(DkimResult.PASS, "other.example"),
                                                      (DkimResult.PASS, "own.example")]


def test_at_most_max_signatures_are_checked(ed):
    signed = message()
    for _ in range(dkim_check.MAX_SIGNATURES + 3):
        signed = ed.sign(signed)
    resolver = resolver_for(ed)
    checks = dkim_check.verify(signed, resolver)
    assert len(checks) == dkim_check.MAX_SIGNATURES
    assert all(c.result is DkimResult.PASS for c in checks)


def test_garbage_header_block_with_a_signature_is_neutral(rsa):
    garbage = b"\x01\x02 not a header\r\n" + rsa.sign(message())
    (check,) = dkim_check.verify(garbage, resolver_for(rsa))
    assert (check.result, check.reason) == (DkimResult.NEUTRAL, "message header does not parse")


def test_garbage_without_a_signature_is_none():
    (check,) = dkim_check.verify(b"\x00\xff garbage\r\n\r\nbody", FakeResolver({}))
    assert check.result is DkimResult.NONE


def test_signature_domain_that_is_no_dns_name_is_neutral_and_not_looked_up(ed):
    signed = ed.sign(message(), domain="a" * 70 + ".example")   # RFC 1035: labels <= 63
    resolver = FakeResolver({})
    (check,) = dkim_check.verify(signed, resolver)
    assert check.result is DkimResult.NEUTRAL
    assert resolver.queries == []


# -- the fast verifier gives dkimpy's results ------------------------------
#
# policyd's _Verifier replaces dkimpy's verify_sig and verify_sig_process
# (key parse cache, RSA by OpenSSL, faster canonicalization).  Every case
# below is verified three ways and must come out the same: with dkimpy's
# own DKIM class (what policyd did before), with _Verifier and OpenSSL,
# and with _Verifier on dkimpy's pure-Python RSA (cryptography missing).


def _modify_b(signed: bytes, change) -> bytes:
    """The message with the b= of its first signature replaced by
    change(signature octets); b= is not part of the header hash."""
    head, _, rest = signed.partition(b"\r\n\r\n")
    match = re.search(rb"([;\s]b=)([A-Za-z0-9+/=\s]+?)(\r\n(?=\S)|$)", head)
    new = base64.b64encode(change(base64.b64decode(re.sub(rb"\s+", b"", match.group(2)))))
    return head[:match.start(2)] + new + head[match.end(2):] + b"\r\n\r\n" + rest


def _rsa_record(modulus: int, exponent: int = 65537) -> str:
    """A key record for an arbitrary RSA public key (RFC 8017 RSAPublicKey,
    which dkimpy also takes in place of a SubjectPublicKeyInfo)."""
    def der(tag: int, content: bytes) -> bytes:
        size = len(content)
        length = bytes([size]) if size < 0x80 else (
            bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes((size.bit_length() + 7) // 8, "big"))
        return bytes([tag]) + length + content

    def integer(value: int) -> bytes:
        return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))

    der = der(0x30, integer(modulus) + integer(exponent))
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def _modulus(key) -> int:
    return dkim.evaluate_pk(b"", key.record.encode())[0]["modulus"]


@pytest.fixture(scope="module")
def rsa2048():
    return rsa_key("own.example", "big", bits=2048)


@pytest.fixture(scope="module")
def rsa_e3():
    private = subprocess.run(["openssl", "genrsa", "-traditional", "-3", "1024"],
                             capture_output=True, check=True).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=private,
                            capture_output=True, check=True).stdout
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode("ascii")
    return SigningKey("own.example", "e3", private, record, b"rsa-sha256")


WHITESPACE_BODY = ("Dear  all,\t\r\n\r\n  indented \t and\ttabbed   \r\n"
                   "trailing space \r\n \r\n\t\r\nend\r\n\r\n\r\n")
FOLDED = ("X-Folded: one\r\n\t two  \t three\r\n  four \r\n"
          "Subject2: x\r\nCc:  a@own.example,\r\n    b@own.example\r\n")


def _cases(rsa, rsa2048, rsa_e3, ed):
    """(name, message, resolver) for each outcome the verifier can have."""
    short = rsa_key("own.example", "short", bits=768)
    sha1 = dataclasses.replace(rsa2048, algorithm=b"rsa-sha1")
    text = message(body="Pay 10 EUR.\r\n", extra_headers=FOLDED)
    spaced = message(subject="a  \t spaced   subject ", body=WHITESPACE_BODY,
                     extra_headers=FOLDED)
    n = _modulus(rsa2048)
    signed = rsa2048.sign(text, include_headers=[b"from", b"subject", b"x-folded", b"cc"])
    cases = []

    def case(name, signed_message, *keys, records=None, **options):
        zone = {k.record_name: {"TXT": [k.record_strings()]} for k in keys}
        zone.update(records or {})
        cases.append((name, signed_message, FakeResolver(zone, **options)))

    for canon in [(b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple"),
                  (b"simple", b"relaxed")]:
        name = "/".join(c.decode() for c in canon)
        case(f"rsa pass {name}", rsa2048.sign(spaced, canonicalize=canon), rsa2048)
        case(f"ed25519 pass {name}", ed.sign(spaced, canonicalize=canon), ed)
        case(f"rsa body altered {name}",
             rsa2048.sign(spaced, canonicalize=canon).replace(b"tabbed", b"tabbEd"), rsa2048)
        case(f"rsa header altered {name}",
             rsa2048.sign(spaced, canonicalize=canon).replace(b"spaced", b"spaceD"), rsa2048)
    case("rsa folded header whitespace changed (relaxed)",
         rsa2048.sign(spaced, canonicalize=(b"relaxed", b"relaxed"))
         .replace(b"\r\n\t two  \t three", b"\r\n two three"), rsa2048)
    case("rsa-sha1 pass", sha1.sign(text), sha1)
    case("rsa-sha1 body altered", sha1.sign(text).replace(b"10 EUR", b"99 EUR"), sha1)
    case("rsa 1024 pass", rsa.sign(text), rsa)
    case("rsa e=3 pass", rsa_e3.sign(text), rsa_e3)
    case("rsa e=3 bad signature", _modify_b(rsa_e3.sign(text), lambda s: s[:-1] + b"\0"), rsa_e3)
    case("ed25519 header altered", ed.sign(text).replace(b"Subject: test", b"Subject: tesT"), ed)
    case("rsa bad signature bytes", _modify_b(signed, lambda s: s[:-1] + bytes([s[-1] ^ 1])),
         rsa2048)
    case("rsa signature plus n", _modify_b(
        signed, lambda s: (int.from_bytes(s, "big") + n).to_bytes(len(s) + 1, "big")), rsa2048)
    case("rsa signature with a leading zero octet",
         _modify_b(signed, lambda s: b"\0" + s), rsa2048)
    case("rsa signature short", _modify_b(signed, lambda s: s[1:]), rsa2048)
    case("rsa signature empty", _modify_b(signed, lambda s: b""), rsa2048)
    case("ed25519 signature short", _modify_b(ed.sign(text), lambda s: s[:-1]), ed)
    case("ed25519 bad signature bytes",
         _modify_b(ed.sign(text), lambda s: bytes([s[0] ^ 1]) + s[1:]), ed)
    case("l= covers the signed part of a longer body",
         dkim.sign(text, b"big", b"own.example", rsa2048.private, length=True)
         + text + b"appended\r\n", rsa2048)
    once = rsa2048.sign(text, include_headers=[b"from", b"subject"])
    head, _, rest = once.partition(b"\r\nFrom: ")
    case("second From above the signed one (dkimpy bug#644046)",
         head + b"\r\nFrom: boss@own.example\r\nFrom: " + rest, rsa2048)
    case("two signatures, same canonicalization",
         ed.sign(rsa2048.sign(spaced, canonicalize=(b"relaxed", b"relaxed")),
                 canonicalize=(b"relaxed", b"relaxed")), ed, rsa2048)
    case("two signatures, one body altered",
         ed.sign(rsa2048.sign(text)).replace(b"10 EUR", b"99 EUR"), ed, rsa2048)
    case("too short key, valid signature", short.sign(text), short)
    case("too short key, bad signature", short.sign(text).replace(b"Subject: test",
                                                                   b"Subject: tesT"), short)
    key_name = rsa2048.record_name
    public = rsa2048.record.split("p=")[1]
    for name, record in [
            ("revoked key", "v=DKIM1; k=rsa; p="),
            ("key that is no key", "v=DKIM1; k=rsa; p=bm90IGEga2V5"),
            ("key with broken base64", "v=DKIM1; k=rsa; p=abc"),
            ("unknown k=", "v=DKIM1; k=dsa; p=" + public),
            ("k=ed25519 with an RSA key", "v=DKIM1; k=ed25519; p=" + public),
            ("wrong v=", "v=DKIM2; k=rsa; p=" + public),
            ("record that is no tag list", "this is not a key"),
            ("empty record", ""),
            ("key for TLS reports only", "v=DKIM1; k=rsa; s=tlsrpt; p=" + public),
            ("key for another service", "v=DKIM1; k=rsa; s=other; p=" + public),
            ("key without k=", "v=DKIM1; p=" + public),
            ("modulus too small for the digest", _rsa_record((n >> 1800) | 1)),
            ("even exponent", _rsa_record(n, 65536)),
            ("exponent 1", _rsa_record(n, 1)),
            ("modulus past OpenSSL's limit", _rsa_record((1 << 16400) + 1))]:
        case(name, signed, records={key_name: {"TXT": record}})
    case("a=ed25519-sha256 signed by an RSA key", signed.replace(
        b"a=rsa-sha256", b"a=ed25519-sha256", 1), rsa2048)
    case("invalid c=", signed.replace(b"c=relaxed/simple", b"c=relaxed/odd", 1), rsa2048)
    case("no key published", signed, records={"own.example": {"A": "192.0.2.1"}})
    case("key lookup fails for now", signed, temp_errors=[key_name])
    case("unsigned", text)
    return cases


@pytest.fixture(scope="module")
def cases(rsa, rsa2048, rsa_e3, ed):
    return _cases(rsa, rsa2048, rsa_e3, ed)


@pytest.fixture
def no_openssl(monkeypatch):
    """policyd as it runs without python3-cryptography."""
    dkim_check._parse_key.cache_clear()
    monkeypatch.setattr(dkim_check, "_rsa", None)
    yield
    dkim_check._parse_key.cache_clear()


def _all(cases):
    return {name: dkim_check.verify(signed, resolver) for name, signed, resolver in cases}


def test_the_cases_cover_every_result_the_verifier_gives(cases):
    seen = {check.result for checks in _all(cases).values() for check in checks}
    assert seen == set(DkimResult) - {DkimResult.POLICY}    # policy is not ours to give


def test_fast_verifier_gives_dkimpys_results(cases, monkeypatch):
    fast = _all(cases)
    monkeypatch.setattr(dkim_check, "_Verifier", dkim.DKIM)
    assert fast == _all(cases)


def test_without_cryptography_the_results_are_the_same(cases, no_openssl):
    without = _all(cases)
    dkim_check._parse_key.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dkim_check, "_Verifier", dkim.DKIM)
        assert without == _all(cases)


def test_some_results_for_the_record(cases):
    results = {name: [(c.result, c.reason) for c in checks] for name, checks in _all(cases).items()}
    assert results["rsa pass relaxed/relaxed"] == [(DkimResult.PASS, "")]
    assert results["rsa signature plus n"] == [(DkimResult.PASS, "")]   # dkimpy works mod n
    assert results["rsa bad signature bytes"] == [(DkimResult.FAIL, "signature does not verify")]
    assert results["too short key, valid signature"] == [
        (DkimResult.PERMERROR, "key too short")]
    assert results["modulus too small for the digest"] == [
        (DkimResult.PERMERROR, "key too short for the hash")]
    assert results["revoked key"][0][0] is DkimResult.PERMERROR
    assert results["key lookup fails for now"] == [(DkimResult.TEMPERROR, "key lookup failed")]
    assert results["a=ed25519-sha256 signed by an RSA key"] == [
        (DkimResult.FAIL, "signature does not verify")]   # a= is in the hashed field


# -- each fast path is taken ------------------------------------------------

def _refuse(*args, **kwargs):
    raise AssertionError("the slow path was taken")


@pytest.mark.skipif(dkim_check._rsa is None, reason="python3-cryptography is not installed")
def test_rsa_is_verified_by_openssl(rsa, rsa2048, monkeypatch):
    monkeypatch.setattr(dkim.crypto, "RSASSA_PKCS1_v1_5_verify", _refuse)
    for key in (rsa, rsa2048):
        assert dkim_check._parse_key(key.record.encode()).openssl is not None
        signed = key.sign(message())
        assert [c.result for c in dkim_check.verify(signed, resolver_for(key))] == [
            DkimResult.PASS]
        forged = _modify_b(signed, lambda s: s[:-1] + bytes([s[-1] ^ 1]))
        assert [c.result for c in dkim_check.verify(forged, resolver_for(key))] == [
            DkimResult.FAIL]


def test_without_cryptography_rsa_is_dkimpys(rsa, no_openssl, monkeypatch):
    calls = []
    original = dkim.crypto.RSASSA_PKCS1_v1_5_verify
    monkeypatch.setattr(dkim.crypto, "RSASSA_PKCS1_v1_5_verify",
                        lambda *args: calls.append(args) or original(*args))
    (check,) = dkim_check.verify(rsa.sign(message()), resolver_for(rsa))
    assert check.result is DkimResult.PASS
    assert len(calls) == 1


def test_keys_past_openssls_limits_stay_on_dkimpys_arithmetic():
    assert dkim_check._openssl_rsa_key((1 << 16400) + 1, 65537) is None
    assert dkim_check._openssl_rsa_key((1 << 4000) + 1, (1 << 70) + 1) is None
    assert dkim_check._openssl_rsa_key((1 << 2047) + 1, 2) is None


def test_a_key_record_is_parsed_once(rsa, ed, monkeypatch):
    dkim_check._parse_key.cache_clear()
    parsed = []
    original = dkim.evaluate_pk
    monkeypatch.setattr(dkim, "evaluate_pk", lambda *args: parsed.append(args) or original(*args))
    for key in (rsa, ed, rsa, ed):
        (check,) = dkim_check.verify(key.sign(message()), resolver_for(key))
        assert check.result is DkimResult.PASS
    assert len(parsed) == 2


def test_a_changed_key_record_is_parsed_afresh(rsa, rsa2048):
    # The cache is keyed by the record's bytes: a new key under the same
    # name is never answered from the old one.
    signed = rsa.sign(message())
    (before,) = dkim_check.verify(signed, resolver_for(rsa))
    rotated = FakeResolver({rsa.record_name: {"TXT": [rsa2048.record_strings()]}})
    (after,) = dkim_check.verify(signed, rotated)
    assert (before.result, after.result) == (DkimResult.PASS, DkimResult.FAIL)


def test_the_key_cache_is_bounded():
    assert dkim_check._parse_key.cache_info().maxsize == dkim_check.KEY_CACHE_SIZE


def test_the_body_is_hashed_once_for_signatures_that_share_its_canonicalization(
        rsa, ed, monkeypatch):
    canonicalized = []
    original = dkim_check._relaxed_body
    monkeypatch.setattr(dkim_check, "_relaxed_body",
                        lambda body: canonicalized.append(body) or original(body))
    relaxed = (b"relaxed", b"relaxed")
    twice = ed.sign(rsa.sign(message(), canonicalize=relaxed), canonicalize=relaxed)
    checks = dkim_check.verify(twice, resolver_for(rsa, ed))
    assert [c.result for c in checks] == [DkimResult.PASS, DkimResult.PASS]
    assert len(canonicalized) == 1


# -- the pieces written for speed, against the code they replace ------------

def _random_bytes(rng: random.Random, alphabet, length: int) -> bytes:
    return b"".join(rng.choice(alphabet) for _ in range(length))


def test_relaxed_canonicalization_is_dkimpys():
    rng = random.Random(6376)
    alphabet = [b"a", b"b", b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\x0b"]
    for _ in range(3000):
        data = _random_bytes(rng, alphabet, rng.randrange(0, 30))
        assert dkim_check._relaxed_body(data) == Relaxed.canonicalize_body(data), data
        headers = [(b"Subject", data), (b"X-Y", data + b"\r\n")]
        assert dkim_check._relaxed_headers(headers) == Relaxed.canonicalize_headers(headers)


def _split_as_it_was(message: bytes) -> tuple[bytes, bytes]:
    if message.count(b"\n") != message.count(b"\r\n"):
        message = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[:end + 2], message[end + 4:]


def test_split_is_what_it_was():
    rng = random.Random(5322)
    alphabet = [b"a", b":", b" ", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\n\n"]
    for _ in range(3000):
        data = _random_bytes(rng, alphabet, rng.randrange(0, 25))
        assert dkim_check._split(data) == _split_as_it_was(data), data


def test_b_tag_removal_is_dkimpys():
    rng = random.Random(6376_35)
    alphabet = [b";", b" ", b"b", b"b=", b" b=", b";b =", b"=", b"\r\n", b"\n", b"\r", b"\t",
                b"A", b"/", b"+", b"h", b"x", b"\r\n\t"]
    for _ in range(5000):
        field = _random_bytes(rng, alphabet, rng.randrange(0, 25))
        assert (dkim_check._B_TAG_VALUE.sub(b"\\1", field) == dkim.RE_BTAG.sub(b"\\1", field)), field


def test_openssl_is_loaded_with_the_module_not_by_the_first_key():
    # The milter's workers are forked after this import: loaded here, the
    # backend is shared, not loaded again by each worker's first key.
    probe = ("import sys, policyd.checks.dkim; "
             "print('cryptography.hazmat.backends.openssl.backend' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[3])
    assert loaded.stdout.strip() == "True"


# -- b= with no base64 in it; reasons in our words ----------------------------

NOT_BASE64 = [b"@", b"!!", b'"', b"-_-", b"="]


def with_b(signed: bytes, value: bytes) -> bytes:
    """The message with its first signature's b= value replaced."""
    head, _, rest = signed.partition(b"\r\n\r\n")
    new, count = re.subn(rb"([;\s]b=)[^;]*?(\r\n(?=\S))", lambda m: m.group(1) + value + m.group(2),
                         head, count=1)
    assert count == 1
    return new + b"\r\n\r\n" + rest


def parsed(raw: bytes) -> tuple[list, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers, _ = dkim.rfc822_parse(head + b"\r\n")
    return headers, body


@pytest.mark.parametrize("value", NOT_BASE64, ids=repr)
def test_b_without_base64_is_neutral_with_an_empty_b_and_our_words(ed, value):
    # RFC 8601 §2.7.1: a signature with syntax errors is neutral (see _verify_one).
    headers, body = parsed(with_b(ed.sign(message()), value))
    (check,) = dkim_check.verify_parsed(headers, body, resolver_for(ed))
    assert (check.result, check.domain, check.selector, check.b) == (
        DkimResult.NEUTRAL, "other.example", "ed1", "")
    assert check.reason == "signature does not parse: b= is not base64"


def test_b_prefix_of_a_good_signature_is_kept(ed):
    headers, body = parsed(ed.sign(message()))
    (check,) = dkim_check.verify_parsed(headers, body, resolver_for(ed))
    assert check.result is DkimResult.PASS and len(check.b) == dkim_check.B_PREFIX


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.replace(b" d=other.example;", b"", 1), "signature does not parse: missing d= tag"),
    (lambda s: s.replace(b" a=ed25519-sha256;", b" a=md5;", 1),
     "signature does not parse: unknown a= algorithm"),
    (lambda s: s.replace(b" s=ed1;", b" s=ed1; s=ed2;", 1),
     "signature does not parse: duplicate tag"),
    (lambda s: s.replace(b" q=dns/txt;", b" q=dns/xyz;", 1),
     "signature does not parse: q= is not dns/txt"),
    (lambda s: s.replace(b"c=relaxed/simple", b"c=odd/simple", 1),
     "cannot verify: c= is not a canonicalization"),
    (lambda s: s.replace(b"Hello.", b"Bye..."), "body hash mismatch"),
], ids=["missing d", "algorithm", "duplicate", "q", "c", "body"])
def test_reasons_are_our_own_words(ed, change, reason):
    changed = change(ed.sign(message()))
    (check,) = dkim_check.verify(changed, resolver_for(ed))
    assert check.reason == reason
    assert "b'" not in check.reason and "(" not in check.reason


def test_a_key_of_unknown_type_has_our_words(ed):
    resolver = FakeResolver({ed.record_name: {"TXT": "v=DKIM1; k=dsa; p=bm90IGEga2V5"}})
    (check,) = dkim_check.verify(ed.sign(message()), resolver)
    assert (check.result, check.reason) == (DkimResult.PERMERROR, "unknown key type")


# -- the body hashed as it arrives ----------------------------------------------

def _streamed(body: bytes, cuts: list[int], headers: list) -> dict:
    hasher = dkim_check.BodyHasher(headers)
    previous = 0
    for cut in sorted(cuts) + [len(body)]:
        hasher.update(body[previous:cut])
        previous = cut
    return hasher.digests()


def _signature_headers(c: bytes, length: bytes | None) -> list:
    tags = b"v=1; a=rsa-sha256; c=" + c + b"; d=x.example; s=s; h=from; bh=AAAA; b=AAAA"
    if length is not None:
        tags += b"; l=" + length
    return [[b"DKIM-Signature", b" " + tags + b"\r\n"]]


@hypothesis.settings(max_examples=3000, deadline=None)
@hypothesis.given(
    body=hypothesis.strategies.binary(max_size=60).map(
        lambda b: bytes(b"ab \t\r\n"[x % 6] for x in b)),
    cuts=hypothesis.strategies.lists(hypothesis.strategies.integers(0, 60), max_size=6),
    c=hypothesis.strategies.sampled_from([b"relaxed/relaxed", b"relaxed/simple", b"simple"]),
    length=hypothesis.strategies.one_of(hypothesis.strategies.none(),
                                        hypothesis.strategies.integers(0, 70)),
    flush=hypothesis.strategies.integers(1, 8))
def test_streamed_body_hash_is_the_whole_bodys(body, cuts, c, length, flush):
    # Chunks cut anywhere (inside a CRLF, a run of WSP, the empty lines at
    # the end), and over-long lines written in pieces (flush).
    headers = _signature_headers(c, None if length is None else str(length).encode())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dkim_check.BodyHasher, "FLUSH", flush)
        streamed = _streamed(body, [min(cut, len(body)) for cut in cuts], headers)
    verifier = dkim_check._Verifier(None, logger=dkim_check._SILENT)
    verifier.body = dkim_check.crlf_body(body)
    algorithm = Relaxed if c.split(b"/")[-1] == b"relaxed" else dkim.canonicalization.Simple
    ((memo, digest),) = streamed.items()
    assert digest == verifier._body_hash(algorithm, dkim.HASH_ALGORITHMS[b"rsa-sha256"],
                                         None if length is None else str(length).encode())


@pytest.mark.parametrize("key_name", ["rsa", "ed"])
def test_a_streamed_body_verifies_and_a_changed_one_fails(key_name, request):
    key = request.getfixturevalue(key_name)
    body = "".join(f"line {n} \t with  space\r\n" for n in range(5000)) + "\r\n\r\n"
    for canonicalize in ((b"relaxed", b"relaxed"), (b"simple", b"simple")):
        headers, raw_body = parsed(key.sign(message(body=body), canonicalize=canonicalize))
        for changed, result in ((raw_body, DkimResult.PASS),
                                (raw_body.replace(b"line 4000", b"line 4001"), DkimResult.FAIL)):
            hasher = dkim_check.BodyHasher(headers)
            for start in range(0, len(changed), 65535):
                hasher.update(changed[start:start + 65535])
            (check,) = dkim_check.verify_parsed(headers, hasher, resolver_for(key))
            assert check.result is result


def test_a_signature_that_does_not_parse_gets_no_stream_and_is_neutral(ed):
    headers, body = parsed(with_b(ed.sign(message()), b"@"))
    hasher = dkim_check.BodyHasher(headers)
    hasher.update(body)
    (check,) = dkim_check.verify_parsed(headers, hasher, resolver_for(ed))
    assert check.result is DkimResult.NEUTRAL
