"""policyd.milter.runner and .service: listen specs, the socket we hand to libmilter,
the session count a graceful stop waits on, and how the supervisor
treats workers that die (the processes themselves are run end to end in
tests/integration/test_milter.py)."""
from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import threading

import pytest

from policyd import config as config_module
from policyd.engine import Engine
from policyd.milter import runner, service
from policyd.milter.runner import (ListenError, Sessions, open_listener, open_listeners,
                                   parse_listen)
from policyd.runtime import supervisor as supervision
from policyd.runtime.supervisor import (SERVE_PARENT_ENV, RestartBudget, describe_exit,
                                        serve_parent)
from tests.unit.fakedns import FakeResolver


@pytest.mark.parametrize("spec, parsed", [
    ("inet:10025@127.0.0.1", ("inet", "127.0.0.1", 10025)),
    ("inet:10025", ("inet", "", 10025)),
    ("inet6:10025@::1", ("inet6", "::1", 10025)),
    ("inet6:10025@[::1]", ("inet6", "::1", 10025)),
    ("unix:/run/policyd/milter.sock", ("unix", "/run/policyd/milter.sock", None)),
    ("local:/run/policyd/milter.sock", ("unix", "/run/policyd/milter.sock", None)),
])
def test_libmilter_socket_specs(spec, parsed):
    assert parse_listen(spec) == parsed


@pytest.mark.parametrize("spec", ["inet:127.0.0.1:10025", "inet:0@127.0.0.1", "inet:x@h",
                                  "inet:70000@h", "unix:", "tcp:1@h", ""])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ListenError, match="inet:PORT@HOST"):
        parse_listen(spec)


def test_unix_socket_is_created_0660_without_a_window(tmp_path):
    path = tmp_path / "milter.sock"
    listener = open_listener(f"unix:{path}")
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == runner.UNIX_SOCKET_MODE
    finally:
        listener.socket.close()
        os.unlink(path)


def test_unix_socket_takes_the_configured_mode_and_group(tmp_path):
    # Postfix connects as the postfix user: through the socket's group.
    group = grp.getgrnam("mail")
    path = tmp_path / "milter.sock"
    config = config_module.parse(f"milter:\n  listen: unix:{path}\n  socket_mode: 0620\n"
                                 f"  socket_group: {group.gr_name}\n", "x.yaml")
    [listener] = open_listeners(config.milter.listen, 1, mode=int(config.milter.socket_mode, 8),
                                group=config.milter.socket_group)
    try:
        info = os.lstat(path)
        assert stat.S_IMODE(info.st_mode) == 0o620
        assert info.st_gid == group.gr_gid
    finally:
        listener.socket.close()
        os.unlink(path)


def test_an_unknown_socket_group_is_a_listen_error_and_leaves_no_socket(tmp_path):
    path = tmp_path / "milter.sock"
    with pytest.raises(ListenError, match="milter.socket_group: no group 'no-such-group'"):
        open_listener(f"unix:{path}", group="no-such-group")
    assert not path.exists()


def test_stale_unix_socket_is_replaced_a_live_one_or_a_file_is_not(tmp_path):
    path = tmp_path / "milter.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                     # bound, nobody listening: stale
    listener = open_listener(f"unix:{path}")
    try:
        with pytest.raises(ListenError, match="another milter is listening"):
            open_listener(f"unix:{path}")
    finally:
        listener.socket.close()
    os.unlink(path)
    path.write_text("not a socket")
    with pytest.raises(ListenError, match="not a socket"):
        open_listener(f"unix:{path}")
    assert path.read_text() == "not a socket"


def test_tcp_listener_has_nodelay_for_its_connections():
    listener = open_listener("inet:0@127.0.0.1".replace(":0@", f":{_free_port()}@"))
    try:
        sock = listener.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        host, port = listener.wake_address
        with socket.create_connection((host, port)):
            accepted, _ = sock.accept()
            with accepted:
                # Linux copies the listener's options to accepted sockets.
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.socket.close()


def test_wildcard_listener_is_woken_through_loopback():
    listener = open_listener(f"inet6:{_free_port()}")
    try:
        assert listener.wake_address[0] == "::1"
    finally:
        listener.socket.close()


def test_tcp_worker_slots_get_a_socket_each_on_one_port():
    spec = f"inet:{_free_port()}@127.0.0.1"
    listeners = open_listeners(spec, 3)
    try:
        sockets = [listener.socket for listener in listeners]
        assert len(set(map(id, sockets))) == 3
        assert len({sock.getsockname() for sock in sockets}) == 1
        for sock in sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for listener in listeners:
            listener.socket.close()


