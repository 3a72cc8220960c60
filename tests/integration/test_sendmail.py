"""The milter behind a real Sendmail: Debian's sendmail 8.17, configured
with contrib/sendmail/policyd.mc's INPUT_MAIL_FILTER line
(tests/integration/sendmail.py), SMTP sessions from clients on
127.0.0.x addresses, and the milter (`python3 -m policyd milter`, on TCP
as the contrib line has it, and on a UNIX socket) resolving through the
test world's unbound.  What Sendmail replies and what it
queues is what is checked: the replies policyd set, its
Authentication-Results at the top, a forged one gone, the iprev result from
Sendmail's own {client_resolve} macro (asked for through setsymlist: the
contrib file lists no macros), the queue id in policyd's log.  IPv6
clients too: a Sendmail in a network namespace of its own, whose loopback
interface carries the clients' documentation addresses (RFC 3849), one
with a name Sendmail confirms both ways, one with none (iprev permerror,
RFC 8601 §2.7.3, flagged by default)."""
from __future__ import annotations

import pytest

from tests.integration.dnsworld import (AUTHSERV_ID, DEFAULT_ADDRESS, NAT_NETWORKS,
                                        UnboundServer, start_unbound)
from tests.integration.postfix import free_port
from tests.integration.sendmail import SendmailInstance, queue_id
from tests.integration.test_milter import (MilterProcess, milter_config, publish,
                                           short_socket)
from tests.unit.milter.signing import SigningKey, message, rsa_key

# A domain whose SPF record names one client of these tests.
SPF_PASS_CLIENT = "127.0.0.22"
NAT_CLIENT = "127.0.0.23"          # configured as a NAT network below
STRANGER = "127.0.0.21"            # in nobody's SPF record, no name
# In other.example's SPF record (ip6:2001:db8:6::/64), as the world has it;
# Sendmail finds a name for the first (both ways), none for the second.
IPV6_FCRDNS = "2001:db8:6::25"
IPV6_NO_PTR = "2001:db8:6::77"
HOSTS = {SPF_PASS_CLIENT: "mail.sendmail.example", NAT_CLIENT: "gateway.own.example",
         IPV6_FCRDNS: "mail6.other.example"}


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"own": rsa_key("own.example", "sm1"), "other": rsa_key("other.example", "sm2")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, keys) -> UnboundServer:
    zones = tmp_path_factory.mktemp("zones")
    publish(zones, keys)
    with open(zones / "example.zone", "a", encoding="ascii") as stream:
        stream.write(f'sendmail.example. 3600 IN TXT "v=spf1 ip4:{SPF_PASS_CLIENT} -all"\n')
    server = start_unbound(tmp_path_factory.mktemp("unbound-sendmail"), DEFAULT_ADDRESS, zones)
    yield server
    server.stop()


def start_milter(tmp_path_factory, world, kind: str) -> MilterProcess:
    directory = tmp_path_factory.mktemp("milter")
    listen = f"inet:{free_port()}@127.0.0.1" if kind == "inet" else short_socket(directory)
    networks = ", ".join(NAT_NETWORKS + [f"{NAT_CLIENT}/32"])
    config = milter_config(directory, world, listen,
                           f"nat: {{networks: [{networks}]}}\niprev: {{ipv4: true}}")
    return MilterProcess(directory, config, listen)


def start_sendmail(tmp_path_factory, milter: MilterProcess, **options) -> SendmailInstance:
    # Sendmail's notation for a UNIX socket is local:PATH; inet: is libmilter's.
    kind, _, rest = milter.listen.partition(":")
    instance = SendmailInstance(tmp_path_factory.mktemp("sendmail"),
                                f"local:{rest}" if kind == "unix" else milter.listen, HOSTS,
                                **options)
    instance.prepare()
    instance.start()
    return instance


