"""`policyd serve`: the policy service's processes: bind, drop privileges,
serve in this process (policy.processes 1) or in workers forked by the
supervisor (policyd/runtime/supervisor.py) with any front-end run beside
it, reload, stop.  Why workers: docs/supervisor.md."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import pwd
import signal
import socket
import typing

from ..config import Config, ConfigError
from ..engine import Engine
from ..runtime.engines import build_engine, engine_for, load_config
from ..runtime.exits import EX_NOUSER, EX_SOFTWARE, EX_UNAVAILABLE
from ..runtime.sockets import ListenError, Listener, bind_all
from ..runtime.supervisor import (PARENT_CHECK_INTERVAL, Companion, ConfigReceiver, FrontEnd,
                                  Readiness, Supervisor, Wording)
from ..service import (cleanup_metrics, drop_privileges, prepare_metrics, serve_metrics,
                       start_worker_metrics)

if typing.TYPE_CHECKING:
    from .server import AcceptShare

log = logging.getLogger("policyd")

# SIGHUP reloads, as for most daemons; SIGUSR1, the milter's reload signal
# (libmilter takes SIGHUP as stop), reloads `policyd serve` as well, so
# that the one an admin remembers from the milter does not kill the
# service by its default action.
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
WORKER_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# What a forked worker comes out of fork() with blocked (the supervisor's
# signals): unblocked once its handlers are in place.
FORK_BLOCKED_SIGNALS = {*WORKER_STOP_SIGNALS, *RELOAD_SIGNALS, signal.SIGCHLD}

WORDING = Wording(
    passing_on="reload: {source} is valid; passing it to {count} worker(s)",
    replaced="{worker} exited; starting another",
    retired=None,
    budget_spent="policy workers keep dying ({dead} in {window:.0f} s); stopping",
    budget_level=logging.CRITICAL,
    unavailable="{worker} {how}; stopping",
    stopping="stopping: draining requests in flight",
    failed_at_stop=None,
    killing="{worker} did not stop in time; killing it",
)


def _warn_what_a_reload_cannot_start(current: Config, new: Config) -> None:
    """A front-end is started with the service: one a reload turns on would
    otherwise be silently missing (Postfix then defers every delivery that
    asks the routing socketmap)."""
    if new.routing.listen and not current.routing.listen:
        log.warning("reload: routing.listen is set; the routing socketmap starts at the "
                    "next start (systemctl restart policyd)")


async def _run(path: str | None, engine: Engine, bound=None,
               on_reload=None, watch=None, share=None, reload_fd: int | None = None,
               readiness: Readiness | None = None) -> None:
    """One policy server until SIGTERM: SIGHUP reloads in this process, and
    so do Configs sent on `reload_fd` by a parent."""
    from .server import PolicyServer
    server = PolicyServer(engine, bound=bound, share=share)
    await server.start()
    start_worker_metrics(engine.resolver)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def apply(config: Config) -> None:
        new = engine_for(config, server.engine)
        server.reload(new)
        start_worker_metrics(new.resolver)
        log.info("reloaded config %s", new.config.source)

    def reload() -> None:
        if readiness is not None:
            readiness.reloading()
        try:
            try:
                config = load_config(path)
            except ConfigError as error:
                log.error("reload refused, keeping the running config: %s", error)
                return
            _warn_what_a_reload_cannot_start(server.engine.config, config)
            apply(config)
            if on_reload is not None:
                on_reload()
        finally:
            if readiness is not None:
                readiness.reloaded()

    def from_parent(receiver: ConfigReceiver) -> None:
        try:
            configs = receiver.read()
        except BlockingIOError:
            return
        if configs is None:   # the parent is gone: watch() sees to it
            loop.remove_reader(receiver.fd)
            return
        for config in configs:
            try:
                apply(config)
            except Exception:
                log.exception("reload refused, keeping the running config")

    if reload_fd is not None:
        os.set_blocking(reload_fd, False)
        loop.add_reader(reload_fd, from_parent, ConfigReceiver(reload_fd))
    else:
        # A worker takes reloads from its parent alone; SIGHUP stays
        # ignored there (pkill -HUP policyd reaches every process).
        for signum in RELOAD_SIGNALS:
            loop.add_signal_handler(signum, reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    # A forked worker starts with these blocked (Supervisor): now handled.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED_SIGNALS)
    watcher = asyncio.create_task(watch(stopping)) if watch else None
    if readiness is not None:
        companion = readiness.companion
        if companion is not None and companion.notice_fd is not None:
            loop.add_reader(companion.notice_fd, readiness.companion_notices)
        readiness.listening()
    await stopping.wait()
    if readiness is not None:
        readiness.stopping()
    log.info("stopping: draining requests in flight")
    await server.stop()
    if watcher is not None:
        watcher.cancel()


async def _serve_single(path: str | None, config: Config, user: str | None,
                        companion: Companion | None) -> int:
    sockets = PolicyWorkers(path, config, None)
    if not _bind([sockets], config, user, companion):
        return EX_UNAVAILABLE
    bound = sockets.bound
    engine = build_engine(config)
    _log_start(config, engine, 1)

    def relay_reload() -> None:
        if companion is not None:
            companion.reload()

    async def watch(stopping: asyncio.Event) -> None:
        while companion is not None and companion.running():
            await asyncio.sleep(0.5)
        if companion is not None:
            log.error("%s exited with status %s; stopping", companion.name,
                      companion.exited())
            stopping.set()

    try:
        await _run(path, engine, bound, relay_reload, watch if companion else None,
                   readiness=Readiness(companion))
    finally:
        for listener in bound:
            listener.close()
    status = 0
    if companion is not None:
        status = await asyncio.to_thread(companion.stop, companion.stop_timeout(config))
    log.info("stopped")
    return status


def _bind(frontends: typing.Sequence[FrontEnd], config: Config, user: str | None,
          companion: Companion | None) -> bool:
    """Every front-end's listening sockets and the companion, then the
    privilege drop; False if a socket cannot be bound.

    The sockets are bound first because a socket in Postfix's private/
    needs root.  The companion starts before the drop too: it binds its
    own socket, and drops privileges itself (`--user`), which a process
    that is no longer root could not do."""
    bound: list[FrontEnd] = []

    def release() -> None:
        for frontend in bound:
            frontend.close_sockets()
            frontend.finish()

    try:
        for frontend in frontends:
            frontend.bind(config)
            bound.append(frontend)
    except ListenError as error:
        release()
        log.critical("fatal: cannot listen: %s", error)
        return False
    if companion is not None:
        companion.start()
    if user:
        try:
            drop_privileges(user)
        except BaseException:
            if companion is not None:
                companion.stop(companion.stop_timeout(config))
            release()
            raise
    return True


def _use_fast_loop() -> None:
    """uvloop (Debian: python3-uvloop) when it is installed: the policy
    server's socket work on libuv (bench/README.md).  Without it,
    asyncio's own loop does the same job."""
    try:
        import uvloop
    except ImportError:
        log.debug("event loop: asyncio (no uvloop)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.debug("event loop: uvloop %s", uvloop.__version__)


def _log_start(config: Config, engine: Engine, processes: int) -> None:
    log.info("policy service on %s (config %s, %d process%s, dns %s, %s)",
             ", ".join(config.policy.listen), config.source, processes,
             "" if processes == 1 else "es", ",".join(engine.resolver.nameservers),
             engine.resolver.trust_reason)


def _worker(path: str | None, config: Config, bound, parent: int, share, slot: int,
            reload_fd: int) -> int:
    """A forked worker: a whole policy server on the parent's sockets,
    until SIGTERM or until `parent` (its pid) is gone.  `share`: the
    workers' connection counts, of which `slot` is this worker's;
    `reload_fd`: the pipe the parent sends new Configs on."""
    for signum in RELOAD_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)   # reloads come by the pipe
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)

    async def watch_parent(stopping: asyncio.Event) -> None:
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.error("policy worker %d: the parent (pid %d) is gone; stopping",
                  os.getpid(), parent)
        stopping.set()

    try:
        engine = build_engine(config)
        share.take(slot)
        _use_fast_loop()
        asyncio.run(_run(path, engine, bound, watch=watch_parent, share=share,
                         reload_fd=reload_fd))
        return 0
    except Exception:
        log.exception("policy worker %d failed", os.getpid())
        return EX_SOFTWARE


