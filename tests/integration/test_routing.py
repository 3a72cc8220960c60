"""IPv4-only outbound routing end to end (issue 13): a real Postfix
delivering out through unbound to sinks on ::1 and 127.0.13.25, with
policyd's routing socketmap as its smtp_dns_reply_filter and
smtp_delivery_status_filter (contrib/postfix/main.cf.routing)."""
from __future__ import annotations

import shutil

import pytest

from tests.integration import routingworld as world


@pytest.fixture(scope="module")
def resolver():
    base = world.make_base()
    server = world.start_resolver(base / "unbound")
    resolv_conf = base / "resolv.conf"
    resolv_conf.write_text(f"nameserver {world.RESOLVER_ADDRESS}\n")
    resolv_conf.chmod(0o644)
    yield resolv_conf
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sinks():
    sinks = world.Sinks()
    sinks.start()
    yield sinks
    sinks.stop()


def routing_settings(port: int, **extra) -> dict:
    settings: dict = {"routing": {"listen": [f"inet:127.0.0.1:{port}"],
                                  "ipv4_only_domains": ["static.routing.test"]}}
    for section, values in extra.items():
        settings.setdefault(section, {}).update(values)
    return settings


@pytest.fixture
def outbound(resolver, sinks):
    """(postfix, routing process, sinks), started; stopped afterwards."""
    base = world.make_base()
    port = world.free_port()
    routing = world.RoutingProcess(base, routing_settings(port))
    postfix = world.OutboundPostfix(base / "postfix", resolver, sinks.port,
                                    f"inet:127.0.0.1:{port}")
    (base / "postfix").mkdir()
    try:
        routing.start()
        postfix.prepare()
        postfix.start()
        yield postfix, routing, sinks
    finally:
        postfix.stop()
        routing.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_gmail_refusal_over_ipv6_is_learned_and_retried_over_ipv4(outbound):
    postfix, routing, sinks = outbound
    recipient = "user@gmail.routing.test"
    queue_id = postfix.send(recipient)
    first, = postfix.outcome(queue_id, recipient)
    assert "status=deferred" in first, first
    assert "host mx.gmail.routing.test[::1] said: 550-5.7.1" in first
    assert "the next attempt goes over IPv4" in first
    assert sinks.v6.rcpts == [("gmail.routing.test", 550)] and sinks.v4.rcpts == []
    assert "learned ipv4-only mx.gmail.routing.test,gmail.routing.test" in routing.log()
    postfix.retry(queue_id)
    second = postfix.outcome(queue_id, recipient, count=2)[1]
    assert "status=sent" in second and "[127.0.13.25]" in second, second
    assert sinks.v6.rcpts == [("gmail.routing.test", 550)]
    assert sinks.v4.messages == [("sender@local.test", [recipient])]
    assert "status=bounced" not in postfix.log()
