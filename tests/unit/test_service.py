"""The decision log line: one line per decision, whatever a client sends."""
from __future__ import annotations

import ipaddress
import re

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


def _limits_after_raise(soft: int) -> tuple[list[int], str]:
    """In a child started with the soft descriptor limit at `soft`: the
    limits after raise_descriptor_limit(), and what it logged."""
    import resource
    import subprocess
    import sys
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = ("import resource, sys\n"
            "from policyd.service import raise_descriptor_limit, setup_logging\n"
            "setup_logging('info')\n"
            "raise_descriptor_limit()\n"
            "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    assert child.returncode == 0, child.stderr
    return [int(word) for word in child.stdout.split()], child.stderr


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard descriptor limit above 256")
    limits, logged = _limits_after_raise(256)
    assert limits == [hard, hard]
    assert re.fullmatch(rf"policyd\[\d+\]: INFO: descriptors: up to {hard} open at once "
                        rf"\(soft limit raised from 256\)\n", logged)
    limits, logged = _limits_after_raise(hard)
    assert limits == [hard, hard]
    assert f"INFO: descriptors: up to {hard} open at once\n" in logged
