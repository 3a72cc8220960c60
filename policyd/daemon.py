"""`policyd serve`: the policy service's life: start, reload, stop.

With `policy.processes` > 1 the parent binds the listening sockets, drops
privileges and forks that many workers, each a complete policy server with
its own engine and DNS cache accepting on the shared sockets; Python runs
one thread at a time per process, so this is what puts every core to work.
The workers keep count of their connections in shared memory and a worker
over its share lets the others accept (policy.server.AcceptShare): the
kernel alone gives nearly all of a burst to one of them.
Postfix sends all requests of one message over one connection, so the
per-message header state of a worker is never needed by another.  The
parent only supervises: it validates a new config and hands that Config
to the workers (a pipe each: they never read the file themselves),
passes SIGTERM on and waits for the drain, and replaces a worker that
dies.  A worker whose parent is gone (killed: SIGKILL, the OOM killer)
stops as on SIGTERM within PARENT_CHECK_INTERVAL: nobody would stop or
replace it, and it would keep the listening sockets from the next policyd.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import pwd
import signal
import subprocess
import sys
import threading
import time

from . import config as config_module
from .config import Config, ConfigError
from .dns import Resolver
from .engine import Engine
from .supervision import (PARENT_CHECK_INTERVAL, ConfigReceiver, RestartBudget,
                          fork_with_blocked, send_config)
from .service import (cleanup_metrics, drop_privileges, prepare_metrics, serve_metrics,
                      start_worker_metrics)

log = logging.getLogger("policyd")

EX_NOUSER = 67        # sysexits.h: the --user given does not exist
EX_UNAVAILABLE = 69   # sysexits.h: a listen address cannot be used
EX_SOFTWARE = 70      # sysexits.h: workers keep dying
WORKER_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

# SIGHUP reloads, as for most daemons; SIGUSR1, the milter's reload signal
# (libmilter takes SIGHUP as stop), reloads `policyd serve` as well, so
# that the one an admin remembers from the milter does not kill the
# service by its default action.
RELOAD_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)


def reload_engine(path: str | None, current: Engine) -> Engine:
    """Parse and validate everything first, then hand back a new engine.

    The DNS cache survives a reload when the DNS settings did not change.
    Raises ConfigError and leaves `current` untouched on a bad file.
    """
    return engine_for(_load(path), current)


def engine_for(config: Config, current: Engine) -> Engine:
    resolver = current.resolver if config.dns == current.config.dns else Resolver(config.dns)
    return Engine(config, resolver)


def _load(path: str | None) -> Config:
    resolved = config_module.resolve_path(path)
    return config_module.load(resolved) if resolved else config_module.embedded()


def _start_milter(path: str | None, user: str | None) -> subprocess.Popen:
    """The milter runs as a child process of its own: libmilter takes
    SIGHUP as "stop" and owns the signals of its process, so it cannot share
    one with the policy service's SIGHUP reload."""
    command = [sys.executable, "-m", "policyd", "milter"]
    if path:
        command += ["-c", path]
    if user:
        command += ["--user", user]
    # The milter stops by itself if this process dies without stopping it.
    from .milter.runner import SERVE_PARENT_ENV
    return subprocess.Popen(command, env={**os.environ, SERVE_PARENT_ENV: str(os.getpid())})


def _stop_milter(milter: subprocess.Popen | None, deadline: float) -> int:
    if milter is None:
        return 0
    if milter.poll() is None:
        milter.terminate()
    try:
        milter.wait(deadline)
    except subprocess.TimeoutExpired:
        milter.kill()
        milter.wait()
    return 0 if milter.returncode in (0, -signal.SIGTERM) else 1


async def _run(path: str | None, engine: Engine, bound=None,
               on_reload=None, watch=None, share=None, reload_fd: int | None = None) -> None:
    """One policy server until SIGTERM: SIGHUP reloads in this process, and
    so do Configs sent on `reload_fd` by a parent."""
    from .policy.server import PolicyServer
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
        try:
            config = _load(path)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
            return
        apply(config)
        if on_reload is not None:
            on_reload()

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
    # A forked worker starts with these blocked (see spawn): now handled.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_STOP_SIGNALS)
    watcher = asyncio.create_task(watch(stopping)) if watch else None
    await stopping.wait()
    log.info("stopping: draining requests in flight")
    await server.stop()
    if watcher is not None:
        watcher.cancel()


