"""`policyd milter`: the milter process's life: listen, drop privileges,
run libmilter, reload, stop.

A process of its own, not a thread of the policy service: libmilter owns
SIGHUP, SIGTERM and SIGINT (its signal thread stops the milter on each), so
the policy service's SIGHUP reload cannot live beside it.

Threads.  libmilter's main loop (`smfi_main`, through pymilter) runs in a
thread of its own, with one more thread per MTA connection.  The main
thread stays in Python, so that Python signal handlers run (CPython runs
them in the main thread only, between bytecodes):

- SIGUSR1 reloads: the file is parsed and validated first, then one
  reference is swapped; sessions in flight keep the engine they began with;
  a bad file keeps the running config and says so in one log line.
- SIGTERM, SIGINT and SIGHUP stop: new connections are refused (the MTA
  applies its default action to them, as when the milter is down),
  sessions in flight get `milter.drain_timeout` to finish, then the
  process exits.  SIGHUP stops because libmilter's own signal thread would
  stop on it anyway: Linux gives a process-directed signal to the main
  thread when it does not block it, but not always, and libmilter's thread
  stops the listener itself (within 5 s) and lets sessions run on, so the
  outcome is the same either way, except that libmilter aborts sessions in
  flight on SIGINT.

The listening socket is ours, handed to libmilter as `fd:N`: it is bound
before privileges are dropped, a UNIX socket gets its mode without a
window, and a TCP socket gets TCP_NODELAY, which Linux passes on to the
accepted connections.  Without it libmilter's small writes at end of
message (a header edit, then the final reply) meet Nagle's algorithm and
the MTA's delayed ACK: about 40 ms per message (PROTOCOLS.md §2).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass

import Milter
import milter

from ..config import Config, ConfigError
from ..daemon import reload_engine
from ..dns import Resolver
from ..engine import Engine
from ..service import drop_privileges, start_metrics
from .frontend import ACTIONS, PolicyMilter

log = logging.getLogger("policyd.milter")

# The name libmilter registers; Sendmail's INPUT_MAIL_FILTER names it too.
MILTER_NAME = "policyd"

# sysexits.h EX_UNAVAILABLE: the socket cannot be had (in use, no such
# address); a service manager may retry later.
EX_UNAVAILABLE = 69

# A UNIX socket is created with this mode: the MTA's user connects through
# the group (contrib/sendmail/README).
UNIX_SOCKET_MODE = 0o660

# How long a stop may wait for libmilter's main loop to notice it; each
# wait is followed by a connection that wakes its select().
STOP_POLL = 0.02


class ListenError(Exception):
    """A listen address that cannot be used; the message says which and why."""


@dataclass
class Listener:
    spec: str
    socket: socket.socket
    unix_path: str = ""
    unix_inode: tuple[int, int] | None = None

    @property
    def wake_address(self):
        """Where to connect to wake libmilter's select()."""
        if self.unix_path:
            return self.unix_path
        host, port = self.socket.getsockname()[:2]
        address = ipaddress.ip_address(host)
        if address.is_unspecified:
            host = "::1" if address.version == 6 else "127.0.0.1"
        return host, port

    def close(self) -> None:
        """libmilter closes the descriptor itself when it stops; forget it
        here (closing it again could close an unrelated file that took its
        number) and remove our socket file."""
        self.socket.detach()
        if self.unix_path:
            try:
                info = os.lstat(self.unix_path)
                if (info.st_dev, info.st_ino) == self.unix_inode:
                    os.unlink(self.unix_path)
            except OSError:
                pass


def parse_listen(spec: str) -> tuple[str, str, int | None]:
    """libmilter's socket syntax as (kind, where, port): `inet:PORT@HOST`,
    `inet6:PORT@HOST` (HOST optional: every address), `unix:PATH`,
    `local:PATH`."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local") and rest:
        return "unix", rest, None
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit() and 0 < int(port) < 65536:
            return kind, host.strip("[]"), int(port)
    raise ListenError(f"{spec!r} is not inet:PORT@HOST, inet6:PORT@HOST or unix:PATH")


def open_listener(spec: str, owner: str | None = None) -> Listener:
    """Binds and listens; `owner` (a user name) gets the UNIX socket file."""
    kind, where, port = parse_listen(spec)
    try:
        if kind == "unix":
            return _open_unix(spec, os.path.abspath(where), owner)
        family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
        addresses = socket.getaddrinfo(where or None, port, family, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(addresses[0][4])
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        return Listener(spec, sock)
    except (OSError, UnicodeError) as error:
        raise ListenError(f"{spec}: {getattr(error, 'strerror', None) or error}") from None


def _open_unix(spec: str, path: str, owner: str | None) -> Listener:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The mode comes from the umask at bind(); set it for the bind alone
    # (one thread at this point) so the socket is never more open.
    previous = os.umask(0o777 & ~UNIX_SOCKET_MODE)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(previous)
    info = os.stat(path)
    listener = Listener(spec, sock, path, (info.st_dev, info.st_ino))
    try:
        if owner:
            import pwd
            entry = pwd.getpwnam(owner)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    return listener


def _remove_stale_socket(path: str) -> None:
    """Removes a socket left by a milter that is gone; refuses to remove
    anything else, or a socket somebody still answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"unix:{path}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            return
    raise ListenError(f"unix:{path}: another milter is listening on it")


