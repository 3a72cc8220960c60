"""A real DNS world for the tests: unbound on loopback, serving the zone
files in tests/data/zones.

One unbound process is both the authority and the validating resolver:

- every tests/data/zones/*.zone except the signed ones becomes a static
  local-zone of local-data: answered from memory with AA and without AD
  (local data is never validated), NXDOMAIN for names not listed, and the
  zone's SOA in negative answers (RFC 2308 §3);
- signed.example is signed at start with a fresh key (ldns-signzone) and
  served as an `auth-zone` with `for-upstream: yes, for-downstream: no`:
  unbound resolves it as if it were on a remote server, so the answers
  pass through its validator, which has the key as its trust anchor and
  sets AD on them (RFC 4035 §3.2.3).  bogus.signed.example has its data
  changed after signing, so validation fails and unbound answers SERVFAIL;
- temperror.example is refused (REFUSED), and so is every name outside
  the world (`local-zone: "." refuse`): nothing ever leaves loopback.

Everything lives in a directory the caller gives; the process is a child
of the test run, stopped by its PID.
"""
from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone
import yaml

UNBOUND = "/usr/sbin/unbound"
ZONES_DIR = Path(__file__).resolve().parent.parent / "data" / "zones"

# Not 127.0.0.1 or 127.0.0.53, which a system resolver may hold.
DEFAULT_ADDRESS = "127.0.0.201"

# Zones served signed, through the validator; the rest are local data.
SIGNED_ZONES = ("signed.example.",)
# The name in a signed zone whose data no longer matches its signature.
BOGUS_NAME = "bogus.signed.example."
BOGUS_TEXT = "v=spf1 +all"
# Answered REFUSED, which dnspython reports as NoNameservers (a temperror).
REFUSED_ZONES = ("temperror.example.",)
# An empty static zone with no SOA: its NXDOMAIN carries no SOA, the case
# RFC 2308 §5 says must not be cached.
NO_SOA_ZONES = ("nosoa.example.",)

# The standard world's NAT settings; see write_config.
OWN_DOMAINS = ["own.example"]
NAT_NETWORKS = ["192.168.1.0/24", "fd00::/8"]
PUBLIC_ADDRESSES = ["203.0.113.7"]
AUTHSERV_ID = "mx.test.example"

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class DnsWorldError(Exception):
    """The test DNS server could not be set up or did not start."""


class ChildServer:
    """A server the tests started as their child (`process`), logging to
    `log_path`: its log, and its stop by PID."""
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM our child by its PID; SIGKILL if it does not go."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


