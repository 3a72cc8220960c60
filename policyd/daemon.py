"""`policyd serve`: the policy service's life: start, reload, stop."""
from __future__ import annotations

import asyncio
import logging
import signal

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


async def _serve(path: str | None, config: Config, user: str | None) -> int:
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

    def reload() -> None:
        try:
            new = reload_engine(path, server.engine)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
            return
        server.reload(new)
        log.info("reloaded config %s", new.config.source)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    await stopping.wait()
    log.info("stopping: draining requests in flight")
    await server.stop()
    log.info("stopped")
    return 0


def serve(path: str | None, config: Config, user: str | None = None) -> int:
    return asyncio.run(_serve(path, config, user))
