"""Every process a test started, found again by session id, and stopped.

A daemon started with `start_new_session=True` leads a session of its
own; its workers, its child milter and their workers inherit the session
id, and keep it when the leader dies and they are handed to init.  So the
session id finds the whole tree even after its root is gone, which a walk
down /proc/PID/task/*/children cannot.  Postfix's master does setsid()
itself and is found the same way.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def session_members(session_id: int) -> list[int]:
    """Live processes whose session id (stat field 6) is `session_id`.

    Zombies count as gone: they have exited, and once their parent is dead
    it is init, not us, that reaps them, whenever it gets round to it.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields after the
        # last ")" are state, ppid, pgrp, session.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry))
    return members


def children(pid: int) -> set[int]:
    """The pids of the processes `pid` started and has not reaped, from
    every one of its threads."""
    found = set()
    for task in Path("/proc", str(pid), "task").iterdir():
        try:
            found.update(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:
            pass   # a thread that ended since the listing
    return found


def is_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie has exited (see session_members)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_session_end(session_id: int, timeout: float) -> bool:
    """True once no live process is left in the session, False at timeout."""
    deadline = time.monotonic() + timeout
    while session_members(session_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def signal_session(session_id: int, signum: int) -> None:
    for pid in session_members(session_id):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass   # exited since we looked


def stop_process_session(process: subprocess.Popen, timeout: float) -> None:
    """Stops the leader (`process`, started with start_new_session) and
    every process of its session, each by its pid.

    SIGTERM to the leader, which stops its own children; then SIGTERM to
    any process of the session still there (the orphans of a leader that
    had died: they drain as on a normal stop); SIGKILL for what is left
    after `timeout`.  Returns once the whole session is gone, or raises
    TimeoutError.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        signal_session(process.pid, signum)
        if wait_for_session_end(process.pid, timeout):
            return
    raise TimeoutError(f"processes {session_members(process.pid)} of the session "
                       f"of pid {process.pid} outlived SIGKILL")
