"""policyd.config: error messages as golden strings, and dump/parse round trips.

A typo must be fatal with the file and the line (STYLE.md, Config); the
text is what the admin reads, so it is compared whole.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from policyd import config as config_module
from policyd.config import EX_CONFIG, ConfigError
from policyd.model import Verdict

REPO = Path(__file__).resolve().parents[2]
VERDICTS = "reject, defer, flag, none"


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch):
    # An empty authserv_id becomes the host's FQDN; socket.getfqdn may ask
    # the machine's resolver, which tests must not use.
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")


def error_of(text: str, path: str = "bad.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        config_module.parse(text, path)
    return str(caught.value)


GOLDEN_ERRORS = [
    pytest.param("spf:\n  mailfrom:\n    on_fial: reject\n",
                 "bad.yaml, line 3: spf.mailfrom.on_fial: unknown key; known keys here: "
                 "on_fail, on_malformed, on_neutral, on_none, on_pass, on_permerror, "
                 "on_softfail, on_temperror", id="unknown-key"),
    pytest.param("test_mode: false\nspf_enabled: true\n",
                 "bad.yaml, line 2: spf_enabled: unknown key; known keys here: allowlist, "
                 "authserv_id, dns, headers, iprev, limits, log_level, metrics, milter, nat, "
                 "policy, redis, relay, routing, signing, spf, test_mode",
                 id="unknown-top-level-key"),
    pytest.param("spf:\n  mailfrom:\n    on_fail: rejct\n",
                 f"bad.yaml, line 3: spf.mailfrom.on_fail: 'rejct' is not one of: {VERDICTS}",
                 id="bad-enum"),
    pytest.param("spf:\n  helo:\n    on_softfail: Reject\n",
                 f"bad.yaml, line 3: spf.helo.on_softfail: 'Reject' is not one of: {VERDICTS}",
                 id="enum-is-case-sensitive"),
    pytest.param("# a comment\n\nspf:\n  mailfrom:\n    on_fail: off\n",
                 f"bad.yaml, line 5: spf.mailfrom.on_fail: 'off' is not one of: {VERDICTS}",
                 id="enum-quotes-what-was-written"),
    pytest.param("dns:\n  port: fifty\n",
                 "bad.yaml, line 2: dns.port: 'fifty' is not a whole number >= 0",
                 id="wrong-type-int"),
    pytest.param("test_mode: maybe\n",
                 "bad.yaml, line 1: test_mode: 'maybe' is not true or false", id="wrong-type-bool"),
    pytest.param("dns:\n  timeout: 0\n",
                 "bad.yaml, line 2: dns.timeout: 0 is not a number of seconds > 0",
                 id="zero-timeout"),
    pytest.param("milter:\n  socket_mode: rw-rw----\n",
                 "bad.yaml, line 2: milter.socket_mode: 'rw-rw----' is not an octal file mode "
                 "such as 0660", id="milter-socket-mode"),
    pytest.param("spf: reject\n",
                 "bad.yaml, line 1: spf: expected a mapping of keys to values",
                 id="scalar-for-map"),
    pytest.param("iprev:\n  on_fail: [reject]\n",
                 "bad.yaml, line 2: iprev.on_fail: expected a single value, not a list",
                 id="list-for-scalar"),
    pytest.param("nat:\n  own_domains: own.example\n",
                 "bad.yaml, line 2: nat.own_domains: expected a list", id="scalar-for-list"),
    pytest.param("allowlist:\n  - 192.0.2.0/24\n  - 192.0.2.300/24\n",
                 "bad.yaml, line 3: allowlist: '192.0.2.300/24' is not an IP network",
                 id="bad-network-line-of-item"),
    pytest.param("nat:\n  own_domains: [own.example, 'bad domain']\n",
                 "bad.yaml, line 2: nat.own_domains: 'bad domain' is not a domain name",
                 id="bad-domain"),
    pytest.param("nat:\n  mode: passs\n",
                 "bad.yaml, line 2: nat.mode: 'passs' is not one of: reevaluate, pass",
                 id="bad-choice"),
    pytest.param("test_mode: true\ntest_mode: false\n",
                 "bad.yaml, line 2: test_mode: given twice", id="duplicate-key"),
    pytest.param("- a\n", "bad.yaml, line 1: (top): expected a mapping of keys to values",
                 id="top-level-list"),
    pytest.param('authserv_id: "mx.example; spf=pass"\n',
                 "bad.yaml, line 1: authserv_id: 'mx.example; spf=pass' must be a single token "
                 "(RFC 8601 §2.2 authserv-id)", id="authserv-id-token"),
    pytest.param("spf:\n  mailfrom: [\n",
                 "bad.yaml, line 3: not valid YAML: expected the node content, but found "
                 "'<stream end>'", id="invalid-yaml"),
    pytest.param("spf:\n\tmailfrom: {}\n",
                 "bad.yaml, line 2: not valid YAML: found character '\\t' that cannot start "
                 "any token", id="tab-indent"),
    # Rules that span keys have no single line.
    pytest.param("nat:\n  own_domains: [own.example]\n",
                 "bad.yaml: nat: own_domains and networks go together", id="nat-half"),
    pytest.param("nat:\n  own_domains: [own.example]\n  networks: [192.168.1.0/24]\n",
                 "bad.yaml: nat.public_addresses: mode reevaluate needs the server's public "
                 "addresses", id="nat-reevaluate-without-public"),
    pytest.param("nat:\n  own_domains: [own.example]\n  networks: [192.168.1.0/24]\n"
                 "  public_addresses: [192.168.1.1]\n",
                 "bad.yaml: nat.public_addresses: 192.168.1.1 lies inside nat.networks",
                 id="public-inside-nat"),
]


@pytest.mark.parametrize("text, message", GOLDEN_ERRORS)
def test_golden_error(text, message):
    assert error_of(text) == message


def test_error_carries_its_parts():
    with pytest.raises(ConfigError) as caught:
        config_module.parse("spf:\n  mailfrom:\n    on_fail: rejct\n", "/etc/p.yaml")
    error = caught.value
    assert (error.path, error.line, error.key) == ("/etc/p.yaml", 3, "spf.mailfrom.on_fail")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        config_module.load(str(path))
    assert str(caught.value) == f"{path}: no such file"


def test_unreadable_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"authserv_id: caf\xe9.example\n")
    with pytest.raises(ConfigError) as caught:
        config_module.load(str(path))
    assert str(caught.value).startswith(f"{path}: cannot read")


# --- what a good file gives ------------------------------------------------

def test_empty_file_is_the_defaults():
    config = config_module.parse("", "empty.yaml")
    assert config == config_module.Config(authserv_id="fqdn.test")
    assert config.source == "empty.yaml"


def test_values_are_converted():
    config = config_module.parse(
        "authserv_id: mx.receiver.example\n"
        "nat:\n  own_domains: [Own.Example.]\n  networks: ['::ffff:192.168.1.0/120', fd00::/8]\n"
        "  public_addresses: ['::ffff:203.0.113.7']\n"
        "spf:\n  mailfrom:\n    on_softfail: reject\n  helo:\n    check: false\n"
        "dns:\n  nameservers: [127.0.0.53]\n  timeout: 3\n"
        "allowlist: [192.0.2.7/24]\n", "good.yaml")
    assert config.nat.own_domains == ("own.example",)
    assert config.nat.networks == (ipaddress.ip_network("192.168.1.0/24"),
                                   ipaddress.ip_network("fd00::/8"))
    assert config.nat.public_addresses == (ipaddress.ip_address("203.0.113.7"),)
    assert config.spf.mailfrom.on_softfail is Verdict.REJECT
    assert config.spf.mailfrom.on_fail is Verdict.REJECT   # the default stays
    assert config.spf.helo.check is False
    assert config.spf.helo.on_temperror is Verdict.NONE     # HELO's own default
    assert config.dns.timeout == 3.0 and isinstance(config.dns.timeout, float)
    assert config.allowlist == (ipaddress.ip_network("192.0.2.0/24"),)


def test_unquoted_octal_socket_mode_keeps_its_digits():
    # YAML 1.1 reads 0660 as the integer 432; the mode must still be 0660.
    assert config_module.parse("policy:\n  socket_mode: 0660\n", "x").policy.socket_mode \
        in ("0660", "660")


FULL = """\
authserv_id: mx.receiver.example
test_mode: true
log_level: debug
headers: {authentication_results: false, received_spf: true}
dns: {nameservers: [127.0.0.53, '::1'], port: 5353, timeout: 1.5, trust_ad: "no",
      cache_size: 10, resolv_conf: /etc/policyd/resolv.conf}