async def _serve_single(path: str | None, config: Config, user: str | None,
                        with_milter: bool) -> int:
    bound, milter = _bind(path, config, user, with_milter)
    if bound is None:
        return EX_UNAVAILABLE
    engine = Engine(config, Resolver(config.dns))
    _log_start(config, engine, 1)

    def relay_reload() -> None:
        if milter is not None and milter.poll() is None:
            milter.send_signal(signal.SIGUSR1)   # the milter's reload signal

    async def watch(stopping: asyncio.Event) -> None:
        while milter is not None and milter.poll() is None:
            await asyncio.sleep(0.5)
        if milter is not None:
            log.error("milter exited with status %s; stopping", milter.returncode)
            stopping.set()

    try:
        await _run(path, engine, bound, relay_reload, watch if milter else None)
    finally:
        for listener in bound:
            listener.close()
    status = await asyncio.to_thread(_stop_milter, milter, config.milter.drain_timeout + 5)
    log.info("stopped")
    return status


def _bind(path: str | None, config: Config, user: str | None, with_milter: bool):
    """Every listening socket and the milter, then the privilege drop:
    (sockets, milter process or None), or (None, None) if a socket cannot
    be bound.

    The sockets are bound first because a socket in Postfix's private/
    needs root.  The milter starts before the drop too: it binds its own
    socket, and drops privileges itself (`--user`), which a process that
    is no longer root could not do."""
    from .policy.server import ListenError, bind_listener
    bound = []
    try:
        for spec in config.policy.listen:
            bound.append(bind_listener(spec, config.policy))
    except ListenError as error:
        for listener in bound:
            listener.close()
        log.critical("fatal: cannot listen: %s", error)
        return None, None
    milter = _start_milter(path, user) if with_milter else None
    if user:
        try:
            drop_privileges(user)
        except BaseException:
            _stop_milter(milter, config.milter.drain_timeout + 5)
            for listener in bound:
                listener.close()
            raise
    return bound, milter


def _use_fast_loop() -> None:
    """uvloop (Debian: python3-uvloop) when it is installed: the policy
    server's socket work on libuv, measured 12 % more decisions per second
    on two cores (bench/run_policy.py).  Without it, asyncio's own loop
    does the same job."""
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
        engine = Engine(config, Resolver(config.dns))
        share.take(slot)
        _use_fast_loop()
        asyncio.run(_run(path, engine, bound, watch=watch_parent, share=share,
                         reload_fd=reload_fd))
        return 0
    except Exception:
        log.exception("policy worker %d failed", os.getpid())
        return EX_SOFTWARE


