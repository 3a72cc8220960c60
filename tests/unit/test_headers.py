"""policyd.headers: Authentication-Results (RFC 8601) and Received-SPF
(RFC 7208 §9.1), read back with a parser, fed hostile values."""
from __future__ import annotations

import ipaddress
import re

import authres
import pytest

from policyd.headers import authentication_results, received_spf, safe_value
from policyd.model import (DkimCheck, DkimResult, IprevCheck, IprevResult, SpfCheck,
                           SpfResult)

ip = ipaddress.ip_address
AUTHSERV_ID = "mx.receiver.example"
# RFC 5322 §2.1.1: a line MUST be no more than 998 characters.
MAX_LINE = 998


def parse(header):
    text = str(header)
    assert text.startswith("Authentication-Results: ")
    return authres.all_features().parse(text)


def properties(result) -> dict[str, str]:
    return {f"{p.type}.{p.name}": p.value for p in result.properties}


def summary(parsed) -> list[tuple[str, str, dict]]:
    return [(r.method, r.result, properties(r)) for r in parsed.results]


# --- Authentication-Results read back ------------------------------------

def test_envelope_results_parse_back():
    header = authentication_results(
        AUTHSERV_ID, ip("2001:db8:6::25"),
        (SpfCheck("helo", "helo.other.example", SpfResult.PASS),
         SpfCheck("mailfrom", "other.example", SpfResult.FAIL)),
        IprevCheck(IprevResult.PASS, "mail6.other.example"))
    parsed = parse(header)
    assert parsed.authserv_id == AUTHSERV_ID
    assert summary(parsed) == [
        ("spf", "pass", {"smtp.helo": "helo.other.example"}),
        ("spf", "fail", {"smtp.mailfrom": "other.example"}),
        ("iprev", "pass", {"policy.iprev": "2001:db8:6::25"}),
    ]


def test_ipv6_policy_iprev_is_quoted():
    # RFC 8601 §2.2: a pvalue with ":" is not a token and must be quoted.
    header = authentication_results(AUTHSERV_ID, ip("2001:db8:6::26"),
                                    iprev=IprevCheck(IprevResult.PERMERROR, "", "no PTR"))
    assert 'policy.iprev="2001:db8:6::26"' in header.value
    header = authentication_results(AUTHSERV_ID, ip("198.51.100.11"),
                                    iprev=IprevCheck(IprevResult.PERMERROR, "", "no PTR"))
    assert "policy.iprev=198.51.100.11" in header.value


def test_dkim_results_parse_back():
    header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), dkim=(
        DkimCheck(DkimResult.PASS, "own.example", "sel1", "AbC+/dEf0123xyz"),
        DkimCheck(DkimResult.FAIL, "other.example", "s2", reason="body hash mismatch"),
        DkimCheck(DkimResult.NONE)))
    assert summary(parse(header)) == [
        ("dkim", "pass", {"header.d": "own.example", "header.s": "sel1",
                          "header.b": "AbC+/dEf"}),
        ("dkim", "fail", {"header.d": "other.example", "header.s": "s2"}),
        ("dkim", "none", {}),
    ]


@pytest.mark.parametrize("relaxed_via", ["203.0.113.7", "2001:db8:7::7"])
def test_nat_relaxation_is_reported_as_policy_property(relaxed_via):
    # RFC 8601 §2.4: the policy ptype says a local policy changed the result.
    # Every property must survive the parser mail systems use, whatever the
    # address family (a quoted pvalue followed by another property is lost
    # by authres's parser).
    check = SpfCheck("mailfrom", "own.example", SpfResult.PASS, mechanism="ip4:203.0.113.7",
                     relaxed_via=ip(relaxed_via), relaxed_mode="reevaluate")
    header = authentication_results(AUTHSERV_ID, ip("192.168.1.10"), (check,))
    assert "NAT network 192.168.1.10" in header.value
    assert summary(parse(header)) == [
        ("spf", "pass", {"smtp.mailfrom": "own.example",
                         "policy.nat-relaxed": relaxed_via})]


def test_nat_pass_mode_is_reported_as_policy_property():
    check = SpfCheck("mailfrom", "own.example", SpfResult.PASS, relaxed_mode="pass")
    header = authentication_results(AUTHSERV_ID, ip("fd00::25"), (check,))
    assert summary(parse(header)) == [
        ("spf", "pass", {"smtp.mailfrom": "own.example", "policy.nat-relaxed": "pass"})]


