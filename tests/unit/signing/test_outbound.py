"""policyd.signing.outbound: only authorized relay clients' mail, and
own-domain mail from the NAT networks, may be signed."""
from __future__ import annotations

import ipaddress

import pytest

from policyd import config as config_module
from policyd.signing.outbound import Origin, may_sign, origin

from .keyfiles import write_key


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")
    path, _ = write_key(tmp_path, "k.pem")
    return config_module.parse(
        "nat: {own_domains: [own.example], networks: [192.168.1.0/24],"
        " public_addresses: [203.0.113.7]}\n"
        "milter: {dkim: {nat_requires_aligned_pass: flag}}\n"
        f"signing:\n  nat_own_domains: true\n"
        f"  table: [{{match: own.example, selector: s, key_file: {path}}}]\n",
        "p.yaml")


STRANGER = ipaddress.ip_address("198.51.100.9")
NAT_CLIENT = ipaddress.ip_address("192.168.1.20")


@pytest.mark.parametrize("authorized_by", ["sasl", "network", "certificate"])
def test_an_authorized_relay_client_is_outbound(config, authorized_by):
    assert origin(authorized_by, STRANGER, config) is Origin.RELAY
    assert origin(authorized_by, None, config) is Origin.RELAY


def test_a_stranger_is_never_outbound(config):
    assert origin("", STRANGER, config) is None
    assert origin("", None, config) is None   # local submission without authorization


def test_a_nat_client_is_outbound_for_own_domains_only(config):
    assert origin("", NAT_CLIENT, config) is Origin.NAT
    own = config.nat.own_domains
    assert may_sign(Origin.NAT, "own.example", own)
    assert may_sign(Origin.NAT, "mail.own.example", own)
    assert not may_sign(Origin.NAT, "evilown.example", own)
    assert not may_sign(Origin.NAT, "other.example", own)
    assert not may_sign(Origin.NAT, "", own)
    assert may_sign(Origin.RELAY, "other.example", own)


def test_the_nat_rule_is_off_by_default(config):
    import dataclasses

    from policyd.signing.settings import SigningConfig
    assert SigningConfig().nat_own_domains is False
    off = dataclasses.replace(config, signing=dataclasses.replace(config.signing,
                                                                  nat_own_domains=False))
    assert origin("", NAT_CLIENT, off) is None


def test_the_nat_rule_can_be_turned_off(config):
    import dataclasses
    off = dataclasses.replace(config, signing=dataclasses.replace(config.signing,
                                                                  nat_own_domains=False))
    assert origin("", NAT_CLIENT, off) is None


def test_nothing_is_outbound_without_a_table(config):
    import dataclasses
    empty = dataclasses.replace(config, signing=dataclasses.replace(config.signing, table=()))
    assert origin("sasl", NAT_CLIENT, empty) is None


# --- a login's From address, held to relay.sender_ownership -------------------

OWNERS = {"alice@own.example": ("alice",), "bob@own.example": ("bob",),
          "shared@own.example": ("alice", "bob")}


def owned_by(address: str, login: str) -> bool | None:
    """relay.senders.SenderOwners.owned_by over OWNERS."""
    owners = OWNERS.get(address.lower())
    if owners is None:
        return None
    return login.casefold() in owners


@pytest.mark.parametrize("ownership, address, login, why", [
    ("enforce", "alice@own.example", "alice", ""),
    ("enforce", "Alice@own.example", "ALICE", ""),
    ("enforce", "shared@own.example", "bob", ""),
    ("enforce", "bob@own.example", "alice", "From not owned by alice"),
    ("enforce", "nobody@elsewhere.example", "alice", "From not owned by alice"),
    ("known", "bob@own.example", "alice", "From not owned by alice"),
    ("known", "nobody@elsewhere.example", "alice", ""),
    ("off", "bob@own.example", "alice", ""),
    ("enforce", "bob@own.example", "", ""),   # no login: relay network, certificate
])
def test_a_logins_from_is_held_to_sender_ownership(ownership, address, login, why):
    from policyd.relay.settings import SenderOwnership
    from policyd.signing.outbound import from_not_owned
    assert from_not_owned(login, address, SenderOwnership(ownership), owned_by) == why


def test_the_login_in_the_reason_is_made_safe():
    from policyd.relay.settings import SenderOwnership
    from policyd.signing.outbound import from_not_owned
    assert from_not_owned("eve\r\nx=1 \"", "bob@own.example", SenderOwnership.ENFORCE,
                          owned_by) == "From not owned by eve??x=1 ?"
