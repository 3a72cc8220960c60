"""policyd.checks.dkim: RFC 6376 verification through our resolver, each
outcome reported as its RFC 8601 §2.7.1 result, with the DNSSEC flag."""
from __future__ import annotations

import pytest

from policyd.checks import dkim as dkim_check
from policyd.model import DkimResult
from tests.unit.fakedns import FakeResolver
from tests.unit.milter.signing import ed25519_key, message, rsa_key


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
    assert check.result is DkimResult.FAIL
    assert "body hash" in check.reason


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
    assert check.result is DkimResult.PERMERROR
    assert check.reason.startswith("unusable key")


def test_key_shorter_than_1024_bits_is_permerror():
    # RFC 8301 §3.2: verifiers MUST NOT consider signatures with shorter keys.
    short = rsa_key("own.example", "short", bits=768)
    (check,) = dkim_check.verify(short.sign(message()), resolver_for(short))
    assert check.result is DkimResult.PERMERROR
    assert "too small" in check.reason


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
