"""A real DNSSEC chain on loopback for the tests: an authoritative nsd
serving the zones of tests/data/chain, and validating unbound in front
of it that trusts only the chain's test trust anchor.

- chain.example is the parent: signed at start with a fresh key, and its
  DS is the resolver's trust anchor (`trust-anchor:`, as the root's DS is
  in a real resolver).
- Each child zone is signed at start with a fresh key of its own, and its
  DS is appended to the parent before the parent is signed, so each
  answer is validated along the chain, anchor -> DS -> DNSKEY -> RRSIG
  (RFC 4035 §5), not against a key the zone vouches for itself.
- unsigned.chain.example is served unsigned and delegated without a DS:
  provably insecure (the parent's NSEC denies the DS).
- expired.chain.example is signed with signatures that expired in 2020,
  its DS in the parent: bogus, so a validating resolver answers SERVFAIL
  (with RFC 8914 extended error 7, "Signature Expired").
- The reverse zones hold the PTR records of the deployment's public
  addresses, unsigned (no anchor covers them).
- @@DKIM:NAME@@ in a zone file becomes the public key of a fresh RSA key
  pair NAME (its private key in the directory, `Chain.dkim_key`); each
  child domain's signing key is the one named by its first label.

Why nsd and not knot: nsd serves the zone files as they are, so a zone can
be signed once by ldns-signzone (the tool tests/integration/dnsworld.py
already uses) with planted flaws such as expired signatures; knot signs
its zones itself and would repair them, and needs a key store and
policy for that.  nsd is also the smaller one to start: one config, no
database, no control socket.

unbound reaches every zone through a stub-zone that names nsd's address
and port (a delegation can only send it to port 53); the chain is still
validated from the anchor down, since the DS comes from the parent.

Everything lives in a directory the caller gives; the processes are
children of the test run, stopped by PID.  `NetworkNamespace` makes a
namespace of the test's own with a veth pair on 198.18.0.0/15 (RFC 2544,
benchmarking: not routed), so that a resolver can be put on an address
that is not loopback.
"""
from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.zone
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.dnsworld import ChildServer, DnsWorldError, _die_with_parent, free_port

NSD = "/usr/sbin/nsd"
UNBOUND = "/usr/sbin/unbound"
ZONES_DIR = Path(__file__).resolve().parent.parent / "data" / "chain"

PARENT = "chain.example."
# Served unsigned, delegated without DS.
UNSIGNED_ZONES = ("unsigned.chain.example.",
                  "113.0.203.in-addr.arpa.", "0.1.0.0.8.b.d.0.1.0.0.2.ip6.arpa.")
# Signed with signatures that expired long ago: bogus.
EXPIRED_ZONES = ("expired.chain.example.",)
EXPIRED_VALIDITY = ("20200101000000", "20200201000000")   # inception, expiration
# Names for the resolver's own checks: one that validates, one that is bogus.
SIGNED_NAME = PARENT
BOGUS_NAME = "expired.chain.example."

# The test deployment (the config `write_config` writes).
CLEAN_DOMAIN = "clean.chain.example"
PUBLIC_ADDRESSES = ("203.0.113.10", "2001:db8:10::10")
NAT_NETWORKS = ("192.168.1.0/24", "fd00::/8")
# The planted address faults (tests/data/chain/*.ip6.arpa.zone).
NO_PTR_ADDRESS = "2001:db8:10::20"
UNCONFIRMED_PTR_ADDRESS = "2001:db8:10::30"
DKIM_SELECTOR = "mail"

# Loopback addresses, apart from dnsworld's 127.0.0.201.
NSD_ADDRESS = "127.0.0.203"
RESOLVER_ADDRESS = "127.0.0.204"
PLAIN_RESOLVER_ADDRESS = "127.0.0.205"

START_TIMEOUT = 15.0


@dataclass
class Server(ChildServer):
    name: str
    address: str
    port: int
    process: subprocess.Popen
    log_path: Path


@dataclass
class SignedChain:
    """The zone files as served, and what a resolver must trust."""
    directory: Path
    zone_files: dict[str, Path]      # origin -> file nsd serves
    trust_anchor: str                # the parent's DS, zone-file text
    dkim_keys: dict[str, Path]       # key name -> private key (PEM)


