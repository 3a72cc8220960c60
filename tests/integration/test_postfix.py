"""A real Postfix consults a real policyd: end to end through SMTP.

Postfix is configured from contrib/postfix (tests/integration/postfix.py),
policyd runs as `python3 -m policyd serve` against the standard DNS world
served by unbound, and each simulated client fakes its address and names
with XCLIENT.  Every scenario runs over TCP and over the UNIX socket under
the queue directory, with smtpd chrooted and not.
"""
from __future__ import annotations

import grp
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import authres
import pytest
import yaml

from tests.integration.dnsworld import AUTHSERV_ID, write_config
from tests.integration.process_session import children, is_alive, stop_process_session
from tests.integration.postfix import (CONTRIB_MILTER, CONTRIB_UNIX_POLICY, REPO,
                                       PostfixInstance, contrib_main_cf, free_port,
                                       postfix_instance, readme_blocks, smtp_transaction,
                                       wait_until)

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# (transport, smtpd chrooted)
VARIANTS = [
    pytest.param(("tcp", False), id="tcp"),
    pytest.param(("tcp", True), id="tcp-chroot"),
    pytest.param(("unix", True), id="unix-chroot"),
    pytest.param(("unix", False), id="unix"),
]

MESSAGE = "From: <{sender}>\nTo: <{rcpt}>\nSubject: policyd test\n\nHello.\n"


def policy_service_for(transport: str) -> str:
    if transport == "tcp":
        return f"inet:127.0.0.1:{free_port()}"
    return CONTRIB_UNIX_POLICY


@pytest.fixture(scope="module", params=VARIANTS)
def postfix(request):
    transport, chroot = request.param
    yield from postfix_instance(transport, chroot, policy_service_for(transport))


@pytest.fixture(scope="module")
def postfix_data_stage():
    """Postfix with the optional smtpd_data_restrictions of main.cf.tcp."""
    yield from postfix_instance("tcp", False, policy_service_for("tcp"),
                                contrib_main_cf("tcp", data_stage=True))


@pytest.fixture(scope="module", params=[pytest.param(True, id="chroot"),
                                        pytest.param(False, id="no-chroot")])
def postfix_unix_milter(request):
    """Postfix with the optional milter lines of main.cf.unix (a socket
    under the queue directory), smtpd chrooted and not."""
    yield from postfix_instance("unix", request.param, policy_service_for("unix"),
                                contrib_main_cf("unix", milter=CONTRIB_MILTER["unix"]))


@pytest.fixture(scope="module")
def postfix_milter():
    """Postfix with the optional milter lines of main.cf.tcp, and the free
    port they name for the milter."""
    milter_port = free_port()
    instances = postfix_instance("tcp", False, policy_service_for("tcp"),
                                 contrib_main_cf("tcp", milter=f"inet:127.0.0.1:{milter_port}"))
    yield next(instances), milter_port
    next(instances, None)   # stops it


def readme_fail_closed_snippet() -> str:
    """The README's fail-closed smtpd_recipient_restrictions."""
    [block] = [b for b in readme_blocks() if "default_action = 451" in b]
    return block


@pytest.fixture(scope="module")
def postfix_fail_closed():
    """Postfix with the README's fail-closed default_action."""
    yield from postfix_instance("tcp", False, policy_service_for("tcp"),
                                readme_fail_closed_snippet())


class PolicydProcess:
    """`python3 -m policyd serve -c CONFIG`, a child of the test run; with
    `--milter` too when given the milter's port.

    It leads a session of its own, so that `stop` finds every process it
    started (policy workers, a milter and its workers) by session id, even
    after the parent itself is gone.
    """

    def __init__(self, config: Path, listen: str, log_path: Path,
                 milter: str | None = None):
        self.config = config
        self.listen = listen
        self.log_path = log_path
        self.milter = milter     # the milter's libmilter socket, if it runs
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> PolicydProcess:
        command = [sys.executable, "-m", "policyd", "serve", "-c", str(self.config)]
        if self.milter:
            command.append("--milter")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        try:
            wait_until(self._ready, START_TIMEOUT, f"policyd on {self.listen}")
        except TimeoutError as error:
            self.stop()
            raise AssertionError(f"{error}\n--- policyd log ---\n{self.log()}") from None
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"policyd exited with {self.process.returncode}:\n{self.log()}")
        if self.milter and not _milter_answers(self.milter):
            return False
        kind, _, where = self.listen.partition(":")
        if kind == "unix":
            # Ready once the socket has the group Postfix connects with;
            # policyd sets it right after binding.
            try:
                info = os.stat(where)
            except FileNotFoundError:
                return False
            if not stat.S_ISSOCK(info.st_mode) or info.st_gid != grp.getgrnam("postfix").gr_gid:
                return False
            family, address = socket.AF_UNIX, where
        else:
            host, _, port = where.rpartition(":")
            family, address = socket.AF_INET, (host, int(port))
        return _answers(family, address)

    def stop(self) -> None:
        """SIGTERM, then whatever is left of the tree, each process by its
        pid: a worker orphaned by a dead parent would keep the socket."""
        if self.process is not None:
            stop_process_session(self.process, STOP_TIMEOUT)


