"""The policy server end to end: real sockets, the real Engine, real unbound.

The first half runs PolicyServer in a thread of the test process and talks
to it the way Postfix does (one blocking socket per client, one request at
a time, the connection kept open).  The second half runs the daemon as
`python3 -m policyd serve -c FILE` and sends it SIGHUP and SIGTERM while
clients keep it busy.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from policyd import config as config_module
from policyd.dns import Resolver
from policyd.engine import Engine
from policyd.policy.server import PolicyServer
from tests.integration.dnsworld import AUTHSERV_ID, QueryCountingProxy, write_config

REPO = Path(__file__).resolve().parent.parent.parent
# How long a test waits for something that should happen at once.
PATIENCE = 15.0


class PolicyClient:
    """One Postfix-like connection: a request, then wait for its reply."""

    def __init__(self, address: str):
        kind, _, where = address.partition(":")
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(PATIENCE)
            try:
                self.sock.connect(where)
            except OSError:
                self.sock.close()
                raise
        else:
            host, _, port = where.rpartition(":")
            self.sock = socket.create_connection((host.strip("[]"), int(port)), PATIENCE)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed by the server; got {self.buffer!r}")
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\n\n")
        assert raw.startswith(b"action=") and b"\n" not in raw and b"\r" not in raw, raw
        return raw[len(b"action="):].decode("utf-8")    # must be valid UTF-8

    def ask(self, **attributes) -> str:
        self.send(policy_request(**attributes))
        return self.reply()

    def closed_without_reply(self) -> bool:
        """True when the server closes the connection having sent nothing more."""
        return self.buffer == b"" and self.sock.recv(4096) == b""

    def close(self) -> None:
        self.sock.close()


def policy_request(**attributes) -> bytes:
    """A request as Postfix 3.7 sends it at RCPT; attributes override."""
    values = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
              "protocol_name": "ESMTP", "client_address": "198.51.100.10",
              "client_name": "", "reverse_client_name": "",
              "helo_name": "helo.other.example", "sender": "a@other.example",
              "recipient": "b@own.example", "recipient_count": "0", "queue_id": "",
              "instance": f"{time.monotonic_ns():x}.0", "size": "0",
              "sasl_method": "", "sasl_username": "", "stress": ""}
    values.update(attributes)
    lines = []
    for name, value in values.items():
        if value is None:
            continue
        value = value if isinstance(value, bytes) else value.encode()
        lines.append(name.encode() + b"=" + value + b"\n")
    return b"".join(lines) + b"\n"


# --- the server in this process -------------------------------------------------

class ServerThread:
    """PolicyServer on its own event loop in a thread, as the daemon runs it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.server = PolicyServer(engine)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        self.call(self.server.start())
        return self

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(PATIENCE)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(PATIENCE)
        self.loop.close()

    def address(self, kind: str) -> str:
        return next(a for a in self.server.addresses if a.startswith(kind + ":"))


def engine_for(tmp_path: Path, unbound, extra_yaml: str = "") -> Engine:
    listen = (f"policy:\n  listen: ['inet:127.0.0.1:0', 'inet:[::1]:0', "
              f"'unix:{tmp_path}/spool/private/policyd']\n")
    path = write_config(tmp_path, unbound, listen + extra_yaml)
    config = config_module.load(str(path))
    return Engine(config, Resolver(config.dns))


@pytest.fixture
def served(tmp_path, unbound):
    server = ServerThread(engine_for(tmp_path, unbound)).start()
    yield server
    server.stop()


@pytest.fixture(params=["inet", "unix"])
def client(request, served):
    connection = PolicyClient(served.address(request.param))
    yield connection
    connection.close()


@dataclass(frozen=True)
class Case:
    """A request and what its reply must be, by prefix and contents."""
    name: str
    attributes: dict
    starts: str
    contains: tuple[str, ...] = field(default=())

    def check(self, reply: str) -> None:
        assert reply.startswith(self.starts), (self.name, reply)
        for text in self.contains:
            assert text in reply, (self.name, text, reply)


AR = f"PREPEND Authentication-Results: {AUTHSERV_ID}; "

