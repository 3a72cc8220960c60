"""The two socketmap tables over the memory store: static routes, learning
from a refusal, the domain through its MX records, TTLs."""
import dataclasses

import pytest

from policyd.routing.settings import RoutingConfig
from policyd.routing.socketmap import NOTFOUND, Reply, Request, Status
from policyd.routing.store import MemoryStore, Route
from policyd.routing.tables import DNS_TABLE, IGNORE, STATUS_TABLE, Tables

GMAIL = ("5.7.1 host mx.dest.example[2001:db8::25] said: 550-5.7.1 [2001:db8::1] Our "
         "system has detected that this message does 550-5.7.1 not meet IPv6 sending "
         "guidelines regarding PTR records and 550-5.7.1 authentication. (in reply to "
         "RCPT TO command)")


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def tables_for(clock, **settings):
    config = dataclasses.replace(RoutingConfig(), **settings)
    return Tables(config, MemoryStore(100, clock), clock=clock)


def dns(tables, record):
    return tables.answer(Request(DNS_TABLE, record))


def status(tables, text):
    return tables.answer(Request(STATUS_TABLE, text))


def test_nothing_configured_changes_nothing(clock):
    tables = tables_for(clock)
    assert dns(tables, "mx.dest.example. 300 IN AAAA 2001:db8::25") == NOTFOUND
    assert dns(tables, "dest.example. 300 IN MX 10 mx.dest.example.") == NOTFOUND
    assert status(tables, "2.0.0 host mx.dest.example[2001:db8::25] said: 250 ok") == NOTFOUND


def test_unknown_table_is_perm(clock):
    assert tables_for(clock).answer(Request("other", "x")) == \
        Reply(Status.PERM, "unknown map name")


def test_static_all(clock):
    tables = tables_for(clock, ipv4_only=True)
    assert dns(tables, "anything.example. 300 IN AAAA 2001:db8::25") == IGNORE
    # Only AAAA records: A, MX and TLSA records pass.
    assert dns(tables, "anything.example. 300 IN A 192.0.2.25") == NOTFOUND
    assert dns(tables, "dest.example. 300 IN MX 10 mx.dest.example.") == NOTFOUND
    assert dns(tables, "_25._tcp.mx.example. 300 IN TLSA 3 1 1 ab") == NOTFOUND


def test_static_host(clock):
    tables = tables_for(clock, ipv4_only_hosts=("google.com",))
    assert dns(tables, "ALT1.aspmx.l.Google.com. 300 IN AAAA 2001:db8::25") == IGNORE
    assert dns(tables, "notgoogle.com. 300 IN AAAA 2001:db8::25") == NOTFOUND


def test_static_domain_through_its_mx(clock):
    tables = tables_for(clock, ipv4_only_domains=("dest.example",))
    host = "mx.provider.example"
    assert dns(tables, f"{host}. 300 IN AAAA 2001:db8::25") == NOTFOUND
    assert dns(tables, f"dest.example. 300 IN MX 10 {host}.") == NOTFOUND
    assert dns(tables, f"{host}. 300 IN AAAA 2001:db8::25") == IGNORE
    # The domain itself (no MX: its own address records) and names below it.
    assert dns(tables, "dest.example. 300 IN AAAA 2001:db8::25") == IGNORE
    assert dns(tables, "mx.dest.example. 300 IN AAAA 2001:db8::25") == IGNORE
    # What an MX record said is kept for an hour at most.
    clock.now += 3601
    assert dns(tables, f"{host}. 300 IN AAAA 2001:db8::25") == NOTFOUND


def test_learning_from_a_refusal(clock):
    tables = tables_for(clock)
    # The delivery's lookups: the domain's MX, then the host's addresses.
    assert dns(tables, "dest.example. 300 IN MX 10 mx.dest.example.") == NOTFOUND
    assert dns(tables, "mx.dest.example. 300 IN AAAA 2001:db8::25") == NOTFOUND
    reply = status(tables, GMAIL)
    assert reply.status is Status.OK
    assert reply.data.startswith("4.7.1 host mx.dest.example[2001:db8::25] said: 550-5.7.1")
    assert dns(tables, "mx.dest.example. 300 IN AAAA 2001:db8::25") == IGNORE
    assert dns(tables, "mx.dest.example. 300 IN A 192.0.2.25") == NOTFOUND
    # The recipient domain was learned too: another MX host of it is IPv4-only.
    assert {route.destination for route in tables.store.routes()} == \
        {"mx.dest.example", "dest.example"}
    assert dns(tables, "dest.example. 300 IN MX 20 mx2.dest.example.") == NOTFOUND
    assert dns(tables, "mx2.dest.example. 300 IN AAAA 2001:db8::26") == IGNORE
    route = tables.store.get("mx.dest.example")
    assert route.expires == clock.now + 30 * 86400
    assert "mx.dest.example[2001:db8::25] said: 550-5.7.1" in route.evidence


