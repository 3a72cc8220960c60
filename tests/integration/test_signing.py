"""DKIM signing as an admin meets it: `policyd dkim genkey` makes a key
and its record, the record is published (a zone written at fixture time,
served by a real unbound), and `policyd dkim test` finds it matching, or
says why not, through policyd's own resolver; then mail through a real
Postfix with policyd's milter: a SASL client's leaves signed with RSA and
Ed25519 (verified by dkimpy and OpenDKIM), a stranger's never."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyd.signing import keys

from tests.integration.dnsworld import ZONES_DIR, start_unbound
from tests.integration.postfix import smtp_transaction
# The Postfix with main.cf.tcp's milter lines, and policyd started for it.
from tests.integration.test_postfix import postfix_milter, start_policyd  # noqa: F401
from tests.unit.signing.verifiers import dkimpy_results, opendkim_results

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


# --- signing through a real Postfix -------------------------------------------

OWN = "own.example"   # the standard world's own domain (dnsworld.OWN_DOMAINS)


@pytest.fixture(scope="module")
def own_keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("own-keys")
    found = {}
    for selector, key_type in (("r1", "rsa"), ("e1", "ed25519")):
        assert policyd("dkim", "genkey", OWN, selector, "--type", key_type, "--directory",
                       str(directory), "--owner", ME).returncode == 0
        path = directory / f"{OWN}.{selector}.key"
        found[selector] = (path, keys.load_key(str(path)))
    return found


def signing_settings(own_keys) -> dict:
    return {"signing": {"table": [{"match": OWN, "selector": selector, "key_file": str(path)}
                                  for selector, (path, _) in own_keys.items()]}}


def records_of(own_keys) -> dict[str, str]:
    return {f"{selector}._domainkey.{OWN}": key.record()
            for selector, (_, key) in own_keys.items()}


def raw_delivery(postfix, queue_id: str) -> bytes:
    """The delivered copy as written (CRLF line ends, as on the wire),
    not as the email package would write it again."""
    postfix.delivered(queue_id)
    pattern = re.compile(rb"\bid " + re.escape(queue_id.encode()) + rb"\b")
    for path in sorted((postfix.mail_dir / "mailbox" / "new").glob("*")):
        raw = path.read_bytes()
        if pattern.search(raw.split(b"\n\n", 1)[0]):
            return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    raise AssertionError(f"no copy of {queue_id}")


def deliver(postfix, address: str, sender: str, from_header: str, **xclient) -> bytes:
    fields = {"ADDR": address, "NAME": "[UNAVAILABLE]", "HELO": "client.test", **xclient}
    data = (f"From: {from_header}\nTo: <bob@{OWN}>\nSubject: signed on the way out\n"
            f"Date: Fri, 04 Dec 2026 07:00:00 +0000\nMessage-ID: <1@{OWN}>\n\nHello.\n")
    transcript = smtp_transaction(postfix.host, postfix.port, fields, sender,
                                  [f"bob@{OWN}"], data=data)
    assert transcript.end_of_data and transcript.end_of_data[0] == 250, \
        f"{transcript}\n--- maillog ---\n{postfix.log()}"
    return raw_delivery(postfix, transcript.queue_id)


def signatures(raw: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return re.findall(rb"^DKIM-Signature:.*(?:\r\n[ \t].*)*", head, re.M | re.I)


def test_a_sasl_clients_mail_leaves_with_rsa_and_ed25519_signatures(
        postfix_milter, start_policyd, own_keys, tmp_path):
    postfix, milter_port = postfix_milter
    policyd_process = start_policyd(postfix, signing_settings(own_keys), milter_port=milter_port)
    raw = deliver(postfix, "198.51.100.77", f"alice@{OWN}", f"Alice <alice@{OWN}>",
                  LOGIN="alice")
    found = signatures(raw)
    assert len(found) == 2 and b"a=rsa-sha256" in found[0] and b"a=ed25519-sha256" in found[1]
    assert raw.index(found[0]) < raw.index(b"Authentication-Results:")
    records = records_of(own_keys)
    assert dkimpy_results(raw, records) == [True, True]
    assert opendkim_results(raw, records, tmp_path / "ok") == ["pass s=r1", "pass s=e1"]
    # A second From added after us breaks both (oversigned, RFC 6376 §8.15).
    forged = raw.replace(b"\r\nFrom: ", b"\r\nFrom: Mallory <m@evil.example>\r\nFrom: ", 1)
    assert dkimpy_results(forged, records) == [False, False]
    assert opendkim_results(forged, records, tmp_path / "forged") == ["fail s=r1", "fail s=e1"]
    assert re.search(r"action=ACCEPT rule=sasl .*dkim\.sign=signed:own\.example/r1\+e1",
                     policyd_process.log())


def test_a_strangers_mail_is_never_signed(postfix_milter, start_policyd, own_keys):
    postfix, milter_port = postfix_milter
    settings = signing_settings(own_keys)
    # Even with a fallback line that would sign any From.
    settings["signing"]["table"].append({"match": "*", "domain": OWN, "selector": "r1",
                                         "key_file": str(own_keys["r1"][0])})
    start_policyd(postfix, settings, milter_port=milter_port)
    # other.example's network: SPF passes, the mail is accepted, and its
    # From claims the own domain.
    raw = deliver(postfix, "198.51.100.5", "carol@other.example", f"<boss@{OWN}>")
    assert signatures(raw) == []


def test_own_domain_mail_from_the_nat_networks_is_signed_and_only_that(
        postfix_milter, start_policyd, own_keys):
    postfix, milter_port = postfix_milter
    settings = signing_settings(own_keys)
    settings["signing"]["nat_own_domains"] = True
    settings["milter"] = {"dkim": {"nat_requires_aligned_pass": "flag"}}
    start_policyd(postfix, settings, milter_port=milter_port)
    raw = deliver(postfix, "192.168.1.10", f"alice@{OWN}", f"<alice@{OWN}>")
    assert dkimpy_results(raw, records_of(own_keys)) == [True, True]
    other = deliver(postfix, "192.168.1.10", f"alice@{OWN}", "<alice@other.example>")
    assert signatures(other) == []


def test_a_key_opened_to_others_is_refused_at_reload_and_the_old_keys_sign_on(
        postfix_milter, start_policyd, own_keys, tmp_path):
    postfix, milter_port = postfix_milter
    copies = {}
    for selector, (path, _) in own_keys.items():
        copies[selector] = tmp_path / path.name
        copies[selector].write_bytes(path.read_bytes())
        copies[selector].chmod(0o600)
    settings = {"signing": {"table": [
        {"match": OWN, "selector": selector, "key_file": str(path)}
        for selector, path in copies.items()]}}
    process = start_policyd(postfix, settings, milter_port=milter_port)
    copies["r1"].chmod(0o644)
    process.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "reload refused" not in process.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = process.log()
    # The service checks the file before it passes the reload to its
    # milter: refused there, saying which key and why, it goes no further.
    assert "reload refused, keeping the running config" in log, log
    assert "signing.table[0].key_file" in log and "open to every user" in log
    raw = deliver(postfix, "198.51.100.77", f"alice@{OWN}", f"<alice@{OWN}>", LOGIN="alice")
    assert dkimpy_results(raw, records_of(own_keys)) == [True, True]


def test_a_reload_brings_a_replaced_key_to_every_worker(postfix_milter, start_policyd,
                                                        own_keys, tmp_path):
    postfix, milter_port = postfix_milter
    path = tmp_path / "r1.key"
    path.write_bytes(own_keys["r1"][0].read_bytes())
    path.chmod(0o600)
    settings = {"signing": {"table": [{"match": OWN, "selector": "r1", "key_file": str(path)}]}}
    process = start_policyd(postfix, settings, milter_port=milter_port)
    old = records_of(own_keys)
    first = deliver(postfix, "198.51.100.77", f"alice@{OWN}", f"<alice@{OWN}>", LOGIN="alice")
    assert dkimpy_results(first, old) == [True]
    # The key replaced in place (same name, a new key), then a reload.
    new_key, pem = keys.generate("rsa")
    replacement = tmp_path / "r1.key.new"
    replacement.write_bytes(pem)
    replacement.chmod(0o600)
    replacement.replace(path)
    process.process.send_signal(signal.SIGHUP)
    new = {f"r1._domainkey.{OWN}": new_key.record()}
    deadline = time.monotonic() + 20
    while True:
        # The milter's workers take the reload one by one: every message
        # after they all have is signed with the new key.
        raws = [deliver(postfix, "198.51.100.77", f"alice@{OWN}", f"<alice@{OWN}>",
                        LOGIN="alice") for _ in range(8)]
        if all(dkimpy_results(raw, new) == [True] for raw in raws):
            break
        assert time.monotonic() < deadline, process.log()
        time.sleep(0.2)
    assert "reload refused" not in process.log()


def test_a_login_gets_only_its_own_from_signed(postfix_milter, start_policyd, own_keys):
    """relay.sender_ownership (enforce) holds the From a login writes as it
    holds its MAIL FROM: alice may relay as alice@, and her message that
    says From: bob@ is accepted but leaves without our signature."""
    postfix, milter_port = postfix_milter
    settings = signing_settings(own_keys)
    settings["relay"] = {"enabled": True, "local_domains": [OWN],
                         "senders": [{"login": "alice", "addresses": [f"alice@{OWN}"]},
                                     {"login": "bob", "addresses": [f"bob@{OWN}"]}]}
    process = start_policyd(postfix, settings, milter_port=milter_port)
    own = deliver(postfix, "198.51.100.77", f"alice@{OWN}", f"Alice <alice@{OWN}>",
                  LOGIN="alice")
    assert dkimpy_results(own, records_of(own_keys)) == [True, True]
    forged = deliver(postfix, "198.51.100.77", f"alice@{OWN}", f"Bob <bob@{OWN}>",
                     LOGIN="alice")
    assert signatures(forged) == []
    assert b"\r\nFrom: Bob <bob@own.example>\r\n" in forged
    log = process.log()
    # The decision line says why (its formatter writes a space as \x20).
    assert re.search(r"action=ACCEPT rule=relay\.sasl .*dkim\.sign=signed:own\.example/r1\+e1",
                     log), log
    assert re.search(r"action=ACCEPT rule=relay\.sasl .*dkim\.sign=unsigned:"
                     r"From\\x20not\\x20owned\\x20by\\x20alice .*login=alice", log), log
    # bob's login writing his own From is signed: the lookup is per login.
    bobs = deliver(postfix, "198.51.100.78", f"bob@{OWN}", f"<bob@{OWN}>", LOGIN="bob")
    assert dkimpy_results(bobs, records_of(own_keys)) == [True, True]
