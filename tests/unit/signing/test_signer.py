"""policyd.signing.signer: what it signs verifies with dkimpy and with
OpenDKIM, RSA and Ed25519, alone and together; oversigned fields cannot be
added; the table picks the key by the From address; the body is hashed as
it comes, never kept."""
from __future__ import annotations

import dataclasses
import re

import pytest

from policyd.signing.outbound import Origin
from policyd.signing.settings import (Canonicalization, OnSigningError, SigningConfig,
                                      SigningKey)
from policyd.signing.signer import Signer

from .keyfiles import write_key
from .verifiers import dkimpy_results, message, opendkim_results

FIELDS = [("Received", " from client (client [192.0.2.1]) by mx"),
          ("From", " Alice Example <alice@example.org>"),
          ("To", " bob@example.net,\n\tcarol@example.net"),
          ("Subject", " a  subject\twith   space "),
          ("Date", " Fri, 04 Dec 2026 07:00:00 +0000"),
          ("Message-ID", " <1@example.org>"),
          ("MIME-Version", " 1.0"),
          ("Content-Type", " text/plain; charset=utf-8")]
BODY = b"Hello  there \r\n\tindented\r\n\r\nlast line\r\n\r\n\r\n"


@pytest.fixture(scope="module")
def keyring(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    found = {}
    for name, kind in (("rsa", "rsa"), ("ed", "ed25519"), ("other", "rsa"),
                       ("alice", "rsa")):
        path, key = write_key(directory, name + ".pem", kind)
        found[name] = (str(path), key)
    return found


def table(keyring, *lines) -> tuple[SigningKey, ...]:
    return tuple(SigningKey(match, domain, selector, keyring[name][0])
                 for match, domain, selector, name in lines)


def records(keyring, *lines) -> dict[str, str]:
    return {f"{selector}._domainkey.{domain}": keyring[name][1].record()
            for domain, selector, name in lines}


DUAL = (("example.org", "", "r1", "rsa"), ("example.org", "", "e1", "ed"))
DUAL_RECORDS = (("example.org", "r1", "rsa"), ("example.org", "e1", "ed"))


def sign(config: SigningConfig, fields=FIELDS, body=BODY, chunk=7, origin=Origin.RELAY,
         own=("example.org",), leading_space=True):
    signing = Signer(config, clock=lambda: 1796367600).start(origin, own)
    for name, value in fields:
        signing.add_header(name, (value if leading_space else value[1:]).encode(),
                           leading_space)
    for start in range(0, len(body), chunk):
        signing.add_body(body[start:start + chunk])
    return signing.finish()


@pytest.mark.parametrize("canonicalization", list(Canonicalization))
def test_dual_signatures_verify_with_dkimpy_and_opendkim(keyring, tmp_path, canonicalization):
    config = SigningConfig(table=table(keyring, *DUAL), canonicalization=canonicalization)
    result = sign(config)
    assert result.status == "signed" and result.reason == "example.org/r1+e1"
    assert [h.name for h in result.headers] == ["DKIM-Signature", "DKIM-Signature"]
    assert "a=rsa-sha256" in result.headers[0].value
    assert "a=ed25519-sha256" in result.headers[1].value
    data = message(result.headers, FIELDS, BODY)
    published = records(keyring, *DUAL_RECORDS)
    assert dkimpy_results(data, published) == [True, True]
    assert opendkim_results(data, published, tmp_path / "opendkim") == [
        "pass s=r1", "pass s=e1"]


def test_the_signature_field_is_well_formed(keyring):
    result = sign(SigningConfig(table=table(keyring, *DUAL)))
    value = result.headers[0].value
    lines = value.split("\n")
    assert all(len(line) <= 80 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])
    assert "l=" not in re.sub(r"\s", "", value).split(";")   # never l=
    assert not any(tag.strip().startswith("l=") for tag in value.split(";"))
    tags = {tag.split("=", 1)[0].strip(): tag.split("=", 1)[1]
            for tag in re.sub(r"\s", "", value).split(";") if tag}
    assert tags["c"] == "relaxed/relaxed" and tags["t"] == "1796367600"
    # Oversigned: each present field once more than it occurs, absent ones once.
    signed = tags["h"].split(":")
    assert signed.count("from") == 2 and signed.count("to") == 2
    assert signed.count("reply-to") == 1 and signed.count("cc") == 1
    assert "received" not in signed and "list-id" not in signed


