"""policyd.headers over arbitrary values: every header we emit is clean,
parses back, and says exactly what we meant (issue 15 item 2).

Authentication-Results is read with authres, the parser mail systems use
to read us; Received-SPF with a strict parser of RFC 7208 §9.1 below."""
from __future__ import annotations

import re

import authres
from hypothesis import HealthCheck, given, settings, strategies as st

from policyd.headers import (MAX_VALUE, authentication_results, received_spf, safe_domain,
                             safe_value)
from policyd.model import (DkimCheck, DkimResult, IprevCheck, IprevResult, SpfCheck,
                           SpfResult)

# RFC 5322 §2.1.1: a line MUST be no more than 998 characters.
MAX_LINE = 998
# RFC 2045 §5.1 token; RFC 5322 §3.2.3 dot-atom-text.
TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_ATOM = re.compile(rf"{ATEXT}+(?:\.{ATEXT}+)*")
QUOTED = re.compile(r'"((?:[ !#-\[\]-~]|\\[ -~])*)"')

SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- values: any unicode, the characters of the grammars, empty, very long --

_PIECES = st.sampled_from([
    "", ";", "=", "@", '"', "\\", "(", ")", "\r\n", "\n", "\r", "\t", " ", ".", "..", ",",
    ":", "/", "+", "-", "_", "[", "]", "<", ">", "\x00", "\x7f", "\udcff", "\u00e9", "\u2028",
    "example.com", "paypal.com", "spf=pass", "dkim=pass header.d=paypal.com",
    "smtp.mailfrom=", "policy.iprev=", "; iprev=pass", '" x="', ") (", "\n\t",
])
_DOMAINS = st.from_regex(
    r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,8}"
    r"[A-Za-z0-9])?){0,3}\.?\Z")
VALUES = st.one_of(
    st.text(st.characters(), max_size=30),
    st.lists(st.one_of(_PIECES, st.text(st.characters(), max_size=5)), max_size=10)
    .map("".join),
    st.builds(lambda text, count: text * count,
              st.text(st.characters(), min_size=1, max_size=4), st.integers(60, 700)),
    _DOMAINS,
    st.just(".".join(["a" * 63] * 3 + ["b" * 61])),
)
# A b= as signers write it, base64 with folding white space, or anything.
B_VALUES = st.one_of(VALUES, st.from_regex(r"\A[A-Za-z0-9+/ \t]{0,40}=?=?\Z"))
ADDRESSES = st.ip_addresses()
AUTHSERV_IDS = st.one_of(_DOMAINS, VALUES)

SPF = st.builds(SpfCheck, identity=st.sampled_from(["mailfrom", "helo"]), domain=VALUES,
                result=st.sampled_from(SpfResult), explanation=VALUES, mechanism=VALUES,
                dnssec=st.booleans(), relaxed_via=st.none() | ADDRESSES,
                relaxed_mode=st.sampled_from(["", "reevaluate", "pass"]),
                malformed=st.booleans())
IPREV = st.builds(IprevCheck, result=st.sampled_from(IprevResult), ptr_name=VALUES,
                  reason=VALUES, dnssec=st.booleans())
DKIM = st.builds(DkimCheck, result=st.sampled_from(DkimResult), domain=VALUES,
                 selector=VALUES, b=B_VALUES, reason=VALUES, dnssec=st.booleans())


def assert_clean(text: str, *, may_fold: bool) -> None:
    """Printable ASCII; no CR; an LF only to fold ("\\n\\t"), and none at
    all where Postfix's PREPEND takes the field; lines within RFC 5322."""
    assert re.fullmatch(r"[ -~]+(?:\n\t[ -~]+)*", text), repr(text)
    if not may_fold:
        assert "\n" not in text, repr(text)
    assert all(len(line) <= MAX_LINE for line in text.split("\n"))


# --- Authentication-Results --------------------------------------------------

def is_token(value: str) -> bool:
    return len(value) <= MAX_VALUE and TOKEN.fullmatch(value) is not None


