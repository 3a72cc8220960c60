"""policyd.dnswire, the fast codec, held to dnspython: the query bytes are
dnspython's, and every response it reads, it reads as the dnspython path
of policyd.dns does (or leaves it to that path: None).  No network.
"""
from __future__ import annotations

import random
import struct

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from policyd import dnswire
from policyd.dns import _from_message, _Unusable, _value
from policyd.dnswire import Answer

QUERY_ID = 0x4A4A


def dnspython_query(name: str, rdtype: int | str, query_id: int = QUERY_ID) -> dns.message.Message:
    """The query policyd made with dnspython before dnswire (and still
    makes for the names dnswire leaves alone)."""
    query = dns.message.make_query(name, rdtype, want_dnssec=True, payload=dnswire.EDNS_PAYLOAD)
    query.flags = dns.flags.RD | dns.flags.AD
    query.id = query_id
    return query


def dnspython_answer(datagram: bytes, query: dns.message.Message, rdtype: str) -> Answer | None:
    """What the dnspython path makes of datagram: from_wire, is_response,
    resolve_chaining and policyd's conversion (`_value`); None where it
    drops the datagram (not DNS, not the answer, TC) or cannot follow the
    CNAME chain.  Written out here, apart from policyd.dns, as the reference."""
    try:
        response = dns.message.from_wire(datagram, raise_on_truncation=True)
    except Exception:
        return None
    if not query.is_response(response):
        return None
    records, ttl = (), 0
    if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        try:
            chain = response.resolve_chaining()
        except Exception:
            return None
        if chain.answer is not None:
            records = tuple(_value(rdtype, rdata) for rdata in chain.answer)
            ttl = chain.minimum_ttl
    negative_ttl = next((min(rrset.ttl, rrset[0].minimum) for rrset in response.authority
                         if rrset.rdtype == dns.rdatatype.SOA), None)
    return Answer(int(response.rcode()), int(response.flags), records, ttl, negative_ttl)


def fast_answer(datagram: bytes, name: str, rdtype: str) -> Answer | None:
    query = dnswire.query_wire(name, dnswire.TYPES.get(rdtype) or dns.rdatatype.from_text(rdtype),
                               QUERY_ID)
    return dnswire.parse_response(datagram, QUERY_ID, dnswire.question_name(query),
                                  dns.rdatatype.from_text(rdtype))


def same_as_dnspython(datagram: bytes, name: str, rdtype: str) -> Answer | None:
    """The fast reading, after checking it against dnspython's."""
    query = dnspython_query(name, rdtype)
    fast = fast_answer(datagram, name, rdtype)
    expected = dnspython_answer(datagram, query, rdtype)
    if fast is not None:
        assert fast == expected
    # policyd.dns's own dnspython path gives the same Answer.
    response = None
    try:
        response = dns.message.from_wire(datagram, raise_on_truncation=True)
    except Exception:
        pass
    if response is not None and query.is_response(response):
        try:
            assert _from_message(response, rdtype) == expected
        except _Unusable:
            assert expected is None
    return fast


def response(name: str, rdtype: str, answer=(), authority=(), additional=(),
             rcode: int = dns.rcode.NOERROR, edns: int = 0, options=(), **changes) -> bytes:
    """A response to our query built by dnspython; records are zone-file
    lines, each its own RRset in the message (so duplicates and case
    variants arrive as separate records).  changes set message attributes."""
    message = dns.message.make_response(dnspython_query(name, rdtype))
    message.use_edns(edns, dns.flags.DO, 1232, options=list(options))
    message.set_rcode(rcode)
    for section, lines in ((message.answer, answer), (message.authority, authority),
                           (message.additional, additional)):
        for line in lines:
            owner, ttl, rdclass, type_text, text = line.split(None, 4)
            section.append(dns.rrset.from_text(owner, int(ttl), rdclass, type_text, text))
    for attribute, value in changes.items():
        setattr(message, attribute, value)
    return message.to_wire()


# --- queries ----------------------------------------------------------------

PLAIN_NAMES = [
    "a.example", "a.example.", "Own.Example", "own.example.", "_spf.google.com",
    "10.100.51.198.in-addr.arpa",
    "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
    "*.wild.example", "a-b.c_d.example", "x" * 63 + ".example", "!#%&'*+,-/:<=>?[]^`{|}~.example",
    ".".join(["a" * 63] * 3) + "." + "b" * 61,    # 255 octets on the wire
    "com", "x",
]
ODD_NAMES = [
    "", ".", "@", "a..example", ".a.example", "a.example..", "x" * 64 + ".example",
    ".".join(["a" * 63] * 3) + "." + "b" * 62,    # 256 octets
    "é.example", "xn--caf-dma.example\u3002", "a\\.b.example", "a\\065.example", "a b.example",
    "a(b).example", "a;b.example", "a$b.example", 'a"b.example', "a@b.example", "a\tb.example",
]


