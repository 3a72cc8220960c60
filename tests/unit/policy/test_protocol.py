"""The policy codec: bytes -> requests -> Request, Decision -> action -> bytes."""
import ipaddress

import pytest

from policyd.model import Action, Decision, Header, Reply, Request
from policyd.policy.protocol import (ProtocolError, RequestReader, encode_reply,
                                     reply_for, request_from_attributes)

# What Postfix 3.7 sends at RCPT (SMTPD_POLICY_README), trimmed of TLS.
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"client_address=2001:db8:6::25\n"
    b"client_name=mail6.other.example\n"
    b"client_port=50123\n"
    b"reverse_client_name=mail6.other.example\n"
    b"server_address=2001:db8::1\n"
    b"server_port=25\n"
    b"helo_name=mail6.other.example\n"
    b"sender=alice@other.example\n"
    b"recipient=bob@own.example\n"
    b"recipient_count=0\n"
    b"queue_id=\n"
    b"instance=3f1a.6563b2c1.9d4e2.0\n"
    b"size=1234\n"
    b"etrn_domain=\n"
    b"stress=\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"sasl_sender=\n"
    b"ccert_subject=\n"
    b"policy_context=\n"
    b"\n"
)

LIMITS = dict(max_line_length=64, max_attributes=30, max_request_size=1024)


def read_in_chunks(data: bytes, size: int, **limits):
    """Feeds data `size` bytes at a time; returns (requests, error or None)."""
    reader = RequestReader(**(limits or LIMITS))
    requests = []
    try:
        for start in range(0, len(data), size):
            requests += reader.feed(data[start:start + size])
    except ProtocolError as error:
        return requests, str(error)
    if reader.error is not None:
        return requests, str(reader.error)
    return requests, None


CHUNK_SIZES = [1, 2, 7, 64, 10 ** 6]


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_postfix_request_parses_the_same_in_any_chunking(size):
    requests, error = read_in_chunks(POSTFIX_REQUEST * 3, size)
    assert error is None
    assert len(requests) == 3
    first = requests[0]
    assert first["request"] == "smtpd_access_policy"
    assert first["client_address"] == "2001:db8:6::25"
    assert first["queue_id"] == ""
    assert first["instance"] == "3f1a.6563b2c1.9d4e2.0"
    assert len(first) == 23
    assert requests[0] == requests[1] == requests[2]


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_crlf_is_tolerated(size):
    requests, error = read_in_chunks(POSTFIX_REQUEST.replace(b"\n", b"\r\n"), size)
    assert error is None
    assert requests == read_in_chunks(POSTFIX_REQUEST, 10 ** 6)[0]


def test_partial_request_is_held_until_the_empty_line():
    reader = RequestReader(**LIMITS)
    assert reader.feed(POSTFIX_REQUEST[:-1]) == []
    assert reader.pending
    assert len(reader.feed(b"\n")) == 1
    assert not reader.pending


def test_value_keeps_equals_signs_and_spaces():
    requests, _ = read_in_chunks(b"ccert_subject=CN=a b=c \nx=\n\n", 3)
    assert requests == [{"ccert_subject": "CN=a b=c ", "x": ""}]


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_non_utf8_bytes_survive_with_surrogateescape(size):
    raw = b"sender=j\xf6rg@other.example\nhelo_name=\xff\xfe\n\n"
    requests, error = read_in_chunks(raw, size)
    assert error is None
    sender = requests[0]["sender"]
    assert sender == "j\udcf6rg@other.example"
    assert sender.encode("utf-8", "surrogateescape") == b"j\xf6rg@other.example"
    assert requests[0]["helo_name"].encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_utf8_values_decode_as_text():
    requests, _ = read_in_chunks("sender=jörg@bücher.example\n\n".encode(), 1)
    assert requests[0]["sender"] == "jörg@bücher.example"


# --- limits ------------------------------------------------------------------

@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_line_of_exactly_the_limit_passes(size):
    line = b"sender=" + b"a" * (64 - len("sender="))
    requests, error = read_in_chunks(line + b"\r\n\n", size)
    assert error is None
    assert len(requests[0]["sender"]) == 64 - len("sender=")


def test_long_line_fails_before_its_newline_arrives():
    reader = RequestReader(**LIMITS)
    reader.feed(b"sender=" + b"a" * (64 - len("sender=")))
    with pytest.raises(ProtocolError, match="line longer than 64 octets"):
        reader.feed(b"a")