@dataclass
class Chain:
    signed: SignedChain
    nsd: Server
    resolver: Server                 # validating, with the trust anchor
    others: list[Server] = field(default_factory=list)

    def dkim_key(self, name: str) -> Path:
        return self.signed.dkim_keys[name]

    def stop(self) -> None:
        for server in [*self.others, self.resolver, self.nsd]:
            server.stop()


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None and not Path(tool).exists():
            raise DnsWorldError(f"{tool} not found: apt-get install nsd ldnsutils unbound")


def _dkim_strings(public_der: bytes) -> str:
    """p=<base64> as quoted strings of at most 255 octets (RFC 1035 §3.3.14)."""
    text = "p=" + base64.b64encode(public_der).decode()
    return " ".join(f'"{text[i:i + 250]}"' for i in range(0, len(text), 250))


def _dkim_key(directory: Path, name: str) -> tuple[Path, bytes]:
    """A fresh RSA-2048 key pair: its PEM file and public key (DER SPKI)."""
    path = directory / "dkim" / f"{name}.pem"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return path, private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _keygen(directory: Path, origin: str) -> Path:
    """A fresh ECDSA P-256 key with the SEP flag (RFC 8624 §3.1: the
    algorithm to sign with); one key signs the whole zone."""
    keys = directory / "keys"
    keys.mkdir(exist_ok=True)
    made = subprocess.run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", origin],
                          cwd=keys, capture_output=True, text=True, check=True)
    return keys / made.stdout.strip()


def _sign(directory: Path, origin: str, text: str,
          validity: tuple[str, str] | None = None) -> tuple[Path, str]:
    """Sign the zone text; the signed file and the key's DS record."""
    unsigned = directory / f"{origin}zone"
    unsigned.write_text(text)
    key = _keygen(directory, origin)
    signed = directory / f"{origin}zone.signed"
    command = ["ldns-signzone", "-o", origin, "-f", str(signed)]
    if validity:
        command += ["-i", validity[0], "-e", validity[1]]
    subprocess.run([*command, str(unsigned), str(key)], capture_output=True, text=True,
                   check=True)
    ds = Path(str(key) + ".ds").read_text().split(";", 1)[0].strip()
    return signed, ds


def sign_chain(directory: Path, zones_dir: Path = ZONES_DIR) -> SignedChain:
    """The chain's zones as nsd serves them: children signed first, their
    DS appended to the parent, then the parent signed."""
    _need("ldns-keygen", "ldns-signzone")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts, dkim_keys = {}, {}
    for path in sorted(zones_dir.glob("*.zone")):
        text = path.read_text()
        while "@@DKIM:" in text:
            start = text.index("@@DKIM:")
            end = text.index("@@", start + 7)
            name = text[start + 7:end]
            key_path, public = _dkim_key(directory, name)
            dkim_keys[name] = key_path
            text = text[:start] + _dkim_strings(public) + text[end + 2:]
        origin = dns.zone.from_text(text, relativize=False).origin.to_text().lower()
        if path.name != origin + "zone":
            raise DnsWorldError(f"{path}: a zone file is named after its origin: {origin}zone")
        texts[origin] = text
    for origin in texts:
        # The key each domain's server signs with, named by its first
        # label (dkimbad's zone publishes another one, dkimbad-old).
        label = origin.split(".", 1)[0]
        if origin.endswith("." + PARENT) and label not in dkim_keys:
            dkim_keys[label] = _dkim_key(directory, label)[0]
    if PARENT not in texts:
        raise DnsWorldError(f"{zones_dir} has no {PARENT}zone")
    files: dict[str, Path] = {}
    ds_records = []
    for origin, text in texts.items():
        if origin == PARENT:
            continue
        if origin in UNSIGNED_ZONES:
            files[origin] = directory / f"{origin}zone"
            files[origin].write_text(text)
            continue
        files[origin], ds = _sign(directory, origin, text,
                                  EXPIRED_VALIDITY if origin in EXPIRED_ZONES else None)
        if origin.endswith("." + PARENT):
            ds_records.append(ds)
    parent_text = texts[PARENT] + "".join(f"{record}\n" for record in ds_records)
    files[PARENT], anchor = _sign(directory, PARENT, parent_text)
    return SignedChain(directory, files, anchor, dkim_keys)


