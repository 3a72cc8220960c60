"""What a supervising process and the workers it forks share, for both
front-ends: the policy service (policyd/daemon.py) and the milter
(policyd/milter/runner.py).

- Reloads: the supervisor validates the file and sends the Config itself
  to each worker over a pipe of its own.
- A worker watches its parent, and stops when the parent is gone.
- Workers that die are replaced within a budget.
- A worker is forked with its stop signals blocked until its handlers
  are in place.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import select
import signal
import struct
import time

from .config import Config

log = logging.getLogger("policyd")

# How often a worker looks for its parent.  getppid() changes when the
# parent dies (the worker is handed to init or a subreaper); polling it
# needs no signal that could arrive before the handlers are in place.
PARENT_CHECK_INTERVAL = 0.5

# Workers that die are replaced at most this often: RESTART_LIMIT new
# ones in any RESTART_WINDOW seconds.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0


def fork_with_blocked(signals) -> int:
    """os.fork() with `signals` blocked across it.  The parent gets its
    mask back at once; the child keeps them blocked, so that one sent
    before its handlers are in place waits for them instead of ending it
    by the default action, and unblocks them itself."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


class RestartBudget:
    """At most `limit` restarts within any `window` seconds."""

    def __init__(self, limit: int = RESTART_LIMIT, window: float = RESTART_WINDOW):
        self.limit, self.window = limit, window
        self._times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """Whether a restart at `now` is within the budget; counts it if so."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


# A reload reaches a worker as the parent's validated Config, pickled, in a
# frame of 4-octet length and data on a pipe of its own: the worker must
# not read the file again, which may have changed (or broken) since the
# parent read it, and left some workers on the old config.
_FRAME = struct.Struct("!I")


# How long a worker may take to make room in its pipe for a new Config.
RELOAD_SEND_TIMEOUT = 2.0


def send_config(fd: int, config: Config, timeout: float = RELOAD_SEND_TIMEOUT) -> bool:
    """Writes the whole frame to a non-blocking pipe, waiting for the
    worker to read when the pipe is full; False if it does not within
    `timeout` (stuck), or is gone."""
    data = pickle.dumps(config)
    frame = memoryview(_FRAME.pack(len(data)) + data)
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while frame:
        try:
            frame = frame[os.write(fd, frame):]
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return False
        except OSError:
            return False
    return True


class ConfigReceiver:
    """The worker's end of the pipe: whole frames in, Configs out."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""

    def read(self) -> list[Config] | None:
        """The Configs completed by what could be read; None at EOF."""
        data = os.read(self.fd, 65536)
        if not data:
            return None
        self.buffer += data
        configs = []
        while len(self.buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                break
            # Taken off first: a frame that cannot be read must not block
            # every later one.
            data = self.buffer[_FRAME.size:_FRAME.size + size]
            self.buffer = self.buffer[_FRAME.size + size:]
            try:
                configs.append(pickle.loads(data))
            except Exception:
                log.exception("reload: a config from the parent could not be read")
        return configs