def _milter_answers(spec: str) -> bool:
    kind, _, where = spec.partition(":")
    if kind == "unix":
        return _answers(socket.AF_UNIX, where)
    port, _, host = where.partition("@")
    return _answers(socket.AF_INET, (host, int(port)))


def _answers(family: int, address) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def policyd_listen(postfix: PostfixInstance) -> str:
    """The address policyd must listen on for this Postfix."""
    path = postfix.policy_socket_path
    return f"unix:{path}" if path else postfix.policy_service


@pytest.fixture
def start_policyd(unbound, tmp_path):
    """Starts policyd for a Postfix, with the standard world's config plus
    `settings` merged over it, and the milter too if given a port for it;
    stops it after the test."""
    started: list[PolicydProcess] = []

    def start(postfix: PostfixInstance | str, settings: dict | None = None,
              milter_port: int | None = None, milter: dict | None = None) -> PolicydProcess:
        """`postfix` is the instance policyd serves, or an address to listen on;
        the milter runs too on `milter_port`, or with the `milter` settings."""
        directory = tmp_path / f"policyd{len(started)}"
        directory.mkdir()
        listen = postfix if isinstance(postfix, str) else policyd_listen(postfix)
        # The socket_group and mode are what contrib/postfix/main.cf.unix
        # tells the admin to set: Postfix connects as the postfix user.
        base = {"policy": {"listen": [listen], "socket_group": "postfix",
                           "socket_mode": "0660"}}
        if milter_port:
            milter = {"listen": f"inet:{milter_port}@127.0.0.1"}
        if milter:
            base["milter"] = milter
        config = write_config(directory, unbound, yaml.safe_dump(_merged(base, settings or {})))
        process = PolicydProcess(config, listen, directory / "policyd.log",
                                 milter["listen"] if milter else None)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def _merged(base: dict, extra: dict) -> dict:
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = value
    return result


def our_results(message) -> list[authres.AuthenticationResultsHeader]:
    """Every Authentication-Results field of the message with our authserv-id."""
    parsed = [authres.all_features().parse(f"Authentication-Results: {value}")
              for value in message.get_all("Authentication-Results", [])]
    return [header for header in parsed if header.authserv_id == AUTHSERV_ID]


def the_one_result(message) -> authres.AuthenticationResultsHeader:
    headers = our_results(message)
    assert len(headers) == 1, message.get_all("Authentication-Results")
    return headers[0]


def result_of(header, method: str):
    """The one result of `method`; for spf, the MAIL FROM identity's."""
    found = [r for r in header.results if r.method == method
             and (method != "spf" or "smtp.mailfrom" in properties(r))]
    assert len(found) == 1, (method, str(header))
    return found[0]


def properties(result) -> dict[str, str]:
    return {f"{p.type}.{p.name}": p.value for p in result.properties}


def send(postfix: PostfixInstance, address: str, sender: str, rcpts: list[str],
         name: str = "[UNAVAILABLE]", helo: str = "client.test", **xclient):
    """One client: XCLIENT with ADDR/NAME/HELO, the envelope, a message."""
    fields = {"ADDR": address, "NAME": name, "HELO": helo, **xclient}
    return smtp_transaction(postfix.host, postfix.port, fields, sender, rcpts,
                            data=MESSAGE.format(sender=sender, rcpt=rcpts[0]))


def assert_accepted(transcript, postfix: PostfixInstance):
    assert transcript.mail[0] == 250, transcript
    assert all(code == 250 for code, _ in transcript.rcpts), \
        f"{transcript}\n--- maillog ---\n{postfix.log()}"
    assert transcript.end_of_data and transcript.end_of_data[0] == 250, transcript
    assert transcript.queue_id, transcript


# --- the scenarios -------------------------------------------------------

