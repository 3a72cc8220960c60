"""libmilter in a process: its sessions, its reloads and its stop, on a
socket bound by policyd/runtime/sockets.py (policyd/milter/service.py
runs it in one process or in workers).  Why it is built so (libmilter's signals, TCP_NODELAY,
a socket per worker slot, the threads): docs/milter.md."""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import Milter
import milter

from ..config import Config, ConfigError
from ..engine import Engine
from ..runtime.engines import build_engine, engine_for, reload_engine
# EX_SOFTWARE: the status the milter's callers know it by (milter.service stops
# with it when workers keep dying).
from ..runtime.exits import EX_SOFTWARE, EX_UNAVAILABLE  # noqa: F401
from ..runtime.sockets import Listener
from ..runtime.supervisor import PARENT_CHECK_INTERVAL, ConfigReceiver, Readiness
from ..service import start_worker_metrics
from .protocol import ACTIONS, PolicyMilter, report_callback_error

log = logging.getLogger("policyd.milter")

# The name libmilter registers; Sendmail's INPUT_MAIL_FILTER names it too.
MILTER_NAME = "policyd"

# Settings of the socket, made once at start: a reload says they wait for
# a restart.
START_ONLY_KEYS = ("listen", "socket_mode", "socket_group")

# How long a stop may wait for libmilter's main loop to notice it; each
# wait is followed by a connection that wakes its select().
STOP_POLL = 0.02

# A stopping worker gets milter.drain_timeout for its sessions, then has
# to stop libmilter's loop (under a second); this much more before the
# parent kills it.
KILL_GRACE = 5.0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How the supervisor tells a worker to stop: a signal libmilter's signal
# thread does not wait for (it takes SIGHUP, SIGTERM and SIGINT), so that
# it always reaches our handler (docs/milter.md).
WORKER_STOP_SIGNAL = signal.SIGUSR2
# What the supervisor handles.
SUPERVISOR_SIGNALS = (signal.SIGUSR1, signal.SIGCHLD) + STOP_SIGNALS
# Blocked across each fork, so that a worker gets them only once its own
# handlers are in place (the default action of SIGUSR1 or SIGUSR2 would
# end it).
FORK_BLOCKED_SIGNALS = SUPERVISOR_SIGNALS + (WORKER_STOP_SIGNAL,)


class RefusedSession(Milter.Base):
    """A connection that comes while the milter stops: refused at option
    negotiation, so libmilter closes it and the MTA applies its default
    action, as when the milter is down (milter_default_action, F=)."""

    def negotiate(self, opts):
        return Milter.REJECT


class Sessions:
    """The engine new sessions get, and the sessions in flight."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._open = 0
        self._refusing = False
        self._changed = threading.Condition()

    def new_session(self) -> PolicyMilter | RefusedSession:
        """Milter.factory: libmilter calls it once per MTA connection."""
        with self._changed:
            if self._refusing:
                return RefusedSession()
            self._open += 1
        return PolicyMilter(self.engine, self._closed)

    def refuse_new(self) -> None:
        with self._changed:
            self._refusing = True

    def _closed(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @property
    def open(self) -> int:
        with self._changed:
            return self._open

    def wait_until_idle(self, timeout: float) -> int:
        """Waits for every session to close, at most `timeout` seconds;
        returns how many are still open."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._open > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self._open


class _MilterThread(threading.Thread):
    """libmilter's main loop; `error` holds why it could not run."""

    def __init__(self, listener: Listener, timeout: int):
        super().__init__(name="libmilter", daemon=True)
        self.listener, self.timeout = listener, timeout
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            # rmsock=False: the socket is ours (fd:), not libmilter's to remove.
            Milter.runmilter(MILTER_NAME, f"fd:{self.listener.socket.fileno()}",
                             self.timeout, rmsock=False)
        except milter.error as error:
            self.error = error


@dataclass(frozen=True)
class WorkerSlot:
    number: int           # from 1
    count: int
    supervisor: int       # its pid
    reload_fd: int        # the pipe the supervisor sends new Configs on


