"""policyd/notify.py: sd_notify's datagrams, as systemd receives them."""
from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from policyd import notify


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's, named in $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_is_one_datagram(receiver):
    assert notify.ready()
    assert receiver.recv(4096) == b"READY=1"
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(4096)


def test_ready_with_a_status(receiver):
    assert notify.ready("listening on unix:/x")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=listening on unix:/x"


def test_stopping(receiver):
    assert notify.stopping()
    assert receiver.recv(4096) == b"STOPPING=1"


def test_reloading_carries_the_monotonic_time(receiver):
    before = time.monotonic_ns() // 1000
    assert notify.reloading()
    first, second = receiver.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    name, _, value = second.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= time.monotonic_ns() // 1000


def test_abstract_socket_name(monkeypatch):
    name = f"policyd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False


@pytest.mark.parametrize("name", ["vsock:2:1234", "@", "relative/path"])
def test_an_address_we_cannot_use_is_one_warning(monkeypatch, caplog, name):
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    with caplog.at_level(logging.WARNING, logger="policyd"):
        assert notify.ready() is False
    assert [r.getMessage() for r in caplog.records] == \
        [f"NOTIFY_SOCKET={name!r}: not a UNIX socket path or @name; systemd not notified"]


def test_a_socket_nobody_listens_on_is_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="policyd"):
        assert notify.stopping() is False
    assert [r.getMessage() for r in caplog.records] == \
        ["systemd not notified of STOPPING=1: No such file or directory"]
