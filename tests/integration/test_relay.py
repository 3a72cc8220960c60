"""Relay authorization and rate limits against real parts (issue 11): the
GCRA script in a real redis-server, two policy services sharing one Redis,
Redis going away and coming back, and Postfix end to end through XCLIENT."""
from __future__ import annotations

import ipaddress
import logging
import time

import pytest
import yaml

from policyd import config as config_module
from policyd import state
from policyd.config import RedisConfig
from policyd.engine import Engine
from policyd.model import Action, Request
from policyd.relay.limits import Counter, LocalLimiter, RedisLimiter
from policyd.relay.settings import RedisDown
from policyd.runtime.engines import build_limiter
from policyd.state import SharedState
from tests.unit.fakedns import standard_world


def unit(amount=4, period=2.0, key="alice", name="user.messages", marker=""):
    return Counter(name, key, period / amount, period, marker)


def redis_limiter(redis_db, on_down=RedisDown.LOCAL, timeout=0.25):
    shared = SharedState(RedisConfig(url=redis_db.url, timeout=timeout, key_prefix="t:"))
    return RedisLimiter(shared, on_down, LocalLimiter())


# --- the script in a real Redis ---------------------------------------------------

def test_the_window_boundary_burst_is_refused_in_redis(redis_db):
    limiter = redis_limiter(redis_db)
    assert [limiter.charge([unit()])[0] for _ in range(4)] == [None] * 4
    refusal, backend = limiter.charge([unit()])
    assert backend == "redis" and refusal is not None
    assert 0.3 < refusal.retry_after <= 0.5 and refusal.first
    # Fixed windows of 2 s would let a second burst of 4 through once the
    # window turns; GCRA lets through what has come back, one per 0.5 s.
    time.sleep(1.05)
    results = [limiter.charge([unit()])[0] for _ in range(4)]
    assert sum(r is None for r in results) == 2
    assert [r.first for r in results if r is not None] == [False, False]


def test_all_or_nothing_and_a_message_once_in_redis(redis_db):
    limiter = redis_limiter(redis_db)
    tight = unit(amount=1, period=60.0, key="t.example", name="recipient_domain.recipients")
    message = unit(amount=2, period=60.0, marker="m1")
    assert limiter.charge([message, tight])[0] is None
    refusal, _ = limiter.charge([message, tight])
    assert refusal.counter == tight
    for n in range(5):   # more recipients of message m1: the message counted once
        assert limiter.charge([message])[0] is None
    assert limiter.charge([unit(amount=2, period=60.0, marker="m2")])[0] is None
    assert limiter.charge([unit(amount=2, period=60.0, marker="m3")])[0] is not None


def test_every_key_expires(redis_db):
    limiter = redis_limiter(redis_db)
    limiter.charge([unit(amount=1, period=30.0, marker="m1")])
    limiter.charge([unit(amount=1, period=30.0, marker="m2")])   # refused: a log marker
    with redis_db.client() as client:
        keys = client.keys("t:*")
        assert len(keys) == 3, keys
        assert all(0 < client.pttl(key) <= 3600 * 1000 for key in keys)