def test_dnssec_is_said_in_the_comment():
    secure = authentication_results(AUTHSERV_ID, ip("192.0.2.1"),
                                    (SpfCheck("mailfrom", "signed.example", SpfResult.PASS,
                                              dnssec=True),))
    plain = authentication_results(AUTHSERV_ID, ip("192.0.2.1"),
                                   (SpfCheck("mailfrom", "other.example", SpfResult.PASS),))
    assert "(with dnssec)" in secure.value and "(without dnssec)" in plain.value


def test_nothing_to_report_is_no_header():
    assert authentication_results(AUTHSERV_ID, ip("192.0.2.1")) is None


# --- CVE-2019-20790: a HELO result never reads as a MAIL FROM result -------

@pytest.mark.parametrize("helo_result", list(SpfResult))
def test_helo_result_is_only_smtp_helo(helo_result):
    header = authentication_results(
        AUTHSERV_ID, ip("198.51.100.10"),
        (SpfCheck("helo", "helo.other.example", helo_result),
         SpfCheck("mailfrom", "own.example", SpfResult.FAIL)))
    results = summary(parse(header))
    assert results[0] == ("spf", helo_result.value, {"smtp.helo": "helo.other.example"})
    mailfrom = [r for r in results if "smtp.mailfrom" in r[2]]
    assert mailfrom == [("spf", "fail", {"smtp.mailfrom": "own.example"})]


# --- hostile values ---------------------------------------------------------

HOSTILE = [
    pytest.param("evil.example\r\nX-Injected: yes", id="crlf"),
    pytest.param("evil.example\nAuthentication-Results: x; spf=pass", id="lf"),
    pytest.param("evil.example\r", id="cr"),
    pytest.param('evil"example', id="quote"),
    pytest.param('evil.example" smtp.mailfrom="paypal.com', id="quote-escape"),
    pytest.param("evil.example) spf=pass (", id="parentheses"),
    pytest.param("evil.example; dkim=pass header.d=paypal.com", id="semicolon"),
    pytest.param("evil\\.example\\", id="backslash"),
    pytest.param("ev\udcffil\udce9.example", id="surrogateescape"),
    pytest.param("évil.example", id="non-ascii"),
    pytest.param("evil\x00.example\x7f", id="nul-del"),
    pytest.param("a@b@paypal.com", id="at-signs"),
    pytest.param("", id="empty"),
    pytest.param("x" * 2000, id="very-long"),
    # "$" in a regular expression matches before a final "\n" too.
    pytest.param("evil.example\n", id="trailing-lf"),
]


