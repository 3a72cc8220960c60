"""The socketmap codec: netstrings in any chunking, bounds, bad input."""
import pytest

from policyd.routing.socketmap import (NOTFOUND, NetstringReader, ProtocolError, Reply,
                                       Request, Status, encode_reply, encode_request,
                                       parse_request)


def feed(reader, data, chunk):
    out = []
    for start in range(0, len(data), chunk):
        reader.push(data[start:start + chunk])
        while (payload := reader.next()) is not None:
            out.append(payload)
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_requests_split_anywhere(chunk):
    data = (encode_request("dns-reply-filter", "mx.example. 300 IN AAAA ::1")
            + encode_request("delivery-status-filter", "2.0.0 Ok") + b"0:,")
    assert feed(NetstringReader(100), data, chunk) == [
        b"dns-reply-filter mx.example. 300 IN AAAA ::1",
        b"delivery-status-filter 2.0.0 Ok", b""]


def test_partial_request_waits():
    reader = NetstringReader(100)
    reader.push(b"12:abc")
    assert reader.next() is None and reader.pending


@pytest.mark.parametrize("data, message", [
    (b"101:", "longer than 100"),          # said by the length, before any data
    (b"1000", "longer than 100"),          # too many digits, no colon yet
    (b"99999999:", "longer than 100"),
    (b"x:ab,", "not a netstring length"),
    (b"GET / HTTP/1.0\r\n", "not a netstring length"),
    (b"-1:a,", "not a netstring length"),
    (b"01:a,", "not a netstring length"),  # netstrings have no leading zeros
    (b"3:abcd", "not ended by a comma"),
    (b":", "not a netstring length"),
])
def test_bad_input_fails_and_spends_the_reader(data, message):
    reader = NetstringReader(100)
    reader.push(data)
    with pytest.raises(ProtocolError, match=message):
        reader.next()
    with pytest.raises(ProtocolError):
        reader.next()


def test_oversized_fails_before_the_data():
    reader = NetstringReader(16384)
    reader.push(b"999999")
    with pytest.raises(ProtocolError, match="longer than 16384"):
        reader.next()


def test_parse_request():
    assert parse_request(b"dns-reply-filter a b c") == Request("dns-reply-filter", "a b c")
    assert parse_request(b"name") == Reply(Status.PERM, "expected: name key")
    assert parse_request(b" key") == Reply(Status.PERM, "expected: name key")
    assert parse_request(b"\xff key") == Reply(Status.PERM, "unknown map name")
    # Octets that are not UTF-8 in a key are replaced, never an error.
    assert parse_request(b"t 5.0.0 \xff").key == "5.0.0 \ufffd"


def test_replies():
    assert encode_reply(NOTFOUND) == b"9:NOTFOUND ,"
    assert encode_reply(Reply(Status.OK, "IGNORE")) == b"9:OK IGNORE,"
    assert encode_reply(Reply(Status.PERM, "unknown map name")) == b"21:PERM unknown map name,"
    # Nothing from a key reaches Postfix's records but printable ASCII.
    assert encode_reply(Reply(Status.OK, "4.7.1 a\r\nb\u00e9")) == b"14:OK 4.7.1 a??b?,"
