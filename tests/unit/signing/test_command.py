"""policyd dkim genkey: a key no other user can read, and its record;
test and rotate against a DNS answered by a fake resolver (the real one,
unbound, in tests/integration/test_signing.py)."""
from __future__ import annotations

import io
import os
import pwd
import stat

import pytest

from policyd import config as config_module
from policyd.dns import DnsTempError, Lookup
from policyd.signing import command, keys

from .keyfiles import write_key


class Zone:
    """A Lookups that answers TXT questions from a dict."""

    def __init__(self, records: dict[str, list[str]], fail: bool = False):
        self.records, self.fail, self.asked = records, fail, []

    def query(self, name, rdtype, lifetime=None):
        self.asked.append((name, rdtype, lifetime))
        if self.fail:
            raise DnsTempError("timeout")
        texts = self.records.get(name)
        if texts is None:
            return Lookup((), False, nxdomain=True)
        return Lookup(tuple(tuple(part.encode() for part in keys.txt_strings(text))
                            for text in texts), True)


def test_genkey_writes_a_private_key_and_prints_its_record(tmp_path):
    out = io.StringIO()
    assert command.genkey("example.org", "s1", "rsa", 2048, str(tmp_path / "dkim"), None,
                          out) == 0
    path = tmp_path / "dkim" / "example.org.s1.key"
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "dkim").stat().st_mode) == 0o750
    key = keys.load_key(str(path))
    assert key.bits == 2048
    text = out.getvalue()
    line = [line for line in text.splitlines() if "IN TXT" in line][0]
    strings = line.split("( ")[1].rstrip(" )").split('" "')
    assert all(len(s.strip('"')) <= 255 for s in strings)
    assert "".join(s.strip('"') for s in strings) == key.record()
    assert line.startswith("s1._domainkey.example.org. IN TXT (")


def test_genkey_never_overwrites(tmp_path):
    assert command.genkey("example.org", "s1", "ed25519", 0, str(tmp_path), None,
                          io.StringIO()) == 0
    before = (tmp_path / "example.org.s1.key").read_bytes()
    assert command.genkey("example.org", "s1", "rsa", 2048, str(tmp_path), None,
                          io.StringIO()) == command.EX_CANTCREAT
    assert (tmp_path / "example.org.s1.key").read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_genkey_gives_the_key_to_the_owner(tmp_path):
    nobody = pwd.getpwnam("nobody")
    assert command.genkey("example.org", "s1", "rsa", 1024, str(tmp_path), "nobody",
                          io.StringIO()) == 0
    info = (tmp_path / "example.org.s1.key").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, 0o600)


def test_genkey_refuses_odd_sizes(tmp_path):
    with pytest.raises(keys.KeyFileError, match="from 1024 to 4096"):
        command.genkey("example.org", "s1", "rsa", 512, str(tmp_path), None, io.StringIO())


def test_check_published(tmp_path):
    _, key = write_key(tmp_path, "k")
    _, other = write_key(tmp_path, "o")
    name = "s1._domainkey.example.org"
    found = command.check_published(Zone({name: [key.record()]}), "example.org", "s1", key, 2.0)
    assert (found.status, found.problems, found.secure) == ("match", (), True)
    found = command.check_published(Zone({name: [other.record()]}), "example.org", "s1", key, 2)
    assert (found.status, found.problems) == (
        "mismatch", ("p= is another public key than the private key's",))
    found = command.check_published(Zone({}), "example.org", "s1", key, 2)
    assert (found.status, found.problems) == ("missing", ("no such name (NXDOMAIN)",))
    zone = Zone({}, fail=True)
    found = command.check_published(zone, "example.org", "s1", key, 1.5)
    assert found.status == "temperror" and zone.asked == [(name, "TXT", 1.5)]
    both = Zone({name: ["v=spf1 -all", key.record()]})
    found = command.check_published(both, "example.org", "s1", key, 2)
    # RFC 6376 §3.6.2.2: verifiers take either record; dkimpy and OpenDKIM
    # the first the DNS returns, so a second record fails some signatures.
    assert found.status == "unusable" and "2 TXT records at the name" in found.problems[0]
    assert command._status(found) == 1


def test_rotate_goes_step_by_step(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")
    old_path, _ = write_key(tmp_path, "example.org.old.key")
    config = config_module.parse(
        f"signing:\n  table: [{{match: example.org, selector: old, key_file: {old_path}}}]\n",
        "p.yaml")
    zone = Zone({})
    monkeypatch.setattr(command, "Resolver", lambda dns_config: zone)
    out = io.StringIO()
    assert command.rotate(config, "example.org", "new", "rsa", 2048, str(tmp_path), None,
                          out) == 1
    assert "step 1 of 3" in out.getvalue()
    new_key = keys.load_key(str(tmp_path / "example.org.new.key"))
    out = io.StringIO()
    assert command.rotate(config, "example.org", "new", "rsa", 2048, str(tmp_path), None,
                          out) == 1
    assert "step 2 of 3" in out.getvalue() and "missing" in out.getvalue()
    zone.records["new._domainkey.example.org"] = [new_key.record()]
    out = io.StringIO()
    assert command.rotate(config, "example.org", "new", "rsa", 2048, str(tmp_path), None,
                          out) == 0
    text = out.getvalue()
    assert "step 3 of 3" in text
    assert f"{{match: example.org, selector: old, key_file: {old_path}}}" in text
    assert (f"to {{match: example.org, selector: new, key_file: "
            f"{tmp_path}/example.org.new.key}}") in text