def test_own_domain_from_nat_network_is_accepted_by_the_relaxed_rule(postfix, start_policyd):
    start_policyd(postfix)
    transcript = send(postfix, "192.168.1.10", "alice@own.example", ["bob@own.example"])
    assert_accepted(transcript, postfix)

    [message] = postfix.delivered(transcript.queue_id)
    spf = result_of(the_one_result(message), "spf")
    assert spf.result == "pass"
    assert properties(spf) == {"smtp.mailfrom": "own.example",
                               "policy.nat-relaxed": "203.0.113.7"}


def test_own_domain_from_outside_is_rejected_as_spf_fail(postfix, start_policyd):
    start_policyd(postfix)
    transcript = send(postfix, "192.0.2.50", "alice@own.example", ["bob@own.example"])
    [(code, text)] = transcript.rcpts
    assert code == 550, transcript
    # RFC 7372 §3: 5.7.23 SPF validation failed.
    assert text.startswith("5.7.23 "), text
    assert transcript.data is None


# Spellings of an own-domain sender that Postfix 3.7 accepts and delivers
# as own.example (Return-Path: <a@own.example> for the first); each was
# accepted with spf=none before the MAIL FROM domain had one reading.
OWN_DOMAIN_SPELLINGS = ["a@own.example.", '"a@b"@own.example', "a@evil.example@own.example",
                        '"x@own.example"@own.example', "a%own.example",
                        # Sent to policyd as a"b@own.example and a@own.example.
                        '"a\\"b"@own.example', "a@own.example(x@evil.example"]


def test_own_domain_in_any_spelling_from_outside_is_rejected(postfix, start_policyd):
    policyd = start_policyd(postfix)
    for sender in OWN_DOMAIN_SPELLINGS:
        transcript = smtp_transaction(
            postfix.host, postfix.port, {"ADDR": "192.0.2.50", "NAME": "[UNAVAILABLE]",
                                         "HELO": "client.test"},
            sender, ["bob@own.example"], data=MESSAGE.format(sender="x", rcpt="y"),
            raw_mail_from=True)
        assert transcript.mail[0] == 250, transcript   # Postfix takes the address
        [(code, text)] = transcript.rcpts
        assert (code, text[:7]) == (550, "5.7.23 "), (sender, transcript)
        assert "SPF fail: own.example does not designate" in text, text
        assert transcript.data is None
    # A bare local part, which Postfix would qualify with $myorigin.
    transcript = smtp_transaction(
        postfix.host, postfix.port, {"ADDR": "192.0.2.50", "NAME": "[UNAVAILABLE]",
                                     "HELO": "client.test"},
        "ceo", ["bob@own.example"], raw_mail_from=True)
    [(code, text)] = transcript.rcpts
    # Postfix words the status of a reply at RCPT for the recipient (X.1.3,
    # bad destination syntax) where policyd said X.1.7 (sender).
    assert code == 553 and "Malformed sender address" in text, transcript
    assert "rule=spf.mailfrom.malformed" in policyd.log()


def test_own_domain_spelling_from_nat_network_is_relaxed_as_own_domain(postfix, start_policyd):
    start_policyd(postfix)
    transcript = smtp_transaction(
        postfix.host, postfix.port, {"ADDR": "192.168.1.10", "NAME": "[UNAVAILABLE]",
                                     "HELO": "client.test"},
        "alice@own.example.", ["bob@own.example"],
        data=MESSAGE.format(sender="alice@own.example", rcpt="bob@own.example"),
        raw_mail_from=True)
    assert_accepted(transcript, postfix)
    [message] = postfix.delivered(transcript.queue_id)
    assert message["Return-Path"] == "<alice@own.example>"
    spf = result_of(the_one_result(message), "spf")
    assert spf.result == "pass"
    assert properties(spf) == {"smtp.mailfrom": "own.example",
                               "policy.nat-relaxed": "203.0.113.7"}


def test_other_domain_from_its_network_is_accepted(postfix, start_policyd):
    start_policyd(postfix)
    transcript = send(postfix, "198.51.100.5", "carol@other.example", ["bob@local.test"])
    assert_accepted(transcript, postfix)

    [message] = postfix.delivered(transcript.queue_id)
    spf = result_of(the_one_result(message), "spf")
    assert spf.result == "pass"
    assert properties(spf) == {"smtp.mailfrom": "other.example"}


def test_ipv6_client_without_ptr_is_flagged(postfix, start_policyd):
    start_policyd(postfix)
    transcript = send(postfix, "IPV6:2001:db8:6::26", "carol@other.example",
                      ["bob@own.example"])
    assert_accepted(transcript, postfix)

    [message] = postfix.delivered(transcript.queue_id)
    header = the_one_result(message)
    assert result_of(header, "spf").result == "pass"
    iprev = result_of(header, "iprev")
    # RFC 8601 §2.7.3: permerror, no PTR published.
    assert iprev.result == "permerror"
    assert properties(iprev) == {"policy.iprev": "2001:db8:6::26"}