CASES = [
    Case("pass", dict(client_address="198.51.100.10", helo_name="helo.other.example",
                      sender="a@other.example"),
         AR, ("spf=pass", "smtp.mailfrom=other.example", "smtp.helo=helo.other.example")),
    Case("fail", dict(client_address="192.0.2.99", helo_name="x.example",
                      sender="a@other.example"),
         "550 5.7.23 ", ("other.example",)),
    Case("softfail", dict(client_address="192.0.2.99", helo_name="x.example",
                          sender="a@softfail.example"),
         AR, ("spf=softfail", "smtp.mailfrom=softfail.example")),
    Case("nat relaxed", dict(client_address="192.168.1.10", helo_name="mx.own.example",
                             sender="a@own.example"),
         AR, ("spf=pass", "policy.nat-relaxed=203.0.113.7", "smtp.mailfrom=own.example")),
    Case("nat relaxed, IPv4-mapped", dict(client_address="::ffff:192.168.1.10",
                                          helo_name="mx.own.example", sender="a@own.example"),
         AR, ("spf=pass", "policy.nat-relaxed=203.0.113.7")),
    Case("own domain spoofed from outside", dict(client_address="192.0.2.99",
                                                 helo_name="mx.own.example",
                                                 sender="a@own.example"),
         "550 5.7.23 ", ("own.example",)),
    Case("IPv6 without PTR", dict(client_address="2001:db8:6::26",
                                  helo_name="x.other.example", sender="a@other.example"),
         AR, ("spf=pass", "iprev=permerror", 'policy.iprev="2001:db8:6::26"')),
    Case("IPv6 without PTR, as Postfix reports it",
         dict(client_address="2001:db8:6::26", client_name="unknown",
              reverse_client_name="unknown", helo_name="x.other.example",
              sender="a@other.example"),
         AR, ("iprev=permerror",)),
    Case("IPv6 with FCrDNS", dict(client_address="2001:db8:6::25",
                                  helo_name="mail6.other.example", sender="a@other.example"),
         AR, ("iprev=pass", 'policy.iprev="2001:db8:6::25"')),
    Case("SPF temperror", dict(client_address="192.0.2.99", helo_name="x.example",
                               sender="a@temperror.example"),
         "451 4.7.24 ", ("temperror.example",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_round_trip(client, case):
    case.check(client.ask(**case.attributes))


def test_cases_in_a_row_on_one_connection(client):
    for case in CASES:
        case.check(client.ask(**case.attributes))


def test_ipv6_listener(served):
    connection = PolicyClient(next(a for a in served.server.addresses if "[::1]" in a))
    try:
        CASES[0].check(connection.ask(**CASES[0].attributes))
    finally:
        connection.close()


def test_unix_socket_is_where_postfix_looks(served, tmp_path):
    # Postfix, chrooted to its queue directory, reaches
    # <queue_directory>/private/policyd as unix:private/policyd.
    path = tmp_path / "spool" / "private" / "policyd"
    assert served.address("unix") == f"unix:{path}"
    assert oct(os.stat(path).st_mode & 0o777) == "0o660"


def test_authentication_results_once_per_message(client):
    instance = "5f3a.65b2c1d0.4e2a.0"
    replies = [client.ask(instance=instance, recipient=f"r{i}@own.example") for i in range(3)]
    replies.append(client.ask(instance=instance, protocol_state="DATA", recipient=""))
    replies.append(client.ask(instance=instance, protocol_state="END-OF-MESSAGE",
                              recipient=""))
    CASES[0].check(replies[0])
    assert replies[1:] == ["DUNNO"] * 4


def test_received_spf_follows_at_the_next_reply(tmp_path, unbound):
    server = ServerThread(engine_for(tmp_path, unbound,
                                     "headers:\n  received_spf: true\n")).start()
    try:
        connection = PolicyClient(server.address("unix"))
        instance = "5f3a.65b2c1d0.4e2b.0"
        first = connection.ask(instance=instance)
        second = connection.ask(instance=instance, protocol_state="DATA", recipient="")
        third = connection.ask(instance=instance, protocol_state="DATA", recipient="")
        connection.close()
    finally:
        server.stop()
    CASES[0].check(first)
    assert second.startswith("PREPEND Received-SPF: Pass ")
    assert "client-ip=198.51.100.10" in second
    assert third == "DUNNO"


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "MAIL", "VRFY", "ETRN",
                                   "END-OF-MESSAGE"])
def test_stages_before_rcpt_are_dunno(client, state):
    # A sender that would be rejected: DUNNO shows the engine did not run.
    assert client.ask(protocol_state=state, **CASES[1].attributes) == "DUNNO"


def test_data_stage_alone_decides(client):
    case = CASES[1]
    assert client.ask(protocol_state="DATA", recipient="", **case.attributes) \
        .startswith(case.starts)


# --- bad input --------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"garbage without equals\n\n",
    b"request=smtpd_access_policy\nclient_address=not-an-address\n\n",
    b"request=something_else\nclient_address=192.0.2.1\n\n",
    b"request=smtpd_access_policy\n\n",
])
def test_malformed_request_closes_without_reply(client, data):
    client.send(data)
    assert client.closed_without_reply()


