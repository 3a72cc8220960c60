"""The socketmap server (RoutingServer): its sockets and connections,
within bounds.  One asyncio loop owns every connection; a lookup that
needs Redis goes to a small thread pool.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING

from ..runtime.sockets import Listener, UnixSocket, bind_all, bind_postfix
from .socketmap import NetstringReader, ProtocolError, Reply, Request, Status, encode_reply, \
    parse_request
from .tables import Tables

if TYPE_CHECKING:
    from .settings import RoutingConfig

log = logging.getLogger("policyd.routing")

# Threads for lookups that wait on Redis (each bounded by redis.timeout).
LOOKUP_THREADS = 4
# A connection over routing.max_connections is closed at once; that is
# said at most this often.
REFUSE_WARNING_INTERVAL = 10.0

# Internal errors reach the client as this, never as their text.
_FAILED = Reply(Status.TEMP, "internal error")


def bind_listener(spec: str, settings: RoutingConfig) -> Listener:
    """Binds one `routing.listen` entry; raises ListenError."""
    listener = bind_postfix(spec, UnixSocket(int(settings.socket_mode, 8),
                                             settings.socket_group, section="routing",
                                             holder="socketmap server", make_directory=True))
    warn_if_exposed(listener)
    return listener


def warn_if_exposed(listener: Listener) -> None:
    """A warning for each socket bound to an address other hosts reach:
    the socketmap has no authentication, and whoever can send it a
    delivery status makes a destination IPv4-only for routing.learned_ttl
    (and learns which routes exist).  Not refused: a firewall may keep
    others out, which policyd cannot see."""
    for sock in listener.sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host = sock.getsockname()[0]
        try:
            loopback = ipaddress.ip_address(host.partition("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            log.warning("routing.listen %s: listening on %s, which is not loopback; "
                        "whoever reaches it can teach IPv4-only routes: listen on "
                        "127.0.0.1 (or a unix: socket) unless a firewall keeps others out",
                        listener.spec, host)


class RoutingServer:
    """`start()`, `reload(tables)`, `stop()`; one per process.

    `bound`: sockets bound by a parent (its workers serve them; the parent
    removes UNIX socket files); without it, `start` binds routing.listen.
    """

    def __init__(self, tables: Tables, bound: list[Listener] | None = None):
        self.tables = tables
        self.settings = tables.config
        self._bound = bound
        self._listeners: list[Listener] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[_Connection] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            LOOKUP_THREADS, thread_name_prefix="routing")
        self._loop: asyncio.AbstractEventLoop
        self._stopping = False
        self._refused_warned = -REFUSE_WARNING_INTERVAL
        self._idle: asyncio.Event | None = None

    @property
    def addresses(self) -> list[str]:
        return [address for listener in self._listeners for address in listener.addresses]

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        bound = self._bound
        if bound is None:
            bound = bind_all(self.settings.listen,
                             lambda spec: bind_listener(spec, self.settings))
        self._listeners = list(bound)
        for listener in self._listeners:
            for sock in listener.sockets:
                if sock.family == socket.AF_UNIX:
                    server = await self._loop.create_unix_server(self._connection, sock=sock)
                else:
                    server = await self._loop.create_server(self._connection, sock=sock)
                self._servers.append(server)
        log.info("routing socketmap listening on %s", ", ".join(self.addresses))

    def reload(self, tables: Tables) -> None:
        """New tables for requests from now on; the sockets stay."""
        fixed = [name for name in ("listen", "socket_mode", "socket_group")
                 if getattr(tables.config, name) != getattr(self.settings, name)]
        if fixed:
            log.warning("reload: routing.%s changed; takes effect at the next start",
                        ", routing.".join(fixed))
        self.tables = tables

    async def stop(self) -> None:
        """Stops accepting; a request in flight is answered within
        routing.drain_timeout, then every connection closes."""
        if self._stopping:
            return
        self._stopping = True
        for server in self._servers:
            server.close()
        for listener in self._listeners:
            # The parent's sockets are the parent's to remove.
            listener.close(remove_socket=self._bound is None)
        for connection in list(self._connections):
            connection.stop()
        if self._connections:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), self.tables.config.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("routing: %d connection(s) still busy after %g s; closing them",
                            len(self._connections), self.tables.config.drain_timeout)
        for connection in list(self._connections):
            connection.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- connections ----------------------------------------------------------

    def _connection(self) -> _Connection:
        return _Connection(self)

    def _opened(self, connection: _Connection) -> bool:
        if self._stopping:
            return False
        if len(self._connections) >= self.tables.config.max_connections:
            now = time.monotonic()
            if now - self._refused_warned >= REFUSE_WARNING_INTERVAL:
                self._refused_warned = now
                log.warning("routing: %d connections already (routing.max_connections); "
                            "closing new ones", len(self._connections))
            return False
        self._connections.add(connection)
        return True

    def _closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._idle is not None:
            self._idle.set()

    def _answer(self, connection: _Connection, request: Request) -> None:
        """A request answered from memory is answered on the loop; one that
        needs Redis goes to the thread pool, so that no Redis wait holds up
        the other connections.  No exception text ever reaches a client
        (_FAILED)."""
        tables = self.tables
        try:
            reply = tables.answer_now(request)
        except Exception:
            log.exception("routing: lookup failed: %s", request.name)
            reply = _FAILED
        if reply is not None:
            connection.send(reply)
            return
        future = self._loop.run_in_executor(self._pool, tables.answer, request)
        future.add_done_callback(lambda done: connection.send(_result(done, request)))


def _result(future: asyncio.Future, request: Request) -> Reply:
    if future.cancelled():
        return _FAILED
    error = future.exception()
    if error is not None:
        log.error("routing: lookup failed: %s: %s", request.name, error.__class__.__name__)
        return _FAILED
    return future.result()


class _Connection(asyncio.Protocol):
    """One client: requests in, one at a time; replies out in order.

    Postfix keeps a socketmap connection open and sends the next request
    only after the reply (socketmap_table(5)); a client that pipelines is
    answered in order, one request at a time, and is not read while a
    request of it waits.  Bad input (a netstring too long, not a
    netstring, a request that does not complete in time) is logged and the
    connection closed; a well-framed request we cannot use gets `PERM`."""

    def __init__(self, server: RoutingServer):
        self.server = server
        settings = server.tables.config
        self.reader = NetstringReader(settings.max_request_size)
        self.idle_timeout, self.request_timeout = settings.idle_timeout, settings.request_timeout
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.busy = False
        self.closing = False
        self.last = 0.0            # loop time of the last reply (or the connect)
        self.began: float | None = None   # first octet of the request in progress
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = _peer_name(transport)
        if not self.server._opened(self):
            transport.abort()
            self.transport = None
            return
        self.last = self.server._loop.time()
        self._schedule()

    def data_received(self, data: bytes) -> None:
        if self.began is None and not self.reader.pending:
            self.began = self.server._loop.time()
            self._schedule()   # the request's deadline may come before the idle one
        self.reader.push(data)
        self._work()

    def eof_received(self) -> bool:
        if self.reader.pending and not self.busy:
            log.warning("routing client %s: connection closed inside a request", self.peer)
        self.closing = True
        if not self.busy:
            self.close()
        return True   # half-close: a reply in flight still goes out

    def connection_lost(self, error: Exception | None) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        self.server._closed(self)

    def _work(self) -> None:
        while not self.busy and self.transport is not None:
            try:
                payload = self.reader.next()
            except ProtocolError as error:
                log.warning("routing client %s: %s; closing", self.peer, error)
                self.abort()
                return
            if payload is None:
                break
            parsed = parse_request(payload)
            if isinstance(parsed, Reply):
                log.warning("routing client %s: %s", self.peer, parsed.data)
                self._write(parsed)
                continue
            self.busy = True
            self.transport.pause_reading()
            self.server._answer(self, parsed)
        if self.transport is not None and not self.busy:
            self.began = self.server._loop.time() if self.reader.pending else None
            if self.closing:
                self.close()

    def send(self, reply: Reply) -> None:
        """The reply to the request in progress (from the loop)."""
        self.busy = False
        if self.transport is None:
            return
        self._write(reply)
        if not self.closing:
            self.transport.resume_reading()
        self._work()

    def _write(self, reply: Reply) -> None:
        assert self.transport is not None
        self.transport.write(encode_reply(reply))
        self.last = self.server._loop.time()

    def _schedule(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = self.server._loop
        due = self.last + self.idle_timeout
        if self.began is not None:
            due = min(due, self.began + self.request_timeout)
        self.timer = loop.call_at(max(due, loop.time() + 0.01), self._check)

    def _check(self) -> None:
        if self.transport is None:
            return
        now = self.server._loop.time()
        if self.busy:
            # A lookup in a thread is no idleness; Redis has its own timeout.
            self.timer = self.server._loop.call_later(1.0, self._check)
            return
        if self.began is not None and now - self.began >= self.request_timeout:
            log.warning("routing client %s: request not complete %g s after its first "
                        "octet; closing", self.peer, self.request_timeout)
            self.abort()
            return
        if self.began is None and now - self.last >= self.idle_timeout:
            log.info("routing client %s: idle for %.0f s; closing", self.peer, self.idle_timeout)
            self.close()
            return
        self._schedule()

    def stop(self) -> None:
        """The server stops: an idle connection closes now, a busy one
        after its reply."""
        self.closing = True
        if not self.busy:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{transport.get_extra_info('sockname') or '?'}"