def test_a_port_in_use_is_refused_though_our_sockets_share_theirs():
    # Without the first bind (no SO_REUSEPORT) a second milter of the same
    # user would join the first one's group and take half its connections.
    spec = f"inet:{_free_port()}@127.0.0.1"
    listeners = open_listeners(spec, 2)
    try:
        with pytest.raises(ListenError, match=rf"^{spec}: Address already in use"):
            open_listeners(spec, 2)
    finally:
        for listener in listeners:
            listener.socket.close()
    for listener in open_listeners(spec, 2):    # free again
        listener.socket.close()


def test_unix_worker_slots_share_one_socket(tmp_path):
    listeners = open_listeners(f"unix:{tmp_path / 'milter.sock'}", 3)
    try:
        assert len({id(listener.socket) for listener in listeners}) == 1
    finally:
        listeners[0].socket.close()


@pytest.mark.parametrize("value, parent", [("4242", 4242), ("", None), ("x", None)])
def test_the_serve_parent_is_named_by_the_environment(monkeypatch, value, parent):
    monkeypatch.setenv(SERVE_PARENT_ENV, value)
    assert serve_parent() == parent
    assert SERVE_PARENT_ENV not in os.environ   # not handed on to anything we start


def test_listen_error_names_the_spec():
    with pytest.raises(ListenError, match=r"^inet:1@192\.0\.2\.1: "):
        open_listener("inet:1@192.0.2.1")   # not an address of this host


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
    assert isinstance(refused, runner.RefusedSession)
    # Anything but CONTINUE or ALL_OPTS makes libmilter drop the connection
    # (engine.c st_optionneg), and the MTA apply its default action.
    assert refused.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0]) == Milter.REJECT
    assert sessions.open == 0


def test_socket_file_is_removed_only_while_it_is_ours(tmp_path):
    path = tmp_path / "milter.sock"
    old = open_listener(f"unix:{path}")
    os.unlink(path)                         # removed by hand while we run
    newer = open_listener(f"unix:{path}")   # another milter's, in its place
    try:
        old.remove_socket_file()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        newer.remove_socket_file()
        assert not path.exists()
    finally:
        old.socket.close()
        newer.socket.close()


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
    listener = runner.Listener("unix:/run/policyd/milter.sock", socket=None)
    supervisor = service.supervisor(None, config, [listener], metrics_directory=None)
    started = []
    supervisor._reap = lambda: gone.pop(0) if gone else []
    supervisor._start_worker = lambda number: started.append(number) or True
    return supervisor, started


def test_dead_workers_are_replaced_until_the_budget_is_spent():
    killed = _wait_status("kill -KILL $$")
    gone = [[(100 + i, 1, killed)] for i in range(supervision.RESTART_LIMIT + 1)]
    supervisor, started = _supervisor(gone)
    for _ in range(supervision.RESTART_LIMIT):
        assert supervisor._replace_dead_workers() is None
    assert started == [1] * supervision.RESTART_LIMIT
    assert supervisor._replace_dead_workers() == runner.EX_SOFTWARE
    assert started == [1] * supervision.RESTART_LIMIT   # no more


def test_a_worker_that_cannot_run_libmilter_stops_the_milter_at_once():
    supervisor, started = _supervisor(
        [[(100, 2, _wait_status(f"exit {runner.EX_UNAVAILABLE}"))]])
    assert supervisor._replace_dead_workers() == runner.EX_UNAVAILABLE
    assert started == []


def test_a_worker_that_exits_cleanly_unasked_is_replaced_too():
    supervisor, started = _supervisor([[(100, 2, _wait_status("exit 0"))]])
    assert supervisor._replace_dead_workers() is None
    assert started == [2]


def test_signals_blocked_across_fork_are_the_ones_the_parent_handles():
    # A worker must not die of SIGUSR1's default action before its reload
    # handler is in place: the signals come blocked out of fork().
    assert signal.SIGUSR1 in runner.SUPERVISOR_SIGNALS
    assert set(runner.STOP_SIGNALS) <= set(runner.SUPERVISOR_SIGNALS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_worker_unblocks_every_signal_its_supervisor_blocked_across_fork():
    config = config_module.parse("authserv_id: mx.test.example\n", "<test>")
    listener = runner.Listener("unix:/run/policyd/milter.sock", socket=None)
    supervisor = service.supervisor(None, config, [listener], metrics_directory=None)
    assert {*supervisor.handled, supervisor.frontend.stop_signal} == \
        set(runner.FORK_BLOCKED_SIGNALS)