spf:
  enabled: true
  lookup_time_limit: 10
  void_lookup_limit: 3
  mailfrom: {on_pass: flag, on_fail: defer, on_softfail: reject, on_neutral: flag,
             on_none: flag, on_permerror: reject, on_temperror: none, on_malformed: flag}
  helo: {check: false, on_pass: flag, on_fail: flag, on_softfail: reject, on_neutral: flag,
         on_none: flag, on_permerror: reject, on_temperror: defer}
nat:
  own_domains: [own.example, other-own.example]
  networks: [192.168.1.0/24, fd00::/8]
  public_addresses: [203.0.113.7, '2001:db8:7::7']
  mode: reevaluate
iprev: {ipv6: true, ipv4: true, on_fail: reject, on_temperror: defer,
        reject_text: "no reverse DNS: see https://receiver.example/rdns"}
allowlist: [192.0.2.0/24, '2001:db8:ff::/48']
policy:
  listen: ["inet:127.0.0.1:10023", "unix:/run/policyd/policy.sock"]
  socket_mode: "0600"
  socket_group: postfix
  max_line_length: 8192
  max_attributes: 50
  max_request_size: 65536
  idle_timeout: 60
  request_timeout: 20
  workers: 4
  drain_timeout: 5
  processes: 3
milter:
  listen: "inet6:10026@[::1]"
  timeout: 30
  drain_timeout: 2
  workers: 3
  socket_mode: "0600"
  socket_group: postfix
  dkim: {verify: false, nat_requires_aligned_pass: flag, max_held_bytes: 4194304}
