"""The Postfix policy server: sockets, connections, and when to decide.

One asyncio loop owns every connection; `Engine.decide` runs in a bounded
thread pool, so a client waiting on DNS never stalls the others.  Postfix
keeps a connection open across requests and sends the next request only
after the reply (`util/attr_clnt.c`), but a pipelining client is answered
in order all the same: each connection handles its requests one by one.

When to decide.  With `smtpd_delay_reject=yes` (the default) everything we
check is known at RCPT, so RCPT is where the engine runs.  A header can
only be added with PREPEND, one header per reply, and PREPEND is refused
at CONNECT, HELO and END-OF-MESSAGE (PROTOCOLS.md §1).  So the headers of
an accepted message are kept per `instance` (one per message) and handed
out one per later reply at RCPT or DATA: Authentication-Results is added
once per message, not once per recipient.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from ..model import Action, Decision, Header, Request
from ..service import log_decision
from .protocol import ProtocolError, RequestReader, encode_reply, quote, reply_for, \
    request_from_attributes

log = logging.getLogger("policyd.policy")

READ_SIZE = 65536
# Messages whose headers are still being handed out.  A message needs its
# entry from its first RCPT to its DATA; 10000 is far more messages than
# one Postfix has in that phase at once (default_process_limit 100).
HEADER_MEMORY = 10000

# Stages at which the engine runs.  DATA (also used for BDAT) covers a
# policy service listed only in smtpd_data_restrictions.
DECIDING_STATES = frozenset({"RCPT", "DATA"})


class ListenError(Exception):
    """A listen address that cannot be used; the message says which and why."""


def parse_listen(spec: str) -> tuple[str, str, int | None]:
    """`inet:HOST:PORT`, `inet:[V6]:PORT` or `unix:PATH` as (kind, where, port)."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, None
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host and port.isdigit() and int(port) < 65536:
            return "inet", host, int(port)
    raise ListenError(f"{spec!r} is not inet:HOST:PORT, inet:[IPV6]:PORT or unix:PATH")


class PendingHeaders:
    """Per message (Postfix `instance`), the accepted Decision and the
    headers it still has to add; the least recently used entry goes first
    when full.  Postfix builds `instance` from the smtpd process id, the
    time and a counter, so one store serves every smtpd process.  Used from
    the event loop thread only."""

    def __init__(self, capacity: int = HEADER_MEMORY):
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, tuple[Decision, collections.deque]] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, instance: str) -> bool:
        return instance in self._entries

    def start(self, instance: str, decision: Decision) -> Header | None:
        """Keeps the decision's headers and returns the first one to add now.

        If the instance is known already (two connections deciding for one
        message at once), its remaining headers are used instead, so no
        header is added twice.
        """
        if instance not in self._entries:
            # Only what later replies need: the action and the headers left.
            # The full decision (trace, results) would make 10000 entries
            # tens of megabytes.
            self._entries[instance] = (Decision(decision.action, decision.reply),
                                       collections.deque(decision.headers))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return self.next(instance)[1]

    def next(self, instance: str) -> tuple[Decision, Header | None]:
        """The stored decision and the next header to add (None when done)."""
        self._entries.move_to_end(instance)
        decision, headers = self._entries[instance]
        return decision, headers.popleft() if headers else None

    def forget(self, instance: str) -> None:
        self._entries.pop(instance, None)


@dataclass(eq=False)
class _Connection:
    peer: str
    task: asyncio.Task


@dataclass
class BoundListener:
    """Sockets bound and listening for one listen spec, made before any
    worker process exists so that every worker accepts on the same ones."""
    spec: str
    sockets: list[socket.socket]
    unix_path: str = ""
    unix_inode: tuple[int, int] | None = None
    addresses: list[str] = field(default_factory=list)

    def close(self, remove_socket: bool = True) -> None:
        for sock in self.sockets:
            sock.close()
        if remove_socket and self.unix_path:
            _remove_own_socket(self.unix_path, self.unix_inode)


# Postfix opens one connection per smtpd process; 1024 pending accepts is
# far more than a burst of them.
BACKLOG = 1024