def test_long_line_message_quotes_only_a_little():
    with pytest.raises(ProtocolError) as caught:
        RequestReader(max_line_length=5000, max_attributes=10,
                      max_request_size=100000).feed(b"x" * 5001)
    assert len(str(caught.value)) < 120


def test_cr_pending_at_the_limit_is_not_yet_too_long():
    reader = RequestReader(**LIMITS)
    assert reader.feed(b"a=" + b"b" * 62 + b"\r") == []
    assert reader.feed(b"\n\n") == [{"a": "b" * 62}]


def test_too_many_attributes():
    data = b"".join(b"a%d=1\n" % i for i in range(31)) + b"\n"
    requests, error = read_in_chunks(data, 7)
    assert requests == []
    assert error == "more than 30 attributes in one request"
    assert read_in_chunks(b"".join(b"a%d=1\n" % i for i in range(30)) + b"\n", 7)[1] is None


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_request_too_big_even_without_the_empty_line(size):
    limits = dict(max_line_length=100, max_attributes=1000, max_request_size=200)
    data = b"".join(b"name%02d=%s\n" % (i, b"v" * 40) for i in range(5))
    requests, error = read_in_chunks(data, size, **limits)
    assert requests == []
    assert error == "request larger than 200 octets"


def test_request_of_exactly_the_size_limit_passes():
    data = b"a=" + b"b" * 96 + b"\n\n"          # 100 octets, both LFs counted
    limits = dict(max_line_length=100, max_attributes=10, max_request_size=100)
    assert read_in_chunks(data, 1, **limits)[1] is None
    limits["max_request_size"] = 99
    assert read_in_chunks(data, 1, **limits)[1] == "request larger than 99 octets"


@pytest.mark.parametrize("line, message", [
    (b"garbage", "line without '='"),
    (b"=value", "attribute without a name"),
])
def test_malformed_line(line, message):
    requests, error = read_in_chunks(b"request=smtpd_access_policy\n" + line + b"\n\n", 1)
    assert requests == []
    assert error.startswith(message)


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_good_request_before_garbage_is_returned_then_the_error(size):
    requests, error = read_in_chunks(POSTFIX_REQUEST + b"garbage\n", size)
    assert len(requests) == 1
    assert error.startswith("line without '='")


def test_reader_is_spent_after_an_error():
    reader = RequestReader(**LIMITS)
    assert len(reader.feed(POSTFIX_REQUEST + b"bad\n")) == 1
    with pytest.raises(ProtocolError):
        reader.feed(POSTFIX_REQUEST)


# --- request_from_attributes -------------------------------------------------

def attributes(**changes):
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "client_address": "198.51.100.10", "helo_name": "helo.other.example",
            "sender": "a@other.example", "recipient": "b@own.example",
            "queue_id": "4XyZ1", "instance": "1.2.3.0", "sasl_username": "",
            "client_name": "helo.other.example",
            "reverse_client_name": "helo.other.example"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_request_maps_every_field():
    request = request_from_attributes(attributes(
        sasl_username="joe", encryption_protocol="TLSv1.3",
        encryption_cipher="TLS_AES_256_GCM_SHA384", ccert_fingerprint="AB:CD",
        ccert_pubkey_fingerprint="01:02"))
    assert request == Request(
        client_address=ipaddress.IPv4Address("198.51.100.10"),
        helo="helo.other.example", sender="a@other.example", recipient="b@own.example",
        queue_id="4XyZ1", instance="1.2.3.0", sasl_username="joe",
        client_name="helo.other.example", reverse_client_name="helo.other.example",
        protocol_state="RCPT", encryption_protocol="TLSv1.3",
        encryption_cipher="TLS_AES_256_GCM_SHA384", ccert_fingerprint="AB:CD",
        ccert_pubkey_fingerprint="01:02")


def test_request_of_the_postfix_sample():
    request = request_from_attributes(read_in_chunks(POSTFIX_REQUEST, 100)[0][0])
    assert request.client_address == ipaddress.IPv6Address("2001:db8:6::25")
    assert request.queue_id == ""
    assert request.sasl_username == ""