def nsd_conf(directory: Path, address: str, port: int, zone_files: dict[str, Path]) -> str:
    lines = [
        "server:",
        f"  ip-address: {address}@{port}",
        f"  port: {port}",
        "  do-ip6: no",
        # Stay a child we can stop: no privilege drop, no chroot, every
        # file of its own in our directory.
        '  username: ""',
        '  chroot: ""',
        '  database: ""',
        f'  zonesdir: "{directory}"',
        f'  zonelistfile: "{directory}/nsd.zonelist"',
        f'  xfrdfile: "{directory}/nsd.xfrd"',
        f'  xfrdir: "{directory}"',
        f'  pidfile: "{directory}/nsd.pid"',
        f'  cookie-secret-file: "{directory}/nsd.cookie"',
        f'  logfile: "{directory}/nsd.log"',
        "  server-count: 1",
        "  verbosity: 1",
        "remote-control:",
        "  control-enable: no",
    ]
    for origin, path in zone_files.items():
        lines += ["zone:", f'  name: "{origin}"', f'  zonefile: "{path}"']
    return "\n".join(lines) + "\n"


def unbound_conf(directory: Path, address: str, port: int, nsd: tuple[str, int],
                 origins: list[str], trust_anchor: str, validating: bool,
                 access: str = "127.0.0.0/8", outgoing: str | None = None,
                 name: str = "unbound") -> str:
    lines = [
        "server:",
        f"  interface: {address}@{port}",
        f"  port: {port}",
        # Outgoing queries only from loopback: they cannot leave the host.
        f"  outgoing-interface: {outgoing or nsd[0]}",
        "  do-ip6: no",
        "  do-not-query-localhost: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        f'  pidfile: "{directory}/{name}.pid"',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 1",
        "  num-threads: 1",
        "  so-reuseport: no",
        "  qname-minimisation: no",
        f"  access-control: {access} allow",
        # RFC 8914: say why an answer failed (6 DNSSEC Bogus, 7 Signature
        # Expired, ...), and log validation failures.
        "  ede: yes",
        "  val-log-level: 2",
        "  trust-anchor-signaling: no",
        '  local-zone: "." refuse',
    ]
    if validating:
        lines += ['  module-config: "validator iterator"', f'  trust-anchor: "{trust_anchor}"']
    else:
        lines += ['  module-config: "iterator"']
    for origin in origins:
        # Overrides unbound's default local zones (the documentation
        # ranges' reverse zones are among them) and the refusal of ".".
        lines.append(f'  local-zone: "{origin}" transparent')
    for origin in origins:
        lines += ["stub-zone:", f'  name: "{origin}"', f"  stub-addr: {nsd[0]}@{nsd[1]}"]
    lines += ["remote-control:", "  control-enable: no", ""]
    return "\n".join(lines)


