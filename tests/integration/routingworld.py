"""The outbound world of the routing test: a Postfix that delivers out,
resolving through an unbound of ours, to SMTP sinks on ::1 and
127.0.13.25, with policyd's routing socketmap as its filters.

- unbound serves tests/data/zones/routing.test.zone on 127.0.13.53 port
  53 (a resolv.conf names no port).
- The Postfix (tests/integration/postfix.py's PostfixInstance, with an
  smtp client and DNS on) is started inside a mount namespace of its own
  (`unshare -m`) where a resolv.conf naming that unbound is bound over
  /etc/resolv.conf: the smtp client resolves through libc, and the
  machine's resolv.conf is neither read nor changed.
- Two aiosmtpd sinks on one port, one on ::1 and one on 127.0.13.25,
  answer each RCPT by the recipient's domain (REFUSALS).
- policyd runs as an admin runs it, `python3 -m policyd serve -c FILE`:
  the routing socketmap's worker beside the policy service's.
"""
from __future__ import annotations

import os
import pwd
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiosmtpd.controller import Controller

from policyd.routing.socketmap import encode_request
from tests.integration import dnsworld
from tests.integration.postfix import (CONTRIB, MAILBOX_DOMAINS, POSTFIX, READY_TIMEOUT,
                                       PostfixInstance, _MAIN_CF, wait_until)
from tests.integration.process_session import children, session_members, stop_process_session

REPO = Path(__file__).resolve().parents[2]
ZONE = "routing.test."
RESOLVER_ADDRESS = "127.0.13.53"
SINK_V4 = "127.0.13.25"
SINK_V6 = "::1"

# The texts of issue 13, as the receivers send them (multi-line as Gmail does).
GMAIL_IPV6 = ("550-5.7.1 [::1] Our system has detected that this message does\r\n"
              "550-5.7.1 not meet IPv6 sending guidelines regarding PTR records and\r\n"
              "550-5.7.1 authentication. Please review\r\n"
              "550-5.7.1  https://support.google.com/mail/?p=IPv6AuthError for more\r\n"
              "550 5.7.1 information. a1b2c3 - gsmtp")
MICROSOFT_IPV6 = ("450 4.7.25 Service unavailable, sending IPv6 address [::1] must have "
                  "reverse DNS record.")
USER_UNKNOWN = "550 5.1.1 <nobody@unknown.routing.test>: Recipient address rejected: User unknown"

# (sink, domain) -> the RCPT reply; anything else is accepted.
REFUSALS = {
    ("v6", "gmail.routing.test"): GMAIL_IPV6,
    ("v6", "ms.routing.test"): MICROSOFT_IPV6,
    ("v6", "unknown.routing.test"): USER_UNKNOWN,
    ("v4", "v4only.routing.test"): GMAIL_IPV6.replace("[::1]", "[127.0.0.1]"),
    ("v6", "static.routing.test"): GMAIL_IPV6,
}
DOMAINS = ("gmail", "ms", "unknown", "v4only", "static", "ok6")


@dataclass
class Sink:
    """What one sink saw: (domain, reply code) per RCPT, and the messages."""
    name: str
    rcpts: list[tuple[str, int]] = field(default_factory=list)
    messages: list[tuple[str, list[str]]] = field(default_factory=list)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        domain = address.rpartition("@")[2].lower()
        reply = REFUSALS.get((self.name, domain))
        self.rcpts.append((domain, int(reply[:3]) if reply else 250))
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 2.0.0 OK queued"

    def domains(self) -> set[str]:
        return {domain for domain, _ in self.rcpts}


def common_port() -> int:
    """A port free on both ::1 and SINK_V4."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as six:
            six.bind((SINK_V6, 0))
            port = six.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as four:
                try:
                    four.bind((SINK_V4, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both ::1 and " + SINK_V4)


class Sinks:
    def __init__(self):
        self.port = common_port()
        self.v6, self.v4 = Sink("v6"), Sink("v4")
        self.controllers = [Controller(self.v6, hostname=SINK_V6, port=self.port),
                            Controller(self.v4, hostname=SINK_V4, port=self.port)]

    def start(self) -> None:
        for controller in self.controllers:
            controller.start()

    def stop(self) -> None:
        for controller in self.controllers:
            controller.stop()


def start_resolver(directory: Path) -> dnsworld.UnboundServer:
    """unbound on RESOLVER_ADDRESS port 53 with the routing.test zone only."""
    directory.mkdir(parents=True, exist_ok=True)
    zones = {origin: zone for origin, zone in dnsworld.load_zones().items() if origin == ZONE}
    conf = directory / "unbound.conf"
    conf.write_text(dnsworld.unbound_conf(directory, RESOLVER_ADDRESS, 53, zones, {}, []))
    log_path = directory / "unbound.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([dnsworld.UNBOUND, "-d", "-c", str(conf)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   preexec_fn=dnsworld._die_with_parent)
    server = dnsworld.UnboundServer(RESOLVER_ADDRESS, 53, process, directory, log_path, "")
    deadline = time.monotonic() + dnsworld.START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        import dns.message
        import dns.query
        try:
            answer = dns.query.udp(dns.message.make_query(ZONE, "SOA"), RESOLVER_ADDRESS,
                                   port=53, timeout=0.2)
            if answer.answer:
                return server
        except Exception:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"unbound did not start on {RESOLVER_ADDRESS}:53:\n{server.log()}")


def routing_main_cf(socketmap: str) -> str:
    """contrib/postfix/main.cf.routing with the test's socketmap address."""
    text = (CONTRIB / "main.cf.routing").read_text(encoding="utf-8")
    default = "inet:127.0.0.1:10027"
    if default not in text:
        raise AssertionError(f"main.cf.routing does not name {default}")
    return text.replace(default, socketmap)


