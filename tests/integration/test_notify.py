"""`policyd serve --milter` under Type=notify: what systemd hears on
$NOTIFY_SOCKET (sd_notify(3)), from the main process, when.

A real datagram socket stands in for systemd's.  READY=1 must come only
once both front-ends answer (systemd then starts Postfix, Before=), a
reload is framed by RELOADING=1 and READY=1, and SIGTERM says STOPPING=1.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.integration.dnsworld import free_port, write_config
from tests.integration.process_session import stop_process_session

POLICYD = [sys.executable, "-m", "policyd"]
START_TIMEOUT = 20.0


class NotifySocket:
    """systemd's end: datagrams with the sender's pid (SO_PASSCRED)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float = START_TIMEOUT) -> tuple[int, dict[str, str]]:
        """(sender pid, assignments) of the next message."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack_from("3i", value)[0] for level, kind, value in ancillary
                   if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
        return pid, dict(line.split("=", 1) for line in data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()


def _policy_answers(port: int) -> bool:
    body = ("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.50\n"
            "helo_name=evil.example\nsender=alice@own.example\n\n")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(body.encode())
            return connection.recv(4096).startswith(b"action=")
    except OSError:
        return False


def _milter_answers(port: int) -> bool:
    """Option negotiation (the milter protocol's first exchange): the
    milter answers with its own SMFIC_OPTNEG packet."""
    negotiate = b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(struct.pack("!I", len(negotiate)) + negotiate)
            header = connection.recv(5)
            return len(header) == 5 and header[4:5] == b"O"
    except OSError:
        return False


@pytest.mark.parametrize("processes, milter_workers", [(1, 1), (2, 2)])
def test_ready_once_both_answer_reloading_then_ready_stopping_at_sigterm(
        tmp_path, unbound, processes, milter_workers):
    policy_port = free_port("127.0.0.1")
    milter_port = free_port("127.0.0.1")
    config = write_config(tmp_path, unbound, f"""
policy: {{listen: ["inet:127.0.0.1:{policy_port}"], processes: {processes}}}
milter: {{listen: "inet:{milter_port}@127.0.0.1", workers: {milter_workers}}}
""")
    notify = NotifySocket(tmp_path / "notify")
    log_path = tmp_path / "policyd.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(POLICYD + ["serve", "--milter", "-c", str(config)],
                                   stderr=log, start_new_session=True,
                                   env={**os.environ, "NOTIFY_SOCKET": notify.path})
    try:
        pid, message = notify.receive()
        assert (pid, message) == (process.pid, {"READY": "1"}), \
            log_path.read_text()
        # Said once both listen and answer, not merely once one of them does.
        assert _policy_answers(policy_port), log_path.read_text()
        assert _milter_answers(milter_port), log_path.read_text()

        process.send_signal(signal.SIGHUP)
        pid, message = notify.receive()
        assert pid == process.pid and message["RELOADING"] == "1"
        assert abs(int(message["MONOTONIC_USEC"]) - time.monotonic_ns() // 1000) < 60e6
        assert notify.receive() == (process.pid, {"READY": "1"})

        process.send_signal(signal.SIGTERM)
        assert notify.receive() == (process.pid, {"STOPPING": "1"})
        assert process.wait(30) == 0, log_path.read_text()
        # Nothing from any other process: NotifyAccess=main would drop it.
        notify.sock.settimeout(0.2)
        with pytest.raises(socket.timeout):
            notify.sock.recv(4096)
    finally:
        stop_process_session(process, 10)
        notify.close()
