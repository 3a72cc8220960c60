"""The refusal classifier: each default pattern against the real text it
cites, X.7.25, and what must pass unchanged."""
import pytest

from policyd.routing.refusals import Classifier, is_host_name
from policyd.routing.settings import DEFAULT_REFUSAL_PATTERNS

CLASSIFIER = Classifier(DEFAULT_REFUSAL_PATTERNS)
V6 = "2001:db8::25"


def key(status, reply, host="mx.example.net", address=V6, command="RCPT TO"):
    return f"{status} host {host}[{address}] said: {reply} (in reply to {command} command)"


# The real texts of issue 13, as Postfix hands them to the status filter
# (a multi-line reply's lines joined by spaces, each with its prefix).
GMAIL_GUIDELINES = (
    "550-5.7.1 [2001:db8::25] Our system has detected that this message does "
    "550-5.7.1 not meet IPv6 sending guidelines regarding PTR records and "
    "550-5.7.1 authentication. Please review 550-5.7.1 "
    "https://support.google.com/mail/?p=IPv6AuthError for more information. "
    "d2e1a72fcca58-12345 - gsmtp")
GMAIL_PTR = (
    "550-5.7.25 [2001:db8::25] The IP address sending this message does not have a "
    "550-5.7.25 PTR record setup, or the corresponding forward DNS entry does not "
    "550-5.7.25 point to the sending IP. As a policy, Gmail does not accept messages "
    "550 5.7.25 from IPs with missing PTR records. - gsmtp")
MICROSOFT = ("450 4.7.25 Service unavailable, sending IPv6 address [2001:db8::25] must "
             "have reverse DNS record. (BN8NAM11FT012.eop-nam11.prod.protection.outlook.com)")
MICROSOFT_OLD = ("550 5.7.25 Service unavailable, sending IPv6 address [2001:db8::25] "
                 "must have reverse DNS record.")
POSTFIX = ("554 5.7.1 <user@example.net>: Client host rejected: cannot find your "
           "reverse hostname, [2001:db8::25]")
POSTFIX_FCRDNS = ("450 4.7.25 <user@example.net>: Client host rejected: cannot find "
                  "your hostname, [2001:db8::25]")
OTHERS = "550 inconsistent or no DNS PTR record for 2001:db8::25"


@pytest.mark.parametrize("status, reply, matched", [
    ("5.7.1", GMAIL_GUIDELINES, DEFAULT_REFUSAL_PATTERNS[0]),
    ("5.7.25", GMAIL_PTR, "X.7.25"),
    ("4.7.25", MICROSOFT, "X.7.25"),
    ("5.7.25", MICROSOFT_OLD, "X.7.25"),
    ("5.7.1", POSTFIX, DEFAULT_REFUSAL_PATTERNS[3]),
    ("4.7.25", POSTFIX_FCRDNS, "X.7.25"),
    ("5.0.0", OTHERS, DEFAULT_REFUSAL_PATTERNS[4]),
])
def test_real_refusals_over_ipv6(status, reply, matched):
    refusal = CLASSIFIER.classify(key(status, reply))
    assert refusal is not None
    assert (refusal.host, refusal.address, refusal.status, refusal.matched) == \
        ("mx.example.net", V6, status, matched)
    assert refusal.reply == reply
    deferred = refusal.deferred()
    assert deferred.startswith(f"4{status[1:]} host mx.example.net[{V6}] said: {reply} ")


@pytest.mark.parametrize("pattern, reply", [
    (DEFAULT_REFUSAL_PATTERNS[1], GMAIL_PTR.replace("5.7.25", "5.7.1")),
    (DEFAULT_REFUSAL_PATTERNS[2], MICROSOFT.replace("4.7.25", "4.7.1")),
    (DEFAULT_REFUSAL_PATTERNS[3], POSTFIX_FCRDNS.replace("4.7.25", "4.7.1")),
])
def test_each_pattern_alone(pattern, reply):
    # Without X.7.25 the texts are still recognised by their pattern.
    assert CLASSIFIER.classify(key("5.7.1", reply)).matched == pattern


@pytest.mark.parametrize("status, reply", [
    ("5.7.1", GMAIL_GUIDELINES), ("4.7.25", MICROSOFT), ("5.0.0", OTHERS)])
def test_refusals_over_ipv4_are_not_learned(status, reply):
    assert CLASSIFIER.classify(key(status, reply, address="192.0.2.25")) is None
    # An IPv4-mapped IPv6 address is an IPv4 delivery.
    assert CLASSIFIER.classify(key(status, reply, address="::ffff:192.0.2.25")) is None


@pytest.mark.parametrize("text", [
    "2.0.0 host mx.example.net[2001:db8::25] said: 250 2.0.0 OK " + GMAIL_GUIDELINES,
    key("5.1.1", "550 5.1.1 <nobody@example.net>: Recipient address rejected: "
                 "User unknown in virtual mailbox table"),
    key("4.4.1", "421 4.4.1 try later"),
    "4.4.1 connect to mx.example.net[2001:db8::25]:25: Connection refused",
    "5.4.4 Host or domain name not found. Name service error for name=x type=MX",
    "",
    "garbage",
    "5.7.1 host mx.example.net[not-an-address] said: " + POSTFIX,
])
def test_everything_else_passes(text):
    assert CLASSIFIER.classify(text) is None


def test_x725_only_as_a_reply_status():
    # "4.7.25" in free text is no reply status.
    assert CLASSIFIER.classify(key("5.7.1", "550 5.7.1 see 4.7.25 elsewhere")) is None


def test_patterns_are_configurable():
    own = Classifier((r"no reverse for you",))
    assert own.classify(key("5.7.1", "550 5.7.1 No Reverse for you")) is not None
    assert own.classify(key("5.7.1", GMAIL_GUIDELINES)) is None


def test_host_names():
    assert is_host_name("mx.example.net")
    assert not is_host_name("2001:db8::1") and not is_host_name("[2001:db8::1]")
    assert not is_host_name("192.0.2.1") and not is_host_name("")