metrics: {listen: "127.0.0.1:9464"}
redis: {url: "redis://127.0.0.1:6380/2", timeout: 0.5, key_prefix: "mx1:"}
relay: {enabled: true, local_domains: [own.example], networks: [10.1.0.0/16],
        certificate_fingerprints: ["AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"],
        require_tls: true, tls_minimum: TLSv1.2, destinations: [example.net],
        sender_ownership: known, senders: [{login: alice, addresses: [alice@own.example]}],
        sender_login_maps: ["texthash:/dev/null"], recipient_delimiter: "-", skip_checks: false}
limits: {enabled: true, scope: all, dry_run: true, ipv4_prefix: 24, ipv6_prefix: 56,
         per_user: {messages: 100, recipients: 1000, period: 86400},
         per_client: {messages: 50, recipients: 500, period: 600},
         per_sender_domain: {messages: 1000, recipients: 9000, period: 7200},
         per_recipient_domain: {messages: 300, recipients: 3000, period: 60},
         overrides: [{users: [bulk], networks: [10.9.0.0/16], messages: 5000, recipients: 50000, period: 600}],
         on_redis_down: defer, local_max_keys: 5000}
routing:
  listen: [inet:127.0.0.1:10027]
  socket_mode: "0600"
  socket_group: postfix
  ipv4_only: true
  ipv4_only_domains: [gmail.com]
  ipv4_only_hosts: [aspmx.l.google.com]
  learn: false
  learned_ttl: 86400
  refusal_patterns: ["no PTR"]
  max_routes: 1000
  max_request_size: 4096
  idle_timeout: 60
  request_timeout: 10
  max_connections: 10
  drain_timeout: 2
