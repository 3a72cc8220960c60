"""relay/limits.py: GCRA in this process, and limits through the engine."""
from __future__ import annotations

import ipaddress
import logging

import pytest
import yaml

from policyd import config as config_module
from policyd.engine import Engine
from policyd.model import Action, Request
from policyd.relay.limits import Counter, LocalLimiter, counters
from policyd.relay.settings import LimitsConfig, Rate
from tests.unit.fakedns import standard_world


def unit(name="user.messages", key="alice", amount=4, period=60.0, marker=""):
    return Counter(name, key, period / amount, period, marker)


def test_a_burst_of_the_whole_amount_then_an_even_rate():
    limiter = LocalLimiter()
    for _ in range(4):
        assert limiter.charge([unit()], now=1000.0) is None
    refusal = limiter.charge([unit()], now=1000.0)
    assert refusal is not None and refusal.retry_after == pytest.approx(15.0)
    assert limiter.charge([unit()], now=1014.9) is not None
    assert limiter.charge([unit()], now=1015.0) is None


def test_the_window_boundary_burst_is_refused():
    # Fixed windows of 60 s would let 4 through at 59 s and 4 more at 61 s:
    # 8 in 2 seconds.  GCRA lets through what came back in those 2 s: none.
    limiter = LocalLimiter()
    assert all(limiter.charge([unit()], now=59.0) is None for _ in range(4))
    allowed = sum(limiter.charge([unit()], now=61.0) is None for _ in range(4))
    assert allowed == 0
    # Half a period later, half the amount.
    allowed = sum(limiter.charge([unit()], now=89.0) is None for _ in range(4))
    assert allowed == 2


def test_all_or_nothing():
    limiter = LocalLimiter()
    tight = unit("recipient_domain.recipients", "x.example", amount=1)
    assert limiter.charge([unit(), tight], now=0.0) is None
    refusal = limiter.charge([unit(), tight], now=0.0)
    assert refusal is not None and refusal.counter == tight
    # The refused request charged nothing: 3 more fit the user's 4.
    assert all(limiter.charge([unit()], now=0.0) is None for _ in range(3))
    assert limiter.charge([unit()], now=0.0) is not None


def test_a_message_counts_once_per_marker():
    limiter = LocalLimiter()
    for _ in range(10):   # ten recipients of one message
        assert limiter.charge([unit(amount=2, marker="m1")], now=0.0) is None
    assert limiter.charge([unit(amount=2, marker="m2")], now=0.0) is None
    assert limiter.charge([unit(amount=2, marker="m3")], now=0.0) is not None


def test_first_refusal_per_period_only():
    limiter = LocalLimiter()
    limiter.charge([unit(amount=1)], now=0.0)
    firsts = [limiter.charge([unit(amount=1)], now=t).first for t in (1.0, 2.0, 30.0)]
    assert firsts == [True, False, False]
    assert limiter.charge([unit(amount=1)], now=61.5) is None
    assert limiter.charge([unit(amount=1)], now=61.6).first is True   # the next period


def test_memory_is_bounded():
    limiter = LocalLimiter(max_keys=1000)
    for n in range(5000):
        limiter.charge([unit(key=f"k{n}", marker=f"m{n}")], now=float(n))
    assert len(limiter._tats) <= 1000 and len(limiter._markers) <= 1000


def test_counters_by_dimension():
    config = LimitsConfig(enabled=True, per_user=Rate(10, 100), per_client=Rate(messages=5),
                          per_sender_domain=Rate(recipients=50),
                          per_recipient_domain=Rate(3, 30, 60.0), ipv6_prefix=64)
    found = counters(config, "Alice", ipaddress.ip_address("2001:db8:1:2:3::9"),
                     "own.example", "target.example", "inst1")
    assert [(c.name, c.key, c.marker) for c in found] == [
        ("user.messages", "alice", "inst1"), ("user.recipients", "alice", ""),
        ("client.messages", "2001:db8:1:2::/64", "inst1"),
        ("sender_domain.recipients", "own.example", ""),
        ("recipient_domain.messages", "target.example", "inst1|target.example"),
        ("recipient_domain.recipients", "target.example", "")]
    assert found[-1].interval == pytest.approx(2.0)


