"""A small DNS message codec without I/O for the common case of a cache
miss: plain questions (query_wire) and ordinary answers (parse_response)
in a few microseconds, where dnspython took most of a miss's CPU (the
figures: bench/README.md, "Why the code is as it is").  Anything else is
None, for the caller to hand to dnspython.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, cast

import dns.ipv6

# RFC 6891 §6.2.5 / DNS flag day 2020: 1232 octets avoids fragmentation.
EDNS_PAYLOAD = 1232

# RFC 1035 §3.2.2, §3.2.4; RFC 3596 (AAAA); RFC 4034 §3 (RRSIG); RFC 6891
# §6.1.1 (OPT); RFC 7208 §3.1 (SPF, type 99).
A, CNAME, SOA, PTR, MX, TXT, AAAA, OPT, RRSIG, SPF = 1, 5, 6, 12, 15, 16, 28, 41, 46, 99
IN = 1
# The question types whose answers parse_response converts, by the names
# dnspython and policyd give them.
TYPES = {"A": A, "AAAA": AAAA, "MX": MX, "TXT": TXT, "SPF": SPF, "PTR": PTR, "CNAME": CNAME}

# RFC 1035 §4.1.1 header flags; AD is RFC 4035 §3.2.3.
QR, OPCODE, TC, RD, AD = 0x8000, 0x7800, 0x0200, 0x0100, 0x0020
NOERROR, NXDOMAIN = 0, 3
DO = 0x8000   # RFC 3225 §3: in the OPT record's TTL field

# dnspython's limits: dns.message.MAX_CHAIN CNAMEs, dns.ttl.MAX_TTL (RFC
# 2181 §8: a TTL above it counts as 0), dns.name.MAX_COMPRESSION_POINTER_CHAIN.
MAX_CHAIN = 16
MAX_TTL = 2**31 - 1
MAX_POINTERS = 16
# RFC 1035 §2.3.4: 255 octets in a name, 63 in a label.
MAX_NAME, MAX_LABEL = 255, 63

_HEADER = struct.Struct("!HHHHHH")
_QUESTION = struct.Struct("!HH")
_RR = struct.Struct("!HHIH")
_SOA_NUMBERS = struct.Struct("!IIIII")
_RRSIG_FIXED = struct.Struct("!HBBIIIH")

# The OPT record of every query (RFC 6891 §6.1.2): root owner, our
# payload as its class, extended RCODE 0, version 0, DO, no options.
_OPT_RECORD = b"\x00" + _RR.pack(OPT, EDNS_PAYLOAD, DO, 0)
_QUERY_TAIL = _QUESTION.size + len(_OPT_RECORD)

# Octets dnspython writes as they are in a name's text; it escapes the
# others (\DDD) and these: "().;\@$.  A name with any other octet is left
# to dnspython, in questions as in answers.
_PLAIN = bytes(c for c in range(0x21, 0x7F) if c not in b'"().;\\@$')

# Types of which an RRset holds one record: dnspython keeps the last
# (dns.rdatatype.is_singleton).
_SINGLETONS = (CNAME, SOA)


@dataclass(frozen=True)
class Answer:
    """What policyd takes from a response, whoever parsed it.

    records: the answer after the CNAME chain, converted as
    policyd.dns._value does; empty when there is none (NXDOMAIN, NODATA,
    a CNAME to nowhere).  ttl: the smallest TTL along the chain, when
    there are records, else 0.  negative_ttl: RFC 2308 §5, min(TTL,
    MINIMUM) of the first SOA in the authority section; None without one.
    """
    rcode: int
    flags: int
    records: tuple = ()
    ttl: int = 0
    negative_ttl: int | None = None


class _Unhandled(Exception):
    """Not the common case: dnspython is to have it."""


# This module only handles the common case.  query_wire and parse_response
# return None for anything else (a name with escapes or odd characters,
# truncation, an unknown record type, a CNAME loop, an answer whose names
# dnspython would escape, any malformation) and the caller hands that to
# dnspython, which then decides exactly as before: it parses, raises or
# drops.  So where this module answers, it must answer what dnspython
# (2.3) would; where in doubt it says None.
def query_wire(name: str, rdtype: int, query_id: int) -> bytes | None:
    """dnspython's `make_query(name, rdtype, want_dnssec=True,
    payload=EDNS_PAYLOAD)` with flags RD|AD and query_id, as bytes; None
    for a name that is not plain.  Names are absolute with or without
    the final dot, as `dns.name.from_text` makes them.

    The message format is RFC 1035 §4.1; the OPT record RFC 6891 §6.1;
    the DO bit RFC 3225 §3; AD in queries RFC 6840 §5.7."""
    qname = _name_wire(name)
    if qname is None:
        return None
    return (_HEADER.pack(query_id, RD | AD, 1, 0, 0, 1) + qname
            + _QUESTION.pack(rdtype, IN) + _OPT_RECORD)


def question_name(query: bytes) -> bytes:
    """The QNAME of a query from query_wire (or the same query from
    dnspython), as parse_response wants it."""
    return query[_HEADER.size:-_QUERY_TAIL]


def _name_wire(name: str) -> bytes | None:
    if not name.isascii():
        return None   # IDNA: dnspython's
    text = name.encode("ascii")
    if text.endswith(b"."):
        text = text[:-1]
    wire = bytearray()
    for label in text.split(b"."):
        # An empty label, a long one, an escape or "@": dnspython's errors
        # and rules.
        if not 0 < len(label) <= MAX_LABEL or label.translate(None, _PLAIN):
            return None
        wire.append(len(label))
        wire += label
    wire.append(0)
    return bytes(wire) if len(wire) <= MAX_NAME else None


def parse_response(datagram: bytes, query_id: int, qname_wire: bytes,
                   qtype: int) -> Answer | None:
    """The answer in datagram to our question, or None: not one this
    module handles, including one that is not an answer to it at all.
    The message format is RFC 1035 §4.1, name compression §4.1.4."""
    try:
        return _parse(datagram, query_id, qname_wire, qtype)
    except (_Unhandled, IndexError, struct.error):
        # IndexError, struct.error: a bounds check missed here must cost
        # speed, not the answer.
        return None


class _RRset:
    """The records of one owner and type in the answer section, grouped as
    dnspython groups them: TTL the smallest, duplicates dropped."""
    __slots__ = ("ttl", "rdatas")

    def __init__(self, ttl: int, rdatas: dict):
        self.ttl = ttl
        self.rdatas = rdatas   # canonical form (RFC 4034 §6.2) -> parsed rdata


def _parse(wire: bytes, query_id: int, qname_wire: bytes, qtype: int) -> Answer | None:
    end = len(wire)
    if end < _HEADER.size:
        return None
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    # A response (QR) to our standard query (opcode 0) with our ID and one
    # question; a truncated one (TC) goes to dnspython, which raises
    # Truncated for the retry over TCP.
    if ident != query_id or flags & (QR | OPCODE | TC) != QR or qdcount != 1:
        return None
    qname, pos = _name(wire, _HEADER.size, end)
    if pos + _QUESTION.size > end or _QUESTION.unpack_from(wire, pos) != (qtype, IN):
        return None
    if qname.lower() != qname_wire.lower():   # RFC 4343: case does not matter
        return None
    pos += _QUESTION.size
    answer: dict[tuple[bytes, int], _RRset] = {}
    soa_owner, soa_ttl, soa_minimum = None, MAX_TTL, 0
    opt = False
    for section, count in enumerate((ancount, nscount, arcount)):
        for _ in range(count):
            owner, pos = _name(wire, pos, end)
            if pos + _RR.size > end:
                raise _Unhandled
            rdtype, rdclass, ttl, rdlength = _RR.unpack_from(wire, pos)
            pos += _RR.size
            stop = pos + rdlength
            if stop > end:
                raise _Unhandled
            if rdtype == OPT:
                # dnspython's BadEDNS: one OPT, in the additional section,
                # owned by the root.  An extended RCODE or another EDNS
                # version (RFC 6891 §6.1.3) is for dnspython to read.
                if section != 2 or opt or owner != b"\x00" or ttl >> 16:
                    raise _Unhandled
                _options(wire, pos, stop)
                opt = True
                pos = stop
                continue
            if rdclass != IN:
                raise _Unhandled   # another class's rdata can differ (CH A)
            if ttl > MAX_TTL:
                ttl = 0
            rdata = _rdata(wire, pos, stop, rdtype)
            pos = stop
            if section == 0 and rdtype != RRSIG:
                # RRSIGs are grouped by the type they cover, so never in
                # the way of the chain; nothing of them is used.
                key = (owner.lower(), rdtype)
                rrset = answer.get(key)
                if rrset is None:
                    answer[key] = _RRset(ttl, {rdata[0]: rdata[1]})
                else:
                    rrset.ttl = min(rrset.ttl, ttl)
                    if rdtype in _SINGLETONS:
                        rrset.rdatas = {rdata[0]: rdata[1]}
                    else:
                        rrset.rdatas.setdefault(rdata[0], rdata[1])
            elif section == 1 and rdtype == SOA:
                # The first SOA RRset of the section is the one that
                # counts; a later SOA of its owner replaces its record.
                if soa_owner is None:
                    soa_owner = owner.lower()
                if owner.lower() == soa_owner:
                    # An SOA's rdata is (its form, MINIMUM), by _rdata.
                    soa_ttl, soa_minimum = min(soa_ttl, ttl), cast(int, rdata[1])
    if pos != end:
        return None   # dnspython's TrailingJunk
    rcode = flags & 0xF
    negative_ttl = None if soa_owner is None else min(soa_ttl, soa_minimum)
    if rcode not in (NOERROR, NXDOMAIN):
        return Answer(rcode, flags, negative_ttl=negative_ttl)
    # dns.message.Message.resolve_chaining: follow CNAMEs from the question
    # name, at most MAX_CHAIN of them, each to its (only) target.
    name, min_ttl, found, hops = qname.lower(), MAX_TTL, None, 0
    while hops < MAX_CHAIN:
        found = answer.get((name, qtype))
        if found is not None:
            min_ttl = min(min_ttl, found.ttl)
            break
        cname = answer.get((name, CNAME)) if qtype != CNAME else None
        if cname is None:
            break
        min_ttl = min(min_ttl, cname.ttl)
        name = next(iter(cname.rdatas.values())).lower()
        hops += 1
    # dnspython's ChainTooLong and AnswerForNXDOMAIN: its errors to raise.
    if hops >= MAX_CHAIN or found is not None and rcode == NXDOMAIN:
        return None
    if found is None:
        return Answer(rcode, flags, negative_ttl=negative_ttl)
    convert = _VALUES.get(qtype)
    if convert is None:
        return None
    records = tuple(convert(rdata) for rdata in found.rdatas.values())
    if None in records:
        return None
    return Answer(rcode, flags, records, min_ttl, negative_ttl)


def _name(wire: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """The name at pos, uncompressed, and the offset after it.

    RFC 1035 §4.1.4 pointers, under dnspython's rules: each must point
    before the previous one (the first before the name), at most
    MAX_POINTERS of them.  Stricter than dnspython, what a pointer leads
    to must end before the name starts: a name an earlier one overlaps
    is left to it.
    """
    start = limit = pos
    labels = []
    after = hops = 0
    while True:
        if pos >= end:
            raise _Unhandled
        length = wire[pos]
        if length == 0:
            break
        if length <= MAX_LABEL:
            stop = pos + 1 + length
            if stop > end:
                raise _Unhandled
            labels.append(wire[pos:stop])
            pos = stop
        elif length >= 0xC0 and pos + 1 < end:
            target = (length & 0x3F) << 8 | wire[pos + 1]
            hops += 1
            if target >= limit or hops > MAX_POINTERS:
                raise _Unhandled
            if not after:
                after, end = pos + 2, start
            limit = pos = target
        else:
            raise _Unhandled   # RFC 6891 §5: extended label types are gone
    labels.append(b"\x00")
    name = b"".join(labels)
    if len(name) > MAX_NAME:
        raise _Unhandled
    return name, after or pos + 1


def _options(wire: bytes, pos: int, stop: int) -> None:
    """RFC 6891 §6.1.2: the OPT RDATA is {code, length, data} options."""
    while pos < stop:
        if pos + 4 > stop:
            raise _Unhandled
        code, length = _QUESTION.unpack_from(wire, pos)
        pos += 4 + length
        # Client subnet (RFC 7871) and extended errors (RFC 8914):
        # dnspython parses their data, and may refuse it.
        if pos > stop or code in (8, 15):
            raise _Unhandled


def _rdata(wire: bytes, pos: int, stop: int, rdtype: int) -> tuple[bytes, object]:
    """One record's data, parsed, with the form dnspython compares records
    by (RFC 4034 §6.2: names in lower case)."""
    if rdtype == A or rdtype == AAAA:
        if stop - pos != (4 if rdtype == A else 16):
            raise _Unhandled
        data = wire[pos:stop]
        return data, data
    if rdtype == TXT or rdtype == SPF:
        strings, begin = [], pos
        while pos < stop:
            length = wire[pos]
            pos += 1 + length
            if pos > stop:
                raise _Unhandled
            strings.append(wire[pos - length:pos])
        if not strings:
            raise _Unhandled   # newer dnspython refuses an empty TXT
        return wire[begin:stop], tuple(strings)
    if rdtype == MX:
        if pos + 2 > stop:
            raise _Unhandled
        exchange, after = _name(wire, pos + 2, stop)
        if after != stop:
            raise _Unhandled
        return wire[pos:pos + 2] + exchange.lower(), (wire[pos] << 8 | wire[pos + 1], exchange)
    if rdtype in (CNAME, PTR):
        target, after = _name(wire, pos, stop)
        if after != stop:
            raise _Unhandled
        return target.lower(), target
    if rdtype == SOA:
        mname, pos = _name(wire, pos, stop)
        rname, pos = _name(wire, pos, stop)
        if stop - pos != _SOA_NUMBERS.size:
            raise _Unhandled
        serial, *times = _SOA_NUMBERS.unpack_from(wire, pos)
        if max(times) > MAX_TTL:
            raise _Unhandled   # dnspython refuses REFRESH..MINIMUM as TTLs
        return mname.lower() + rname.lower() + wire[pos:stop], times[-1]
    if rdtype == RRSIG:
        # As dnspython reads it: the fixed fields, the signer, the rest is
        # the signature (RFC 4034 §3.1).
        if pos + _RRSIG_FIXED.size > stop:
            raise _Unhandled
        if _RRSIG_FIXED.unpack_from(wire, pos)[3] > MAX_TTL:
            raise _Unhandled   # the original TTL
        _name(wire, pos + _RRSIG_FIXED.size, stop)
        return b"", None
    raise _Unhandled


def _text(name: bytes) -> str | None:
    """dnspython's `to_text(omit_final_dot=True)`, for names it writes
    without escapes; None for the others."""
    if name == b"\x00":
        return "."
    labels, pos = [], 0
    while name[pos]:
        label = name[pos + 1:pos + 1 + name[pos]]
        if label.translate(None, _PLAIN):
            return None
        labels.append(label)
        pos += 1 + name[pos]
    return b".".join(labels).decode("ascii")


def _mx(rdata: tuple[int, bytes]) -> tuple[int, str] | None:
    exchange = _text(rdata[1])
    return None if exchange is None else (rdata[0], exchange)


_VALUES: dict[int, Callable[[Any], Any]] = {
    A: lambda address: "%d.%d.%d.%d" % tuple(address),
    AAAA: dns.ipv6.inet_ntoa,
    MX: _mx,
    TXT: lambda strings: strings,
    SPF: lambda strings: strings,
    PTR: _text,
    CNAME: _text,
}
