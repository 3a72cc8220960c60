"""YAML configuration -> frozen dataclasses, strictly validated.

Every mistake is fatal at start with the file and line of the offending
node: an unknown key, a wrong type, a bad value, a missing file.  The
defaults live here, in the dataclasses, and nowhere else.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
import socket
import typing
from dataclasses import dataclass, field

import yaml

from .relay.settings import LimitsConfig, RelayConfig
from .routing.settings import RoutingConfig
from .runtime.sockets import ListenError, parse_milter, parse_postfix
from .signing.settings import SigningConfig

from .model import (IPAddress, Network, Verdict, domain_matches, in_networks,  # noqa: F401
                    normalize_address, normalize_network)

EX_CONFIG = 78   # sysexits.h: a service manager should not restart-loop on it

DEFAULT_PATH = "/etc/policyd/policyd.yaml"


class ConfigError(Exception):
    def __init__(self, path: str, line: int | None, key: str, message: str):
        self.path, self.line, self.key, self.message = path, line, key, message
        where = f"{path}, line {line}" if line else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# --- the schema ----------------------------------------------------------
#
# A section is a frozen dataclass; a key's type says how its YAML value is
# read (bool, int, float, str, an enum by its value, a nested section, a
# tuple of any of these).  A field's metadata may add:
#   kind: what a str (or each element of a tuple) must be: "domain",
#         "network", "address", "socket" (Postfix inet:HOST:PORT/unix:PATH),
#         "hostport", "mode" (octal file mode);
#   doc:  its description for policyd.yaml(5) (policyd/manual.py);
# and a section may define `problems(self, config)`, yielding (key below
# the section, message) for rules that span keys.  So a feature keeps its
# section in its own package (relay/settings.py, ...), and this module
# reads them all the same way.


class NatMode(enum.StrEnum):
    REEVALUATE = "reevaluate"   # SPF as if from nat.public_addresses
    PASS = "pass"               # own-domain mail from nat.networks passes


class TrustAd(enum.StrEnum):
    AUTO = "auto"   # loopback nameservers or "options trust-ad"
    YES = "yes"
    NO = "no"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class NatDkimAction(enum.StrEnum):
    REJECT = "reject"
    DEFER = "defer"
    FLAG = "flag"

@dataclass(frozen=True)
class SpfActions:
    """What to do with each SPF result for one identity (RFC 7208 §8)."""
    on_pass: Verdict = Verdict.NONE
    on_fail: Verdict = Verdict.REJECT
    on_softfail: Verdict = Verdict.FLAG
    on_neutral: Verdict = Verdict.NONE
    on_none: Verdict = Verdict.NONE
    on_permerror: Verdict = Verdict.FLAG
    on_temperror: Verdict = Verdict.DEFER


@dataclass(frozen=True)
class MailFromSpfActions(SpfActions):
    # A MAIL FROM without a usable domain (model.parse_mail_from): a bare
    # local part, which Postfix qualifies with $myorigin (so it would leave
    # as your own domain), or text that is no domain at all.
    on_malformed: Verdict = Verdict.REJECT


@dataclass(frozen=True)
class HeloSpfActions(SpfActions):
    check: bool = True
    on_temperror: Verdict = Verdict.NONE


@dataclass(frozen=True)
class SpfConfig:
    enabled: bool = True
    mailfrom: MailFromSpfActions = MailFromSpfActions()
    helo: HeloSpfActions = HeloSpfActions()
    # RFC 7208 §4.6.4: a receiver SHOULD limit the time of an evaluation;
    # 20 s is the figure §4.6.4 suggests.
    lookup_time_limit: float = 20.0
    # RFC 7208 §4.6.4: at most 2 void lookups by default.
    void_lookup_limit: int = 2


@dataclass(frozen=True)
class NatConfig:
    own_domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    public_addresses: tuple[IPAddress, ...] = ()
    mode: NatMode = NatMode.REEVALUATE


@dataclass(frozen=True)
class IprevConfig:
    ipv6: bool = True
    ipv4: bool = False
    on_fail: Verdict = Verdict.FLAG        # no PTR, or PTR not forward-confirmed
    on_temperror: Verdict = Verdict.NONE
    reject_text: str = "Client host rejected: cannot find your reverse hostname"


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[IPAddress, ...] = ()   # empty: those of resolv_conf
    port: int = 53
    resolv_conf: str = "/etc/resolv.conf"
    timeout: float = 2.0      # what one decision stage may wait for DNS answers that do not come
    trust_ad: TrustAd = TrustAd.AUTO
    cache_size: int = 20000   # answers kept per process


@dataclass(frozen=True)
class HeadersConfig:
    authentication_results: bool = True
    received_spf: bool = False


@dataclass(frozen=True)
class PolicyConfig:
    listen: tuple[str, ...] = ("inet:127.0.0.1:10023",)
    socket_mode: str = "0660"
    socket_group: str = ""
    # Postfix sends about 30 attributes.  Some are the client's to choose
    # and as long as Postfix's line_length_limit (2048) lets an SMTP command
    # be: a HELO name of 2043 octets makes a 2054-octet helo_name= line.
    # Refusing it would close the connection and leave the recipient to
    # Postfix's default_action (DUNNO in contrib): the client would switch
    # policyd off by the length of its HELO.  So twice the limit.
    max_line_length: int = 4096
    max_attributes: int = 100
    max_request_size: int = 32768
    # Postfix closes an idle policy connection after 300 s
    # (smtpd_policy_service_max_idle); we wait a little longer.
    idle_timeout: float = 330.0
    # A request must be complete this long after its first octet arrived,
    # however slowly the rest comes (each octet would restart idle_timeout).
    # Postfix writes a request at once and gives up on it after
    # smtpd_policy_service_timeout (100 s): a request still incomplete
    # past that is from no Postfix that still waits for the answer.
    request_timeout: float = 105.0
    workers: int = 16         # threads per process deciding requests (DNS waits block)
    # Processes sharing the listening sockets: Python runs one thread at a
    # time per process, so a process per core is what uses the machine.
    processes: int = 2
    drain_timeout: float = 10.0


@dataclass(frozen=True)
class DkimConfig:
    verify: bool = True
    # For own-domain mail accepted through the relaxed NAT rule.
    nat_requires_aligned_pass: NatDkimAction = NatDkimAction.REJECT
    # What one message may hold in memory for DKIM: a body past it is
    # hashed as it arrives instead of kept (milter/protocol.py _Message).
    max_held_bytes: int = 1048576


@dataclass(frozen=True)
class MilterConfig:
    listen: str = "inet:10025@127.0.0.1"
    # Processes sharing the listening socket.  libmilter runs a thread per
    # SMTP session, and a process's threads take turns on its GIL: with one
    # process per core, a core idles while the threads of its process wait
    # for each other.  Two per core of a 2-core machine kept both busy
    # (bench/README.md, "Why the code is as it is").
    workers: int = 4
    timeout: int = 600
    drain_timeout: float = 10.0
    # A unix: socket's mode and group: the MTA connects through the group
    # (Postfix: socket_group: postfix, as for policy.socket_group).
    socket_mode: str = "0660"
    socket_group: str = ""
    dkim: DkimConfig = DkimConfig()


@dataclass(frozen=True)
class RedisConfig:
    """Shared state (rate limits, learned routes) for every process and host."""
    url: str = field(default="", metadata={"kind": "redis_url"})
    # Each command waits at most this long; a dead or slow redis then gets
    # the feature's own fallback (policyd/state.py), never a hung Postfix.
    # A Redis on loopback or the LAN answers in well under 1 ms.
    timeout: float = 0.05
    key_prefix: str = "policyd:"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""   # "127.0.0.1:9464"; empty: off


@dataclass(frozen=True)
class Config:
    authserv_id: str = ""         # empty: this host's FQDN
    test_mode: bool = False
    log_level: LogLevel = LogLevel.INFO
    headers: HeadersConfig = HeadersConfig()
    dns: DnsConfig = DnsConfig()
    spf: SpfConfig = SpfConfig()
    nat: NatConfig = NatConfig()
    iprev: IprevConfig = IprevConfig()
    allowlist: tuple[Network, ...] = ()
    policy: PolicyConfig = PolicyConfig()
    milter: MilterConfig = MilterConfig()
    metrics: MetricsConfig = MetricsConfig()
    redis: RedisConfig = RedisConfig()
    relay: RelayConfig = RelayConfig()
    limits: LimitsConfig = LimitsConfig()
    signing: SigningConfig = SigningConfig()
    routing: RoutingConfig = RoutingConfig()
    source: str = field(default="<embedded>", compare=False)

    @property
    def hostname(self) -> str:
        return self.authserv_id


MIN_HELD_BYTES = 65536


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                     r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def _parses(parse, spec: str) -> bool:
    """The listen grammars are the socket layer's own: what loads, binds."""
    try:
        parse(spec)
    except ListenError:
        return False
    return True