def test_oversized_line_closes_without_reply(client):
    client.send(b"request=smtpd_access_policy\nsender=" + b"a" * 5000)
    assert client.closed_without_reply()


def test_oversized_request_closes_without_reply(client):
    client.send(b"".join(b"x%04d=%s\n" % (i, b"v" * 1000) for i in range(40)))
    assert client.closed_without_reply()


def test_too_many_attributes_closes_without_reply(client):
    client.send(b"".join(b"x%d=1\n" % i for i in range(200)) + b"\n")
    assert client.closed_without_reply()


def test_non_utf8_sender_and_helo(client):
    reply = client.ask(sender=b"j\xf6rg@other.example", helo_name=b"\xff\xfe.example")
    assert reply.startswith(AR)
    assert "spf=pass" in reply and "smtp.mailfrom=other.example" in reply
    # The next request on the same connection is served normally.
    CASES[1].check(client.ask(**CASES[1].attributes))


def test_non_utf8_rejected_sender_gets_a_clean_reply(client):
    reply = client.ask(client_address="192.0.2.99", helo_name="x.example",
                       sender=b"\xff\xfe@other.example")
    assert reply.startswith("550 5.7.23 ")


def test_server_survives_bad_clients(served):
    for data in (b"junk\n", b"x" * 10000, b"\xff\xff\xff\n\n"):
        bad = PolicyClient(served.address("unix"))
        bad.send(data)
        assert bad.closed_without_reply()
        bad.close()
    good = PolicyClient(served.address("inet"))
    CASES[0].check(good.ask(**CASES[0].attributes))
    good.close()


# --- many clients -------------------------------------------------------------------

def test_many_persistent_connections(served):
    """50 connections at once, each asking several questions in turn."""
    barrier = threading.Barrier(50, timeout=PATIENCE)

    def session(index: int) -> int:
        kind = "unix" if index % 2 else "inet"
        connection = PolicyClient(served.address(kind))
        barrier.wait()    # every connection is open before any asks
        try:
            for step in range(6):
                case = CASES[(index + step) % len(CASES)]
                case.check(connection.ask(**case.attributes))
        finally:
            connection.close()
        return index

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        done = list(pool.map(session, range(50)))
    assert done == list(range(50))


# --- the daemon ---------------------------------------------------------------------

class DelayingDnsProxy:
    """Forwards DNS over UDP after a delay, so requests stay in flight long
    enough to send a signal while they are; each query waits on its own."""

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream, self.delay = upstream, delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                query, client = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.queries += 1
            threading.Thread(target=self._forward, args=(query, client), daemon=True).start()

    def _forward(self, query: bytes, client) -> None:
        time.sleep(self.delay)   # the latency being simulated
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5.0)
            upstream.sendto(query, self.upstream)
            try:
                self.sock.sendto(upstream.recv(65535), client)
            except (socket.timeout, OSError):
                pass

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(PATIENCE)
        self.sock.close()


