"""IPv4-only outbound routing end to end (issue 13): a real Postfix
delivering out through unbound to sinks on ::1 and 127.0.13.25, with
policyd's routing socketmap as its smtp_dns_reply_filter and
smtp_delivery_status_filter (contrib/postfix/main.cf.routing)."""
from __future__ import annotations

import copy
import grp
import os
import pwd
import shutil
import signal
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
import yaml

from policyd.config import MilterConfig
from policyd.routing.socketmap import encode_request
from tests.integration import routingworld as world
from tests.integration.process_session import session_members


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


def test_a_unix_socketmap_named_from_the_queue_directory(resolver, sinks):
    """routing.listen on a UNIX socket below Postfix's queue directory
    (mode 0660, group postfix), named in main.cf relative to it, as a
    chrooted smtp(8) must: `socketmap:unix:policyd/routing.sock:...`."""
    base = world.make_base()
    postfix = world.OutboundPostfix(base / "postfix", resolver, sinks.port,
                                    "unix:policyd/routing.sock")
    (base / "postfix").mkdir()
    path = postfix.queue_dir / "policyd" / "routing.sock"
    settings = routing_settings(0)
    settings["routing"].update(listen=[f"unix:{path}"], socket_mode="0660",
                               socket_group="postfix")
    routing = world.RoutingProcess(base, settings)
    try:
        postfix.prepare()
        routing.start()
        postfix.start()
        info = path.stat()
        assert (info.st_gid, info.st_mode & 0o777) == (grp.getgrnam("postfix").gr_gid, 0o660)
        static = "user@static.routing.test"
        line, = postfix.outcome(postfix.send(static), static)
        assert "status=sent" in line and "[127.0.13.25]" in line, line
        gmail = "user@gmail.routing.test"
        line, = postfix.outcome(postfix.send(gmail), gmail)
        assert "status=deferred" in line and "the next attempt goes over IPv4" in line, line
        postfix.stop()
        assert routing.stop() == 0, routing.log()
        assert not path.exists(), "the socket is removed at the stop"
    finally:
        postfix.stop()
        routing.stop()
        shutil.rmtree(base, ignore_errors=True)


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


def ask(routing: world.RoutingProcess, table: str, key: str) -> bytes:
    """One socketmap lookup, as Postfix's smtp client makes it."""
    with routing.connect() as connection:
        connection.sendall(encode_request(table, key))
        return connection.recv(1000)


def rewrite(routing: world.RoutingProcess, change) -> None:
    """The config file of `routing`, changed by `change(settings)`."""
    settings = copy.deepcopy(routing.settings)
    change(settings)
    routing.config.write_text(yaml.safe_dump(settings, sort_keys=False))


def test_a_reload_makes_a_domain_ipv4_only_without_a_restart(outbound):
    """SIGHUP to `policyd serve` reaches the routing worker: a domain added
    to ipv4_only_domains goes over IPv4 from the next delivery on, by the
    same worker; a broken file is refused and the running config kept."""
    postfix, routing, sinks = outbound
    recipient = "user@ok6.routing.test"
    line, = postfix.outcome(postfix.send(recipient), recipient)
    assert "status=sent" in line and "[::1]" in line, line
    worker = routing.routing_worker()
    assert worker is not None
    rewrite(routing, lambda settings: settings["routing"]["ipv4_only_domains"].append(
        "ok6.routing.test"))
    routing.process.send_signal(signal.SIGHUP)
    world.wait_until(lambda: "routing: reloaded config" in routing.log(), 10, "the reload")
    line, = postfix.outcome(postfix.send(recipient), recipient)
    assert "status=sent" in line and "[127.0.13.25]" in line, line
    routing.config.write_text("routing: {learn: maybe}\n")
    routing.process.send_signal(signal.SIGHUP)
    world.wait_until(lambda: "reload refused" in routing.log(), 10, "the refusal")
    line, = postfix.outcome(postfix.send(recipient), recipient)
    assert "status=sent" in line and "[127.0.13.25]" in line, line
    assert sinks.v6.rcpts == [("ok6.routing.test", 250)]
    assert [to for _, to in sinks.v4.messages] == [[recipient], [recipient]]
    assert routing.routing_worker() == worker
    assert routing.stop() == 0 and routing.leftovers == [], routing.log()
    assert "Traceback" not in routing.log()