@pytest.mark.parametrize("name", PLAIN_NAMES)
@pytest.mark.parametrize("rdtype", ["A", "AAAA", "MX", "TXT", "SPF", "PTR", "CNAME", "SOA", "NS"])
def test_query_bytes_are_dnspythons(name, rdtype):
    for query_id in (0, 1, QUERY_ID, 0xFFFF):
        wire = dnswire.query_wire(name, dns.rdatatype.from_text(rdtype), query_id)
        assert wire == dnspython_query(name, rdtype, query_id).to_wire()
        assert dnswire.question_name(wire) == dns.name.from_text(name).to_wire()


@pytest.mark.parametrize("name", ODD_NAMES)
def test_names_that_are_not_plain_are_left_to_dnspython(name):
    assert dnswire.query_wire(name, dnswire.TXT, QUERY_ID) is None


# --- responses: the same reading as dnspython's ------------------------------

CNAME_CHAIN = [f"c{i}.example. {300 - i} IN CNAME c{i + 1}.example." for i in range(20)]
SOA = "example. 3600 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 300"
RRSIG = ("{} 60 IN RRSIG {} 13 2 60 20300101000000 20200101000000 12345 example. "
         "dGhlIHNpZ25hdHVyZSBpcyBub3QgY2hlY2tlZCBoZXJl")
ECS = dns.edns.ECSOption("192.0.2.0", 24)
NSID = dns.edns.GenericOption(dns.edns.NSID, b"ns1")

