"""The socketmap server on loopback: answers, persistent connections,
pipelining, and the bounds (oversized, garbage, slow, idle, too many)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import pytest

from policyd.routing.settings import RoutingConfig
from policyd.routing.socketmap import encode_request
from policyd.routing.store import MemoryStore
from policyd.routing.server import RoutingServer
from policyd.routing.tables import Tables

GMAIL = ("5.7.1 host mx.dest.example[2001:db8::25] said: 550 5.7.1 does not meet IPv6 "
         "sending guidelines regarding PTR records (in reply to RCPT TO command)")


def serve(test, **settings):
    """Runs `test(server, connect)` against a started server."""
    config = dataclasses.replace(RoutingConfig(listen=("inet:127.0.0.1:0",)), **settings)

    async def main():
        server = RoutingServer(Tables(config, MemoryStore(100)))
        await server.start()
        host, port = server.addresses[0][len("inet:"):].rsplit(":", 1)

        async def connect():
            return await asyncio.open_connection(host, int(port))
        try:
            await asyncio.wait_for(test(server, connect), 20)
        finally:
            await server.stop()
    asyncio.run(main())


async def ask(reader, writer, name, key):
    writer.write(encode_request(name, key))
    await writer.drain()
    return await read_netstring(reader)


async def read_netstring(reader):
    length = await reader.readuntil(b":")
    data = await reader.readexactly(int(length[:-1]) + 1)
    assert data.endswith(b",")
    return data[:-1]


async def closed(reader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


def test_answers_on_one_persistent_connection():
    async def test(server, connect):
        reader, writer = await connect()
        assert await ask(reader, writer, "dns-reply-filter",
                         "mx.dest.example. 300 IN AAAA 2001:db8::25") == b"NOTFOUND "
        reply = await ask(reader, writer, "delivery-status-filter", GMAIL)
        assert reply.startswith(b"OK 4.7.1 host mx.dest.example[2001:db8::25] said: ")
        assert await ask(reader, writer, "dns-reply-filter",
                         "mx.dest.example. 300 IN AAAA 2001:db8::25") == b"OK IGNORE"
        assert await ask(reader, writer, "nosuch", "x") == b"PERM unknown map name"
        assert await ask(reader, writer, "dns-reply-filter", "") == b"PERM expected: name key"
        writer.close()
    serve(test)


def test_pipelined_requests_are_answered_in_order():
    async def test(server, connect):
        reader, writer = await connect()
        writer.write(encode_request("delivery-status-filter", GMAIL)
                     + encode_request("dns-reply-filter", "mx.dest.example. 1 IN AAAA ::1")
                     + encode_request("dns-reply-filter", "other.example. 1 IN AAAA ::1"))
        assert (await read_netstring(reader)).startswith(b"OK 4.7.1")
        assert await read_netstring(reader) == b"OK IGNORE"
        assert await read_netstring(reader) == b"NOTFOUND "
        writer.close()
    serve(test)


@pytest.mark.parametrize("data, logged", [
    (b"99999999:", "netstring longer than 16384 octets"),
    (b"GET / HTTP/1.1\r\n\r\n", "not a netstring length"),
    (b"5:abcdefg", "not ended by a comma"),
])
def test_bad_input_closes_the_connection_and_nothing_else(data, logged, caplog):
    async def test(server, connect):
        reader, writer = await connect()
        writer.write(data)
        assert await closed(reader)
        writer.close()
        # The server goes on.
        reader, writer = await connect()
        assert await ask(reader, writer, "dns-reply-filter", "a. 1 IN A 192.0.2.1") == \
            b"NOTFOUND "
        writer.close()
    with caplog.at_level(logging.WARNING, "policyd.routing"):
        serve(test)
    assert logged in caplog.text


def test_slow_request_is_cut_off(caplog):
    async def test(server, connect):
        reader, writer = await connect()
        writer.write(b"30:dns-reply-filter ")
        for _ in range(3):   # each octet would restart an idle timer
            await asyncio.sleep(0.2)
            writer.write(b"a")
        assert await closed(reader)
        writer.close()
    with caplog.at_level(logging.WARNING, "policyd.routing"):
        serve(test, request_timeout=0.5)
    assert "request not complete 0.5 s after its first octet" in caplog.text


def test_idle_connection_is_closed():
    async def test(server, connect):
        reader, writer = await connect()
        assert await ask(reader, writer, "dns-reply-filter", "a. 1 IN A 192.0.2.1")
        assert await closed(reader)
        writer.close()
    serve(test, idle_timeout=0.3)


def test_connections_beyond_the_limit_are_closed(caplog):
    async def test(server, connect):
        first = await connect()
        second = await connect()
        assert await closed(second[0])
        assert await ask(*first, "dns-reply-filter", "a. 1 IN A 192.0.2.1") == b"NOTFOUND "
        first[1].close()
        second[1].close()
    with caplog.at_level(logging.WARNING, "policyd.routing"):
        serve(test, max_connections=1)
    assert "routing.max_connections" in caplog.text


def test_stop_answers_the_request_in_flight():
    async def test(server, connect):
        reader, writer = await connect()
        writer.write(encode_request("delivery-status-filter", GMAIL))
        await writer.drain()
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(server.stop())
        assert (await read_netstring(reader)).startswith(b"OK 4.7.1")
        assert await closed(reader)
        writer.close()
        await stopping
    serve(test)


class _BoundAt:
    """A socket as warn_if_exposed sees it (tests bind loopback only)."""

    def __init__(self, family, host):
        self.family, self.host = family, host

    def getsockname(self):
        return (self.host, 10027)


@pytest.mark.parametrize("family,host,warned", [
    (socket.AF_INET, "127.0.0.1", False),
    (socket.AF_INET, "127.0.13.25", False),
    (socket.AF_INET6, "::1", False),
    (socket.AF_INET, "0.0.0.0", True),
    (socket.AF_INET6, "::", True),
    (socket.AF_INET, "192.0.2.25", True),
    (socket.AF_INET6, "fe80::1%eth0", True),
    (socket.AF_UNIX, "/var/spool/postfix/policyd/routing.sock", False),
])
def test_a_socketmap_others_can_reach_is_warned_of(caplog, family, host, warned):
    from policyd.routing.server import warn_if_exposed
    from policyd.runtime.sockets import Listener
    caplog.set_level(logging.WARNING, logger="policyd.routing")
    warn_if_exposed(Listener("inet:x:10027", [_BoundAt(family, host)]))
    messages = [record.getMessage() for record in caplog.records]
    if warned:
        assert messages == [f"routing.listen inet:x:10027: listening on {host}, which is "
                            "not loopback; whoever reaches it can teach IPv4-only routes: "
                            "listen on 127.0.0.1 (or a unix: socket) unless a firewall "
                            "keeps others out"]
    else:
        assert messages == []


def test_binding_loopback_warns_of_nothing(caplog):
    from policyd.routing.server import bind_listener
    caplog.set_level(logging.WARNING, logger="policyd.routing")
    listener = bind_listener("inet:127.0.0.1:0", RoutingConfig())
    listener.close()
    assert caplog.records == []