def assert_clean(header, *, may_fold: bool):
    """No CR, no LF that does not fold, printable ASCII, and no line over
    RFC 5322's limit.  Headers of the envelope go to Postfix as PREPEND,
    which cannot fold: they must fit one line (may_fold False)."""
    text = str(header)
    assert "\r" not in text
    assert re.fullmatch(r"[ -~]+(?:\n\t[ -~]+)*", text), repr(text)
    if not may_fold:
        assert "\n" not in text
    for line in text.split("\n"):
        assert len(line) <= MAX_LINE


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_in_authentication_results(value):
    header = authentication_results(
        AUTHSERV_ID, ip("2001:db8:6::27"),
        (SpfCheck("helo", value, SpfResult.NONE, explanation=value, mechanism=value),
         SpfCheck("mailfrom", value, SpfResult.FAIL, explanation=value, mechanism=value)),
        IprevCheck(IprevResult.FAIL, value, value))
    assert_clean(header, may_fold=False)
    parsed = parse(header)
    assert parsed.authserv_id == AUTHSERV_ID
    # Exactly the results we made, nothing injected, identities intact.
    assert [(r.method, r.result) for r in parsed.results] == \
        [("spf", "none"), ("spf", "fail"), ("iprev", "fail")]
    helo, mailfrom, iprev = (properties(r) for r in parsed.results)
    assert set(helo) <= {"smtp.helo"} and set(mailfrom) <= {"smtp.mailfrom"}
    assert iprev == {"policy.iprev": "2001:db8:6::27"}
    assert "paypal.com" not in {v for r in parsed.results for v in properties(r).values()}


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_in_dkim_results(value):
    # The milter's header (end of message): it may fold.
    header = authentication_results(
        AUTHSERV_ID, ip("192.0.2.1"),
        (SpfCheck("mailfrom", "other.example", SpfResult.PASS),),
        dkim=(DkimCheck(DkimResult.FAIL, value, value, value, value),
              DkimCheck(DkimResult.PASS, "other.example", "sel", "abcdefgh")))
    assert_clean(header, may_fold=True)
    parsed = parse(str(header).replace("\n\t", " "))
    assert [(r.method, r.result) for r in parsed.results] == \
        [("spf", "pass"), ("dkim", "fail"), ("dkim", "pass")]
    assert properties(parsed.results[2]) == {"header.d": "other.example", "header.s": "sel",
                                             "header.b": "abcdefgh"}
    assert "paypal.com" not in {v for r in parsed.results for v in properties(r).values()}


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_in_received_spf(value):
    check = SpfCheck("mailfrom", value, SpfResult.SOFTFAIL, mechanism=value)
    header = received_spf(check, ip("2001:db8::1"), value, f"user@{value}", AUTHSERV_ID)
    assert_clean(header, may_fold=False)
    pairs = assert_received_spf_syntax(header)
    assert pairs["identity"] == "mailfrom"
    assert pairs["client-ip"] == "2001:db8::1"
    assert set(pairs) <= {"client-ip", "envelope-from", "helo", "receiver", "identity",
                          "mechanism"}


def test_worst_case_authentication_results_fits_one_line():
    # Everything a client controls at its longest: a 253-octet HELO name, a
    # sender domain that is not a domain, a PTR name from its own reverse
    # zone, an IPv6 address, a relaxed result's comment.
    longest_domain = ".".join(["a" * 63] * 3 + ["b" * 61])
    junk = "x;" * 1000
    header = authentication_results(
        AUTHSERV_ID, ip("fd00:1234:5678:9abc:def0:1234:5678:9abc"),
        (SpfCheck("helo", longest_domain, SpfResult.PERMERROR),
         SpfCheck("mailfrom", junk, SpfResult.PERMERROR)),
        IprevCheck(IprevResult.FAIL, junk, "PTR not confirmed by forward lookup"))
    assert_clean(header, may_fold=False)


def test_many_dkim_signatures_keep_lines_short():
    # A message may carry any number of signatures with long d= and s=; the
    # milter may fold (Header.value may hold "\n\t"), but no line may pass
    # RFC 5322's limit.
    longest_domain = ".".join(["a" * 63] * 3 + ["b" * 61])
    dkim = tuple(DkimCheck(DkimResult.FAIL, longest_domain, "s" * 63, "b" * 40,
                           "signature verification failed") for _ in range(4))
    header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), dkim=dkim)
    assert_clean(header, may_fold=True)
    assert len(parse(str(header).replace("\n\t", " ")).results) == 4


def test_safe_value():
    assert safe_value("a\r\nb(c)\"d\\e\udcff") == "a??b?c??d?e?"
    assert len(safe_value("x" * 1000)) == 255


# --- Received-SPF (RFC 7208 §9.1) ----------------------------------------