class PolicyWorkers:
    """The policy service as the supervisor's front-end (runtime.supervisor.FrontEnd)."""
    wording = WORDING
    stop_signal = signal.SIGTERM
    drain_failure = 1

    def __init__(self, path: str | None, config: Config, metrics_dir: str | None):
        self.path, self.metrics_dir = path, metrics_dir
        self.processes = config.policy.processes   # read at start only
        self.bound: list[Listener] = []
        self.share: AcceptShare | None = None

    def bind(self, config: Config) -> None:
        from .server import bind_listener
        self.bound = bind_all(config.policy.listen,
                              lambda spec: bind_listener(spec, config.policy))

    def slots(self) -> typing.Sequence[int]:
        return range(self.processes)

    def worker_name(self, pid: int, slot: int) -> str:
        return f"policy worker {pid}"

    def before_fork(self, config: Config) -> None:
        # Made before the first fork: the memory is shared with every worker.
        from .server import AcceptShare
        self.share = AcceptShare(self.processes)
        # Everything made so far (modules, the config) is shared with the
        # workers page by page until written to; the collector writes to
        # every object it examines, so it is told to leave these alone
        # (gc.freeze), and the pages stay shared instead of being copied.
        gc.freeze()

    def started(self, config: Config) -> None:
        if self.metrics_dir:
            serve_metrics(config.metrics.listen, self.metrics_dir)

    def run_worker(self, slot: int, config: Config, parent: int, reload_fd: int) -> int:
        return _worker(self.path, config, self.bound, parent, self.share, slot, reload_fd)

    def check_reload(self, current: Config, new: Config) -> None:
        _warn_what_a_reload_cannot_start(current, new)

    def drain_timeout(self, config: Config) -> float:
        return config.policy.drain_timeout + 5

    def sockets(self) -> list[socket.socket]:
        return [sock for listener in self.bound for sock in listener.sockets]

    def close_sockets(self) -> None:
        for listener in self.bound:
            listener.close()

    def finish(self) -> None:
        pass