class Daemon:
    """`python3 -m policyd serve -c FILE`, a child stopped by its PID."""

    def __init__(self, tmp_path: Path, config_path: Path, socket_path: Path,
                 preexec_fn=None):
        self.config_path, self.socket_path = config_path, socket_path
        self.log_path = tmp_path / "policyd.log"
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "policyd", "serve", "-c", str(config_path)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=self.log_file,
            preexec_fn=preexec_fn)
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()   # a daemon that never listened is not left running
            raise

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"policyd exited {self.process.returncode}:\n{self.log()}")
            try:
                PolicyClient(self.address).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"policyd did not listen:\n{self.log()}") from None
                time.sleep(0.02)   # polling for the socket, not waiting blindly

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while text not in self.log():
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.log()}"
            assert self.process.poll() is None, f"policyd exited:\n{self.log()}"
            time.sleep(0.02)

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self) -> int:
        return self.process.wait(PATIENCE)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PATIENCE)
        self.log_file.close()


def daemon_config(tmp_path: Path, unbound, extra_yaml: str = "", dns=None) -> Path:
    socket_path = tmp_path / "run" / "policyd.sock"
    text = (f"policy:\n  listen: ['unix:{socket_path}']\n  drain_timeout: 10\n"
            f"log_level: info\n" + extra_yaml)
    if dns is not None:
        text += f"dns:\n  nameservers: ['{dns[0]}']\n  port: {dns[1]}\n"
    return write_config(tmp_path, unbound, text)


@pytest.fixture
def daemon_factory(tmp_path):
    started = []

    def start(config_path: Path, preexec_fn=None) -> Daemon:
        daemon = Daemon(tmp_path, config_path, tmp_path / "run" / "policyd.sock", preexec_fn)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@dataclass
class Load:
    """Client threads asking one question over and over on persistent
    connections; every reply is kept, and any failure too."""
    address: str
    case: Case
    threads: int = 8
    replies: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def __post_init__(self):
        self.stopping = threading.Event()
        self.workers = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(self.threads)]
        for worker in self.workers:
            worker.start()

    def _run(self) -> None:
        try:
            connection = PolicyClient(self.address)
            while not self.stopping.is_set():
                self.replies.append((time.monotonic(), connection.ask(**self.case.attributes)))
            connection.close()
        except Exception as error:     # reported by stop()
            self.errors.append(repr(error))

    def wait_for(self, predicate, after: float) -> None:
        deadline = time.monotonic() + PATIENCE
        while not any(predicate(r) for t, r in list(self.replies) if t > after):
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the expected reply never came"
            time.sleep(0.02)

    def stop(self) -> list[str]:
        self.stopping.set()
        for worker in self.workers:
            worker.join(PATIENCE)
        assert not self.errors, self.errors
        return [reply for _, reply in self.replies]


SOFTFAIL = CASES[2]