def test_a_dead_redis_falls_back_to_local_counters_and_recovers(
        redis_db, monkeypatch, caplog):
    monkeypatch.setattr(state, "RETRY_AFTER", 0.3)
    limiter = redis_limiter(redis_db)
    assert limiter.charge([unit()]) == (None, "redis")
    redis_db.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="policyd"):
            started = time.monotonic()
            outcomes = [limiter.charge([unit()]) for _ in range(5)]
            elapsed = time.monotonic() - started
        # Bounded: a refused connection fails at once, then Redis is left alone.
        assert elapsed < 0.5
        assert [backend for _, backend in outcomes] == ["local-fallback"] * 5
        # The local counters hold the limit meanwhile: 4 of 5.
        assert [refusal is None for refusal, _ in outcomes] == [True] * 4 + [False]
        assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    finally:
        redis_db.start()
    time.sleep(0.35)
    with caplog.at_level(logging.WARNING, logger="policyd"):
        # Back: a fresh Redis (its script cache empty too) counts again.
        assert limiter.charge([unit()]) == (None, "redis")
    assert sum("available again" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("on_down, expected", [(RedisDown.ACCEPT, "unavailable"),
                                               (RedisDown.DEFER, "unavailable")])
def test_redis_down_accept_or_defer(redis_db, on_down, expected):
    limiter = redis_limiter(redis_db, on_down)
    redis_db.stop()
    try:
        assert limiter.charge([unit()]) == (None, expected)
    finally:
        redis_db.start()


def test_redis_down_defer_through_the_engine(redis_db):
    engine = limited_engine(redis_db, on_redis_down="defer")
    redis_db.stop()
    try:
        decision = engine.decide(relay_rcpt("alice", "m1"))
    finally:
        redis_db.start()
    assert decision.action is Action.DEFER
    assert (decision.reply.code, decision.reply.status) == ("451", "4.3.0")
    assert decision.rule == "limit.unavailable"


# --- two engines (two hosts) sharing one Redis --------------------------------------

def limited_engine(redis_db, **limits):
    settings = {
        "authserv_id": "mx.receiver.example",
        "redis": {"url": redis_db.url, "key_prefix": "relay-test:"},
        "relay": {"enabled": True, "local_domains": ["own.example"], "sender_ownership": "off"},
        "limits": {"enabled": True, "per_user": {"messages": 3, "period": 3600},
                   "per_recipient_domain": {"recipients": 100}, **limits},
    }
    config = config_module.parse(yaml.safe_dump(settings), "relay.yaml")
    return Engine(config, standard_world(), build_limiter(config))


def relay_rcpt(login, instance, recipient="x@target.example"):
    return Request(client_address=ipaddress.ip_address("198.51.100.99"), helo="laptop",
                   sender="a@own.example", recipient=recipient, instance=instance,
                   sasl_username=login)


def test_two_hosts_share_one_limit(redis_db):
    first, second = limited_engine(redis_db), limited_engine(redis_db)
    actions = [engine.decide(relay_rcpt("alice", f"m{n}")).action
               for n, engine in enumerate([first, second, first, second, first])]
    assert actions == [Action.ACCEPT] * 3 + [Action.DEFER] * 2
    refused = second.decide(relay_rcpt("alice", "m9"))
    assert refused.relay.limits_backend == "redis"
    assert refused.reply.text.startswith("Rate limit reached (user messages), try again in ")


def test_decide_cached_leaves_a_redis_charge_to_a_thread(redis_db):
    from policyd.dns import CacheMiss
    engine = limited_engine(redis_db)
    engine.resolver.cached_only = lambda function, *args: function(*args)   # all cached
    with pytest.raises(CacheMiss):
        engine.decide_cached(relay_rcpt("alice", "m1"))
    with redis_db.client() as client:
        assert client.keys("relay-test:*") == []   # nothing charged by the attempt


def test_the_thread_charges_only_and_decides_nothing_again(redis_db):
    # The miss carries the rest of the work: the charge, with the verdict
    # the event loop reached, so SPF, iprev and the relay check are not run
    # a second time in the pool's thread.
    from policyd.dns import CacheMiss
    engine = limited_engine(redis_db)
    engine.resolver.cached_only = lambda function, *args: function(*args)   # all cached
    with pytest.raises(CacheMiss) as caught:
        engine.decide_cached(relay_rcpt("alice", "m1"))
    assert caught.value.resume is not None
    checks = []
    engine._envelope = lambda request: checks.append(request)   # would decide again
    decision = caught.value.resume()
    assert checks == []
    assert decision.action is Action.ACCEPT and decision.relay.limits_backend == "redis"
    with redis_db.client() as client:
        assert client.keys("relay-test:*")


# --- Postfix end to end, with contrib/postfix/main.cf.relay --------------------------

from tests.integration.postfix import (CONTRIB, free_port, postfix_instance,  # noqa: E402
                                       smtp_transaction)
from tests.integration.test_postfix import start_policyd  # noqa: E402,F401 (a fixture)

# The test instance delivers target.example into its Maildir (the sink), so
# Postfix lets everyone send there; to policyd it is a remote domain (not
# in relay.local_domains), so every refusal of a stranger is policyd's.
POSTFIX_RELAY_SETTINGS = {
    "relay": {"enabled": True, "local_domains": ["own.example", "local.test"],
              "senders": [{"login": "alice", "addresses": ["alice@own.example"]},
                          {"login": "bob", "addresses": ["bob@own.example"]}]},
    "limits": {"enabled": True, "per_user": {"messages": 2, "period": 3600}},
}
STRANGER_CLIENT = {"ADDR": "198.51.100.99", "NAME": "[UNAVAILABLE]", "HELO": "stranger.example"}
ALICE = {**STRANGER_CLIENT, "LOGIN": "alice"}


@pytest.fixture(scope="module")
def postfix_relay():
    main_cf = (CONTRIB / "main.cf.relay").read_text(encoding="utf-8")
    yield from postfix_instance("tcp", False, f"inet:127.0.0.1:{free_port()}",
                                main_cf + "\nvirtual_mailbox_domains = "
                                "own.example local.test target.example\n")


def ours(reply: tuple[int, str]) -> bool:
    """A refusal policyd made: Postfix words a policy's reply at RCPT as
    `<address>: Recipient address rejected: TEXT`, its own relay refusal
    as `<address>: Relay access denied`."""
    return ": Recipient address rejected: " in reply[1]


def test_postfix_relay_host(postfix_relay, start_policyd):
    policyd = start_policyd(postfix_relay, POSTFIX_RELAY_SETTINGS)
    host, port = postfix_relay.host, postfix_relay.port

    # An authorized login relays as itself.
    first = smtp_transaction(host, port, ALICE, "alice@own.example", ["x@target.example"],
                             data="From: <alice@own.example>\nSubject: relayed\n\nHello.\n")
    assert first.rcpts == [(250, "2.1.5 Ok")], postfix_relay.log()
    assert first.queue_id and postfix_relay.delivered(first.queue_id)   # into the sink
    # A stranger is refused: no open relay.
    stranger = smtp_transaction(host, port, STRANGER_CLIENT, "a@other.example",
                                ["x@target.example"])
    assert stranger.rcpts[0][0] == 554 and stranger.rcpts[0][1].startswith("5.7.1 ")
    assert ours(stranger.rcpts[0]), stranger.rcpts
    # A login sending as someone else's address.
    spoof = smtp_transaction(host, port, ALICE, "bob@own.example", ["x@target.example"])
    assert spoof.rcpts[0] == (553, "5.7.1 <x@target.example>: Recipient address rejected: "
                                   "Sender address rejected: not owned by user alice")
    # Message 2 of 2 goes, the third is deferred with a time to retry.
    assert smtp_transaction(host, port, ALICE, "alice@own.example",
                            ["y@target.example"]).rcpts[0][0] == 250
    third = smtp_transaction(host, port, ALICE, "alice@own.example", ["z@target.example"])
    code, text = third.rcpts[0]
    assert code == 452 and text.startswith(
        "4.7.1 <z@target.example>: Recipient address rejected: Rate limit reached "
        "(user messages), try again in "), third.rcpts
    log = policyd.log()
    assert "rule=relay.denied" in log and "rule=relay.sender-not-owned" in log
    assert "rule=limit.user.messages" in log and "relay=sasl login=alice" in log


def test_each_recipient_of_a_message_is_judged(postfix_relay, start_policyd):
    # The policy service gives a message's decision to its later recipients;
    # a relay check must not: a stranger's first recipient is local (accepted),
    # the second relays and must be refused.
    start_policyd(postfix_relay, POSTFIX_RELAY_SETTINGS)
    transcript = smtp_transaction(postfix_relay.host, postfix_relay.port, STRANGER_CLIENT,
                                  "a@other.example", ["x@local.test", "x@target.example"])
    assert transcript.rcpts[0][0] == 250, transcript.rcpts
    assert transcript.rcpts[1][0] == 554 and ours(transcript.rcpts[1]), transcript.rcpts


# The open-relay battery (docs/protocols.md §6: nmap smtp-open-relay's forms
# and more), as a stranger sends them: none may be accepted.
OPEN_RELAY_FORMS = [
    "relaytest@target.example", "relaytest%target.example@own.example",
    "relaytest%target.example@[127.0.0.1]", '"relaytest@target.example"',
    '"relaytest%target.example"', '"relaytest@target.example"@own.example',
    "relaytest@target.example@own.example", "relaytest@target.example@[127.0.0.1]",
    "@own.example:relaytest@target.example", "@[127.0.0.1]:relaytest@target.example",
    "target.example!relaytest", "target.example!relaytest@own.example",
    "target.example!relaytest@[127.0.0.1]", "relaytest@[IPv6:2001:db8::1]",
    "relaytest@target.example.", "RELAYTEST@TARGET.EXAMPLE", "relaytest@[192.0.2.1]",
]


@pytest.mark.parametrize("sender", ["", "antispam@own.example", "antispam@[127.0.0.1]"])
def test_no_open_relay_form_is_accepted_from_a_stranger(postfix_relay, start_policyd, sender):
    start_policyd(postfix_relay, POSTFIX_RELAY_SETTINGS)
    for recipient in OPEN_RELAY_FORMS:
        transcript = smtp_transaction(postfix_relay.host, postfix_relay.port, STRANGER_CLIENT,
                                      sender, [recipient], raw_mail_from=True)
        if transcript.mail[0] != 250:
            continue
        # smtplib quotes nothing itself here: rcpt() sends <recipient> as given.
        code, text = transcript.rcpts[0]
        assert code == 554 and ours(transcript.rcpts[0]), (recipient, transcript.rcpts)


def test_every_open_relay_form_is_refused_by_policyd_alone():
    # Beside Postfix: the engine refuses each form itself, whatever Postfix's
    # own relay rules (the test Postfix delivers target.example itself).
    config = config_module.parse(yaml.safe_dump({"authserv_id": "mx.receiver.example",
                                                 **POSTFIX_RELAY_SETTINGS}), "r.yaml")
    engine = Engine(config, standard_world())
    from policyd.model import internal_form
    for recipient in OPEN_RELAY_FORMS:
        request = Request(client_address=ipaddress.ip_address("198.51.100.20"), helo="x",
                          sender="a@other.example", recipient=internal_form(recipient))
        decision = engine.decide(request)
        assert decision.rule == "relay.denied", (recipient, decision.trace)
