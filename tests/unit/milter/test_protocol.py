"""policyd.milter.protocol.PolicyMilter driven by pymilter's own test
context (Milter.testctx.TestCtx), over the engine and a fake DNS world."""
from __future__ import annotations

import io
import logging
import random
import socket

import dkim
import Milter
import pytest
from Milter import testctx

from policyd import config as config_module
from policyd.checks import dkim as dkim_check
from policyd.engine import Engine
from policyd.milter import protocol
from policyd.milter.protocol import PolicyMilter
from tests.unit.fakedns import (STANDARD_SECURE, STANDARD_TEMP_ERRORS, STANDARD_WORLD,
                                 FakeResolver)
from tests.unit.milter.signing import ed25519_key, message

AR = "Authentication-Results"
AUTHSERV_ID = "mx.test.example"

# The protocol steps an MTA offers, without the "no reply" bits: pymilter's
# testctx.TestCtx then calls every callback and expects a reply from each
# (docs/protocols.md §2), and without SMFIP_HDR_LEADSPC, as Postfix without it.
NO_REPLY_BITS = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT
                 | Milter.P_NR_DATA | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY
                 | Milter.P_NR_HDR)
OFFERED_PROTOCOL = 0x1FFFFF & ~NO_REPLY_BITS & ~Milter.P_HDR_LEADSPC

BASE_CONFIG = f"""
authserv_id: {AUTHSERV_ID}
nat:
  own_domains: [own.example]
  networks: [192.168.1.0/24, fd00::/8]
  public_addresses: [203.0.113.7]
"""

SIGNER = ed25519_key("own.example", "ed1")
OTHER_SIGNER = ed25519_key("other.example", "ed2")


class RecordingCtx(testctx.TestCtx):
    """testctx.TestCtx that records the header edits as libmilter would send them."""

    def __init__(self):
        super().__init__()
        self.edits: list[tuple] = []

    def addheader(self, field, value, idx):
        self.edits.append(("insert", field, value, idx))

    def chgheader(self, field, idx, value):
        self.edits.append(("change", field, idx, value))


def world() -> FakeResolver:
    """The standard world plus the signers' keys."""
    zone = dict(STANDARD_WORLD)
    zone.update({k.record_name: {"TXT": [k.record_strings()]} for k in (SIGNER, OTHER_SIGNER)})
    return FakeResolver(zone, temp_errors=STANDARD_TEMP_ERRORS, secure=STANDARD_SECURE)


def make_engine(extra_yaml: str = "") -> Engine:
    return Engine(config_module.parse(BASE_CONFIG + extra_yaml, "<test>"), world())