class OutboundPostfix(PostfixInstance):
    """A PostfixInstance that delivers out: an smtp client, DNS through
    `resolv_conf` inside its own mount namespace, the routing.test domains
    sent to the sinks' port (`transport_maps`, MX lookups kept)."""

    def __init__(self, base: Path, resolv_conf: Path, sink_port: int, socketmap: str):
        super().__init__(base, "tcp", False, "inet:127.0.0.1:10023", "")
        self.resolv_conf, self.sink_port, self.socketmap = resolv_conf, sink_port, socketmap

    @property
    def main_cf(self) -> str:
        owner = pwd.getpwnam("postfix")
        text = _MAIN_CF.format(
            queue=self.queue_dir, data=self.data_dir, mail=self.mail_dir,
            maillog=self.maillog, base=self.base, domains=" ".join(MAILBOX_DOMAINS),
            uid=owner.pw_uid, gid=owner.pw_gid)
        for old, new in (
                # Only 127.0.0.1 is "myself": ::1 and 127.0.13.25 are other hosts
                # (else "mail for ... loops back to myself").
                ("inet_interfaces = loopback-only", "inet_interfaces = 127.0.0.1"),
                ("smtp_dns_support_level = disabled", "smtp_dns_support_level = enabled"),
                ("smtp_host_lookup = native", "smtp_host_lookup = dns")):
            if old not in text:
                raise AssertionError(f"postfix.py's main.cf has no {old!r}")
            text = text.replace(old, new)
        transports = ", ".join(f"{name}.routing.test=smtp:{name}.routing.test:{self.sink_port}"
                               for name in DOMAINS)
        return text + f"""
# The routing test: the sinks listen on one port, reached through the MX.
transport_maps = inline:{{ {transports} }}
# IPv6 first, as a dual-stack sender often does, and one session per
# attempt: a real Microsoft MX has more IPv6 addresses than Postfix's
# smtp_mx_session_limit (2), so its 450 ends the attempt as here.
smtp_address_preference = ipv6
smtp_mx_session_limit = 1
# Retries come when the test asks (postqueue -i).
minimal_backoff_time = 300s
maximal_backoff_time = 300s
queue_run_delay = 300s

# policyd routing, from contrib/postfix/main.cf.routing
{routing_main_cf(self.socketmap)}"""

    @property
    def master_cf(self) -> str:
        return (super().master_cf
                + "smtp      unix  -       -       n       -       -       smtp\n")

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        if args[:1] != ("start",):
            return super().postfix(*args, check=check)
        # The master and every process it starts live in the namespace.
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.resolv_conf),
             POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True, text=True, timeout=READY_TIMEOUT, check=check)

    def send(self, recipient: str, sender: str = "sender@local.test") -> str:
        """One message submitted over SMTP; its queue id."""
        with smtplib.SMTP(self.host, self.port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(sender)
            code, text = client.rcpt(recipient)
            assert code == 250, (code, text)
            code, text = client.data(f"From: {sender}\r\nTo: {recipient}\r\n"
                                     "Subject: routing\r\n\r\nhi\r\n")
            match = re.search(rb"queued as (\w+)", text)
            assert code == 250 and match, (code, text)
            return match.group(1).decode()

    def outcome(self, queue_id: str, recipient: str, count: int = 1) -> list[str]:
        """The delivery log lines (status=...) for `recipient` of `queue_id`,
        once there are `count`."""
        pattern = re.compile(rf"^.*{queue_id}: to=<{re.escape(recipient)}>.*status=\w+.*$",
                             re.MULTILINE)
        try:
            return wait_until(lambda: (lambda found: found if len(found) >= count else None)(
                pattern.findall(self.log())), READY_TIMEOUT, f"{count} outcomes of {queue_id}")
        except TimeoutError as error:
            raise AssertionError(f"{error}\n--- maillog ---\n{self.log()}") from None

    def retry(self, queue_id: str) -> None:
        """postqueue -i: deliver this message now (postqueue(1))."""
        subprocess.run([Path(POSTFIX).with_name("postqueue"), "-c", str(self.config_dir),
                        "-i", queue_id], check=True, capture_output=True, timeout=READY_TIMEOUT)


POLICYD = [sys.executable, "-m", "policyd"]
# How long `policyd serve` may take to stop: routing.drain_timeout and
# policy.drain_timeout are for requests in flight, and these tests leave none.
STOP_TIMEOUT = 15.0


class RoutingProcess:
    """`policyd serve -c FILE` (`--milter` if `milter`, `--user`), as an admin
    runs it: the policy service on a free port beside the routing
    socketmap of `settings` (and the milter on another), in a session of
    its own so that every process it starts is found again and stopped.

    The policy service resolves through the routing test's unbound, so
    that nothing reads the machine's resolv.conf."""

    def __init__(self, directory: Path, settings: dict, milter: bool = False,
                 user: str | None = None):
        self.directory, self.user = directory, user
        self.config = directory / "policyd.yaml"
        self.policy_port = free_port()
        self.milter_port = free_port() if milter else None
        settings = {"dns": {"nameservers": [RESOLVER_ADDRESS], "port": 53},
                    "policy": {"listen": [f"inet:127.0.0.1:{self.policy_port}"]},
                    **settings}
        if self.milter_port is not None:
            settings.setdefault("milter", {})["listen"] = f"inet:{self.milter_port}@127.0.0.1"
        self.settings = settings
        self.config.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.log_path = directory / "policyd.log"
        self.process: subprocess.Popen | None = None
        self.leftovers: list[int] = []
        spec = settings["routing"]["listen"][0]
        self.address: str | tuple[str, int]
        if spec.startswith("unix:"):
            self.address = spec[len("unix:"):]
        else:
            host, _, port = spec[len("inet:"):].rpartition(":")
            self.address = (host, int(port))

    def connect(self, timeout: float = 5) -> socket.socket:
        """A connection to the routing socketmap."""
        if isinstance(self.address, str):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(timeout)
            try:
                connection.connect(self.address)
            except OSError:
                connection.close()
                raise
            return connection
        return socket.create_connection(self.address, timeout=timeout)

    @property
    def command(self) -> list[str]:
        return POLICYD + ["serve", *(["--milter"] if self.milter_port else []),
                          *(["--user", self.user] if self.user else []), "-c", str(self.config)]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
        wait_until(self.answers, READY_TIMEOUT, "the routing socketmap")
        ports = [self.policy_port] + ([self.milter_port] if self.milter_port else [])
        wait_until(lambda: all(self.accepts(port) for port in ports), READY_TIMEOUT,
                   f"policyd serve on ports {ports}")

    def answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"policyd serve exited:\n{self.log()}")
        try:
            with self.connect(timeout=1) as connection:
                connection.sendall(encode_request("dns-reply-filter", "a. 1 IN A 192.0.2.1"))
                return connection.recv(100) == b"9:NOTFOUND ,"
        except OSError:
            return False

    def accepts(self, port: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"policyd serve exited:\n{self.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    def workers(self) -> set[int]:
        """The pids of the processes `policyd serve` started."""
        assert self.process is not None
        return children(self.process.pid)

    def routing_worker(self) -> int | None:
        """The pid of the routing worker: the one child holding the
        routing socket (a worker keeps its own front-end's sockets only);
        None while there is not exactly one."""
        assert isinstance(self.address, tuple), "found by its TCP port"
        inodes = listening_inodes(self.address[1])
        found = [pid for pid in self.workers() if socket_inodes(pid) & inodes]
        return found[0] if len(found) == 1 else None

    def stop(self) -> int | None:
        """SIGTERM, as systemd stops it; its exit status.  Whatever of its
        session outlives that is stopped too, and `leftovers` names it."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.leftovers = session_members(self.process.pid)
        stop_process_session(self.process, STOP_TIMEOUT)
        return self.process.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def listening_inodes(port: int) -> set[str]:
    """The inodes of the TCP sockets listening on `port` (/proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN.
            if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` has open."""
    found = set()
    try:
        for fd in Path("/proc", str(pid), "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[len("socket:["):-1])
    except FileNotFoundError:
        pass
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_base() -> Path:
    """A directory Postfix's unprivileged processes can walk into."""
    base = Path(tempfile.mkdtemp(prefix="policyd-routing-"))
    os.chmod(base, 0o755)
    return base