def _answers(address: str, port: int, recursion: bool, timeout: float = 0.2) -> bool:
    query = dns.message.make_query(PARENT, "SOA")
    if not recursion:
        query.flags = 0
    try:
        response = dns.query.udp(query, address, port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return response.rcode() == dns.rcode.NOERROR and bool(response.answer)


def _start(name: str, command: list[str], conf_path: Path, conf, address: str,
           log_path: Path, netns: NetworkNamespace | None, recursion: bool,
           port: int | None = None) -> Server:
    """Start a server on a free port; return once it answers (or, inside a
    namespace, once its process stays up: the caller checks through the
    resolver)."""
    prefix = ["ip", "netns", "exec", netns.name] if netns else []
    last_log = ""
    for _ in range(3):
        # A fresh namespace has every port free.
        chosen = port or free_port(address)
        conf_path.write_text(conf(chosen))
        with open(log_path, "ab") as log:
            process = subprocess.Popen([*prefix, *command], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log, preexec_fn=_die_with_parent)
        server = Server(name, address, chosen, process, log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if netns and not recursion:
                time.sleep(0.3)   # nsd in a namespace: unreachable from here
                if process.poll() is None:
                    return server
            elif _answers(address, chosen, recursion):
                return server
            time.sleep(0.02)
        server.stop()
        last_log = server.log()
        if "bind" not in last_log and "could not open" not in last_log \
                and "in use" not in last_log:
            break
    raise DnsWorldError(f"{name} did not start on {address}:\n{last_log}")


def start_nsd(signed: SignedChain, address: str = NSD_ADDRESS,
              netns: NetworkNamespace | None = None) -> Server:
    _need(NSD)
    directory = signed.directory
    return _start("nsd", [NSD, "-d", "-c", str(directory / "nsd.conf")],
                  directory / "nsd.conf",
                  lambda port: nsd_conf(directory, address, port, signed.zone_files),
                  address, directory / "nsd.log", netns, recursion=False,
                  port=5300 if netns else None)


def start_resolver(signed: SignedChain, nsd: Server, address: str = RESOLVER_ADDRESS,
                   validating: bool = True, netns: NetworkNamespace | None = None,
                   name: str = "unbound") -> Server:
    """unbound in front of nsd: validating with the chain's anchor, or a
    plain recursive resolver (`validating=False`, no validator module)."""
    _need(UNBOUND)
    directory = signed.directory
    conf_path = directory / f"{name}.conf"
    access = f"{netns.namespace_address}/30" if netns else "127.0.0.0/8"
    return _start(name, [UNBOUND, "-d", "-c", str(conf_path)], conf_path,
                  lambda port: unbound_conf(directory, address, port, (nsd.address, nsd.port),
                                            list(signed.zone_files), signed.trust_anchor,
                                            validating, access=access,
                                            outgoing=nsd.address, name=name),
                  address, directory / f"{name}.log", netns, recursion=True,
                  port=53 if netns else None)


def start_chain(directory: Path, netns: NetworkNamespace | None = None) -> Chain:
    """Sign the zones, start nsd and a validating unbound; return once the
    resolver answers for the chain.  In `netns`, both run inside the
    namespace (nsd on its loopback) and unbound listens on the
    namespace's veth address only."""
    signed = sign_chain(Path(directory))
    if netns is None:
        nsd = start_nsd(signed)
        try:
            return Chain(signed, nsd, start_resolver(signed, nsd))
        except BaseException:
            nsd.stop()
            raise
    nsd = start_nsd(signed, address="127.0.0.1", netns=netns)
    try:
        return Chain(signed, nsd, start_resolver(signed, nsd, address=netns.namespace_address,
                                                 netns=netns))
    except BaseException:
        nsd.stop()
        raise


@dataclass
class NetworkNamespace:
    """A network namespace of the test's own, joined to this one by a veth
    pair: host_address here, namespace_address inside, on a /30 of
    198.18.0.0/15 (RFC 2544: for benchmarking, never routed)."""
    name: str
    host_address: str
    namespace_address: str
    host_link: str

    @classmethod
    def create(cls) -> NetworkNamespace:
        tag = secrets.token_hex(3)
        name, link = f"policyd-check-{tag}", f"pdc{tag}"
        # A /30 chosen at random, not one this host already has.
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        for _ in range(50):
            third, fourth = secrets.randbelow(256), secrets.randbelow(64) * 4
            host, inside = f"198.18.{third}.{fourth + 1}", f"198.18.{third}.{fourth + 2}"
            if f" {host}/" not in used and f" {inside}/" not in used:
                break
        namespace = cls(name, host, inside, link)
        steps = [
            ["ip", "netns", "add", name],
            ["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name],
            ["ip", "addr", "add", f"{host}/30", "dev", link],
            ["ip", "link", "set", link, "up"],
            ["ip", "-n", name, "addr", "add", f"{inside}/30", "dev", "eth0"],
            ["ip", "-n", name, "link", "set", "eth0", "up"],
            ["ip", "-n", name, "link", "set", "lo", "up"],
        ]
        try:
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode != 0:
                    raise DnsWorldError(f"{' '.join(step)}: {done.stderr.strip()}")
        except BaseException:
            namespace.delete()
            raise
        return namespace

    def delete(self) -> None:
        """Removes the namespace; its end of the veth pair takes ours along."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True)


def write_config(path: Path, resolver: Server, own_domains: tuple[str, ...] = (CLEAN_DOMAIN,),
                 public_addresses: tuple[str, ...] = PUBLIC_ADDRESSES,
                 extra: str = "") -> Path:
    """A policyd config for the chain's test deployment."""
    def items(values):
        return "[" + ", ".join(values) + "]"
    path.write_text(
        f"authserv_id: mx.{CLEAN_DOMAIN}\n"
        f"dns: {{nameservers: [{resolver.address}], port: {resolver.port}, timeout: 2.0}}\n"
        f"nat:\n  own_domains: {items(own_domains)}\n"
        f"  networks: {items(NAT_NETWORKS)}\n"
        f"  public_addresses: {items(public_addresses)}\n" + extra)
    return path