@pytest.fixture
def offered(monkeypatch):
    """What the test MTA offers; a fresh list, since negotiate edits it."""
    opts = [Milter.CURR_ACTS, OFFERED_PROTOCOL, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    return opts


class Session:
    """One MTA connection to a PolicyMilter, stage by stage."""

    def __init__(self, engine: Engine, monkeypatch, macros: dict[str, str] | None = None):
        self.engine = engine
        self.closed = 0
        monkeypatch.setattr(Milter, "factory", lambda: PolicyMilter(engine, self._on_close))
        self.ctx = RecordingCtx()
        for name, value in (macros or {}).items():
            self.ctx._setsymval(name, value)

    def _on_close(self):
        self.closed += 1

    @property
    def milter(self) -> PolicyMilter:
        return self.ctx.getpriv()

    def connect(self, ip: str, helo: str = "mail.example.net") -> int:
        return self.ctx._connect(f"[{ip}]", helo, ip)

    def envelope(self, sender: str, *recipients: str) -> int:
        rc = self.ctx._envfrom(f"<{sender}>")
        assert rc == Milter.CONTINUE
        for recipient in recipients or ("rcpt@other.example",):
            rc = self.ctx._envrcpt(f"<{recipient}>")
            if rc != Milter.CONTINUE:
                return rc
        return rc

    def content(self, raw: bytes) -> int:
        """Headers as an MTA sends them (value without the one space after
        the colon, continuation lines joined by "\\n"), then the body, then
        end of message."""
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        fields = []
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += b"\n" + line
            else:
                fields.append(line)
        self.ctx._body = None
        for line in fields:
            name, _, value = line.partition(b":")
            if value.startswith(b" ") and not self.milter._protocol & Milter.P_HDR_LEADSPC:
                value = value[1:]
            assert self.milter.header_bytes(name.decode("latin-1"), value) == Milter.CONTINUE
        self.ctx._feed_body(io.BytesIO(body.replace(b"\n", b"\r\n")))
        self.ctx.edits.clear()
        return self.ctx._eom()

    def message(self, sender: str, raw: bytes, *recipients: str) -> int:
        rc = self.envelope(sender, *recipients)
        if rc != Milter.CONTINUE:
            return rc
        return self.content(raw)

    def inserted(self, name: str = AR) -> list[str]:
        return [value for kind, field, value, _ in self.ctx.edits
                if kind == "insert" and field == name]


@pytest.fixture
def session(monkeypatch, offered):
    def start(engine=None, macros=None):
        return Session(engine or make_engine(), monkeypatch, macros)
    return start


# --- negotiation --------------------------------------------------------------

def test_negotiation_asks_for_the_macros_it_reads(session):
    s = session()
    assert s.connect("198.51.100.10") == Milter.CONTINUE
    symlist = s.ctx._symlist
    assert symlist[Milter.M_CONNECT] == {b"{client_name}", b"{client_ptr}", b"{client_resolve}"}
    assert symlist[Milter.M_ENVFROM] == {b"i", b"{auth_authen}"}
    assert symlist[Milter.M_ENVRCPT] == {b"i"}
    assert symlist[Milter.M_EOM] == {b"i"}


def test_negotiation_asks_only_for_the_actions_it_uses(session, offered):
    session().connect("198.51.100.10")
    assert offered[0] == Milter.ADDHDRS | Milter.CHGHDRS | Milter.SETSYMLIST


def test_negotiation_skips_what_it_does_not_need(monkeypatch):
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    Session(make_engine(), monkeypatch).connect("198.51.100.10")
    protocol = opts[1]
    for wanted in (Milter.P_NODATA, Milter.P_NOEOH, Milter.P_NOUNKNOWN, Milter.P_NR_CONN,
                   Milter.P_NR_HELO, Milter.P_NR_MAIL, Milter.P_NR_HDR, Milter.P_NR_BODY,
                   Milter.P_HDR_LEADSPC):
        assert protocol & wanted, hex(wanted)
    for unwanted in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOMAIL, Milter.P_NORCPT,
                     Milter.P_NOHDRS, Milter.P_NOBODY, Milter.P_NR_RCPT, Milter.P_RCPT_REJ):
        assert not protocol & unwanted, hex(unwanted)



