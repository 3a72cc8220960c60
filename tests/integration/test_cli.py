"""`policyd query`, `serve --milter` and the metrics endpoint, as an admin
runs them, against the real unbound world."""
from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from policyd.config import MilterConfig

from tests.integration.dnsworld import free_port, write_config
from tests.integration.process_session import children, session_members, stop_process_session

POLICYD = [sys.executable, "-m", "policyd"]

# How long a start may take before a test fails.
START_TIMEOUT = 20.0

# How long a stop may take before a test fails: policy.drain_timeout (10 s)
# is for requests in flight, and these tests leave none.
STOP_TIMEOUT = 10.0

# A policy worker looks for its parent every 0.5 s
# (runtime.supervisor.PARENT_CHECK_INTERVAL); the rest is room for a busy machine.
ORPHAN_TIMEOUT = 3.0


def query(config, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(POLICYD + ["query", "-c", str(config), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def action_of(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("action=")]
    assert len(lines) == 1, result.stdout + result.stderr
    return lines[0]


def test_query_nat_case_passes_through_the_relaxed_rule(policyd_config):
    result = query(policyd_config, "--client-address", "192.168.1.10",
                   "--helo", "mx.own.example", "--sender", "alice@own.example")
    assert result.returncode == 0, result.stderr
    action = action_of(result)
    assert action.startswith("action=PREPEND Authentication-Results: mx.test.example;")
    assert "spf=pass" in action and "smtp.mailfrom=own.example" in action
    assert "policy.nat-relaxed=203.0.113.7" in action
    assert "evaluated as 203.0.113.7" in result.stdout   # the trace says why
    assert "rule=nat.relaxed" in result.stdout


def test_query_outside_spoof_of_own_domain_is_rejected(policyd_config):
    result = query(policyd_config, "--client-address", "192.0.2.50",
                   "--helo", "evil.example", "--sender", "alice@own.example")
    assert action_of(result).startswith("action=550 5.7.23 ")
    assert "spf mailfrom own.example: fail" in result.stdout


def test_query_other_domain_from_nat_network_gets_plain_spf(policyd_config):
    result = query(policyd_config, "--client-address", "192.168.1.10",
                   "--helo", "mx.own.example", "--sender", "bob@other.example")
    assert action_of(result).startswith("action=550 5.7.23 ")


def test_query_ipv6_without_ptr_is_flagged_as_iprev_permerror(policyd_config):
    result = query(policyd_config, "--client-address", "2001:db8:6::26",
                   "--helo", "mail6.other.example", "--sender", "bob@other.example")
    action = action_of(result)
    assert action.startswith("action=PREPEND Authentication-Results:")
    assert 'iprev=permerror' in action and 'policy.iprev="2001:db8:6::26"' in action


def test_query_ipv6_without_ptr_rejected_when_configured(tmp_path, unbound):
    config = write_config(tmp_path, unbound, "iprev: {on_fail: reject}")
    result = query(config, "--client-address", "2001:db8:6::26",
                   "--helo", "mail6.other.example", "--sender", "bob@other.example")
    assert action_of(result).startswith("action=550 5.7.25 ")


def test_query_reads_postfix_attributes_on_stdin(policyd_config):
    request = ("request=smtpd_access_policy\nprotocol_state=RCPT\n"
               "client_address=192.0.2.50\nhelo_name=evil.example\n"
               "sender=alice@own.example\nrecipient=bob@own.example\nqueue_id=4ABC\n\n")
    result = query(policyd_config, stdin=request)
    assert action_of(result).startswith("action=550 5.7.23 ")
    assert "log: 4ABC: action=REJECT rule=spf.mailfrom.fail" in result.stdout


def test_query_test_mode_says_what_would_have_happened(tmp_path, unbound):
    config = write_config(tmp_path, unbound, "test_mode: true")
    result = query(config, "--client-address", "192.0.2.50",
                   "--helo", "evil.example", "--sender", "alice@own.example")
    assert action_of(result).startswith("action=PREPEND Authentication-Results:")
    assert "would=REJECT" in result.stdout


def _wait_tcp(port: int, deadline: float = START_TIMEOUT) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return result


def _can_listen(port: int) -> bool:
    """Whether a new policyd could listen on the port (as bind_listener
    does, with SO_REUSEADDR: Linux still refuses while a socket listens)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def _policy_request(port: int, **attributes: str) -> str:
    body = "".join(f"{k}={v}\n" for k, v in
                   {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                    **attributes}.items()) + "\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(body.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(4096)
            assert chunk, "connection closed without a reply"
            reply += chunk
    return reply.decode()


@pytest.fixture
def serve_with_metrics(tmp_path, unbound):
    policy_port = free_port("127.0.0.1")
    metrics_port = free_port("127.0.0.1")
    milter_port = free_port("127.0.0.1")
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{policy_port}"]}}
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
milter: {{listen: "inet:{milter_port}@127.0.0.1"}}
""")
    with open(tmp_path / "policyd.log", "w") as log:
        # A session of its own: stop_process_session finds the milter and
        # every worker by it, even if the parent is gone.
        process = subprocess.Popen(POLICYD + ["serve", "--milter", "-c", str(config)],
                                   stderr=log, start_new_session=True)
    try:
        _wait_tcp(policy_port)
        _wait_tcp(milter_port)
        yield process, policy_port, metrics_port, milter_port
    finally:
        stop_process_session(process, 30)


def test_serve_exposes_prometheus_metrics(serve_with_metrics):
    process, policy_port, metrics_port, _ = serve_with_metrics
    assert _policy_request(policy_port, client_address="192.0.2.50", helo_name="evil.example",
                           sender="alice@own.example") .startswith("action=550 5.7.23")
    assert _policy_request(policy_port, client_address="2001:db8:6::26",
                           helo_name="mail6.other.example",
                           sender="bob@other.example").startswith("action=PREPEND")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'policyd_decisions_total{action="REJECT",rule="spf.mailfrom.fail"} 1.0' in text
    assert 'policyd_spf_results_total{identity="mailfrom",result="fail"} 1.0' in text
    assert 'policyd_iprev_results_total{result="permerror"} 1.0' in text
    assert "policyd_dns_query_seconds_count" in text
    assert "policyd_dns_cache_hit_ratio" in text


def test_serve_with_milter_runs_both_and_stops_both(serve_with_metrics):
    process, policy_port, _, milter_port = serve_with_metrics
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    for port in (policy_port, milter_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_serve_forks_workers_sums_their_metrics_and_replaces_a_dead_one(tmp_path, unbound):
    policy_port = free_port("127.0.0.1")
    metrics_port = free_port("127.0.0.1")
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{policy_port}"], processes: 2}}
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
""")
    with open(tmp_path / "policyd.log", "w") as log:
        process = subprocess.Popen(POLICYD + ["serve", "-c", str(config)], stderr=log,
                                   start_new_session=True)
        try:
            _wait_tcp(policy_port)
            # The parent listens before it forks: the workers may come later.
            workers = _wait_for(lambda: len(children(process.pid)) == 2
                                and children(process.pid), START_TIMEOUT, "two policy workers")
            for _ in range(10):
                assert _policy_request(policy_port, client_address="192.0.2.50",
                                       helo_name="evil.example",
                                       sender="alice@own.example").startswith("action=550")
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as response:
                text = response.read().decode()
            assert 'policyd_decisions_total{action="REJECT",rule="spf.mailfrom.fail"} 10.0' \
                in text
            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            end = time.monotonic() + 20
            while time.monotonic() < end:
                now = children(process.pid)
                if len(now) == 2 and victim not in now:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"dead worker {victim} not replaced: {now}")
            assert _policy_request(policy_port, client_address="198.51.100.5",
                                   helo_name="helo.other.example",
                                   sender="bob@other.example").startswith("action=PREPEND")
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            stop_process_session(process, STOP_TIMEOUT)
    assert "exited; starting another" in (tmp_path / "policyd.log").read_text()


def test_workers_stop_when_their_parent_is_killed(tmp_path, unbound):
    policy_port = free_port("127.0.0.1")
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{policy_port}"], processes: 2}}
""")
    with open(tmp_path / "policyd.log", "w") as log:
        # A session of its own: its workers keep the session id after the
        # parent is gone, which is how they are found (and cleaned up).
        process = subprocess.Popen(POLICYD + ["serve", "-c", str(config)], stderr=log,
                                   start_new_session=True)
    try:
        _wait_tcp(policy_port)
        workers = _wait_for(lambda: len(children(process.pid)) == 2
                            and children(process.pid), START_TIMEOUT, "two policy workers")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
        _wait_for(lambda: not session_members(process.pid), ORPHAN_TIMEOUT,
                  f"the orphaned workers {sorted(workers)} to exit")
        assert _can_listen(policy_port)
    finally:
        stop_process_session(process, STOP_TIMEOUT)
    text = (tmp_path / "policyd.log").read_text()
    for pid in workers:
        assert f"policyd[{pid}]: ERROR: policy worker {pid}: the parent " \
               f"(pid {process.pid}) is gone; stopping" in text, text


@pytest.mark.parametrize("processes", [1, 2])
def test_metrics_are_counted_after_dropping_privileges(tmp_path, unbound, processes):
    """The metrics directory is made as root; the processes that write to
    it (and the one that reads it for /metrics) run as --user."""
    policy_port = free_port("127.0.0.1")
    metrics_port = free_port("127.0.0.1")
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{policy_port}"], processes: {processes}}}
metrics: {{listen: "127.0.0.1:{metrics_port}"}}
""")
    with open(tmp_path / "policyd.log", "w") as log:
        process = subprocess.Popen(POLICYD + ["serve", "--user", "nobody", "-c", str(config)],
                                   stderr=log, start_new_session=True)
    try:
        _wait_tcp(policy_port)
        for _ in range(3):
            assert _policy_request(policy_port, client_address="192.0.2.50",
                                   helo_name="evil.example",
                                   sender="alice@own.example").startswith("action=550")
        _wait_tcp(metrics_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        assert 'policyd_decisions_total{action="REJECT",rule="spf.mailfrom.fail"} 3.0' \
            in text, text
    finally:
        stop_process_session(process, STOP_TIMEOUT)
    assert process.returncode == 0, (tmp_path / "policyd.log").read_text()


@pytest.mark.parametrize("processes", [1, 2])
def test_serve_with_milter_and_user_runs_both_as_that_user(tmp_path, unbound, processes):
    """The milter child binds its socket and drops privileges itself, so
    it starts while the parent is still root."""
    policy_port = free_port("127.0.0.1")
    milter_port = free_port("127.0.0.1")
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{policy_port}"], processes: {processes}}}
milter: {{listen: "inet:{milter_port}@127.0.0.1"}}
""")
    with open(tmp_path / "policyd.log", "w") as log:
        process = subprocess.Popen(POLICYD + ["serve", "--milter", "--user", "nobody",
                                              "-c", str(config)],
                                   stderr=log, start_new_session=True)
    try:
        _wait_tcp(policy_port)
        _wait_tcp(milter_port)
        assert _policy_request(policy_port, client_address="192.0.2.50",
                               helo_name="evil.example",
                               sender="alice@own.example").startswith("action=550")
        nobody = pwd.getpwnam("nobody").pw_uid
        # The parent, its workers (if any), the milter and its workers.
        expected = 1 + (processes if processes > 1 else 0) + 1 + MilterConfig().workers
        tree = _wait_for(lambda: len(session_members(process.pid)) == expected
                         and session_members(process.pid), START_TIMEOUT,
                         f"{expected} processes")
        assert {pid: _uids(pid) for pid in tree} == {pid: {nobody} for pid in tree}
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "policyd.log").read_text()
    finally:
        stop_process_session(process, STOP_TIMEOUT)


def _uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of a process."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Uid:"):
                return {int(uid) for uid in line.split()[1:]}
    raise AssertionError(f"/proc/{pid}/status has no Uid line")


def test_serve_with_unknown_user_says_so(tmp_path, unbound):
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{free_port("127.0.0.1")}"]}}
""")
    result = subprocess.run(POLICYD + ["serve", "--milter", "--user", "no-such-user.invalid",
                                       "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 67, result.stderr   # EX_NOUSER
    assert "fatal: --user no-such-user.invalid: no such user" in result.stderr
    assert "Traceback" not in result.stderr
