"""policyd.runtime.supervisor's readiness: READY=1 waits for the
companion (the milter of `serve --milter`), whose messages come to a
socket of the supervisor's and count only from its own pid."""
from __future__ import annotations

import socket
import sys
import time

import pytest

from policyd import notify
from policyd.runtime.supervisor import Companion, Readiness


@pytest.fixture
def told(monkeypatch):
    """What would reach systemd."""
    sent: list[str] = []
    monkeypatch.setattr(notify, "notify", lambda state: sent.append(state) or True)
    return sent


class FakeCompanion:
    ready = False

    def read_notices(self) -> bool:
        return self.ready


def test_ready_waits_for_the_companion(told):
    companion = FakeCompanion()
    readiness = Readiness(companion)
    readiness.listening()
    assert told == []
    companion.ready = True
    readiness.companion_notices()
    readiness.companion_notices()
    assert told == ["READY=1"]


def test_reload_is_framed_and_stopping_said(told):
    readiness = Readiness()
    readiness.reloading()
    readiness.reloaded()
    assert told == []                 # not ready yet: nothing to frame
    readiness.listening()
    readiness.reloading()
    readiness.reloaded()
    readiness.stopping()
    assert [state.split("\n")[0] for state in told] == \
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def _wait_ready(companion: Companion) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if companion.read_notices():
            return True
        time.sleep(0.02)
    return False


def test_companion_ready_comes_from_the_companion_only():
    # The child says READY=1 through policyd.notify, as the milter does.
    companion = Companion([sys.executable, "-c",
                           "import time; time.sleep(0.3); "
                           "from policyd import notify; notify.ready()"],
                          stop_timeout=lambda config: 5)
    companion.start()
    try:
        name = "\0" + companion._notices.getsockname()[1:].decode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(b"READY=1", name)
        time.sleep(0.1)
        assert not companion.read_notices()   # from our pid, not the companion's
        assert _wait_ready(companion)
    finally:
        assert companion.stop(5) == 0
