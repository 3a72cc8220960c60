"""The Postfix policy server: sockets, connections, and when to decide.

One asyncio loop owns every connection; `Engine.decide` runs in a bounded
thread pool, so a client waiting on DNS never stalls the others.  Postfix
keeps a connection open across requests and sends the next request only
after the reply (`util/attr_clnt.c`), but a pipelining client is answered
in order all the same: each connection handles its requests one by one,
a turn at a time, so that it holds up nobody else (TURN, PASS_BUDGET).

When to decide.  With `smtpd_delay_reject=yes` (the default) everything we
check is known at RCPT, so RCPT is where the engine runs.  A header can
only be added with PREPEND, one header per reply, and PREPEND is refused
at CONNECT, HELO and END-OF-MESSAGE (docs/protocols.md §1).  So the headers of
an accepted message are kept per `instance` (one per message) and handed
out one per later reply at RCPT or DATA: Authentication-Results is added
once per message, not once per recipient.
"""
from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import multiprocessing
import os
import queue
import resource
import select
import socket
import struct
import termios
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..dns import CacheMiss
from ..model import Action, Decision, Header, Request
from ..runtime.sockets import Listener, UnixSocket, bind_all, bind_postfix
from ..service import log_decision
from .protocol import ProtocolError, RequestReader, encode_reply, quote, reply_for, \
    request_from_attributes

if TYPE_CHECKING:   # for the annotations only
    from ..config import PolicyConfig
    from ..engine import Engine

log = logging.getLogger("policyd.policy")

# Messages whose headers are still being handed out.  A message needs its
# entry from its first RCPT to its DATA, and an smtpd process has one
# message at a time: 2000 is twenty times the smtpd processes of a Postfix
# at default_process_limit (100), per worker.  Entries are about 0.5 KB
# (bench/README.md, "Why the code is as it is"); an entry forgotten too early costs a
# second Authentication-Results on that message, nothing more.
HEADER_MEMORY = 2000

# Stages at which the engine runs.  DATA (also used for BDAT) covers a
# policy service listed only in smtpd_data_restrictions.
DECIDING_STATES = frozenset({"RCPT", "DATA"})


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


def bind_listener(spec: str, settings: PolicyConfig) -> Listener:
    """Binds one `policy.listen` entry with its socket settings; raises ListenError."""
    return bind_postfix(spec, UnixSocket(int(settings.socket_mode, 8), settings.socket_group,
                                         section="policy", make_directory=True))


class AcceptShare:
    """How many connections each worker process of one policyd holds, in
    memory the workers share (made before the fork).

    Worker processes accept on the same listening sockets.  Left to the
    kernel, the worker that happens to be awake takes nearly every
    connection of a burst (bench/README.md, "Why the code is as it is"),
    and since Postfix keeps its connections for up to
    smtpd_policy_service_max_ttl (1000 s), one core does all the work.
    A worker that holds more than its share lets the others accept first.
    Each worker writes its own slot only; reads of the other slots may be
    a moment old, which costs at most one connection's balance.
    """

    # A worker may hold this many more connections than the least busy one.
    SLACK = 1

    def __init__(self, slots: int):
        # -1: no worker runs in that slot (not started yet, or dead and not
        # yet replaced); its share is nobody's to wait for.
        self._counts = multiprocessing.RawArray(ctypes.c_long, [-1] * slots)
        self.slot: int | None = None

    def take(self, slot: int) -> None:
        """In the worker that runs as `slot`, before it accepts."""
        self.slot = slot
        self._counts[slot] = 0

    def release(self, slot: int) -> None:
        """In the parent, once the worker in `slot` is gone."""
        self._counts[slot] = -1

    def leave(self) -> None:
        """In the worker, when it stops accepting: the others no longer
        wait for it to take its share."""
        if self.slot is not None:
            self._counts[self.slot] = -1
            self.slot = None

    def change(self, delta: int) -> None:
        if self.slot is not None:
            self._counts[self.slot] += delta

    def others_running(self) -> bool:
        if self.slot is None:
            return False
        return any(count >= 0 for slot, count in enumerate(self._counts[:])
                   if slot != self.slot)

    def over_share(self) -> bool:
        if self.slot is None:
            return False
        counts = self._counts[:]
        mine = counts.pop(self.slot)
        others = [count for count in counts if count >= 0]
        return bool(others) and mine > min(others) + self.SLACK


