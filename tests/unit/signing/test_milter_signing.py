"""Signing in the milter front-end (policyd/milter/protocol.py), through
pymilter's test context: outbound mail gets its DKIM-Signature fields at
the top, verified by dkimpy; a stranger's mail none; an outbound message
that cannot be signed is deferred, never passed unsigned in silence."""
from __future__ import annotations

import logging

import Milter
import pytest
from Milter import testctx

from tests.unit.milter.test_protocol import AR, OFFERED_PROTOCOL, Session, make_engine
from tests.unit.milter.signing import message

from .keyfiles import write_key
from .verifiers import dkimpy_results


@pytest.fixture
def offered(monkeypatch):
    opts = [Milter.CURR_ACTS, OFFERED_PROTOCOL, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    return opts


@pytest.fixture(scope="module")
def key_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    return {name: write_key(directory, f"{name}.pem", kind)
            for name, kind in (("r1", "rsa"), ("e1", "ed25519"))}


def signing_yaml(key_files, extra: str = "") -> str:
    return ("signing:\n  table:\n" + "".join(
        f"    - {{match: own.example, selector: {name}, key_file: {path}}}\n"
        for name, (path, _) in key_files.items()) + extra)


def delivered(s: Session, raw: bytes) -> bytes:
    """The message as the MTA writes it: each insertion at index 0, so the
    last one sent ends up on top."""
    top = b"".join(f"{field}: {value.lstrip()}".replace("\n", "\r\n").encode() + b"\r\n"
                   for kind, field, value, index in reversed(s.ctx.edits) if kind == "insert")
    return top + raw


def records(key_files) -> dict[str, str]:
    return {f"{name}._domainkey.own.example": key.record()
            for name, (_, key) in key_files.items()}


def test_a_sasl_clients_mail_is_signed_above_the_results(monkeypatch, offered, key_files,
                                                         caplog):
    s = Session(make_engine(signing_yaml(key_files)), monkeypatch, {"{auth_authen}": "alice"})
    s.connect("198.51.100.99", "laptop")
    raw = message("alice@own.example")
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.message("alice@own.example", raw) == Milter.ACCEPT
    top_down = [field for kind, field, _, _ in reversed(s.ctx.edits) if kind == "insert"]
    assert top_down == ["DKIM-Signature", "DKIM-Signature", AR]
    assert [index for kind, _, _, index in s.ctx.edits if kind == "insert"] == [0, 0, 0]
    assert dkimpy_results(delivered(s, raw), records(key_files)) == [True, True]
    assert "dkim.sign=signed:own.example/r1+e1" in caplog.text


def test_a_strangers_mail_is_not_signed(monkeypatch, offered, key_files, caplog):
    fallback = "    - {match: '*', domain: own.example, selector: r1, key_file: %s}\n" % (
        key_files["r1"][0])
    s = Session(make_engine(signing_yaml(key_files) + fallback), monkeypatch)
    s.connect("198.51.100.5")
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.message("carol@other.example", message("boss@own.example")) == Milter.ACCEPT
    assert s.inserted("DKIM-Signature") == []
    assert "dkim.sign" not in caplog.text


def test_a_relay_network_client_is_signed(monkeypatch, offered, key_files):
    engine = make_engine(signing_yaml(key_files) + "relay:\n  enabled: true\n"
                         "  local_domains: [own.example]\n  networks: [10.1.0.0/16]\n"
                         "  sender_ownership: \"off\"\n")
    s = Session(engine, monkeypatch)
    s.connect("10.1.2.3", "app.internal")
    raw = message("app@own.example")
    assert s.message("app@own.example", raw, "someone@example.net") == Milter.ACCEPT
    assert dkimpy_results(delivered(s, raw), records(key_files)) == [True, True]


def test_an_outbound_message_that_cannot_be_signed_is_deferred(monkeypatch, offered,
                                                               key_files, caplog):
    engine = make_engine(signing_yaml(key_files))
    s = Session(engine, monkeypatch, {"{auth_authen}": "alice"})
    s.connect("198.51.100.99", "laptop")
    big = message("alice@own.example", extra_headers="X-Big: " + "x" * 1100000 + "\r\n")
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.message("alice@own.example", big) == Milter.TEMPFAIL
    assert s.ctx._reply[:2] == ("451", "4.3.0")
    assert "outbound message not DKIM-signed: header too large to sign" in caplog.text
    accept = make_engine(signing_yaml(key_files, "  on_error: accept\n"))
    s = Session(accept, monkeypatch, {"{auth_authen}": "alice"})
    s.connect("198.51.100.99", "laptop")
    assert s.message("alice@own.example", big) == Milter.ACCEPT
    assert s.inserted("DKIM-Signature") == []


def test_signing_wants_the_body_even_without_verification(monkeypatch, key_files):
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    engine = make_engine("milter: {dkim: {verify: false, nat_requires_aligned_pass: flag}}\n"
                         + signing_yaml(key_files))
    Session(engine, monkeypatch).connect("198.51.100.10")
    assert not opts[1] & Milter.P_NOBODY