@pytest.mark.parametrize("text, expected", [
    ("2001:db8:6::25", ipaddress.IPv6Address("2001:db8:6::25")),
    ("IPv6:2001:db8:6::25", ipaddress.IPv6Address("2001:db8:6::25")),
    ("ipv6:2001:DB8:6::25", ipaddress.IPv6Address("2001:db8:6::25")),
    ("::ffff:192.168.1.10", ipaddress.IPv4Address("192.168.1.10")),
    (" 203.0.113.7 ", ipaddress.IPv4Address("203.0.113.7")),
])
def test_client_address_forms(text, expected):
    assert request_from_attributes(attributes(client_address=text)).client_address == expected


@pytest.mark.parametrize("text", ["", "unknown", "198.51.100", "IPv6:", "fe80::1%eth0",
                                  "[2001:db8::1]", "2001:db8::1/64", "\udcff"])
def test_bad_client_address(text):
    with pytest.raises(ProtocolError, match="client_address is not an IP address"):
        request_from_attributes(attributes(client_address=text))


def test_missing_client_address():
    with pytest.raises(ProtocolError, match="without client_address"):
        request_from_attributes(attributes(client_address=None))


@pytest.mark.parametrize("kind", [None, "", "junk", "SMTPD_ACCESS_POLICY"])
def test_not_a_policy_request(kind):
    with pytest.raises(ProtocolError, match="not an smtpd_access_policy request"):
        request_from_attributes(attributes(request=kind))


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), ("0", None), ("unknown", "unknown"),
    ("mail.other.example", "mail.other.example"),
])
def test_client_names_missing_or_unknown(value, expected):
    request = request_from_attributes(attributes(client_name=value, reverse_client_name=value))
    assert request.client_name == expected
    assert request.reverse_client_name == expected


def test_absent_attributes_are_empty():
    request = request_from_attributes({"request": "smtpd_access_policy",
                                       "client_address": "192.0.2.1"})
    assert (request.helo, request.sender, request.recipient, request.queue_id,
            request.instance, request.sasl_username) == ("", "", "", "", "", "")
    assert (request.encryption_protocol, request.encryption_cipher, request.ccert_fingerprint,
            request.ccert_pubkey_fingerprint) == ("", "", "", "")
    assert request.protocol_state == "RCPT"


def test_protocol_state_is_upper_case():
    assert request_from_attributes(
        attributes(protocol_state="end-of-message")).protocol_state == "END-OF-MESSAGE"


def test_non_utf8_sender_reaches_the_request_intact():
    raw = (b"request=smtpd_access_policy\nclient_address=192.0.2.1\n"
           b"sender=\xff@other.example\n\n")
    request = request_from_attributes(read_in_chunks(raw, 1)[0][0])
    assert request.sender.encode("utf-8", "surrogateescape") == b"\xff@other.example"
    assert request.sender_domain == "other.example"


# --- replies -------------------------------------------------------------------

AR = Header("Authentication-Results", "mx.own.example; spf=pass smtp.mailfrom=other.example")


def decision_for(action: Action, **changes) -> Decision:
    replies = {Action.REJECT: Reply("550", "5.7.23", "SPF fail"),
               Action.DEFER: Reply("451", "4.7.24", "SPF temporary error, try again later")}
    values = dict(action=action, reply=replies.get(action), headers=(AR,))
    values.update(changes)
    return Decision(**values)


# One expected action per Action member: a new member fails the test below
# until this table (and reply_for) know what it means.
EXPECTED_WITH_HEADER = {
    Action.ACCEPT: "PREPEND Authentication-Results: mx.own.example; "
                   "spf=pass smtp.mailfrom=other.example",
    Action.DEFER: "451 4.7.24 SPF temporary error, try again later",
    Action.REJECT: "550 5.7.23 SPF fail",
}
EXPECTED_WITHOUT_HEADER = {
    Action.ACCEPT: "DUNNO",
    Action.DEFER: "451 4.7.24 SPF temporary error, try again later",
    Action.REJECT: "550 5.7.23 SPF fail",
}


def test_every_action_has_an_expected_reply():
    assert set(EXPECTED_WITH_HEADER) == set(Action) == set(EXPECTED_WITHOUT_HEADER)


@pytest.mark.parametrize("action", list(Action))
def test_reply_for_every_action(action):
    assert reply_for(decision_for(action), AR) == EXPECTED_WITH_HEADER[action]
    assert reply_for(decision_for(action), None) == EXPECTED_WITHOUT_HEADER[action]