# (question name, type, response settings, whether dnswire reads it itself)
CASES = {
    "A": ("a.example", "A", dict(answer=["a.example. 60 IN A 192.0.2.1",
                                         "a.example. 60 IN A 192.0.2.2"]), True),
    "AAAA forms": ("a.example", "AAAA", dict(answer=[
        f"a.example. 60 IN AAAA {address}" for address in (
            "2001:db8::1", "::ffff:1.2.3.4", "::1.2.3.4", "::", "::1", "2001:db8:0:0:1:0:0:1",
            "fe80::1:0:0:0", "2001:db8:1:2:3:4:5:6", "0:0:1::")]), True),
    "MX": ("own.example", "MX", dict(answer=["own.example. 60 IN MX 10 mx.own.example.",
                                             "own.example. 60 IN MX 20 MX2.Own.Example."]), True),
    "null MX": ("own.example", "MX", dict(answer=["own.example. 60 IN MX 0 ."]), True),
    "MX to a name dnspython escapes": ("own.example", "MX", dict(answer=[
        "own.example. 60 IN MX 10 a\\(b.example."]), False),
    "TXT strings": ("own.example", "TXT", dict(answer=[
        'own.example. 60 IN TXT "v=spf1 " "ip4:192.0.2.0/24" " -all"',
        'own.example. 60 IN TXT "\\000\\255\\"\\\\ odd" ""',
        'own.example. 60 IN TXT "' + "x" * 255 + '"']), True),
    "SPF type": ("own.example", "SPF", dict(answer=['own.example. 60 IN SPF "v=spf1"']), True),
    "PTR": ("1.2.0.192.in-addr.arpa", "PTR", dict(answer=[
        "1.2.0.192.in-addr.arpa. 60 IN PTR host.example.",
        "1.2.0.192.in-addr.arpa. 60 IN PTR Other-Host.example."]), True),
    "PTR to a name with a space": ("1.2.0.192.in-addr.arpa", "PTR", dict(answer=[
        "1.2.0.192.in-addr.arpa. 60 IN PTR a\\032b.example."]), False),
    "CNAME chain": ("a.example", "A", dict(answer=[
        "a.example. 300 IN CNAME b.example.", "b.example. 60 IN CNAME C.Example.",
        "c.example. 600 IN A 192.0.2.1", "c.example. 600 IN A 192.0.2.2"]), True),
    "CNAME chain, records in reverse": ("a.example", "A", dict(answer=[
        "c.example. 600 IN A 192.0.2.1", "b.example. 60 IN CNAME c.example.",
        "a.example. 300 IN CNAME b.example."]), True),
    "CNAME question": ("a.example", "CNAME", dict(answer=[
        "a.example. 300 IN CNAME b.example.", "b.example. 60 IN CNAME c.example."]), True),
    "CNAME to nowhere": ("a.example", "A", dict(answer=["a.example. 60 IN CNAME b.example."],
                                                authority=[SOA]), True),
    "CNAME loop": ("a.example", "A", dict(answer=["a.example. 60 IN CNAME b.example.",
                                                  "b.example. 60 IN CNAME a.example."]), False),
    "chain of 15 CNAMEs": ("c0.example", "TXT", dict(answer=CNAME_CHAIN[:15] + [
        'c15.example. 60 IN TXT "end"']), True),
    "chain of 16 CNAMEs": ("c0.example", "TXT", dict(answer=CNAME_CHAIN[:16] + [
        'c16.example. 60 IN TXT "end"']), False),
    "chain of 17 CNAMEs": ("c0.example", "TXT", dict(answer=CNAME_CHAIN[:17] + [
        'c17.example. 60 IN TXT "end"']), False),
    "two CNAMEs at one name": ("a.example", "A", dict(answer=[
        "a.example. 60 IN CNAME b.example.", "a.example. 30 IN CNAME c.example.",
        "b.example. 60 IN A 192.0.2.2", "c.example. 60 IN A 192.0.2.3"]), True),
    "NXDOMAIN": ("nx.example", "TXT", dict(rcode=dns.rcode.NXDOMAIN, authority=[SOA]), True),
    "NXDOMAIN after a CNAME": ("a.example", "TXT", dict(
        rcode=dns.rcode.NXDOMAIN, answer=["a.example. 60 IN CNAME nx.example."],
        authority=[SOA]), True),
    "NXDOMAIN with an answer": ("a.example", "A", dict(
        rcode=dns.rcode.NXDOMAIN, answer=["a.example. 60 IN A 192.0.2.1"]), False),
    "NXDOMAIN without SOA": ("nx.example", "TXT", dict(rcode=dns.rcode.NXDOMAIN), True),
    "NODATA": ("a.example", "TXT", dict(authority=[SOA]), True),
    "NODATA with records of another name": ("a.example", "A", dict(
        answer=["b.example. 60 IN A 192.0.2.1"]), True),
    "two SOAs": ("a.example", "TXT", dict(authority=[
        "example. 60 IN SOA ns.example. h.example. 1 2 3 4 5",
        "Example. 30 IN SOA ns.example. h.example. 1 2 3 4 50",
        "other. 1 IN SOA ns.other. h.other. 1 2 3 4 1"]), True),
    "SOA question": ("example", "SOA", dict(answer=[SOA]), False),
    "SOA question, NODATA": ("a.example", "SOA", dict(authority=[SOA]), True),
    "RRSIG everywhere": ("a.example", "A", dict(
        answer=["a.example. 60 IN A 192.0.2.1", RRSIG.format("a.example.", "A")],
        authority=[SOA, RRSIG.format("example.", "SOA")],
        additional=[RRSIG.format("x.example.", "TXT")]), True),
    "RRSIG before its records": ("a.example", "A", dict(
        answer=[RRSIG.format("a.example.", "A"), "a.example. 60 IN A 192.0.2.1"]), True),
    "DNAME": ("a.sub.example", "A", dict(answer=[
        "sub.example. 60 IN DNAME other.example.", "a.sub.example. 60 IN CNAME a.other.example.",
        "a.other.example. 60 IN A 192.0.2.1"]), False),
    "NS in the authority section": ("a.example", "A", dict(
        answer=["a.example. 60 IN A 192.0.2.1"], authority=["example. 60 IN NS ns.example."]),
        False),
    "glue in the additional section": ("a.example", "A", dict(
        answer=["a.example. 60 IN A 192.0.2.1"],
        additional=["ns.example. 60 IN A 192.0.2.53", "ns.example. 60 IN AAAA 2001:db8::53"]),
        True),
    "duplicates": ("a.example", "A", dict(answer=[
        "a.example. 60 IN A 192.0.2.1", "a.example. 30 IN A 192.0.2.2",
        "a.example. 90 IN A 192.0.2.1"]), True),
    "MX duplicates by case": ("own.example", "MX", dict(answer=[
        "own.example. 60 IN MX 10 MX.own.example.", "own.example. 60 IN MX 10 mx.OWN.example.",
        "own.example. 60 IN MX 20 mx.own.example."]), True),
    "TXT duplicates": ("own.example", "TXT", dict(answer=[
        'own.example. 60 IN TXT "a" "b"', 'own.example. 60 IN TXT "ab"',
        'own.example. 50 IN TXT "a" "b"']), True),
    "mixed-case owners": ("a.example", "A", dict(answer=[
        "A.EXAMPLE. 60 IN A 192.0.2.1", "a.Example. 30 IN A 192.0.2.2",
        "a.example. 45 IN A 192.0.2.3"]), True),
    "compressed names everywhere": ("own.example", "MX", dict(answer=[
        "own.example. 60 IN MX 10 own.example.", "own.example. 60 IN MX 20 mx.own.example.",
        "own.example. 60 IN MX 30 a.mx.own.example."], authority=[
        "own.example. 60 IN SOA own.example. mx.own.example. 1 2 3 4 5"],
        additional=["mx.own.example. 60 IN A 192.0.2.1"]), True),
    "SERVFAIL": ("a.example", "A", dict(rcode=dns.rcode.SERVFAIL), True),
    "REFUSED": ("a.example", "A", dict(rcode=dns.rcode.REFUSED, authority=[SOA]), True),
    "YXDOMAIN": ("a.example", "A", dict(rcode=dns.rcode.YXDOMAIN), True),
    "REFUSED without question": ("a.example", "A", dict(rcode=dns.rcode.REFUSED, question=[]),
                                 False),
    "AD set": ("a.example", "A", dict(answer=["a.example. 60 IN A 192.0.2.1"],
                                      flags=dns.flags.QR | dns.flags.RD | dns.flags.RA
                                      | dns.flags.AD), True),
    "no EDNS": ("a.example", "A", dict(answer=["a.example. 60 IN A 192.0.2.1"], edns=-1), True),
    "EDNS option": ("a.example", "A", dict(answer=["a.example. 60 IN A 192.0.2.1"],
                                           options=[NSID]), True),
    "EDNS client subnet": ("a.example", "A", dict(answer=["a.example. 60 IN A 192.0.2.1"],
                                                  options=[ECS]), False),
    "EDNS version 1": ("a.example", "A", dict(answer=["a.example. 60 IN A 192.0.2.1"], edns=1),
                       False),
    "extended RCODE": ("a.example", "A", dict(rcode=dns.rcode.BADVERS), False),
    "truncated": ("a.example", "A", dict(flags=dns.flags.QR | dns.flags.TC), False),
    "not a response": ("a.example", "A", dict(flags=dns.flags.RD), False),
    "another opcode": ("a.example", "A", dict(flags=dns.flags.QR | (4 << 11)), False),
    "another ID": ("a.example", "A", dict(id=QUERY_ID ^ 1,
                                          answer=["a.example. 60 IN A 192.0.2.1"]), False),
    "another class": ("a.example", "A", dict(answer=["a.example. 60 CH A example. 1"]), False),
}