_RESULT = r"(?:Pass|Fail|SoftFail|Neutral|None|TempError|PermError)"
_CTEXT = r"[!-'*-\[\]-~ ]"                       # RFC 5322 ctext, WSP
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[ !#-\[\]-~]|\\[ -~])*"'         # RFC 5322 qtext, quoted-pair
_KEY = r"[A-Za-z][A-Za-z0-9_.-]*"
_PAIR = rf"({_KEY})=({_DOT_ATOM}|{_QUOTED})"
RECEIVED_SPF = re.compile(
    rf"^Received-SPF: ({_RESULT}) (?:\({_CTEXT}*\) )?((?:{_PAIR}(?:; )?)*)$")


def assert_received_spf_syntax(header) -> dict[str, str]:
    """Checks the field against RFC 7208 §9.1 and returns its key-value pairs."""
    match = RECEIVED_SPF.match(str(header))
    assert match, str(header)
    pairs = {}
    for key, value in re.findall(_PAIR, match.group(2)):
        assert key not in pairs
        pairs[key] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value
    return pairs


@pytest.mark.parametrize("result, word", [
    (SpfResult.PASS, "Pass"), (SpfResult.FAIL, "Fail"), (SpfResult.SOFTFAIL, "SoftFail"),
    (SpfResult.NEUTRAL, "Neutral"), (SpfResult.NONE, "None"),
    (SpfResult.TEMPERROR, "TempError"), (SpfResult.PERMERROR, "PermError")])
def test_received_spf_result_words(result, word):
    header = received_spf(SpfCheck("mailfrom", "other.example", result), ip("192.0.2.1"),
                          "helo.other.example", "a@other.example", AUTHSERV_ID)
    assert header.name == "Received-SPF"
    assert header.value.startswith(word + " (")
    assert_received_spf_syntax(header)


def test_received_spf_pairs():
    check = SpfCheck("mailfrom", "other.example", SpfResult.PASS,
                     mechanism="ip6:2001:db8:6::/64")
    header = received_spf(check, ip("2001:db8:6::25"), "mail6.other.example",
                          "strong-bad@other.example", AUTHSERV_ID)
    assert assert_received_spf_syntax(header) == {
        "client-ip": "2001:db8:6::25", "envelope-from": "strong-bad@other.example",
        "helo": "mail6.other.example", "receiver": AUTHSERV_ID, "identity": "mailfrom",
        "mechanism": "ip6:2001:db8:6::/64"}


def test_received_spf_null_sender_and_empty_helo():
    header = received_spf(SpfCheck("mailfrom", "helo.other.example", SpfResult.NONE),
                          ip("192.0.2.1"), "", "", AUTHSERV_ID)
    pairs = assert_received_spf_syntax(header)
    assert pairs["envelope-from"] == "<>" and pairs["helo"] == ""


def test_received_spf_nat_relaxation_comment():
    check = SpfCheck("mailfrom", "own.example", SpfResult.PASS, relaxed_via=ip("203.0.113.7"),
                     relaxed_mode="reevaluate")
    header = received_spf(check, ip("192.168.1.10"), "laptop.own.example",
                          "alice@own.example", AUTHSERV_ID)
    assert "203.0.113.7 is a permitted sender" in header.value
    assert assert_received_spf_syntax(header)["client-ip"] == "192.168.1.10"


# --- values nothing of which survives, and values that must be quoted -------

@pytest.mark.parametrize("b", ["@", "!!", '"', "-_-", "=", "", " \t"])
def test_b_without_base64_leaves_header_b_out(b):
    # Issue 15 item 2: an empty header.b made authres raise, and the milter
    # deferred the whole message.  RFC 8601 §2.2 has no empty token, and an
    # empty header.b (RFC 6008) tells no signatures apart: it is left out.
    header = authentication_results(
        AUTHSERV_ID, ip("192.0.2.1"), (SpfCheck("mailfrom", "other.example", SpfResult.PASS),),
        dkim=(DkimCheck(DkimResult.PERMERROR, "example.com", "sel", b=b),))
    assert_clean(header, may_fold=False)
    assert "header.b" not in header.value
    assert summary(parse(header)) == [
        ("spf", "pass", {"smtp.mailfrom": "other.example"}),
        ("dkim", "permerror", {"header.d": "example.com", "header.s": "sel"})]


def test_b_keeps_what_is_base64():
    header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), dkim=(
        DkimCheck(DkimResult.PERMERROR, "example.com", "sel", b="@ab=c/d+e fgh"),))
    assert summary(parse(header)) == [
        ("dkim", "permerror", {"header.d": "example.com", "header.s": "sel",
                               "header.b": "abc/d+ef"})]


@pytest.mark.parametrize("identity", ["mailfrom", "helo"])
def test_empty_spf_identity_is_named_with_an_empty_value(identity):
    # A malformed sender, or no HELO name: the result still says which
    # identity it is about (an spf result naming neither could be read as
    # a MAIL FROM verdict), with the quoted empty string RFC 8601 §2.2
    # allows where a value is required.
    header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), (
        SpfCheck(identity, "", SpfResult.NONE, malformed=True),))
    assert header.value.endswith(f' smtp.{identity}=""')
    assert summary(parse(header)) == [("spf", "none", {f"smtp.{identity}": ""})]


