"""Fixtures shared by the integration tests: the real DNS world, a real Redis."""
from __future__ import annotations

import pytest

from tests.integration.dnsworld import UnboundServer, start_unbound, write_config
from tests.integration.redisworld import RedisServer, start_redis


@pytest.fixture(scope="session")
def unbound(tmp_path_factory) -> UnboundServer:
    """unbound on 127.0.0.201 and a free port, serving the standard world."""
    server = start_unbound(tmp_path_factory.mktemp("unbound"))
    yield server
    server.stop()


@pytest.fixture
def policyd_config(tmp_path, unbound):
    """Path of a policyd config for the standard world, resolving through unbound."""
    return write_config(tmp_path, unbound)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """redis-server on 127.0.0.1 and a free port, for the whole run."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server) -> RedisServer:
    """The session's Redis, emptied for this test (and restarted if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server