def test_without_dkim_verification_the_body_is_not_asked_for(monkeypatch):
    opts = [Milter.CURR_ACTS, 0x1FFFFF, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    engine = make_engine("milter: {dkim: {verify: false, nat_requires_aligned_pass: flag}}\n")
    Session(engine, monkeypatch).connect("198.51.100.10")
    assert opts[1] & Milter.P_NOBODY
    assert not opts[1] & Milter.P_NOHDRS     # forged results are still removed

def test_an_mta_without_setsymlist_still_gets_our_protocol(monkeypatch, caplog):
    opts = [Milter.CURR_ACTS & ~Milter.SETSYMLIST, 0x1FFFFF, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    s = Session(make_engine(), monkeypatch)
    with caplog.at_level(logging.INFO, "policyd.milter"):
        s.connect("198.51.100.10")
    assert s.ctx._symlist[Milter.M_CONNECT] is None
    assert opts[1] & Milter.P_NR_HDR
    assert "no setsymlist" in caplog.text


# --- the envelope -------------------------------------------------------------

def test_spf_fail_rejects_every_recipient_with_the_engine_reply(session, caplog):
    s = session()
    s.connect("198.51.100.99", "evil.example.net")
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.envelope("ceo@own.example", "a@other.example") == Milter.REJECT
        reply = s.ctx._reply
        assert s.ctx._envrcpt("<b@other.example>") == Milter.REJECT
    assert reply == ("550", "5.7.23", "SPF fail: own.example does not designate this host "
                                      "as a permitted sender (mailfrom)")
    assert s.ctx._reply == reply
    lines = [r.getMessage() for r in caplog.records if "action=" in r.getMessage()]
    assert len(lines) == 1 and "action=REJECT rule=spf.mailfrom.fail" in lines[0]


def test_spf_temperror_defers(session):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    assert s.envelope("a@temperror.example") == Milter.TEMPFAIL
    assert s.ctx._reply[:2] == ("451", "4.7.24")


@pytest.mark.parametrize("sender, spf", [
    ("a@softfail.example", "spf=softfail"),
    ("a@permerror.example", "spf=permerror"),
    ("a@neutral.example", "spf=neutral"),
    ("a@nospf.example", "spf=none"),
])
def test_flagged_and_neutral_results_are_accepted_and_reported(session, sender, spf):
    s = session()
    s.connect("198.51.100.11", "helo.other.example")
    assert s.message(sender, message(sender)) == Milter.ACCEPT
    (header,) = s.inserted()
    assert header.startswith(AUTHSERV_ID + ";")
    assert f"{spf} (without dnssec) smtp.mailfrom={sender.split('@')[1]}" in header


def test_sasl_authenticated_client_is_not_checked(session):
    s = session(macros={"{auth_authen}": "alice"})
    s.connect("198.51.100.99", "laptop")
    assert s.message("ceo@own.example", message("ceo@own.example")) == Milter.ACCEPT
    assert not s.engine.resolver.asked("own.example", "TXT")


def test_test_mode_accepts_what_it_would_reject_and_logs_it(session, caplog):
    s = session(make_engine("test_mode: true\n"))
    s.connect("198.51.100.99", "evil.example.net")
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.message("ceo@own.example", message("ceo@own.example")) == Milter.ACCEPT
    assert "spf=fail" in s.inserted()[0]
    assert "would=REJECT" in caplog.text


# --- iprev: the MTA's names when it sends them, our own lookup otherwise --------

@pytest.mark.parametrize("macros, iprev, looked_up", [
    ({"{client_resolve}": "OK", "{client_name}": "mail6.other.example",
      "{client_ptr}": "mail6.other.example"}, "iprev=pass (mail6.other.example;", False),
    ({"{client_resolve}": "FORGED", "{client_name}": "unknown",
      "{client_ptr}": "liar.other.example"}, "iprev=fail (liar.other.example;", False),
    ({"{client_resolve}": "FAIL", "{client_name}": "unknown", "{client_ptr}": "unknown"},
     "iprev=permerror (no PTR;", False),
    # Sendmail: a bracketed address where there is no name.
    ({"{client_resolve}": "FAIL", "{client_name}": "[2001:db8:6::25]",
      "{client_ptr}": "[2001:db8:6::25]"}, "iprev=permerror (no PTR;", False),
    # TEMP, or no macros at all: we look it up ourselves (and find a pass).
    ({"{client_resolve}": "TEMP", "{client_ptr}": "mail6.other.example"},
     "iprev=pass (mail6.other.example;", True),
    ({}, "iprev=pass (mail6.other.example;", True),
])
def test_iprev_uses_the_mta_lookup_when_sent(session, macros, iprev, looked_up):
    s = session(macros=macros)
    s.connect("2001:db8:6::25", "mail6.other.example")
    assert s.message("a@other.example", message("a@other.example")) == Milter.ACCEPT
    header = s.inserted()[0]
    assert iprev in header
    assert 'policy.iprev="2001:db8:6::25"' in header
    assert s.engine.resolver.asked("5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.0.0.0.8.b.d."
                                   "0.1.0.0.2.ip6.arpa", "PTR") is looked_up


def test_ipv6_without_ptr_is_flagged_not_rejected(session):
    s = session()
    s.connect("2001:db8:6::26", "mail6.other.example")
    assert s.message("a@other.example", message("a@other.example")) == Milter.ACCEPT
    assert "iprev=permerror" in s.inserted()[0]


def test_ipv4_mapped_ipv6_client_is_the_ipv4_client(session):
    s = session()
    s.connect("::ffff:198.51.100.10", "helo.other.example")
    assert s.message("a@other.example", message("a@other.example")) == Milter.ACCEPT
    header = s.inserted()[0]
    assert "spf=pass" in header and "iprev" not in header   # iprev.ipv4 is off


def test_unix_socket_client_is_not_judged_but_forged_results_go(monkeypatch, offered):
    s = Session(make_engine(), monkeypatch)
    s.ctx._negotiate()
    s.ctx._stage = Milter.M_CONNECT
    assert Milter.connect_callback(s.ctx, "localhost", socket.AF_UNIX, "/run/x") == \
        Milter.CONTINUE
    raw = message(extra_headers=f"{AR}: {AUTHSERV_ID}; spf=pass\r\n")
    assert s.message("ceo@own.example", raw) == Milter.ACCEPT
    assert s.ctx.edits == [("change", AR, 1, "")]
    assert s.engine.resolver.queries == []


# --- Authentication-Results: ours on top, forgeries out -------------------------

def test_forged_results_with_our_authserv_id_are_removed(session):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    raw = message("a@other.example", extra_headers=(
        f"{AR}: {AUTHSERV_ID}; spf=pass smtp.mailfrom=bank.example\r\n"
        f"{AR}: other.example; dkim=pass header.d=other.example\r\n"
        f"{AR}: (comment) \"MX.Test.Example\" 1; dkim=pass\r\n"
        f"{AR}:\r\n  {AUTHSERV_ID.upper()};\r\n  spf=pass\r\n"
        f"{AR}: {AUTHSERV_ID}.evil.example; spf=pass\r\n"))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    changes = [edit for edit in s.ctx.edits if edit[0] == "change"]
    assert changes == [("change", AR, 4, ""), ("change", AR, 3, ""), ("change", AR, 1, "")]
    inserts = [edit for edit in s.ctx.edits if edit[0] == "insert"]
    assert [(field, idx) for _, field, _, idx in inserts] == [(AR, 0)]
    assert s.ctx.edits.index(changes[-1]) < s.ctx.edits.index(inserts[0])


def test_received_spf_goes_below_authentication_results(session):
    s = session(make_engine("headers: {received_spf: true}\n"))
    s.connect("198.51.100.10", "helo.other.example")
    assert s.message("a@other.example", message("a@other.example")) == Milter.ACCEPT
    inserts = [(field, idx) for kind, field, _, idx in s.ctx.edits if kind == "insert"]
    # Each goes to the top, so the last inserted ends up first.
    assert inserts == [("Received-SPF", 0), (AR, 0)]
    assert s.inserted("Received-SPF")[0].startswith("Pass (")


def test_simple_header_canonicalization_survives_the_eaten_space(session):
    # Without SMFIP_HDR_LEADSPC the MTA drops the space after each colon;
    # the field is rebuilt with it, or a c=simple/... signature breaks.
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    raw = OTHER_SIGNER.sign(message("a@other.example", extra_headers="X-Folded: one\r\n\ttwo\r\n"),
                            canonicalize=(b"simple", b"simple"))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    assert "dkim=pass" in s.inserted()[0]


def test_leading_space_negotiated_value_carries_its_space(monkeypatch):
    opts = [Milter.CURR_ACTS, 0x1FFFFF & ~NO_REPLY_BITS, 0, 0]
    monkeypatch.setattr(testctx.TestCtx, "default_opts", opts)
    s = Session(make_engine(), monkeypatch)
    s.connect("192.168.1.20", "mx.own.example")
    assert s.milter._protocol & Milter.P_HDR_LEADSPC
    # Signed with simple header canonicalization, with no space after one
    # colon: only the exact header survives that.
    raw = SIGNER.sign(message(extra_headers="X-Tight:value\r\n"),
                      canonicalize=(b"simple", b"simple"))
    assert s.message("staff@own.example", raw) == Milter.ACCEPT
    (header,) = s.inserted()
    assert header.startswith(" " + AUTHSERV_ID + ";")
    assert "dkim=pass" in header


# --- DKIM, and NAT own-domain mail -------------------------------------------

def test_dkim_results_are_in_the_header(session):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    raw = OTHER_SIGNER.sign(message("a@other.example"))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    header = s.inserted()[0]
    assert "dkim=pass (without dnssec) header.d=other.example header.s=ed2 header.b=" in header


def test_nat_own_domain_with_aligned_signature_is_accepted(session):
    s = session()
    s.connect("192.168.1.20", "mx.own.example")
    raw = SIGNER.sign(message("staff@own.example"))
    assert s.message("staff@own.example", raw) == Milter.ACCEPT
    header = s.inserted()[0]
    assert "policy.nat-relaxed=203.0.113.7" in header and "dkim=pass" in header


@pytest.mark.parametrize("raw", [
    message("staff@own.example"),                          # unsigned
    OTHER_SIGNER.sign(message("staff@own.example")),       # signed, not aligned
    SIGNER.sign(message("staff@own.example")).replace(b"Hello.", b"Hullo."),   # broken
], ids=["unsigned", "other-domain", "broken"])
def test_nat_own_domain_without_aligned_pass_is_rejected_at_end_of_message(session, raw):
    s = session()
    s.connect("fd00::1:5", "mx.own.example")
    assert s.envelope("staff@own.example") == Milter.CONTINUE   # SPF passes, relaxed
    assert s.content(raw) == Milter.REJECT
    assert s.ctx._reply == ("550", "5.7.20", "Own-domain mail from a NAT network must "
                                             "carry a valid DKIM signature")
    assert s.ctx.edits == []


@pytest.mark.parametrize("setting, status", [("defer", Milter.TEMPFAIL),
                                             ("flag", Milter.ACCEPT)])
def test_nat_requirement_is_configurable(session, setting, status):
    s = session(make_engine(f"milter: {{dkim: {{nat_requires_aligned_pass: {setting}}}}}\n"))
    s.connect("192.168.1.20", "mx.own.example")
    assert s.message("staff@own.example", message("staff@own.example")) == status
    if setting == "defer":
        assert s.ctx._reply[:2] == ("451", "4.7.20")
    else:
        assert "dkim=none" in s.inserted()[0]


def test_outside_spoof_of_own_domain_is_rejected_at_rcpt(session):
    s = session()
    s.connect("198.51.100.99", "mx.own.example")
    assert s.envelope("staff@own.example") == Milter.REJECT


SMALL_CEILING = "milter: {dkim: {max_held_bytes: 65536}}\n"


@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"relaxed"), (b"simple", b"simple")])
def test_a_body_past_the_ceiling_is_verified_as_it_arrives(session, canonicalize):
    body = "".join(f"line {n}  \t of a long body\r\n" for n in range(20000)) + "\r\n\r\n"
    raw = OTHER_SIGNER.sign(message("a@other.example", body=body), canonicalize=canonicalize)
    assert len(raw) > 8 * 65536
    for changed, result in ((raw, "dkim=pass"), (raw.replace(b"line 19999", b"line 20000"),
                                                  "dkim=fail (body hash mismatch")):
        s = session(make_engine(SMALL_CEILING))
        s.connect("198.51.100.10", "helo.other.example")
        assert s.message("a@other.example", changed) == Milter.ACCEPT
        assert result in s.inserted()[0]