@dataclass
class UnboundServer(ChildServer):
    address: str
    port: int
    process: subprocess.Popen
    directory: Path
    log_path: Path
    # The DNSKEY the validator trusts for signed.example, as zone-file text.
    trust_anchor: str


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test run dies, even by SIGKILL.

    prctl(2) PR_SET_PDEATHSIG; without it a killed pytest leaves unbound
    running.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(address: str) -> int:
    """A port free for both UDP and TCP on address (DNS needs both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((address, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((address, port))
                except OSError:
                    continue
            return port
    raise DnsWorldError(f"no port free for both UDP and TCP on {address}")


def load_zones(zones_dir: Path = ZONES_DIR) -> dict[str, dns.zone.Zone]:
    """Every *.zone file, by origin (absolute, lower case, final dot)."""
    zones = {}
    for path in sorted(zones_dir.glob("*.zone")):
        zone = dns.zone.from_file(str(path), relativize=False)
        origin = zone.origin.to_text().lower()
        if path.name != origin + "zone":
            raise DnsWorldError(f"{path}: a zone file is named after its origin: {origin}zone")
        zones[origin] = zone
    return zones


def _local_data(zone: dns.zone.Zone) -> list[str]:
    lines = []
    for name, rdataset in zone.iterate_rdatasets():
        for rdata in rdataset:
            record = f"{name} {rdataset.ttl} IN {dns.rdatatype.to_text(rdataset.rdtype)} {rdata}"
            if "'" in record:
                raise DnsWorldError(f"cannot quote for unbound: {record}")
            lines.append(f"  local-data: '{record}'")
    return lines


def sign_zone(zone_path: Path, directory: Path) -> tuple[Path, str]:
    """Sign with a fresh key, then break BOGUS_NAME's data.

    Returns the signed zone file and the DNSKEY to trust.  One key with the
    SEP flag signs everything (a combined KSK/ZSK); ECDSA P-256 (algorithm
    13) is what RFC 8624 §3.1 recommends to sign with.
    """
    for tool in ("ldns-keygen", "ldns-signzone"):
        if shutil.which(tool) is None:
            raise DnsWorldError(f"{tool} not found: apt-get install ldnsutils")
    origin = dns.zone.from_file(str(zone_path), relativize=False).origin.to_text()
    keys = directory / "keys"
    keys.mkdir(exist_ok=True)
    keygen = subprocess.run(
        ["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", origin],
        cwd=keys, capture_output=True, text=True, check=True)
    key_base = keys / keygen.stdout.strip()
    signed_path = directory / (origin + "zone.signed")
    subprocess.run(
        ["ldns-signzone", "-o", origin, "-f", str(signed_path), str(zone_path), str(key_base)],
        cwd=keys, capture_output=True, text=True, check=True)

    signed = dns.zone.from_file(str(signed_path), origin=origin, relativize=False)
    if BOGUS_NAME.endswith("." + origin):
        node = signed.get_node(BOGUS_NAME)
        old = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.TXT) if node else None
        if old is None:
            raise DnsWorldError(f"{zone_path} has no TXT at {BOGUS_NAME}")
        forged = dns.rdataset.from_text("IN", "TXT", old.ttl, f'"{BOGUS_TEXT}"')
        node.replace_rdataset(forged)   # the RRSIG over the old data stays
        signed.to_file(str(signed_path), relativize=False)
    trust_anchor = Path(str(key_base) + ".key").read_text().split(";", 1)[0].strip()
    return signed_path, trust_anchor


def unbound_conf(directory: Path, address: str, port: int,
                 zones: dict[str, dns.zone.Zone], signed: dict[str, Path],
                 trust_anchors: list[str]) -> str:
    lines = [
        "server:",
        f"  interface: {address}@{port}",
        f"  port: {port}",
        # Outgoing sockets bound to loopback cannot reach anything else.
        f"  outgoing-interface: {address}",
        "  do-ip6: no",
        # Stay a child we can stop: no privilege drop, chroot or daemon files
        # outside our directory (the system's /run/unbound.pid is not ours).
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        f'  pidfile: "{directory}/unbound.pid"',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 1",
        "  val-log-level: 2",
        "  num-threads: 1",
        "  so-reuseport: no",
        "  access-control: 127.0.0.0/8 allow",
        '  module-config: "validator iterator"',
        # RFC 8145 key-tag queries are noise here.
        "  trust-anchor-signaling: no",
        '  local-zone: "." refuse',
    ]
    for anchor in trust_anchors:
        lines.append(f'  trust-anchor: "{anchor}"')
    for origin, zone in zones.items():
        if origin in signed:
            # Let it through the local zones to the iterator and validator.
            lines.append(f'  local-zone: "{origin}" transparent')
            continue
        lines.append(f'  local-zone: "{origin}" static')
        lines.extend(_local_data(zone))
    for origin in REFUSED_ZONES:
        lines.append(f'  local-zone: "{origin}" always_refuse')
    for origin in NO_SOA_ZONES:
        lines.append(f'  local-zone: "{origin}" static')
    for origin, path in signed.items():
        lines += ["auth-zone:", f'  name: "{origin}"', f'  zonefile: "{path}"',
                  "  for-upstream: yes", "  for-downstream: no", "  fallback-enabled: no"]
    lines += ["remote-control:", "  control-enable: no", ""]
    return "\n".join(lines)


def answers(address: str, port: int, timeout: float = 0.2) -> bool:
    """True once the server answers a question about the world."""
    query = dns.message.make_query("example.", "SOA")
    try:
        response = dns.query.udp(query, address, port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return response.rcode() == dns.rcode.NOERROR and bool(response.answer)


def start_unbound(directory: Path, address: str = DEFAULT_ADDRESS,
                  zones_dir: Path = ZONES_DIR) -> UnboundServer:
    """Start unbound serving the world in zones_dir; return once it answers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    zones = load_zones(zones_dir)
    signed, trust_anchors = {}, []
    for origin in SIGNED_ZONES:
        if origin in zones:
            path, anchor = sign_zone(zones_dir / f"{origin}zone", directory)
            signed[origin] = path
            trust_anchors.append(anchor)
    conf_path = directory / "unbound.conf"
    log_path = directory / "unbound.log"
    last_log = ""
    # A free port can be taken between our check and unbound's bind: retry.
    for _ in range(3):
        port = free_port(address)
        conf_path.write_text(unbound_conf(directory, address, port, zones, signed, trust_anchors))
        with open(log_path, "wb") as log:
            process = subprocess.Popen([UNBOUND, "-d", "-c", str(conf_path)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       preexec_fn=_die_with_parent)
        server = UnboundServer(address, port, process, directory, log_path,
                               "\n".join(trust_anchors))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if answers(address, port):
                return server
        server.stop()
        last_log = server.log()
        if "bind" not in last_log and "could not open" not in last_log:
            break
    raise DnsWorldError(f"unbound did not start on {address}:{port}:\n{last_log}")


def write_config(tmp_path: Path, unbound: UnboundServer, extra_yaml: str = "") -> Path:
    """A policyd config for the standard world, resolving through unbound.

    extra_yaml is merged over it, mapping by mapping, so a test can set
    `dns: {trust_ad: "no"}` and keep the nameservers.  It is parsed as YAML
    1.1: quote "yes"/"no" meant as strings.
    """
    settings = {
        "authserv_id": AUTHSERV_ID,
        "dns": {"nameservers": [unbound.address], "port": unbound.port},
        "nat": {"own_domains": list(OWN_DOMAINS), "networks": list(NAT_NETWORKS),
                "public_addresses": list(PUBLIC_ADDRESSES)},
    }
    _merge(settings, yaml.safe_load(extra_yaml) or {})
    path = Path(tmp_path) / "policyd.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@dataclass
class QueryCountingProxy:
    """A UDP forwarder in front of a DNS server that records each question.

    It shows from the outside which queries reach the server, e.g. that a
    cached answer sent nothing.  One question at a time is enough for that.
    `drop(name, type)` true: the question is recorded but never forwarded,
    a server that does not answer it (a timeout for the asker).  `delay`
    seconds: each answer is sent back that long after its question came, a
    slow resolver (each question waits on its own).
    """
    upstream: tuple[str, int]
    address: str = "127.0.0.1"
    questions: list[tuple[str, str]] = field(default_factory=list)
    drop: Callable[[str, str], bool] | None = None
    delay: float = 0.0

    def __post_init__(self):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((self.address, 0))
        self._socket.settimeout(0.1)
        self.port = self._socket.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._timers: list[threading.Timer] = []

    def start(self) -> QueryCountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        for timer in self._timers:
            timer.cancel()
            timer.join()
        self._socket.close()

    def _answer(self, answer: bytes, client, received: float) -> None:
        wait = received + self.delay - time.monotonic()
        if wait <= 0:
            self._socket.sendto(answer, client)
            return
        timer = threading.Timer(wait, self._socket.sendto, (answer, client))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _serve(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(5.0)
            while not self._stopping.is_set():
                try:
                    query, client = self._socket.recvfrom(65535)
                except socket.timeout:
                    continue
                received = time.monotonic()
                question = dns.message.from_wire(query).question[0]
                asked = (question.name.to_text(), dns.rdatatype.to_text(question.rdtype))
                self.questions.append(asked)
                if self.drop is not None and self.drop(*asked):
                    continue
                upstream.sendto(query, self.upstream)
                try:
                    self._answer(upstream.recv(65535), client, received)
                except socket.timeout:
                    pass


@dataclass
class Datagram:
    """One datagram a ScriptedServer sends back, from its own port or,
    with from_another_port, from another socket on the same address."""
    data: bytes
    from_another_port: bool = False


@dataclass
class ScriptedServer:
    """A UDP DNS server on loopback whose answers the test writes.

    For each query, script(query, number) gives the datagrams to send
    back, in order (number counts the queries, from 0); none is a lost
    query.  It records each query as received, with its source port, so a
    test can check what was asked and how often.
    """
    script: Callable[[dns.message.Message, int], list[Datagram]]
    address: str = "127.0.0.1"
    port: int = 0
    queries: list[tuple[dns.message.Message, int]] = field(default_factory=list)

    def __post_init__(self):
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.bind((self.address, self.port))
        self._socket.settimeout(0.1)
        self._other = socket.socket(family, socket.SOCK_DGRAM)
        self._other.bind((self.address, 0))
        self.port = self._socket.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        self._socket.close()
        self._other.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                wire, client = self._socket.recvfrom(65535)
            except socket.timeout:
                continue
            query = dns.message.from_wire(wire)
            self.queries.append((query, client[1]))
            for datagram in self.script(query, len(self.queries) - 1):
                sender = self._other if datagram.from_another_port else self._socket
                sender.sendto(datagram.data, client)


def reply(query: dns.message.Message, rcode: int = dns.rcode.NOERROR,
          answer: tuple[str, ...] = (), authority: tuple[str, ...] = (), ad: bool = False,
          **changes) -> bytes:
    """The wire form of an answer to query.

    answer and authority hold records as zone-file lines with absolute
    names ("a.example. 60 IN A 192.0.2.1"); changes set message attributes
    after that (id=..., flags=...), to make a wrong answer.
    """
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if ad:
        response.flags |= dns.flags.AD
    for section, lines in ((response.answer, answer), (response.authority, authority)):
        for line in lines:
            name, ttl, rdclass, rdtype, text = line.split(None, 4)
            section.append(dns.rrset.from_text(name, int(ttl), rdclass, rdtype, text))
    for attribute, value in changes.items():
        setattr(response, attribute, value)
    return response.to_wire()