def test_sighup_reloads_under_load_and_a_broken_file_keeps_the_old(tmp_path, unbound,
                                                                   daemon_factory):
    config_path = daemon_config(tmp_path, unbound)
    daemon = daemon_factory(config_path)
    load = Load(daemon.address, SOFTFAIL)
    try:
        load.wait_for(lambda reply: reply.startswith(AR), after=0)

        # A valid new config: softfail is now rejected.
        daemon_config(tmp_path, unbound, "spf:\n  mailfrom:\n    on_softfail: reject\n")
        sent = time.monotonic()
        daemon.signal(signal.SIGHUP)
        load.wait_for(lambda reply: reply.startswith("550 5.7.23 "), after=sent)
        daemon.wait_for_log("reloaded config")

        # A broken one: refused, the running config stays.
        config_path.write_text(config_path.read_text() + "spf:\n  bogus_key: 1\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("reload refused")
        after_broken = time.monotonic()
        load.wait_for(lambda reply: True, after=after_broken)
    finally:
        replies = load.stop()
    assert daemon.process.poll() is None
    late = [reply for t, reply in load.replies if t > after_broken]
    assert late and all(reply.startswith("550 5.7.23 ") for reply in late)
    # Every reply is one of the two configs' answers; none is lost or mixed.
    assert all(reply.startswith(AR) or reply.startswith("550 5.7.23 ") for reply in replies)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def test_sigterm_answers_requests_in_flight_then_exits_0(tmp_path, unbound, daemon_factory):
    proxy = DelayingDnsProxy((unbound.address, unbound.port), delay=0.3)
    try:
        daemon = daemon_factory(daemon_config(tmp_path, unbound, dns=("127.0.0.1", proxy.port)))
        clients = [PolicyClient(daemon.address) for _ in range(20)]
        idle = PolicyClient(daemon.address)
        cases = [CASES[i % 3] for i in range(len(clients))]   # pass, fail, softfail
        for connection, case in zip(clients, cases):
            connection.send(policy_request(**case.attributes))
        deadline = time.monotonic() + PATIENCE
        while proxy.queries == 0:        # the engine is inside its DNS lookups
            assert time.monotonic() < deadline
            time.sleep(0.01)
        daemon.signal(signal.SIGTERM)
        for connection, case in zip(clients, cases):
            case.check(connection.reply())
            assert connection.closed_without_reply()
            connection.close()
        assert idle.closed_without_reply()
        idle.close()
        assert daemon.wait() == 0
    finally:
        proxy.stop()
    assert not daemon.socket_path.exists()
    assert "Traceback" not in daemon.log()


def _wait_for_workers(daemon: Daemon, processes: int) -> None:
    """Until every worker listens: the first answers before the others do."""
    deadline = time.monotonic() + PATIENCE
    while daemon.log().count("policy server listening") < processes:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _udp_inodes() -> set[str]:
    """The inodes of every UDP socket (proc(5) /proc/net/udp, field 10)."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as lines:
            next(lines)
            inodes.update(line.split()[9] for line in lines)
    return inodes


def _sockets(pid: int) -> int:
    """Sockets held by pid, its DNS sockets apart (kept between queries)."""
    count = 0
    udp = _udp_inodes()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        count += target.startswith("socket:[") and target[8:-1] not in udp
    return count


@pytest.mark.parametrize("processes", [2, 3])
def test_worker_processes_share_the_connections(tmp_path, unbound, daemon_factory, processes):
    # Postfix keeps a connection per smtpd process for up to 1000 s; if one
    # worker took them all, one core would do all the work.  On the shared
    # UNIX socket of the chroot setup the kernel does not spread them.
    daemon = daemon_factory(_processes_config(tmp_path, unbound, processes))
    _wait_for_workers(daemon, processes)
    workers = _children(daemon.process.pid)
    assert len(workers) == processes
    before = {pid: _sockets(pid) for pid in workers}
    clients = [PolicyClient(daemon.address) for _ in range(32)]
    try:
        for client in clients:
            assert client.ask(**SOFTFAIL.attributes).startswith(AR)
        held = sorted(_sockets(pid) - before[pid] for pid in workers)
    finally:
        for client in clients:
            client.close()
    assert sum(held) == 32
    assert held[-1] - held[0] <= 2, held


def _processes_config(tmp_path: Path, unbound, processes: int) -> Path:
    path = daemon_config(tmp_path, unbound)
    path.write_text(path.read_text().replace(
        "  drain_timeout: 10\n", f"  drain_timeout: 10\n  processes: {processes}\n"))
    return path


def test_every_worker_takes_the_config_the_parent_validated(tmp_path, unbound,
                                                             daemon_factory):
    # The file may change again right after the parent read it; a worker
    # that read it again itself would refuse the broken file and keep the
    # old config while the others run the new one.
    config_path = _processes_config(tmp_path, unbound, 3)
    daemon = daemon_factory(config_path)
    _wait_for_workers(daemon, 3)
    late = _children(daemon.process.pid)[0]
    good = config_path.read_text() + "spf:\n  mailfrom:\n    on_softfail: reject\n"
    config_path.write_text(good)
    # One worker is held back until the file has broken again.
    os.kill(late, signal.SIGSTOP)
    try:
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_log("is valid; passing it to 3 worker(s)")
        config_path.write_text(good + "spf:\n  bogus_key: 1\n")
    finally:
        os.kill(late, signal.SIGCONT)
    deadline = time.monotonic() + PATIENCE
    while daemon.log().count("reloaded config") < 3:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    assert "refused" not in daemon.log()
    replies = _softfail_replies(daemon, 12)
    assert all(reply.startswith("550 5.7.23 ") for reply in replies), replies


def test_a_config_too_big_for_a_pipe_buffer_still_reaches_every_worker(tmp_path, unbound,
                                                                      daemon_factory):
    # 6000 allowlisted networks pickle to well over the 64 KiB a pipe
    # holds by default: the frame must still arrive whole, and no worker
    # may be taken for stuck and stopped.
    config_path = _processes_config(tmp_path, unbound, 2)
    daemon = daemon_factory(config_path)
    _wait_for_workers(daemon, 2)
    networks = "".join(f"  - 10.{n // 256}.{n % 256}.0/24\n" for n in range(6000))
    config_path.write_text(config_path.read_text() + "allowlist:\n" + networks
                           + "spf:\n  mailfrom:\n    on_softfail: reject\n")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 2 * PATIENCE
    while daemon.log().count("reloaded config") < 2:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert "does not take its reloads" not in daemon.log()
    replies = _softfail_replies(daemon, 6)
    assert all(reply.startswith("550 5.7.23 ") for reply in replies), replies


def _softfail_replies(daemon: Daemon, connections: int) -> list[str]:
    """The SOFTFAIL request asked once on each of `connections` connections
    open at the same time, so that every worker answers some of them."""
    clients = [PolicyClient(daemon.address) for _ in range(connections)]
    try:
        return [client.ask(**SOFTFAIL.attributes) for client in clients]
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigusr1_reloads_too(tmp_path, unbound, daemon_factory, processes):
    # The milter's reload signal (libmilter takes SIGHUP as stop): sent to
    # `policyd serve` by an admin who remembers it, it reloads instead of
    # ending the service by its default action.
    config_path = _processes_config(tmp_path, unbound, processes)
    daemon = daemon_factory(config_path)
    _wait_for_workers(daemon, processes)
    config_path.write_text(config_path.read_text()
                           + "spf:\n  mailfrom:\n    on_softfail: reject\n")
    daemon.signal(signal.SIGUSR1)
    deadline = time.monotonic() + PATIENCE
    while daemon.log().count("reloaded config") < processes:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    replies = _softfail_replies(daemon, 2 * processes)
    assert all(reply.startswith("550 5.7.23 ") for reply in replies), replies
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
def test_a_worker_ignores_a_reload_signal_sent_to_it(tmp_path, unbound, daemon_factory,
                                                     signum):
    # pkill -HUP policyd reaches the workers too: they reload from their
    # parent only, once, with the config it validated.
    daemon = daemon_factory(_processes_config(tmp_path, unbound, 2))
    _wait_for_workers(daemon, 2)
    for worker in _children(daemon.process.pid):
        os.kill(worker, signum)
    client = PolicyClient(daemon.address)
    try:
        assert client.ask(**SOFTFAIL.attributes).startswith(AR)
    finally:
        client.close()
    assert len(_children(daemon.process.pid)) == 2
    assert "reloaded config" not in daemon.log()
    assert "exited" not in daemon.log()


def test_a_new_client_is_refused_at_once_while_the_workers_drain(tmp_path, unbound,
                                                                   daemon_factory):
    # Requests in flight wait 2 s for DNS; meanwhile a new connection must be
    # refused, not queued on a socket nobody will accept on any more.
    proxy = DelayingDnsProxy((unbound.address, unbound.port), delay=2.0)
    try:
        config_path = daemon_config(tmp_path, unbound, dns=("127.0.0.1", proxy.port))
        config_path.write_text(config_path.read_text().replace(
            "  drain_timeout: 10\n", "  drain_timeout: 10\n  processes: 2\n"))
        daemon = daemon_factory(config_path)
        busy = PolicyClient(daemon.address)
        busy.send(policy_request(**CASES[0].attributes))
        deadline = time.monotonic() + PATIENCE
        while proxy.queries == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        daemon.signal(signal.SIGTERM)
        refused_by = time.monotonic() + 0.5
        while True:
            try:
                PolicyClient(daemon.address).close()
            except OSError:
                break    # refused (or the socket file is gone): the right answer
            assert time.monotonic() < refused_by, "still connecting while draining"
            time.sleep(0.02)
        assert busy.reply()    # the request in flight is still answered (DNS too slow for a pass)
        busy.close()
        assert daemon.wait() == 0
    finally:
        proxy.stop()


def test_an_spf_lookup_that_times_out_defers_in_bounded_time(tmp_path, unbound, daemon_factory):
    """A resolver that never answers one question: the daemon replies with
    the configured temperror action (spf.mailfrom.on_temperror: defer)
    once dns.timeout is spent, and keeps serving."""
    proxy = QueryCountingProxy((unbound.address, unbound.port),
                               drop=lambda name, rdtype: name == "other.example.").start()
    try:
        dns = f"dns:\n  nameservers: ['{proxy.address}']\n  port: {proxy.port}\n  timeout: 0.5\n"
        daemon = daemon_factory(daemon_config(tmp_path, unbound, dns))
        client = PolicyClient(daemon.address)
        started = time.monotonic()
        reply = client.ask()
        elapsed = time.monotonic() - started
        assert reply == ("451 4.7.24 SPF temporary error for other.example (mailfrom), "
                         "try again later")
        assert elapsed < 2.0
        assert ("other.example.", "TXT") in proxy.questions
        # The next request, for a sender the resolver does answer, is served.
        assert "spf=pass (without dnssec) smtp.mailfrom=own.example" in client.ask(
            sender="a@own.example", client_address="203.0.113.7", helo_name="mx.own.example")
        client.close()
    finally:
        proxy.stop()



# --- hostile clients (issue 15): pipelining, non-reading, trickling, floods ----

from tests.integration.dnsworld import free_port  # noqa: E402
from tests.unit.policy.test_server import (Pipeliners, connect_and_close_flood,  # noqa: E402
                                           fresh_connections, median, round_trips)


def _inet_config(tmp_path: Path, unbound, policy: str = "") -> tuple[Path, tuple[str, int]]:
    """The daemon's config with two workers on a TCP port beside the UNIX
    socket, and `policy` (YAML) merged into its policy section."""
    import yaml
    port = free_port("127.0.0.1")
    path = daemon_config(tmp_path, unbound)
    settings = yaml.safe_load(path.read_text())
    settings["policy"]["listen"].insert(0, f"inet:127.0.0.1:{port}")
    settings["policy"]["processes"] = 2
    settings["policy"].update(yaml.safe_load(policy) or {})
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path, ("127.0.0.1", port)


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_clients_that_pipeline_and_never_read_leave_the_others_served(tmp_path, unbound,
                                                                     daemon_factory):
    # Measured before against policyd serve: with 100 such clients a
    # well-formed client's requests timed out, and the workers grew to
    # 139 MB.  Margins are wide: a loaded 2-core machine.
    config_path, address = _inet_config(tmp_path, unbound)
    daemon = daemon_factory(config_path)
    _wait_for_workers(daemon, 2)
    workers = _children(daemon.process.pid)
    round_trips(address, 20)        # the engine's DNS cache warm
    idle = median(round_trips(address, 40))
    before = _rss_kib(workers)
    with Pipeliners(address, 100, reading=False):
        loaded = round_trips(address, 40)
        grown = _rss_kib(workers) - before
    assert median(loaded) < 10 * idle + 0.02, (idle, sorted(loaded))
    assert grown < 64 * 1024, f"the workers grew by {grown} KiB"
    assert "Traceback" not in daemon.log()


def test_a_request_trickled_an_octet_at_a_time_is_closed_at_its_deadline(
        tmp_path, unbound, daemon_factory):
    config_path, address = _inet_config(tmp_path, unbound, "request_timeout: 1")
    daemon = daemon_factory(config_path)
    request = policy_request(**SOFTFAIL.attributes)
    started = time.monotonic()
    with socket.create_connection(address, PATIENCE) as sock:
        sock.settimeout(0.1)
        closed = False
        for octet in request:
            try:
                sock.sendall(bytes([octet]))
                closed = sock.recv(100) == b""
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
            if closed:
                break
    assert closed, "never closed"
    assert 1.0 <= time.monotonic() - started < 1.0 + PATIENCE / 3
    daemon.wait_for_log("request not complete 1 s after its first octet; closing")


def test_a_flood_of_connects_that_close_leaves_fresh_connections_served(
        tmp_path, unbound, daemon_factory):
    # Before: the two workers left the listening queue full (ListenOverflows)
    # while mostly idle, and a fresh connection whose SYN was dropped
    # waited a second for its retry.
    config_path, address = _inet_config(tmp_path, unbound)
    daemon = daemon_factory(config_path)
    _wait_for_workers(daemon, 2)
    result = {}
    flood = threading.Thread(target=lambda: result.update(
        zip(("connects", "dropped"), connect_and_close_flood(address, 2.0))))
    flood.start()
    time.sleep(0.2)
    latencies = sorted(fresh_connections(address, 60))
    flood.join()
    assert result["dropped"] < result["connects"] / 4, result
    assert latencies[len(latencies) // 2] < 0.1, latencies
    assert "pausing" not in daemon.log() and "Traceback" not in daemon.log()


def _descriptor_limits(soft: int, hard: int | None = None):
    import resource
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, limit))


def _soft_descriptor_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no descriptor limit for {pid}")


def test_the_soft_descriptor_limit_is_raised_at_start(tmp_path, unbound, daemon_factory):
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard descriptor limit above 256")
    config_path, _ = _inet_config(tmp_path, unbound)
    daemon = daemon_factory(config_path, preexec_fn=_descriptor_limits(256))
    _wait_for_workers(daemon, 2)
    daemon.wait_for_log(f"descriptors: up to {hard} open at once (soft limit raised from 256)")
    for pid in [daemon.process.pid, *_children(daemon.process.pid)]:
        assert _soft_descriptor_limit(pid) == hard


def test_out_of_descriptors_new_connections_are_closed_at_once(tmp_path, unbound,
                                                               daemon_factory):
    # Postfix applies its default_action when the server closes; a
    # connection left in the queue instead waits for Postfix's timeout.
    config_path, address = _inet_config(tmp_path, unbound, "idle_timeout: 60")
    daemon = daemon_factory(config_path, preexec_fn=_descriptor_limits(64, 64))
    _wait_for_workers(daemon, 2)
    held = []
    try:
        for _ in range(160):      # more than two workers of 64 descriptors hold
            try:
                held.append(socket.create_connection(address, PATIENCE))
            except ConnectionError:
                pass
        started = time.monotonic()
        with socket.create_connection(address, PATIENCE) as sock:
            sock.settimeout(PATIENCE)
            try:
                sock.sendall(policy_request(**SOFTFAIL.attributes))
                answer = sock.recv(100)
            except ConnectionError:
                answer = b""
        assert answer == b"" and time.monotonic() - started < 2.0
    finally:
        for sock in held:
            sock.close()
    daemon.wait_for_log("closing new connections at once")
    assert "pausing" not in daemon.log()
    # Descriptors free again (once the workers have seen the clients go):
    # served as usual.
    deadline = time.monotonic() + PATIENCE
    while True:
        client = PolicyClient(daemon.address)
        try:
            assert client.ask(**SOFTFAIL.attributes).startswith(AR)
            break
        except ConnectionError:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        finally:
            client.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_reload_that_turns_routing_on_says_it_needs_a_restart(tmp_path, unbound,
                                                                daemon_factory, processes):
    # The routing socketmap is started with the service; a reload cannot
    # start it, and must say so rather than leave Postfix's lookups failing.
    config_path = _processes_config(tmp_path, unbound, processes)
    daemon = daemon_factory(config_path)
    _wait_for_workers(daemon, processes)
    port = free_port("127.0.0.1")
    config_path.write_text(config_path.read_text()
                           + f"routing:\n  listen: ['inet:127.0.0.1:{port}']\n")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + PATIENCE
    while "routing socketmap starts at the next start" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
