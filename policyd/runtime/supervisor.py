"""The one supervisor of every front-end's worker processes (Supervisor):
fork a worker per slot, hand each a reloaded Config over its pipe,
replace the dead within a restart budget, drain on stop; the interface a
front-end implements (FrontEnd), the Companion (the milter of `policyd
serve --milter`) and Readiness (sd_notify).  Why so: docs/supervisor.md.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from typing import Protocol, Sequence

from .. import notify
from ..config import Config, ConfigError
from .engines import load_config
from .exits import EX_SOFTWARE, EX_UNAVAILABLE

log = logging.getLogger("policyd")

# How often a worker looks for its parent.  getppid() changes when the
# parent dies (the worker is handed to init or a subreaper); polling it
# needs no signal that could arrive before the handlers are in place.
PARENT_CHECK_INTERVAL = 0.5

# Workers that die are replaced at most this often: RESTART_LIMIT new
# ones in any RESTART_WINDOW seconds.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0

# How long a worker may take to make room in its pipe for a new Config.
RELOAD_SEND_TIMEOUT = 2.0

# `policyd serve --milter` starts the milter with its own pid here.
SERVE_PARENT_ENV = "POLICYD_SERVE_PID"


def fork_with_blocked(signals) -> int:
    """os.fork() with `signals` blocked across it.  The parent gets its
    mask back at once; the child keeps them blocked, so that one sent
    before its handlers are in place waits for them instead of ending it
    by the default action, and unblocks them itself."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


class RestartBudget:
    """At most `limit` restarts within any `window` seconds."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW):
        self.limit, self.window = limit, window
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """Whether a restart at `now` is within the budget; counts it if so."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


# A reload reaches a worker as the parent's validated Config, pickled, in a
# frame of 4-octet length and data on a pipe of its own.
_FRAME = struct.Struct("!I")


def send_config(fd: int, config: Config, timeout: float = RELOAD_SEND_TIMEOUT) -> bool:
    """Writes the whole frame to a non-blocking pipe, waiting for the
    worker to read when the pipe is full; False if it does not within
    `timeout` (stuck), or is gone."""
    data = pickle.dumps(config)
    frame = memoryview(_FRAME.pack(len(data)) + data)
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while frame:
        try:
            frame = frame[os.write(fd, frame):]
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return False
        except OSError:
            return False
    return True


