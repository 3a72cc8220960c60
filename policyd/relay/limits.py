"""Rate limits: GCRA counters in this process (LocalLimiter) or in Redis
(RedisLimiter), one atomic check-and-charge per recipient, and the
counters a recipient charges (counters).
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from ..model import IPAddress, LimitCheck, Network, normalize_address
from ..state import SharedState, StateUnavailable
from .settings import LimitOverride, LimitsConfig, Rate, RedisDown

log = logging.getLogger("policyd")

# A message's marker lives this long: no SMTP transaction lasts longer
# (Postfix's smtpd_timeout is 300 s per command).
MESSAGE_MARKER_SECONDS = 3600.0


@dataclass(frozen=True)
class Counter:
    """One counter to charge by one unit: messages or recipients of a key."""
    name: str            # "user.messages", "recipient_domain.recipients", ...
    key: str             # "alice", "192.0.2.0/24", "example.org"
    interval: float      # seconds one unit takes to come back: period / amount
    period: float
    marker: str = ""     # messages counters: the message's marker, charged once


@dataclass(frozen=True)
class Refusal:
    counter: Counter
    retry_after: float   # seconds
    first: bool          # the first refusal of this counter in its period: log it


def counters(config: LimitsConfig, login: str, address: IPAddress, sender_domain: str,
             recipient_domain: str, instance: str) -> tuple[Counter, ...]:
    """The counters one accepted recipient charges, by the config.

    A request charges several counters at once (per login, client network,
    sender and recipient domain; messages and recipients), all or nothing:
    a refused recipient charges nothing.  A message counts once per
    counter, however many recipients it has: its messages counters carry a
    marker (by Postfix's `instance`) and are charged only at the first
    recipient that is accepted, its recipients counters at every one.
    """
    found: list[Counter] = []
    message = f"{instance}" if instance else ""

    def add(dimension: str, key: str, rate: Rate, marker: str) -> None:
        if rate.messages:
            found.append(Counter(f"{dimension}.messages", key, rate.period / rate.messages,
                                 rate.period, marker))
        if rate.recipients:
            found.append(Counter(f"{dimension}.recipients", key,
                                 rate.period / rate.recipients, rate.period))

    address = normalize_address(address)
    if login:
        add("user", login.lower(), _override(config.overrides, login=login) or config.per_user,
            message)
    prefix = config.ipv6_prefix if address.version == 6 else config.ipv4_prefix
    network: Network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    add("client", str(network),
        _override(config.overrides, address=address) or config.per_client, message)
    if sender_domain:
        add("sender_domain", sender_domain, config.per_sender_domain, message)
    if recipient_domain:
        add("recipient_domain", recipient_domain, config.per_recipient_domain,
            f"{message}|{recipient_domain}" if message else "")
    return tuple(found)


def _override(overrides: tuple[LimitOverride, ...], login: str = "",
              address: IPAddress | None = None) -> Rate | None:
    for override in overrides:
        if login and any(user.casefold() == login.casefold() for user in override.users):
            return override.rate
        if address is not None and any(address.version == n.version and address in n
                                       for n in override.networks):
            return override.rate
    return None


class LocalLimiter:
    """GCRA counters in this process's memory, bounded by local_max_keys.

    GCRA (the generic cell rate algorithm, ITU-T I.371; "leaky bucket as a
    meter") keeps one number per counter, the theoretical arrival time
    (TAT) of the next unit.  A charge moves it on by period/amount; it is
    refused when the TAT would run more than a period ahead of now.  So a
    whole period's amount may come at once, and after that only as fast as
    it comes back, evenly: unlike counts in fixed windows, no boundary lets
    2x through.
    """

    def __init__(self, max_keys: int = 100000):
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._tats: dict[str, float] = {}      # counter -> TAT (monotonic seconds)
        self._markers: dict[str, float] = {}   # message marker -> expiry
        self._logged: dict[str, float] = {}    # counter -> end of its quiet period

    def charge(self, wanted: Sequence[Counter], now: float | None = None) -> Refusal | None:
        now = time.monotonic() if now is None else now
        with self._lock:
            news: list[tuple[str, float]] = []
            markers: list[str] = []
            for counter in wanted:
                if counter.marker:
                    if self._markers.get(counter.marker, 0.0) > now:
                        continue   # this message was counted already
                    markers.append(counter.marker)
                name = f"{counter.name}:{counter.key}"
                tat = max(self._tats.get(name, now), now) + counter.interval
                # A little slack for float sums: amount charges of period/amount
                # fit in one period exactly.
                if tat - now > counter.period * (1 + 1e-9):
                    first = self._logged.get(name, 0.0) <= now
                    if first:
                        self._logged[name] = now + counter.period
                    return Refusal(counter, tat - now - counter.period, first)
                news.append((name, tat))
            for name, tat in news:
                self._tats.pop(name, None)
                self._tats[name] = tat   # at the end: the dict stays in order of use
            for marker in markers:
                self._markers[marker] = now + MESSAGE_MARKER_SECONDS
            self._bound(now)
        return None

    def _bound(self, now: float) -> None:
        for table in (self._tats, self._markers, self._logged):
            if len(table) > self.max_keys:
                for name in [n for n, until in table.items() if until <= now]:
                    del table[name]
                while len(table) > self.max_keys:
                    # The least recently charged: the nearest to empty.
                    del table[next(iter(table))]


# KEYS: three per counter (TAT, message marker, log marker).  ARGV: three
# per counter (interval and period in microseconds, 1 if it has a message
# marker), then the marker's lifetime in milliseconds.  Returns {0} or
# {index of the refusing counter, retry after in microseconds, 1 if its
# first refusal this period}.  Numbers are doubles in Lua: microseconds
# since 1970 fit in 53 bits; string.format keeps them whole.
GCRA_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local n = #KEYS / 3
local charged = {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i - 2])
  local period = tonumber(ARGV[3 * i - 1])
  if ARGV[3 * i] == '1' and redis.call('EXISTS', KEYS[3 * i - 1]) == 1 then
    charged[i] = false
  else
    local stored = redis.call('GET', KEYS[3 * i - 2])
    local tat = stored and tonumber(stored) or now
    if tat < now then tat = now end
    tat = tat + interval
    if tat - now > period * (1 + 1e-9) then
      local first = redis.call('SET', KEYS[3 * i], '1', 'NX', 'PX',
                               math.max(1, math.ceil(period / 1000)))
      return {i, string.format('%.0f', tat - now - period), first and 1 or 0}
    end
    charged[i] = tat
  end
end
local marker_ms = tonumber(ARGV[#ARGV])
for i = 1, n do
  if charged[i] then
    redis.call('SET', KEYS[3 * i - 2], string.format('%.0f', charged[i]), 'PX',
               math.ceil((charged[i] - now) / 1000) + 1)
    if ARGV[3 * i] == '1' then
      redis.call('SET', KEYS[3 * i - 1], '1', 'PX', marker_ms)
    end
  end
end
return {0}
"""
GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()


class RedisLimiter:
    """The counters in Redis, shared by every process and host; while Redis
    does not answer (down, or slow past redis.timeout),
    limits.on_redis_down.

    The same GCRA as LocalLimiter's, in one Lua script (GCRA_SCRIPT:
    EVALSHA, one round trip, atomic across hosts) on Redis's clock, so
    hosts need not agree on the time; every key expires once its counter
    is back to empty.
    """

    def __init__(self, state: SharedState, on_down: RedisDown, fallback: LocalLimiter):
        self.state = state
        self.on_down = on_down
        self.fallback = fallback

    def charge(self, wanted: Sequence[Counter]) -> tuple[Refusal | None, str]:
        """The refusal if any, and where it was counted ("redis", or when
        Redis did not answer: "local-fallback", "unavailable")."""
        if not wanted:
            return None, "redis"
        keys: list[str] = []
        args: list[str | int] = []
        for counter in wanted:
            name = f"{counter.name}:{counter.key}"
            keys += [self.state.key("gcra", name),
                     self.state.key("msg", counter.marker or "-"),
                     self.state.key("logged", name)]
            args += [repr(counter.interval * 1e6), repr(counter.period * 1e6),
                     1 if counter.marker else 0]
        args.append(int(MESSAGE_MARKER_SECONDS * 1000))

        def script(client: redis.Redis) -> list:
            try:
                return client.evalsha(GCRA_SHA, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                # A new or restarted Redis: load it once, then EVALSHA again.
                client.script_load(GCRA_SCRIPT)
                return client.evalsha(GCRA_SHA, len(keys), *keys, *args)

        try:
            reply = self.state.run(script)
        except StateUnavailable:
            if self.on_down is RedisDown.LOCAL:
                return self.fallback.charge(wanted), "local-fallback"
            return None, "unavailable"
        index = int(reply[0])
        if not index:
            return None, "redis"
        return Refusal(wanted[index - 1], int(reply[1]) / 1e6, bool(int(reply[2]))), "redis"


def retry_seconds(refusal: Refusal) -> int:
    """Whole seconds to say in the reply: at least 1."""
    return max(1, math.ceil(refusal.retry_after))


def limit_check(refusal: Refusal, backend: str) -> LimitCheck:
    return LimitCheck(refusal.counter.name, refusal.counter.key, refusal.retry_after, backend)