@pytest.mark.parametrize("added", [("From", " Mallory <m@evil.example>"),
                                   ("Reply-To", " m@evil.example"),
                                   ("Subject", " another subject"),
                                   ("Cc", " m@evil.example")])
def test_a_field_added_afterwards_breaks_every_signature(keyring, tmp_path, added):
    result = sign(SigningConfig(table=table(keyring, *DUAL)))
    published = records(keyring, *DUAL_RECORDS)
    for fields in ([added] + FIELDS, FIELDS + [added]):
        data = message(result.headers, fields, BODY)
        assert dkimpy_results(data, published) == [False, False]
    assert opendkim_results(message(result.headers, FIELDS + [added], BODY), published,
                            tmp_path / "o") == ["fail s=r1", "fail s=e1"]


def test_a_field_not_signed_may_be_added_and_the_body_may_not_change(keyring):
    result = sign(SigningConfig(table=table(keyring, *DUAL)))
    published = records(keyring, *DUAL_RECORDS)
    data = message(result.headers, FIELDS, BODY,
                   extra_top=[("Received", "by next.hop"), ("X-Spam", "no")])
    assert dkimpy_results(data, published) == [True, True]
    assert dkimpy_results(message(result.headers, FIELDS, BODY + b"more\r\n"),
                          published) == [False, False]


@pytest.mark.parametrize("chunk", [1, 3, 64, 65537])
def test_the_body_hash_does_not_depend_on_the_chunks(keyring, chunk):
    config = SigningConfig(table=table(keyring, ("example.org", "", "r1", "rsa")))
    body = (b"line  \t of text  \r\n" * 5000) + b"\r\n" * 3 + b"x" * 70000 + b"\r\n\r\n"
    result = sign(config, body=body, chunk=chunk)
    assert dkimpy_results(message(result.headers, FIELDS, body),
                          records(keyring, ("example.org", "r1", "rsa"))) == [True]


def test_fields_without_the_leading_space_and_with_lf_folding(keyring):
    config = SigningConfig(table=table(keyring, *DUAL),
                           canonicalization=Canonicalization.SIMPLE_SIMPLE)
    result = sign(config, leading_space=False)
    assert dkimpy_results(message(result.headers, FIELDS, BODY),
                          records(keyring, *DUAL_RECORDS)) == [True, True]


def test_the_table_picks_the_most_specific_match(keyring):
    config = SigningConfig(table=table(
        keyring, ("example.org", "", "r1", "rsa"), ("alice@example.org", "", "a1", "alice"),
        ("*", "relay.example", "f1", "other")))
    assert sign(config).reason == "example.org/a1"
    bob = [(n, " bob@example.org" if n == "From" else v) for n, v in FIELDS]
    assert sign(config, fields=bob).reason == "example.org/r1"
    sub = [(n, " x@mail.example.org" if n == "From" else v) for n, v in FIELDS]
    assert sign(config, fields=sub).reason == "example.org/r1"
    other = [(n, " x@evilexample.org" if n == "From" else v) for n, v in FIELDS]
    result = sign(config, fields=other)
    assert result.reason == "relay.example/f1"
    assert dkimpy_results(message(result.headers, other, BODY),
                          records(keyring, ("relay.example", "f1", "other"))) == [True]


def test_no_match_is_unsigned(keyring):
    config = SigningConfig(table=table(keyring, ("example.org", "", "r1", "rsa")))
    other = [(n, " x@other.example" if n == "From" else v) for n, v in FIELDS]
    assert sign(config, fields=other) == dataclasses.replace(
        sign(config, fields=other), status="unsigned", reason="no key for other.example",
        headers=())


@pytest.mark.parametrize("froms, reason", [
    ([], "no From field"),
    ([" a@example.org", " b@example.org"], "2 From fields"),
    ([" a@example.org, b@example.org"], "2 addresses in From"),
    ([" undisclosed"], "no domain in the From address")])
