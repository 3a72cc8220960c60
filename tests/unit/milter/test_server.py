"""policyd.milter.server and .service: the session count a graceful stop
waits on, and how the supervisor treats workers that die (the processes themselves are run end to end in
tests/integration/test_milter.py)."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from policyd import config as config_module
from policyd.engine import Engine
from policyd.milter import server, service
from policyd.milter.server import Sessions
from policyd.runtime import supervisor as supervision
from policyd.runtime.sockets import Listener
from policyd.runtime.supervisor import (SERVE_PARENT_ENV, RestartBudget, describe_exit,
                                        serve_parent)
from tests.unit.fakedns import FakeResolver


@pytest.mark.parametrize("value, parent", [("4242", 4242), ("", None), ("x", None)])
def test_the_serve_parent_is_named_by_the_environment(monkeypatch, value, parent):
    monkeypatch.setenv(SERVE_PARENT_ENV, value)
    assert serve_parent() == parent
    assert SERVE_PARENT_ENV not in os.environ   # not handed on to anything we start


def test_sessions_get_the_engine_current_when_they_open():
    config = config_module.parse("authserv_id: mx.test.example\n", "<test>")
    first, second = Engine(config, FakeResolver({})), Engine(config, FakeResolver({}))
    sessions = Sessions(first)
    old = sessions.new_session()
    sessions.engine = second          # a reload
    new = sessions.new_session()
    assert (old.engine, new.engine) == (first, second)
    assert sessions.open == 2
    old.close()
    assert sessions.open == 1
    assert sessions.wait_until_idle(0.01) == 1
    threading.Timer(0.05, new.close).start()
    assert sessions.wait_until_idle(5.0) == 0


def test_sessions_after_a_stop_are_refused_at_negotiation():
    import Milter
    config = config_module.parse("authserv_id: mx.test.example\n", "<test>")
    sessions = Sessions(Engine(config, FakeResolver({})))
    sessions.refuse_new()
    refused = sessions.new_session()
    assert isinstance(refused, server.RefusedSession)
    # Anything but CONTINUE or ALL_OPTS makes libmilter drop the connection
    # (engine.c st_optionneg), and the MTA apply its default action.
    assert refused.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0]) == Milter.REJECT
    assert sessions.open == 0


# --- workers that die ------------------------------------------------------------

def test_restart_budget_counts_restarts_within_the_window():
    budget = RestartBudget(limit=3, window=60.0)
    assert [budget.allow(t) for t in (0.0, 10.0, 20.0)] == [True, True, True]
    assert not budget.allow(30.0)           # a fourth within 60 s
    assert not budget.allow(59.9)
    assert budget.allow(60.0)               # the one at 0 s has left the window
    assert not budget.allow(61.0)


def _wait_status(script: str) -> int:
    """The wait status of a real child running `sh -c script`."""
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", script], os.environ)
    return os.waitpid(pid, 0)[1]


def test_exits_are_described_by_status_or_signal():
    assert describe_exit(_wait_status("exit 3")) == "exited with status 3"
    assert describe_exit(_wait_status("exit 0")) == "exited with status 0"
    assert describe_exit(_wait_status("kill -KILL $$")) == "was killed by SIGKILL"


def _supervisor(gone):
    """A supervisor whose workers die as `gone` says: a list of
    (pid, worker number, wait status) per reap.  New workers are recorded,
    not forked."""
    config = config_module.parse("authserv_id: mx.test.example\n", "<test>")
    listener = Listener("unix:/run/policyd/milter.sock", sockets=[])
    supervisor = service.supervisor(None, config, [listener], metrics_directory=None)
    started = []
    frontend = supervisor.frontend
    supervisor._reap = lambda: [(pid, supervision.Slot(frontend, number), status)
                                for pid, number, status in (gone.pop(0) if gone else [])]
    supervisor._start_worker = lambda slot: started.append(slot.number) or True
    return supervisor, started


def test_dead_workers_are_replaced_until_the_budget_is_spent():
    killed = _wait_status("kill -KILL $$")
    gone = [[(100 + i, 1, killed)] for i in range(supervision.RESTART_LIMIT + 1)]
    supervisor, started = _supervisor(gone)
    for _ in range(supervision.RESTART_LIMIT):
        assert supervisor._replace_dead_workers() is None
    assert started == [1] * supervision.RESTART_LIMIT
    assert supervisor._replace_dead_workers() == server.EX_SOFTWARE
    assert started == [1] * supervision.RESTART_LIMIT   # no more


def test_a_worker_that_cannot_run_libmilter_stops_the_milter_at_once():
    supervisor, started = _supervisor(
        [[(100, 2, _wait_status(f"exit {server.EX_UNAVAILABLE}"))]])
    assert supervisor._replace_dead_workers() == server.EX_UNAVAILABLE
    assert started == []


def test_a_worker_that_exits_cleanly_unasked_is_replaced_too():
    supervisor, started = _supervisor([[(100, 2, _wait_status("exit 0"))]])
    assert supervisor._replace_dead_workers() is None
    assert started == [2]


def test_signals_blocked_across_fork_are_the_ones_the_parent_handles():
    # A worker must not die of SIGUSR1's default action before its reload
    # handler is in place: the signals come blocked out of fork().
    assert signal.SIGUSR1 in server.SUPERVISOR_SIGNALS
    assert set(server.STOP_SIGNALS) <= set(server.SUPERVISOR_SIGNALS)


def test_a_worker_unblocks_every_signal_its_supervisor_blocked_across_fork():
    config = config_module.parse("authserv_id: mx.test.example\n", "<test>")
    listener = Listener("unix:/run/policyd/milter.sock", sockets=[])
    supervisor = service.supervisor(None, config, [listener], metrics_directory=None)
    assert {*supervisor.handled, supervisor.frontend.stop_signal} == \
        set(server.FORK_BLOCKED_SIGNALS)