# --- through the engine --------------------------------------------------------

LIMITED = {
    "authserv_id": "mx.receiver.example",
    "relay": {"enabled": True, "local_domains": ["own.example"], "networks": ["10.20.0.0/16"],
              "sender_ownership": "off"},
    "limits": {"enabled": True, "per_user": {"messages": 2, "recipients": 5, "period": 3600},
               "overrides": [{"users": ["bulk"], "messages": 100, "recipients": 1000}]},
}


def engine(**overrides):
    settings = {**LIMITED, **overrides}
    return Engine(config_module.parse(yaml.safe_dump(settings), "l.yaml"), standard_world())


def rcpt(login, instance, recipient="x@target.example", client="198.51.100.99", **fields):
    return Request(client_address=ipaddress.ip_address(client), helo="laptop",
                   sender="a@own.example", recipient=recipient, instance=instance,
                   sasl_username=login, **fields)


def test_a_message_with_many_recipients_counts_once(caplog):
    policy = engine()
    decisions = [policy.decide(rcpt("alice", "m1", f"r{n}@target.example")) for n in range(5)]
    assert [d.action for d in decisions] == [Action.ACCEPT] * 5
    sixth = policy.decide(rcpt("alice", "m1", "r6@target.example"))
    assert sixth.action is Action.DEFER
    assert (sixth.reply.code, sixth.reply.status) == ("452", "4.7.1")
    assert sixth.rule == "limit.user.recipients"
    assert "try again in " in sixth.reply.text and sixth.reply.text.endswith(" s")
    assert sixth.relay.limit.key == "alice"
    policy = engine(limits={"enabled": True, "per_user": {"messages": 2}})
    assert [policy.decide(rcpt("alice", "m1", f"r{n}@t.example")).action
            for n in range(9)] == [Action.ACCEPT] * 9
    assert policy.decide(rcpt("alice", "m2")).action is Action.ACCEPT   # message 2 of 2
    with caplog.at_level(logging.WARNING, logger="policyd"):
        third = [policy.decide(rcpt("alice", f"m{n}")) for n in (3, 4, 5)]
    assert {d.rule for d in third} == {"limit.user.messages"}
    # Logged once per counter and period, not per refused recipient.
    assert len([r for r in caplog.records if "rate limit user.messages" in r.message]) == 1


def test_a_refused_recipient_is_not_charged():
    policy = engine()
    stranger = rcpt("", "m1", client="198.51.100.20")
    assert policy.decide(stranger).action is Action.REJECT   # relay denied
    for n in range(5):   # the user's 5 recipients are all still there
        assert policy.decide(rcpt("alice", "m2", f"r{n}@target.example")).action is Action.ACCEPT


def test_overrides_dry_run_and_scope():
    policy = engine()
    assert all(policy.decide(rcpt("bulk", f"m{n}")).action is Action.ACCEPT for n in range(10))
    # Not relay clients: not counted with scope relay.
    inbound = [policy.decide(rcpt("", f"m{n}", "x@own.example", client="198.51.100.20"))
               for n in range(10)]
    assert all(d.relay.limits_backend == "" for d in inbound)
    dry = engine(limits={**LIMITED["limits"], "dry_run": True})
    decisions = [dry.decide(rcpt("alice", f"m{n}")) for n in range(4)]
    assert [d.action for d in decisions] == [Action.ACCEPT] * 4
    assert [d.would for d in decisions] == [None, None, Action.DEFER, Action.DEFER]
    assert ("limit", "user.messages:alice") in decisions[2].log_fields(rcpt("alice", "m2"))


def test_only_rcpt_is_counted():
    policy = engine()
    for n in range(5):
        policy.decide(rcpt("alice", "m1", protocol_state="DATA"))
    assert all(policy.decide(rcpt("alice", "m1", f"r{n}@t.example")).action is Action.ACCEPT
               for n in range(5))


def test_the_default_config_builds_no_relay_policy():
    assert Engine(config_module.embedded(), standard_world()).relay is None