def test_what_a_message_holds_stays_under_the_ceiling():
    # 4 MB of body in MTA-sized chunks, made one at a time: what stays
    # allocated is the fields, at most one chunk past the ceiling, and the
    # line in progress, never the body.
    import tracemalloc
    ceiling = 65536
    kept = protocol._Message("a@other.example", ceiling)
    signed = OTHER_SIGNER.sign(message("a@other.example"))
    head = signed.partition(b"\r\n\r\n")[0]
    for line in head.replace(b"\r\n ", b"\n ").split(b"\r\n"):
        name, _, value = line.partition(b":")
        kept.add_header(name.decode(), value[1:], False, "mx.own.example")
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        peak_held = 0
        for number in range(64):
            kept.add_body((b"%06d" % number) * 10922 + b"\r\n")   # 65534 octets
            peak_held = max(peak_held, kept.size)
        allocated = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert kept.hasher is not None and kept.chunks is None
    assert peak_held <= ceiling + 65536
    assert allocated < 2 * ceiling


def test_a_header_past_the_ceiling_is_dkim_neutral(session):
    s = session(make_engine(SMALL_CEILING))
    s.connect("198.51.100.10", "helo.other.example")
    extra = "".join(f"X-Filler-{n}: {'y' * 900}\r\n" for n in range(80))
    raw = OTHER_SIGNER.sign(message("a@other.example", extra_headers=extra))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    assert "dkim=neutral (message header too large to verify)" in s.inserted()[0]