# A worker over its share looks at a waiting connection again this often,
# and takes it itself once it has waited ACCEPT_PATIENCE: the worker whose
# share it is may be stuck, or dead and not yet replaced.  Patience is
# counted from the first connection left to the others until the queue is
# seen empty, not from the last accept: counted from the last accept, a
# worker over its share took one batch per ACCEPT_PATIENCE, and under a
# flood of connections that close at once (whose counts come and go) both
# workers of two were over their share in turn, and the queue overflowed
# while they idled (bench/README.md, "Why the code is as it is").
ACCEPT_RECHECK = 0.005
ACCEPT_PATIENCE = 0.05
# Connections taken per wake-up of the loop.
ACCEPT_BATCH = 16
# More connections than this waiting in a TCP listener's queue: the others
# are not keeping up, and a worker over its share takes them at once.
ACCEPT_QUEUE_FAIR = 2 * ACCEPT_BATCH
# accept() failing for lack of resources (ENOBUFS, ENOMEM; EMFILE or
# ENFILE without a spare descriptor): the listener rests this long
# instead of spinning on a readable socket.
ACCEPT_REST = 1.0
# Out of descriptors, each new connection is closed at once (the spare
# descriptor, see _refuse), and that is said at most this often.
REFUSE_WARNING_INTERVAL = 10.0

# A connection taken from the listening queue at stop has this long to
# send its request.
LATE_READ = 1.0

# Fair turns.  Postfix sends a request only after the reply to the last
# (util/attr_clnt.c), so a read from it holds one request, answered at
# once.  The requests of a read that holds more wait in a round of turns,
# TURN requests per connection per visit and PASS_BUDGET requests per pass
# of the event loop, so however many requests pipelining clients send,
# together they delay the others by PASS_BUDGET requests at most
# (bench/README.md, "Why the code is as it is").  While a connection has
# requests read and not answered, it is not read further: what it holds is
# at most one read's worth of octets.
#
# One and two, not two and eight: a pass of eight took up to half a
# millisecond, and a request from Postfix that came during one waited for
# its end (beside 100 non-readers, with the share below: p99 1.2-1.5 ms
# with passes of 8 against 0.9-1.1 ms with passes of 2, 0.8-1.0 idle).
TURN = 1
PASS_BUDGET = 2
# Passes follow one another until they have taken PIPELINE_SLICE seconds;
# then the loop rests before the next, so pipelined requests take at most
# PIPELINE_SHARE of a worker.  Without the rest, 100 clients pipelining without
# reading kept both workers of a 2-core machine runnable all the time:
# a well-formed client's request then waited behind the scheduler, not
# behind a pass (bench/README.md, "Why the code is as it is").  A worker that sleeps between
# passes is woken at once by its next request.
#
# Half a millisecond, not two: a worker's write wakes the client it
# answers (a Postfix smtpd), and Linux may run that client on the
# worker's CPU, once the worker sleeps; the reply then waited out the rest
# of the slice (beside 100 non-readers, from our write to the client's
# read: 2.2 ms at the 99th percentile with 2 ms slices, 0.9 ms with 0.5).
PIPELINE_SLICE = 0.0005
# A thirty-second, not a quarter: no client that waits for its answers
# pipelines (Postfix does not, util/attr_clnt.c), so pipelined requests
# are a test's or an abuser's, and Postfix's requests come first.  With a
# quarter, 100 clients pipelining without reading had the workers at 0.5
# CPU for minutes (a client's receive buffer grows as it fills, so
# UNREAD_LIMIT comes late, below), and a well-formed client's p99 was 1.2
# to 1.8 ms against 0.6-1.0 ms idle; with a sixteenth 0.9-1.1 ms (0.2 CPU),
# with a thirty-second 0.8-1.4 ms against 0.8-1.1 idle in 7 runs (0.13
# CPU, the probe's own work included), and beside 20 pipelining clients
# that read, 1.3-1.8 ms at a quarter or a sixteenth, 0.9-1.6 ms now
# (bench/battery.py slow-clients, 2 CPUs).
# Pipelined requests are answered at a few hundred a second per worker.
PIPELINE_SHARE = 1 / 32

# A client that pipelines is answered only while it reads its replies
# (one that waits for each answer, as Postfix does, is not watched).  Linux tells how
# much of what we sent a TCP client holds unread: the window it
# advertises closes by what it receives and does not read (RFC 9293
# §3.8.6; tcp(7) TCP_INFO tcpi_snd_wnd, counted from what it has
# acknowledged), and beside that is what it has not acknowledged yet and
# what the closed window keeps back in our send queue.  Without this, a
# client that never reads was answered until its receive buffer (about
# 128 KB) and then our send buffer (autotuned up to 4 MB, tcp_wmem) were
# full: 16,000 replies of 250 octets each.
#
# Up to UNREAD_LIMIT octets may wait unread (60 replies of 250 octets);
# past it the connection is neither read nor answered until the client
# has read half, and closed when that takes idle_timeout.  The count is a
# floor: the client's kernel also widens its window by itself as data
# arrives (tcp_grow_window), so a client that sends in bursts and never
# reads is held after 30 to 100 KB, not 16 (measured on loopback).  One
# that sends a request per reply and never reads may not be held at all:
# its kernel grows a receive buffer that fills (measured on Linux 6.18: to
# 12 MB with 2.8 MB unread, the window at 64 KB throughout, closed only
# at 28 MB, near tcp_rmem's maximum): it is answered as any client that
# sends as fast, in turns and within PIPELINE_SHARE once its requests
# come faster than their answers.  Postfix reads each reply
# before its next request (util/attr_clnt.c) and never comes near; a
# client that pipelines must read as it sends, or stall (in SMTP too,
# avoiding that deadlock is the pipelining client's job, RFC 2920).
# Looked at once per UNREAD_CHECK octets sent.  On a UNIX socket the
# kernel charges unread replies to our send buffer (unix(7)), and
# pause_writing stops the client within ~200 KB.
UNREAD_LIMIT = 16 * 1024
UNREAD_CHECK = 4 * 1024
# A held connection is looked at again after HOLD_RECHECK, then twice as
# long each time up to HOLD_RECHECK_MAX, and each look answers one request:
# the client's acknowledgment of that reply says what it has read.  Without
# something to acknowledge, a client that has read everything may not say
# so: Linux announces a wider window on its own only when a read at least
# doubles it (tcp_cleanup_rbuf), and a client that sent ahead as far as our
# receive buffer takes has no segment to carry the news.  So a client that
# never reads costs one reply a second, and one that reads down to half
# of UNREAD_LIMIT is answered again within a second.
HOLD_RECHECK = 0.01
HOLD_RECHECK_MAX = 1.0


