"""Adversarial tests against the real parts (issues 11, 12, 13): a
compromised login spelling someone else's address through a real Postfix
(XCLIENT LOGIN=) and through the milter as a client writes it, hostile
logins as Redis keys in a real redis-server, and a hostile remote MX whose
greeting quotes another host's refusal, delivered to by a real Postfix
through unbound and answered by policyd's routing socketmap.  The pure
logic of the same attacks is in tests/unit/test_attacks.py."""
from __future__ import annotations

import ipaddress
import shutil
import smtplib
import socketserver
import threading

import pytest
import yaml

from bench.milter_client import SMFIR_REPLYCODE
from policyd import config as config_module
from policyd.engine import Engine
from policyd.model import Action, Request
from policyd.routing.socketmap import encode_request
from policyd.routing.tables import DNS_TABLE
from policyd.runtime.engines import build_limiter
from tests.integration import routingworld as world
from tests.integration.dnsworld import write_config
from tests.integration.postfix import smtp_transaction, xtext
from tests.integration.test_milter import MilterProcess
from tests.integration.test_postfix import start_policyd  # noqa: F401 (a fixture)
from tests.integration.test_relay import ours, postfix_relay  # noqa: F401 (a fixture)
from tests.integration.test_routing import resolver  # noqa: F401 (a fixture)
from tests.unit.fakedns import standard_world

# --- a login sending as someone else, through Postfix ----------------------------------

STRANGER_CLIENT = {"ADDR": "198.51.100.99", "NAME": "[UNAVAILABLE]", "HELO": "laptop.example"}

# alice@own.example is alice's; bob owns bob@own.example and @bob.example.
# Each spelling is delivered as alice@own.example (or, for the comment,
# as whatever Postfix reads): none may leave under bob's login.
SPELLINGS_OF_ALICE = [
    "alice@own.example.", "ALICE@OWN.EXAMPLE", "alice+bob@own.example",
    "@bob.example:alice@own.example", "@bob.example,@own.example:alice@own.example",
    '"alice"@own.example', '"alice"@OWN.example.', "own.example!alice", "alice%own.example",
    "alice(bob@bob.example)@own.example", '"alice@own.example"',
]


def relay_settings(tmp_path) -> dict:
    regexp = tmp_path / "sender_login.re"
    # The login is the address itself (Dovecot with full addresses as
    # logins), the most common regexp map.
    regexp.write_text("/^(.*@users\\.example)$/ ${1}\n")
    return {"relay": {"enabled": True, "local_domains": ["own.example", "users.example"],
                      "senders": [{"login": "alice", "addresses": ["alice@own.example"]},
                                  {"login": "bob", "addresses": ["bob@own.example",
                                                                 "@bob.example"]}],
                      "sender_login_maps": [f"regexp:{regexp}"]}}


def test_a_login_spelling_someone_elses_address_through_postfix(postfix_relay, start_policyd,
                                                                tmp_path):
    start_policyd(postfix_relay, relay_settings(tmp_path))
    bob = {**STRANGER_CLIENT, "LOGIN": "bob"}
    for sender in SPELLINGS_OF_ALICE:
        transcript = smtp_transaction(postfix_relay.host, postfix_relay.port, bob, sender,
                                      ["x@target.example"], raw_mail_from=True)
        if transcript.mail[0] != 250:
            continue   # Postfix refused the syntax itself
        code, text = transcript.rcpts[0]
        assert code == 553 and ours(transcript.rcpts[0]), (sender, transcript.rcpts)
    # The control: bob as himself, and under his domain.
    for sender in ("bob@own.example", "anyone@bob.example", "bob+x@own.example"):
        transcript = smtp_transaction(postfix_relay.host, postfix_relay.port, bob, sender,
                                      ["x@target.example"], raw_mail_from=True)
        assert transcript.rcpts[0][0] == 250, (sender, transcript.rcpts)