@pytest.mark.parametrize("case", CASES)
def test_responses_read_as_dnspython_reads_them(case):
    name, rdtype, settings, handled = CASES[case]
    datagram = response(name, rdtype, **settings)
    fast = same_as_dnspython(datagram, name, rdtype)
    assert (fast is not None) == handled


def test_the_question_may_differ_in_case():
    datagram = response("a.example", "A", answer=["A.EXAMPLE. 60 IN A 192.0.2.1"],
                        question=dnspython_query("A.Example", "A").question)
    assert same_as_dnspython(datagram, "a.example", "A").records == ("192.0.2.1",)


def test_another_question_is_not_the_answer():
    datagram = response("a.example", "A", answer=["a.example. 60 IN A 192.0.2.1"],
                        question=dnspython_query("b.example", "A").question)
    assert fast_answer(datagram, "a.example", "A") is None
    other_type = response("a.example", "AAAA", answer=["a.example. 60 IN A 192.0.2.1"])
    assert fast_answer(other_type, "a.example", "A") is None


def test_what_the_resolver_takes():
    datagram = response("a.example", "A", answer=[
        "a.example. 300 IN CNAME b.example.", "b.example. 60 IN A 192.0.2.1"], authority=[SOA])
    assert same_as_dnspython(datagram, "a.example", "A") == Answer(
        dns.rcode.NOERROR, dns.flags.QR | dns.flags.RD, ("192.0.2.1",), 60, 300)


# --- hand-made wire: what dnspython's builder never writes --------------------

def header(ancount=1, nscount=0, arcount=0, flags=dns.flags.QR) -> bytes:
    return struct.pack("!HHHHHH", QUERY_ID, flags, 1, ancount, nscount, arcount)


A_EXAMPLE = b"\x01a\x07example\x00"
QUESTION = A_EXAMPLE + struct.pack("!HH", dnswire.A, dnswire.IN)   # at offset 12
TTL_AND_A = struct.pack("!HHIH", dnswire.A, dnswire.IN, 60, 4) + bytes([192, 0, 2, 1])