class PolicyServer:
    """`start()`, `reload(engine)`, `stop()`; one per process.

    The listen addresses, socket permissions and worker count come from the
    configuration at start; the limits of a connection from the engine
    current when it opened; each request is decided by the engine current
    when it arrived, so a reload never changes a decision half-way.

    Where a request is decided.  Most requests need only DNS answers that
    are cached already (repeat senders, their providers' records); those
    are decided right on the event loop, with the resolver answering from
    its cache alone (`Engine.decide_cached`).  A request that needs a DNS
    query goes to a worker thread, where waiting for the answer blocks
    nobody else.  A thread hand-off costs more than most cached decisions.
    """

    def __init__(self, engine: Engine, *,
                 decision_logger: Callable[[Request, Decision], None] | None = None,
                 header_memory: int = HEADER_MEMORY,
                 bound: list[Listener] | None = None, share: AcceptShare | None = None):
        """`bound`: sockets a parent process bound for its workers; the
        parent then removes unix sockets, not this server.  `share`: the
        workers' connection counts, this worker's slot taken."""
        self._engine = engine
        self._bound = bound
        self._owns_sockets = bound is None
        self._share = share
        self._settings = engine.config.policy
        self._log_decision = decision_logger or log_decision
        self._pending = PendingHeaders(header_memory)
        self._listeners: list[Listener] = []
        self._deferred_since: float | None = None
        self._connections: set[_PolicyConnection] = set()
        # Made by start(), which must come first.
        self._pool: _DecisionPool
        self._loop: asyncio.AbstractEventLoop
        self._started = False
        self._stopping = False
        self._all_closed: asyncio.Future | None = None
        self._adopting = 0        # accepted, not yet set up
        self._turns: collections.deque[_PolicyConnection] = collections.deque()
        self._turns_due = False   # a pass of _take_turns is scheduled
        self._slice_spent = 0.0   # time in passes since the last rest
        self._pass_ended: float | None = None   # when the last pass ended
        self._spare: int | None = None   # a descriptor to free when they run out
        self._refused = 0                # connections closed for want of one
        self._refused_warned = -REFUSE_WARNING_INTERVAL

    @property
    def engine(self) -> Engine:
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
        self._loop = asyncio.get_running_loop()
        self._pool = _DecisionPool(max(1, self._settings.workers), self._loop)
        self._started = True
        try:
            bound = self._bound
            if bound is None:
                bound = bind_all(self._settings.listen,
                                 lambda spec: bind_listener(spec, self._settings))
            self._listeners.extend(bound)
            self._spare = _open_spare()
            for sock in self._sockets():
                self._watch(sock)
        except BaseException:
            self._close_listeners()
            self._pool.shutdown()
            raise
        log.info("policy server listening on %s", ", ".join(self.addresses))

    def reload(self, engine: Engine) -> None:
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
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._share is not None:
            self._share.leave()
        # Connections the kernel has queued for us have been accepted, as
        # far as their clients know, and may have sent a request: they are
        # taken and answered, not reset by the close.
        for sock in self._sockets():
            self._take_all(sock)
        self._close_listeners()
        # Idle connections leave at once; the others once the requests
        # they have read are answered.
        for connection in list(self._connections):
            connection.stop()
        drain_timeout = self._engine.config.policy.drain_timeout
        if self._connections or self._adopting:
            self._all_closed = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_closed), drain_timeout)
            except asyncio.TimeoutError:
                log.warning("stop: %d request(s) still running after %.1f s; closing",
                            len(self._connections), drain_timeout)
                for connection in list(self._connections):
                    connection.abort()
        # Threads still inside the engine end by its DNS time limits.
        self._pool.shutdown()
        log.info("policy server stopped")

    def _close_listeners(self) -> None:
        for sock in self._sockets():
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
        for listener in self._listeners:
            listener.close(remove_socket=self._owns_sockets)
        self._listeners.clear()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _sockets(self) -> list[socket.socket]:
        return [sock for listener in self._listeners for sock in listener.sockets]

    # -- accepting -----------------------------------------------------------

    def _watch(self, sock: socket.socket) -> None:
        if not self._stopping and sock.fileno() >= 0:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        loop = self._loop
        if self._spare is None:
            # Lost to a race (see _refuse) or not to be had at start.
            self._spare = _open_spare()
        if self._leave_to_others(sock):
            loop.remove_reader(sock.fileno())
            loop.call_later(ACCEPT_RECHECK, self._recheck, sock)
            return
        for _ in range(ACCEPT_BATCH):
            try:
                connected, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                # Another worker took it, or the client gave up: the queue
                # is empty, the others keep up.
                self._deferred_since = None
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    if self._others_may_take():
                        # Another worker may still have descriptors.
                        loop.remove_reader(sock.fileno())
                        loop.call_later(ACCEPT_RECHECK, self._recheck, sock)
                        return
                    if self._refuse(sock, error):
                        return
                    if self._spare is None:
                        # Every descriptor taken, the spare too: by a
                        # DNS socket of a pool thread, closed again within
                        # its time limit, or by connections, which give
                        # theirs back to the spare as they close.  Soon
                        # again, not after ACCEPT_REST, or new connections
                        # wait in a full backlog meanwhile.
                        self._warn_refusing(sock, error)
                        loop.remove_reader(sock.fileno())
                        loop.call_later(ACCEPT_RECHECK, self._watch, sock)
                        return
                log.error("cannot accept on %s: %s; pausing %.0f s",
                          _sock_name(sock), error.strerror or error, ACCEPT_REST)
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_REST, self._watch, sock)
                return
            self._take(connected)
            if self._leave_to_others(sock):
                return

    def _leave_to_others(self, sock: socket.socket) -> bool:
        """True when this worker holds more than its share and the others
        keep up: few connections wait, none for long."""
        if self._share is None or not self._share.over_share():
            return False
        waiting = _queued(sock)
        if waiting is not None and waiting > ACCEPT_QUEUE_FAIR:
            return False
        now = self._loop.time()
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < ACCEPT_PATIENCE

    def _others_may_take(self) -> bool:
        """True while other workers run and a waiting connection has not
        waited ACCEPT_PATIENCE yet."""
        if self._share is None or not self._share.others_running():
            return False
        now = self._loop.time()
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < ACCEPT_PATIENCE

    def _recheck(self, sock: socket.socket) -> None:
        if self._stopping or sock.fileno() < 0:
            return
        poller = select.poll()   # not select(): no FD_SETSIZE limit on the descriptor
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            self._deferred_since = None   # another worker took it
        self._watch(sock)

    def _refuse(self, sock: socket.socket, error: OSError) -> bool:
        """Out of descriptors: the waiting connections are accepted on the
        spare descriptor and closed at once, so that Postfix sees the
        server gone and applies its default_action now, instead of when
        its connect times out in a queue nobody takes from.  False when
        there is no spare to use."""
        refused = 0
        while self._spare is not None and refused < ACCEPT_BATCH:
            os.close(self._spare)
            self._spare = None
            try:
                connected, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                connected = None
                self._deferred_since = None   # none left waiting
            except OSError:
                # EMFILE again: a pool thread opened a DNS socket on the
                # descriptor just freed, before this accept.  The queue is
                # not empty; _accept retries soon, reopening the spare.
                connected = None
            if connected is not None:
                # RST rather than FIN (SO_LINGER 0): nothing of it is kept.
                with contextlib.suppress(OSError):
                    connected.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                connected.close()
                refused += 1
            self._spare = _open_spare()
            if connected is None:
                break
        if not refused:
            return False
        self._refused += refused
        self._warn_refusing(sock, error)
        return True

    def _warn_refusing(self, sock: socket.socket, error: OSError) -> None:
        now = self._loop.time()
        if now - self._refused_warned >= REFUSE_WARNING_INTERVAL:
            self._refused_warned = now
            log.warning("cannot accept on %s: %s (descriptor limit %d); closing new "
                        "connections at once (%d so far)", _sock_name(sock),
                        error.strerror or error, _descriptor_limit(), self._refused)

    def _take_all(self, sock: socket.socket) -> None:
        while True:
            try:
                connected, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:
                return
            self._take(connected)

    def _take(self, connected: socket.socket) -> None:
        """An accepted connection, set up by a task of its own.  Counted
        now, not when set up: the next accept of a batch must see it in
        the share, and stop() must wait for it."""
        connected.setblocking(False)
        try:
            gone = not connected.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            gone = False     # nothing sent yet: the usual
        except OSError:
            gone = True      # reset already
        if gone:
            # Closed by its client before it was taken, with nothing sent
            # (a flood of connects that close at once): nothing to answer,
            # and a transport would cost many times the accept, which is
            # what let such a flood overflow the listening queue.
            connected.close()
            return
        if self._share is not None:
            self._share.change(1)
        self._adopting += 1
        self._loop.create_task(self._adopt(connected))

    async def _adopt(self, connected: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: _PolicyConnection(self), connected)
        except OSError as error:
            log.info("policy client lost while connecting: %s", error)
            connected.close()
            if self._share is not None:
                self._share.change(-1)
        finally:
            self._adopting -= 1
            self._check_all_closed()

    def _opened(self, connection: "_PolicyConnection") -> None:
        self._connections.add(connection)
        if self._stopping:
            connection.stop(reading=True)

    def _closed(self, connection: "_PolicyConnection") -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            if self._share is not None:
                self._share.change(-1)
        if self._spare is None and not self._stopping:
            # The spare back first (_refuse), once the transport has
            # closed the descriptor, right after this call.
            self._loop.call_soon(self._reopen_spare)
        self._check_all_closed()

    def _reopen_spare(self) -> None:
        if self._spare is None and not self._stopping:
            self._spare = _open_spare()

    def _check_all_closed(self) -> None:
        if not self._connections and not self._adopting and self._all_closed is not None \
                and not self._all_closed.done():
            self._all_closed.set_result(None)

    # -- turns -------------------------------------------------------------------

    def _wait_turn(self, connection: "_PolicyConnection") -> None:
        """`connection` has more requests read than its turn let it answer."""
        self._turns.append(connection)
        if not self._turns_due:
            self._turns_due = True
            self._loop.call_soon(self._take_turns)

    def _take_turns(self) -> None:
        """One pass: connections, first come first served, answer up to
        TURN requests each and PASS_BUDGET in all; the rest wait for the
        next pass, after the event loop has read and answered everyone
        else."""
        # _turns_due stays True through the pass: a connection whose turn
        # ends with requests left joins the round again (_wait_turn)
        # without a pass of its own, and the rest below holds for it too.
        turns = self._turns
        loop = self._loop
        rest_ratio = (1 - PIPELINE_SHARE) / PIPELINE_SHARE
        # Not loop.time(): uvloop's is the time the iteration began, in ms.
        began = time.monotonic()
        if self._pass_ended is not None \
                and began - self._pass_ended >= self._slice_spent * rest_ratio:
            # The time since the last pass has paid for the passes before
            # it: a new slice.  Otherwise the slice goes on while the round
            # empties and fills again (clients that pipeline and read: their
            # next read comes a few iterations later).
            self._slice_spent = 0.0
        budget = PASS_BUDGET
        try:
            while turns and budget > 0:
                connection = turns.popleft()
                connection.waiting = False
                budget -= max(connection._work(TURN), 1)
        finally:
            # Only the passes count, not what the loop does between them
            # (Postfix's requests); in wall time, so a pass that lost its
            # CPU counts too, but at most two slices' worth, so that one
            # stall does not hold the passes off for long.
            self._pass_ended = time.monotonic()
            self._slice_spent = min(self._slice_spent + self._pass_ended - began,
                                    2 * PIPELINE_SLICE)
            if not turns:
                self._turns_due = False
            elif self._stopping or self._slice_spent < PIPELINE_SLICE:
                # At stop the requests read are answered without rests:
                # the stop waits for them (drain_timeout).
                loop.call_soon(self._take_turns)
            else:
                loop.call_later(self._slice_spent * rest_ratio, self._take_turns)
                self._slice_spent = 0.0

    # -- one request -----------------------------------------------------------

    def _answer(self, connection: "_PolicyConnection", attributes: dict[str, str]):
        """The action text for one request, None to close the connection,
        or a _Deciding whose callback gets the text later."""
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
        engine = self._engine
        # One decision per message, given again to its other recipients;
        # but relay checks and rate limits judge each recipient (a
        # stranger's second RCPT may be the one that relays).
        if request.instance and request.instance in self._pending \
                and (state != "RCPT" or not engine.per_recipient):
            return reply_for(*self._pending.next(request.instance))
        try:
            decision = engine.decide_cached(request)
        except CacheMiss as miss:
            if miss.resume is not None:   # decided but for a wait: only that goes
                return self._pool.submit(request, miss.resume)
            return self._pool.submit(request, engine.decide, request)
        except Exception as error:
            self._engine_failed(connection, request, error)
            return None
        return self._finish(connection, request, decision)

    def _finish(self, connection: "_PolicyConnection", request: Request,
                decision: Decision) -> str | None:
        """Logs a decision, wherever it was made, and gives its reply text;
        None (logged) when there is none to give and the connection must
        close."""
        try:
            self._log_decision(request, decision)
            return self.reply(request, decision)
        except Exception:
            log.exception("policy client %s: no reply for queue_id=%s; closing",
                          connection.peer, quote(request.queue_id))
            return None

    def reply(self, request: Request, decision: Decision) -> str:
        header = None
        if decision.action is Action.ACCEPT:
            if request.instance:
                header = self._pending.start(request.instance, decision)
            elif decision.headers:
                header = decision.headers[0]
        return reply_for(decision, header)

    def _engine_failed(self, connection: "_PolicyConnection", request: Request,
                       error: Exception) -> None:
        # Close rather than answer 451: Postfix then retries and applies
        # its default_action, the admin's choice between failing open
        # and closed (docs/protocols.md §1; SMTPD_POLICY_README: a server in
        # trouble logs, sends nothing, and disconnects).
        log.error("policy client %s: the engine failed on queue_id=%s; closing",
                  connection.peer, quote(request.queue_id), exc_info=error)


