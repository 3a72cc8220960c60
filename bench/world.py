"""A synthetic mail world for the benchmarks, served by a private unbound.

Sender domains publish a realistic mix of SPF records (RFC 7208): ip4 and
ip6 networks, hard and soft fail, include chains one and two levels deep
through shared "providers", a/mx mechanisms, redirect, and domains with no
SPF at all.  Their mail hosts have forward-confirmed PTR records, PTR
records that do not confirm, or none, for IPv4 and IPv6.  Own-domain mail
arriving from the NAT networks (the hairpin problem policyd relaxes) is
part of the mix too.

Everything is derived from one seed: the same seed and size give the same
zone and the same transactions, so numbers from different runs compare.

Address plan, all outside the real internet:
  198.18.0.0/15   (RFC 2544, benchmarking) sender domain and provider hosts
  2001:db8::/32   (RFC 3849, documentation) the same for IPv6
  100.64.0.0/10, 2001:db8:ffff::/48      forging clients (no PTR); the load
                                         generator gives each forged message
                                         a new address and HELO name
  192.168.1.0/24, fd00::/8, 203.0.113.7  own NAT networks and public address
                                         (as in the shared test world)

Used by bench/run_policy.py and meant to be shared with the milter
benchmark: `World` is pure data, `Unbound` runs the resolver.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

ZONE = "bench.example"
OWN_DOMAIN = "own.example"
OWN_PUBLIC_ADDRESS = "203.0.113.7"
OWN_PUBLIC_ADDRESS6 = "2001:db8:7::7"
NAT_NETWORKS = ("192.168.1.0/24", "fd00::/8")
RECIPIENT_DOMAIN = OWN_DOMAIN
TTL = 3600

DOMAIN_NETWORKS4 = ipaddress.ip_network("198.18.0.0/16")    # a /28 per domain
PROVIDER_NETWORKS4 = ipaddress.ip_network("198.19.0.0/16")  # a /24 per provider
DOMAIN_NETWORKS6 = ipaddress.ip_network("2001:db8:1::/48")  # a /64 per domain
PROVIDER_NETWORKS6 = ipaddress.ip_network("2001:db8:2::/48")
# Forged mail comes the way botnets send it: from an address and with a
# HELO name not seen before, so no cache can answer for it (fresh_value).
DYNAMIC_HELO = "pc-{:x}.dyn." + ZONE
MAX_DOMAINS = DOMAIN_NETWORKS4.num_addresses // 16
PROVIDERS = 20

# How sender domains publish SPF, in percent.  Two thirds of real senders
# use a plain ip4/ip6 list or a provider include; the rest are the shapes
# that cost extra lookups (a, mx, redirect, own include) or end softly.
KIND_WEIGHTS = {
    "ip4": 28,              # v=spf1 ip4:N -all
    "dual": 15,             # v=spf1 ip4:N ip6:N -all
    "include_own": 15,      # include:_spf.D -all -> ip4 ip6 (1 level)
    "include_provider": 20, # include:_spf.P -all -> include:_v4.P include:_v6.P (2 levels)
    "a_mx": 5,              # v=spf1 a mx -all
    "redirect": 3,          # v=spf1 redirect=_spf.D
    "softfail": 6,          # v=spf1 ip4:N ~all
    "neutral": 3,           # v=spf1 ip4:N ?all
    "none": 5,              # no SPF record at all
}
# Share of transactions from the NAT networks as an own domain.
NAT_SHARE = 0.05
# Share of the other transactions sent from a host the domain authorizes.
AUTHORIZED_SHARE = 0.70
# Share of domains whose mail host names publish a HELO record (v=spf1 a -all).
HELO_RECORD_SHARE = 0.60

ALL_QUALIFIER_RESULT = {"-all": "fail", "~all": "softfail", "?all": "neutral"}


@dataclass(frozen=True)
class Host:
    """One SMTP client machine and what Postfix would learn about it."""
    address: str
    helo: str
    client_name: str = "unknown"          # FCrDNS name, else unknown
    reverse_client_name: str = "unknown"  # PTR name, else unknown


@dataclass(frozen=True)
class Transaction:
    """One message at RCPT time.

    expect: the SPF result RFC 7208 gives for MAIL FROM (pass, fail,
    softfail, neutral, none), or "nat" for own-domain mail from the NAT
    networks (fail by the book, pass under policyd's NAT rule).
    """
    expect: str
    host: Host
    sender: str
    recipient: str
    # Attributes the load generator makes new for every message it sends,
    # as {attribute: kind} for fresh_value(); empty for repeat senders.
    fresh: tuple[tuple[str, str], ...] = ()

    def policy_attributes(self, rng: random.Random) -> list[tuple[str, str]]:
        """What Postfix 3.7 sends at RCPT (SMTPD_POLICY_README), less
        `instance`, which the load generator makes unique per request."""
        return [
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("protocol_name", "ESMTP"),
            ("client_address", self.host.address),
            ("client_name", self.host.client_name),
            ("client_port", str(rng.randint(1024, 65535))),
            ("reverse_client_name", self.host.reverse_client_name),
            ("server_address", OWN_PUBLIC_ADDRESS),
            ("server_port", "25"),
            ("helo_name", self.host.helo),
            ("sender", self.sender),
            ("recipient", self.recipient),
            ("recipient_count", "0"),
            ("queue_id", "%010X" % rng.getrandbits(40)),
            ("size", str(rng.randint(2000, 200000))),
            ("etrn_domain", ""),
            ("stress", ""),
            ("sasl_method", ""),
            ("sasl_username", ""),
            ("sasl_sender", ""),
            ("ccert_subject", ""),
            ("ccert_issuer", ""),
            ("ccert_fingerprint", ""),
            ("ccert_pubkey_fingerprint", ""),
            ("encryption_protocol", "TLSv1.3"),
            ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
            ("encryption_keysize", "256"),
            ("policy_context", ""),
        ]


@dataclass
class Domain:
    name: str
    kind: str
    all_qualifier: str
    authorized_hosts: list[Host] = field(default_factory=list)


class World:
    """The zone data and the transactions, both derived from `seed`."""

    def __init__(self, domains: int = 1000, seed: int = 1):
        if not 1 <= domains <= MAX_DOMAINS:
            raise ValueError(f"domains must be 1..{MAX_DOMAINS}")
        self.seed = seed
        self.records: list[str] = []      # unbound local-data RRs
        self.domains: list[Domain] = []
        rng = random.Random(seed)
        self._add_own_domain()
        providers = [self._add_provider(j, rng) for j in range(PROVIDERS)]
        kinds = list(KIND_WEIGHTS)
        weights = [KIND_WEIGHTS[k] for k in kinds]
        for i in range(domains):
            kind = rng.choices(kinds, weights)[0]
            self.domains.append(self._add_domain(i, kind, rng, providers))

    # --- zone data --------------------------------------------------------

    def _rr(self, name: str, rdtype: str, rdata: str) -> None:
        self.records.append(f"{name}. {TTL} IN {rdtype} {rdata}")

    def _txt(self, name: str, text: str) -> None:
        self._rr(name, "TXT", f'"{text}"')

    def _address(self, name: str, address) -> None:
        self._rr(name, "A" if address.version == 4 else "AAAA", str(address))

    def _ptr(self, address, name: str) -> None:
        self._rr(ipaddress.ip_address(address).reverse_pointer, "PTR", name + ".")

    def _confirmed_host(self, name: str, address, helo_record: bool) -> Host:
        """PTR and A/AAAA agree: Postfix sets client_name (FCrDNS)."""
        self._address(name, address)
        self._ptr(address, name)
        if helo_record:
            self._txt(name, "v=spf1 a -all")
        return Host(str(address), name, name, name)

    def _ptrless_host(self, name: str, address) -> Host:
        """The HELO name resolves, the address has no PTR."""
        self._address(name, address)
        return Host(str(address), name)

    def _unconfirmed_host(self, name: str, address, forward) -> Host:
        """PTR names a host whose address is another one (iprev fail)."""
        self._ptr(address, name)
        self._address(name, forward)
        return Host(str(address), name, "unknown", name)

    def _add_own_domain(self) -> None:
        """As in the shared test world (tests read the same facts)."""
        self._txt(OWN_DOMAIN, f"v=spf1 ip4:{OWN_PUBLIC_ADDRESS} "
                  f"ip6:{OWN_PUBLIC_ADDRESS6} -all")
        self._rr(OWN_DOMAIN, "MX", f"10 mx.{OWN_DOMAIN}.")
        self._rr(f"mx.{OWN_DOMAIN}", "A", OWN_PUBLIC_ADDRESS)
        self._rr(f"mx.{OWN_DOMAIN}", "AAAA", OWN_PUBLIC_ADDRESS6)

    def _add_provider(self, j: int, rng: random.Random) -> list[Host]:
        """A bulk sender (think _spf.google.com): two include levels deep."""
        name = f"p{j:02d}.{ZONE}"
        net4 = list(PROVIDER_NETWORKS4.subnets(new_prefix=24))[j]
        net6 = ipaddress.ip_network((int(PROVIDER_NETWORKS6.network_address) + (j << 64), 64))
        self._txt(f"_spf.{name}", f"v=spf1 include:_v4.{name} include:_v6.{name} ~all")
        self._txt(f"_v4.{name}", f"v=spf1 ip4:{net4} ~all")
        self._txt(f"_v6.{name}", f"v=spf1 ip6:{net6} ~all")
        hosts = [self._confirmed_host(f"out{k}.{name}", net4[k + 1], True) for k in range(4)]
        hosts += [self._confirmed_host(f"out6-{k}.{name}", net6[k + 1], True) for k in range(2)]
        hosts.append(self._ptrless_host(f"out6-np.{name}", net6[0x26]))
        return hosts

    def _add_domain(self, i: int, kind: str, rng: random.Random,
                    providers: list[list[Host]]) -> Domain:
        name = f"d{i:04d}.{ZONE}"
        net4 = ipaddress.ip_network((int(DOMAIN_NETWORKS4.network_address) + 16 * i, 28))
        net6 = ipaddress.ip_network((int(DOMAIN_NETWORKS6.network_address) + (i << 64), 64))
        helo_record = rng.random() < HELO_RECORD_SHARE
        # Every domain's own mail hosts: IPv4 with FCrDNS and without PTR.
        hosts4 = [self._confirmed_host(f"mail.{name}", net4[1], helo_record),
                  self._ptrless_host(f"mail2.{name}", net4[2])]
        # IPv6: FCrDNS, no PTR, and a PTR that does not confirm.
        hosts6 = [self._confirmed_host(f"mail6.{name}", net6[0x25], helo_record),
                  self._ptrless_host(f"mail6b.{name}", net6[0x26]),
                  self._unconfirmed_host(f"liar.{name}", net6[0x27], net6[0x99])]
        all_qualifier = "-all"
        if kind == "ip4":
            self._txt(name, f"v=spf1 ip4:{net4} -all")
            authorized = hosts4
        elif kind == "dual":
            self._txt(name, f"v=spf1 ip4:{net4} ip6:{net6} -all")
            authorized = hosts4 + hosts6
        elif kind == "include_own":
            self._txt(name, f"v=spf1 include:_spf.{name} -all")
            self._txt(f"_spf.{name}", f"v=spf1 ip4:{net4} ip6:{net6} -all")
            authorized = hosts4 + hosts6
        elif kind == "include_provider":
            provider = rng.randrange(PROVIDERS)
            self._txt(name, f"v=spf1 include:_spf.p{provider:02d}.{ZONE} -all")
            authorized = providers[provider]
        elif kind == "a_mx":
            self._txt(name, "v=spf1 a mx -all")
            self._rr(name, "A", str(net4[1]))
            self._rr(name, "MX", f"10 mx.{name}.")
            self._rr(f"mx.{name}", "A", str(net4[2]))
            authorized = hosts4
        elif kind == "redirect":
            self._txt(name, f"v=spf1 redirect=_spf.{name}")
            self._txt(f"_spf.{name}", f"v=spf1 ip4:{net4} ip6:{net6} -all")
            authorized = hosts4 + hosts6
        elif kind in ("softfail", "neutral"):
            all_qualifier = "~all" if kind == "softfail" else "?all"
            self._txt(name, f"v=spf1 ip4:{net4} {all_qualifier}")
            authorized = hosts4
        elif kind == "none":
            self._rr(name, "A", str(net4[1]))
            all_qualifier = ""
            authorized = hosts4 + hosts6
        else:
            raise AssertionError(kind)
        return Domain(name, kind, all_qualifier, authorized)

    def unbound_local_data(self) -> list[str]:
        """unbound.conf lines serving the world; everything else NXDOMAIN."""
        zones = [ZONE, OWN_DOMAIN, "18.198.in-addr.arpa", "19.198.in-addr.arpa",
                 "8.b.d.0.1.0.0.2.ip6.arpa"]
        # A static root: no name ever leads unbound to recurse to the
        # internet; anything outside the world is answered NXDOMAIN here.
        lines = ['    local-zone: "." static']
        for zone in zones:
            lines.append(f'    local-zone: "{zone}." static')
            # RFC 2308 §3: the SOA in negative answers says how long a
            # resolver may cache them (the minimum field, 300 s here);
            # without it NXDOMAIN answers would never be cached.
            lines.append(f"    local-data: '{zone}. {TTL} IN SOA ns.{ZONE}. "
                         f"hostmaster.{ZONE}. 1 3600 900 604800 300'")
        lines += [f"    local-data: '{record}'" for record in self.records]
        return lines

    # --- transactions -----------------------------------------------------

    def transactions(self, count: int) -> list[Transaction]:
        """`count` transactions, uniform over the sender domains."""
        rng = random.Random(self.seed * 7919 + count)
        result = []
        for n in range(count):
            recipient = f"user{rng.randrange(500)}@{RECIPIENT_DOMAIN}"
            if rng.random() < NAT_SHARE:
                if rng.random() < 0.5:
                    address = f"192.168.1.{rng.randint(10, 250)}"
                else:
                    address = f"fd00::1:{rng.randint(1, 0xffff):x}"
                host = Host(address, f"mx.{OWN_DOMAIN}")
                result.append(Transaction("nat", host, f"staff{n % 50}@{OWN_DOMAIN}",
                                          recipient))
                continue
            domain = rng.choice(self.domains)
            sender = f"u{rng.randrange(100000)}@{domain.name}"
            if rng.random() < AUTHORIZED_SHARE:
                host = rng.choice(domain.authorized_hosts)
                expect = "none" if domain.kind == "none" else "pass"
            else:
                host, fresh = self._forger(domain, rng)
                expect = ("none" if domain.kind == "none"
                          else ALL_QUALIFIER_RESULT[domain.all_qualifier])
                result.append(Transaction(expect, host, sender, recipient, fresh))
                continue
            result.append(Transaction(expect, host, sender, recipient))
        return result

    @staticmethod
    def _forger(domain: Domain, rng: random.Random) -> tuple[Host, tuple]:
        """A client outside the domain's authorization, new every time.
        Half of them claim the domain's mail host as HELO name, the rest a
        dynamic-looking one."""
        serial = rng.getrandbits(22)
        family = "ipv4" if rng.random() < 0.7 else "ipv6"
        fresh = [("client_address", family)]
        if rng.random() < 0.5:
            helo = f"mail.{domain.name}"
        else:
            helo = fresh_value("helo", serial)
            fresh.append(("helo_name", "helo"))
        return Host(fresh_value(family, serial), helo), tuple(fresh)

    def write_policy_requests(self, path: str, count: int) -> dict[str, int]:
        """The transactions as JSON lines for bench/policy_loadgen.py;
        returns how many of each expectation there are."""
        rng = random.Random(self.seed * 104729 + count)
        expectations: dict[str, int] = {}
        with open(path, "w", encoding="utf-8") as stream:
            for transaction in self.transactions(count):
                expectations[transaction.expect] = expectations.get(transaction.expect, 0) + 1
                stream.write(json.dumps({"expect": transaction.expect,
                                         "attributes": transaction.policy_attributes(rng),
                                         "fresh": dict(transaction.fresh)}))
                stream.write("\n")
        return expectations


def fresh_value(kind: str, serial: int) -> str:
    """The `serial`th new forging address or HELO name: 100.64.0.0/10
    (RFC 6598 shared space, 4M addresses before they repeat),
    2001:db8:ffff::/96, pc-N.dyn.bench.example.  Cheap: the load generator
    calls it for every forged message."""
    if kind == "ipv4":
        serial &= 0x3FFFFF   # 100.64.0.0/10
        return f"100.{64 + (serial >> 16)}.{(serial >> 8) & 255}.{serial & 255}"
    if kind == "ipv6":
        return f"2001:db8:ffff::{(serial >> 16) & 0xFFFF:x}:{serial & 0xFFFF:x}"
    if kind == "helo":
        return DYNAMIC_HELO.format(serial)
    raise ValueError(kind)


# --- the resolver -----------------------------------------------------------

def port_is_free(address: str, port: int) -> bool:
    """True when both UDP and TCP `port` can be bound on `address`."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


def free_port(address: str) -> int:
    """A port free for both UDP and TCP on `address` (checked, then released:
    a small race with other programs, acceptable for a benchmark)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
            port = probe.getsockname()[1]
        if port_is_free(address, port):
            return port
    raise RuntimeError(f"no free port on {address}")


def free_loopback_address(port: int, rng: random.Random | None = None) -> str:
    """A 127.53.x.y address on which `port` is free.  Any 127/8 address
    works on Linux's lo without configuration, so a fresh one avoids
    colliding with other resolvers on 127.0.0.1:53."""
    rng = rng or random.Random()
    for _ in range(200):
        address = f"127.53.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        if port_is_free(address, port):
            return address
    raise RuntimeError(f"no 127.53.0.0/16 address with port {port} free")


class Unbound:
    """unbound in the foreground on `address`, answering only the world.

    `ports`: every port to listen on.  policyd takes its port from its
    config; resolv.conf has no port syntax, so a system-resolver client
    (policyd-spf) needs 53.
    """

    def __init__(self, world: World, directory: str, address: str, ports: tuple[int, ...]):
        self.world, self.directory, self.address, self.ports = world, directory, address, ports
        self.process: subprocess.Popen | None = None
        self.config_path = os.path.join(directory, "unbound.conf")
        self.log_path = os.path.join(directory, "unbound.log")

    def config_text(self) -> str:
        lines = ["server:",
                 "    verbosity: 0",
                 "    use-syslog: no",
                 f'    logfile: "{self.log_path}"',
                 f'    directory: "{self.directory}"',
                 '    chroot: ""',
                 '    username: ""',
                 '    pidfile: ""',
                 "    do-daemonize: no",
                 "    do-ip6: no",
                 "    num-threads: 1",
                 # Only the iterator: no trust anchor, nothing to validate.
                 '    module-config: "iterator"',
                 "    access-control: 127.0.0.0/8 allow"]
        lines += [f"    interface: {self.address}@{port}" for port in self.ports]
        lines += self.world.unbound_local_data()
        lines += ["remote-control:", "    control-enable: no"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        with open(self.config_path, "w", encoding="utf-8") as stream:
            stream.write(self.config_text())
        checked = subprocess.run(["unbound-checkconf", self.config_path],
                                 capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"unbound-checkconf: {checked.stdout}{checked.stderr}")
        self.process = subprocess.Popen(
            ["unbound", "-d", "-c", self.config_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.log_path + ".stderr", "wb"))
        deadline = time.monotonic() + timeout
        pending = set(self.ports)
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"unbound exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("unbound did not answer in time")
            pending = {port for port in pending if not self._answers(port)}
            if pending:
                time.sleep(0.05)

    def _answers(self, port: int) -> bool:
        import dns.exception
        import dns.message
        import dns.query
        query = dns.message.make_query(OWN_DOMAIN, "TXT")
        try:
            response = dns.query.udp(query, self.address, port=port, timeout=0.2)
        except (OSError, dns.exception.DNSException):
            return False
        return bool(response.answer)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