def test_an_ordinary_message_is_kept_whole_not_streamed(session, monkeypatch):
    def refuse(self):
        raise AssertionError("streamed")
    monkeypatch.setattr(protocol._Message, "_stream", refuse)
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    raw = OTHER_SIGNER.sign(message("a@other.example", body="x" * 300000 + "\r\n"))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    assert "dkim=pass" in s.inserted()[0]


def test_dkim_verification_can_be_off(session):
    s = session(make_engine("milter: {dkim: {verify: false, nat_requires_aligned_pass: flag}}\n"))
    s.connect("198.51.100.10", "helo.other.example")
    raw = OTHER_SIGNER.sign(message("a@other.example"))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    assert "dkim" not in s.inserted()[0]
    assert not s.engine.resolver.asked(OTHER_SIGNER.record_name)


# --- one connection, several messages ---------------------------------------

def test_state_is_reset_between_messages(session, caplog):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    forged = message("a@other.example", extra_headers=f"{AR}: {AUTHSERV_ID}; spf=pass\r\n")
    signed = OTHER_SIGNER.sign(message("a@other.example"))
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.message("a@other.example", signed) == Milter.ACCEPT
        assert "dkim=pass" in s.inserted()[0]
        assert s.message("a@own.example", forged) == Milter.REJECT      # SPF fail
        assert s.message("a@other.example", forged) == Milter.ACCEPT
        assert s.ctx.edits[0] == ("change", AR, 1, "")
        assert "dkim=none" in s.inserted()[0] and "spf=pass" in s.inserted()[0]
        assert s.message("b@other.example", message("b@other.example")) == Milter.ACCEPT
        assert [e for e in s.ctx.edits if e[0] == "change"] == []
    assert caplog.text.count("action=") == 4


