"""The signing: section: a key that cannot be used, or a table that cannot
sign as it says, is a config error with its line, never unsigned mail."""
from __future__ import annotations

import pytest

from policyd import config as config_module
from policyd.config import ConfigError
from policyd.signing.settings import Algorithm, Canonicalization

from .keyfiles import write_key


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch):
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")


@pytest.fixture
def key_files(tmp_path):
    rsa_path, _ = write_key(tmp_path, "rsa.pem", "rsa")
    ed_path, _ = write_key(tmp_path, "ed.pem", "ed25519")
    return rsa_path, ed_path


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config_module.parse(text, "p.yaml")
    return str(caught.value)


def test_a_dual_signing_table_loads(key_files):
    rsa_path, ed_path = key_files
    config = config_module.parse(
        "signing:\n  table:\n"
        f"    - {{match: example.org, selector: r1, key_file: {rsa_path}}}\n"
        f"    - {{match: example.org, selector: e1, key_file: {ed_path},"
        " algorithm: ed25519-sha256}\n"
        "  canonicalization: simple/simple\n", "p.yaml")
    first, second = config.signing.table
    assert (first.signing_domain, first.selector, first.algorithm) == (
        "example.org", "r1", Algorithm.AUTO)
    assert second.algorithm is Algorithm.ED25519_SHA256
    assert config.signing.canonicalization is Canonicalization.SIMPLE_SIMPLE
    assert "table:" in config_module.dump(config)


def test_signing_is_off_by_default():
    assert config_module.embedded().signing.table == ()


def test_an_unreadable_key_is_an_error_at_its_line(tmp_path):
    assert error_of("signing:\n  table:\n    - match: example.org\n      selector: s\n"
                    f"      key_file: {tmp_path}/missing.pem\n") == (
        f"p.yaml, line 5: signing.table[0].key_file: {tmp_path}/missing.pem: no such file")


def test_a_world_readable_key_is_an_error(tmp_path):
    path, _ = write_key(tmp_path, "open.pem", mode=0o604)
    assert "is open to every user (mode 0604)" in error_of(
        f"signing:\n  table:\n    - {{match: example.org, selector: s, key_file: {path}}}\n")


def test_an_algorithm_that_is_not_the_keys_is_an_error(key_files):
    rsa_path, _ = key_files
    assert error_of(
        "signing:\n  table:\n    - match: example.org\n      selector: s\n"
        f"      key_file: {rsa_path}\n      algorithm: ed25519-sha256\n") == (
        "p.yaml, line 6: signing.table[0].algorithm: ed25519-sha256 given, but "
        f"{rsa_path} holds an RSA 2048-bit key (rsa-sha256)")


def test_ed25519_alone_is_refused(key_files):
    _, ed_path = key_files
    assert error_of(
        f"signing:\n  table:\n    - {{match: example.org, selector: e, key_file: {ed_path}}}\n"
    ) == ("p.yaml, line 3: signing.table[0]: an Ed25519 key for match 'example.org' needs "
          "an RSA key beside it: many receivers verify only RSA")


def test_two_keys_of_one_kind_for_one_match_are_refused(key_files):
    rsa_path, _ = key_files
    assert error_of(
        "signing:\n  table:\n"
        f"    - {{match: example.org, selector: a, key_file: {rsa_path}}}\n"
        f"    - {{match: Example.org, selector: b, key_file: {rsa_path}}}\n") == (
        "p.yaml, line 4: signing.table[1]: a second rsa-sha256 key for match "
        "'Example.org' (table[0] is one)")


@pytest.mark.parametrize("line, message", [
    ("{match: 'a b', selector: s, key_file: K}",
     "signing.table[0].match: 'a b' is not a domain, an address user@domain, or '*'"),
    ("{match: '*', selector: s, key_file: K}",
     "signing.table[0].domain: the fallback line (match: '*') needs its signing domain"),
    ("{match: a.example.org, domain: other.example, selector: s, key_file: K}",
     "signing.table[0].domain: 'other.example' is not 'a.example.org' nor a parent of it, "
     "so the signature would not align with the From domain (DMARC); use a line with "
     "match: '*' for a fallback"),
    ("{match: example.org, selector: 's_1', key_file: K}",
     "signing.table[0].selector: 's_1' is not a selector (RFC 6376 §3.1: dot-separated "
     "labels of letters, digits and '-')"),
    ("{match: example.org, selector: s}", "signing.table[0].key_file: a key file is needed"),
])
def test_table_lines_that_cannot_sign_as_written(key_files, line, message):
    text = "signing:\n  table:\n    - " + line.replace("K", str(key_files[0])) + "\n"
    assert error_of(text) == "p.yaml, line 3: " + message


def test_aligned_domains_and_the_fallback_load(key_files):
    rsa_path, _ = key_files
    config = config_module.parse(
        "signing:\n  table:\n"
        f"    - {{match: mail.example.org, domain: example.org, selector: a, key_file: {rsa_path}}}\n"
        f"    - {{match: alice@Example.NET, selector: a, key_file: {rsa_path}}}\n"
        f"    - {{match: '*', domain: relay.example, selector: a, key_file: {rsa_path}}}\n",
        "p.yaml")
    assert [line.signing_domain for line in config.signing.table] == [
        "example.org", "example.net", "relay.example"]


def test_from_must_be_signed(key_files):
    assert error_of(
        f"signing:\n  table:\n    - {{match: example.org, selector: a, key_file: {key_files[0]}}}\n"
        "  headers: [subject]\n  oversign: [to]\n").endswith(
        "signing.headers: From must be signed (RFC 6376 §5.4)")
    assert error_of("signing:\n  headers: ['bad name']\n").endswith(
        "signing.headers: 'bad name' is not a header field name")


def test_signing_nat_mail_needs_the_nat_dkim_rule_relaxed(key_files):
    nat = ("nat: {own_domains: [example.org], networks: [192.168.1.0/24],"
           " public_addresses: [203.0.113.7]}\n")
    table = f"  table: [{{match: example.org, selector: a, key_file: {key_files[0]}}}]\n"
    assert error_of(nat + "signing:\n  nat_own_domains: true\n" + table) == (
        "p.yaml, line 3: signing.nat_own_domains: needs milter.dkim.nat_requires_aligned_pass: "
        "flag (it is reject: unsigned own-domain mail from nat.networks is refused before it "
        "could be signed)")
    config = config_module.parse(nat + "milter: {dkim: {nat_requires_aligned_pass: flag}}\n"
                                 "signing:\n  nat_own_domains: true\n" + table, "p.yaml")
    assert config.signing.nat_own_domains is True