def test_a_message_without_one_from_address_is_not_signed(keyring, froms, reason):
    config = SigningConfig(table=table(keyring, ("example.org", "", "r1", "rsa")))
    fields = [f for f in FIELDS if f[0] != "From"] + [("From", v) for v in froms]
    result = sign(config, fields=fields)
    assert (result.status, result.reason, result.headers) == ("unsigned", reason, ())


def test_a_nat_client_gets_own_domains_signed_only(keyring):
    config = SigningConfig(table=table(keyring, ("*", "example.org", "r1", "rsa")))
    assert sign(config, origin=Origin.NAT).status == "signed"
    other = [(n, " x@other.example" if n == "From" else v) for n, v in FIELDS]
    result = sign(config, fields=other, origin=Origin.NAT)
    assert (result.status, result.headers) == ("unsigned", ())
    assert sign(config, fields=other, origin=Origin.RELAY).status == "signed"


def test_a_valid_signature_of_ours_is_not_made_twice(keyring):
    config = SigningConfig(table=table(keyring, *DUAL))
    first = sign(config)
    signed_fields = [(h.name, " " + h.value) for h in first.headers] + FIELDS
    again = sign(config, fields=signed_fields)
    assert (again.status, again.reason) == ("already", "example.org/r1")
    assert sign(dataclasses.replace(config, resign=True), fields=signed_fields).status == "signed"
    # Changed in transit: no longer valid, so it is signed anew.
    changed = sign(config, fields=signed_fields, body=BODY + b"changed\r\n")
    assert changed.status == "signed"
    # Another signer's signature is no reason not to sign.
    other = SigningConfig(table=table(keyring, ("example.org", "", "x1", "other")))
    foreign = [(h.name, " " + h.value) for h in sign(other).headers] + FIELDS
    assert sign(config, fields=foreign).status == "signed"


def test_a_header_too_large_to_hold_is_an_error(keyring):
    config = SigningConfig(table=table(keyring, ("example.org", "", "r1", "rsa")))
    signing = Signer(config).start(Origin.RELAY, max_held=1000)
    signing.add_header("From", b" a@example.org")
    signing.add_header("X-Big", b" " + b"x" * 2000)
    result = signing.finish()
    assert (result.status, result.reason, result.defer) == (
        "error", "header too large to sign", True)
    config = dataclasses.replace(config, on_error=OnSigningError.ACCEPT)
    signing = Signer(config).start(Origin.RELAY, max_held=1000)
    signing.add_header("X-Big", b" " + b"x" * 2000)
    assert signing.finish().defer is False


def test_fields_after_the_body_are_an_error(keyring):
    from policyd.signing.signer import finish
    config = SigningConfig(table=table(keyring, ("example.org", "", "r1", "rsa")))
    signing = Signer(config).start(Origin.RELAY)
    signing.add_header("From", b" a@example.org")
    signing.add_body(b"body\r\n")
    signing.add_header("Subject", b" late")
    result = finish(signing)
    assert (result.status, result.reason, result.defer) == (
        "error", "header fields out of order", True)


def test_finish_turns_a_fault_into_an_error_result(keyring, monkeypatch):
    from policyd.signing import signer as signer_module
    config = SigningConfig(table=table(keyring, ("example.org", "", "r1", "rsa")),
                           on_error=OnSigningError.ACCEPT)
    signing = Signer(config).start(Origin.RELAY)
    signing.add_header("From", b" a@example.org")

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(signing, "_sign", broken)
    assert signer_module.finish(signing) == signer_module.SigningResult(
        "error", reason="signing failed", defer=False)


def test_start_message_signs_outbound_mail_only_with_the_keys_the_load_read(
        tmp_path, monkeypatch):
    import ipaddress
    import os as os_module

    from policyd import config as config_module
    from policyd.signing import signer as signer_module
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")
    path, _ = write_key(tmp_path, "k.pem")
    config = config_module.parse(
        f"signing:\n  table: [{{match: example.org, selector: s, key_file: {path}}}]\n", "p")
    stranger = ipaddress.ip_address("198.51.100.1")
    assert signer_module.start_message(config, "", stranger) is None
    reads = []
    real_load = signer_module.load_key
    monkeypatch.setattr(signer_module, "load_key", lambda p: reads.append(p) or real_load(p))
    # Opened to others after the load: what signs is what the load checked.
    os_module.chmod(path, 0o644)
    first = signer_module.start_message(config, "sasl", stranger)
    second = signer_module.start_message(config, "sasl", stranger)
    assert isinstance(first, signer_module.MessageSigning) and first.signer is second.signer
    assert reads == []
    # A section no load checked (made in code) reads its files, and one
    # it cannot use is an error result for outbound mail (on_error), never
    # unsigned in silence.
    unchecked = dataclasses.replace(config, signing=SigningConfig(table=config.signing.table))
    os_module.unlink(path)
    result = signer_module.start_message(unchecked, "network", stranger)
    assert isinstance(result, signer_module.SigningResult)
    assert (result.status, result.defer) == ("error", True)
    assert result.reason == f"keys unusable: {path}: no such file"


