"""The listening sockets of every front-end: one Listener type, binding
(TCP over IPv4 and IPv6, UNIX sockets with their mode, group, owner and
stale-file rules), and beside it each front-end's spec grammar: Postfix's
`inet:HOST:PORT` / `unix:PATH` (policy delegation, socketmap) and
libmilter's `inet:PORT@HOST` / `inet6:PORT@HOST` / `unix:PATH`."""
from __future__ import annotations

import grp
import ipaddress
import logging
import os
import pwd
import socket
import stat
import typing
from dataclasses import dataclass, field
from typing import NamedTuple

log = logging.getLogger("policyd")

# Postfix opens one connection per smtpd process; 1024 pending accepts is
# far more than a burst of them.
POSTFIX_BACKLOG = 1024

# A milter's UNIX socket when no mode is configured: the MTA's user
# connects through the group (contrib/sendmail/README.md).
UNIX_SOCKET_MODE = 0o660


class ListenError(Exception):
    """A listen address that cannot be used; the message says which and why."""


class Endpoint(NamedTuple):
    """A parsed listen spec: ("inet" or "inet6", host, port), the host ""
    for every address, or ("unix", path, None)."""
    kind: str
    where: str
    port: int | None


def parse_postfix(spec: str) -> Endpoint:
    """Postfix's notation (policy delegation, socketmap_table(5)):
    `inet:HOST:PORT`, `inet:[V6]:PORT` or `unix:PATH`."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return Endpoint("unix", rest, None)
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            host = ""   # an IPv6 address goes in brackets, as in Postfix
        if host and port.isdigit() and int(port) < 65536:
            return Endpoint("inet", host, int(port))
    raise ListenError(f"{spec!r} is not inet:HOST:PORT, inet:[IPV6]:PORT or unix:PATH")


def parse_milter(spec: str) -> Endpoint:
    """libmilter's notation (smfi_setconn(3)): `inet:PORT@HOST`,
    `inet6:PORT@HOST` (HOST optional: every address), `unix:PATH`,
    `local:PATH`."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local") and rest:
        return Endpoint("unix", rest, None)
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit() and 0 < int(port) < 65536:
            return Endpoint(kind, host.strip("[]"), int(port))
    raise ListenError(f"{spec!r} is not inet:PORT@HOST, inet6:PORT@HOST or unix:PATH")


@dataclass(frozen=True)
class UnixSocket:
    """How a UNIX socket file is made: `mode`; `group` (a name or a number)
    and `owner` (a user name) it is given, if set; `section`: the config
    section named in errors (`policy.socket_group: no group 'x'`);
    `holder`: who else could be listening on it, for the error that says
    so; `make_directory`: its directory is created if missing."""
    mode: int = UNIX_SOCKET_MODE
    group: str = ""
    owner: str | None = None
    section: str = "policy"
    holder: str = "server"
    make_directory: bool = False


@dataclass
class Listener:
    """The sockets bound and listening for one listen spec (one for a UNIX
    path or a numeric address, one per address of a host name), made
    before any worker process exists.  `addresses`: where it listens, with
    the real ports, as `inet:HOST:PORT` or `unix:PATH`."""
    spec: str
    sockets: list[socket.socket]
    unix_path: str = ""
    unix_inode: tuple[int, int] | None = None   # (st_dev, st_ino) of the file we bound
    addresses: list[str] = field(default_factory=list)

    @property
    def socket(self) -> socket.socket:
        """The socket of a listener that has one (libmilter takes one)."""
        return self.sockets[0]

    @property
    def wake_address(self) -> str | tuple[str, int]:
        """Where to connect to reach the (first) socket: a wildcard address
        through loopback."""
        if self.unix_path:
            return self.unix_path
        host, port = self.socket.getsockname()[:2]
        address = ipaddress.ip_address(host)
        if address.is_unspecified:
            host = "::1" if address.version == 6 else "127.0.0.1"
        return host, port

    def close(self, remove_socket: bool = True) -> None:
        for sock in self.sockets:
            sock.close()
        if remove_socket:
            self.remove_socket_file()

    def forget(self) -> None:
        """For a socket something else (libmilter) has closed: forget the
        descriptor (closing it again could close an unrelated file that
        took its number)."""
        for sock in self.sockets:
            sock.detach()

    def remove_socket_file(self) -> None:
        """Our UNIX socket file, if it is still ours (not one a newer
        server bound in its place)."""
        if self.unix_path:
            remove_own_socket(self.unix_path, self.unix_inode)


def bind_all(specs: typing.Iterable[str],
             bind: typing.Callable[[str], Listener]) -> list[Listener]:
    """Every spec bound with `bind`, or none: what was bound is closed again
    when one fails, and the error goes on."""
    bound: list[Listener] = []
    try:
        for spec in specs:
            bound.append(bind(spec))
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    return bound


def bind_postfix(spec: str, unix: UnixSocket) -> Listener:
    """Binds one listen spec in Postfix's notation, non-blocking, for an
    event loop: a host name's every address (as Postfix does), IPv6 ones
    IPv6 only; raises ListenError."""
    kind, where, port = parse_postfix(spec)
    if kind == "unix":
        return bind_unix(spec, where, unix, POSTFIX_BACKLOG, blocking=False)
    return bind_tcp(spec, where, port, backlog=POSTFIX_BACKLOG, blocking=False)


