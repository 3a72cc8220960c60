"""The milter end to end: `python3 -m policyd milter -c FILE` as a child
process, resolving through a real unbound that serves the standard world
plus DKIM keys made for this run, driven over the real milter protocol by
OpenDKIM's miltertest (an MTA side written independently of ours, scripts
in tests/integration/miltertest/) and by bench/milter_client.py where a
test needs what miltertest cannot show (reply text at RCPT, header indexes,
IPv6 transport, several connections, signals).

The milter runs with its default `milter.workers` (4 processes) unless a
test says otherwise; which worker answered a session is read from the log:
each decision line carries the PID of the process that decided.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from bench import milter_bench
from bench.milter_client import (SMFIR_ACCEPT, SMFIR_CHGHEADER, SMFIR_CONTINUE,
                                 SMFIR_INSHEADER, SMFIR_REPLYCODE, MilterClient,
                                 ProtocolError, Reply)
from policyd.config import MilterConfig
from policyd.runtime import supervisor as supervision
from policyd.milter import server as milter_server
from tests.integration import process_session
from tests.integration.dnsworld import (AUTHSERV_ID, DEFAULT_ADDRESS, ZONES_DIR,
                                        QueryCountingProxy, UnboundServer,
                                        start_unbound, write_config)
from tests.unit.milter.signing import SigningKey, ed25519_key, message, rsa_key

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPTS = Path(__file__).resolve().parent / "miltertest"
MILTERTEST = "/usr/bin/miltertest"
# How long a test waits for something that should happen at once.
PATIENCE = 15.0
AR = "Authentication-Results"


# --- the DNS world with DKIM keys --------------------------------------------

@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"own": rsa_key("own.example", "rsa1"),
            "other": rsa_key("other.example", "rsa2"),
            "signed": rsa_key("signed.example", "sec1"),
            "ed": ed25519_key("other.example", "ed1")}


def publish(zones_dir: Path, keys: dict[str, SigningKey]) -> None:
    """The standard zone files, each key's TXT record appended to the zone
    of its domain (signed.example is signed by the fixture afterwards, so
    its key is DNSSEC-authenticated)."""
    for path in ZONES_DIR.glob("*.zone"):
        shutil.copy(path, zones_dir / path.name)
    for key in keys.values():
        zone = zones_dir / ("signed.example.zone" if key.domain == "signed.example"
                            else "example.zone")
        strings = " ".join(f'"{s}"' for s in key.record_strings())
        with open(zone, "a", encoding="ascii") as stream:
            stream.write(f"{key.record_name}. 3600 IN TXT {strings}\n")


@pytest.fixture(scope="module")
def dkim_world(tmp_path_factory, keys) -> UnboundServer:
    zones = tmp_path_factory.mktemp("zones")
    publish(zones, keys)
    server = start_unbound(tmp_path_factory.mktemp("unbound-dkim"), DEFAULT_ADDRESS, zones)
    yield server
    server.stop()


# --- the milter process ------------------------------------------------------

class MilterProcess:
    """`python3 -m policyd milter -c FILE`, a child stopped by its PID."""

    def __init__(self, directory: Path, config_path: Path, listen: str,
                 env: dict[str, str] | None = None, command: tuple[str, ...] = ("milter",),
                 new_session: bool = False):
        """`new_session`: the process leads a session of its own, so that
        tests/integration/process_session.py finds every process it starts."""
        self.listen, self.config_path = listen, config_path
        self.log_path = directory / "milter.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "policyd", *command, "-c", str(config_path)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file,
            env={**os.environ, **(env or {})}, start_new_session=new_session)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()   # a milter that never listened is not left running
            raise

    def _wait_until_listening(self) -> None:
        listen = self.listen
        deadline = time.monotonic() + PATIENCE
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the milter exited {self.process.returncode}:\n{self.log()}")
            try:
                client = MilterClient.connect_to(listen, timeout=PATIENCE)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the milter did not listen:\n{self.log()}") from None
                time.sleep(0.02)   # polling for the socket, not waiting blindly
                continue
            try:
                client.negotiate()
            finally:
                client.close()
            return

    def client(self) -> MilterClient:
        client = MilterClient.connect_to(self.listen, timeout=PATIENCE)
        try:
            client.negotiate()
        except BaseException:
            client.close()
            raise
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, count: int = 1) -> None:
        """Until `text` is in the log `count` times."""
        deadline = time.monotonic() + PATIENCE
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, f"no {text!r} x{count} in the log:\n{self.log()}"
            assert self.process.poll() is None, f"the milter exited:\n{self.log()}"
            time.sleep(0.02)

    def workers(self) -> dict[int, int]:
        """Worker number -> PID, once every worker the supervisor announced
        has started; a worker started again replaces its earlier PID."""
        deadline = time.monotonic() + PATIENCE
        while True:
            log = self.log()
            announced = WORKER_COUNT.search(log)
            found = {int(number): int(pid) for pid, number in WORKER_START.findall(log)}
            if announced and len(found) >= int(announced.group(1)):
                return found
            assert time.monotonic() < deadline, f"not every worker started:\n{log}"
            assert self.process.poll() is None, f"the milter exited:\n{self.log()}"
            time.sleep(0.02)

    def children(self) -> set[int]:
        return children_of(self.process.pid)

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float = PATIENCE) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            workers = self.children()
            self.process.terminate()
            try:
                self.process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PATIENCE)
                for pid in filter(alive, workers):   # orphaned by the kill
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.log_file.close()


# A worker's start line: "policyd[PID]: INFO: milter worker N of M on ...".
# The supervisor's: "policyd[PID]: INFO: milter on SPEC: M worker processes, ...".
WORKER_COUNT = re.compile(r"^policyd\[\d+\]: INFO: milter on .*: (\d+) worker processes",
                          re.MULTILINE)
WORKER_START = re.compile(r"^policyd\[(\d+)\]: INFO: milter worker (\d+) of \d+ on ",
                          re.MULTILINE)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent (proc(5) stat, field 3)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (proc(5) stat, field 4)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue   # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def milter_config(directory: Path, unbound: UnboundServer, listen: str,
                  extra_yaml: str = "") -> Path:
    """The standard world's config, listening on `listen`, with extra_yaml over it."""
    settings = yaml.safe_load(extra_yaml) or {}
    settings.setdefault("milter", {})["listen"] = listen
    return write_config(directory, unbound, yaml.safe_dump(settings))


def short_socket(directory: Path) -> str:
    """A UNIX socket path within sun_path's 108 octets."""
    path = directory / "m.sock"
    if len(str(path)) > 100:
        raise AssertionError(f"socket path too long: {path}")
    return f"unix:{path}"


@pytest.fixture(scope="module")
def milter(tmp_path_factory, dkim_world) -> MilterProcess:
    directory = tmp_path_factory.mktemp("milter")
    listen = short_socket(directory)
    process = MilterProcess(directory, milter_config(directory, dkim_world, listen), listen)
    yield process
    process.stop()


@pytest.fixture
def start_milter(tmp_path, dkim_world):
    """Own milter processes for tests that signal or reconfigure them."""
    started = []

    def start(extra_yaml: str = "", listen: str | None = None,
              env: dict[str, str] | None = None) -> MilterProcess:
        listen = listen or short_socket(tmp_path)
        process = MilterProcess(tmp_path, milter_config(tmp_path, dkim_world, listen,
                                                        extra_yaml), listen, env)
        started.append(process)
        return process
    yield start
    for process in started:
        process.stop()


# --- miltertest ----------------------------------------------------------------