def _serve_prefork(path: str | None, config: Config, user: str | None,
                   with_milter: bool, metrics_dir: str | None) -> int:
    events: list[int] = []
    wake = threading.Event()

    def on_signal(signum, _frame) -> None:
        events.append(signum)
        wake.set()

    # Before the milter starts: a SIGTERM from now on stops it too.
    for signum in (*RELOAD_SIGNALS, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    bound, milter = _bind(path, config, user, with_milter)
    if bound is None:
        return EX_UNAVAILABLE
    _log_start(config, Engine(config, Resolver(config.dns)), config.policy.processes)

    workers: dict[int, int] = {}   # pid -> slot
    channels: dict[int, int] = {}  # pid -> the write end of its reload pipe
    retiring: set[int] = set()     # pids stopped for not taking a reload
    # Made before the first fork: the memory is shared with every worker.
    from .policy.server import AcceptShare
    share = AcceptShare(config.policy.processes)
    restarts = RestartBudget()

    def spawn(slot: int) -> None:
        # Taken before the fork: a parent that dies right after it must not
        # look like the worker's parent (getppid() would already say init).
        parent = os.getpid()
        reload_read, reload_write = os.pipe()
        # A stop before the worker has its handlers would end it by the
        # default action, which the drain counts as a failure; _run
        # unblocks them.
        pid = fork_with_blocked(WORKER_STOP_SIGNALS)
        if pid == 0:
            status = 1
            try:
                for fd in [reload_write, *channels.values()]:
                    os.close(fd)
                status = _worker(path, config, bound, parent, share, slot, reload_read)
            finally:
                logging.shutdown()
                os._exit(status)
        os.close(reload_read)
        os.set_blocking(reload_write, False)
        workers[pid] = slot
        channels[pid] = reload_write

    # Everything made so far (modules, the config) is shared with the
    # workers page by page until written to; the collector writes to every
    # object it examines, so it is told to leave these alone (gc.freeze),
    # and the pages stay shared instead of being copied into each worker.
    gc.freeze()
    for slot in range(config.policy.processes):
        spawn(slot)
    if metrics_dir:
        serve_metrics(config.metrics.listen, metrics_dir)
    status = 0
    running = True
    while running:
        wake.wait(0.5)
        wake.clear()
        while events:
            signum = events.pop(0)
            if signum in RELOAD_SIGNALS:
                try:
                    config = _load(path)
                except ConfigError as error:
                    log.error("reload refused, keeping the running config: %s", error)
                    continue
                log.info("reload: %s is valid; passing it to %d worker(s)",
                         config.source, len(channels))
                for pid, fd in channels.items():
                    if pid not in retiring and not send_config(fd, config):
                        log.error("policy worker %d does not take its reloads; "
                                  "stopping it to start another", pid)
                        retiring.add(pid)
                        os.kill(pid, signal.SIGTERM)
                if milter is not None and milter.poll() is None:
                    milter.send_signal(signal.SIGUSR1)
            else:
                running = False
        for pid in [pid for pid in workers if os.waitpid(pid, os.WNOHANG)[0]]:
            # Only our own pids: the milter child is Popen's to reap.
            slot = workers.pop(pid)
            os.close(channels.pop(pid))
            share.release(slot)
            if not running:
                continue
            if pid in retiring:
                # Stopped by us, not dead by itself: no count against the limit.
                retiring.discard(pid)
                spawn(slot)
                continue
            if not restarts.allow(time.monotonic()):
                log.critical("policy workers keep dying (%d in %.0f s); stopping",
                             restarts.limit + 1, restarts.window)
                running, status = False, EX_SOFTWARE
                break
            log.error("policy worker %d exited; starting another", pid)
            spawn(slot)
        if milter is not None and milter.poll() is not None and running:
            log.error("milter exited with status %s; stopping", milter.returncode)
            running, status = False, 1
    log.info("stopping: draining requests in flight")
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    # Our copies of the listening sockets go now: once the workers have
    # taken what is queued and closed theirs, a new client is refused at
    # once instead of waiting in a queue nobody reads until we exit.
    for listener in bound:
        listener.close()
    if milter is not None and milter.poll() is None:
        milter.terminate()
    deadline = time.monotonic() + config.policy.drain_timeout + 5
    while workers and time.monotonic() < deadline:
        for pid in list(workers):
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                del workers[pid]
                if code != 0:
                    status = status or 1
        time.sleep(0.05)
    for pid in workers:
        log.warning("policy worker %d did not stop in time; killing it", pid)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    status = status or _stop_milter(milter, config.milter.drain_timeout + 5)
    log.info("stopped")
    return status


def serve(path: str | None, config: Config, user: str | None = None,
          with_milter: bool = False) -> int:
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            log.critical("fatal: --user %s: no such user; create it, or name one "
                         "that exists (getent passwd)", user)
            return EX_NOUSER
    metrics_dir = prepare_metrics(config.metrics.listen, user)
    try:
        if config.policy.processes > 1:
            return _serve_prefork(path, config, user, with_milter, metrics_dir)
        if metrics_dir:
            serve_metrics(config.metrics.listen, metrics_dir)
        _use_fast_loop()
        return asyncio.run(_serve_single(path, config, user, with_milter))
    finally:
        cleanup_metrics(metrics_dir)