def _convert_scalar(kind, node, key: str, path: str, meta=None):
    """One YAML scalar to the Python type the schema asks for."""
    def fail(message):
        raise ConfigError(path, node.start_mark.line + 1, key, message)

    if not isinstance(node, yaml.ScalarNode):
        fail("expected a single value, not a " +
             ("list" if isinstance(node, yaml.SequenceNode) else "mapping"))
    value = yaml.safe_load(yaml.serialize(node))
    if kind is bool:
        if not isinstance(value, bool):
            fail(f"{value!r} is not true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(f"{value!r} is not a whole number >= 0")
        if (key == "dns.port" or (meta or {}).get("kind") == "port") \
                and not 0 < value < 65536:
            fail(f"{value!r} is not a port number")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail(f"{value!r} is not a number of seconds > 0")
        return float(value)
    # A string setting is the text as written: unquoted `no` is not False
    # and unquoted 0660 is not the octal number 432.
    text = "" if value is None else (
        node.value if kind is str or isinstance(kind, enum.EnumMeta) else str(value))
    if isinstance(kind, enum.EnumMeta):
        try:
            return kind(text)
        except ValueError:
            members: list[enum.Enum] = list(kind)
            fail(f"{text!r} is not one of: " + ", ".join(str(m.value) for m in members))
    kind = (meta or {}).get("kind", kind) if kind is str else kind
    if kind is str:
        if key == "milter.listen" and not _parses(parse_milter, text):
            fail(f"{text!r} is not a libmilter socket (inet:PORT@HOST, inet6:PORT@HOST, unix:PATH)")
        if key in ("policy.socket_mode", "milter.socket_mode") and \
                not re.fullmatch(r"0?[0-7]{3}", text):
            fail(f"{text!r} is not an octal file mode such as 0660")
        if key == "metrics.listen" and text and not re.fullmatch(r"\[?[0-9A-Za-z.:-]+\]?:\d+", text):
            fail(f"{text!r} is not HOST:PORT")
        if key == "authserv_id" and re.search(r"[\s;()\"\\]", text):
            fail(f"{text!r} must be a single token (RFC 8601 §2.2 authserv-id)")
        return text
    if kind == "mode":
        if not re.fullmatch(r"0?[0-7]{3}", text):
            fail(f"{text!r} is not an octal file mode such as 0660")
        return text
    if kind == "hostport":
        if text and not re.fullmatch(r"\[?[0-9A-Za-z.:-]+\]?:\d+", text):
            fail(f"{text!r} is not HOST:PORT")
        return text
    if kind in ("network", Network):
        try:
            return normalize_network(ipaddress.ip_network(text, strict=False))
        except ValueError:
            fail(f"{text!r} is not an IP network")
    if kind in ("address", IPAddress):
        try:
            return normalize_address(ipaddress.ip_address(text))
        except ValueError:
            fail(f"{text!r} is not an IP address")
    if kind == "redis_url":
        if text and not re.fullmatch(r"(rediss?://[^\s]+|unix:///[^\s]+)", text):
            fail(f"{text!r} is not redis://HOST:PORT/DB, rediss://... or unix:///PATH")
        return text
    if kind == "domain":
        domain = text.rstrip(".").lower()
        if not _DOMAIN.match(domain):
            fail(f"{text!r} is not a domain name")
        return domain
    if kind == "socket":
        if not _parses(parse_postfix, text):
            fail(f"{text!r} is not inet:HOST:PORT or unix:PATH")
        return text
    raise AssertionError(kind)


# Element kinds of tuple fields, by dotted key (new sections say it in the
# field's metadata instead).
LIST_KINDS = {
    "nat.own_domains": "domain", "nat.networks": "network",
    "nat.public_addresses": "address", "allowlist": "network",
    "dns.nameservers": "address", "policy.listen": "socket",
}


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.value == "" \
        and node.tag.endswith("null")


def _build(cls, node, prefix: str, path: str, lines: dict[str, int]):
    """A section from a YAML mapping; `lines` gets each key's line."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(path, node.start_mark.line + 1, prefix or "(top)",
                          "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values = {}
    for key_node, value_node in node.value:
        name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        key = f"{prefix}.{name}" if prefix else str(name)
        line = key_node.start_mark.line + 1
        if name not in fields:
            raise ConfigError(path, line, key, "unknown key; known keys here: "
                              + ", ".join(sorted(fields)))
        if name in values:
            raise ConfigError(path, line, key, "given twice")
        lines[key] = line
        hint, meta = hints[name], fields[name].metadata
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value_node, key, path, lines)
        elif typing.get_origin(hint) is tuple:
            if _is_null(value_node):
                values[name] = ()
                continue
            items = value_node.value if isinstance(value_node, yaml.SequenceNode) else None
            if items is None:
                raise ConfigError(path, value_node.start_mark.line + 1, key, "expected a list")
            element = typing.get_args(hint)[0]
            if dataclasses.is_dataclass(element):
                lines.update((f"{key}[{n}]", item.start_mark.line + 1)
                             for n, item in enumerate(items))
                values[name] = tuple(_build(element, item, f"{key}[{n}]", path, lines)
                                     for n, item in enumerate(items))
            else:
                kind = LIST_KINDS.get(key) or meta.get("kind") or element
                values[name] = tuple(_convert_scalar(kind, item, key, path)
                                     for item in items)
        else:
            values[name] = _convert_scalar(hint, value_node, key, path, meta)
    return cls(**values)


def _section_problems(section, config, prefix: str, path: str, lines: dict[str, int]):
    """Run each section's own `problems(config)` rules, depth first."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _section_problems(value, config, key, path, lines)
        elif isinstance(value, tuple):
            for n, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _section_problems(item, config, f"{key}[{n}]", path, lines)
    problems = getattr(section, "problems", None)
    if problems is not None:
        for below, message in problems(config):
            key = ".".join(part for part in (prefix, below) if part)
            raise ConfigError(path, lines.get(key) or lines.get(prefix), key, message)


def _check(config: Config, path: str, lines: dict[str, int] | None = None) -> Config:
    """Rules that span keys: the line of the key named, where it was given."""
    lines = lines if lines is not None else {}
    nat = config.nat
    if nat.own_domains or nat.networks:
        if not (nat.own_domains and nat.networks):
            raise ConfigError(path, None, "nat", "own_domains and networks go together")
        if nat.mode == "reevaluate" and not nat.public_addresses:
            raise ConfigError(path, None, "nat.public_addresses",
                              "mode reevaluate needs the server's public addresses")
    for key, value in (("policy.processes", config.policy.processes),
                       ("policy.workers", config.policy.workers),
                       ("milter.workers", config.milter.workers)):
        if value < 1:
            raise ConfigError(path, None, key, f"{value} is not at least 1")
    dkim = config.milter.dkim
    if dkim.max_held_bytes < MIN_HELD_BYTES:
        # The header fields are always held: one may be 64 KiB (libmilter's
        # MILTER_MAX_DATA_SIZE).
        raise ConfigError(path, None, "milter.dkim.max_held_bytes",
                          f"{dkim.max_held_bytes} is less than {MIN_HELD_BYTES}")
    if nat.own_domains and not dkim.verify and dkim.nat_requires_aligned_pass != "flag":
        raise ConfigError(path, None, "milter.dkim.nat_requires_aligned_pass",
                          f"{dkim.nat_requires_aligned_pass.value!r} needs milter.dkim.verify: true "
                          "(without it no NAT message can pass); say flag")
    for address in nat.public_addresses:
        if in_networks(address, nat.networks):
            raise ConfigError(path, None, "nat.public_addresses",
                              f"{address} lies inside nat.networks")
    _section_problems(config, config, "", path, lines)
    if not config.authserv_id:
        config = dataclasses.replace(config, authserv_id=socket.getfqdn())
    return dataclasses.replace(config, source=path)


def parse(text: str, path: str) -> Config:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        raise ConfigError(path, mark.line + 1 if mark else None, "",
                          f"not valid YAML: {error.problem}") from None
    if root is None:
        return _check(Config(), path)
    lines: dict[str, int] = {}
    return _check(_build(Config, root, "", path, lines), path, lines)


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise ConfigError(path, None, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, None, "", f"cannot read: {error.__class__.__name__}") from None
    return parse(text, path)


def embedded() -> Config:
    """The built-in default: what `policyd serve` runs without a file."""
    return _check(Config(), "<embedded>")


def dump(config: Config) -> str:
    """The effective config as YAML that `parse` accepts again."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name))
                    for f in dataclasses.fields(value) if f.name != "source"}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network,
                              ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return str(value)
        return value
    return yaml.safe_dump(plain(config), sort_keys=False, default_flow_style=False)


def resolve_path(path: str | None) -> str | None:
    """The config file to use: the one given, else the default if it exists."""
    if path:
        return path
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None
