"""One table of scenarios through both front-ends: the Postfix policy
service (`python3 -m policyd serve`, spoken to as Postfix 3.7 does) and the
milter (`python3 -m policyd milter`, spoken to as Postfix's milter8.c does),
both running on the same config against the same unbound.

For each scenario both must give the same verdict at RCPT, with the same
SMTP code, enhanced status code and text, and an accepted message must get
the same Authentication-Results (the milter adds its DKIM result at end of
message; the policy service cannot see the message).  Each scenario also
says which verdict it expects, so the two cannot agree on a wrong one.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bench.milter_client import (SMFIR_ACCEPT, SMFIR_CONTINUE, SMFIR_INSHEADER,
                                 SMFIR_REPLYCODE)
from tests.integration.dnsworld import AUTHSERV_ID, write_config
from tests.integration.test_milter import PATIENCE, REPO, MilterProcess
from tests.unit.milter.signing import message

AR = "Authentication-Results"

# What the MTA found out about the client's name, in each front-end's words:
# Postfix policy attributes (client_name, reverse_client_name) and the
# milter macros {client_resolve}, {client_ptr}, {client_name}.  "unsaid":
# the MTA says nothing and policyd looks it up itself.
NAMES = {
    "fcrdns": (("mail6.other.example", "mail6.other.example"),
               {"{client_resolve}": "OK", "{client_ptr}": "mail6.other.example",
                "{client_name}": "mail6.other.example"}),
    "forged": (("unknown", "liar.other.example"),
               {"{client_resolve}": "FORGED", "{client_ptr}": "liar.other.example",
                "{client_name}": "unknown"}),
    "noptr": (("unknown", "unknown"),
              {"{client_resolve}": "FAIL", "{client_ptr}": "unknown",
               "{client_name}": "unknown"}),
    "unsaid": ((None, None), {}),
}

# Configs over the standard world (dnsworld.write_config).  The milter's
# DKIM requirement for NAT mail is "flag" here: it acts at end of message,
# where the policy service has no say, and is tested in test_milter.py.
CONFIGS = {
    "standard": {},
    "test_mode": {"test_mode": True},
    "strict": {"iprev": {"on_fail": "reject", "ipv4": True},
               "spf": {"mailfrom": {"on_softfail": "defer", "on_permerror": "reject"}},
               "headers": {"received_spf": True}},
    # Relay checks (issue 11): what both front-ends can see, logins and
    # networks and TLS (client certificates reach the policy service only).
    "relay": {"relay": {"enabled": True, "local_domains": ["own.example"],
                        "networks": ["10.20.0.0/16"], "require_tls": True,
                        "senders": [{"login": "alice", "addresses": ["alice@own.example"]}]}},
}


@dataclass(frozen=True)
class Scenario:
    name: str
    client: str
    helo: str
    sender: str
    expect: str                   # accept, reject or defer
    names: str = "unsaid"
    sasl: str = ""
    config: str = "standard"
    code: str = ""                # the reply code expected, when not accepted
    status: str = ""              # its enhanced status, when not X.7.* (a policy status)
    recipient: str = "postmaster@own.example"
    tls: str = ""                 # the TLS protocol of the session, "" for none


SCENARIOS = [
    Scenario("nat-own-domain", "192.168.1.20", "mx.own.example", "staff@own.example", "accept"),
    Scenario("nat-own-domain-ipv6", "fd00::1:5", "mx.own.example", "staff@own.example",
             "accept"),
    Scenario("nat-other-domain", "192.168.1.20", "mx.own.example", "a@other.example",
             "reject", code="550"),
    Scenario("outside-spoof", "198.51.100.99", "mx.own.example", "ceo@own.example",
             "reject", code="550"),
    Scenario("lookalike-domain", "198.51.100.10", "helo.other.example", "a@evilown.example",
             "reject", code="550"),
    # Own-domain spellings that Postfix delivers as own.example (issue 15:
    # each was accepted with spf=none): every one is SPF-checked as that.
    Scenario("outside-spoof-trailing-dot", "198.51.100.99", "mx.own.example",
             "ceo@own.example.", "reject", code="550"),
    Scenario("outside-spoof-quoted-at", "198.51.100.99", "mx.own.example",
             '"a@b"@own.example', "reject", code="550"),
    Scenario("outside-spoof-two-ats", "198.51.100.99", "mx.own.example",
             "a@evil.example@own.example", "reject", code="550"),
    Scenario("outside-spoof-quoted-own", "198.51.100.99", "mx.own.example",
             '"x@own.example"@own.example', "reject", code="550"),
    Scenario("outside-spoof-percent-hack", "198.51.100.99", "mx.own.example",
             "ceo%own.example", "reject", code="550"),
    Scenario("outside-bare-local-part", "198.51.100.99", "mx.own.example", "ceo", "reject",
             code="553", status="5.1.7"),
    Scenario("nat-own-domain-trailing-dot", "192.168.1.20", "mx.own.example",
             "staff@own.example.", "accept"),
    Scenario("ipv6-without-ptr", "2001:db8:6::26", "mail6.other.example", "a@other.example",
             "accept", names="noptr"),
    Scenario("ipv6-without-ptr-own-lookup", "2001:db8:6::26", "mail6.other.example",
             "a@other.example", "accept"),
    Scenario("ipv6-fcrdns", "2001:db8:6::25", "mail6.other.example", "a@other.example",
             "accept", names="fcrdns"),
    Scenario("ipv6-fcrdns-own-lookup", "2001:db8:6::25", "mail6.other.example",
             "a@other.example", "accept"),
    Scenario("ipv6-forged-ptr", "2001:db8:6::27", "liar.other.example", "a@other.example",
             "accept", names="forged"),
    Scenario("spf-pass-include", "198.51.100.10", "helo.other.example", "a@include.example",
             "accept"),
    Scenario("spf-fail", "192.0.2.99", "pc.dyn.example", "a@other.example", "reject",
             code="550"),
    Scenario("spf-softfail", "198.51.100.10", "helo.other.example", "a@softfail.example",
             "accept"),
    Scenario("spf-neutral", "198.51.100.10", "helo.other.example", "a@neutral.example",
             "accept"),
    Scenario("spf-none", "198.51.100.10", "helo.other.example", "a@nospf.example", "accept"),
    Scenario("spf-permerror", "198.51.100.10", "helo.other.example", "a@permerror.example",
             "accept"),
    Scenario("spf-temperror", "198.51.100.10", "helo.other.example", "a@temperror.example",
             "defer", code="451"),
    Scenario("spf-dnssec", "198.51.100.10", "helo.other.example", "a@signed.example",
             "accept"),
    Scenario("helo-fail", "192.0.2.99", "helo.other.example", "a@nospf.example", "reject",
             code="550"),
    Scenario("null-sender", "198.51.100.10", "helo.other.example", "", "accept"),
    Scenario("eight-bit-sender", "198.51.100.99", "x.example",
             "b\u00fccher@own.example", "reject", code="550"),
    Scenario("sasl-authenticated", "198.51.100.99", "laptop", "ceo@own.example", "accept",
             sasl="alice"),
    Scenario("test-mode-spf-fail", "192.0.2.99", "pc.dyn.example", "a@other.example",
             "accept", config="test_mode"),
    Scenario("test-mode-nat", "192.168.1.20", "mx.own.example", "staff@own.example",
             "accept", config="test_mode"),
    Scenario("strict-ipv6-without-ptr", "2001:db8:6::26", "mail6.other.example",
             "a@other.example", "reject", names="noptr", config="strict", code="550"),
    Scenario("strict-ipv4-forged-ptr", "198.51.100.11", "helo.other.example",
             "a@other.example", "reject", config="strict", code="550"),
    Scenario("strict-softfail", "198.51.100.10", "helo.other.example", "a@softfail.example",
             "defer", config="strict", code="451"),
    Scenario("strict-permerror", "198.51.100.10", "helo.other.example", "a@permerror.example",
             "reject", config="strict", code="550"),
    Scenario("strict-pass-with-received-spf", "2001:db8:6::25", "mail6.other.example",
             "a@other.example", "accept", names="fcrdns", config="strict"),
    Scenario("relay-stranger", "198.51.100.10", "helo.other.example", "a@include.example",
             "reject", config="relay", code="554", recipient="x@target.example"),
    Scenario("relay-stranger-percent-hack", "198.51.100.10", "helo.other.example",
             "a@include.example", "reject", config="relay", code="554",
             recipient="x%target.example@own.example"),
    Scenario("relay-stranger-to-own-domain", "198.51.100.10", "helo.other.example",
             "a@include.example", "accept", config="relay"),
    Scenario("relay-login", "198.51.100.99", "laptop", "alice@own.example", "accept",
             sasl="alice", config="relay", recipient="x@target.example", tls="TLSv1.3"),
    Scenario("relay-login-without-tls", "198.51.100.99", "laptop", "alice@own.example",
             "reject", sasl="alice", config="relay", recipient="x@target.example",
             code="554", status="5.7.10"),
    Scenario("relay-login-as-someone-else", "198.51.100.99", "laptop", "bob@own.example",
             "reject", sasl="alice", config="relay", recipient="x@target.example",
             tls="TLSv1.3", code="553"),
    Scenario("relay-network", "10.20.0.5", "app1", "app@own.example", "accept",
             config="relay", recipient="x@target.example", tls="TLSv1.2"),
]


@dataclass(frozen=True)
class Verdict:
    """What a front-end told the MTA at RCPT, in common terms."""
    action: str
    code: str = ""
    status: str = ""
    text: str = ""
    headers: tuple[str, ...] = ()


# --- the policy service ------------------------------------------------------------

class PolicyProcess:
    """`python3 -m policyd serve -c FILE`, a child stopped by its PID."""

    def __init__(self, directory: Path, config_path: Path, address: tuple[str, int]):
        self.address = address
        self.log_path = directory / "policy.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "policyd", "serve", "-c", str(config_path)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file)
        deadline = time.monotonic() + PATIENCE
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"policyd serve exited:\n{self.log()}")
            try:
                socket.create_connection(address, PATIENCE).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"policyd serve did not listen:\n{self.log()}") \
                        from None
                time.sleep(0.02)   # polling for the socket, not waiting blindly

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def session(self) -> "PolicySession":
        """One connection, as one smtpd process holds it: every request of a
        message goes over it, so to the same worker (policy.processes)."""
        return PolicySession(socket.create_connection(self.address, PATIENCE))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PATIENCE)
        self.log_file.close()


class PolicySession:
    def __init__(self, connection: socket.socket):
        self.connection = connection
        self.pending = b""

    def __enter__(self) -> "PolicySession":
        return self

    def __exit__(self, *exc) -> None:
        self.connection.close()

    def ask(self, attributes: dict[str, str]) -> str:
        request = "".join(f"{name}={value}\n" for name, value in attributes.items()) + "\n"
        self.connection.sendall(request.encode("utf-8", "surrogateescape"))
        while b"\n\n" not in self.pending:
            chunk = self.connection.recv(4096)
            assert chunk, f"policy service closed the connection; got {self.pending!r}"
            self.pending += chunk
        reply, _, self.pending = self.pending.partition(b"\n\n")
        assert reply.startswith(b"action=")
        return reply[len(b"action="):].decode("utf-8")


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def front_ends(tmp_path_factory, unbound):
    """Both daemons for each config, on one config file per config."""
    started = {}
    for name, overrides in CONFIGS.items():
        directory = tmp_path_factory.mktemp(f"parity-{name}")
        port = free_tcp_port()
        listen = f"unix:{directory / 'm.sock'}"
        settings = dict(overrides)
        settings["policy"] = {"listen": [f"inet:127.0.0.1:{port}"]}
        settings["milter"] = {"listen": listen, "dkim": {"nat_requires_aligned_pass": "flag"}}
        config_path = write_config(directory, unbound, yaml.safe_dump(settings))
        started[name] = (PolicyProcess(directory, config_path, ("127.0.0.1", port)),
                         MilterProcess(directory, config_path, listen))
    yield started
    for policy, milter in started.values():
        policy.stop()
        milter.stop()


# --- asking each front-end -----------------------------------------------------------

def ask_policy(policy: PolicyProcess, scenario: Scenario, index: int) -> Verdict:
    client_name, reverse_name = NAMES[scenario.names][0]
    attributes = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": scenario.client, "client_name": client_name or "",
        "reverse_client_name": reverse_name or "", "helo_name": scenario.helo,
        "sender": scenario.sender, "recipient": scenario.recipient,
        "recipient_count": "0", "queue_id": "", "instance": f"parity.{index}",
        "sasl_method": "PLAIN" if scenario.sasl else "", "sasl_username": scenario.sasl,
        "encryption_protocol": scenario.tls,
        "encryption_cipher": "TLS_AES_256_GCM_SHA384" if scenario.tls else "",
    }
    with policy.session() as session:
        action = session.ask(attributes)
        if action == "DUNNO":
            return Verdict("accept")
        if action.startswith("PREPEND "):
            headers = [action[len("PREPEND "):]]
            # Postfix adds one header per reply; the rest come with the next ones.
            attributes["protocol_state"] = "DATA"
            while (more := session.ask(attributes)).startswith("PREPEND "):
                headers.append(more[len("PREPEND "):])
            return Verdict("accept", headers=tuple(headers))
    code, status, text = action.split(" ", 2)
    return Verdict("reject" if code.startswith("5") else "defer", code, status, text)


def ask_milter(milter: MilterProcess, scenario: Scenario) -> Verdict:
    macros = dict(NAMES[scenario.names][1])
    client = milter.client()
    try:
        client.conninfo(f"[{scenario.client}]", scenario.client, macros=macros)
        # As Postfix sends them unasked: TLS at HELO, the login at MAIL.
        client.helo(scenario.helo, macros={"{tls_version}": scenario.tls,
                                           "{cipher}": "TLS_AES_256_GCM_SHA384"}
                    if scenario.tls else None)
        client.mail(f"<{scenario.sender}>",
                    macros={"{auth_authen}": scenario.sasl} if scenario.sasl else None)
        reply = client.rcpt(f"<{scenario.recipient}>")
        if reply.command == SMFIR_REPLYCODE:
            code, status, text = reply.smtp
            # Both MTAs turn libmilter's "%%" back into "%" (milter8.c).
            return Verdict("reject" if code.startswith("5") else "defer", code, status,
                           text.replace("%%", "%"))
        assert reply.command == SMFIR_CONTINUE, reply
        client.message(message(scenario.sender or "postmaster@helo.other.example"))
        end = client.eom()
        assert end.command == SMFIR_ACCEPT, end
        # Inserted at index 0 each, so the last one ends up on top.
        inserted = [f"{name}:{value}" for _, name, value in
                    reversed(end.headers(SMFIR_INSHEADER))]
        return Verdict("accept", headers=tuple(inserted))
    finally:
        client.quit()


def without_dkim(headers: tuple[str, ...]) -> tuple[str, ...]:
    """The milter's headers less its DKIM result, which only it can know
    (the messages here are unsigned), and the one space after the colon
    made explicit.  An Authentication-Results left with no result at all
    is one the policy service does not add."""
    result = []
    for header in headers:
        name, _, value = header.partition(":")
        value = value.strip()
        if name == AR:
            value = value.replace("; dkim=none", "")
            if value == AUTHSERV_ID:
                continue
        result.append(f"{name}: {value}")
    return tuple(result)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_both_front_ends_give_the_same_verdict(front_ends, scenario):
    policy, milter = front_ends[scenario.config]
    index = SCENARIOS.index(scenario)
    by_policy = ask_policy(policy, scenario, index)
    by_milter = ask_milter(milter, scenario)

    assert by_policy.action == scenario.expect, by_policy
    assert (by_milter.action, by_milter.code, by_milter.status, by_milter.text) == \
        (by_policy.action, by_policy.code, by_policy.status, by_policy.text)
    if scenario.expect == "accept":
        assert without_dkim(by_milter.headers) == by_policy.headers
        if not scenario.sasl and not scenario.config == "relay":
            assert by_policy.headers[0].startswith(f"{AR}: {AUTHSERV_ID}; spf=")
    else:
        assert by_milter.code == scenario.code
        assert by_milter.status.startswith(scenario.status or scenario.code[0] + ".7.")
        assert by_milter.text


def test_every_config_and_name_source_is_used():
    assert {s.config for s in SCENARIOS} == set(CONFIGS)
    assert {s.names for s in SCENARIOS} == set(NAMES)
    assert {s.expect for s in SCENARIOS} == {"accept", "reject", "defer"}
