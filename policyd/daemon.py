"""`policyd serve`: the policy service's life: start, reload, stop."""
from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys

from . import config as config_module
from .config import Config, ConfigError
from .dns import Resolver
from .engine import Engine
from .service import drop_privileges, start_metrics

EX_UNAVAILABLE = 69   # sysexits.h: a listen address cannot be used

log = logging.getLogger("policyd")


def reload_engine(path: str | None, current: Engine) -> Engine:
    """Parse and validate everything first, then hand back a new engine.

    The DNS cache survives a reload when the DNS settings did not change.
    Raises ConfigError and leaves `current` untouched on a bad file.
    """
    resolved = config_module.resolve_path(path)
    config = config_module.load(resolved) if resolved else config_module.embedded()
    resolver = current.resolver if config.dns == current.config.dns else Resolver(config.dns)
    return Engine(config, resolver)


def _start_milter(path: str | None, user: str | None) -> subprocess.Popen:
    """The milter runs as a child process of its own: libmilter takes
    SIGHUP as "stop" and owns the signals of its process, so it cannot share
    one with the policy service's SIGHUP reload."""
    command = [sys.executable, "-m", "policyd", "milter"]
    if path:
        command += ["-c", path]
    if user:
        command += ["--user", user]
    return subprocess.Popen(command)


async def _watch_child(child: subprocess.Popen, stopping: asyncio.Event) -> None:
    while child.poll() is None and not stopping.is_set():
        await asyncio.sleep(0.5)
    if not stopping.is_set():
        log.error("milter exited with status %s; stopping", child.returncode)
        stopping.set()


async def _serve(path: str | None, config: Config, user: str | None,
                 with_milter: bool) -> int:
    from .policy.server import ListenError, PolicyServer
    engine = Engine(config, Resolver(config.dns))
    server = PolicyServer(engine)
    try:
        await server.start()
    except ListenError as error:
        log.critical("fatal: cannot listen: %s", error)
        return EX_UNAVAILABLE
    if user:
        drop_privileges(user)
    start_metrics(config.metrics.listen, engine.resolver)
    log.info("policy service on %s (config %s, dns %s, %s)",
             ", ".join(config.policy.listen), config.source,
             ",".join(engine.resolver.nameservers), engine.resolver.trust_reason)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    milter = _start_milter(path, user) if with_milter else None
    watcher = asyncio.create_task(_watch_child(milter, stopping)) if milter else None

    def reload() -> None:
        try:
            new = reload_engine(path, server.engine)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
            return
        server.reload(new)
        log.info("reloaded config %s", new.config.source)
        if milter is not None and milter.poll() is None:
            milter.send_signal(signal.SIGUSR1)   # the milter's reload signal

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    await stopping.wait()
    log.info("stopping: draining requests in flight")
    if milter is not None and milter.poll() is None:
        milter.terminate()
    await server.stop()
    status = 0
    if milter is not None:
        await watcher
        try:
            await asyncio.to_thread(milter.wait, config.milter.drain_timeout + 5)
        except subprocess.TimeoutExpired:
            milter.kill()
            milter.wait()
        status = 0 if milter.returncode in (0, -signal.SIGTERM) else 1
    log.info("stopped")
    return status


def serve(path: str | None, config: Config, user: str | None = None,
          with_milter: bool = False) -> int:
    return asyncio.run(_serve(path, config, user, with_milter))