def test_ipv6_client_without_ptr_is_rejected_when_configured(postfix, start_policyd):
    start_policyd(postfix, {"iprev": {"on_fail": "reject"}})
    transcript = send(postfix, "IPV6:2001:db8:6::26", "carol@other.example",
                      ["bob@own.example"])
    [(code, text)] = transcript.rcpts
    assert code == 550, transcript
    # RFC 7372 §3: 5.7.25 reverse DNS validation failed.
    assert text.startswith("5.7.25 "), text


def test_ipv6_client_with_confirmed_ptr_passes_iprev(postfix, start_policyd):
    start_policyd(postfix, {"iprev": {"on_fail": "reject"}})
    transcript = send(postfix, "IPV6:2001:db8:6::25", "carol@other.example",
                      ["bob@own.example"], name="mail6.other.example")
    assert_accepted(transcript, postfix)

    [message] = postfix.delivered(transcript.queue_id)
    iprev = result_of(the_one_result(message), "iprev")
    assert iprev.result == "pass"
    assert properties(iprev) == {"policy.iprev": "2001:db8:6::25"}


def test_ipv6_client_with_unconfirmed_ptr_fails_iprev(postfix, start_policyd):
    start_policyd(postfix)
    # What Postfix reports for a PTR whose name does not resolve back:
    # the PTR name, but no verified name (XCLIENT_README).
    transcript = send(postfix, "IPV6:2001:db8:6::27", "carol@other.example",
                      ["bob@own.example"], REVERSE_NAME="liar.other.example")
    assert_accepted(transcript, postfix)

    [message] = postfix.delivered(transcript.queue_id)
    assert result_of(the_one_result(message), "iprev").result == "fail"


def test_many_recipients_get_one_header(postfix, start_policyd):
    start_policyd(postfix)
    rcpts = ["bob@own.example", "dave@own.example", "erin@local.test"]
    transcript = send(postfix, "198.51.100.5", "carol@other.example", rcpts)
    assert_accepted(transcript, postfix)

    # virtual(8) delivers one copy per recipient; each must carry the
    # header once (Postfix adds one header per PREPEND answer).
    copies = postfix.delivered(transcript.queue_id, count=len(rcpts))
    assert sorted(copy["Delivered-To"] for copy in copies) == sorted(rcpts)
    for copy in copies:
        assert result_of(the_one_result(copy), "spf").result == "pass"


def test_postfix_applies_default_action_when_policyd_is_down(postfix, start_policyd):
    policyd = start_policyd(postfix)
    policyd.stop()
    started = time.monotonic()
    transcript = send(postfix, "192.0.2.50", "alice@own.example", ["bob@own.example"])
    elapsed = time.monotonic() - started
    # default_action=DUNNO: the spoof policyd would reject goes through
    # unchecked, and without our header.
    assert_accepted(transcript, postfix)
    [message] = postfix.delivered(transcript.queue_id)
    assert our_results(message) == []
    assert "problem talking to server" in postfix.log()
    # Not hanging: a refused connection costs try_limit tries with
    # retry_delay (1 s) between them, far below smtplib's 60 s timeout.
    assert elapsed < 30, elapsed


def test_fail_closed_alternative_defers_when_policyd_is_down(postfix_fail_closed,
                                                            start_policyd):
    postfix = postfix_fail_closed
    # Working first, so that the snippet is known to reach policyd at all.
    policyd = start_policyd(postfix)
    transcript = send(postfix, "198.51.100.5", "carol@other.example", ["bob@own.example"])
    assert_accepted(transcript, postfix)
    policyd.stop()
    transcript = send(postfix, "198.51.100.5", "carol@other.example", ["bob@own.example"])
    [(code, text)] = transcript.rcpts
    assert (code, text.split()[0]) == (451, "4.3.5"), transcript
    assert "Server configuration problem" in text


def test_policyd_is_consulted_again_once_it_is_back(postfix, start_policyd):
    start_policyd(postfix).stop()
    send(postfix, "192.0.2.50", "alice@own.example", ["bob@own.example"])
    start_policyd(postfix)
    transcript = send(postfix, "192.0.2.50", "alice@own.example", ["bob@own.example"])
    assert transcript.rcpts[0][0] == 550, transcript