def test_quoted_value_comes_last_where_authres_reads_it():
    # authres's parser drops a quoted pvalue that another property follows;
    # a selector that is not a token goes after the token header.b.
    header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), dkim=(
        DkimCheck(DkimResult.NEUTRAL, "example.com", "sel 1", "abcdefgh"),))
    assert header.value.endswith('header.d=example.com header.b=abcdefgh header.s="sel 1"')
    assert summary(parse(header)) == [
        ("dkim", "neutral", {"header.d": "example.com", "header.s": "sel 1",
                             "header.b": "abcdefgh"})]


def test_empty_value_is_never_read_as_the_next_property():
    # authres reads `smtp.mailfrom="" policy.nat-relaxed=pass` as a
    # mailfrom of "policy.nat-relaxed=pass": the empty value goes last.
    header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), (
        SpfCheck("mailfrom", ".", SpfResult.PASS, relaxed_mode="pass"),))
    assert summary(parse(header)) == [
        ("spf", "pass", {"smtp.mailfrom": "", "policy.nat-relaxed": "pass"})]


@pytest.mark.parametrize("identity", ["mailfrom", "helo"])
@pytest.mark.parametrize("domain", ["", "own example"])
def test_a_policy_value_is_kept_before_a_quoted_identity(identity, domain):
    # Two values that must be quoted (an IPv6 address has ":", RFC 2045
    # §5.1 tspecials), and authres keeps one: before, the identity's, and
    # the result read as an spf=pass of SPF's own, unqualified.  The
    # identity is then said in the comment.
    check = SpfCheck(identity, domain, SpfResult.PASS, relaxed_via=ip("2001:db8:7::7"),
                     relaxed_mode="reevaluate")
    header = authentication_results(AUTHSERV_ID, ip("fd00::25"), (check,))
    assert summary(parse(header)) == [
        ("spf", "pass", {"policy.nat-relaxed": "2001:db8:7::7"})]
    assert f'without dnssec; smtp.{identity} "{domain}")' in header.value


@pytest.mark.parametrize("authserv_id", ["mx@receiver.example", "mx:25", "mx/1", "", "é"])
def test_authserv_id_that_is_no_token_is_quoted(authserv_id):
    # RFC 8601 §2.2: authserv-id = value, a token or a quoted-string.
    header = authentication_results(authserv_id, ip("192.0.2.1"),
                                    iprev=IprevCheck(IprevResult.PASS, "mx.other.example"))
    assert_clean(header, may_fold=False)
    assert header.value.startswith(f'"{safe_value(authserv_id)}"; iprev=pass ')


def test_folded_lines_keep_room_for_their_semicolon():
    # A line filled to the limit before a result that does not fit still
    # gets its ";": selectors of every length from 1 to 200 characters.
    longest_domain = ".".join(["a" * 63] * 3 + ["b" * 61])
    for length in range(1, 201):
        selector = ".".join(re.findall(".{1,63}", "x" * length)).rstrip(".")
        dkim = (DkimCheck(DkimResult.FAIL, longest_domain, longest_domain, "b" * 8),
                DkimCheck(DkimResult.FAIL, longest_domain, selector),
                DkimCheck(DkimResult.FAIL, longest_domain, longest_domain, "b" * 8))
        header = authentication_results(AUTHSERV_ID, ip("192.0.2.1"), dkim=dkim)
        assert_clean(header, may_fold=True)


def test_received_spf_leaves_out_a_mechanism_that_does_not_fit():
    # Each value at most 255 characters, a comment and a long mechanism:
    # RFC 5322's line limit wins over the optional parts (RFC 7208 §9.1).
    longest_domain = ".".join(["a" * 63] * 3 + ["b" * 61])
    check = SpfCheck("mailfrom", longest_domain, SpfResult.PERMERROR,
                     mechanism="include:" + longest_domain)
    header = received_spf(check, ip("fd00:1234:5678:9abc:def0:1234:5678:9abc"),
                          longest_domain, "postmaster@" + longest_domain, longest_domain)
    assert_clean(header, may_fold=False)
    assert set(assert_received_spf_syntax(header)) == {
        "client-ip", "envelope-from", "helo", "receiver", "identity"}
