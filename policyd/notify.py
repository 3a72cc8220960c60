"""Readiness for systemd (sd_notify(3)) without a library: one datagram
of newline-separated assignments to the UNIX socket $NOTIFY_SOCKET names.

The supervisor says READY=1 once it listens, RELOADING=1 when it starts
a reload (then READY=1 again), STOPPING=1 when it starts to drain.
Without $NOTIFY_SOCKET (not started by systemd, or Type= is not notify)
every call does nothing.  A failure is logged, never raised: readiness
is systemd's business, the mail is ours.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("policyd")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _address(name: str) -> str | None:
    """The address to send to: a path, or an abstract name written with a
    leading @ (sd_notify(3)), which the kernel takes with a leading NUL."""
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return "\0" + name[1:]
    return None


def notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1") as one datagram; True if it was sent."""
    name = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not name:
        return False
    address = _address(name)
    if address is None:
        log.warning("%s=%r: not a UNIX socket path or @name; systemd not notified",
                    NOTIFY_SOCKET_ENV, name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as error:
        log.warning("systemd not notified of %s: %s", state.split("\n", 1)[0],
                    error.strerror or error)
        return False
    return True


def ready(status: str = "") -> bool:
    """Once every socket listens (and again after a reload)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    """At the start of a reload.  MONOTONIC_USEC is what Type=notify-reload
    (systemd 253) requires with it, to tell this reload from an earlier one."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    """When the drain begins."""
    return notify("STOPPING=1")