def bind_milter(spec: str, owner: str | None = None, reuse_port: bool = False,
                listen: bool = True, mode: int = UNIX_SOCKET_MODE,
                group: str = "") -> Listener:
    """Binds a libmilter spec as libmilter would (the first address of the
    host, IPv4 for inet, IPv6 for inet6), with TCP_NODELAY, which accepted
    connections inherit; `owner` (a user name) gets the UNIX socket file,
    with `mode` and, if given, `group`; `reuse_port` sets SO_REUSEPORT
    (bind_milter_slots); `listen` False: bound only."""
    kind, where, port = parse_milter(spec)
    if kind == "unix":
        return bind_unix(spec, where, UnixSocket(mode, group, owner, "milter", "milter"),
                         socket.SOMAXCONN)
    return bind_tcp(spec, where or None, port,
                    socket.AF_INET6 if kind == "inet6" else socket.AF_INET,
                    first_only=True, v6only=False, reuse_port=reuse_port, nodelay=True,
                    backlog=socket.SOMAXCONN if listen else None)


def bind_milter_slots(spec: str, count: int, owner: str | None = None,
                      mode: int = UNIX_SOCKET_MODE, group: str = "") -> list[Listener]:
    """The socket of each of `count` worker slots: for inet and inet6 one
    each, bound with SO_REUSEPORT so that the kernel spreads connections
    among them; for a UNIX socket (which Linux does not spread) the same
    shared one in every slot."""
    if count == 1 or parse_milter(spec).kind == "unix":
        return [bind_milter(spec, owner, mode=mode, group=group)] * count
    # Bound once without SO_REUSEPORT first: a port that somebody holds,
    # even a milter with SO_REUSEPORT of its own, is refused here, instead
    # of our sockets joining its group and sharing its connections.
    bind_milter(spec, listen=False).close()
    listeners: list[Listener] = []
    try:
        for _ in range(count):
            listeners.append(bind_milter(spec, reuse_port=True))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def bind_tcp(spec: str, host: str | None, port: int | None,
             family: socket.AddressFamily = socket.AF_UNSPEC, *, first_only: bool = False,
             v6only: bool = True, reuse_port: bool = False, nodelay: bool = False,
             backlog: int | None = POSTFIX_BACKLOG, blocking: bool = True) -> Listener:
    """A socket on each address of `host` in `family` (`first_only`: on
    the first); `backlog` None: bound, not listening.  Raises ListenError
    naming `spec`."""
    sockets: list[socket.socket] = []
    addresses = []
    try:
        try:
            found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
            for address_family, type_, proto, _, address in found[:1] if first_only else found:
                sock = socket.socket(address_family, type_, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if address_family == socket.AF_INET6 and v6only:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind(address)
                if backlog is not None:
                    sock.listen(backlog)
                sock.setblocking(blocking)
                bound_host, bound_port = sock.getsockname()[:2]
                bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host
                addresses.append(f"inet:{bound_host}:{bound_port}")
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
    except (OSError, UnicodeError) as error:
        raise ListenError(f"{spec}: {getattr(error, 'strerror', None) or error}") from None
    return Listener(spec, sockets, addresses=addresses)


def bind_unix(spec: str, path: str, unix: UnixSocket, backlog: int,
              blocking: bool = True) -> Listener:
    """The UNIX socket at `path`, made absolute now (a chrooted Postfix
    reaches /var/spool/postfix/private/policyd as unix:private/policyd),
    so that the stop removes the right file whatever the directory is
    then.  A stale socket file is replaced, nothing else is.  Raises
    ListenError naming `spec`."""
    path = os.path.abspath(path)
    try:
        if unix.make_directory:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_stale_socket(path, unix.holder)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The mode comes from the umask at bind(); set it for the bind alone
        # (one thread binds at this point) so the socket is never more open.
        previous = os.umask(0o777 & ~unix.mode)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(previous)
        info = os.stat(path)
        listener = Listener(spec, [sock], path, (info.st_dev, info.st_ino),
                            addresses=[f"unix:{path}"])
        try:
            # Exactly the mode, whatever a default ACL of the directory did.
            os.chmod(path, unix.mode)
            if unix.owner:
                entry = pwd.getpwnam(unix.owner)
                os.chown(path, entry.pw_uid, entry.pw_gid)
            if unix.group:
                os.chown(path, -1, group_id(unix.group, f"{unix.section}.socket_group"))
            sock.listen(backlog)
            sock.setblocking(blocking)
        except BaseException:
            listener.close()
            raise
        return listener
    except OSError as error:
        raise ListenError(f"{spec}: {error.strerror or error}") from None


def group_id(group: str, setting: str) -> int:
    """The gid of `group` (a name or a number) for a UNIX socket; `setting`
    names the config key in the error."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"{setting}: no group {group!r}") from None


def remove_stale_socket(path: str, what: str = "server") -> None:
    """Removes a UNIX socket left by a `what` that is gone; refuses to
    remove anything else, or a socket somebody still answers on."""
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
    raise ListenError(f"unix:{path}: another {what} is listening on it")


def remove_own_socket(path: str, inode: tuple[int, int] | None) -> None:
    """Removes the socket file unless another server has replaced it
    (`inode`: (st_dev, st_ino) of the one we bound)."""
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