def test_aborted_message_logs_its_envelope_decision_once(session, caplog):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    with caplog.at_level(logging.INFO, "policyd"):
        s.envelope("a@other.example")
        s.ctx._abort()
    assert caplog.text.count("action=ACCEPT") == 1
    assert s.closed == 1


def test_queue_id_from_the_i_macro_leads_the_log_line(session, caplog):
    s = session(macros={"i": "4XyZ1"})
    s.connect("198.51.100.10", "helo.other.example")
    with caplog.at_level(logging.INFO, "policyd"):
        s.message("a@other.example", message("a@other.example"))
    assert any(r.getMessage().startswith("4XyZ1: action=ACCEPT") for r in caplog.records)


# --- bad input ------------------------------------------------------------------

def test_non_utf8_sender_is_decided_and_never_breaks_a_reply(session):
    s = session()
    s.connect("198.51.100.99", "evil")
    sender = b"\xff\xfe@own.example".decode("utf-8", "surrogateescape")
    assert s.envelope(sender) == Milter.REJECT
    code, status, text = s.ctx._reply
    assert (code, status) == ("550", "5.7.23")
    assert text.isascii() and text.isprintable()


def test_eight_bit_domain_sender_gets_a_header_that_is_ascii(session):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    sender = "user@b\u00fccher.example"
    assert s.message(sender, message("a@other.example")) == Milter.ACCEPT
    assert s.inserted()[0].isascii()


def test_garbage_and_huge_header_lines_do_not_break_the_message(session):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    raw = (b"From: a@other.example\r\nX-Huge: " + b"x" * 200000 + b"\r\n"
           b"X-Bin: \xff\x00\xfe\r\n" + OTHER_SIGNER.sign(message("a@other.example")))
    assert s.message("a@other.example", raw) == Milter.ACCEPT
    assert "dkim=" in s.inserted()[0]


# A field dkimpy would read otherwise ("X Odd" is no field name to it) takes
# the whole message to dkimpy's parser; plain fields go to it parsed.
@pytest.mark.parametrize("entry,prefix", [("verify", b"X Odd: 1\r\n"), ("verify_parsed", b"")])
def test_dkim_library_failure_is_neutral_not_a_deferral(session, monkeypatch, caplog,
                                                         entry, prefix):
    def broken(*args):
        raise AttributeError("dkimpy tripped")
    monkeypatch.setattr(protocol.dkim_check, entry, broken)
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    with caplog.at_level(logging.ERROR, "policyd"):
        raw = prefix + OTHER_SIGNER.sign(message("a@other.example"))
        assert s.message("a@other.example", raw) == Milter.ACCEPT
    assert "dkim=neutral (verification failed)" in s.inserted()[0]
    assert "DKIM verification failed" in caplog.text