def test_learned_routes_expire(clock):
    tables = tables_for(clock, learned_ttl=3600)
    status(tables, GMAIL)
    assert dns(tables, "mx.dest.example. 300 IN AAAA 2001:db8::25") == IGNORE
    clock.now += 3601
    assert dns(tables, "mx.dest.example. 300 IN AAAA 2001:db8::25") == NOTFOUND


def test_refusal_over_ipv4_learns_nothing(clock):
    tables = tables_for(clock)
    assert status(tables, GMAIL.replace("[2001:db8::25]", "[192.0.2.25]")) == NOTFOUND
    assert tables.store.routes() == []


def test_learning_off(clock):
    tables = tables_for(clock, learn=False)
    assert status(tables, GMAIL) == NOTFOUND
    assert tables.store.routes() == []


def test_no_route_for_an_address_next_hop(clock):
    tables = tables_for(clock)
    text = GMAIL.replace("mx.dest.example[", "2001:db8::25[")
    assert status(tables, text) == NOTFOUND


def test_answer_now_leaves_learning_to_a_thread(clock):
    tables = tables_for(clock)
    assert tables.answer_now(Request(STATUS_TABLE, GMAIL)) is None
    assert tables.store.routes() == []
    assert tables.answer_now(Request(DNS_TABLE, "a. 1 IN AAAA ::1")) == NOTFOUND


def test_reload_keeps_what_was_learned(clock):
    tables = tables_for(clock)
    status(tables, GMAIL)
    again = tables.reconfigured(dataclasses.replace(tables.config, ipv4_only_hosts=("x.example",)))
    assert dns(again, "mx.dest.example. 300 IN AAAA 2001:db8::25") == IGNORE
    assert dns(again, "x.example. 300 IN AAAA 2001:db8::25") == IGNORE


@pytest.mark.parametrize("record", ["", "a", "a b c d", "a 1 CH AAAA ::1",
                                    "dest.example. 300 IN MX 0 .", "x. y IN MX 1 h."])
def test_odd_dns_records(clock, record):
    assert dns(tables_for(clock), record) == NOTFOUND


def test_memory_store_bounds(clock):
    store = MemoryStore(2, clock)
    for name in ("a", "b", "c"):
        store.add(Route(name, clock.now, clock.now + 10, "e"))
    assert [route.destination for route in store.routes()] == ["b", "c"]
    assert store.forget("b") and not store.forget("b")


def test_route_json():
    route = Route("mx.example", 1.0, 2.0, "host said: x")
    assert Route.from_json(route.to_json()) == route
    assert Route.from_json(b"not json") is None
    assert Route.from_json('{"destination": "x"}') is None


def test_the_learning_log_line(clock, caplog):
    tables = tables_for(clock)
    with caplog.at_level("INFO", "policyd.routing"):
        status(tables, GMAIL.replace("authentication.", 'authen"tica\ntion.'))
    line, = [record.getMessage() for record in caplog.records]
    assert line.startswith("routing: learned ipv4-only mx.dest.example for 2592000 s: "
                           "host=mx.dest.example address=2001:db8::25 status=5.7.1 matched=")
    assert line.endswith('reply="550-5.7.1 [2001:db8::1] Our system has detected that this '
                         'message does 550-5.7.1 not meet IPv6 sending guidelines regarding PTR '
                         'records and 550-5.7.1 authen?tica?tion."')


METRICS_CHECK = """
import sys
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from policyd.routing.settings import RoutingConfig
from policyd.routing.socketmap import Request
from policyd.routing.store import MemoryStore
from policyd.routing.tables import DNS_TABLE, STATUS_TABLE, RoutingMetrics, Tables
tables = Tables(RoutingConfig(), MemoryStore(100), RoutingMetrics.if_enabled())
tables.answer(Request(STATUS_TABLE, sys.argv[2]))
tables.answer(Request(DNS_TABLE, "mx.dest.example. 300 IN AAAA 2001:db8::25"))
registry = CollectorRegistry()
MultiProcessCollector(registry, sys.argv[1])
print(registry.get_sample_value("policyd_routing_learned_total", {"matched": "pattern"}),
      registry.get_sample_value("policyd_routing_lookups_total",
                                {"table": "dns-reply-filter", "answer": "OK"}),
      registry.get_sample_value("policyd_routing_lookups_total",
                                {"table": "delivery-status-filter", "answer": "OK"}))
"""


def test_metrics(tmp_path):
    # prometheus-client picks its multiprocess mode when first imported:
    # a process of its own, started with the variable set as policyd's are.
    import os
    import subprocess
    import sys

    from policyd.service import MULTIPROC_ENV
    result = subprocess.run([sys.executable, "-c", METRICS_CHECK, str(tmp_path), GMAIL],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, MULTIPROC_ENV: str(tmp_path)})
    assert result.stdout.split() == ["1.0", "1.0", "1.0"], result.stderr


def test_no_metrics_without_the_directory(monkeypatch):
    from policyd.routing.tables import RoutingMetrics
    from policyd.service import MULTIPROC_ENV
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    assert RoutingMetrics.if_enabled() is None
