"""The one way a config file becomes a Config, and a Config an Engine."""
from __future__ import annotations

from .. import config as config_module
from ..config import Config
from ..dns import Resolver
from ..engine import Engine
from ..relay.limits import LocalLimiter, RedisLimiter
from ..state import SharedState


def load_config(path: str | None) -> Config:
    """The file named, else /etc/policyd/policyd.yaml if present, else the
    embedded default.  Raises ConfigError."""
    resolved = config_module.resolve_path(path)
    return config_module.load(resolved) if resolved else config_module.embedded()


def build_limiter(config: Config) -> LocalLimiter | RedisLimiter | None:
    """Where rate limits count: nowhere when they are off (no Redis
    connection, no cost), in this process without redis.url, else in Redis
    with this process's counters as its fallback (limits.on_redis_down)."""
    if not config.limits.enabled:
        return None
    local = LocalLimiter(config.limits.local_max_keys)
    if not config.redis.url:
        return local
    return RedisLimiter(SharedState(config.redis), config.limits.on_redis_down, local)


def build_engine(config: Config) -> Engine:
    return Engine(config, Resolver(config.dns), build_limiter(config))


def engine_for(config: Config, current: Engine) -> Engine:
    """An engine for a reloaded `config`: the DNS cache survives when the
    DNS settings did not change, the rate limits' counters (and the Redis
    connection) when the limits and Redis settings did not."""
    resolver = current.resolver if config.dns == current.config.dns else Resolver(config.dns)
    limiter = current.relay.limiter if current.relay is not None else None
    if limiter is None or (config.limits, config.redis) != (current.config.limits,
                                                          current.config.redis):
        limiter = build_limiter(config)
    return Engine(config, resolver, limiter)


def reload_engine(path: str | None, current: Engine) -> Engine:
    """Parse and validate everything first, then hand back a new engine.
    Raises ConfigError and leaves `current` untouched on a bad file."""
    return engine_for(load_config(path), current)