def test_a_config_handed_to_a_worker_takes_its_keys_along(tmp_path, monkeypatch):
    import os as os_module
    import pickle

    from policyd import config as config_module
    from policyd.signing import keys as keys_module
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")
    rsa_path, _ = write_key(tmp_path, "r.pem")
    ed_path, _ = write_key(tmp_path, "e.pem", "ed25519")
    config = config_module.parse(
        "signing:\n  table:\n"
        f"    - {{match: example.org, selector: r, key_file: {rsa_path}}}\n"
        f"    - {{match: example.org, selector: e, key_file: {ed_path}}}\n", "p")
    os_module.unlink(rsa_path)
    os_module.unlink(ed_path)
    handed = pickle.loads(pickle.dumps(config))   # as runtime/supervisor.py hands it over
    assert handed == config and handed.signing is not config.signing
    loaded = keys_module.kept(handed.signing)
    assert loaded is not None and set(loaded) == {str(rsa_path), str(ed_path)}
    result = sign(handed.signing)
    assert result.status == "signed" and result.reason == "example.org/r+e"


@pytest.mark.parametrize("ownership, login, sender, status", [
    ("enforce", "alice", "alice@example.org", "signed:example.org/s"),
    ("enforce", "alice", "bob@example.org", "unsigned:From not owned by alice"),
    ("enforce", "alice", "Bob <nobody@example.org>", "unsigned:From not owned by alice"),
    ("known", "alice", "bob@example.org", "unsigned:From not owned by alice"),
    ("known", "alice", "nobody@example.org", "signed:example.org/s"),
    ("off", "alice", "bob@example.org", "signed:example.org/s"),
    ("enforce", "", "bob@example.org", "signed:example.org/s"),   # relay network
])
def test_a_logins_from_is_signed_only_when_the_login_owns_it(
        tmp_path, monkeypatch, ownership, login, sender, status):
    """relay.sender_ownership holds the From a login writes as it holds its
    MAIL FROM, through the relay checks' own lookup (relay.senders)."""
    import ipaddress

    from policyd import config as config_module
    from policyd.relay.authorization import RelayPolicy
    from policyd.signing import signer as signer_module
    monkeypatch.setattr(config_module.socket, "getfqdn", lambda: "fqdn.test")
    path, _ = write_key(tmp_path, "k.pem")
    config = config_module.parse(
        "relay:\n  enabled: true\n  local_domains: [example.org]\n"
        "  networks: [192.0.2.0/24]\n"
        f"  sender_ownership: {ownership}\n"
        "  senders: [{login: alice, addresses: [alice@example.org]},"
        " {login: bob, addresses: [bob@example.org]}]\n"
        f"signing:\n  table: [{{match: example.org, selector: s, key_file: {path}}}]\n", "p")
    policy = RelayPolicy(config.relay, config.limits, None)
    client = ipaddress.ip_address("192.0.2.7")

    def sign_from(relay):
        signing = signer_module.start_message(config, "sasl" if login else "network", client,
                                              login, relay)
        assert isinstance(signing, signer_module.MessageSigning)
        for name, value in [("From", f" {sender}"), *FIELDS[2:]]:
            signing.add_header(name, value.encode())
        signing.add_body(BODY)
        return signer_module.finish(signing).log_value()

    assert sign_from(policy) == status
    # Without relay checks (relay.enabled false) the MTA holds the envelope
    # to the login (Postfix's reject_sender_login_mismatch): signed as before.
    assert sign_from(None) == "signed:example.org/s"