def test_a_regexp_map_owner_cannot_be_widened_by_a_quoted_local_part(postfix_relay,
                                                                     start_policyd, tmp_path):
    # With `/^(.*@users\.example)$/ ${1}`, Postfix splits the substituted
    # result on commas and spaces: the sender "bob@bob.example,x"@users.example
    # (a quoted local part) came out owned by the login "bob@bob.example",
    # who could then send from users.example, a domain of ours, under any
    # local part.  Broken before senders.py split the result before $1.
    start_policyd(postfix_relay, relay_settings(tmp_path))
    login = {**STRANGER_CLIENT, "LOGIN": "bob@bob.example"}
    for sender in ('"bob@bob.example,x"@users.example', '"bob@bob.example ceo"@users.example'):
        transcript = smtp_transaction(postfix_relay.host, postfix_relay.port, login, sender,
                                      ["x@target.example"], raw_mail_from=True)
        assert transcript.mail[0] == 250, transcript.mail
        assert transcript.rcpts[0][0] == 553 and ours(transcript.rcpts[0]), \
            (sender, transcript.rcpts)
    own = smtp_transaction(postfix_relay.host, postfix_relay.port,
                           {**STRANGER_CLIENT, "LOGIN": "carol@users.example"},
                           "carol@users.example", ["x@target.example"])
    assert own.rcpts[0][0] == 250, own.rcpts


# --- the same through the milter, as the client wrote it ---------------------------------

@pytest.fixture
def relay_milter(tmp_path, unbound):
    listen = f"unix:{tmp_path / 'm.sock'}"
    settings = {**relay_settings(tmp_path), "milter": {"listen": listen}}
    milter = MilterProcess(tmp_path, write_config(tmp_path, unbound, yaml.safe_dump(settings)),
                           listen)
    yield milter
    milter.stop()


def milter_rcpt(milter, login: str, sender: str):
    client = milter.client()
    try:
        client.conninfo("[198.51.100.99]", "198.51.100.99")
        client.helo("laptop.example")
        client.mail(f"<{sender}>", macros={"{auth_authen}": login})
        return client.rcpt("<x@target.example>")
    finally:
        client.quit()


def test_a_login_spelling_someone_elses_address_through_the_milter(relay_milter):
    # The milter reads MAIL FROM as the client wrote it (quotes, comments,
    # routes): each spelling is refused as the policy service refuses it.
    for sender in SPELLINGS_OF_ALICE + ['"bob@bob.example,x"@users.example']:
        login = "bob@bob.example" if "users" in sender else "bob"
        reply = milter_rcpt(relay_milter, login, sender)
        assert reply.command == SMFIR_REPLYCODE and reply.smtp[0] == "553", (sender, reply)
    reply = milter_rcpt(relay_milter, "bob", "anyone@bob.example")
    assert reply.command != SMFIR_REPLYCODE, reply


# --- hostile logins as Redis keys ------------------------------------------------------

def test_hostile_logins_are_counters_of_their_own_in_redis(redis_db):
    settings = {
        "authserv_id": "mx.receiver.example",
        "redis": {"url": redis_db.url, "key_prefix": "attack:"},
        "relay": {"enabled": True, "local_domains": ["own.example"], "sender_ownership": "off"},
        "limits": {"enabled": True, "per_user": {"messages": 1, "period": 3600}},
    }
    config = config_module.parse(yaml.safe_dump(settings), "attack.yaml")
    engine = Engine(config, standard_world(), build_limiter(config))

    def rcpt(login, instance):
        return engine.decide(Request(client_address=ipaddress.ip_address("198.51.100.99"),
                                     helo="laptop", sender="a@own.example",
                                     recipient="x@target.example", instance=instance,
                                     sasl_username=login))
    # Logins spelled as another's key, with a newline, a glob, a Lua-ish
    # quote, and long: each is one counter of its own, in Redis, expiring.
    hostile = ["alice:x", "alice\n", "alice*", "alice']) return {0} --", "a" * 4000]
    for n, login in enumerate(hostile):
        decision = rcpt(login, f"h{n}")
        assert decision.action is Action.ACCEPT and decision.relay.limits_backend == "redis", \
            (login, decision.trace)
    assert rcpt("alice", "a1").action is Action.ACCEPT       # nobody used alice's up
    assert rcpt("alice", "a2").action is Action.DEFER
    assert rcpt("alice\n", "h9").action is Action.DEFER      # and each limit holds
    with redis_db.client() as client:
        keys = client.keys("attack:*")
        assert keys and all(0 < client.pttl(key) <= 3600 * 1000 for key in keys)


