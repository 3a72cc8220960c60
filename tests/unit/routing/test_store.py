"""The Redis store when Redis is down: answers from this process's memory,
never an error (a failing DNS reply filter would defer all outbound mail)."""
import logging

from policyd.config import RedisConfig
from policyd.routing.settings import RoutingConfig
from policyd.routing.socketmap import Request, Status
from policyd.routing.store import RedisStore, Route, open_store, MemoryStore
from policyd.routing.tables import DNS_TABLE, IGNORE, STATUS_TABLE, Tables
from policyd.state import SharedState

GMAIL = ("5.7.1 host mx.dest.example[2001:db8::25] said: 550 5.7.1 does not meet IPv6 "
         "sending guidelines regarding PTR records (in reply to RCPT TO command)")


def dead_redis():
    # Port 1 on loopback: nothing listens, the connect is refused at once.
    return SharedState(RedisConfig(url="redis://127.0.0.1:1/0", timeout=0.05))


def test_backend_by_config():
    assert isinstance(open_store(None, 10), MemoryStore)
    assert isinstance(open_store(SharedState(RedisConfig()), 10), MemoryStore)
    assert isinstance(open_store(dead_redis(), 10), RedisStore)


def test_redis_down_learning_and_lookups_go_on(caplog):
    store = RedisStore(dead_redis(), 100)
    tables = Tables(RoutingConfig(), store)
    with caplog.at_level(logging.WARNING, "policyd"):
        assert tables.answer(Request(DNS_TABLE, "mx.dest.example. 1 IN AAAA ::1")).status \
            is Status.NOTFOUND
        reply = tables.answer(Request(STATUS_TABLE, GMAIL))
        assert reply.status is Status.OK and reply.data.startswith("4.7.1 ")
        store._reads.clear()   # past the read cache: Redis would be asked
        assert tables.answer(Request(DNS_TABLE, "mx.dest.example. 1 IN AAAA ::1")) == IGNORE
    # Said once per outage, not per lookup.
    assert caplog.text.count("unavailable") == 1


def test_a_route_from_another_program_is_ignored():
    assert Route.from_json(b'{"destination": "x", "learned": "a", "expires": 1, '
                           b'"evidence": ""}') is None