class RefusedSession(Milter.Base):
    """A connection that comes while the milter stops: refused at option
    negotiation, so libmilter closes it and the MTA applies its default
    action, as when the milter is down (milter_default_action, F=)."""

    def negotiate(self, opts):
        return Milter.REJECT


class Sessions:
    """The engine new sessions get, and the sessions in flight."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._open = 0
        self._refusing = False
        self._changed = threading.Condition()

    def new_session(self) -> PolicyMilter | RefusedSession:
        """Milter.factory: libmilter calls it once per MTA connection."""
        with self._changed:
            if self._refusing:
                return RefusedSession()
            self._open += 1
        return PolicyMilter(self.engine, self._closed)

    def refuse_new(self) -> None:
        with self._changed:
            self._refusing = True

    def _closed(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @property
    def open(self) -> int:
        with self._changed:
            return self._open

    def wait_until_idle(self, timeout: float) -> int:
        """Waits for every session to close, at most `timeout` seconds;
        returns how many are still open."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._open > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self._open


class _MilterThread(threading.Thread):
    """libmilter's main loop; `error` holds why it could not run."""

    def __init__(self, listener: Listener, timeout: int):
        super().__init__(name="libmilter", daemon=True)
        self.listener, self.timeout = listener, timeout
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            # rmsock=False: the socket is ours (fd:), not libmilter's to remove.
            Milter.runmilter(MILTER_NAME, f"fd:{self.listener.socket.fileno()}",
                             self.timeout, rmsock=False)
        except milter.error as error:
            self.error = error


def run(config_path: str | None, config: Config, user: str | None = None) -> int:
    """Runs the milter until SIGTERM; returns the exit status."""
    try:
        listener = open_listener(config.milter.listen, owner=user)
    except ListenError as error:
        log.error("cannot listen: %s", error)
        return EX_UNAVAILABLE
    if user:
        drop_privileges(user)
    sessions = Sessions(Engine(config, Resolver(config.dns)))
    try:
        start_metrics(config.metrics.listen, sessions.engine.resolver)
    except OSError as error:
        # `policyd serve --milter` runs us as its child on the same config,
        # and it has the port already.  Mail goes on without our metrics.
        log.warning("metrics endpoint %s not started: %s", config.metrics.listen,
                    error.strerror or error)
    Milter.factory = sessions.new_session
    milter.set_flags(ACTIONS)
    main_loop = _MilterThread(listener, config.milter.timeout)
    stopping = threading.Event()

    def reload(signum, frame) -> None:
        current = sessions.engine
        try:
            new = reload_engine(config_path, current)
        except ConfigError as error:
            log.error("reload refused, keeping the running config: %s", error)
            return
        if new.config.milter.listen != current.config.milter.listen:
            log.warning("reload: milter.listen changed; restart to apply it")
        sessions.engine = new
        log.info("reloaded config %s", new.config.source)

    def stop(signum, frame) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP stops the milter (libmilter's convention); "
                     "SIGUSR1 reloads the config")
        stopping.set()

    signal.signal(signal.SIGUSR1, reload)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    main_loop.start()
    log.info("milter on %s (config %s, dns %s, %s)", config.milter.listen, config.source,
             ",".join(sessions.engine.resolver.nameservers),
             sessions.engine.resolver.trust_reason)
    while main_loop.is_alive() and not stopping.is_set():
        # Wakes for signals: a lock wait is interrupted to run handlers.
        stopping.wait(1.0)
    if main_loop.error is not None:
        log.error("libmilter stopped: %s", main_loop.error)
        listener.close()
        return EX_UNAVAILABLE
    # Sessions first, libmilter's loop after: smfi_stop() can end sessions
    # in flight (a race in libmilter's listener.c turns a stop into an
    # abort), so it comes when there are none left to end.
    sessions.refuse_new()
    log.info("stopping: new connections are refused, %d session(s) in flight",
             sessions.open)
    remaining = sessions.wait_until_idle(config.milter.drain_timeout)
    _stop_main_loop(main_loop, listener)
    listener.close()
    if remaining:
        log.warning("stopped with %d session(s) still open after %.1f s; "
                    "the MTA applies its default action to them",
                    remaining, config.milter.drain_timeout)
        # Their threads are libmilter's, still inside the interpreter:
        # leave without finalizing it under them.
        logging.shutdown()
        os._exit(0)
    log.info("stopped")
    return 0


def _stop_main_loop(main_loop: _MilterThread, listener: Listener) -> None:
    """smfi_stop() waits for libmilter's select() (up to 5 s, MI_CHK_TIME
    in listener.c) before it closes the socket.  So it runs in a thread of
    its own while we connect to the socket: each connection ends a
    select(), and the first after the stop flag is set ends the loop."""
    if not main_loop.is_alive():
        return   # libmilter's own signal thread stopped it
    threading.Thread(target=milter.stop, name="libmilter-stop", daemon=True).start()
    family = socket.AF_UNIX if listener.unix_path else listener.socket.family
    address = listener.wake_address
    while main_loop.is_alive():
        with socket.socket(family, socket.SOCK_STREAM) as wake:
            wake.settimeout(1.0)
            try:
                wake.connect(address)
            except OSError:
                pass   # closed already: the loop is ending
        main_loop.join(STOP_POLL)