# --- a hostile remote MX teaching routes (issue 13) --------------------------------------

class _Greeter(socketserver.BaseRequestHandler):
    greeting = b""

    def handle(self):
        self.request.sendall(self.greeting)
        try:
            self.request.recv(1024)   # Postfix's QUIT, if it says it
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def test_a_greeting_quoting_another_hosts_refusal_teaches_nothing(resolver):  # noqa: F811
    # v4only.routing.test's MX has an IPv4 address only (127.0.13.25).  Its
    # server greets with a refusal that quotes a made-up IPv6 refusal by
    # mx.gmail.routing.test; smtp(8) reports "host mx.v4only.routing.test
    # [127.0.13.25] refused to talk to me: 554 host mx.gmail.routing.test
    # [::1] said: 550 5.7.25 ...".  Before the fix, policyd learned
    # mx.gmail.routing.test IPv4-only from it.
    fake = b"554 host mx.gmail.routing.test[::1] said: 550 5.7.25 no PTR record\r\n"
    handler = type("Greeter", (_Greeter,), {"greeting": fake})
    server = _Server((world.SINK_V4, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = world.make_base()
    port = world.free_port()
    routing = world.RoutingProcess(base, {"routing": {"listen": [f"inet:127.0.0.1:{port}"]}})
    postfix = world.OutboundPostfix(base / "postfix", resolver, server.server_address[1],
                                    f"inet:127.0.0.1:{port}")
    (base / "postfix").mkdir()
    try:
        routing.start()
        postfix.prepare()
        postfix.start()
        recipient = "user@v4only.routing.test"
        queue_id = postfix.send(recipient)
        line, = postfix.outcome(queue_id, recipient)
        assert "refused to talk to me: 554 host mx.gmail.routing.test[::1] said" in line, line
        assert "learned" not in routing.log(), routing.log()
        with routing.connect() as connection:
            connection.sendall(encode_request(DNS_TABLE,
                                              "mx.gmail.routing.test. 300 IN AAAA ::1"))
            assert connection.recv(100) == b"9:NOTFOUND ,"
    finally:
        postfix.stop()
        routing.stop()
        server.shutdown()
        server.server_close()
        shutil.rmtree(base, ignore_errors=True)


# --- a request policyd will not read is a request Postfix answers itself -----------------

def test_a_long_helo_name_does_not_switch_policyd_off(postfix_relay, start_policyd, tmp_path):
    # Postfix takes an SMTP command line of up to line_length_limit (2048)
    # octets, so a HELO name of 2043; the policy request's line
    # "helo_name=..." is then longer than policy.max_line_length (2048),
    # and a policy service that drops the connection leaves the recipient
    # to default_action=DUNNO (contrib/postfix/main.cf.relay): the login
    # sends as someone else, past every limit; on an MX, a stranger past
    # SPF.  The helo name is the client's to choose.  Broken: Postfix logs
    # "problem talking to server ...: Application error" and queues bob's
    # mail as alice@own.example.
    policyd = start_policyd(postfix_relay, relay_settings(tmp_path))
    for helo in ("h" * 2030 + ".example", "h." * 1021 + "x"):
        with smtplib.SMTP(postfix_relay.host, postfix_relay.port, timeout=60) as client:
            client.ehlo("xclient.test")
            code, _ = client.docmd("XCLIENT", " ".join(
                f"{name}={xtext(value)}" for name, value in {**STRANGER_CLIENT,
                                                             "LOGIN": "bob"}.items()))
            assert code == 220
            code, _ = client.ehlo(helo)   # the command line: 2048 octets with its CRLF
            assert code == 250
            assert client.mail("alice@own.example")[0] == 250
            code, text = client.rcpt("x@target.example")
        assert code != 250, (helo[:20], code, text, policyd.log()[-600:])
