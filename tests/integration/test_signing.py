"""DKIM signing as an admin meets it: `policyd dkim genkey` makes a key
and its record, the record is published (a zone written at fixture time,
served by a real unbound), and `policyd dkim test` finds it matching, or
says why not, through policyd's own resolver."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from policyd.signing import keys

from tests.integration.dnsworld import ZONES_DIR, start_unbound

POLICYD = [sys.executable, "-m", "policyd"]
DOMAIN = "signing.example"
ME = pwd.getpwuid(os.geteuid()).pw_name


def policyd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(POLICYD + list(args), capture_output=True, text=True, timeout=60)


def zone_text(records: dict[str, str]) -> str:
    lines = [f"$ORIGIN {DOMAIN}.", "$TTL 300",
             f"@ SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 900 604800 300",
             f"@ NS ns.{DOMAIN}.", "ns A 127.0.0.1"]
    lines += [keys.zone_line(DOMAIN, selector, record) for selector, record in records.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys made by `policyd dkim genkey`; a zone publishing some of them
    (and one record of another key), written now; unbound serving it."""
    base = tmp_path_factory.mktemp("signing")
    key_dir = base / "dkim"
    printed = {}
    for selector, key_type in (("rsa", "rsa"), ("ed", "ed25519"), ("wrong", "rsa"),
                               ("unpublished", "rsa"), ("standby", "rsa")):
        run = policyd("dkim", "genkey", DOMAIN, selector, "--type", key_type,
                      "--directory", str(key_dir), "--owner", ME)
        assert run.returncode == 0, run.stderr
        printed[selector] = run.stdout
    published = {selector: keys.load_key(str(key_dir / f"{DOMAIN}.{selector}.key")).record()
                 for selector in ("rsa", "ed")}
    published["wrong"] = keys.generate("rsa", 1024)[0].record()
    published["revoked"] = "v=DKIM1; k=rsa; p="
    zones = base / "zones"
    zones.mkdir()
    shutil.copy(ZONES_DIR / "example.zone", zones)   # what unbound's readiness check asks
    (zones / f"{DOMAIN}.zone").write_text(zone_text(published))
    server = start_unbound(base / "unbound", zones_dir=zones)
    config = base / "policyd.yaml"
    config.write_text(
        f"authserv_id: mx.test.example\n"
        f"dns: {{nameservers: ['{server.address}'], port: {server.port}, timeout: 2.0}}\n"
        "signing:\n  table:\n"
        f"    - {{match: {DOMAIN}, selector: rsa, key_file: {key_dir}/{DOMAIN}.rsa.key}}\n"
        f"    - {{match: {DOMAIN}, selector: ed, key_file: {key_dir}/{DOMAIN}.ed.key}}\n")
    yield base, key_dir, config, printed
    server.stop()


def test_genkey_prints_the_record_a_zone_takes(world):
    base, key_dir, _, printed = world
    for selector in ("rsa", "ed"):
        key = keys.load_key(str(key_dir / f"{DOMAIN}.{selector}.key"))
        line = [line for line in printed[selector].splitlines() if " IN TXT " in line][0]
        assert line == keys.zone_line(DOMAIN, selector, key.record())
        strings = re.findall(r'"([^"]*)"', line)
        assert all(len(s) <= 255 for s in strings) and "".join(strings) == key.record()
    assert (key_dir / f"{DOMAIN}.rsa.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("selector", ["rsa", "ed"])
def test_dkim_test_finds_the_published_record_matching(world, selector):
    _, _, config, _ = world
    run = policyd("dkim", "test", DOMAIN, selector, "-c", str(config))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{selector}._domainkey.{DOMAIN}: match (without dnssec)" in run.stdout


def test_dkim_test_says_why_a_record_does_not_match(world):
    base, key_dir, config, _ = world
    run = policyd("dkim", "test", DOMAIN, "wrong", "-c", str(config),
                  "--directory", str(key_dir))
    assert run.returncode == 1
    assert "mismatch" in run.stdout and "p= is another public key" in run.stdout
    assert "publish: wrong._domainkey.signing.example. IN TXT" in run.stdout
    run = policyd("dkim", "test", DOMAIN, "unpublished", "-c", str(config),
                  "--directory", str(key_dir))
    assert run.returncode == 1 and "missing" in run.stdout and "NXDOMAIN" in run.stdout
    run = policyd("dkim", "test", DOMAIN, "revoked", "-c", str(config),
                  "--key-file", str(key_dir / f"{DOMAIN}.rsa.key"))
    assert run.returncode == 1 and "revoked" in run.stdout


def test_rotate_switches_only_to_a_published_matching_selector(world):
    _, key_dir, config, _ = world
    run = policyd("dkim", "rotate", DOMAIN, "standby", "-c", str(config),
                  "--directory", str(key_dir))
    assert run.returncode == 1 and "step 2 of 3" in run.stdout
    # "rsa" is published: rotating to it from a config that signs with
    # another key says which line to change.
    other = Path(str(config) + ".standby")
    other.write_text(config.read_text().replace("selector: rsa", "selector: standby")
                     .replace(".rsa.key", ".standby.key"))
    run = policyd("dkim", "rotate", DOMAIN, "rsa", "-c", str(other), "--directory", str(key_dir))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "step 3 of 3" in run.stdout and "selector: standby" in run.stdout


def test_a_key_others_can_read_stops_the_config(world, tmp_path):
    _, key_dir, config, _ = world
    key = tmp_path / "open.key"
    key.write_bytes((key_dir / f"{DOMAIN}.rsa.key").read_bytes())
    key.chmod(0o644)
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace(f"{key_dir}/{DOMAIN}.rsa.key", str(key)))
    run = policyd("check-config", "-c", str(bad))
    assert run.returncode == 78
    assert re.search(r"line 5: signing.table\[0\].key_file: .*open to every user", run.stderr)


def test_dkim_test_is_bounded_by_dns_timeout(world, tmp_path):
    _, _, config, _ = world
    silent = tmp_path / "silent.yaml"
    # A loopback address nobody answers on: the lookup fails within dns.timeout.
    silent.write_text(re.sub(r"dns: \{.*\}", "dns: {nameservers: ['127.0.0.254'], port: 9, "
                             "timeout: 1.0}", config.read_text()))
    run = policyd("dkim", "test", DOMAIN, "rsa", "-c", str(silent))
    assert run.returncode == 75 and "temperror" in run.stdout