def supervisor(path: str | None, config: Config, metrics_dir: str | None = None,
               companion: Companion | None = None,
               also: typing.Sequence[FrontEnd] = ()) -> Supervisor:
    """The policy service's supervisor: SIGHUP and SIGUSR1 reload, SIGTERM
    and SIGINT stop; `also`: the front-ends run beside it."""
    return Supervisor(path, config, PolicyWorkers(path, config, metrics_dir), *also,
                      reload_signals=RELOAD_SIGNALS, stop_signals=(signal.SIGTERM, signal.SIGINT),
                      companion=companion)


def _serve_prefork(path: str | None, config: Config, user: str | None,
                   companion: Companion | None, metrics_dir: str | None,
                   also: typing.Sequence[FrontEnd]) -> int:
    supervising = supervisor(path, config, metrics_dir, companion, also)
    # Before the companion starts: a SIGTERM from now on stops it too.
    supervising.catch_signals()
    if not _bind(supervising.frontends, config, user, companion):
        return EX_UNAVAILABLE
    _log_start(config, build_engine(config), config.policy.processes)
    return supervising.run()


def serve(path: str | None, config: Config, user: str | None = None,
          companion: Companion | None = None, also: typing.Sequence[FrontEnd] = ()) -> int:
    """`policyd serve`; `companion`: the milter of `serve --milter`; `also`:
    front-ends run beside the policy service by its supervisor, their
    sockets bound with its own (FrontEnd.bind)."""
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            log.critical("fatal: --user %s: no such user; create it, or name one "
                         "that exists (getent passwd)", user)
            return EX_NOUSER
    metrics_dir = prepare_metrics(config.metrics.listen, user)
    try:
        if config.policy.processes > 1 or also:
            return _serve_prefork(path, config, user, companion, metrics_dir, also)
        if metrics_dir:
            serve_metrics(config.metrics.listen, metrics_dir)
        _use_fast_loop()
        return asyncio.run(_serve_single(path, config, user, companion))
    finally:
        cleanup_metrics(metrics_dir)