def bind_listener(spec: str, settings) -> BoundListener:
    """Binds one `policy.listen` entry; raises ListenError."""
    kind, where, port = parse_listen(spec)
    try:
        if kind == "inet":
            sockets, addresses = [], []
            try:
                for family, type_, proto, _, address in socket.getaddrinfo(
                        where, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                    sock = socket.socket(family, type_, proto)
                    sockets.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                    sock.listen(BACKLOG)
                    sock.setblocking(False)
                    host, bound_port = sock.getsockname()[:2]
                    host = f"[{host}]" if ":" in host else host
                    addresses.append(f"inet:{host}:{bound_port}")
            except BaseException:
                for sock in sockets:
                    sock.close()
                raise
            return BoundListener(spec, sockets, addresses=addresses)
        # A chrooted Postfix reaches /var/spool/postfix/private/policyd as
        # unix:private/policyd.  A relative path is made absolute now, so
        # the stop removes the right file whatever the directory is then.
        path = os.path.abspath(where)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Until the chmod below the socket has the umask's mode; with the
            # usual 022 that is 0755, which lets only its owner connect.
            sock.bind(path)
            info = os.stat(path)
            bound = BoundListener(spec, [sock], unix_path=path,
                                  unix_inode=(info.st_dev, info.st_ino),
                                  addresses=[f"unix:{path}"])
            try:
                os.chmod(path, int(settings.socket_mode, 8))
                if settings.socket_group:
                    os.chown(path, -1, _group_id(settings.socket_group))
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except BaseException:
                bound.close()
                raise
            return bound
        except BaseException:
            sock.close()
            raise
    except OSError as error:
        raise ListenError(f"{spec}: {error.strerror or error}") from error


@dataclass
class _Listener:
    spec: str
    servers: list[asyncio.base_events.Server]
    bound: BoundListener

    @property
    def addresses(self) -> list[str]:
        return self.bound.addresses


class PolicyServer:
    """`start()`, `reload(engine)`, `stop()`; one per process.

    The listen addresses, socket permissions and worker count come from the
    configuration at start; the limits of a connection from the engine
    current when it opened; each request is decided by the engine current
    when it arrived, so a reload never changes a decision half-way.
    """

    def __init__(self, engine, *, decision_logger=None, header_memory: int = HEADER_MEMORY,
                 bound: list[BoundListener] | None = None):
        """`bound`: sockets a parent process bound for its workers; the
        parent then removes unix sockets, not this server."""
        self._engine = engine
        self._bound = bound
        self._owns_sockets = bound is None
        self._settings = engine.config.policy
        self._log_decision = decision_logger or log_decision
        self._pending = PendingHeaders(header_memory)
        self._listeners: list[_Listener] = []
        self._connections: set[_Connection] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping: asyncio.Future | None = None

    @property
    def engine(self):
        return self._engine

    @property
    def addresses(self) -> list[str]:
        """Where the server listens, with real ports (`inet:HOST:PORT`, `unix:PATH`)."""
        return [address for listener in self._listeners for address in listener.addresses]

    @property
    def connections(self) -> int:
        return len(self._connections)

    # -- life cycle --------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, self._settings.workers), thread_name_prefix="policyd-policy")
        try:
            bound = self._bound
            if bound is None:
                bound = []
                try:
                    for spec in self._settings.listen:
                        bound.append(bind_listener(spec, self._settings))
                except BaseException:
                    for listener in bound:
                        listener.close()
                    raise
            for listener in bound:
                self._listeners.append(await self._listen(listener))
        except BaseException:
            await self._close_listeners()
            self._executor.shutdown(wait=False)
            raise
        log.info("policy server listening on %s", ", ".join(self.addresses))

    def reload(self, engine) -> None:
        """Swaps the engine; requests in flight finish on the one they began with."""
        new = engine.config.policy
        fixed = [name for name in ("listen", "workers", "socket_mode", "socket_group")
                 if getattr(new, name) != getattr(self._settings, name)]
        if fixed:
            log.warning("reload: policy.%s changed; takes effect at the next start",
                        ", policy.".join(fixed))
        self._engine = engine

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish within
        drain_timeout, closes every connection, removes unix sockets."""
        if self._stopping is None:
            return
        if not self._stopping.done():
            self._stopping.set_result(None)
        for listener in self._listeners:
            for server in listener.servers:
                server.close()
        # Idle connections leave as soon as they see the stop; the others
        # once the request they are answering is answered.
        drain_timeout = self._engine.config.policy.drain_timeout
        tasks = [connection.task for connection in self._connections]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout)
            if late:
                log.warning("stop: %d request(s) still running after %.1f s; closing",
                            len(late), drain_timeout)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        await self._close_listeners()
        if self._executor is not None:
            # Threads still inside the engine end by its DNS time limits.
            self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("policy server stopped")

    async def _close_listeners(self) -> None:
        for listener in self._listeners:
            for server in listener.servers:
                server.close()
                await server.wait_closed()
            listener.bound.close(remove_socket=self._owns_sockets)
        self._listeners.clear()

    async def _listen(self, bound: "BoundListener") -> _Listener:
        servers = []
        for sock in bound.sockets:
            if sock.family == socket.AF_UNIX:
                servers.append(await asyncio.start_unix_server(self._serve_connection, sock=sock))
            else:
                servers.append(await asyncio.start_server(self._serve_connection, sock=sock))
        return _Listener(bound.spec, servers, bound)

    # -- one connection ----------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        connection = _Connection(_peer_name(writer), asyncio.current_task())
        self._connections.add(connection)
        try:
            settings = self._engine.config.policy
            requests = RequestReader(settings.max_line_length, settings.max_attributes,
                                     settings.max_request_size)
            while not self._stopping.done():
                data = await self._read(reader, connection, settings.idle_timeout,
                                        requests.pending)
                if data is None:
                    return
                try:
                    batch = requests.feed(data)
                except ProtocolError as error:
                    log.warning("policy client %s: %s; closing", connection.peer, error)
                    return
                for attributes in batch:
                    action = await self._answer(connection, attributes)
                    if action is None:
                        return
                    writer.write(encode_reply(action))
                    await asyncio.wait_for(writer.drain(), settings.idle_timeout)
                if requests.error is not None:
                    log.warning("policy client %s: %s; closing", connection.peer,
                                requests.error)
                    return
        except (ConnectionError, asyncio.TimeoutError) as error:
            log.info("policy client %s: %s; closing", connection.peer,
                     error.__class__.__name__)
        except Exception:
            log.exception("policy client %s: unexpected error; closing", connection.peer)
        finally:
            self._connections.discard(connection)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, connection: _Connection,
                    idle_timeout: float, partial: bool) -> bytes | None:
        """The next bytes, or None at EOF, idle timeout or stop.

        Bytes already read when the stop comes are still answered: the read
        runs as a task of its own, so the stop never cancels it half-way.
        """
        read = asyncio.ensure_future(reader.read(READ_SIZE))
        try:
            done, _ = await asyncio.wait({read, self._stopping}, timeout=idle_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            read.cancel()
            raise
        if read not in done:
            read.cancel()
            if not self._stopping.done():
                log.info("policy client %s: idle for %.0f s; closing",
                         connection.peer, idle_timeout)
            return None
        data = read.result()
        if not data:
            if partial:
                log.warning("policy client %s: connection closed inside a request",
                            connection.peer)
            return None
        return data

    async def _answer(self, connection: _Connection, attributes: dict[str, str]) -> str | None:
        """The action text for one request; None means close the connection."""
        try:
            request = request_from_attributes(attributes)
        except ProtocolError as error:
            log.warning("policy client %s: %s; closing", connection.peer, error)
            return None
        state = request.protocol_state
        if state not in DECIDING_STATES:
            if state == "END-OF-MESSAGE" and request.instance:
                self._pending.forget(request.instance)
            # CONNECT, EHLO, HELO, MAIL, VRFY, ETRN, END-OF-MESSAGE: the
            # decision is made at RCPT, and PREPEND is refused at some of these.
            return "DUNNO"
        if request.instance and request.instance in self._pending:
            return reply_for(*self._pending.next(request.instance))
        engine = self._engine
        try:
            decision = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._decide, engine, request)
        except Exception:
            # Close rather than answer 451: Postfix then retries and applies
            # its default_action, the admin's choice between failing open
            # and closed (PROTOCOLS.md §1; SMTPD_POLICY_README: a server in
            # trouble logs, sends nothing, and disconnects).
            log.exception("policy client %s: the engine failed on queue_id=%s; closing",
                          connection.peer, quote(request.queue_id))
            return None
        header = None
        if decision.action is Action.ACCEPT:
            if request.instance:
                header = self._pending.start(request.instance, decision)
            elif decision.headers:
                header = decision.headers[0]
        return reply_for(decision, header)

    def _decide(self, engine, request: Request) -> Decision:
        """Runs in a worker thread."""
        decision = engine.decide(request)
        self._log_decision(request, decision)
        return decision


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{writer.get_extra_info('sockname') or '?'}"


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"policy.socket_group: no group {group!r}") from None


def _remove_stale_socket(path: str) -> None:
    """Removes a socket left by a server that is gone; refuses to remove
    anything else, or a socket somebody still answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ListenError(f"unix:{path}: another server is listening on it")


def _remove_own_socket(path: str, inode: tuple[int, int] | None) -> None:
    """Removes the socket file unless another server has replaced it."""
    try:
        info = os.lstat(path)
        if inode is None or (info.st_dev, info.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        # Bound as root in a directory we may not write after dropping
        # privileges (Postfix's private/); the next start removes it.
        log.info("unix:%s: left in place, no permission to remove it", path)