class _DecisionPool:
    """Threads that run engine decisions and hand each result back to the
    event loop: a queue and call_soon_threadsafe, without the futures that
    ThreadPoolExecutor and run_in_executor add per call.  Threads start
    as work arrives, up to `size`."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop):
        self._size = size
        self._loop = loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._unfinished = 0      # submitted and not yet done
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, request: Request, function, *args) -> "_Deciding":
        deciding = _Deciding(request)
        with self._lock:
            self._unfinished += 1
            if self._unfinished > len(self._threads) and len(self._threads) < self._size:
                thread = threading.Thread(target=self._run, daemon=True,
                                          name=f"policyd-policy_{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
        self._queue.put((deciding, function, args))
        return deciding

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            deciding, function, args = item
            try:
                result, error = function(*args), None
            except Exception as caught:   # handed to the loop, logged there
                result, error = None, caught
            with self._lock:
                self._unfinished -= 1
            try:
                self._loop.call_soon_threadsafe(deciding.finish, result, error)
            except RuntimeError:
                return   # the loop is closed: the server is gone

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)


class _Deciding:
    """A decision under way in a thread; `callback(result, error)` runs on
    the event loop when it is done."""
    __slots__ = ("request", "callback")

    def __init__(self, request: Request):
        self.request = request
        self.callback: Callable[[Request, Decision | None, Exception | None], None] | None = None

    def finish(self, result, error) -> None:
        if self.callback is not None:
            self.callback(self.request, result, error)


class _PolicyConnection(asyncio.Protocol):
    """One client connection: its requests answered in order, one at a
    time, a turn at a time; an idle timer and a deadline per request; the
    drain at stop."""

    __slots__ = ("server", "transport", "peer", "requests", "busy", "closing", "waiting",
                 "write_paused", "read_paused", "eof", "idle_timeout", "request_timeout",
                 "last", "began", "timer", "deadline_set", "sock", "window", "unchecked",
                 "held", "held_since", "patience", "pipelining")

    def __init__(self, server: PolicyServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.busy = False          # a decision for this connection is in a thread
        self.closing = False       # answer what has been read, then close
        self.waiting = False       # in the server's round of turns
        self.write_paused = False
        self.read_paused = False
        self.eof = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_set = False  # the timer is set for the request's deadline
        self.sock = None           # a TCP connection's socket, for _unread()
        self.window = 0            # the widest window the client has advertised
        self.unchecked = 0         # octets sent since _unread() was last asked
        self.held = False          # replies left unread: neither read nor answered
        self.held_since: float | None = None   # held, and not seen reading since
        # Has sent requests ahead of their replies (taken turns): only such a
        # client is watched for unread replies.  Postfix reads each reply
        # before its next request; and a client kernel that shrinks its
        # window under memory pressure would make the count of a client
        # that reads everything look unread.
        self.pipelining = False
        self.patience = HOLD_RECHECK   # when to look at a held connection again

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = _peer_name(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock = sock
            self.window = _tcp_window(sock)[0]
        settings = self.server.engine.config.policy
        self.requests = RequestReader(settings.max_line_length, settings.max_attributes,
                                      settings.max_request_size)
        self.idle_timeout = settings.idle_timeout
        self.request_timeout = settings.request_timeout
        loop = self.server._loop
        self.last = self.began = loop.time()
        self.timer = loop.call_later(self.idle_timeout, self._check_idle)
        self.server._opened(self)

    def data_received(self, data: bytes) -> None:
        now = self.server._loop.time()
        requests = self.requests
        if not requests.pending:
            self.began = now       # the first octet of a request
        self.last = now
        requests.push(data)
        if self.busy or self.waiting or self.write_paused or self.held:
            # Pipelined behind a request not yet answered: read no further
            # until these are.
            self._pause_reading()
            return
        # A request that ends before the read does is followed by more:
        # a pipelining client, whose requests all wait for their turns.
        end = data.find(b"\n\n")
        self._work(0 if 0 <= end < len(data) - 2 else 1)

    def eof_received(self) -> bool:
        self.eof = True
        # Requests already read are still answered (the socket is only
        # half closed); then the connection closes.
        if not self.waiting:
            self._work(self._first_turn())
        return True

    def pause_writing(self) -> None:
        # The client does not read its replies: nothing more is read from
        # it or answered until it does (resume_writing).
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.waiting:
            self._work(self._first_turn())

    def connection_lost(self, error: Exception | None) -> None:
        if error is not None:
            log.info("policy client %s: %s; closing", self.peer, error.__class__.__name__)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        self.server._closed(self)

    # -- the work ---------------------------------------------------------------

    def _work(self, turn: int = 1) -> int:
        """Answers up to `turn` requests, until one must wait for a thread;
        more wait for a turn in the server's round.  Returns how many
        requests it took."""
        requests = self.requests
        taken = 0
        while not self.busy and not self.write_paused and not self.held \
                and self.transport is not None:
            if self.unchecked >= UNREAD_CHECK and self._reads_too_little():
                self._hold()
                break
            if not turn:
                if requests.buffered:
                    self._pause_reading()
                    self.pipelining = True
                    if not self.waiting:
                        self.waiting = True
                        self.server._wait_turn(self)
                    return taken
                break
            try:
                attributes = requests.next()
            except ProtocolError as error:
                log.warning("policy client %s: %s; closing", self.peer, error)
                self.close()
                return taken
            if attributes is None:
                break
            turn -= 1
            taken += 1
            # What follows this request arrived with the last read at the
            # earliest: the next request's deadline counts from there.
            self.began = self.last
            answer = self.server._answer(self, attributes)
            if answer is None:
                self.close()
                return taken
            if isinstance(answer, _Deciding):
                self.busy = True
                answer.callback = self._decided
                break
            self._send(answer)
        if self.transport is None or self.busy or self.write_paused or self.held:
            if requests.buffered or self.held:
                self._pause_reading()
            return taken
        if self.eof or (self.closing and (self.read_paused or not requests.pending)):
            if self.eof and requests.partial:
                log.warning("policy client %s: connection closed inside a request", self.peer)
            self.close()
            return taken
        if self.read_paused and not self.closing:
            self.read_paused = False
            self.transport.resume_reading()
        if requests.partial and not self.deadline_set:
            # The client owes the rest of a request: it has until the
            # deadline, however slowly its octets come, and no longer than
            # idle_timeout of silence (or of being held) when that comes
            # first.  _check_idle sets the timer for whichever is due.
            if self.timer is not None:
                self.timer.cancel()
            self._check_idle()
        return taken

    def _first_turn(self) -> int:
        """The turn to answer with now, outside the round: none when more
        octets wait read (requests, or part of one: they take turns, within
        PIPELINE_SHARE), one otherwise (Postfix's next request)."""
        return 0 if self.requests.buffered else 1

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _decided(self, request: Request, decision: Decision | None,
                 error: Exception | None) -> None:
        self.busy = False
        if error is not None:
            self.server._engine_failed(self, request, error)
            self.close()
            return
        assert decision is not None   # the pool gives a decision or an error
        text = self.server._finish(self, request, decision)
        if text is None:
            self.close()
        elif self.transport is not None:
            self._send(text)
            if not self.waiting:
                self._work(self._first_turn())

    def _send(self, text: str) -> None:
        assert self.transport is not None   # only while connected
        reply = encode_reply(text)
        self.transport.write(reply)
        if self.pipelining and self.sock is not None:
            self.unchecked += len(reply)
        self.last = self.server._loop.time()

    def _reads_too_little(self) -> bool:
        """Whether the client holds more of our replies unread than it
        may: UNREAD_LIMIT, or once held, half of it until it has read down
        to that (then it is no longer held)."""
        unread = self._unread()
        if self.held_since is None:
            return unread > UNREAD_LIMIT
        if unread > UNREAD_LIMIT // 2:
            return True
        self.held_since = None
        self.patience = HOLD_RECHECK
        return False

    def _unread(self) -> int:
        """Octets of our replies the client has not read (UNREAD_LIMIT)."""
        self.unchecked = 0
        window, unacknowledged = _tcp_window(self.sock)
        self.window = max(self.window, window)
        return self.window - window + unacknowledged

    def _hold(self) -> None:
        self.held = True
        if self.held_since is None:
            self.held_since = self.server._loop.time()
        self._pause_reading()
        self.server._loop.call_later(self.patience, self._look_again)
        self.patience = min(self.patience * 2, HOLD_RECHECK_MAX)

    def _look_again(self) -> None:
        if self.transport is None or not self.held:
            return
        self.held = False
        if self._reads_too_little():
            assert self.held_since is not None   # still held: only False clears it
            if self.closing and self.server._stopping \
                    and self.server._loop.time() - self.held_since >= LATE_READ:
                # Held since the stop began (stop() closes those held before)
                # and not read for LATE_READ.
                self._close_unread_at_stop()
                return
            # One more reply, and then the check again (HOLD_RECHECK_MAX).
            self.unchecked = UNREAD_CHECK - 1
        if not self.waiting:
            self._work()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        loop = self.server._loop
        now = loop.time()
        self.deadline_set = False
        due = self.idle_timeout
        if self.requests.partial and not self.busy:
            late = now - self.began
            if late >= self.request_timeout:
                log.warning("policy client %s: request not complete %g s after its "
                            "first octet; closing", self.peer, self.request_timeout)
                self.abort()
                return
            due = self.request_timeout - late
            self.deadline_set = True
        if self.held_since is not None:
            # Held: the replies that look again (_look_again) are not activity.
            held = now - self.held_since
            if held >= self.idle_timeout:
                log.info("policy client %s: reads nothing for %g s; closing",
                         self.peer, self.idle_timeout)
                self.abort()
                return
            due = min(due, self.idle_timeout - held)
        waited = now - self.last
        if self.busy or waited < self.idle_timeout:
            # A request in a thread is not idleness; its DNS has limits of
            # its own.  Looked at again idle_timeout later, not every 10 ms,
            # while it runs past that.
            left = self.idle_timeout - waited if waited < self.idle_timeout else self.idle_timeout
            self.timer = loop.call_later(max(min(left, due), 0.01), self._check_idle)
            return
        if self.write_paused:
            log.info("policy client %s: reads nothing for %g s; closing",
                     self.peer, self.idle_timeout)
            self.abort()
            return
        if not self.closing:
            log.info("policy client %s: idle for %g s; closing", self.peer,
                     self.idle_timeout)
        self.close()

    # -- ending -----------------------------------------------------------------

    def stop(self, reading: bool = False) -> None:
        """The server stops: no more reading; what was read is answered.

        `reading`: a connection taken from the queue at stop, which has
        not been read at all yet: its first request is read (within
        LATE_READ seconds) and answered.  So is a request that has not
        come whole yet, or has not been handed to us, on a connection
        otherwise idle."""
        if self.transport is None:
            return
        if self.held_since is not None:
            self._close_unread_at_stop()
            return
        self.closing = True
        if not self.busy and not self.write_paused and (self.requests.partial or (
                not self.requests.pending and _unread_octets(self.transport))):
            # Idle as far as we know, but a request has arrived that the
            # event loop has not handed us yet, or the first part of one
            # (the rest may be a segment behind): answered, not dropped.
            # (A part left after pipelined requests is not waited for: only
            # a client that waits for each answer is owed that.)
            reading = True
        if reading:
            self.idle_timeout = min(self.idle_timeout, LATE_READ)
            if self.timer is not None:
                self.timer.cancel()
            self.deadline_set = False
            self.timer = self.server._loop.call_later(self.idle_timeout, self._check_idle)
            return
        self._pause_reading()
        if not self.waiting:
            self._work()

    def _close_unread_at_stop(self) -> None:
        # It reads nothing: answers would not be read either, and waiting
        # for them would hold the stop for drain_timeout.
        log.info("policy client %s: reads nothing; closing at stop", self.peer)
        self.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _queued(sock: socket.socket) -> int | None:
    """Connections waiting in a TCP listening socket's accept queue (for a
    LISTEN socket Linux reports its queue length as tcpi_unacked,
    net/ipv4/tcp.c tcp_get_info); None where unknown (a UNIX socket)."""
    if sock.family == socket.AF_UNIX:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_UNACKED + 4)
    except OSError:
        return None
    return struct.unpack_from("I", info, _TCP_INFO_UNACKED)[0]


