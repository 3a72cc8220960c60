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


def test_microsoft_450_is_learned_the_same_way(outbound):
    postfix, routing, sinks = outbound
    recipient = "user@ms.routing.test"
    queue_id = postfix.send(recipient)
    first, = postfix.outcome(queue_id, recipient)
    assert "status=deferred" in first and "450 4.7.25" in first, first
    assert "learned ipv4-only mx.ms.routing.test,ms.routing.test" in routing.log()
    postfix.retry(queue_id)
    second = postfix.outcome(queue_id, recipient, count=2)[1]
    assert "status=sent" in second and "[127.0.13.25]" in second, second
    assert sinks.v6.rcpts == [("ms.routing.test", 450)]


def test_what_is_no_ipv6_reverse_dns_refusal_is_untouched(outbound):
    postfix, routing, sinks = outbound
    # 550 5.1.1 over IPv6: bounces as ever, nothing learned.
    unknown = "nobody@unknown.routing.test"
    # Gmail's text over IPv4: bounces, nothing learned (IPv4 is no way out).
    v4only = "user@v4only.routing.test"
    # Accepted over IPv6: delivered there, as ever.
    ok6 = "user@ok6.routing.test"
    queue_ids = {recipient: postfix.send(recipient) for recipient in (unknown, v4only, ok6)}
    line, = postfix.outcome(queue_ids[unknown], unknown)
    assert "status=bounced" in line and "[::1] said: 550 5.1.1" in line, line
    line, = postfix.outcome(queue_ids[v4only], v4only)
    assert "status=bounced" in line and "[127.0.13.25] said: 550-5.7.1" in line, line
    assert "policyd" not in line
    line, = postfix.outcome(queue_ids[ok6], ok6)
    assert "status=sent" in line and "[::1]" in line, line
    assert "learned" not in routing.log()
    assert ("v4only.routing.test", 550) in sinks.v4.rcpts
    assert sinks.v6.messages == [("sender@local.test", [ok6])]


def test_a_static_ipv4_only_domain_never_sees_ipv6(outbound):
    postfix, routing, sinks = outbound
    recipient = "user@static.routing.test"
    queue_id = postfix.send(recipient)
    line, = postfix.outcome(queue_id, recipient)
    assert "status=sent" in line and "[127.0.13.25]" in line, line
    assert "static.routing.test" not in sinks.v6.domains()


def test_with_redis_a_route_survives_a_restart(resolver, sinks, redis_db, capsys):
    import argparse

    from policyd.routing import command
    base = world.make_base()
    port = world.free_port()
    settings = routing_settings(port, redis={"url": redis_db.url})
    routing = world.RoutingProcess(base, settings)
    postfix = world.OutboundPostfix(base / "postfix", resolver, sinks.port,
                                    f"inet:127.0.0.1:{port}")
    (base / "postfix").mkdir()
    try:
        routing.start()
        postfix.prepare()
        postfix.start()
        recipient = "user@gmail.routing.test"
        queue_id = postfix.send(recipient)
        first, = postfix.outcome(queue_id, recipient)
        assert "status=deferred" in first, first
        assert routing.stop() == 0
        routing.start()
        postfix.retry(queue_id)
        second = postfix.outcome(queue_id, recipient, count=2)[1]
        assert "status=sent" in second and "[127.0.13.25]" in second, second
        assert sinks.v6.rcpts == [("gmail.routing.test", 550)]
        capsys.readouterr()
        assert command.run(argparse.Namespace(config=str(routing.config),
                                              routes_action="list")) == 0
        listed = capsys.readouterr().out.splitlines()
        assert listed[0] == "static\tstatic.routing.test\t(routing.ipv4_only_domains)"
        learned = sorted(line.split("\t")[1] for line in listed[1:])
        assert learned == ["gmail.routing.test", "mx.gmail.routing.test"]
        assert "said: 550-5.7.1" in listed[1]
    finally:
        postfix.stop()
        routing.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_the_routing_worker_reloads_and_stops(tmp_path):
    """Under the supervisor (RoutingWorkers): SIGHUP passes a new config to
    the worker, a bad one is refused and the old kept, SIGTERM stops."""
    import signal
    import socket

    import yaml

    from policyd.routing.socketmap import encode_request
    port = world.free_port()
    routing = world.RoutingProcess(tmp_path, routing_settings(port))

    def ask(key: str) -> bytes:
        with socket.create_connection(routing.address, timeout=5) as connection:
            connection.sendall(encode_request("dns-reply-filter", key))
            return connection.recv(100)
    try:
        routing.start()
        assert ask("mx.later.example. 300 IN AAAA ::1") == b"9:NOTFOUND ,"
        settings = routing_settings(port)
        settings["routing"]["ipv4_only_hosts"] = ["later.example"]
        routing.config.write_text(yaml.safe_dump(settings))
        routing.process.send_signal(signal.SIGHUP)
        world.wait_until(lambda: ask("mx.later.example. 300 IN AAAA ::1") == b"9:OK IGNORE,",
                         10, "the reload")
        routing.config.write_text("routing: {learn: maybe}\n")
        routing.process.send_signal(signal.SIGHUP)
        world.wait_until(lambda: "reload refused" in routing.log(), 10, "the refusal")
        assert ask("mx.later.example. 300 IN AAAA ::1") == b"9:OK IGNORE,"
    finally:
        assert routing.stop() == 0, routing.log()
    assert "Traceback" not in routing.log()


def routes(config, *argv):
    """`policyd routes ARGV` through routing.command's own parser."""
    import argparse

    from policyd.routing import command
    parser = argparse.ArgumentParser(prog="policyd routes")
    parser.add_argument("-c", "--config")
    command.add_arguments(parser)
    return command.run(parser.parse_args(["-c", str(config), *argv]))


def test_routes_add_list_forget(tmp_path, redis_db, capsys):
    import yaml
    config = tmp_path / "policyd.yaml"
    config.write_text(yaml.safe_dump({"redis": {"url": redis_db.url},
                                      "routing": {"ipv4_only_hosts": ["aspmx.l.google.com"]}}))
    assert routes(config, "add", "MX.Example.NET.", "--ttl", "3600") == 0
    assert capsys.readouterr().out.startswith("added mx.example.net until ")
    assert routes(config, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "static\taspmx.l.google.com\t(routing.ipv4_only_hosts)"
    assert lines[1].startswith("learned\tmx.example.net\tuntil ")
    assert lines[1].endswith("\tadded by hand")
    assert routes(config, "add", "not a name") == 65
    assert routes(config, "forget", "mx.example.net") == 0
    assert routes(config, "forget", "mx.example.net") == 1
    assert capsys.readouterr().out == "forgot mx.example.net\n"
    assert routes(config, "list") == 0
    assert capsys.readouterr().out.splitlines()[1:] == []
    redis_db.stop()
    assert routes(config, "add", "mx.example.net") == 69
    assert "is unavailable" in capsys.readouterr().err


def test_routes_without_redis_say_where_the_routes_are(tmp_path, capsys):
    config = tmp_path / "policyd.yaml"
    config.write_text("routing: {ipv4_only: true}\n")
    assert routes(config, "list") == 0
    captured = capsys.readouterr()
    assert captured.out == "static\t*\t(routing.ipv4_only: all outbound mail)\n"
    assert "set redis.url" in captured.err
    assert routes(config, "forget", "x.example") == 69
