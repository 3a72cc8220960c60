"""policyd.milter.protocol.respond: the one mapping from a Decision to the
milter protocol, over every Action, at RCPT and at end of message."""
from __future__ import annotations

import Milter
import pytest

from policyd.milter.protocol import ENGINE_FAILURE, FALLBACK_REPLY, MilterResponse, respond
from policyd.model import Action, Decision, Header, Reply

AR = "Authentication-Results"

# Every Action with what it must become; a new Action fails here until the
# milter front-end knows what to answer for it.
EXPECTED_STATUS = {
    (Action.ACCEPT, False): Milter.CONTINUE,
    (Action.ACCEPT, True): Milter.ACCEPT,
    (Action.DEFER, False): Milter.TEMPFAIL,
    (Action.DEFER, True): Milter.TEMPFAIL,
    (Action.REJECT, False): Milter.REJECT,
    (Action.REJECT, True): Milter.REJECT,
}

REPLIES = {Action.REJECT: Reply("550", "5.7.23", "SPF fail: example.org does not "
                                                 "designate this host"),
           Action.DEFER: Reply("451", "4.7.24", "SPF temporary error, try again later"),
           Action.ACCEPT: None}

HEADERS = (Header(AR, "mx.test.example; spf=pass smtp.mailfrom=example.org"),
           Header("Received-SPF", "Pass (mx.test.example: ok) client-ip=192.0.2.1"))


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("end_of_message", [False, True])
def test_every_action_has_an_answer(action, end_of_message):
    decision = Decision(action, REPLIES[action], headers=HEADERS)
    response = respond(decision, end_of_message, forged_results=(2,))
    assert response.status == EXPECTED_STATUS[(action, end_of_message)]
    if action is Action.ACCEPT:
        assert response.reply is None
        if end_of_message:
            assert response.deletions == ((AR, 2),)
            assert response.insertions == HEADERS
        else:
            # Header edits exist only at end of message (milter API).
            assert response == MilterResponse(Milter.CONTINUE)
    else:
        reply = REPLIES[action]
        assert response.reply == (reply.code, reply.status, reply.text)
        assert response.deletions == response.insertions == ()


def test_forged_results_are_deleted_from_the_last_one_up():
    response = respond(Decision(Action.ACCEPT), True, forged_results=(1, 4, 2, 4))
    assert response.deletions == ((AR, 4), (AR, 2), (AR, 1))


def test_no_headers_no_edits():
    assert respond(Decision(Action.ACCEPT), True) == MilterResponse(Milter.ACCEPT)


def test_percent_is_doubled_for_libmilter():
    # Sendmail reads the reply as a format, Postfix undoubles "%%" (milter8.c).
    decision = Decision(Action.REJECT, Reply("550", "5.7.23", "SPF fail: a%b.example 100%"))
    assert respond(decision, False).reply == ("550", "5.7.23", "SPF fail: a%%b.example 100%%")


def test_reply_text_is_one_printable_ascii_line():
    decision = Decision(Action.DEFER, Reply("451", "4.7.1", "bad\r\nRCPT TO:<x>\x00 caf\u00e9 \udcff"))
    code, status, text = respond(decision, False).reply
    assert text == "bad??RCPT TO:<x>? caf? ?"


def test_reply_code_of_the_wrong_class_uses_the_fallback():
    # A 4xx code with REJECT (or a 5xx with DEFER, or no code) would make
    # the MTA do something else than the Decision says.
    for action, reply in ((Action.REJECT, Reply("451", "4.7.1", "x")),
                          (Action.DEFER, Reply("550", "5.7.1", "x")),
                          (Action.REJECT, Reply("5x0", "5.7.1", "x"))):
        fallback = FALLBACK_REPLY[action]
        assert respond(Decision(action, reply), False).reply == \
            (fallback.code, fallback.status, fallback.text)
    assert respond(Decision(Action.REJECT), False).reply[0] == "550"


def test_enhanced_status_of_another_class_is_dropped():
    # RFC 3463 §2: the class digit matches the reply code's.
    decision = Decision(Action.REJECT, Reply("550", "4.7.1", "no"))
    assert respond(decision, False).reply == ("550", "", "no")
    decision = Decision(Action.REJECT, Reply("550", "5.7", "no"))
    assert respond(decision, False).reply == ("550", "", "no")


def test_engine_failure_defers():
    assert respond(ENGINE_FAILURE, False).reply == ("451", "4.3.0",
                                                     "Temporary local problem, try again later")
    assert respond(ENGINE_FAILURE, False).status == Milter.TEMPFAIL


def test_header_values_cannot_start_a_new_field():
    decision = Decision(Action.ACCEPT, headers=(
        Header(AR, "mx; spf=pass\r\nX-Injected: yes\rmore\x00"),))
    (header,) = respond(decision, True).insertions
    # Every line break is folding (followed by white space); no NUL.
    assert header.value == "mx; spf=pass\n X-Injected: yes\n more?"


def test_folding_from_headers_py_is_kept():
    # headers.py folds an Authentication-Results longer than 998 octets
    # between results (RFC 8601 §2.2 CFWS); the milter passes it on as is.
    folded = "mx.test.example; spf=pass smtp.mailfrom=a.example;\n\tdkim=pass header.d=a.example"
    decision = Decision(Action.ACCEPT, headers=(Header(AR, folded),))
    assert respond(decision, True).insertions == (Header(AR, folded),)


def test_short_header_values_are_not_folded():
    decision = Decision(Action.ACCEPT, headers=HEADERS)
    assert respond(decision, True).insertions == HEADERS
