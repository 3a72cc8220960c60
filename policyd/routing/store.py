"""The learned IPv4-only routes: in this process's memory (MemoryStore),
or in Redis (RedisStore, redis.url set) so that every process and host
shares them and a restart forgets nothing.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from ..state import SharedState, StateUnavailable

log = logging.getLogger("policyd.routing")

# A route read from Redis (or its absence) is kept this long before Redis
# is asked again: a delivery asks for each of its MX hosts' AAAA records,
# and a burst to one destination then costs one Redis command, not one per
# message.  Another host's learning reaches this one within this time.
READ_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class Route:
    """A destination (an MX host name, or a recipient domain) delivered to
    over IPv4 only until `expires` (Unix time)."""
    destination: str
    learned: float
    expires: float
    evidence: str       # what it was learned from, or "added by hand"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Route | None:
        """None for data that is not a route (another program's key)."""
        try:
            data = json.loads(text)
            return cls(str(data["destination"]), float(data["learned"]),
                       float(data["expires"]), str(data["evidence"]))
        except (ValueError, KeyError, TypeError):
            return None


class RouteStore(Protocol):
    """What the socketmap tables and `policyd routes` need of a backend."""

    def get(self, destination: str) -> Route | None: ...

    def cached(self, destination: str) -> Route | None | bool:
        """The answer without waiting for anything: a Route or None, or
        False when only get() can tell."""

    def add(self, route: Route) -> None: ...

    def forget(self, destination: str) -> bool: ...

    def routes(self) -> list[Route]: ...


class MemoryStore:
    """Routes in a dict, the oldest learned going first past `capacity`.

    Without Redis a route lives in the memory of the one process that
    serves the socketmap: forgotten at a restart, and not visible to
    `policyd routes`."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time):
        self.capacity, self.clock = capacity, clock
        self._routes: collections.OrderedDict[str, Route] = collections.OrderedDict()

    def get(self, destination: str) -> Route | None:
        route = self._routes.get(destination)
        if route is not None and route.expires <= self.clock():
            del self._routes[destination]
            return None
        return route

    def cached(self, destination: str) -> Route | None | bool:
        return self.get(destination)

    def add(self, route: Route) -> None:
        self._routes.pop(route.destination, None)
        self._routes[route.destination] = route
        while len(self._routes) > self.capacity:
            self._routes.popitem(last=False)

    def forget(self, destination: str) -> bool:
        return self._routes.pop(destination, None) is not None

    def routes(self) -> list[Route]:
        now = self.clock()
        return [route for route in self._routes.values() if route.expires > now]


class RedisStore:
    """Routes under `{redis.key_prefix}route:{destination}` as JSON, each
    key expiring with its route; this process's reads and learnings kept
    in memory as well (READ_CACHE_SECONDS, and the fallback).

    A lookup that Redis cannot answer (StateUnavailable) is answered from
    what this process learned or read lately, never with an error: a
    routing table that fails would defer every outbound delivery (Postfix
    defers when a DNS reply filter lookup fails)."""

    def __init__(self, state: SharedState, capacity: int,
                 clock: Callable[[], float] = time.time):
        self.state, self.clock = state, clock
        self.local = MemoryStore(capacity, clock)     # learned or read here
        # destination -> (monotonic time read, route or None)
        self._reads: collections.OrderedDict[str, tuple[float, Route | None]] = \
            collections.OrderedDict()
        self._capacity = capacity

    def key(self, destination: str) -> str:
        return self.state.key("route", destination)

    def cached(self, destination: str) -> Route | None | bool:
        read = self._reads.get(destination)
        if read is None or time.monotonic() - read[0] >= READ_CACHE_SECONDS:
            return False
        route = read[1]
        return route if route is None or route.expires > self.clock() else None

    def get(self, destination: str) -> Route | None:
        known = self.cached(destination)
        if known is not False:
            return known   # type: ignore[return-value]
        try:
            data = self.state.run(lambda client: client.get(self.key(destination)))
        except StateUnavailable:
            return self.local.get(destination)
        route = Route.from_json(data) if data is not None else None
        if route is not None and route.expires <= self.clock():
            route = None
        self._remember(destination, route)
        return route

    def _remember(self, destination: str, route: Route | None) -> None:
        self._reads.pop(destination, None)
        self._reads[destination] = (time.monotonic(), route)
        while len(self._reads) > self._capacity:
            self._reads.popitem(last=False)
        if route is not None:
            self.local.add(route)
        else:
            self.local.forget(destination)

    def add(self, route: Route) -> None:
        """Kept here at once; in Redis if it answers (else this process
        alone knows it: logged once per outage by SharedState)."""
        self.local.add(route)
        self._reads[route.destination] = (time.monotonic(), route)
        ttl = max(1, int(route.expires - self.clock()))
        try:
            self.state.run(lambda client: client.set(self.key(route.destination),
                                                     route.to_json(), ex=ttl))
        except StateUnavailable:
            pass

    def forget(self, destination: str) -> bool:
        self.local.forget(destination)
        self._reads.pop(destination, None)
        return bool(self.state.run(lambda client: client.delete(self.key(destination))))

    def routes(self) -> list[Route]:
        pattern = self.key("*")

        def read(client) -> list[Route]:
            keys = list(client.scan_iter(match=pattern, count=1000))
            values = client.mget(keys) if keys else []
            return [route for route in map(Route.from_json, filter(None, values))
                    if route is not None]
        now = self.clock()
        return sorted((route for route in self.state.run(read) if route.expires > now),
                      key=lambda route: route.destination)


def open_store(state: SharedState | None, capacity: int) -> RouteStore:
    """Redis when redis.url is set, else memory."""
    if state is not None and state.configured:
        return RedisStore(state, capacity)
    return MemoryStore(capacity)
