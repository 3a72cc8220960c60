"""The decision log line: one line per decision, whatever a client sends."""
from __future__ import annotations

import ipaddress

import pytest

from policyd.model import Action, Decision, Request
from policyd.service import decision_line, log_value


@pytest.mark.parametrize("value, logged", [
    ("alice@example.com", "alice@example.com"),
    ("", '""'),
    ("two words", "two\\x20words"),
    ("a\r\nqueue=FORGED", "a\\x0d\\x0aqueue=FORGED"),
    ("tab\there", "tab\\x09here"),
    ("caf\u00e9", "caf\\xe9"),
    ("\u2603snow", "?snow"),
    ("del\x7f", "del\\x7f"),
])
def test_log_value_is_one_printable_word(value, logged):
    assert log_value(value) == logged


def test_log_value_is_bounded():
    assert log_value("x" * 1000) == "x" * 300


def test_decision_line_puts_the_queue_id_first():
    request = Request(client_address=ipaddress.ip_address("192.0.2.1"), helo="mx.example",
                      sender="a@example.com", queue_id="4XyZ1")
    line = decision_line(request, Decision(Action.REJECT, rule="spf.mailfrom.fail"))
    assert line.startswith("4XyZ1: action=REJECT rule=spf.mailfrom.fail client=192.0.2.1 ")
    assert "\n" not in line
