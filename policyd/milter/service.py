"""`policyd milter`: the milter's processes: listen, drop privileges, run
libmilter (policyd/milter/server.py) in this process (milter.workers 1)
or in workers forked by the supervisor (policyd/runtime/supervisor.py),
and serve the metrics.  Reload, stop, restart and metrics, step by
step: docs/milter.md."""
from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import typing

from ..checks import spf as spf_check
from ..config import Config
from ..dns import share_answers_between_workers
from ..runtime.exits import EX_SOFTWARE, EX_UNAVAILABLE
from ..runtime.sockets import ListenError, Listener, bind_milter_slots
from ..runtime.supervisor import Readiness, Supervisor, Wording, leave, serve_parent
from ..service import cleanup_metrics, drop_privileges, prepare_metrics, serve_metrics
from .server import (KILL_GRACE, START_ONLY_KEYS, STOP_SIGNALS, WORKER_STOP_SIGNAL, WorkerSlot,
                     run_libmilter)

log = logging.getLogger("policyd.milter")

WORDING = Wording(
    passing_on="reload: config {source} is valid; passing it to {count} worker(s)",
    replaced="{worker} {how}; starting a new one",
    retired="{worker} {how}; starting a new one",
    budget_spent="{worker} {how}; more than {limit} workers replaced within "
                 "{window:.0f} s, stopping the milter",
    budget_level=logging.ERROR,
    unavailable="",   # set per socket (MilterWorkers)
    stopping="stopping: {count} worker(s) finish their sessions",
    failed_at_stop="{worker} {how}",
    killing="{worker} still running {timeout:.1f} s after the stop; killing it",
)

SIGHUP_NOTE = "SIGHUP stops the milter (libmilter's convention); SIGUSR1 reloads the config"


class MilterWorkers:
    """The milter as the supervisor's front-end (runtime.supervisor.FrontEnd).
    `listeners`: the socket of each worker slot (bind(config), or given);
    `owner`: the user the UNIX socket file is given to."""
    stop_signal = WORKER_STOP_SIGNAL
    drain_failure = EX_SOFTWARE

    def __init__(self, config: Config, listeners: list[Listener] | None = None,
                 metrics_directory: str | None = None, owner: str | None = None):
        self.owner = owner
        self.listeners = listeners or []
        self.metrics_directory = metrics_directory
        self.count = config.milter.workers      # as started: a reload does not change it
        spec = config.milter.listen.replace("{", "{{").replace("}", "}}")
        self.wording = dataclasses.replace(
            WORDING, unavailable=f"{{worker}} {{how}}: libmilter cannot run on {spec}; stopping")

    @property
    def listener(self) -> Listener:
        """The first slot's: the spec, and the UNIX socket file."""
        return self.listeners[0]

    def bind(self, config: Config) -> None:
        milter = config.milter
        self.listeners = bind_milter_slots(milter.listen, self.count, owner=self.owner,
                                           mode=int(milter.socket_mode, 8),
                                           group=milter.socket_group)

    def slots(self) -> typing.Sequence[int]:
        return range(1, self.count + 1)

    def worker_name(self, pid: int, slot: int) -> str:
        return f"worker {slot} (pid {pid})"

    def sockets(self) -> list[socket.socket]:
        """Each listening socket once (a UNIX one is in every slot)."""
        return list({id(listener.socket): listener.socket
                     for listener in self.listeners}.values())

    def before_fork(self, config: Config) -> None:
        # Workers that lose the race for a connection get EAGAIN (server.py's
        # docstring); accepted sockets do not inherit O_NONBLOCK.
        for sock in self.sockets():
            sock.setblocking(False)
        # Made before the first fork: every worker's resolver and SPF memo
        # share them.  (The policy service does without: there they cost
        # more memory than they saved time; README, "Running it".)
        share_answers_between_workers(config.dns.cache_size)
        spf_check.share_outcomes_between_workers(spf_check.MEMO_SIZE)

    def started(self, config: Config) -> None:
        # The endpoint's thread starts after the first forks.
        _serve_metrics(config, self.metrics_directory)
        log.info("milter on %s: %d worker processes, %s (config %s)",
                 self.listener.spec, self.count,
                 "a socket each (SO_REUSEPORT)" if len(self.sockets()) > 1
                 else "one shared socket", config.source)

    def run_worker(self, slot: int, config: Config, parent: int, reload_fd: int) -> int:
        listener = self.listeners[slot - 1]
        # A slot's socket open in another worker would keep taking its
        # share of connections after that slot's worker has gone.
        for sock in self.sockets():
            if sock is not listener.socket:
                sock.close()
        status, _ = run_libmilter(config, listener,
                                  WorkerSlot(slot, self.count, parent, reload_fd))
        return status

    def check_reload(self, current: Config, new: Config) -> None:
        for key in ("workers", *START_ONLY_KEYS):
            if getattr(new.milter, key) != getattr(current.milter, key):
                log.warning("reload: milter.%s changed; restart to apply it", key)
        if new.metrics.listen != current.metrics.listen:
            log.warning("reload: metrics.listen changed; restart to apply it")

    def drain_timeout(self, config: Config) -> float:
        return config.milter.drain_timeout + KILL_GRACE

    def close_sockets(self) -> None:
        # The workers keep their own descriptors; once they are gone the
        # sockets are closed and new connections are refused at once.
        for sock in self.sockets():
            sock.close()

    def finish(self) -> None:
        self.listener.remove_socket_file()


def supervisor(config_path: str | None, config: Config, listeners: list[Listener],
               metrics_directory: str | None, parent: int | None = None) -> Supervisor:
    """The milter's supervisor: SIGUSR1 reloads; SIGTERM, SIGINT and SIGHUP
    stop; `parent`: the `policyd serve --milter` whose end stops us too."""
    return Supervisor(config_path, config, MilterWorkers(config, listeners, metrics_directory),
                      reload_signals=(signal.SIGUSR1,), stop_signals=STOP_SIGNALS,
                      notes={signal.SIGHUP: SIGHUP_NOTE}, parent=parent)


def run(config_path: str | None, config: Config, user: str | None = None) -> int:
    """Runs the milter until SIGTERM.  Returns the exit status, except
    that a process that ran libmilter itself exits (runtime.supervisor.leave)."""
    # Before the privilege drop: the parent's command line may then be
    # closed to us (hidepid).
    parent = serve_parent()
    sockets = MilterWorkers(config, owner=user)
    try:
        sockets.bind(config)
    except ListenError as error:
        log.error("cannot listen: %s", error)
        return EX_UNAVAILABLE
    listeners, listener = sockets.listeners, sockets.listener
    if user:
        drop_privileges(user)
    # After the privilege drop: the directory is made by, and only open
    # to, the user the workers run as.
    metrics_directory = prepare_metrics(config.metrics.listen)
    try:
        if config.milter.workers > 1:
            return supervisor(config_path, config, listeners, metrics_directory,
                              parent).run()
        _serve_metrics(config, metrics_directory)
        status, _ = run_libmilter(config, listener, config_path=config_path, parent=parent,
                                  readiness=Readiness())
        listener.remove_socket_file()
        cleanup_metrics(metrics_directory)
        leave(status)
    finally:
        cleanup_metrics(metrics_directory)


def _serve_metrics(config: Config, directory: str | None) -> None:
    if not directory:
        return   # metrics off, or `policyd serve --milter` serves them
    try:
        serve_metrics(config.metrics.listen, directory)
    except OSError as error:
        # Mail goes on without the endpoint; the counters are still kept.
        log.warning("metrics endpoint %s not started: %s", config.metrics.listen,
                    error.strerror or error)
