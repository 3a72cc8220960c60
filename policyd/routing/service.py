"""The routing socketmap as a service: its sockets bound before the
privilege drop, its one worker process under the supervisor
(RoutingWorkers, runtime.supervisor's FrontEnd), reloads and stop.

One process, not one per core: a lookup is a dict look-up or a Redis
GET, a few per delivery, and without Redis what was learned lives in
that process's memory, which every lookup must see.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import typing

from ..config import Config
from ..runtime.exits import EX_SOFTWARE
from ..runtime.sockets import Listener, bind_all
from ..runtime.supervisor import PARENT_CHECK_INTERVAL, ConfigReceiver, Wording
from ..state import SharedState
from .server import RoutingServer, bind_listener
from .store import RouteStore, open_store
from .tables import RoutingMetrics, Tables

log = logging.getLogger("policyd.routing")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the worker comes out of fork() with blocked (the supervisor's
# signals, runtime/supervisor.fork_with_blocked): unblocked once handled.
FORK_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                        signal.SIGUSR2, signal.SIGCHLD}

WORDING = Wording(
    passing_on="reload: {source} is valid; passing it to {count} worker(s)",
    replaced="{worker} {how}; starting another",
    retired="{worker} replaced",
    budget_spent="routing worker keeps dying ({dead} in {window:.0f} s); stopping",
    budget_level=logging.CRITICAL,
    unavailable="{worker} {how}; stopping",
    stopping="stopping: routing worker(s) ({count}) finish their lookups",
    failed_at_stop="{worker} {how} at its stop",
    killing="{worker} did not stop in {timeout:.0f} s; killing it",
)


def bind(config: Config) -> list[Listener]:
    """Every routing.listen socket; raises ListenError (none stays bound)."""
    return bind_all(config.routing.listen, lambda spec: bind_listener(spec, config.routing))


class RoutingService:
    """The socketmap server with its store, in any running event loop:
    `start()`, `reload(config)`, `stop()`."""

    def __init__(self, config: Config, bound: list[Listener] | None = None):
        self.config = config
        self.state = SharedState(config.redis) if config.redis.url else None
        self.store: RouteStore = open_store(self.state, config.routing.max_routes)
        self.server = RoutingServer(Tables(config.routing, self.store,
                                           RoutingMetrics.if_enabled()), bound)

    @property
    def addresses(self) -> list[str]:
        return self.server.addresses

    async def start(self) -> None:
        await self.server.start()

    def reload(self, config: Config) -> None:
        if config.redis != self.config.redis:
            # Routes learned so far stay where they are; new ones go to
            # the new backend.
            if self.state is not None:
                self.state.close()
            self.state = SharedState(config.redis) if config.redis.url else None
            self.store = open_store(self.state, config.routing.max_routes)
            tables = Tables(config.routing, self.store, self.server.tables.metrics)
        else:
            tables = self.server.tables.reconfigured(config.routing)
        self.server.reload(tables)
        self.config = config
        log.info("routing: reloaded config %s", config.source)

    async def stop(self) -> None:
        await self.server.stop()
        if self.state is not None:
            self.state.close()


async def run_worker(config: Config, bound: list[Listener] | None, parent: int | None,
                     reload_fd: int | None) -> None:
    """The routing worker's life: serve until SIGTERM, or until `parent`
    (a pid) is gone; Configs from the parent's pipe `reload_fd` reload."""
    service = RoutingService(config, bound)
    await service.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def from_parent(receiver: ConfigReceiver) -> None:
        try:
            configs = receiver.read()
        except BlockingIOError:
            return
        if configs is None:   # the parent is gone: the watch sees to it
            loop.remove_reader(receiver.fd)
            return
        for new in configs:
            try:
                service.reload(new)
            except Exception:
                log.exception("routing: reload refused, keeping the running config")

    if reload_fd is not None:
        os.set_blocking(reload_fd, False)
        loop.add_reader(reload_fd, from_parent, ConfigReceiver(reload_fd))
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopping.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED_SIGNALS)

    async def watch_parent() -> None:
        while parent is not None and os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.error("routing worker %d: the parent (pid %s) is gone; stopping",
                  os.getpid(), parent)
        stopping.set()

    watcher = asyncio.create_task(watch_parent()) if parent is not None else None
    await stopping.wait()
    await service.stop()
    if watcher is not None:
        watcher.cancel()


class RoutingWorkers:
    """The routing socketmap as the supervisor's front-end
    (runtime.supervisor.FrontEnd): one worker on the sockets bound here."""
    wording = WORDING
    stop_signal = signal.SIGTERM
    drain_failure = 1

    def __init__(self, config: Config, bound: list[Listener] | None = None):
        self.bound: list[Listener] = bound if bound is not None else []

    def bind(self, config: Config) -> None:
        """Before the privilege drop; raises ListenError."""
        self.bound = bind(config)

    def slots(self) -> typing.Sequence[int]:
        return range(1)

    def worker_name(self, pid: int, slot: int) -> str:
        return f"routing worker {pid}"

    def sockets(self) -> list[socket.socket]:
        return [sock for listener in self.bound for sock in listener.sockets]

    def close_sockets(self) -> None:
        for listener in self.bound:
            listener.close(remove_socket=False)

    def before_fork(self, config: Config) -> None:
        pass

    def started(self, config: Config) -> None:
        pass

    def run_worker(self, slot: int, config: Config, parent: int, reload_fd: int) -> int:
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)   # reloads come by the pipe
        try:
            asyncio.run(run_worker(config, self.bound, parent, reload_fd))
            return 0
        except Exception:
            log.exception("routing worker %d failed", os.getpid())
            return EX_SOFTWARE

    def check_reload(self, current: Config, new: Config) -> None:
        fixed = [name for name in ("listen", "socket_mode", "socket_group")
                 if getattr(current.routing, name) != getattr(new.routing, name)]
        if fixed:
            log.warning("reload: routing.%s changed; takes effect at the next start",
                        ", routing.".join(fixed))

    def drain_timeout(self, config: Config) -> float:
        return config.routing.drain_timeout + 5

    def finish(self) -> None:
        for listener in self.bound:
            listener.remove_socket_file()
