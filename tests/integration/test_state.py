"""policyd/state.py against a real redis-server: commands go through, a
dead Redis costs a bounded time and is then left alone, and it is used
again once it is back."""
from __future__ import annotations

import logging
import time

import pytest

from policyd import state
from policyd.config import RedisConfig
from policyd.state import SharedState, StateUnavailable


def test_commands_reach_redis_under_the_key_prefix(redis_db):
    shared = SharedState(RedisConfig(url=redis_db.url, key_prefix="t1:"))
    shared.run(lambda client: client.set(shared.key("a", "b"), "1"))
    with redis_db.client() as client:
        assert client.get("t1:a:b") == b"1"
    shared.close()


def test_no_url_is_unavailable_without_a_connection():
    shared = SharedState(RedisConfig())
    assert not shared.configured
    with pytest.raises(StateUnavailable):
        shared.run(lambda client: client.ping())


def test_a_dead_redis_is_bounded_then_left_alone_then_used_again(
        redis_db, monkeypatch, caplog):
    monkeypatch.setattr(state, "RETRY_AFTER", 0.5)
    shared = SharedState(RedisConfig(url=redis_db.url, timeout=0.2))
    assert shared.run(lambda client: client.ping())
    redis_db.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="policyd"):
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                shared.run(lambda client: client.ping())
            first = time.monotonic() - started
            started = time.monotonic()
            for _ in range(100):
                with pytest.raises(StateUnavailable):
                    shared.run(lambda client: client.ping())
            rest = time.monotonic() - started
        # A refused connection fails at once; the next 100 do not even try.
        assert first < 0.5
        assert rest < 0.05
        assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    finally:
        redis_db.start()
    time.sleep(0.6)
    assert shared.run(lambda client: client.ping())
    shared.close()


def test_an_unanswering_redis_costs_at_most_the_timeout(tmp_path):
    # A listening socket that never answers: the command waits redis.timeout.
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        shared = SharedState(RedisConfig(url=f"redis://127.0.0.1:{port}/0", timeout=0.3))
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            shared.run(lambda client: client.ping())
        assert 0.25 < time.monotonic() - started < 1.0
    finally:
        listener.close()
