"""policyd.runtime.supervisor: readiness (READY=1 waits for the companion,
the milter of `serve --milter`, whose messages come to a socket of the
supervisor's and count only from its own pid), and the workers of several
front-ends under one supervisor."""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time

import pytest

from policyd import config as config_module
from policyd import notify
from policyd.policy import service as policy_service
from policyd.runtime.exits import EX_UNAVAILABLE
from policyd.runtime.sockets import ListenError
from policyd.runtime.supervisor import Companion, Readiness, Supervisor, Wording


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


# --- several front-ends under one supervisor ------------------------------------

class _Reporting:
    """A front-end whose workers report which front-end and slot they are,
    and whether they hold their own and the other front-ends' sockets,
    then wait for their stop signal."""
    stop_signal = signal.SIGTERM
    drain_failure = 1

    def __init__(self, name: str, count: int, report_fd: int, everyone: list,
                 busy: socket.socket | None = None):
        self.name, self.count, self.report_fd, self.everyone = name, count, report_fd, everyone
        self.busy = busy     # a socket whose port bind() tries, and fails on
        self.listening = socket.socket()
        self.listening.close()   # until bind()
        self.wording = Wording(
            passing_on="passing on", replaced="{worker} {how}; replaced", retired=None,
            budget_spent="spent", budget_level=logging.ERROR, unavailable="unavailable",
            stopping=f"{name}: stopping {{count}}", failed_at_stop=None, killing="killing")
        everyone.append(self)

    def bind(self, config) -> None:
        port = self.busy.getsockname()[1] if self.busy is not None else 0
        try:
            self.listening = socket.create_server(("127.0.0.1", port))
        except OSError as error:
            raise ListenError(f"inet:127.0.0.1:{port}: {error.strerror}") from None

    def slots(self):
        return range(self.count)

    def worker_name(self, pid: int, slot: int) -> str:
        return f"{self.name} worker {slot}"

    def sockets(self):
        return [self.listening]

    def close_sockets(self) -> None:
        self.listening.close()

    def before_fork(self, config) -> None:
        pass

    def started(self, config) -> None:
        pass

    def run_worker(self, slot: int, config, parent: int, reload_fd: int) -> int:
        held = "".join("+" if frontend.listening.fileno() >= 0 else "-"
                       for frontend in self.everyone)
        os.write(self.report_fd, f"{self.name} {slot} {os.getpid()} {held}\n".encode())
        # Blocked across the fork (fork_with_blocked): waits here.
        signal.sigwait({self.stop_signal})
        return 0

    def check_reload(self, current, new) -> None:
        pass

    def drain_timeout(self, config) -> float:
        return 10.0

    def finish(self) -> None:
        pass


def _reports(fd: int, count: int) -> list[tuple[str, int, int, str]]:
    lines: list[bytes] = []
    buffer = b""
    deadline = time.monotonic() + 20
    while len(lines) < count and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            buffer += os.read(fd, 4096)
            *done, buffer = buffer.split(b"\n")
            lines.extend(done)
    return [(name, int(slot), int(pid), held)
            for name, slot, pid, held in (line.decode().split() for line in lines)]


def test_one_supervisor_runs_the_workers_of_several_front_ends():
    report_read, report_write = os.pipe()
    config = config_module.parse("authserv_id: mx.test.example\n", "<test>")
    everyone: list[_Reporting] = []
    first = _Reporting("policy", 2, report_write, everyone)
    second = _Reporting("socketmap", 1, report_write, everyone)
    first.bind(config)
    second.bind(config)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(report_read)
            status = Supervisor(None, config, first, second, reload_signals=(signal.SIGHUP,),
                                stop_signals=(signal.SIGTERM,)).run()
        finally:
            os._exit(status)
    os.close(report_write)
    try:
        reports = _reports(report_read, 3)
        # Each worker holds its own front-end's socket, not the other's.
        assert sorted((name, slot, held) for name, slot, _, held in reports) == \
            [("policy", 0, "+-"), ("policy", 1, "+-"), ("socketmap", 0, "-+")]
        # A dead worker is replaced in its own front-end's slot.
        [socketmap_worker] = [worker for name, _, worker, _ in reports if name == "socketmap"]
        os.kill(socketmap_worker, signal.SIGKILL)
        [(name, slot, _, held)] = _reports(report_read, 1)
        assert (name, slot, held) == ("socketmap", 0, "-+")
    finally:
        os.kill(pid, signal.SIGTERM)
        _, wait_status = os.waitpid(pid, 0)
        os.close(report_read)
        first.listening.close()
        second.listening.close()
    assert os.waitstatus_to_exitcode(wait_status) == 0


def _serving(path, config, also) -> int:
    """`policyd serve` with `also` in a child of its own (it takes the
    signals of the process it runs in); its pid."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            status = policy_service.serve(path, config, also=also)
        finally:
            os._exit(status)
    return pid


def _policy_config(tmp_path, processes: int = 1):
    return config_module.parse(
        f"authserv_id: mx.test.example\ndns:\n  nameservers: [127.0.0.1]\n"
        f"policy:\n  listen: ['unix:{tmp_path}/policyd']\n  processes: {processes}\n",
        "<test>")


def test_serve_binds_and_runs_a_front_end_beside_the_policy_service(tmp_path):
    # With policy.processes 1 too: the supervisor then runs both.
    report_read, report_write = os.pipe()
    socketmap = _Reporting("socketmap", 1, report_write, [])
    pid = _serving(None, _policy_config(tmp_path), [socketmap])
    os.close(report_write)
    try:
        [(name, slot, _, held)] = _reports(report_read, 1)
        assert (name, slot, held) == ("socketmap", 0, "+")
        deadline = time.monotonic() + 20
        while not (tmp_path / "policyd").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "policyd"))    # the policy service listens
    finally:
        os.kill(pid, signal.SIGTERM)
        _, wait_status = os.waitpid(pid, 0)
        os.close(report_read)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert not (tmp_path / "policyd").exists()


def test_a_front_end_that_cannot_bind_stops_serve_before_it_starts(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        socketmap = _Reporting("socketmap", 1, -1, [], busy=busy)
        pid = _serving(None, _policy_config(tmp_path, processes=2), [socketmap])
        _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == EX_UNAVAILABLE
    # The policy service's socket, bound first, is gone again.
    assert not (tmp_path / "policyd").exists()