def run_libmilter(config: Config, listener: Listener, worker: WorkerSlot | None = None,
                  config_path: str | None = None, parent: int | None = None,
                  readiness: Readiness | None = None) -> tuple[int, int]:
    """libmilter in this process until a stop signal: the single process
    (which reloads from `config_path` on SIGUSR1 and stops when `parent`,
    if given, is gone), or a worker (which takes its reloads from the
    supervisor's pipe and stops when the supervisor is gone; `readiness`:
    the single process's, which tells systemd).  Returns the
    exit status and how many sessions were still open when the drain
    timeout ran out."""
    sessions = Sessions(build_engine(config))
    start_worker_metrics(sessions.engine.resolver)
    Milter.factory = sessions.new_session
    milter.set_flags(ACTIONS)
    # pymilter reports what it cannot decode through sys.excepthook, in the
    # session's thread: a warning of that session, not a bare error line.
    # Its default answer to such a failure, TEMPFAIL, is no answer where we
    # negotiated none (connect, HELO, MAIL, header, body: libmilter's
    # sendreply) but makes libmilter drop the rest of the message
    # (engine.c: back to the HELO state), so the MTA waits for an end of
    # message reply that never comes.  CONTINUE lets the session go on and
    # decide (PolicyMilter.undecodable); our callbacks never raise (_guarded).
    sys.excepthook = report_callback_error
    milter.set_exception_policy(Milter.CONTINUE)
    main_loop = _MilterThread(listener, config.milter.timeout)
    stopping = threading.Event()

    def reload(signum, frame) -> None:
        if readiness is not None:
            readiness.reloading()
        try:
            current = sessions.engine
            try:
                new = reload_engine(config_path, current)
            except ConfigError as error:
                log.error("reload refused, keeping the running config: %s", error)
                return
            for key in START_ONLY_KEYS:
                if getattr(new.config.milter, key) != getattr(current.config.milter, key):
                    log.warning("reload: milter.%s changed; restart to apply it", key)
            use(new)
        finally:
            if readiness is not None:
                readiness.reloaded()

    def use(new: Engine) -> None:
        sessions.engine = new
        start_worker_metrics(new.resolver)
        log.info("reloaded config %s", new.config.source)

    def stop(signum, frame) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP stops the milter (libmilter's convention); "
                     "SIGUSR1 reloads the config")
        stopping.set()

    # Each signal also writes to this pipe (whichever thread the kernel
    # gave it to), so that the select() below wakes and the handler runs.
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    # A worker's reloads come from the supervisor, already validated.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN if worker else reload)
    for signum in STOP_SIGNALS + ((WORKER_STOP_SIGNAL,) if worker else ()):
        signal.signal(signum, stop)
    # A worker comes out of fork() with these blocked (Supervisor); what
    # came in meanwhile is handled now, by the handlers above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED_SIGNALS)
    main_loop.start()
    if readiness is not None:
        readiness.listening()   # the socket listens: libmilter accepts from now on
    dns = ",".join(sessions.engine.resolver.nameservers)
    if worker:
        log.info("milter worker %d of %d on %s (config %s, dns %s, %s)", worker.number,
                 worker.count, listener.spec, config.source, dns,
                 sessions.engine.resolver.trust_reason)
        parent = worker.supervisor
    else:
        log.info("milter on %s (config %s, dns %s, %s)", listener.spec,
                 config.source, dns, sessions.engine.resolver.trust_reason)
    watched = [wake_read]
    receiver = None
    if worker:
        os.set_blocking(worker.reload_fd, False)
        receiver = ConfigReceiver(worker.reload_fd)
        watched.append(worker.reload_fd)
    while main_loop.is_alive() and not stopping.is_set():
        readable, _, _ = select.select(watched, [], [], PARENT_CHECK_INTERVAL)
        if wake_read in readable:
            _drain(wake_read)
        if receiver is not None and receiver.fd in readable:
            try:
                configs = receiver.read()
            except BlockingIOError:
                configs = []
            if configs is None:
                watched.remove(receiver.fd)   # the supervisor is gone: see below
                configs = []
            for new_config in configs:
                use(engine_for(new_config, sessions.engine))
        if parent is not None and os.getppid() != parent:
            # Killed (SIGKILL, OOM): nobody would stop or replace us, and
            # we would keep the socket from the next milter.
            if worker:
                log.error("worker %d: the supervisor (pid %d) is gone; stopping",
                          worker.number, parent)
            else:
                log.error("the parent (pid %d, policyd serve) is gone; stopping", parent)
            break
    if main_loop.error is not None:
        log.error("libmilter stopped: %s", main_loop.error)
        listener.forget()
        return EX_UNAVAILABLE, 0
    # Sessions first, libmilter's loop after: smfi_stop() can end sessions
    # in flight (a race in libmilter's listener.c turns a stop into an
    # abort), so it comes when there are none left to end.
    if readiness is not None:
        readiness.stopping()
    sessions.refuse_new()
    log.info("stopping: new connections are refused, %d session(s) in flight",
             sessions.open)
    drain_timeout = sessions.engine.config.milter.drain_timeout   # as reloaded
    remaining = sessions.wait_until_idle(drain_timeout)
    _stop_main_loop(main_loop, listener)
    listener.forget()
    if remaining:
        log.warning("stopped with %d session(s) still open after %.1f s; "
                    "the MTA applies its default action to them",
                    remaining, drain_timeout)
    else:
        log.info("stopped")
    return 0, remaining


def _drain(fd: int) -> None:
    """Reads a non-blocking pipe empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _stop_main_loop(main_loop: _MilterThread, listener: Listener) -> None:
    """smfi_stop() waits for libmilter's select() (up to 5 s, MI_CHK_TIME
    in listener.c) before it closes the socket.  So it runs in a thread of
    its own while we connect to the socket: each connection ends a
    select(), and the first after the stop flag is set ends the loop.
    With workers, a connection wakes every worker's select() (and one of
    them accepts it, as a session that ends at once), so each stopping
    worker keeps connecting until its own loop is gone."""
    if not main_loop.is_alive():
        return   # libmilter's own signal thread stopped it
    family = socket.AF_UNIX if listener.unix_path else listener.socket.family
    try:
        # Before the stop: once its flag is set, libmilter closes the socket
        # as soon as a connection ends its select(), and another worker's
        # wake-up connection can be that one (SO_REUSEPORT spreads them);
        # the descriptor is then gone, or another file's.
        address = listener.wake_address
    except OSError:
        address = None   # closed already: the loop is ending
    threading.Thread(target=milter.stop, name="libmilter-stop", daemon=True).start()
    while main_loop.is_alive():
        if address is not None:
            with socket.socket(family, socket.SOCK_STREAM) as wake:
                wake.settimeout(1.0)
                try:
                    wake.connect(address)
                except OSError:
                    pass   # closed already: the loop is ending
        main_loop.join(STOP_POLL)