def test_engine_failure_defers_with_a_local_error(session, monkeypatch, caplog):
    engine = make_engine()

    def broken(request):
        raise RuntimeError("boom")
    monkeypatch.setattr(engine, "decide", broken)
    s = session(engine)
    s.connect("198.51.100.10", "helo.other.example")
    with caplog.at_level(logging.ERROR, "policyd"):
        assert s.envelope("a@other.example") == Milter.TEMPFAIL
    assert s.ctx._reply == ("451", "4.3.0", "Temporary local problem, try again later")
    assert "the engine failed" in caplog.text


# --- DKIM input from the fields as the MTA sent them ---------------------------

def _kept(fields, chunks) -> protocol._Message:
    kept = protocol._Message("a@other.example")
    for name, value, leading_space in fields:
        kept.add_header(name, value, leading_space, "mx.own.example")
    kept.signed = True
    for chunk in chunks:
        kept.add_body(chunk)
    return kept


def _parsed_from_message(kept: protocol._Message):
    """What verify() hands dkimpy for the same message: the reference."""
    head, body = dkim_check._split(kept.message_bytes())
    return dkim.rfc822_parse(head)[0], body


@pytest.mark.parametrize("fields", [
    [("From", b"a@other.example", False), ("To", b"b@own.example", False)],
    [("Subject", b" with its space", True), ("X-Folded", b"one\n\ttwo\n three", False)],
    [("X-CRLF-Folded", b"one\r\n two", False), ("X-Empty", b"", False)],
    [("X-Tab", b"a\tb  c", False), ("DKIM-Signature", b"v=1; a=rsa-sha256;\n b=abc", False)],
])
def test_plain_fields_reach_dkimpy_as_its_parser_reads_the_message(fields):
    kept = _kept(fields, [b"line one\r\nline two\r\n", b"more\nbare LF\r\n"])
    assert kept.dkim_headers() is not None
    assert (kept.dkim_headers(), kept.body_bytes()) == _parsed_from_message(kept)


@pytest.mark.parametrize("fields", [
    [("X Odd", b"1", False)],                     # dkimpy: no field name
    [("From ", b"x", False)],                     # dkimpy: an mbox "From " line
    [("X-Gap", b"one\n\n two", False)],           # an empty line ends the header
    [("X-Unindented", b"one\ntwo", False)],       # dkimpy: a field of its own
    [("X-Ümlaut", b"v", False)],
])
def test_fields_dkimpy_would_read_otherwise_go_to_its_parser(fields):
    assert _kept(fields, [b"body\r\n"]).dkim_headers() is None


def test_dkim_input_from_fields_is_dkimpys_reading_for_any_bytes():
    """A fixed-seed fuzz: fields made of the bytes that matter to parsing;
    whenever the fields are taken as they are, they must be what dkimpy's
    parser reads from the message put together."""
    rng = random.Random(7)
    alphabet = [b"a", b" ", b"\t", b"\r", b"\n", b":", b"\r\n", b"\n ", b"\xff", b"="]
    taken = 0
    for _ in range(3000):
        fields = []
        for _ in range(rng.randint(1, 4)):
            name = rng.choice(["From", "X-A", "dkim-signature", "X:Y", "X Y", ""])
            value = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
            fields.append((name, value, rng.random() < 0.5))
        kept = _kept(fields, [b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))])
        headers = kept.dkim_headers()
        try:
            reference = _parsed_from_message(kept)
        except dkim.MessageFormatError:
            assert headers is None
            continue
        if headers is not None:
            taken += 1
            assert (headers, kept.body_bytes()) == reference, fields
    assert taken > 200    # not a test of the fallback alone


# --- faults and input pymilter cannot decode -------------------------------------

def test_a_fault_in_a_no_reply_callback_defers_the_mail_not_accepts_it(session, monkeypatch,
                                                                       caplog):
    # pymilter's exception policy is CONTINUE (policyd/milter/server.py): a callback of
    # ours that raised would otherwise let the message through unchecked.
    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(protocol, "names_from_macros", broken)
    s = session()
    with caplog.at_level(logging.ERROR, "policyd"):
        assert s.connect("198.51.100.10", "helo.other.example") == Milter.CONTINUE
        assert s.envelope("a@other.example") == Milter.TEMPFAIL
    assert s.ctx._reply == ("451", "4.3.0", "Temporary local problem, try again later")
    assert "failed in its connect callback" in caplog.text