def test_data_stage_adds_received_spf_once(postfix_data_stage, start_policyd):
    postfix = postfix_data_stage
    start_policyd(postfix, {"headers": {"received_spf": True}})
    for rcpts in (["bob@own.example"], ["bob@own.example", "dave@own.example",
                                        "erin@local.test"]):
        transcript = send(postfix, "198.51.100.5", "carol@other.example", rcpts)
        assert_accepted(transcript, postfix)
        copies = postfix.delivered(transcript.queue_id, count=len(rcpts))
        for copy in copies:
            assert result_of(the_one_result(copy), "spf").result == "pass"
            [received_spf] = copy.get_all("Received-SPF")
            assert received_spf.startswith("Pass "), received_spf
            assert "client-ip=198.51.100.5" in received_spf


def test_milter_lines_of_main_cf_tcp_get_postfix_names_through_its_request(postfix_milter,
                                                                           start_policyd):
    """main.cf.tcp's milter lines, uncommented, with `policyd serve --milter`
    beside the policy service.

    2001:db8:6::25 has a PTR that its name confirms, so policyd's own lookup
    would find iprev=pass; XCLIENT tells Postfix it has no name for it.  So
    iprev=permerror shows the milter had Postfix's {client_resolve}, which
    main.cf does not list: Postfix sent it because the milter asked."""
    postfix, milter_port = postfix_milter
    policyd = start_policyd(postfix, milter_port=milter_port)
    transcript = send(postfix, "IPV6:2001:db8:6::25", "carol@other.example",
                      ["bob@own.example"], name="[UNAVAILABLE]")
    assert_accepted(transcript, postfix)
    [message] = postfix.delivered(transcript.queue_id)
    # One field, the milter's (only the milter sees DKIM): it removed the
    # one the policy service prepended, which has the same authserv-id.
    header = the_one_result(message)
    assert result_of(header, "dkim").result == "none"
    assert result_of(header, "spf").result == "pass"
    assert result_of(header, "iprev").result == "permerror", str(header)
    # The queue id came with the macro i; the policy service, asked at
    # RCPT before Postfix has one, says NOQUEUE.
    log = policyd.log()
    assert f"{transcript.queue_id}: action=ACCEPT rule=iprev.permerror " in log, log
    assert "NOQUEUE: action=ACCEPT rule=iprev.permerror " in log, log


def test_milter_lines_of_main_cf_unix_reach_the_milter_under_the_queue(postfix_unix_milter,
                                                                       start_policyd):
    """main.cf.unix's milter lines, uncommented, with the milter settings it
    quotes (the socket under the queue directory, group postfix): a
    chrooted smtpd reaches the milter too, and gets its header."""
    postfix = postfix_unix_milter
    path = postfix.queue_dir / CONTRIB_MILTER["unix"].partition(":")[2]
    policyd = start_policyd(postfix, milter={"listen": f"unix:{path}",
                                             "socket_group": "postfix"})
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == grp.getgrnam("postfix").gr_gid
    transcript = send(postfix, "IPV6:2001:db8:6::25", "carol@other.example",
                      ["bob@own.example"], name="[UNAVAILABLE]")
    assert_accepted(transcript, postfix)
    [message] = postfix.delivered(transcript.queue_id)
    header = the_one_result(message)
    assert result_of(header, "dkim").result == "none"   # only the milter sees DKIM
    assert result_of(header, "spf").result == "pass"
    assert f"{transcript.queue_id}: action=ACCEPT " in policyd.log(), policyd.log()


def test_stop_leaves_no_worker_behind_when_the_parent_died(start_policyd):
    """The harness stops every process policyd started, by pid, even when
    the parent is gone and its workers are orphans still holding the port."""
    port = free_port()
    policyd = start_policyd(f"inet:127.0.0.1:{port}", {"policy": {"processes": 2}})
    # Ready means the socket is bound, which the parent does before it forks.
    workers = wait_until(lambda: len(children(policyd.process.pid)) == 2
                         and children(policyd.process.pid), START_TIMEOUT, "two workers")
    os.kill(policyd.process.pid, signal.SIGKILL)
    policyd.process.wait(STOP_TIMEOUT)
    policyd.stop()
    assert [pid for pid in workers if is_alive(pid)] == []
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_readme_operability_check(start_policyd):
    """The request and the answer the README shows, against a real policyd."""
    [command] = [b for b in readme_blocks() if b.startswith("printf 'request=")]
    match = re.fullmatch(r"printf '(.*?)' \\\n\s+\| socat - TCP:127\.0\.0\.1:10023\n",
                         command)
    assert match, command
    request = match.group(1).encode().decode("unicode_escape").encode()
    [expected] = [b for b in readme_blocks() if b.startswith("action=")]
    port = free_port()
    start_policyd(f"inet:127.0.0.1:{port}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.decode() == expected + "\n"