def surviving(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What we mean to say of one result: its token values in order, then
    one value that must be quoted, a policy one first (authres's parser
    reads a quoted pvalue only at the end of its result; see
    headers._resinfo)."""
    tokens = [pair for pair in pairs if is_token(pair[1])]
    quoted = [(name, safe_value(value)) for name, value in pairs if not is_token(value)]
    quoted.sort(key=lambda pair: not pair[0].startswith("policy."))
    return tokens + quoted[:1]


def meant(address, spf, iprev, dkim) -> list[tuple[str, str, list[tuple[str, str]]]]:
    results = []
    for check in spf:
        pairs = [("smtp.mailfrom" if check.identity == "mailfrom" else "smtp.helo",
                  safe_domain(check.domain))]
        if check.relaxed_mode == "reevaluate":
            pairs.append(("policy.nat-relaxed", str(check.relaxed_via)))
        elif check.relaxed_mode == "pass":
            pairs.append(("policy.nat-relaxed", "pass"))
        results.append(("spf", check.result.value, surviving(pairs)))
    if iprev is not None:
        results.append(("iprev", iprev.result.value,
                        surviving([("policy.iprev", str(address))])))
    for check in dkim:
        pairs = [(name, safe_domain(value)) for name, value in
                 (("header.d", check.domain), ("header.s", check.selector))
                 if safe_domain(value)]
        b = re.sub(r"[^A-Za-z0-9+/]", "", check.b)[:8]
        if b:   # absent, not empty, when nothing of b= is base64
            pairs.append(("header.b", b))
        results.append(("dkim", check.result.value, surviving(pairs)))
    return results


@SETTINGS
@given(authserv_id=AUTHSERV_IDS, address=ADDRESSES, spf=st.lists(SPF, max_size=2),
       iprev=st.none() | IPREV, dkim=st.lists(DKIM, max_size=5))
def test_authentication_results_parse_back_as_meant(authserv_id, address, spf, iprev, dkim):
    header = authentication_results(authserv_id, address, tuple(spf), iprev, tuple(dkim))
    if not (spf or iprev or dkim):
        assert header is None
        return
    assert header.name == "Authentication-Results"
    # Only the milter's field, which carries the DKIM results, may fold;
    # the envelope's always fits one line unless the operator's authserv-id
    # is very long (253-octet HELO and MAIL FROM domains, both relaxed by
    # the NAT rule for IPv6, and a 253-octet authserv-id fold).
    assert_clean(str(header), may_fold=bool(dkim) or len(authserv_id) > 100)
    value = header.value.replace("\n\t", " ")
    # RFC 8601 §2.2: authserv-id = token / quoted-string.
    if is_token(authserv_id):
        written = authserv_id
    else:
        written = f'"{safe_value(authserv_id)}"'
    assert value.startswith(written + "; ")
    if DOT_ATOM.fullmatch(written):
        parsed = authres.AuthenticationResultsHeader.parse_value(value)
        assert parsed.authserv_id == authserv_id.lower()
    else:
        # authres reads only a dot-atom authserv-id (RFC 8601 allows any
        # value); the results after it are read the same either way.
        parsed = authres.AuthenticationResultsHeader.parse_value(
            "authserv.invalid" + value[len(written):])
    assert [(r.method, r.result, [(f"{p.type}.{p.name}", p.value) for p in r.properties])
            for r in parsed.results] == meant(address, spf, iprev, dkim)


@SETTINGS
@given(text=VALUES)
def test_safe_domain_is_printable_and_keeps_domains(text):
    result = safe_domain(text)
    assert re.fullmatch(r'[ !#-\'*-?A-\[\]-~]*', result), repr(result)   # no " ( ) \ @
    assert len(result) <= MAX_VALUE
    if re.fullmatch(r"[A-Za-z0-9]+(?:[.-][A-Za-z0-9]+)*\.?", text) and len(text) < 250 \
            and all(len(label) <= 63 for label in text.rstrip(".").split(".")):
        assert result == text.rstrip(".").lower()


# --- Received-SPF: a strict reader of RFC 7208 §9.1 ---------------------------

class Unparsable(Exception):
    pass


class ReceivedSpfReader:
    """header-field = "Received-SPF:" [CFWS] result FWS [comment FWS]
                      [ key-value-list ] CRLF
    key-value-list  = key-value-pair *( ";" [CFWS] key-value-pair ) [";"]
    key-value-pair  = key [CFWS] "=" ( dot-atom / quoted-string )
    with RFC 5322's CFWS, comment, dot-atom and quoted-string; the field is
    unfolded, so FWS is white space."""

    RESULT = re.compile(r"(?i:pass|fail|softfail|neutral|none|temperror|permerror|policy)"
                        r"(?=[ \t])")
    KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def fail(self, what: str):
        raise Unparsable(f"{what} at {self.at}: {self.text!r}")

    def wsp(self) -> bool:
        start = self.at
        while self.at < len(self.text) and self.text[self.at] in " \t":
            self.at += 1
        return self.at > start

    def comment(self) -> str:
        if not self.text.startswith("(", self.at):
            self.fail("expected comment")
        self.at += 1
        content = []
        while True:
            if self.at >= len(self.text):
                self.fail("unterminated comment")
            char = self.text[self.at]
            if char == ")":
                self.at += 1
                return "".join(content)
            if char == "(":
                content.append("(" + self.comment() + ")")
            elif char == "\\":
                if self.at + 1 >= len(self.text) or not " " <= self.text[self.at + 1] <= "~":
                    self.fail("bad quoted-pair")
                content.append(self.text[self.at + 1])
                self.at += 2
            elif " " <= char <= "~" or char == "\t":   # ctext or WSP
                content.append(char)
                self.at += 1
            else:
                self.fail("bad comment character")

    def cfws(self) -> None:
        while self.wsp() or self.text.startswith("(", self.at):
            if self.text.startswith("(", self.at):
                self.comment()

    def match(self, pattern: re.Pattern) -> str | None:
        found = pattern.match(self.text, self.at)
        if found:
            self.at = found.end()
            return found.group()
        return None

    def value(self) -> str:
        self.cfws()
        quoted = self.match(QUOTED)
        if quoted is not None:
            self.cfws()
            return re.sub(r"\\(.)", r"\1", quoted[1:-1])
        atom = self.match(DOT_ATOM)
        if atom is None:
            self.fail("expected dot-atom or quoted-string")
        self.cfws()
        return atom

    def read(self) -> tuple[str, str | None, list[tuple[str, str]]]:
        if not self.text.startswith("Received-SPF:"):
            self.fail("not Received-SPF")
        self.at = len("Received-SPF:")
        self.cfws()
        result = self.match(self.RESULT)
        if result is None:
            self.fail("expected result")
        if not self.wsp():
            self.fail("expected FWS after result")
        comment = None
        if self.text.startswith("(", self.at):
            comment = self.comment()
            if not self.wsp() and self.at < len(self.text):
                self.fail("expected FWS after comment")
        pairs = []
        while self.at < len(self.text):
            key = self.match(self.KEY)
            if key is None:
                self.fail("expected key")
            self.cfws()
            if not self.text.startswith("=", self.at):
                self.fail("expected =")
            self.at += 1
            pairs.append((key, self.value()))
            if self.at == len(self.text):
                break
            if not self.text.startswith(";", self.at):
                self.fail("expected ;")
            self.at += 1
            self.cfws()
        return result, comment, pairs


def test_reader_is_strict():
    # The reader must be able to say no, or the property below says nothing.
    good = ('Received-SPF: Pass (a (nested) \\) comment) client-ip=192.0.2.1; '
            'envelope-from="a@b.example"; helo=x.example;')
    assert ReceivedSpfReader(good).read() == (
        "Pass", "a (nested) ) comment",
        [("client-ip", "192.0.2.1"), ("envelope-from", "a@b.example"), ("helo", "x.example")])
    for bad in ["Received-SPF: Pass helo=a b", "Received-SPF: Pass (x helo=a",
                'Received-SPF: Pass helo="a', "Received-SPF: Pass helo=a@b",
                "Received-SPF: Pass helo=a;; x=b", "Received-SPF: Passed helo=a",
                "Received-SPF: Pass helo=\u00e9", "Received-SPF: Pass helo=a\r\nX: y"]:
        try:
            ReceivedSpfReader(bad).read()
        except Unparsable:
            continue
        raise AssertionError(f"read {bad!r}")


WORDS = {SpfResult.PASS: "Pass", SpfResult.FAIL: "Fail", SpfResult.SOFTFAIL: "SoftFail",
         SpfResult.NEUTRAL: "Neutral", SpfResult.NONE: "None",
         SpfResult.TEMPERROR: "TempError", SpfResult.PERMERROR: "PermError"}


def kv(text: str) -> str:
    """What a key-value pair reads back as: the text when it is a dot-atom,
    else the quoted safe_value of it."""
    return text if len(text) <= MAX_VALUE and DOT_ATOM.fullmatch(text) else safe_value(text)


@SETTINGS
@given(check=SPF, address=ADDRESSES, helo=VALUES, sender=VALUES, receiver=AUTHSERV_IDS)
def test_received_spf_parses_back_as_meant(check, address, helo, sender, receiver):
    header = received_spf(check, address, helo, sender, receiver)
    assert header.name == "Received-SPF"
    assert_clean(str(header), may_fold=False)
    result, _comment, pairs = ReceivedSpfReader(str(header)).read()
    assert result == WORDS[check.result]
    expected = [("client-ip", str(address)), ("envelope-from", kv(sender or "<>")),
                ("helo", kv(helo)), ("receiver", kv(receiver)), ("identity", check.identity)]
    # The mechanism is left out only when the field would not fit with it.
    # As written, a value that is no dot-atom has its quotes too.
    dot_atom = len(check.mechanism) <= MAX_VALUE and DOT_ATOM.fullmatch(check.mechanism)
    written = len(kv(check.mechanism)) + (0 if dot_atom else 2)
    if check.mechanism and (len(pairs) == 6 or len(str(header)) + len("; mechanism=")
                            + written <= MAX_LINE):
        expected.append(("mechanism", kv(check.mechanism)))
    assert pairs == expected