def test_undecodable_input_goes_where_the_session_state_says(session, caplog):
    s = session()
    s.connect("198.51.100.10", "helo.other.example")
    milter = s.milter
    with caplog.at_level(logging.WARNING, "policyd"):
        protocol.report_callback_error(UnicodeDecodeError, UnicodeDecodeError(
            "utf-8", b"h\xe9lo.example", 1, 2, "invalid"), None)
    assert milter.helo == "h\udce9lo.example"
    assert "HELO name is not UTF-8" in caplog.text


def test_after_an_undecodable_connect_an_undecodable_helo_is_the_helo(caplog):
    milter = PolicyMilter(make_engine())   # the session of this thread, as at negotiation
    with caplog.at_level(logging.WARNING, "policyd"):
        for raw in (b"h\xff.example", b"helo\xff.example"):
            protocol.report_callback_error(UnicodeDecodeError, UnicodeDecodeError(
                "utf-8", raw, 1, 2, "invalid"), None)
    assert caplog.text.count("the host name is not UTF-8") == 1
    assert milter.helo == "helo\udcff.example"


# --- relay checks and limits: each recipient decided -----------------------------

RELAY_YAML = """
relay:
  enabled: true
  local_domains: [own.example]
  networks: [10.20.0.0/16]
  require_tls: true
  senders: [{login: alice, addresses: [alice@own.example]}]
limits:
  enabled: true
  per_user: {messages: 1, recipients: 3}
"""


def test_each_recipient_is_decided_for_relaying(session, caplog):
    s = session(make_engine(RELAY_YAML))
    s.connect("198.51.100.10", "helo.other.example")
    with caplog.at_level(logging.INFO, "policyd"):
        assert s.envelope("a@include.example", "postmaster@own.example") == Milter.CONTINUE
        # The first recipient was local and accepted; a second one elsewhere
        # is relaying, and the stranger may not.
        assert s.ctx._envrcpt("<x@target.example>") == Milter.REJECT
        assert s.ctx._reply == ("554", "5.7.1", "Relay access denied")
        assert s.ctx._envrcpt("<relaytest%target.example@own.example>") == Milter.REJECT
        assert s.ctx._envrcpt('<"relaytest@target.example"@own.example>') == Milter.REJECT
    lines = [r.getMessage() for r in caplog.records if "action=" in r.getMessage()]
    assert len(lines) == 3 and all("rule=relay.denied" in line for line in lines)
    assert "rcpt=x@target.example relay=none" in lines[0]


def test_relay_login_tls_ownership_and_limits(session):
    engine = make_engine(RELAY_YAML)
    macros = {"{auth_authen}": "alice", "{tls_version}": "TLSv1.3",
              "{cipher}": "TLS_AES_128_GCM_SHA256"}
    s = session(engine, macros)
    s.connect("198.51.100.99", "laptop")
    assert s.envelope("alice@own.example", "a@t.example", "b@t.example",
                      "c@t.example") == Milter.CONTINUE
    assert s.milter.message.envelope.relay.authorized_by == "sasl"
    assert s.ctx._envrcpt("<d@t.example>") == Milter.TEMPFAIL   # 4th recipient of 3
    assert s.ctx._reply[:2] == ("452", "4.7.1")
    assert "try again in" in s.ctx._reply[2]
    assert s.content(message("alice@own.example")) == Milter.ACCEPT
    # A second message: messages per_user is 1.
    assert s.envelope("alice@own.example", "e@t.example") == Milter.TEMPFAIL
    other = session(engine, macros)
    other.connect("198.51.100.99", "laptop")
    assert other.envelope("bob@own.example", "a@t.example") == Milter.REJECT
    assert other.ctx._reply == ("553", "5.7.1", "Sender address rejected: not owned by user alice")
    plain = session(engine, {"{auth_authen}": "alice"})
    plain.connect("198.51.100.99", "laptop")
    assert plain.envelope("alice@own.example", "a@t.example") == Milter.REJECT
    assert plain.ctx._reply[:2] == ("554", "5.7.10")
