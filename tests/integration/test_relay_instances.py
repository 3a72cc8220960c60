"""Two `policyd serve` processes sharing one real redis-server (issue 11,
"Done when"): one rate limit held across both, then Redis killed mid-test
(each process falls back to its own counters, says so once, counts it in
/metrics) and started again (each says it is back once; the shared limit
holds again).  Requests go over TCP as Postfix sends them at RCPT."""
from __future__ import annotations

import collections
import re
import time
import urllib.request

import pytest

from policyd import state
from tests.integration.postfix import free_port
from tests.integration.test_policy_server import PolicyClient, policy_request
from tests.integration.test_postfix import start_policyd  # noqa: F401 (a fixture)

LIMIT = 3   # limits.per_user.messages
KEY_PREFIX = "two-instances:"
WARNING = re.compile(r"^policyd\[(\d+)\]: WARNING: redis \S+ unavailable", re.M)
AGAIN = re.compile(r"^policyd\[(\d+)\]: WARNING: redis \S+ available again", re.M)
DECIDED = re.compile(r"^policyd\[(\d+)\]: INFO: .*login=alice", re.M)


def settings(redis_url: str, metrics_port: int) -> dict:
    return {
        "log_level": "info",     # a decision line per request: which process decided
        "redis": {"url": redis_url, "key_prefix": KEY_PREFIX},
        "relay": {"enabled": True, "local_domains": ["own.example"],
                  "senders": [{"login": "alice", "addresses": ["alice@own.example"]}]},
        "limits": {"enabled": True, "per_user": {"messages": LIMIT, "period": 3600}},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }


class Instance:
    """One policyd serve process, one persistent Postfix-like connection to
    it (so one of its workers decides all of this test's requests)."""

    def __init__(self, process, port: int, metrics_port: int):
        self.process, self.metrics_port = process, metrics_port
        self.client = PolicyClient(f"inet:127.0.0.1:{port}")
        self.messages = 0

    def relay(self) -> str:
        """A new message of alice's, relayed to a remote domain."""
        self.messages += 1
        return self.client.ask(
            client_address="198.51.100.99", helo_name="laptop.example",
            sender="alice@own.example", recipient="x@target.example",
            sasl_method="PLAIN", sasl_username="alice",
            instance=f"{id(self):x}.{time.monotonic_ns():x}.{self.messages}")

    def charges(self, backend: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        found = re.search(r'^policyd_limit_charges_total\{backend="%s"\} (\S+)$'
                          % re.escape(backend), text, re.M)
        return float(found.group(1)) if found else 0.0

    def log(self) -> str:
        return self.process.log()


@pytest.fixture
def instances(redis_db, start_policyd):  # noqa: F811 (the fixture imported above)
    started = []
    for _ in range(2):
        port, metrics_port = free_port(), free_port()
        process = start_policyd(f"inet:127.0.0.1:{port}",
                                settings(redis_db.url, metrics_port))
        started.append(Instance(process, port, metrics_port))
    yield started
    for instance in started:
        instance.client.close()


def alternately(instances: list[Instance], count: int) -> list[str]:
    """`count` messages, sent to the instances in turn; the reply codes."""
    return [instances[n % 2].relay().split(None, 1)[0] for n in range(count)]


def deferred(reply_codes: list[str]) -> list[bool]:
    return [code == "452" for code in reply_codes]


def test_two_instances_share_a_limit_and_survive_redis_going_away(redis_db, instances):
    first, second = instances
    assert first.process.process.pid != second.process.process.pid

    # One limit across both: the 4th message and later are refused,
    # whichever instance gets them (each alone would have accepted 3).
    codes = alternately(instances, 2 * LIMIT)
    assert deferred(codes) == [False] * LIMIT + [True] * LIMIT, codes
    assert codes[:LIMIT] == ["DUNNO"] * LIMIT, codes
    reply = first.relay()
    assert re.fullmatch(r"452 4\.7\.1 Rate limit reached \(user messages\), "
                        r"try again in \d+ s", reply), reply
    with redis_db.client() as client:
        assert client.keys(f"{KEY_PREFIX}gcra:user.messages:alice") != []
    assert first.charges("redis") > 0 and second.charges("redis") > 0

    # Redis goes away: each process counts on its own (LIMIT each), says so
    # once, and counts the fallback in its metric.
    redis_db.stop()
    try:
        outage_started = time.monotonic()
        codes = alternately(instances, 2 * LIMIT + 4)
        # Bounded: a refused connection fails at once, then Redis is left alone.
        assert time.monotonic() - outage_started < 5
        assert deferred(codes) == [False] * (2 * LIMIT) + [True] * 4, codes
        for instance in instances:
            assert instance.charges("local-fallback") == LIMIT + 2
            log = instance.log()
            warnings = collections.Counter(WARNING.findall(log))
            deciders = set(DECIDED.findall(log))
            # One warning per process that decided during the outage, not per request.
            assert len(warnings) == 1 and set(warnings.values()) == {1}, log
            assert set(warnings) <= deciders, log
            assert "Traceback" not in log
    finally:
        redis_db.start()   # the same port, empty (nothing saved)

    # A process leaves a dead Redis alone for state.RETRY_AFTER seconds.
    time.sleep(state.RETRY_AFTER + 0.5)
    codes = alternately(instances, 2 * LIMIT + 2)
    assert deferred(codes) == [False] * LIMIT + [True] * (LIMIT + 2), codes
    for instance in instances:
        log = instance.log()
        again = collections.Counter(AGAIN.findall(log))
        assert list(again.values()) == [1], log
        assert set(again) == set(WARNING.findall(log)), log
        assert "Traceback" not in log
    # The fallback counted nothing more once Redis was back.
    assert first.charges("local-fallback") == second.charges("local-fallback") == LIMIT + 2
    with redis_db.client() as client:
        assert client.keys(f"{KEY_PREFIX}gcra:user.messages:alice") != []