def test_reload_reaches_the_socketmap_and_a_broken_file_is_refused(resolver, tmp_path):
    """The same at the socketmap: the hosts and the domains of a reloaded
    config answer, a broken file changes nothing."""
    routing = world.RoutingProcess(tmp_path, routing_settings(world.free_port()))
    aaaa = "mx.later.example. 300 IN AAAA ::1"
    mx = "later.example. 300 IN MX 10 mx.later.example."
    try:
        routing.start()
        assert ask(routing, "dns-reply-filter", aaaa) == b"9:NOTFOUND ,"
        assert ask(routing, "dns-reply-filter", "mx.else.example. 300 IN AAAA ::1") \
            == b"9:NOTFOUND ,"

        def change(settings):
            settings["routing"]["ipv4_only_hosts"] = ["mx.else.example"]
            settings["routing"]["ipv4_only_domains"].append("later.example")
        rewrite(routing, change)
        routing.process.send_signal(signal.SIGHUP)
        world.wait_until(lambda: ask(routing, "dns-reply-filter", "mx.else.example. 300 IN "
                                     "AAAA ::1") == b"9:OK IGNORE,", 10, "the reload")
        # The domain's MX names the host; its AAAA records are then ignored.
        assert ask(routing, "dns-reply-filter", mx) == b"9:NOTFOUND ,"
        assert ask(routing, "dns-reply-filter", aaaa) == b"9:OK IGNORE,"
        routing.config.write_text("routing: {learn: maybe}\n")
        routing.process.send_signal(signal.SIGHUP)
        world.wait_until(lambda: "reload refused" in routing.log(), 10, "the refusal")
        assert ask(routing, "dns-reply-filter", aaaa) == b"9:OK IGNORE,"
        assert ask(routing, "dns-reply-filter", "mx.else.example. 300 IN AAAA ::1") \
            == b"9:OK IGNORE,"
    finally:
        assert routing.stop() == 0, routing.log()
    assert routing.leftovers == [], routing.log()
    assert "Traceback" not in routing.log()


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def policy_request(port: int) -> str:
    body = ("request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
            "client_address=192.0.2.50\nclient_name=unknown\nhelo_name=client.example\n"
            "sender=alice@sender.example\nrecipient=bob@local.test\n\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(body.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(4096)
            assert chunk, "the policy service closed the connection without a reply"
            reply += chunk
    return reply.decode()


def test_serve_replaces_a_killed_routing_worker_counts_and_stops(resolver, tmp_path):
    """`policyd serve` with metrics.listen: the routing counters on
    /metrics beside the policy ones; a killed routing worker is replaced
    (runtime.supervisor's restart budget) and its counts kept; SIGTERM
    stops every process with status 0."""
    metrics_port = world.free_port()
    routing = world.RoutingProcess(tmp_path, routing_settings(
        world.free_port(), metrics={"listen": f"127.0.0.1:{metrics_port}"}))
    static = "mx.static.routing.test. 300 IN AAAA ::1"
    try:
        routing.start()
        assert ask(routing, "dns-reply-filter", static) == b"9:OK IGNORE,"
        assert ask(routing, "delivery-status-filter", "5.1.1 user unknown") == b"9:NOTFOUND ,"
        assert policy_request(routing.policy_port).startswith("action=")
        text = metrics_text(metrics_port)
        assert 'policyd_routing_lookups_total{answer="OK",table="dns-reply-filter"} 1.0' \
            in text, text
        assert 'policyd_routing_lookups_total{answer="NOTFOUND",' \
            'table="delivery-status-filter"} 1.0' in text, text
        assert "policyd_decisions_total{" in text, text
        worker = routing.routing_worker()
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        world.wait_until(lambda: routing.answers()
                         and routing.routing_worker() not in (None, worker),
                         10, "another routing worker")
        assert f"routing worker {worker} was killed by SIGKILL; starting another" \
            in routing.log()
        assert ask(routing, "dns-reply-filter", static) == b"9:OK IGNORE,"
        assert 'policyd_routing_lookups_total{answer="OK",table="dns-reply-filter"} 2.0' \
            in metrics_text(metrics_port)
        # policy.processes (2) policy workers and the routing worker.
        assert len(routing.workers()) == 3
        routing.process.send_signal(signal.SIGTERM)
        assert routing.process.wait(world.STOP_TIMEOUT) == 0, routing.log()
    finally:
        routing.stop()
    assert routing.leftovers == [], routing.log()
    for port in (routing.address[1], routing.policy_port, metrics_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    assert "Traceback" not in routing.log()


def test_a_routing_worker_that_keeps_dying_stops_serve(resolver, tmp_path):
    """Past the restart budget (RESTART_LIMIT deaths in RESTART_WINDOW s)
    `policyd serve` stops, the policy service too, with EX_SOFTWARE."""
    from policyd.runtime.supervisor import RESTART_LIMIT
    routing = world.RoutingProcess(tmp_path, routing_settings(world.free_port()))
    try:
        routing.start()
        for _ in range(RESTART_LIMIT + 1):
            worker = world.wait_until(lambda: routing.answers() and routing.routing_worker(),
                                      10, "a routing worker")
            os.kill(worker, signal.SIGKILL)
            world.wait_until(lambda: routing.process.poll() is not None or
                             worker not in routing.workers(), 10, "the worker's end")
        assert routing.process.wait(world.STOP_TIMEOUT) == 70, routing.log()
    finally:
        routing.stop()
    assert routing.leftovers == [], routing.log()
    assert "routing worker keeps dying (6 in 60 s); stopping" in routing.log()
    assert "Traceback" not in routing.log()


def milter_negotiates(port: int) -> bool:
    """An SMFIC_OPTNEG answered by an SMFIC_OPTNEG (libmilter's protocol,
    version 6): the milter is up and speaks."""
    packet = b"O" + struct.pack(">III", 6, 0x1ff, 0x1fffff)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(struct.pack(">I", len(packet)) + packet)
        header = connection.recv(5)
    return len(header) == 5 and header[4:5] == b"O"


def uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {int(uid) for uid in status.split("\nUid:")[1].split("\n")[0].split()}


def test_serve_milter_runs_the_three_front_ends_together(resolver, tmp_path):
    """`policyd serve --milter --user` with routing.listen, as the Debian
    unit runs it: the policy service, the milter and the routing socketmap
    answer together, every process as that user; SIGTERM stops all three,
    status 0, nothing left over."""
    routing = world.RoutingProcess(tmp_path, routing_settings(world.free_port()), milter=True,
                                   user="nobody")
    nobody = pwd.getpwnam("nobody").pw_uid
    try:
        routing.start()
        # The supervisor, 2 policy workers, the routing worker, the milter
        # and its workers.
        expected = 4 + 1 + MilterConfig().workers
        members = world.wait_until(
            lambda: (lambda found: found if len(found) == expected else None)(
                session_members(routing.process.pid)), 10, f"{expected} processes")
        assert {pid: uids(pid) for pid in members} == {pid: {nobody} for pid in members}
        assert ask(routing, "dns-reply-filter", "mx.static.routing.test. 300 IN AAAA ::1") \
            == b"9:OK IGNORE,"
        assert policy_request(routing.policy_port).startswith("action=")
        assert milter_negotiates(routing.milter_port)
        routing.process.send_signal(signal.SIGTERM)
        assert routing.process.wait(world.STOP_TIMEOUT) == 0, routing.log()
    finally:
        routing.stop()
    assert routing.leftovers == [], routing.log()
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


def test_policyd_routes_takes_the_config_before_or_after_the_action(tmp_path):
    """`policyd routes list -c FILE`, as `dkim test -c FILE` is written,
    and `policyd routes -c FILE list`; a -c after the action wins."""
    import subprocess
    config = tmp_path / "policyd.yaml"
    config.write_text("routing: {ipv4_only_domains: [gmail.com]}\n")
    other = tmp_path / "other.yaml"
    other.write_text("routing: {ipv4_only_hosts: [mx.other.example]}\n")
    for argv in (["list", "-c", str(config)], ["-c", str(config), "list"],
                 ["-c", str(other), "list", "-c", str(config)]):
        result = subprocess.run(world.POLICYD + ["routes", *argv], cwd=world.REPO,
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout) == \
            (0, "static\tgmail.com\t(routing.ipv4_only_domains)\n"), (argv, result.stderr)
    result = subprocess.run(world.POLICYD + ["routes", "forget", "x.example", "-c", str(config)],
                            cwd=world.REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 69 and "set redis.url" in result.stderr, result.stderr