# struct tcp_info (linux/tcp.h): 8 octets of u8 fields, then u32 tcpi_rto,
# tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss, tcpi_unacked.
_TCP_INFO_UNACKED = 8 + 4 * 4
# Further on: u64 tcpi_bytes_acked (Linux 4.1), u32 tcpi_notsent_bytes
# (4.6), u64 tcpi_bytes_sent and tcpi_bytes_retrans (4.19), u32
# tcpi_snd_wnd (5.4).
_TCP_INFO_BYTES_ACKED = 120
_TCP_INFO_NOTSENT = 144
_TCP_INFO_BYTES_SENT = 200
_TCP_INFO_BYTES_RETRANS = 208
_TCP_INFO_SND_WND = 228


def _tcp_window(sock) -> tuple[int, int]:
    """(the window the peer last advertised, counted from what it has
    acknowledged; octets sent and not yet acknowledged plus those
    waiting in our send queue): (0, 0) where the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SND_WND + 4)
    except OSError:
        return 0, 0
    if len(info) < _TCP_INFO_SND_WND + 4:
        return 0, 0
    acked, = struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)
    sent, retransmitted = struct.unpack_from("QQ", info, _TCP_INFO_BYTES_SENT)
    unsent, = struct.unpack_from("I", info, _TCP_INFO_NOTSENT)
    window, = struct.unpack_from("I", info, _TCP_INFO_SND_WND)
    return window, max(sent - retransmitted - acked, 0) + unsent


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _unread_octets(transport: asyncio.BaseTransport) -> int:
    """How many octets the kernel holds for us on the connection, not yet
    read (FIONREAD, tcp(7) and unix(7) SIOCINQ)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, count, True)
    except OSError:
        return 0
    return count[0]


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{transport.get_extra_info('sockname') or '?'}"


def _sock_name(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "?"
    return name if isinstance(name, str) else f"{name[0]}:{name[1]}"


