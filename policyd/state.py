"""The Redis connection behind state shared by every process and host
(rate limits, learned routes): opened in the process that uses it, each
command bounded by `redis.timeout`, and a dead Redis left alone for a
while instead of costing every request its timeout."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from .config import RedisConfig

log = logging.getLogger("policyd")

T = TypeVar("T")

# After a failure, Redis is not asked again for this long: each request
# would otherwise wait redis.timeout for an answer that will not come.
RETRY_AFTER = 5.0


class StateUnavailable(Exception):
    """Redis did not answer; the caller applies its configured fallback."""


class SharedState:
    """One Redis client per process.

    redis-py's connection pool notices a fork (it compares the pid) and
    opens new connections in the child, so a SharedState made before the
    workers fork is safe to use in each of them.
    """

    def __init__(self, config: RedisConfig):
        self.config = config
        self.prefix = config.key_prefix
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._warned = False

    @property
    def configured(self) -> bool:
        return bool(self.config.url)

    def _connect(self) -> redis.Redis:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        self.config.url, socket_timeout=self.config.timeout,
                        socket_connect_timeout=self.config.timeout,
                        retry_on_timeout=False, health_check_interval=30)
        return self._client

    def run(self, command: Callable[[redis.Redis], T]) -> T:
        """command(client)'s result, or StateUnavailable within redis.timeout
        (twice that at most, for a connect and a command)."""
        if not self.configured:
            raise StateUnavailable("redis.url is not set")
        if time.monotonic() < self._down_until:
            raise StateUnavailable("redis was unavailable moments ago")
        try:
            result = command(self._connect())
        except (redis.RedisError, OSError) as error:
            self._down_until = time.monotonic() + RETRY_AFTER
            if not self._warned:
                # Once per outage: a log line per request would bury the log.
                log.warning("redis %s unavailable (%s); the configured fallback applies, "
                            "retried every %.0f s", self.config.url,
                            error.__class__.__name__, RETRY_AFTER)
                self._warned = True
            raise StateUnavailable(error.__class__.__name__) from None
        if self._warned:
            log.warning("redis %s available again", self.config.url)
            self._warned = False
        return result

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
