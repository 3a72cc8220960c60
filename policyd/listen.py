"""What both front-ends do alike with the sockets they listen on.

The policy service (policyd/policy/server.py) and the milter
(policyd/milter/runner.py) parse different listen specs (Postfix's
`inet:HOST:PORT`, libmilter's `inet:PORT@HOST`) but refuse a bad one the
same way and treat a UNIX socket left on disk the same way.
"""
from __future__ import annotations

import grp
import logging
import os
import socket
import stat

log = logging.getLogger("policyd")


class ListenError(Exception):
    """A listen address that cannot be used; the message says which and why."""


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