"""


@pytest.mark.parametrize("text", [pytest.param("", id="defaults"),
                                  pytest.param(FULL, id="every-key-changed")])
def test_dump_parses_back_to_the_same_config(text):
    config = config_module.parse(text, "in.yaml")
    dumped = config_module.dump(config)
    again = config_module.parse(dumped, "dumped.yaml")
    assert again == config
    assert config_module.dump(again) == dumped


def test_full_config_changes_every_key():
    # The round trip above only means something if FULL leaves no default.
    config = config_module.parse(FULL, "full.yaml")
    defaults = config_module.Config()

    def leaves(value, prefix=""):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.name != "source":
                    yield from leaves(getattr(value, f.name), f"{prefix}{f.name}.")
        else:
            yield prefix.rstrip("."), value

    # signing: names key files, which must exist and be private when the
    # config is read: tests/unit/signing/test_settings.py changes its keys.
    unchanged = [key for (key, value), (_, default) in zip(leaves(config), leaves(defaults))
                 if value == default and not key.startswith("signing.")]
    assert unchanged == ["spf.enabled", "nat.mode", "iprev.ipv6"]


def test_embedded_config_is_valid_and_dumps():
    config = config_module.embedded()
    assert config.source == "<embedded>"
    assert config_module.parse(config_module.dump(config), "x") == config


# --- the command line ---------------------------------------------------------

def run_policyd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "policyd", *args], cwd=cwd,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)


def test_check_config_rejects_a_bad_file_with_ex_config(tmp_path):
    (tmp_path / "bad.yaml").write_text("authserv_id: mx.receiver.example\n"
                                       "spf:\n  mailfrom:\n    on_fail: rejct\n")
    result = run_policyd("check-config", "-c", "bad.yaml", cwd=tmp_path)
    assert result.returncode == EX_CONFIG == 78
    assert result.stdout == ""
    assert result.stderr == ("policyd: fatal: bad.yaml, line 4: spf.mailfrom.on_fail: "
                             f"'rejct' is not one of: {VERDICTS}\n")


def test_check_config_missing_file(tmp_path):
    result = run_policyd("check-config", "-c", "absent.yaml", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stderr == "policyd: fatal: absent.yaml: no such file\n"


def test_check_config_accepts_a_good_file(tmp_path):
    (tmp_path / "good.yaml").write_text(FULL)
    result = run_policyd("check-config", "-c", "good.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "policyd: good.yaml: ok\n"


def test_dump_config_output_is_a_valid_config(tmp_path):
    (tmp_path / "good.yaml").write_text(FULL)
    result = run_policyd("dump-config", "-c", "good.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert config_module.parse(result.stdout, "dumped") == \
        config_module.parse(FULL, "good.yaml")


def test_the_readme_example_is_a_valid_config():
    # The README's Configuration section is what admins copy: it must load.
    import re
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", readme, re.S).group(1)
    config = config_module.parse(block, "README.md")
    assert config.nat.own_domains == ("example.org",)
    assert config.milter.dkim.nat_requires_aligned_pass == "reject"


def test_dkim_max_held_bytes_has_a_floor_for_the_header_fields():
    assert config_module.parse("", "x").milter.dkim.max_held_bytes == 1048576
    assert config_module.parse("milter: {dkim: {max_held_bytes: 65536}}", "x") \
        .milter.dkim.max_held_bytes == 65536
    assert error_of("milter: {dkim: {max_held_bytes: 1000}}") == \
        "bad.yaml: milter.dkim.max_held_bytes: 1000 is less than 65536"


# --- the schema's machinery for the sections of features ------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    domain: str = dataclasses.field(default="", metadata={"kind": "domain"})
    networks: tuple[config_module.Network, ...] = ()
    mode: config_module.NatMode = config_module.NatMode.PASS

    def problems(self, config):
        if not self.domain:
            yield "domain", "is required"


@dataclasses.dataclass(frozen=True)
class _Section:
    entries: tuple[_Entry, ...] = ()
    port: int = dataclasses.field(default=1, metadata={"kind": "port"})


def _section(text):
    import yaml
    lines: dict[str, int] = {}
    section = config_module._build(_Section, yaml.compose(text), "s", "f.yaml", lines)
    config_module._section_problems(section, None, "s", "f.yaml", lines)
    return section


def test_a_list_of_mappings_becomes_a_tuple_of_sections():
    section = _section("entries:\n  - {domain: Example.ORG., networks: [10.0.0.0/8]}\n"
                       "  - domain: b.example\n    mode: reevaluate\n")
    assert section.entries == (
        _Entry("example.org", (ipaddress.ip_network("10.0.0.0/8"),)),
        _Entry("b.example", (), config_module.NatMode.REEVALUATE))


@pytest.mark.parametrize("text, message", [
    ("entries:\n  - {domain: 'a b'}\n", "f.yaml, line 2: s.entries[0].domain: 'a b' is not a domain name"),
    ("entries:\n  - {mode: x, domain: a.example}\n",
     "f.yaml, line 2: s.entries[0].mode: 'x' is not one of: reevaluate, pass"),
    ("entries:\n  - {domian: a.example}\n", "f.yaml, line 2: s.entries[0].domian: unknown key"),
    ("entries:\n  - domain: a.example\n  - networks: []\n",
     "f.yaml, line 3: s.entries[1].domain: is required"),
    ("port: 70000\n", "f.yaml, line 1: s.port: 70000 is not a port number"),
    ("entries: a.example\n", "f.yaml, line 1: s.entries: expected a list"),
])
def test_section_errors_name_the_file_line_and_key(text, message):
    with pytest.raises(ConfigError) as caught:
        _section(text)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("url, good", [
    ("redis://127.0.0.1:6379/0", True), ("rediss://r.example:6380/1", True),
    ("unix:///run/redis/redis-server.sock", True), ("", True),
    ("127.0.0.1:6379", False), ("http://x", False), ("redis://a b", False),
])
def test_redis_url(url, good):
    text = f"redis:\n  url: '{url}'\n"
    if good:
        assert config_module.parse(text, "f.yaml").redis.url == url
    else:
        with pytest.raises(ConfigError, match=r"f.yaml, line 2: redis.url: .* is not redis://"):
            config_module.parse(text, "f.yaml")


def test_choices_are_enums_that_compare_as_their_text():
    config = config_module.parse("nat: {own_domains: [a.example], networks: [10.0.0.0/8], "
                                 "mode: pass}\nlog_level: debug\n", "f.yaml")
    assert config.nat.mode is config_module.NatMode.PASS and config.nat.mode == "pass"
    assert config.log_level == "debug"
    assert "mode: pass" in config_module.dump(config)


@pytest.mark.parametrize("text, message", [
    ("policy:\n  listen: ['inet:127.0.0.1:70000']\n",
     "f.yaml, line 2: policy.listen: 'inet:127.0.0.1:70000' is not inet:HOST:PORT or unix:PATH"),
    ("milter:\n  listen: 'inet:0@127.0.0.1'\n",
     "f.yaml, line 2: milter.listen: 'inet:0@127.0.0.1' is not a libmilter socket"),
])
def test_a_listen_spec_that_cannot_bind_is_refused_at_load(text, message):
    # The socket layer's own parsers judge them: no spec loads that bind refuses.
    with pytest.raises(ConfigError) as caught:
        config_module.parse(text, "f.yaml")
    assert str(caught.value).startswith(message)