def miltertest(script: str, **variables) -> dict[str, str]:
    command = [MILTERTEST, "-s", str(SCRIPTS / script)]
    for name, value in variables.items():
        if value is not None:
            command += ["-D", f"{name}={value}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"miltertest failed:\n{result.stdout}\n{result.stderr}"
    outcome = {}
    for line in result.stdout.splitlines():
        name, equals, value = line.partition("=")
        if equals:
            outcome[name] = value
    return outcome


def session(milter, tmp_path, raw: bytes | None = None, **variables) -> dict[str, str]:
    path = tmp_path / f"message-{time.monotonic_ns()}.eml"
    path.write_bytes(raw if raw is not None else message(variables.get("sender", "a@b.example")))
    return miltertest("session.lua", sock=milter.listen, message=path, **variables)


# --- IPv6 clients and iprev ------------------------------------------------------

def test_ipv6_client_with_fcrdns_from_the_mta_macros(milter, tmp_path):
    outcome = session(milter, tmp_path, client_addr="2001:db8:6::25",
                      helo="mail6.other.example", sender="a@other.example",
                      resolve="OK", ptr="mail6.other.example", name="mail6.other.example")
    assert (outcome["rcpt"], outcome["eom"]) == ("continue", "accept")
    assert outcome["ar"].startswith(f" {AUTHSERV_ID}; ")
    assert "spf=pass (without dnssec) smtp.mailfrom=other.example" in outcome["ar"]
    assert 'iprev=pass (mail6.other.example; without dnssec) policy.iprev="2001:db8:6::25"' \
        in outcome["ar"]


@pytest.mark.parametrize("address, iprev", [
    ("2001:db8:6::25", "iprev=pass (mail6.other.example;"),
    ("2001:db8:6::26", "iprev=permerror (no PTR;"),
    ("2001:db8:6::27", "iprev=fail (liar.other.example; PTR not confirmed by forward lookup;"),
])
def test_ipv6_client_without_macros_gets_our_own_lookup(milter, tmp_path, address, iprev):
    outcome = session(milter, tmp_path, client_addr=address, helo="mail6.other.example",
                      sender="a@other.example")
    assert (outcome["rcpt"], outcome["eom"]) == ("continue", "accept")   # flagged only
    assert iprev in outcome["ar"]


def test_ipv6_client_outside_the_spf_record_is_rejected(milter, tmp_path):
    outcome = session(milter, tmp_path, client_addr="2001:db8:99::1", helo="x.example",
                      sender="a@other.example")
    assert outcome["rcpt"] == "replycode"


# --- Authentication-Results -------------------------------------------------------

def test_forged_results_with_our_authserv_id_are_removed(milter, tmp_path):
    raw = message("a@other.example", extra_headers=f"{AR}: {AUTHSERV_ID}; spf=pass "
                                                   "smtp.mailfrom=bank.example\r\n")
    outcome = session(milter, tmp_path, raw, client_addr="198.51.100.10",
                      helo="helo.other.example", sender="a@other.example")
    assert outcome["deleted"] == "true"
    assert outcome["inserted"] == "true"


def test_results_of_other_servers_stay(milter, tmp_path):
    raw = message("a@other.example", extra_headers=f"{AR}: mx.other.example; spf=pass\r\n")
    outcome = session(milter, tmp_path, raw, client_addr="198.51.100.10",
                      helo="helo.other.example", sender="a@other.example")
    assert (outcome["deleted"], outcome["inserted"]) == ("false", "true")


def test_header_edits_in_order_and_by_index(milter):
    """Three forged fields among four: deleted from the last one up (so
    each index stays valid), then ours inserted at the top (index 0)."""
    client = milter.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@other.example>")
    assert client.rcpt("<b@own.example>").command == SMFIR_CONTINUE
    client.message(message("a@other.example", extra_headers=(
        f"{AR}: {AUTHSERV_ID}; spf=pass\r\n"
        f"{AR}: mx.other.example; spf=pass\r\n"
        f"{AR}: (forged) {AUTHSERV_ID.upper()}; dkim=pass\r\n"
        f'{AR}: "{AUTHSERV_ID}"; iprev=pass\r\n')))
    reply = client.eom()
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    assert [command for command, _ in reply.modifications] == [SMFIR_CHGHEADER] * 3 + \
        [SMFIR_INSHEADER]
    assert reply.headers(SMFIR_CHGHEADER) == [(4, AR, ""), (3, AR, ""), (1, AR, "")]
    ((index, name, value),) = reply.headers(SMFIR_INSHEADER)
    assert (index, name) == (0, AR)
    assert value.lstrip().startswith(f"{AUTHSERV_ID}; spf=")


# --- a resolver that does not answer -----------------------------------------------

@pytest.fixture
def dropping_proxy(dkim_world):
    """The world's unbound behind a proxy that drops what the test says."""
    proxy = QueryCountingProxy((dkim_world.address, dkim_world.port)).start()
    yield proxy
    proxy.stop()


def through(proxy: QueryCountingProxy) -> str:
    return f"dns: {{nameservers: [{proxy.address}], port: {proxy.port}, timeout: 0.5}}"


def test_an_spf_lookup_that_times_out_defers_at_rcpt_in_bounded_time(start_milter,
                                                                      dropping_proxy):
    dropping_proxy.drop = lambda name, rdtype: (name, rdtype) == ("other.example.", "TXT")
    process = start_milter(through(dropping_proxy))
    client = process.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@other.example>")
    started = time.monotonic()
    reply = client.rcpt("<b@own.example>")
    elapsed = time.monotonic() - started
    client.quit()
    assert reply.smtp == ("451", "4.7.24", "SPF temporary error for other.example "
                                           "(mailfrom), try again later")
    assert elapsed < 2.0   # dns.timeout 0.5 s, then the configured temperror action
    assert ("other.example.", "TXT") in dropping_proxy.questions


def test_a_dkim_key_lookup_that_times_out_is_a_bounded_temperror(start_milter, dropping_proxy,
                                                                 keys):
    dropping_proxy.drop = lambda name, rdtype: "._domainkey." in name
    process = start_milter(through(dropping_proxy))
    client = process.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@other.example>")
    assert client.rcpt("<b@own.example>").command == SMFIR_CONTINUE
    client.message(keys["other"].sign(message("a@other.example")))
    started = time.monotonic()
    reply = client.eom()
    elapsed = time.monotonic() - started
    client.quit()
    assert reply.command == SMFIR_ACCEPT   # RFC 8601 temperror: reported, not held back
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert "spf=pass" in value and "dkim=temperror" in value and "header.d=other.example" in value
    assert elapsed < 2.0
    assert (f"{keys['other'].record_name}.", "TXT") in dropping_proxy.questions


def test_dkim_key_lookups_that_time_out_share_one_budget(start_milter, dropping_proxy, keys):
    # Four signatures whose key lookups never return: each used to wait
    # dns.timeout in turn (issue 15: 5 signatures, 10 s at end of message);
    # now they wait together, within one dns.timeout for the stage.
    dropping_proxy.drop = lambda name, rdtype: "._domainkey." in name
    process = start_milter(through(dropping_proxy))
    client = process.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@other.example>")
    assert client.rcpt("<b@own.example>").command == SMFIR_CONTINUE
    signed = message("a@other.example")
    for name in ("own", "other", "signed", "ed"):
        signed = keys[name].sign(signed)
    client.message(signed)
    started = time.monotonic()
    reply = client.eom()
    elapsed = time.monotonic() - started
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert value.count("dkim=temperror") == 4, value
    assert elapsed < 0.5 + 0.4, elapsed
    for name in ("own", "other", "signed", "ed"):
        assert (f"{keys[name].record_name}.", "TXT") in dropping_proxy.questions


@pytest.mark.parametrize("argument, client, domain", [
    # Postfix delivers each as a@own.example (tok822 drops the comment,
    # unclosed or not): SPF fails from outside, as a@own.example does.
    ("<a@own.example(x@other.example>", "198.51.100.5", "own.example"),
    ("<a@own.example(x\\)@other.example>", "198.51.100.5", "own.example"),
    ('<"a@other.example"@own.example>', "198.51.100.5", "own.example"),
    ("<a@own.example (x)>", "198.51.100.5", "own.example"),
    # From a NAT network the relaxed rule is for own domains only: Postfix
    # delivers this one as a@other.example.
    ("<a@other.example(x@own.example>", "192.168.1.10", "other.example"),
])
def test_mail_from_is_read_as_postfix_delivers_it(start_milter, argument, client, domain):
    # Issue 15 review: the milter had read '<a@own.example(x@other.example>'
    # as other.example (spf=pass, accepted) and the last one as own.example
    # (nat.relaxed), while Postfix delivers the opposite domains.
    process = start_milter()
    milter = process.client()
    milter.conninfo(f"[{client}]", client)
    milter.helo("client.example")
    milter.mail(argument)
    reply = milter.rcpt("<b@own.example>")
    milter.quit()
    assert reply.command == SMFIR_REPLYCODE, reply
    assert reply.data.startswith(b"550 5.7.23"), reply.data
    assert f"SPF fail: {domain} does not designate".encode() in reply.data, reply.data
    assert "Traceback" not in process.log()


# --- DKIM ------------------------------------------------------------------------

def test_dkim_pass(milter, tmp_path, keys):
    raw = keys["other"].sign(message("a@other.example"))
    outcome = session(milter, tmp_path, raw, client_addr="198.51.100.10",
                      helo="helo.other.example", sender="a@other.example")
    assert outcome["eom"] == "accept"
    assert "dkim=pass (without dnssec) header.d=other.example header.s=rsa2 header.b=" \
        in outcome["ar"]


def test_dkim_pass_ed25519_and_rsa_both_reported(milter, tmp_path, keys):
    raw = keys["ed"].sign(keys["other"].sign(message("a@other.example")))
    outcome = session(milter, tmp_path, raw, client_addr="198.51.100.10",
                      helo="helo.other.example", sender="a@other.example")
    assert "dkim=pass (without dnssec) header.d=other.example header.s=ed1" in outcome["ar"]
    assert "header.s=rsa2" in outcome["ar"]


def test_dkim_pass_with_dnssec(milter, tmp_path, keys):
    raw = keys["signed"].sign(message("a@signed.example"))
    outcome = session(milter, tmp_path, raw, client_addr="198.51.100.10",
                      helo="helo.other.example", sender="a@signed.example")
    assert "spf=pass (with dnssec) smtp.mailfrom=signed.example" in outcome["ar"]
    assert "dkim=pass (with dnssec) header.d=signed.example header.s=sec1" in outcome["ar"]


def test_a_body_past_max_held_bytes_is_verified_as_it_arrives(start_milter, keys):
    process = start_milter("milter: {dkim: {max_held_bytes: 65536}}")
    body = "".join(f"line {n:06d} of a body larger than the ceiling\r\n" for n in range(40000))
    raw = keys["other"].sign(message("a@other.example", body=body))
    for content, result in ((raw, "dkim=pass"),
                            (raw.replace(b"line 039999", b"line 04OOOO"),
                             "dkim=fail (body hash mismatch; without dnssec)")):
        client = process.client()
        client.conninfo(*OTHER["client"])
        client.helo(OTHER["helo"])
        reply = whole_message(client, content)
        client.quit()
        assert reply.command == SMFIR_ACCEPT
        assert result in reply.headers(SMFIR_INSHEADER)[0][2]
    assert "Traceback" not in process.log()


def test_dkim_fail_when_the_body_changed(milter, tmp_path, keys):
    raw = keys["other"].sign(message("a@other.example", body="Pay 10 EUR.\r\n"))
    outcome = session(milter, tmp_path, raw.replace(b"10 EUR", b"99 EUR"),
                      client_addr="198.51.100.10", helo="helo.other.example",
                      sender="a@other.example")
    assert outcome["eom"] == "accept"
    assert "dkim=fail (body hash mismatch" in outcome["ar"]


def test_dkim_none_and_permerror(milter, tmp_path, keys):
    unsigned = session(milter, tmp_path, message("a@other.example"),
                       client_addr="198.51.100.10", helo="helo.other.example",
                       sender="a@other.example")
    assert "; dkim=none" in unsigned["ar"]
    no_key = rsa_key("other.example", "unpublished", bits=1024)
    orphan = session(milter, tmp_path, no_key.sign(message("a@other.example")),
                     client_addr="198.51.100.10", helo="helo.other.example",
                     sender="a@other.example")
    assert "dkim=permerror (no key published; without dnssec) header.d=other.example " \
           "header.s=unpublished" in orphan["ar"]


@pytest.mark.parametrize("value", [b"@", b"!!", b'"', b"-_-", b"="], ids=repr)
def test_dkim_b_without_base64_is_neutral_and_the_message_delivered(milter, tmp_path, keys,
                                                                    value):
    signed = keys["other"].sign(message("a@other.example"))
    head, _, rest = signed.partition(b"\r\n\r\n")
    broken, count = re.subn(rb"([;\s]b=)[^;]*?(\r\n(?=\S))",
                            lambda m: m.group(1) + value + m.group(2), head, count=1)
    assert count == 1
    outcome = session(milter, tmp_path, broken + b"\r\n\r\n" + rest,
                      client_addr="198.51.100.10", helo="helo.other.example",
                      sender="a@other.example")
    assert outcome["eom"] == "accept"
    assert "spf=pass (without dnssec) smtp.mailfrom=other.example" in outcome["ar"]
    assert "dkim=neutral (signature does not parse: b= is not base64; without dnssec) " \
           "header.d=other.example header.s=rsa2" in outcome["ar"]
    assert "header.b" not in outcome["ar"]
    assert "Traceback" not in milter.log()


# --- NAT own-domain mail ----------------------------------------------------------

def test_nat_own_domain_with_aligned_signature_is_accepted(milter, tmp_path, keys):
    raw = keys["own"].sign(message("staff@own.example"))
    outcome = session(milter, tmp_path, raw, client_addr="192.168.1.20",
                      helo="mx.own.example", sender="staff@own.example")
    assert (outcome["rcpt"], outcome["eom"]) == ("continue", "accept")
    assert "policy.nat-relaxed=203.0.113.7" in outcome["ar"]
    assert "dkim=pass (without dnssec) header.d=own.example" in outcome["ar"]


@pytest.mark.parametrize("signer", [None, "other"])
def test_nat_own_domain_without_aligned_signature_is_rejected(milter, tmp_path, keys, signer):
    raw = message("staff@own.example")
    if signer:
        raw = keys[signer].sign(raw)
    outcome = session(milter, tmp_path, raw, client_addr="fd00::1:5", helo="mx.own.example",
                      sender="staff@own.example", eom_code="550", eom_status="5.7.20",
                      eom_text="Own-domain mail from a NAT network must carry a valid "
                               "DKIM signature")
    assert (outcome["rcpt"], outcome["eom"]) == ("continue", "replycode")
    assert outcome["smtpreply"] == "true"
    assert outcome["inserted"] == "false"


def test_own_domain_spoofed_from_outside_is_rejected_at_rcpt(milter, tmp_path):
    outcome = session(milter, tmp_path, client_addr="198.51.100.99", helo="mx.own.example",
                      sender="staff@own.example")
    assert outcome["rcpt"] == "replycode"


def test_sasl_authenticated_client_is_not_checked(milter, tmp_path):
    outcome = session(milter, tmp_path, client_addr="198.51.100.99", helo="laptop",
                      sender="staff@own.example", auth="alice")
    assert (outcome["rcpt"], outcome["eom"]) == ("continue", "accept")
    assert "spf=" not in outcome["ar"] and "dkim=none" in outcome["ar"]


# --- one connection, several messages ----------------------------------------------

def test_state_is_reset_between_messages(milter, tmp_path, keys):
    first = tmp_path / "first.eml"
    first.write_bytes(keys["other"].sign(message(
        "a@other.example", extra_headers=f"{AR}: {AUTHSERV_ID}; spf=pass\r\n")))
    second = tmp_path / "second.eml"
    second.write_bytes(message("b@other.example"))
    outcome = miltertest("two_messages.lua", sock=milter.listen, client_addr="198.51.100.10",
                         helo="helo.other.example", first_sender="a@other.example",
                         first=first, second_sender="b@other.example", second=second)
    assert (outcome["first.eom"], outcome["second.eom"]) == ("accept", "accept")
    assert outcome["first.deleted"] == "true" and outcome["second.deleted"] == "false"
    assert "dkim=pass" in outcome["first.ar"] and "dkim=none" in outcome["second.ar"]
    assert "smtp.mailfrom=other.example" in outcome["second.ar"]


# --- bad input -------------------------------------------------------------------

def test_garbage_and_eight_bit_header_fields(milter, tmp_path):
    raw = (b"From: a@other.example\r\n"
           b"this line is no header field\r\n"
           b"X-Long: " + b"y" * 900 + b"\r\n"   # miltertest overflows its stack near 2 KiB
           b"X-Binary: \xff\xfe caf\xc3\xa9 \x01\x02\r\n"
           b"Subject: =?utf-8?q?caf=C3=A9?= \xe2\x82\xac\r\n\r\n"
           b"body \xff\r\n")
    outcome = session(milter, tmp_path, raw, client_addr="198.51.100.10",
                      helo="helo.other.example", sender="a@other.example")
    assert (outcome["rcpt"], outcome["eom"]) == ("continue", "accept")
    assert "spf=pass" in outcome["ar"]
    assert "Traceback" not in milter.log()


def test_huge_header_lines_and_body(milter, keys):
    # miltertest 2.11 crashes on fields of a few KiB; this client does not.
    # libmilter takes packets of at most 65535 octets (MILTER_MAX_DATA_SIZE;
    # pymilter cannot raise it), so a field of 60000 octets is about the
    # largest an MTA can hand to any libmilter milter.
    raw = keys["other"].sign(message("a@other.example", body="z" * 200000 + "\r\n",
                                     extra_headers="X-Huge: " + "y" * 60000 + "\r\n"))
    client = milter.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@other.example>")
    assert client.rcpt("<b@own.example>").command == SMFIR_CONTINUE
    client.message(raw)
    reply = client.eom()
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert "dkim=pass" in value


def test_field_too_big_for_libmilter_ends_only_that_session(milter, tmp_path):
    client = milter.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@other.example>")
    client.rcpt("<b@own.example>")
    with pytest.raises((OSError, ProtocolError)):
        client.message(message("a@other.example",
                               extra_headers="X-Huge: " + "y" * 70000 + "\r\n"))
        client.eom()
    client.close()
    assert session(milter, tmp_path, client_addr="198.51.100.10", helo="helo.other.example",
                   sender="a@other.example")["eom"] == "accept"


def test_non_utf8_and_eight_bit_envelope(milter, tmp_path):
    client = milter.client()
    client.conninfo("[198.51.100.99]", "198.51.100.99")
    client.helo("evil \xe9.example".encode("latin-1"))
    client.mail(b"<\xff\xfe@own.example>")
    rejected = client.rcpt(b"<\xc3\xa9@own.example>")
    client.mail("<b\u00fccher@own.example>".encode())
    rejected_utf8 = client.rcpt("<x@own.example>")
    client.quit()
    for reply in (rejected, rejected_utf8):
        code, status, text = reply.smtp
        assert (reply.command, code, status) == (SMFIR_REPLYCODE, "550", "5.7.23")
        assert text.isascii() and text.isprintable()
    # Still serving.
    assert session(milter, tmp_path, client_addr="198.51.100.10", helo="helo.other.example",
                   sender="a@other.example")["eom"] == "accept"
    assert "Traceback" not in milter.log()


# --- input pymilter cannot decode, and commands out of the usual order ---------
#
# Each sequence goes through the real libmilter with bench/milter_client.py,
# which sends whatever octets and order it is told.  pymilter's C module
# decodes the connect host name, the HELO name and field names as strict
# UTF-8 before any Python runs; libmilter drops a command that does not fit
# its state (and runs abort when a message was in progress).

OTHER = {"client": ("[198.51.100.10]", "198.51.100.10"), "helo": "helo.other.example",
         "sender": "<a@other.example>"}
TEMPFAIL_UNKNOWN_CLIENT = ("451", "4.3.0", "Temporary local problem, try again later")


class LogSince:
    """The milter log written since this was made."""

    def __init__(self, process: MilterProcess):
        self.process, self.start = process, len(process.log())

    def text(self) -> str:
        return self.process.log()[self.start:]

    def assert_clean(self) -> None:
        text = self.text()
        assert "Traceback" not in text and "Error:" not in text, text


def whole_message(client: MilterClient, raw: bytes | None = None) -> Reply:
    """MAIL, RCPT, the message and end of message from a well-behaved client."""
    client.mail(OTHER["sender"])
    rcpt = client.rcpt("<b@own.example>")
    assert rcpt.command == SMFIR_CONTINUE, rcpt
    client.message(raw or message("a@other.example"))
    return client.eom()


def no_reply(client: MilterClient) -> bool:
    """True when the milter sends nothing within a second (libmilter
    dropped the command); the session goes on afterwards."""
    timeout = client.sock.gettimeout()
    client.sock.settimeout(1.0)
    try:
        client.reply()
    except TimeoutError:
        return True
    finally:
        client.sock.settimeout(timeout)
    return False


def test_connect_host_name_not_utf8_is_deferred_not_accepted_unchecked(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(b"mail\xff.other.example", "198.51.100.10")
    client.helo(OTHER["helo"])
    client.mail(OTHER["sender"])
    rcpt = client.rcpt("<b@own.example>")
    client.message(message("a@other.example"))
    eom = client.eom()
    client.quit()
    assert rcpt.command == eom.command == SMFIR_REPLYCODE
    assert rcpt.smtp == eom.smtp == TEMPFAIL_UNKNOWN_CLIENT
    milter.wait_for_log("connect: the host name is not UTF-8 (mail?.other.example)")
    assert log.text().count("connect did not reach the milter") == 1   # one line per message
    log.assert_clean()


def test_odd_connect_and_helo_through_miltertest(milter, tmp_path):
    # The same through OpenDKIM's miltertest, an MTA side not written by us
    # (arguments that are not UTF-8 reach it as their octets).
    log = LogSince(milter)
    deferred = session(milter, tmp_path, client_host="mail\udcff.other.example",
                       client_addr="198.51.100.10", helo="helo.other.example",
                       sender="a@other.example")
    checked = session(milter, tmp_path, client_addr="198.51.100.10",
                      helo="helo\udce9.other.example", sender="a@other.example")
    assert deferred["rcpt"] == "replycode"
    assert (checked["rcpt"], checked["eom"]) == ("continue", "accept")
    assert "spf=pass (without dnssec) smtp.mailfrom=other.example" in checked["ar"]
    milter.wait_for_log("helo=helo?.other.example ")
    log.assert_clean()


def test_mail_before_connect_is_deferred_not_accepted_unchecked(milter):
    log = LogSince(milter)
    client = milter.client()
    client.mail(OTHER["sender"])
    rcpt = client.rcpt("<b@own.example>")
    client.message(message("a@other.example"))
    eom = client.eom()
    client.quit()
    assert rcpt.smtp == eom.smtp == TEMPFAIL_UNKNOWN_CLIENT
    milter.wait_for_log("RCPT of a connection whose connect did not reach the milter")
    log.assert_clean()


def test_helo_not_utf8_is_still_checked_as_an_invalid_name(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.helo(b"helo\xe9.other.example")
    reply = whole_message(client)
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert "spf=pass" in value and "\xe9" not in value and value.isascii()
    milter.wait_for_log("helo=helo?.other.example ")
    (line,) = [line for line in log.text().splitlines() if "action=" in line]
    # The engine judged the name it was given (before: helo="", the HELO
    # lost): no domain name, so no SPF HELO check (RFC 7208 §2.3), as the
    # policy service decides for the same HELO.
    assert "spf.helo=" not in line
    assert "HELO name is not UTF-8" in log.text()
    log.assert_clean()


def test_envelope_not_utf8_reaches_the_engine_escaped(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.helo(OTHER["helo"])
    client.mail(b"<a\xff@other.example>")
    assert client.rcpt(b"<b\xfe@own.example>").command == SMFIR_CONTINUE
    client.message(message("a@other.example"))
    reply = client.eom()
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert "smtp.mailfrom=other.example" in value and value.isascii()
    milter.wait_for_log("sender=a?@other.example ")
    log.assert_clean()


def test_field_name_not_utf8_leaves_dkim_unverified_not_failed(milter, keys):
    log = LogSince(milter)
    raw = keys["other"].sign(message("a@other.example"))
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.helo(OTHER["helo"])
    client.mail(OTHER["sender"])
    client.rcpt("<b@own.example>")
    client.header(b"X-\xff".decode("latin-1"), "odd")   # sent as UTF-8: not the bytes
    client.send(b"L", b"X-\xff\0odd\0")                  # the raw octets
    client.message(raw)
    reply = client.eom()
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert "dkim=neutral (message header does not parse)" in value
    milter.wait_for_log("a header field name is not UTF-8")
    log.assert_clean()


def test_macros_not_utf8_are_taken_as_received(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(*OTHER["client"], macros={"{client_resolve}": "OK",
                                              "{client_ptr}": "ptr\udcff.other.example",
                                              "{client_name}": "name\udcfe.other.example"})
    client.helo(OTHER["helo"])
    client.mail(OTHER["sender"], macros={"i": "Q\udcff1"})
    client.rcpt("<b@own.example>", macros={"i": "Q\udcff2"})
    client.message(message("a@other.example"))
    reply = client.eom(macros={"i": "Q\udcff3"})
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    ((_, _, value),) = reply.headers(SMFIR_INSHEADER)
    assert "spf=pass" in value and value.isascii() and value.isprintable()
    # An authenticated client's name in a macro that is not UTF-8.
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.helo(OTHER["helo"])
    client.mail(OTHER["sender"], macros={"{auth_authen}": "al\udcc3ce"})
    client.rcpt("<b@own.example>")
    client.message(message("a@other.example"))
    assert client.eom().command == SMFIR_ACCEPT
    client.quit()
    milter.wait_for_log("Q?3: action=ACCEPT")
    assert "macro {client_ptr} is not UTF-8 (ptr?.other.example)" in log.text()
    assert log.text().count("macro i is not UTF-8") == 1   # once a session, not per stage
    log.assert_clean()


def test_macro_packets_with_a_name_and_no_value_do_not_crash_a_worker(start_milter):
    # libmilter's smfi_getsymval walks a macro list two strings at a time:
    # one of odd length made it read past the list's end, and a worker died
    # of SIGSEGV now and then (the battery's milter-fuzz: 2 in 290 sessions).
    # Packets of random octets, as the battery sends, make the odd lists and
    # the garbage past them; each session then reads its macros.
    process = start_milter("milter: {workers: 1}")
    rng = random.Random(15)
    log = LogSince(process)
    for number in range(300):
        client = process.client()
        if number == 0:
            client.send(b"D", b"Cno NUL at all")   # a list of no strings comes first
        client.conninfo(*OTHER["client"])
        client.helo(OTHER["helo"])
        stage = rng.choice([b"C", b"H", b"M", b"R", b"E"])
        client.send(b"D", stage + bytes(rng.randrange(256) for _ in range(rng.randint(0, 100))))
        client.send(b"D", b"M" + b"i\0" * rng.choice([1, 3]))
        reply = whole_message(client)
        client.quit()
        assert reply.command in (SMFIR_ACCEPT, SMFIR_REPLYCODE), (number, reply)
        assert process.process.poll() is None, process.log()
    assert "macro without a value" in log.text()
    assert "not laid out as expected" not in log.text()
    log.assert_clean()


def test_headers_before_mail_are_dropped_and_the_session_goes_on(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.helo(OTHER["helo"])
    client.header("From", "a@other.example")
    client.body(b"early body\r\n")
    reply = whole_message(client)
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    assert "spf=pass" in reply.headers(SMFIR_INSHEADER)[0][2]
    log.assert_clean()


def test_body_before_headers_and_eom_without_mail_get_no_answer(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.helo(OTHER["helo"])
    client.send(b"E")                       # end of message, no MAIL
    assert no_reply(client)
    client.mail(OTHER["sender"])
    client.rcpt("<b@own.example>")
    client.body(b"body first\r\n")
    client.header("From", "a@other.example")   # libmilter aborts the message here
    client.send(b"E")
    assert no_reply(client)
    reply = whole_message(client)            # and the next message is whole again
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    log.assert_clean()


def test_abort_before_connect_makes_libmilter_drop_the_connect(milter):
    # libmilter takes no CONNECT after an ABORT (engine.c: the state is
    # HELO then): the connection is one we never saw open, deferred.
    log = LogSince(milter)
    client = milter.client()
    client.abort()
    client.conninfo(*OTHER["client"])
    client.helo(OTHER["helo"])
    client.mail(OTHER["sender"])
    reply = client.rcpt("<b@own.example>")
    client.quit()
    assert reply.smtp == TEMPFAIL_UNKNOWN_CLIENT
    milter.wait_for_log("RCPT of a connection whose connect did not reach the milter")
    log.assert_clean()


def test_abort_anywhere_and_a_second_mail_without_abort(milter):
    log = LogSince(milter)
    client = milter.client()
    client.conninfo(*OTHER["client"])
    client.abort()
    client.helo(OTHER["helo"])
    client.abort()
    client.abort()
    client.mail(OTHER["sender"])
    client.abort()                                           # after MAIL
    client.mail("<staff@own.example>")                       # a spoof, then
    client.mail(OTHER["sender"])                             # another MAIL, no abort
    first = client.rcpt("<b@own.example>")
    assert first.command == SMFIR_CONTINUE, first
    client.header("From", "a@other.example")
    client.abort()                                           # inside the header
    reply = whole_message(client)
    client.mail("<staff@own.example>")                       # after a message
    spoof = client.rcpt("<b@own.example>")
    client.quit()
    assert reply.command == SMFIR_ACCEPT
    assert "spf=pass" in reply.headers(SMFIR_INSHEADER)[0][2]
    assert spoof.smtp[:2] == ("550", "5.7.23")
    log.assert_clean()


def test_reply_texts_at_rcpt(milter):
    cases = {"a@temperror.example": ("451", "4.7.24", "SPF temporary error for "
                                     "temperror.example (mailfrom), try again later"),
             "a@own.example": ("550", "5.7.23", "SPF fail: own.example does not designate "
                               "this host as a permitted sender (mailfrom)")}
    for sender, expected in cases.items():
        client = milter.client()
        client.conninfo("[198.51.100.10]", "198.51.100.10")
        client.helo("helo.other.example")
        client.mail(f"<{sender}>")
        reply = client.rcpt("<b@own.example>")
        client.quit()
        assert reply.smtp == expected


# --- sockets -----------------------------------------------------------------------

def test_listens_on_inet_and_inet6(start_milter, tmp_path):
    for kind, host in (("inet", "127.0.0.1"), ("inet6", "::1")):
        with socket.socket(socket.AF_INET6 if kind == "inet6" else socket.AF_INET) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        process = start_milter(listen=f"{kind}:{port}@{host}")
        client = process.client()
        client.conninfo("[2001:db8:6::25]", "2001:db8:6::25")
        client.helo("mail6.other.example")
        client.mail("<a@other.example>")
        assert client.rcpt("<b@own.example>").command == SMFIR_CONTINUE
        client.message(message("a@other.example"))
        assert client.eom().command == SMFIR_ACCEPT
        client.quit()
        process.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_unix_socket_is_removed_at_stop(start_milter, workers):
    process = start_milter(f"milter: {{workers: {workers}}}\n")
    path = process.listen.partition(":")[2]
    assert os.path.exists(path)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert not os.path.exists(path)


def established(port: int) -> collections.Counter[int]:
    """Connections to `port` accepted by each process (pid -> count), as
    ss(8) shows them; connections still waiting in a listener's queue
    belong to no process yet, and are not counted."""
    shown = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                           capture_output=True, text=True, check=True).stdout
    return collections.Counter(int(pid) for pid in re.findall(r"pid=(\d+),", shown))


def waiting_for(port: int, pids: set[int]) -> int:
    """Connections waiting to be accepted on the listening sockets of
    `port` that any of `pids` can accept from (ss(8): a listener's Recv-Q
    is its accept queue)."""
    shown = subprocess.run(["ss", "-tlnpH", f"( sport = :{port} )"],
                           capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[1]) for line in shown.splitlines()
               if pids & {int(pid) for pid in re.findall(r"pid=(\d+),", line)})


def burst(port: int, count: int, workers: set[int], busy: set[int]) -> collections.Counter[int]:
    """`count` connections at once, made while the workers `busy` are
    stopped and the others accept what they can; then how many each worker
    has accepted, once the busy ones have gone on too."""
    with paused(busy):
        connections = [socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
                       for _ in range(count)]
        deadline = time.monotonic() + PATIENCE
        while waiting_for(port, workers - busy):
            assert time.monotonic() < deadline, "the running workers do not accept"
            time.sleep(0.02)
    try:
        deadline = time.monotonic() + PATIENCE
        while sum((accepted := established(port)).values()) < count:
            assert time.monotonic() < deadline, f"only {accepted} of {count} accepted"
            time.sleep(0.02)
        return accepted
    finally:
        for connection in connections:
            connection.close()


def test_workers_on_tcp_stop_cleanly_every_time(start_milter):
    """A stopping worker wakes libmilter's select() by connecting to its
    socket; with SO_REUSEPORT another worker's wake-up can land on it and
    end its loop first, which closes the socket.  Its address is taken
    before the stop: read after it, the descriptor was gone about one stop
    in two (a traceback and exit status 70 from a worker)."""
    for _ in range(8):
        port = free_tcp_port()
        process = start_milter("milter: {workers: 4}\n", listen=f"inet:{port}@127.0.0.1")
        process.workers()
        process.signal(signal.SIGTERM)
        assert process.wait() == 0, process.log()
        assert "Traceback" not in process.log() and " failed" not in process.log()


def test_a_burst_of_connections_is_spread_over_the_workers(start_milter):
    """Over TCP each worker has a socket of its own (SO_REUSEPORT) and the
    kernel picks the worker of a connection as it arrives: a worker that
    is busy at that moment (here: stopped) still gets its share, instead
    of the other accepting the whole burst (with one shared socket it did,
    and even with both idle one of them often took nearly all).  With 2
    workers the chance that a fair hash gives one fewer than 8 of 32 is
    below 0.1 %."""
    port = free_tcp_port()
    process = start_milter("milter: {workers: 2}\n", listen=f"inet:{port}@127.0.0.1")
    workers = process.workers()
    assert "a socket each (SO_REUSEPORT)" in process.log()
    for busy in ({workers[1]}, set()):
        accepted = burst(port, 32, set(workers.values()), busy)
        assert set(accepted) == set(workers.values()), accepted
        assert min(accepted.values()) >= 8, f"{accepted} (stopped: {busy})"


# --- sessions and the processes that answer them -------------------------------------

@dataclass
class OpenSession:
    client: MilterClient
    reply: Reply          # to the first RCPT
    pid: int              # the process that decided, from its log line
    action: str           # as logged: REJECT, DEFER


def open_session(process: MilterProcess) -> OpenSession:
    """A session from 198.51.100.10 claiming own.example, whose SPF record
    leaves that address out: the RCPT is not accepted, so the decision is
    logged at once, under a queue id of its own, by the process that made
    it.  The session stays open for more."""
    queue_id = "T" + uuid.uuid4().hex[:10].upper()
    client = process.client()
    client.conninfo("[198.51.100.10]", "198.51.100.10")
    client.helo("helo.other.example")
    client.mail("<a@own.example>")
    reply = client.rcpt("<b@own.example>", macros={"i": queue_id})
    # Logged before the reply is sent; polled all the same.
    line = re.compile(rf"^policyd\[(\d+)\]: INFO: {queue_id}: action=(\w+) ", re.MULTILINE)
    deadline = time.monotonic() + PATIENCE
    while not (found := line.search(process.log())):
        assert time.monotonic() < deadline, f"{queue_id} not logged:\n{process.log()}"
        time.sleep(0.02)
    return OpenSession(client, reply, int(found[1]), found[2])


def deciders(process: MilterProcess, workers: int) -> set[int]:
    """The PIDs of the processes that decide: the workers, or the milter itself."""
    return set(process.workers().values()) if workers > 1 else {process.process.pid}


@contextlib.contextmanager
def paused(pids: set[int]):
    """The processes stopped (SIGSTOP, every thread) for the duration, so
    that only the others can accept a connection.  Only for a moment with
    no connection pending: a worker stopped right after accept() would
    hold the connection until it goes on."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + PATIENCE
        for pid in pids:
            for task in Path(f"/proc/{pid}/task").iterdir():
                # proc(5) stat field 3: T once the thread has stopped.
                while (task / "stat").read_text().rpartition(")")[2].split()[0] != "T":
                    assert time.monotonic() < deadline, f"{pid} did not stop"
                    time.sleep(0.01)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def sessions_on_each(process: MilterProcess, pids: set[int]) -> dict[int, OpenSession]:
    """One open session answered by each of `pids`.  Which worker accepts a
    connection is the kernel's choice (the first to get there), so the
    others are paused while each one's session opens: the session must
    still be answered, by that one."""
    kept: dict[int, OpenSession] = {}
    for pid in sorted(pids):
        with paused(pids - {pid}):
            session = open_session(process)
        kept[pid] = session
        assert session.pid == pid, f"pid {session.pid} answered, not {pid} of {pids}"
    return kept


def wait_for_new_worker(process: MilterProcess, number: int, old_pid: int) -> dict[int, int]:
    deadline = time.monotonic() + PATIENCE
    while (workers := process.workers())[number] == old_pid:
        assert time.monotonic() < deadline, f"worker {number} not replaced:\n{process.log()}"
        time.sleep(0.02)
    return workers


def test_the_default_workers_all_answer(start_milter):
    process = start_milter()
    workers = process.workers()
    count = MilterConfig().workers
    assert sorted(workers) == list(range(1, count + 1)) and len(set(workers.values())) == count
    # Forked by the milter, which decides nothing itself.
    assert process.children() == set(workers.values())
    sessions = sessions_on_each(process, set(workers.values()))
    for session in sessions.values():
        assert session.action == "REJECT"
        assert session.reply.smtp[:2] == ("550", "5.7.23")
        session.client.quit()


def test_workers_share_their_dns_answers(start_milter, dkim_world):
    """The same session through every worker: only the first one's
    questions reach the DNS; the others find its answers in the table the
    workers share (dns.SharedAnswers), not only in their own caches."""
    proxy = QueryCountingProxy((dkim_world.address, dkim_world.port)).start()
    try:
        process = start_milter(f"dns: {{nameservers: ['{proxy.address}'], "
                               f"port: {proxy.port}}}\n")
        workers = set(process.workers().values())
        assert len(workers) > 1
        for session in sessions_on_each(process, workers).values():
            session.client.quit()
        asked = collections.Counter(proxy.questions)
        assert asked and max(asked.values()) == 1, asked
    finally:
        proxy.stop()


def test_concurrent_sessions_are_all_answered_by_workers(start_milter):
    process = start_milter()
    workers = set(process.workers().values())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sessions = list(pool.map(lambda _: open_session(process), range(48)))
    for session in sessions:
        session.client.quit()
    assert all(s.action == "REJECT" and s.reply.smtp[0] == "550" for s in sessions)
    assert {s.pid for s in sessions} <= workers     # never the supervisor


def test_one_worker_is_the_milter_process_itself(start_milter):
    process = start_milter("milter: {workers: 1}\n")
    session = open_session(process)
    session.client.quit()
    assert session.pid == process.process.pid
    assert process.children() == set()
    assert "milter worker" not in process.log()


# --- signals ----------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reloads_and_a_bad_config_keeps_the_old_one(start_milter, workers):
    process = start_milter(f"milter: {{workers: {workers}}}\n")
    pids = deciders(process, workers)
    # Sessions that began before the reload keep their engine.
    old_sessions = sessions_on_each(process, pids)

    original = process.config_path.read_text()
    process.config_path.write_text(original + "spf: {mailfrom: {on_fail: defer}}\n")
    process.signal(signal.SIGUSR1)
    process.wait_for_log("reloaded config", count=len(pids))
    reloaded = [int(pid) for pid in re.findall(r"^policyd\[(\d+)\]: INFO: reloaded config ",
                                               process.log(), re.MULTILINE)]
    assert sorted(reloaded) == sorted(pids)
    for session in sessions_on_each(process, pids).values():
        assert session.action == "DEFER" and session.reply.smtp[0] == "451"
        session.client.quit()
    for session in old_sessions.values():
        session.client.mail("<a@own.example>")
        assert session.client.rcpt("<b@own.example>").smtp[0] == "550"
        session.client.quit()

    process.config_path.write_text(original + "spf: {mailfrom: {on_fail: rejct}}\n")
    process.signal(signal.SIGUSR1)
    process.wait_for_log("reload refused, keeping the running config")
    refused = [line for line in process.log().splitlines() if "reload refused" in line]
    assert len(refused) == 1 and "'rejct' is not one of" in refused[0]
    # Said once, by the milter process: no worker was asked to reload it.
    assert refused[0].startswith(f"policyd[{process.process.pid}]: ERROR: ")
    assert process.log().count("reloaded config") == len(pids)
    for session in sessions_on_each(process, pids).values():
        assert session.action == "DEFER"          # still the reloaded config
        session.client.quit()
    assert process.process.poll() is None


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_says_which_socket_settings_wait_for_a_restart(start_milter, workers):
    process = start_milter(f"milter: {{workers: {workers}}}\n")
    deciders(process, workers)
    settings = yaml.safe_load(process.config_path.read_text())
    settings["milter"].update(socket_mode="0600", socket_group="mail")
    process.config_path.write_text(yaml.safe_dump(settings))
    process.signal(signal.SIGUSR1)
    process.wait_for_log("reloaded config")
    for key in ("socket_mode", "socket_group"):
        assert f"reload: milter.{key} changed; restart to apply it" in process.log()
    assert "milter.listen changed" not in process.log()


def test_every_worker_reloads_the_config_the_supervisor_validated(start_milter):
    """The file breaks between the supervisor's reading and a worker's
    turn to reload (worker 1 is stopped meanwhile): the worker still gets
    the config the supervisor read, as every other worker does, and none
    refuses it."""
    process = start_milter()
    workers = process.workers()
    original = process.config_path.read_text()
    with paused({workers[1]}):
        process.config_path.write_text(original + "spf: {mailfrom: {on_fail: defer}}\n")
        process.signal(signal.SIGUSR1)
        process.wait_for_log(f"reload: config {process.config_path} is valid; "
                             f"passing it to {len(workers)} worker(s)")
        process.config_path.write_text(original + "spf: {mailfrom: {on_fail: rejct}}\n")
    outcome = re.compile(r"^policyd\[(\d+)\]: \w+: (reloaded config|reload refused)",
                         re.MULTILINE)
    deadline = time.monotonic() + PATIENCE
    while len(outcome.findall(process.log())) < len(workers):
        assert time.monotonic() < deadline, f"not every worker reloaded:\n{process.log()}"
        time.sleep(0.02)
    assert sorted(outcome.findall(process.log())) == sorted(
        (str(pid), "reloaded config") for pid in workers.values()), process.log()
    for session in sessions_on_each(process, set(workers.values())).values():
        assert session.action == "DEFER" and session.reply.smtp[0] == "451"
        session.client.quit()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sessions = list(pool.map(lambda _: open_session(process), range(16)))
    for session in sessions:
        session.client.quit()
    assert {s.action for s in sessions} == {"DEFER"}


def test_a_worker_that_does_not_read_its_reloads_is_replaced(start_milter):
    """Reloads sent to a worker that does not read them (stopped here) fill
    its pipe; the supervisor does not wait for it, but stops it, and the
    worker started in its place runs the config of the last reload."""
    process = start_milter()
    workers = process.workers()
    original = process.config_path.read_text()
    process.config_path.write_text(original + "spf: {mailfrom: {on_fail: defer}}\n")
    given_up = f"worker 1 (pid {workers[1]}) does not take its reloads"
    with paused({workers[1]}):
        for count in range(1, 500):
            process.signal(signal.SIGUSR1)
            process.wait_for_log(f"passing it to {len(workers)} worker(s)", count=count)
            if given_up in process.log():
                break
        assert given_up in process.log()
    process.wait_for_log(f"worker 1 (pid {workers[1]}) exited with status 0; "
                         "starting a new one")
    after = wait_for_new_worker(process, 1, workers[1])
    assert {number: pid for number, pid in after.items() if number != 1} == \
        {number: pid for number, pid in workers.items() if number != 1}
    for session in sessions_on_each(process, set(after.values())).values():
        assert session.action == "DEFER"
        session.client.quit()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_sessions_in_flight_finish(start_milter, workers):
    process = start_milter(f"milter: {{workers: {workers}, drain_timeout: 10}}\n")
    path = process.listen.partition(":")[2]
    pids = deciders(process, workers)
    sessions = sessions_on_each(process, pids)    # one in flight in each process
    process.signal(signal.SIGTERM)
    process.wait_for_log("stopping: new connections are refused", count=len(pids))
    # At least the session kept; the others' QUIT may still be on its way.
    in_flight = dict(re.findall(r"^policyd\[(\d+)\]: INFO: stopping: new connections are "
                                r"refused, (\d+) session", process.log(), re.MULTILINE))
    assert {int(pid) for pid in in_flight} == pids
    assert all(int(count) >= 1 for count in in_flight.values())
    with pytest.raises((OSError, ProtocolError)):
        process.client()                           # refused at negotiation
    for session in sessions.values():
        finish_with_a_message(session)
        assert process.process.poll() is None      # still waiting for this session
        session.client.quit()
    assert process.wait() == 0
    assert process.log().rstrip().endswith("stopped")
    assert not os.path.exists(path)
    assert not any(map(alive, pids))


def finish_with_a_message(session: OpenSession) -> None:
    """A second message in the session, accepted with our header."""
    client = session.client
    client.mail("<a@other.example>")
    assert client.rcpt("<b@own.example>").command == SMFIR_CONTINUE
    client.message(message("a@other.example"))
    reply = client.eom()
    assert reply.command == SMFIR_ACCEPT and reply.headers(SMFIR_INSHEADER)


def test_the_stop_reaches_workers_past_libmilters_signal_thread(start_milter):
    """Right after a SIGSTOP/SIGCONT a worker's main thread has a signal
    pending, and a SIGTERM coming then can be taken by libmilter's signal
    thread instead, which leaves the sessions in flight unserved (the
    milter/server.py's comments; about one time in six when this was written).  The
    supervisor stops its workers with SIGUSR2, which libmilter does not
    wait for: the sessions finish every time."""
    for _ in range(6):
        process = start_milter("milter: {drain_timeout: 10}\n")
        pids = deciders(process, 2)
        sessions = sessions_on_each(process, pids)
        with paused(pids):
            pass
        process.signal(signal.SIGTERM)
        for session in sessions.values():
            finish_with_a_message(session)
            session.client.quit()
        assert process.wait() == 0, process.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_gives_up_on_sessions_after_the_drain_timeout(start_milter, workers):
    process = start_milter(f"milter: {{workers: {workers}, drain_timeout: 0.5}}\n")
    session = open_session(process)
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait() == 0
    assert time.monotonic() - started < PATIENCE
    assert "stopped with 1 session(s) still open after 0.5 s" in process.log()
    session.client.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_stops_as_libmilter_does(start_milter, workers):
    process = start_milter(f"milter: {{workers: {workers}}}\n")
    pids = deciders(process, workers)
    process.signal(signal.SIGHUP)
    assert process.wait() == 0
    assert "SIGHUP stops the milter" in process.log()
    assert not any(map(alive, pids))


# --- workers that die ----------------------------------------------------------------

def test_a_killed_worker_is_replaced(start_milter):
    process = start_milter()
    before = process.workers()
    os.kill(before[1], signal.SIGKILL)
    process.wait_for_log(f"worker 1 (pid {before[1]}) was killed by SIGKILL; "
                         "starting a new one")
    after = wait_for_new_worker(process, 1, before[1])
    assert after[2] == before[2]
    assert process.children() == set(after.values())
    for session in sessions_on_each(process, set(after.values())).values():
        assert session.action == "REJECT"
        session.client.quit()


def test_workers_that_keep_dying_stop_the_milter(start_milter):
    process = start_milter()
    path = process.listen.partition(":")[2]
    workers = process.workers()
    for _ in range(supervision.RESTART_LIMIT):
        os.kill(workers[1], signal.SIGKILL)
        workers = wait_for_new_worker(process, 1, workers[1])
    os.kill(workers[1], signal.SIGKILL)
    assert process.wait() == milter_server.EX_SOFTWARE
    assert (f"worker 1 (pid {workers[1]}) was killed by SIGKILL; more than "
            f"{supervision.RESTART_LIMIT} workers replaced within 60 s, stopping the milter"
            in process.log())
    assert process.log().rstrip().endswith("stopped")
    assert not os.path.exists(path)
    assert not alive(workers[2])   # drained and gone


def test_workers_stop_when_the_supervisor_is_killed(start_milter):
    process = start_milter("milter: {drain_timeout: 10}\n")
    pids = set(process.workers().values())
    session = open_session(process)
    process.process.kill()
    process.process.wait()
    # The session in flight is finished, then the workers go.
    finish_with_a_message(session)
    session.client.quit()
    deadline = time.monotonic() + PATIENCE
    while any(map(alive, pids)):
        assert time.monotonic() < deadline, f"workers left running:\n{process.log()}"
        time.sleep(0.05)
    assert process.log().count("the supervisor (pid %d) is gone; stopping"
                               % process.process.pid) == len(pids)


# --- metrics ----------------------------------------------------------------------

def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def decisions_at(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=PATIENCE) as r:
        return r.read().decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_of_every_process_are_added_up(start_milter, tmp_path, workers):
    port = free_tcp_port()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    process = start_milter(f'milter: {{workers: {workers}}}\n'
                           f'metrics: {{listen: "127.0.0.1:{port}"}}\n',
                           env={"TMPDIR": str(temporary)})
    pids = deciders(process, workers)
    (directory,) = temporary.glob("policyd-metrics-*")   # prometheus multiprocess files
    for session in sessions_on_each(process, pids).values():
        session.client.quit()
    decided = re.findall(r"^policyd\[(\d+)\]: INFO: T[0-9A-F]{10}: action=REJECT "
                         r"rule=spf\.mailfrom\.fail ", process.log(), re.MULTILINE)
    assert {int(pid) for pid in decided} == pids
    # The supervisor starts the endpoint after its workers.
    process.wait_for_log(f"metrics on http://127.0.0.1:{port}/metrics")
    text = decisions_at(port)
    total = float(len(decided))
    for sample in (f'policyd_decisions_total{{action="REJECT",rule="spf.mailfrom.fail"}} '
                   f'{total}',
                   f'policyd_spf_results_total{{identity="mailfrom",result="fail"}} {total}',
                   "policyd_dns_query_seconds_count", "policyd_dns_cache_hit_ratio"):
        assert sample in text, f"{sample!r} not in\n{text}\nlog:\n{process.log()}"
    process.signal(signal.SIGTERM)
    assert process.wait() == 0, process.log()
    assert not directory.exists()


def test_busy_socket_is_an_error_not_a_hang(start_milter, tmp_path, dkim_world):
    process = start_milter()
    second = subprocess.run(
        [sys.executable, "-m", "policyd", "milter", "-c", str(process.config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=PATIENCE)
    assert second.returncode == 69
    assert "another milter is listening" in second.stderr


def test_under_serve_the_policy_service_serves_the_milter_metrics(tmp_path, dkim_world):
    """`policyd serve --milter`: the milter's workers count into the policy
    service's directory (inherited), and only the policy service listens."""
    port = free_tcp_port()
    listen = short_socket(tmp_path)
    config = milter_config(tmp_path, dkim_world, listen,
                           f'policy: {{listen: ["inet:127.0.0.1:{free_tcp_port()}"]}}\n'
                           f'metrics: {{listen: "127.0.0.1:{port}"}}\n')
    process = MilterProcess(tmp_path, config, listen, command=("serve", "--milter"))
    try:
        workers = process.workers()
        for session in sessions_on_each(process, set(workers.values())).values():
            session.client.quit()
        decided = re.findall(r"^policyd\[\d+\]: INFO: T[0-9A-F]{10}: action=REJECT ",
                             process.log(), re.MULTILINE)
        process.wait_for_log(f"metrics on http://127.0.0.1:{port}/metrics")
        text = decisions_at(port)
        assert f'policyd_decisions_total{{action="REJECT",rule="spf.mailfrom.fail"}} ' \
            f'{float(len(decided))}' in text
        assert process.log().count("metrics on http://") == 1
        assert "metrics endpoint" not in process.log()   # no second one tried
    finally:
        process.stop()


# --- under policyd serve ------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_the_milter_stops_when_policyd_serve_is_killed(tmp_path, dkim_world, workers):
    """`policyd serve --milter` killed (SIGKILL, the OOM killer): its milter
    and the milter's workers stop too, within a few seconds, and free the
    port for the next one; so do the policy workers."""
    milter_port = free_tcp_port()
    listen = f"inet:{milter_port}@127.0.0.1"
    config = milter_config(tmp_path, dkim_world, listen,
                           f'policy: {{listen: ["inet:127.0.0.1:{free_tcp_port()}"]}}\n'
                           f"milter: {{drain_timeout: 2, workers: {workers}}}\n")
    process = MilterProcess(tmp_path, config, listen, command=("serve", "--milter"),
                            new_session=True)
    try:
        process.wait_for_log(f"INFO: milter on {listen}")
        (milter,) = [pid for pid in process.children()
                     if f"policyd[{pid}]: INFO: milter on {listen}" in process.log()]
        if workers > 1:
            assert set(process.workers().values()) == children_of(milter)
        process.process.kill()
        process.process.wait()
        killed = time.monotonic()
        assert process_session.wait_for_session_end(process.process.pid, 5.0), \
            f"{process_session.session_members(process.process.pid)} left:\n{process.log()}"
        assert time.monotonic() - killed < 5.0
        assert (f"policyd[{milter}]: ERROR: the parent (pid {process.process.pid}, "
                "policyd serve) is gone; stopping") in process.log()
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", milter_port))   # nobody listens on it any more
    finally:
        process_session.stop_process_session(process.process, PATIENCE)
        process.log_file.close()


# --- the benchmark's load generator -----------------------------------------------
# bench/milter_load.c must get the verdicts bench/milter_client.py gets for
# the same sessions, or the benchmark's figures would measure something
# else than the sessions it says.

@pytest.fixture(scope="module")
def load_generator(tmp_path_factory) -> Path:
    return milter_bench.build_load_generator(tmp_path_factory.mktemp("milter-load"))


def load_sessions(keys) -> list[milter_bench.Session]:
    def one(kind, address, sender, raw, helo="mx.other.example"):
        return milter_bench.Session(kind, address, helo, "unknown", "unknown", sender,
                                    "postmaster@own.example", raw)
    folded = message("staff@own.example").replace(
        b"Subject:", b"X-Folded: first\r\n\t  second line\r\nX-Spaces:    three\r\nSubject:", 1)
    return [
        # The DKIM pass (and so the accept) needs every header octet as it
        # was signed (simple canonicalization), leading spaces included
        # (SMFIP_HDR_LEADSPC).
        one("nat", "192.168.1.20", "staff@own.example",
            keys["own"].sign(folded, canonicalize=(b"simple", b"simple")),
            helo="mx.own.example"),
        one("nat", "fd00::1:5", "staff@own.example", message("staff@own.example"),
            helo="mx.own.example"),
        one("fail", "198.51.100.99", "staff@own.example", message("staff@own.example")),
        one("temperror", "198.51.100.10", "a@temperror.example", message("a@temperror.example")),
        one("none", "198.51.100.10", "a@nowhere.example", message("a@nowhere.example")),
        one("null sender", "198.51.100.10", "", message("")),
    ]


def test_load_generator_gets_the_python_clients_verdicts(milter, keys, load_generator,
                                                         tmp_path):
    load = load_sessions(keys)
    expected = [milter_bench.run_session(milter.listen, s, True, n) for n, s in enumerate(load)]
    assert expected[:4] == ["accept", "reject@eom", "reject@rcpt", "defer@rcpt"]
    script = tmp_path / "sessions.load"
    milter_bench.write_script(load, True, script)
    result = milter_bench.run_load_c("c", load_generator, milter.listen, script, load, 3)
    assert result.errors == 0
    assert len(result.latencies) == len(load) and result.seconds > 0
    assert result.by_session == dict(enumerate(expected))
    by_kind: dict[str, dict[str, int]] = {}
    for session, verdict in zip(load, expected):
        counts = by_kind.setdefault(session.kind, {})
        counts[verdict] = counts.get(verdict, 0) + 1
    assert result.verdicts == by_kind


def test_load_generator_counts_an_error_per_session_without_a_milter(keys, load_generator,
                                                                     tmp_path):
    load = load_sessions(keys)[:2]
    script = tmp_path / "sessions.load"
    milter_bench.write_script(load, True, script)
    result = milter_bench.run_load_c("c", load_generator, short_socket(tmp_path), script, load, 2)
    assert (result.errors, result.latencies) == (2, [])


def test_load_generator_refuses_a_socket_it_cannot_read(load_generator, tmp_path, keys):
    script = tmp_path / "sessions.load"
    milter_bench.write_script(load_sessions(keys)[:1], True, script)
    for spec in ("nowhere", "inet:25@mx.example", "inet:x@127.0.0.1",
                 "unix:/" + "x" * 120):
        done = subprocess.run([str(load_generator), spec, str(script), "1"],
                              capture_output=True, text=True)
        assert done.returncode == 2 and "milter_load: " in done.stderr, spec


def test_load_generator_refuses_a_cut_sessions_file(load_generator, tmp_path, keys):
    script = tmp_path / "sessions.load"
    milter_bench.write_script(load_sessions(keys)[:1], True, script)
    script.write_bytes(script.read_bytes()[:-10])
    done = subprocess.run([str(load_generator), "unix:/nonexistent", str(script), "1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "milter_load:" in done.stderr