def test_a_pointer_to_a_pointer():
    # RFC 1035 §4.1.4: the second record's owner points at the first's,
    # which points at the question name.
    first = b"\xc0\x0c" + TTL_AND_A
    second = b"\xc0" + bytes([12 + len(QUESTION)]) + TTL_AND_A[:-1] + b"\x02"
    answer = same_as_dnspython(header(2) + QUESTION + first + second, "a.example", "A")
    assert answer.records == ("192.0.2.1", "192.0.2.2")


@pytest.mark.parametrize("owner", [
    b"\xc0\x30",                  # forward, past the record
    b"\xc0\x1b",                  # to itself (the owner starts at 27)
    b"\x01a\xc0\x1b",             # to the start of its own name
    b"\x80\x0c",                  # a label type RFC 6891 §5 retired
    b"\xc0",                      # cut short
])
def test_pointers_must_point_backwards(owner):
    assert 12 + len(QUESTION) == 0x1B
    datagram = header() + QUESTION + owner + TTL_AND_A
    assert same_as_dnspython(datagram, "a.example", "A") is None


def test_a_name_longer_than_255_octets_through_pointers():
    # RFC 1035 §2.3.4: four labels of 63 point back at a.example.
    labels = b"".join(b"\x3f" + b"x" * 63 for _ in range(4))
    datagram = header() + QUESTION + labels + b"\xc0\x0c" + TTL_AND_A
    assert same_as_dnspython(datagram, "a.example", "A") is None


def test_a_ttl_past_2_to_the_31_counts_as_zero():
    # RFC 2181 §8, as dnspython reads it.
    record = (b"\xc0\x0c" + struct.pack("!HHIH", dnswire.A, dnswire.IN, 0x80000001, 4)
              + bytes([192, 0, 2, 1]))
    answer = same_as_dnspython(header() + QUESTION + record, "a.example", "A")
    assert (answer.records, answer.ttl) == (("192.0.2.1",), 0)


@pytest.mark.parametrize("rdata", [
    b"",                                                   # an empty TXT
    b"\x05abc",                                            # a string past the end
])
def test_malformed_txt(rdata):
    question = A_EXAMPLE + struct.pack("!HH", dnswire.TXT, dnswire.IN)
    record = b"\xc0\x0c" + struct.pack("!HHIH", dnswire.TXT, dnswire.IN, 60, len(rdata)) + rdata
    assert fast_answer(header() + question + record, "a.example", "TXT") is None


def test_soa_numbers_past_the_ttl_range_are_left_to_dnspython():
    soa = (b"\x00\x00" + struct.pack("!IIIII", 1, 2, 3, 4, 0x80000000))
    record = b"\x00" + struct.pack("!HHIH", dnswire.SOA, dnswire.IN, 60, len(soa)) + soa
    datagram = header(0, 1) + QUESTION + record
    assert same_as_dnspython(datagram, "a.example", "A") is None


def test_trailing_bytes_are_left_to_dnspython():
    datagram = header() + QUESTION + b"\xc0\x0c" + TTL_AND_A
    assert same_as_dnspython(datagram, "a.example", "A") is not None
    assert same_as_dnspython(datagram + b"\x00", "a.example", "A") is None


@pytest.mark.parametrize("datagram", [b"", b"\x4a", b"\x4a\x4a\x80\x00 not DNS", header()])
def test_not_a_message(datagram):
    assert same_as_dnspython(datagram, "a.example", "A") is None


# --- fuzz: damaged responses ---------------------------------------------------

def test_damaged_responses_are_dnspythons_or_left_to_it():
    # Truncations and flipped bytes of the cases above: never an exception,
    # and whatever dnswire reads, dnspython reads the same.
    rng = random.Random(20240601)
    originals = [(response(name, rdtype, **settings), name, rdtype)
                 for name, rdtype, settings, _ in CASES.values()]
    read = 0
    for number in range(6000):
        datagram, name, rdtype = rng.choice(originals)
        damaged = bytearray(datagram)
        if number % 3 == 0:
            del damaged[rng.randrange(len(damaged)):]
        for _ in range(rng.choice((1, 1, 2, 3))):
            position = rng.randrange(len(damaged)) if damaged else 0
            if damaged:
                if rng.random() < 0.3:
                    damaged[position] ^= 0x20   # case, and many flag and type bits
                else:
                    damaged[position] = rng.randrange(256)
        read += same_as_dnspython(bytes(damaged), name, rdtype) is not None
    assert read > 500   # many were left readable: the comparison was made