class ConfigReceiver:
    """The worker's end of the pipe: whole frames in, Configs out."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    def read(self) -> list[Config] | None:
        """The Configs completed by what could be read; None at EOF."""
        data = os.read(self.fd, 65536)
        if not data:
            return None
        self.buffer += data
        configs = []
        while len(self.buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                break
            # Taken off first: a frame that cannot be read must not block
            # every later one.
            data = self.buffer[_FRAME.size:_FRAME.size + size]
            self.buffer = self.buffer[_FRAME.size + size:]
            try:
                configs.append(pickle.loads(data))
            except Exception:
                log.exception("reload: a config from the parent could not be read")
        return configs


def describe_exit(wait_status: int) -> str:
    """"exited with status 1", "was killed by SIGKILL"."""
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(wait_status)}"


def serve_parent() -> int | None:
    """The pid of the `policyd serve --milter` that started us, or None.

    Such a companion stops when that parent is gone (SIGKILL, the OOM
    killer): nobody would stop it any more, and it would keep the port
    from the next `policyd serve --milter`.  Companion.start says who it
    is in SERVE_PARENT_ENV; if that pid is not our parent any more, it
    died before we got here, and the watch stops us at once.  Polling
    getppid() rather than PR_SET_PDEATHSIG: the death signal is cleared
    when we drop privileges, and would not reach the workers.  A process
    run on its own (systemd, a shell) watches nothing: its parent may
    well exit first, as a daemonizing init script does."""
    value = os.environ.pop(SERVE_PARENT_ENV, "")
    return int(value) if value.isdigit() else None


def leave(status: int) -> typing.NoReturn:
    """Exit without finalizing the interpreter: a forked worker's stack is
    its parent's, and libmilter's threads outlive smfi_main() (finalizing
    under them has crashed the process at exit: glibc "free(): corrupted
    unsorted chunks", SIGABRT, after a clean stop)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class Companion:
    """The milter process of `policyd serve --milter`: started before the
    privilege drop (it binds its own socket and drops privileges itself,
    which a process no longer root could not do), told of reloads by
    `reload_signal`, stopped by SIGTERM.  Its sd_notify messages come to
    a socket of ours (its $NOTIFY_SOCKET), so that we say READY=1 only
    once it listens too."""

    def __init__(self, command: list[str], stop_timeout: typing.Callable[[Config], float],
                 name: str = "milter", reload_signal: int = signal.SIGUSR1):
        self.command, self.name, self.reload_signal = command, name, reload_signal
        self.stop_timeout = stop_timeout   # how long its drain may take, by the config
        self.process: subprocess.Popen | None = None
        self.ready = False
        self._notices: socket.socket | None = None

    def start(self) -> None:
        notices = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Abstract (sd_notify(3)'s "@"): nothing on disk to remove, nor to
        # be writable by the user we drop to.
        notices.bind(f"\0policyd-{os.getpid()}-{self.name}-{time.monotonic_ns()}")
        notices.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notices.setblocking(False)
        self._notices = notices
        name = "@" + notices.getsockname()[1:].decode()
        self.process = subprocess.Popen(self.command, env={
            **os.environ, SERVE_PARENT_ENV: str(os.getpid()),
            notify.NOTIFY_SOCKET_ENV: name})

    @property
    def notice_fd(self) -> int | None:
        return self._notices.fileno() if self._notices is not None else None

    def read_notices(self) -> bool:
        """Takes what the companion said; True once it said READY=1.
        Datagrams from any other process are ignored (SO_PASSCRED)."""
        assert self._notices is not None and self.process is not None
        while True:
            try:
                data, ancillary, _, _ = self._notices.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except BlockingIOError:
                return self.ready
            for level, kind, value in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = struct.unpack_from("3i", value)[0]
                    if pid == self.process.pid and b"READY=1" in data.split(b"\n"):
                        self.ready = True

    def close_in_child(self) -> None:
        """In a forked worker: the notices are the supervisor's."""
        if self._notices is not None:
            self._notices.close()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self) -> int | None:
        """Its exit status once it is gone by itself; None while it runs."""
        return None if self.process is None else self.process.poll()

    def reload(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(self.reload_signal)

    def terminate(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.terminate()

    def stop(self, timeout: float) -> int:
        """Stops it and waits at most `timeout` seconds before killing it;
        0 if it stopped cleanly (or never ran), else 1."""
        if self._notices is not None:
            self._notices.close()
            self._notices = None
        if self.process is None:
            return 0
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return 0 if self.process.returncode in (0, -signal.SIGTERM) else 1


class Readiness:
    """systemd's view of the service (sd_notify, Type=notify): READY=1
    once our sockets listen and the companion, if any, said it listens
    too; RELOADING=1 then READY=1 around a reload; STOPPING=1 at the
    drain."""

    def __init__(self, companion: Companion | None = None):
        self.companion = companion
        self._listening = False
        self._said_ready = False

    def listening(self) -> None:
        self._listening = True
        self._tell()

    def companion_notices(self) -> None:
        if self.companion is not None:
            self.companion.read_notices()
            self._tell()

    def _tell(self) -> None:
        if self._said_ready or not self._listening:
            return
        if self.companion is not None and not self.companion.ready:
            return
        self._said_ready = True
        notify.ready()

    def reloading(self) -> None:
        if self._said_ready:
            notify.reloading()

    def reloaded(self) -> None:
        if self._said_ready:
            notify.ready()

    def stopping(self) -> None:
        notify.stopping()


@dataclass(frozen=True)
class Slot:
    """Where a worker runs: its front-end, and its slot there."""
    frontend: FrontEnd
    number: int


@dataclass(frozen=True)
class Wording:
    """What the supervisor logs, in each front-end's words (str.format
    fields: worker, how, count, source, limit, dead, window, timeout)."""
    passing_on: str            # a valid reload goes to `count` workers
    replaced: str              # a worker died by itself and is replaced
    retired: str | None        # a worker stopped for not taking a reload is replaced
    budget_spent: str          # too many replaced: the supervisor stops
    budget_level: int
    unavailable: str           # a worker exited EX_UNAVAILABLE: it cannot run on its socket
    stopping: str
    failed_at_stop: str | None  # a worker's non-zero exit at the drain
    killing: str


class FrontEnd(Protocol):
    """What a front-end gives the supervisor: its worker slots, how a
    worker runs and is stopped, its sockets and its words.

    How a front-end plugs in: a class with these members.  Its service
    calls bind(config) (runtime/sockets.py) as root, drops privileges,
    then Supervisor(path, config, frontend, *more, ...).run(); `policyd
    serve` runs another front-end beside the policy service by
    policy.service.serve(..., also=[frontend]).  Each front-end keeps its
    own slots, stop signal, words and drain; a worker closes the other
    front-ends' sockets."""
    wording: Wording
    stop_signal: signal.Signals   # how the supervisor tells a worker to stop
    drain_failure: int    # the exit status when a worker fails at its stop

    def bind(self, config: Config) -> None:
        """Binds its listening sockets (runtime/sockets.py), as root before
        the privilege drop; raises ListenError, with none of them left."""

    def slots(self) -> Sequence[int]: ...

    def worker_name(self, pid: int, slot: int) -> str: ...

    def sockets(self) -> Sequence[socket.socket]:
        """Its listening sockets, each once: a worker of another front-end
        closes them (it would hold connections in a queue it never reads)."""

    def close_sockets(self) -> None:
        """The supervisor's copies of the listening sockets, at the drain:
        once the workers have taken what is queued and closed theirs, a new
        client is refused at once instead of waiting in a queue nobody reads."""

    def before_fork(self, config: Config) -> None: ...

    def started(self, config: Config) -> None:
        """Once the first workers run (threads may start now)."""

    def run_worker(self, slot: int, config: Config, parent: int, reload_fd: int) -> int:
        """In the forked child: runs until stopped, returns the exit status."""

    def check_reload(self, current: Config, new: Config) -> None:
        """Says what a reload cannot change without a restart."""

    def drain_timeout(self, config: Config) -> float:
        """How long the workers may take to stop before they are killed."""

    def finish(self) -> None:
        """After the last worker: socket files."""


class Supervisor:
    """Forks a worker per slot of `frontend` and of each of `more`, passes
    reloads and stops on, replaces the workers that die.
    `reload_signals`, `stop_signals`: what this command takes as such
    (`notes`: a line logged when a signal stops it); `parent`: the
    `policyd serve --milter` whose end stops us too; `companion`: a
    process started and stopped with us."""

    def __init__(self, config_path: str | None, config: Config, frontend: FrontEnd,
                 *more: FrontEnd, reload_signals: Sequence[int], stop_signals: Sequence[int],
                 notes: dict[int, str] | None = None, parent: int | None = None,
                 companion: Companion | None = None, readiness: Readiness | None = None):
        self.config_path, self.config = config_path, config
        self.frontend = frontend                 # the command's own (policy, milter)
        self.frontends = (frontend, *more)
        self.reload_signals, self.stop_signals = tuple(reload_signals), tuple(stop_signals)
        self.notes = notes or {}
        self.parent, self.companion = parent, companion
        self.readiness = readiness or Readiness(companion)
        self.workers: dict[int, Slot] = {}      # pid -> where it runs
        self.channels: dict[int, int] = {}      # pid -> write end of its reload pipe
        self.retiring: set[int] = set()         # pids stopped to be replaced
        self.restarts = RestartBudget()
        self._signals: collections.deque[int] = collections.deque()
        self._wake_read = self._wake_write = -1

    @property
    def handled(self) -> tuple[int, ...]:
        return (*self.reload_signals, *self.stop_signals, signal.SIGCHLD)

    def catch_signals(self) -> None:
        """From now on a signal is noted for the loop (each writes a byte
        to a pipe, so that select() wakes): call before starting anything
        a stop must reach."""
        if self._wake_read >= 0:
            return
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        for signum in self.handled:
            signal.signal(signum, self._note_signal)

    def run(self) -> int:
        self.catch_signals()
        try:
            for frontend in self.frontends:
                frontend.before_fork(self.config)
            started = all([self._start_worker(Slot(frontend, number))
                           for frontend in self.frontends for number in frontend.slots()])
            if not started:
                return self._stop(EX_SOFTWARE)
            for frontend in self.frontends:
                frontend.started(self.config)
            self.readiness.listening()
            return self._stop(self._supervise())
        finally:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _note_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _wait(self, timeout: float) -> None:
        """Until a signal or a companion's notice comes, or `timeout` seconds."""
        watched = [self._wake_read]
        notices = self.companion.notice_fd if self.companion is not None else None
        if notices is not None:
            watched.append(notices)
        readable, _, _ = select.select(watched, [], [], max(timeout, 0))
        if self._wake_read in readable:
            try:
                while os.read(self._wake_read, 512):
                    pass
            except BlockingIOError:
                pass
        if notices is not None and notices in readable:
            self.readiness.companion_notices()

    def _supervise(self) -> int:
        """Until a stop signal, or workers that cannot be kept running;
        returns the exit status."""
        while True:
            self._wait(PARENT_CHECK_INTERVAL)
            while self._signals:
                signum = self._signals.popleft()
                if signum in self.reload_signals:
                    self._reload()
                elif signum in self.stop_signals:
                    if signum in self.notes:
                        log.info("%s", self.notes[signum])
                    return 0
            if self.parent is not None and os.getppid() != self.parent:
                log.error("the parent (pid %d, policyd serve) is gone; stopping",
                          self.parent)
                return 0
            status = self._replace_dead_workers()
            if status is not None:
                return status
            if self.companion is not None and self.companion.exited() is not None:
                log.error("%s exited with status %s; stopping", self.companion.name,
                          self.companion.exited())
                return 1

    def _reload(self) -> None:
        self.readiness.reloading()
        try:
            try:
                new = load_config(self.config_path)
            except ConfigError as error:
                log.error("reload refused, keeping the running config: %s", error)
                return
            for frontend in self.frontends:
                frontend.check_reload(self.config, new)
            # What a worker started from now on runs, and the drain timeout.
            self.config = new
            log.info(self.frontend.wording.passing_on.format(
                source=new.source, count=len(self.channels)))
            for pid, fd in self.channels.items():
                if pid not in self.retiring and not send_config(fd, new):
                    slot = self.workers[pid]
                    log.error("%s does not take its reloads; stopping it to start another",
                              _name(pid, slot))
                    self.retiring.add(pid)
                    os.kill(pid, slot.frontend.stop_signal)
            if self.companion is not None:
                self.companion.reload()
        finally:
            self.readiness.reloaded()

    def _replace_dead_workers(self) -> int | None:
        for pid, slot, wait_status in self._reap():
            wording = slot.frontend.wording
            words = {"worker": _name(pid, slot), "how": describe_exit(wait_status)}
            if pid in self.retiring:
                # Stopped by us, not dead by itself: no count against the budget.
                self.retiring.discard(pid)
                if wording.retired:
                    log.info(wording.retired.format(**words))
                if not self._start_worker(slot):
                    return EX_SOFTWARE
                continue
            if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == EX_UNAVAILABLE:
                log.error(wording.unavailable.format(**words))
                return EX_UNAVAILABLE
            if not self.restarts.allow(time.monotonic()):
                log.log(wording.budget_level, wording.budget_spent.format(
                    **words, limit=self.restarts.limit, dead=self.restarts.limit + 1,
                    window=self.restarts.window))
                return EX_SOFTWARE
            log.error(wording.replaced.format(**words))
            if not self._start_worker(slot):
                return EX_SOFTWARE
        return None

    def _reap(self) -> list[tuple[int, Slot, int]]:
        """(pid, slot, wait status) of each worker that is gone; only our
        own pids (a companion is Popen's to reap)."""
        gone = []
        for pid in list(self.workers):
            try:
                done, wait_status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, wait_status = pid, 0
            if done:
                slot = self.workers.pop(pid)
                os.close(self.channels.pop(pid))
                gone.append((pid, slot, wait_status))
        return gone

    def _start_worker(self, slot: Slot) -> bool:
        try:
            reload_read, reload_write = os.pipe()
        except OSError as error:
            log.error("cannot start worker %d: %s", slot.number, error.strerror or error)
            return False
        # Taken before the fork: a parent that dies right after it must not
        # look like the worker's parent (getppid() would already say init).
        supervisor = os.getpid()
        try:
            # A stop before the worker has its handlers would end it by the
            # default action; the worker unblocks them.
            pid = fork_with_blocked((*self.handled, slot.frontend.stop_signal))
        except OSError as error:
            log.error("cannot start worker %d: %s", slot.number, error.strerror or error)
            os.close(reload_write)
            os.close(reload_read)
            return False
        if pid == 0:
            os.close(reload_write)
            self._become_worker(slot, supervisor, reload_read)   # does not return
        os.close(reload_read)
        # A worker that stops reading must not block the supervisor (_reload).
        os.set_blocking(reload_write, False)
        self.workers[pid] = slot
        self.channels[pid] = reload_write
        return True

    def _become_worker(self, slot: Slot, supervisor: int, reload_fd: int) -> typing.NoReturn:
        """In the child: the parent's signal plumbing, its pipes to the
        other workers and the other front-ends' sockets go, the front-end's
        worker comes.  Never returns: the caller's stack is the parent's."""
        status = EX_SOFTWARE
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_read)
            os.close(self._wake_write)
            for fd in self.channels.values():
                os.close(fd)
            if self.companion is not None:
                self.companion.close_in_child()
            for other in self.frontends:
                if other is not slot.frontend:
                    for sock in other.sockets():
                        sock.close()
            for signum in self.handled:
                signal.signal(signum, signal.SIG_DFL)
            status = slot.frontend.run_worker(slot.number, self.config, supervisor, reload_fd)
        except BaseException:
            log.exception("worker %d failed", slot.number)
        finally:
            leave(status)

    def _stop(self, status: int) -> int:
        self.readiness.stopping()
        for frontend in self.frontends:
            count = sum(slot.frontend is frontend for slot in self.workers.values())
            log.info(frontend.wording.stopping.format(count=count))
        for pid, slot in self.workers.items():
            os.kill(pid, slot.frontend.stop_signal)
        for frontend in self.frontends:
            frontend.close_sockets()
        if self.companion is not None:
            self.companion.terminate()
        timeout = max(frontend.drain_timeout(self.config) for frontend in self.frontends)
        deadline = time.monotonic() + timeout
        while self.workers:
            for pid, slot, wait_status in self._reap():
                if wait_status:
                    # A worker that failed at its stop: not a clean stop.
                    wording = slot.frontend.wording
                    if wording.failed_at_stop:
                        log.warning(wording.failed_at_stop.format(
                            worker=_name(pid, slot), how=describe_exit(wait_status)))
                    status = status or slot.frontend.drain_failure
            remaining = deadline - time.monotonic()
            if not self.workers or remaining <= 0:
                break
            self._wait(min(remaining, 1.0))
            self._signals.clear()   # a second stop signal changes nothing
        for pid, slot in self.workers.items():
            log.warning(slot.frontend.wording.killing.format(worker=_name(pid, slot),
                                                             timeout=timeout))
            os.kill(pid, signal.SIGKILL)
        for pid in list(self.workers):
            os.waitpid(pid, 0)
            del self.workers[pid]
            os.close(self.channels.pop(pid))
        if self.companion is not None:
            status = status or self.companion.stop(self.companion.stop_timeout(self.config))
        for frontend in self.frontends:
            frontend.finish()
        log.info("stopped")
        return status


def _name(pid: int, slot: Slot) -> str:
    return slot.frontend.worker_name(pid, slot.number)