@pytest.mark.parametrize("reply, expected", [
    (None, "550 5.7.1 Rejected by policy"),
    (Reply("250", "2.0.0", "fine"), "550 5.7.1 Rejected by policy"),   # "250" would mean OK
    (Reply("451", "4.7.1", "x"), "550 5.7.1 Rejected by policy"),      # wrong class
    (Reply("554", "4.7.1", "mismatch"), "554 mismatch"),               # RFC 3463 §2
    (Reply("550", "", "no status"), "550 no status"),
    (Reply("550", "5.7.1", ""), "550 5.7.1"),
])
def test_reject_never_sends_a_bad_code(reply, expected):
    assert reply_for(decision_for(Action.REJECT, reply=reply), None) == expected


def test_defer_without_a_reply_is_still_temporary():
    assert reply_for(decision_for(Action.DEFER, reply=None), None).startswith("451 4.7.1 ")


def test_prepend_unfolds_a_folded_value():
    header = Header("Authentication-Results", "mx.own.example;\n\tspf=pass\r\n  iprev=pass")
    assert reply_for(decision_for(Action.ACCEPT), header) == \
        "PREPEND Authentication-Results: mx.own.example; spf=pass iprev=pass"


@pytest.mark.parametrize("name", ["", "Bad Name", "X:Y", "X\nY"])
def test_prepend_refuses_a_bad_header_name(name):
    with pytest.raises(ValueError):
        reply_for(decision_for(Action.ACCEPT), Header(name, "v"))


def test_encode_reply():
    assert encode_reply("DUNNO") == b"action=DUNNO\n\n"
    assert encode_reply("550 5.7.23 SPF fail") == b"action=550 5.7.23 SPF fail\n\n"


def test_encode_reply_refuses_an_empty_action():
    # Postfix reads an empty action as OK.
    for text in ("", " ", "\r\n"):
        with pytest.raises(ValueError):
            encode_reply(text)


def test_encode_reply_replaces_what_is_not_utf8():
    assert encode_reply("550 5.7.1 bad \udcff sender") == b"action=550 5.7.1 bad ? sender\n\n"


HOSTILE_TEXTS = ["line one\r\nline two", "bare\rcr", "bare\nlf", "nul\0byte",
                 "trailing\n", "\r\n\r\n", "ok\n\naction=OK\n\n"]


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
@pytest.mark.parametrize("action", list(Action))
def test_golden_no_reply_has_cr_or_an_embedded_newline(action, text):
    decision = decision_for(action, reply=Reply("550" if action is Action.REJECT else "451",
                                                "5.7.1" if action is Action.REJECT else "4.7.1",
                                                text))
    for header in (None, Header("Authentication-Results", text), Header("X-Policy", text)):
        wire = encode_reply(reply_for(decision, header))
        assert b"\r" not in wire
        assert b"\0" not in wire
        assert wire.count(b"\n") == 2 and wire.endswith(b"\n\n")
        # One line: whatever the text holds stays inside this action's value.
        assert wire.startswith(b"action=")
        assert len(wire.strip()) > len(b"action=")


# A whole request in one chunk takes a faster path than one that arrives
# in pieces; both must read every input the same, errors included.
EDGE_INPUTS = [
    POSTFIX_REQUEST * 3,
    b"a=" + b"x" * 62 + b"\n\n",                   # a line of exactly the limit
    b"a=" + b"x" * 63 + b"\n\n",                   # one octet over
    b"".join(b"k%d=v\n" % i for i in range(30)) + b"\n",   # exactly max_attributes
    b"".join(b"k%d=v\n" % i for i in range(31)) + b"\n",   # one more
    b"".join(b"k%02d=" % i + b"v" * 58 + b"\n" for i in range(16)) + b"\n",   # size limit
    b"a=1\n=2\n\n",                                # attribute without a name
    b"a=1\nb\n\n",                                 # line without '='
    b"a=1\r\nb=2\r\n\r\n",                         # CRLF
    b"a=1\nb=2\r\n\n",                             # one CR
    b"a=1\na=2\n\n",                               # the last of a name wins
    b"\n",                                         # an empty request
    b"\n\na=1\n\n",
    b"a=\xff\xfe\n\n",                             # not UTF-8
    b"a=1\n\nb=2\n",                               # a request, then half of one
]


@pytest.mark.parametrize("data", EDGE_INPUTS)
def test_whole_and_piecemeal_reading_agree(data):
    assert read_in_chunks(data, 10 ** 6) == read_in_chunks(data, 1)