@pytest.fixture(scope="module", params=["inet", "unix"])
def milter(request, tmp_path_factory, world) -> MilterProcess:
    """On TCP, as contrib/sendmail/policyd.mc's default, and on a UNIX socket."""
    process = start_milter(tmp_path_factory, world, request.param)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sendmail(tmp_path_factory, milter) -> SendmailInstance:
    instance = start_sendmail(tmp_path_factory, milter)
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def sendmail6(tmp_path_factory, world) -> tuple[SendmailInstance, MilterProcess]:
    """Sendmail in a network namespace whose loopback has the IPv6 clients'
    addresses; the milter on a UNIX socket, which it reaches from there."""
    milter = start_milter(tmp_path_factory, world, "unix")
    try:
        instance = start_sendmail(tmp_path_factory, milter,
                                  ipv6_clients=(IPV6_FCRDNS, IPV6_NO_PTR))
        yield instance, milter
        instance.stop()
    finally:
        milter.stop()


def ours(headers: list[tuple[str, str]]) -> list[str]:
    return [value for name, value in headers
            if name.lower() == "authentication-results" and value.startswith(AUTHSERV_ID)]


def test_spf_fail_is_refused_at_rcpt_with_policyds_reply(sendmail):
    replies = sendmail.transaction(STRANGER, "client.example", "a@other.example")
    assert replies["mail"][0] == 250
    # Sendmail puts the recipient between the codes and policyd's text.
    assert replies["rcpt"] == (550, b"5.7.23 <root@own.example>... SPF fail: other.example "
                                    b"does not designate this host as a permitted sender "
                                    b"(mailfrom)")


def test_accepted_mail_gets_our_results_on_top_and_a_forgery_goes(sendmail, milter, keys):
    forged = f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=forged\r\n"
    raw = keys["other"].sign(message("a@sendmail.example", extra_headers=forged))
    replies = sendmail.transaction(SPF_PASS_CLIENT, "mail.sendmail.example",
                                   "a@sendmail.example", raw)
    assert replies["rcpt"][0] == 250
    assert replies["data"][0] == 250, replies
    queued = queue_id(replies["data"][1])
    headers = sendmail.queued_headers(queued)
    results = ours(headers)
    assert len(results) == 1, headers
    assert "spf=pass (without dnssec) smtp.mailfrom=sendmail.example" in results[0]
    assert "dkim=pass (without dnssec) header.d=other.example header.s=sm2" in results[0]
    # Sendmail's {client_resolve} OK, from its /etc/hosts both ways: the
    # world's DNS has no PTR for it, so it cannot be policyd's own lookup.
    assert (f"iprev=pass (mail.sendmail.example; without dnssec) "
            f"policy.iprev={SPF_PASS_CLIENT}" in results[0])
    assert "smtp.mailfrom=forged" not in str(headers)
    # At the top: above everything, Sendmail's own Received line included.
    assert headers[0][0] == "Authentication-Results", headers
    assert f"{queued}: action=ACCEPT" in milter.log()


def test_nat_own_domain_needs_an_aligned_signature(sendmail, keys):
    replies = sendmail.transaction(NAT_CLIENT, "gateway.own.example", "staff@own.example",
                                   message("staff@own.example"))
    assert replies["rcpt"][0] == 250
    assert replies["data"] == (550, b"5.7.20 Own-domain mail from a NAT network must carry "
                                    b"a valid DKIM signature")
    replies = sendmail.transaction(NAT_CLIENT, "gateway.own.example", "staff@own.example",
                                   keys["own"].sign(message("staff@own.example")))
    assert replies["data"][0] == 250, replies
    results = ours(sendmail.queued_headers(queue_id(replies["data"][1])))
    assert "policy.nat-relaxed=203.0.113.7" in results[0]
    assert "dkim=pass (without dnssec) header.d=own.example" in results[0]


@pytest.mark.parametrize("client, iprev", [
    (IPV6_FCRDNS, "iprev=pass (mail6.other.example; without dnssec) "
                  f'policy.iprev="{IPV6_FCRDNS}"'),
    (IPV6_NO_PTR, "iprev=permerror"),
])
def test_ipv6_clients_and_their_reverse_names(sendmail6, keys, client, iprev):
    sendmail, milter = sendmail6
    replies = sendmail.transaction(client, "mail6.other.example", "a@other.example",
                                   keys["other"].sign(message("a@other.example")))
    assert replies["data"][0] == 250, replies
    (results,) = ours(sendmail.queued_headers(queue_id(replies["data"][1])))
    assert "spf=pass (without dnssec) smtp.mailfrom=other.example" in results
    assert iprev in results
    assert f"client={client} " in milter.log()

