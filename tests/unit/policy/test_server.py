"""The policy server's own logic, with a fake engine: when it decides, how it
hands out headers, how it treats bad clients, reload and stop.

The sockets are real (loopback and a temporary directory); only the engine
is fake, so these tests say nothing about SPF or DNS.
"""
import asyncio
import contextlib
import copy
import grp
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
import time

import pytest

from policyd import config as config_module
from policyd.dns import CacheMiss
from policyd.model import Action, Decision, Header, Reply, Request
from policyd.policy.server import AcceptShare, PendingHeaders, PolicyServer
from policyd.runtime.sockets import ListenError

AR = Header("Authentication-Results", "mx.own.example; spf=pass smtp.mailfrom=other.example")
RSPF = Header("Received-SPF", "Pass (mx.own.example: mailfrom other.example pass) "
                              "client-ip=198.51.100.10")
ACCEPT = Decision(Action.ACCEPT, rule="pass", headers=(AR, RSPF))
REJECT = Decision(Action.REJECT, reply=Reply("550", "5.7.23", "SPF fail"), rule="spf.fail")

# Long enough never to fire in a test that does not wait for it.
PATIENCE = 10.0


def make_config(policy: str = "", listen=("inet:127.0.0.1:0",)):
    listen_yaml = "".join(f"\n    - {spec!r}" for spec in listen)
    text = f"authserv_id: mx.own.example\npolicy:\n  listen:{listen_yaml}\n" + policy
    return config_module.parse(text, "test.yaml")


class FakeEngine:
    """Answers with `decide_with(request)` and records every request."""
    per_recipient = False   # as Engine without relay or limits

    def __init__(self, decide_with=lambda request: ACCEPT, config=None, name="engine"):
        self.config = config or make_config()
        self.decide_with = decide_with
        self.requests: list[Request] = []
        self.name = name
        self._lock = threading.Lock()

    def decide(self, request: Request) -> Decision:
        with self._lock:
            self.requests.append(request)
        return self.decide_with(request)

    def decide_cached(self, request: Request) -> Decision:
        # As an engine with nothing cached: every request goes to a thread.
        raise CacheMiss()


def policy_request(**attributes) -> bytes:
    values = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
              "client_address": "198.51.100.10", "helo_name": "helo.other.example",
              "sender": "a@other.example", "recipient": "b@own.example",
              "instance": "i1", "queue_id": ""}
    values.update(attributes)
    return b"".join(f"{k}={v}\n".encode() for k, v in values.items() if v is not None) + b"\n"


@contextlib.asynccontextmanager
async def running(engine, logged=None, **kwargs):
    """A started server; `logged` collects the decisions it logs."""
    def log_decision(request, decision):
        if logged is not None:
            logged.append(decision)

    server = PolicyServer(engine, decision_logger=log_decision, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def connect(server, index=0):
    return await connect_to(server.addresses[index])


async def connect_to(address: str):
    kind, _, where = address.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(where)
    host, _, port = where.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port))


async def ask(reader, writer, request: bytes) -> str:
    writer.write(request)
    reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), PATIENCE)
    assert reply.startswith(b"action=") and reply.count(b"\n") == 2 and b"\r" not in reply
    return reply[len(b"action="):-2].decode()


async def closed_without_reply(reader) -> bool:
    """True when the server closes the connection having sent nothing."""
    return await asyncio.wait_for(reader.read(), PATIENCE) == b""


def run(coroutine):
    return asyncio.run(coroutine)


# --- when to decide, and the headers ----------------------------------------

def test_headers_are_handed_out_once_per_message():
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            replies = [await ask(r, w, policy_request(recipient="b1@own.example")),
                       await ask(r, w, policy_request(recipient="b2@own.example")),
                       await ask(r, w, policy_request(protocol_state="DATA", recipient="")),
                       await ask(r, w, policy_request(protocol_state="END-OF-MESSAGE")),
                       await ask(r, w, policy_request(instance="i2", recipient="c@own.example"))]
            w.close()
            return replies

    replies = run(scenario())
    assert replies == [f"PREPEND {AR}", f"PREPEND {RSPF}", "DUNNO", "DUNNO", f"PREPEND {AR}"]
    assert [r.recipient for r in engine.requests] == ["b1@own.example", "c@own.example"]


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "MAIL", "VRFY", "ETRN",
                                   "END-OF-MESSAGE", "end-of-message", "SOMETHING-NEW"])
def test_other_stages_answer_dunno_without_deciding(state):
    engine = FakeEngine(lambda request: REJECT)

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            reply = await ask(r, w, policy_request(protocol_state=state, recipient=""))
            w.close()
            return reply

    assert run(scenario()) == "DUNNO"
    assert engine.requests == []


def test_reject_at_rcpt_stores_nothing():
    answers = iter([REJECT, ACCEPT])
    engine = FakeEngine(lambda request: next(answers))

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            replies = [await ask(r, w, policy_request(recipient="b1@own.example")),
                       await ask(r, w, policy_request(recipient="b2@own.example"))]
            w.close()
            return replies

    assert run(scenario()) == ["550 5.7.23 SPF fail", f"PREPEND {AR}"]
    assert len(engine.requests) == 2


def test_data_without_an_earlier_rcpt_decides():
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            replies = [await ask(r, w, policy_request(protocol_state="DATA", recipient="")),
                       await ask(r, w, policy_request(protocol_state="DATA", recipient=""))]
            w.close()
            return replies

    assert run(scenario()) == [f"PREPEND {AR}", f"PREPEND {RSPF}"]
    assert [r.protocol_state for r in engine.requests] == ["DATA"]


def test_without_instance_every_rcpt_decides():
    engine = FakeEngine(lambda request: Decision(Action.ACCEPT, headers=(AR,)))

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            replies = [await ask(r, w, policy_request(instance=None)) for _ in range(2)]
            w.close()
            return replies

    assert run(scenario()) == [f"PREPEND {AR}"] * 2
    assert len(engine.requests) == 2


def test_accept_without_headers_is_dunno_and_logged():
    engine = FakeEngine(lambda request: Decision(Action.ACCEPT, rule="none"))
    logged = []

    async def scenario():
        async with running(engine, logged) as server:
            r, w = await connect(server)
            replies = [await ask(r, w, policy_request()), await ask(r, w, policy_request())]
            w.close()
            return replies

    assert run(scenario()) == ["DUNNO", "DUNNO"]
    assert [d.rule for d in logged] == ["none"]


def test_pipelined_requests_are_answered_in_order():
    def slow_for_the_first(request):
        time.sleep(0.2 if request.recipient.startswith("1") else 0)
        return Decision(Action.REJECT, reply=Reply("550", "5.7.1", request.recipient))

    engine = FakeEngine(slow_for_the_first)

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(b"".join(policy_request(recipient=f"{i}@own.example", instance=f"i{i}")
                             for i in (1, 2, 3)))
            data = b""
            while data.count(b"\n\n") < 3:
                chunk = await asyncio.wait_for(r.read(4096), PATIENCE)
                assert chunk
                data += chunk
            w.close()
            return data

    assert run(scenario()) == (b"action=550 5.7.1 1@own.example\n\n"
                               b"action=550 5.7.1 2@own.example\n\n"
                               b"action=550 5.7.1 3@own.example\n\n")


def test_engine_runs_in_worker_threads_concurrently():
    # Four requests meet at a barrier inside the engine: if the server ran
    # them one at a time (or on the event loop) the barrier would time out.
    barrier = threading.Barrier(4, timeout=PATIENCE)

    def meet(request):
        barrier.wait()
        return ACCEPT

    engine = FakeEngine(meet, config=make_config("  workers: 4\n"))

    async def one(server, i):
        r, w = await connect(server)
        reply = await ask(r, w, policy_request(instance=f"n{i}"))
        w.close()
        return reply

    async def scenario():
        async with running(engine) as server:
            return await asyncio.gather(*(one(server, i) for i in range(4)))

    assert run(scenario()) == [f"PREPEND {AR}"] * 4


class CachingEngine(FakeEngine):
    """Decides from its "cache" when the sender is in `cached`; records the
    thread each decision ran in."""

    def __init__(self, cached: set[str]):
        super().__init__()
        self.cached = cached
        self.threads: list[tuple[str, str]] = []

    def decide(self, request: Request) -> Decision:
        self.threads.append((request.sender, threading.current_thread().name))
        return super().decide(request)

    def decide_cached(self, request: Request) -> Decision:
        if request.sender not in self.cached:
            raise CacheMiss()
        return self.decide(request)


def test_cached_decisions_run_on_the_loop_and_misses_in_a_thread():
    engine = CachingEngine(cached={"known@other.example"})
    logged = []

    async def scenario():
        async with running(engine, logged) as server:
            r, w = await connect(server)
            replies = [await ask(r, w, policy_request(sender="known@other.example",
                                                      instance="a")),
                       await ask(r, w, policy_request(sender="new@other.example",
                                                      instance="b"))]
            w.close()
            return replies, threading.current_thread().name

    replies, loop_thread = run(scenario())
    assert replies == [f"PREPEND {AR}"] * 2
    assert engine.threads[0] == ("known@other.example", loop_thread)
    assert engine.threads[1][0] == "new@other.example"
    assert engine.threads[1][1].startswith("policyd-policy")
    assert len(logged) == 2


# --- bad clients ---------------------------------------------------------------

@pytest.mark.parametrize("data, reason", [
    (b"garbage\n", "line without '='"),
    (b"request=smtpd_access_policy\n\n", "request without client_address"),
    (b"request=junk\nclient_address=192.0.2.1\n\n", "not an smtpd_access_policy request"),
    (b"request=smtpd_access_policy\nclient_address=unknown\n\n",
     "client_address is not an IP address"),
    (b"\n", "not an smtpd_access_policy request"),
])
def test_malformed_input_closes_without_writing(data, reason, caplog):
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(data)
            closed = await closed_without_reply(r)
            w.close()
            return closed

    with caplog.at_level(logging.INFO, logger="policyd.policy"):
        assert run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert reason in warnings[0].getMessage()
    assert engine.requests == []


def test_good_request_then_garbage_answers_then_closes():
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(policy_request() + b"garbage\n")
            data = await asyncio.wait_for(r.read(), PATIENCE)
            w.close()
            return data

    assert run(scenario()) == f"action=PREPEND {AR}\n\n".encode()


def test_oversize_line_closes_before_its_newline(caplog):
    engine = FakeEngine(config=make_config("  max_line_length: 100\n"))

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(b"request=smtpd_access_policy\nsender=" + b"a" * 200)   # no newline
            closed = await closed_without_reply(r)
            w.close()
            return closed

    assert run(scenario())
    assert "line longer than 100 octets" in caplog.text


def test_client_data_in_the_warning_is_truncated(caplog):
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(b"x" * 1000 + b"\n")
            await closed_without_reply(r)
            w.close()

    run(scenario())
    assert "x" * 41 not in caplog.text


def test_idle_connection_is_closed():
    engine = FakeEngine(config=make_config("  idle_timeout: 0.2\n"))

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            assert await ask(r, w, policy_request()) == f"PREPEND {AR}"
            started = time.monotonic()
            closed = await closed_without_reply(r)
            w.close()
            return closed, time.monotonic() - started, server.connections

    closed, waited, connections = run(scenario())
    assert closed
    assert waited >= 0.15
    assert connections == 0


def test_engine_failure_closes_without_writing(caplog):
    def broken(request):
        raise RuntimeError("secret internal detail")

    engine = FakeEngine(broken)

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(policy_request())
            closed = await closed_without_reply(r)
            w.close()
            return closed

    assert run(scenario())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_nothing_is_written_before_a_request():
    async def scenario():
        async with running(FakeEngine()) as server:
            r, w = await connect(server)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.read(1), 0.2)
            w.close()

    run(scenario())


# --- listening -----------------------------------------------------------------

def test_listens_on_ipv6_loopback():
    engine = FakeEngine(config=make_config(listen=("inet:[::1]:0",)))

    async def scenario():
        async with running(engine) as server:
            assert server.addresses[0].startswith("inet:[::1]:")
            r, w = await connect(server)
            reply = await ask(r, w, policy_request(client_address="2001:db8:6::25"))
            w.close()
            return reply

    assert run(scenario()) == f"PREPEND {AR}"
    assert engine.requests[0].client_address == ipaddress.IPv6Address("2001:db8:6::25")


def other_group():
    """A group the socket can be given that is not root's primary group."""
    for name in ("postfix", "mail", "daemon", "nogroup"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.skip("no group to chgrp to")


def test_unix_socket_mode_group_and_removal(tmp_path):
    group = other_group()
    path = tmp_path / "spool" / "private" / "policyd"
    engine = FakeEngine(config=make_config(f"  socket_mode: '0620'\n"
                                           f"  socket_group: {group.gr_name}\n",
                                           listen=(f"unix:{path}",)))

    async def scenario():
        async with running(engine) as server:
            info = os.stat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o620
            assert info.st_gid == group.gr_gid
            r, w = await connect(server)
            reply = await ask(r, w, policy_request())
            w.close()
            return reply

    assert run(scenario()) == f"PREPEND {AR}"
    assert not path.exists()


def test_relative_unix_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = FakeEngine(config=make_config(listen=("unix:private/policyd",)))

    async def scenario():
        async with running(engine) as server:
            assert server.addresses == [f"unix:{tmp_path}/private/policyd"]
            monkeypatch.chdir("/")
            r, w = await connect(server)
            reply = await ask(r, w, policy_request())
            w.close()
            return reply

    assert run(scenario()) == f"PREPEND {AR}"
    assert not (tmp_path / "private" / "policyd").exists()


def test_stale_unix_socket_is_replaced(tmp_path):
    path = tmp_path / "policyd"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()   # the file stays, nobody answers
    engine = FakeEngine(config=make_config(listen=(f"unix:{path}",)))

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            reply = await ask(r, w, policy_request())
            w.close()
            return reply

    assert run(scenario()) == f"PREPEND {AR}"


def test_live_unix_socket_is_not_stolen(tmp_path):
    path = tmp_path / "policyd"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen()
    try:
        engine = FakeEngine(config=make_config(listen=(f"unix:{path}",)))
        with pytest.raises(ListenError, match="another server is listening"):
            run(PolicyServer(engine, decision_logger=lambda r, d: None).start())
        assert path.exists()
    finally:
        live.close()


def test_regular_file_is_not_removed(tmp_path):
    path = tmp_path / "policyd"
    path.write_text("precious")
    engine = FakeEngine(config=make_config(listen=(f"unix:{path}",)))
    with pytest.raises(ListenError, match="not a socket"):
        run(PolicyServer(engine, decision_logger=lambda r, d: None).start())
    assert path.read_text() == "precious"


def test_failed_listen_releases_the_others(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        engine = FakeEngine(config=make_config(
            listen=(f"unix:{tmp_path}/first", f"inet:127.0.0.1:{port}")))
        with pytest.raises(ListenError, match=f"inet:127.0.0.1:{port}"):
            run(PolicyServer(engine, decision_logger=lambda r, d: None).start())
    assert not (tmp_path / "first").exists()


# --- reload and stop -------------------------------------------------------------

def blocking_engine(text: str, release: threading.Event, started: threading.Event,
                    config=None):
    def decide(request):
        started.set()
        assert release.wait(PATIENCE)
        return Decision(Action.REJECT, reply=Reply("550", "5.7.1", text))
    return FakeEngine(decide, config=config, name=text)


def test_reload_lets_the_request_in_flight_finish_on_the_old_engine():
    release, started = threading.Event(), threading.Event()
    old = blocking_engine("old", release, started)
    new = FakeEngine(lambda request: Decision(Action.REJECT, reply=Reply("550", "5.7.1", "new")))

    async def scenario():
        async with running(old) as server:
            r, w = await connect(server)
            in_flight = asyncio.ensure_future(ask(r, w, policy_request(instance="a")))
            assert await asyncio.to_thread(started.wait, PATIENCE)
            server.reload(new)
            release.set()
            first = await in_flight
            second = await ask(r, w, policy_request(instance="b"))
            w.close()
            return first, second, server.engine

    first, second, engine = run(scenario())
    assert (first, second) == ("550 5.7.1 old", "550 5.7.1 new")
    assert engine is new
    assert len(old.requests) == len(new.requests) == 1


def test_stop_answers_a_request_the_loop_has_not_read_yet():
    # The request is in the kernel's buffer, the connection idle as far as
    # the server knows, when the stop comes: it is read and answered, not
    # dropped with the connection.
    engine = FakeEngine(lambda request: REJECT)

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        host, _, port = server.addresses[0].partition(":")[2].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=PATIENCE) as client:
            client.sendall(policy_request(instance="first"))
            first = await asyncio.to_thread(client.recv, 4096)
            client.sendall(policy_request(instance="unread"))
            # No await between the send and the stop: the loop cannot have
            # read the request, whatever the scheduling.
            await server.stop()
            replies = await asyncio.to_thread(_read_to_eof, client)
        return first, replies

    first, replies = run(scenario())
    assert first.startswith(b"action=550 5.7.23 SPF fail")
    assert replies == first
    assert [r.instance for r in engine.requests] == ["first", "unread"]


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_a_request_begun_before_stop_is_answered_when_its_rest_comes():
    # A request in two segments, the stop between them: the connection
    # was closed with the first half read and the rest unread, and
    # Postfix got no answer.  Now it has LATE_READ for the rest.
    engine = FakeEngine(config=make_config("  drain_timeout: 5\n"))
    request = policy_request()

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        r, w = await connect(server)
        w.write(request[:len(request) // 2])
        await w.drain()
        await asyncio.sleep(0.1)          # the first half read
        stopping = asyncio.get_running_loop().create_task(server.stop())
        await asyncio.sleep(0.2)
        w.write(request[len(request) // 2:])
        answer = await asyncio.wait_for(r.read(), PATIENCE)   # then the close
        await asyncio.wait_for(stopping, PATIENCE)
        w.close()
        return answer

    assert run(scenario()) == f"action=PREPEND {AR}\n\n".encode()


def test_stop_drains_requests_in_flight():
    release, started = threading.Event(), threading.Event()
    engine = blocking_engine("drained", release, started)

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        busy_r, busy_w = await connect(server)
        idle_r, idle_w = await connect(server)
        address = server.addresses[0]
        in_flight = asyncio.ensure_future(ask(busy_r, busy_w, policy_request()))
        assert await asyncio.to_thread(started.wait, PATIENCE)
        stopping = asyncio.ensure_future(server.stop())
        # The idle connection goes at once; the busy one waits for its reply.
        assert await closed_without_reply(idle_r)
        assert not stopping.done()
        with pytest.raises(ConnectionRefusedError):
            await connect_to(address)
        release.set()
        reply = await in_flight
        eof = await asyncio.wait_for(busy_r.read(), PATIENCE)
        await asyncio.wait_for(stopping, PATIENCE)
        busy_w.close()
        idle_w.close()
        return reply, eof, server.connections

    assert run(scenario()) == ("550 5.7.1 drained", b"", 0)


def test_stop_gives_up_after_the_drain_timeout(caplog):
    release, started = threading.Event(), threading.Event()
    engine = blocking_engine("late", release, started,
                             config=make_config("  drain_timeout: 0.2\n"))

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        r, w = await connect(server)
        w.write(policy_request())
        assert await asyncio.to_thread(started.wait, PATIENCE)
        began = time.monotonic()
        await asyncio.wait_for(server.stop(), PATIENCE)
        took = time.monotonic() - began
        data = await asyncio.wait_for(r.read(), PATIENCE)
        w.close()
        release.set()
        return took, data

    took, data = run(scenario())
    assert data == b""
    assert 0.15 <= took < PATIENCE
    assert "still running after 0.2 s" in caplog.text


def test_stop_closes_the_listening_socket():
    async def scenario():
        server = PolicyServer(FakeEngine(), decision_logger=lambda r, d: None)
        await server.start()
        address = server.addresses[0]
        await server.stop()
        with pytest.raises(ConnectionRefusedError):
            await connect_to(address)

    run(scenario())


# --- the header memory -------------------------------------------------------------

def test_pending_headers_forget_the_least_recently_used():
    pending = PendingHeaders(capacity=2)
    assert pending.start("a", ACCEPT) == AR
    assert pending.start("b", ACCEPT) == AR
    decision, header = pending.next("a")            # "a" is now the most recent
    assert (decision.action, header) == (ACCEPT.action, RSPF)
    assert pending.start("c", ACCEPT) == AR
    assert "b" not in pending and "a" in pending and "c" in pending
    decision, header = pending.next("a")
    assert (decision.action, header) == (ACCEPT.action, None)
    assert decision.trace == () and decision.spf == ()   # only what replies need is kept
    pending.forget("a")
    assert len(pending) == 1


def test_pending_headers_second_start_continues_the_first():
    pending = PendingHeaders()
    assert pending.start("a", ACCEPT) == AR
    assert pending.start("a", ACCEPT) == RSPF
    assert pending.start("a", ACCEPT) is None


# --- sharing connections among worker processes -------------------------------

def test_accept_share_keeps_the_workers_within_its_slack():
    # After the fork each worker holds its own AcceptShare over the same
    # shared counts; copies stand for the workers here.
    first = AcceptShare(3)
    second, third = copy.copy(first), copy.copy(first)
    for slot, worker in enumerate((first, second, third)):
        worker.take(slot)
    held = [0, 0, 0]
    # Connections arrive one at a time; every worker is woken and the
    # first that is not over its share takes it (here always the first
    # one asked, the worst case for balance).
    for _ in range(30):
        for index, worker in enumerate((first, second, third)):
            if not worker.over_share():
                worker.change(1)
                held[index] += 1
                break
    assert sum(held) == 30 and max(held) - min(held) <= AcceptShare.SLACK + 1
    second.change(-5)
    assert first.over_share() and third.over_share() and not second.over_share()


def test_a_single_process_is_never_over_its_share():
    share = AcceptShare(1)
    share.take(0)
    share.change(100)
    assert not share.over_share()
    assert not AcceptShare(2).over_share()   # no slot taken: not a worker


def test_a_worker_not_running_has_no_share_to_wait_for():
    first = AcceptShare(2)
    second = copy.copy(first)
    first.take(0)
    first.change(5)
    assert not first.over_share()    # the second worker has not started
    second.take(1)
    assert first.over_share()
    first.release(1)                 # it died; the parent says so
    assert not first.over_share()
    second.take(1)
    assert first.over_share()
    second.leave()                   # it stops accepting
    assert not first.over_share()


def test_others_running_is_whether_another_worker_may_take_a_connection():
    first = AcceptShare(2)
    second = copy.copy(first)
    first.take(0)
    assert not first.others_running()
    second.take(1)
    assert first.others_running() and second.others_running()
    second.leave()
    assert not first.others_running()
    assert not AcceptShare(2).others_running()   # no slot taken: not a worker


def test_stop_answers_a_connection_still_queued_in_the_listener():
    # The client's connect is complete (the kernel's backlog) and its
    # request sent, but the server has not accepted it yet when the stop
    # comes, and holds no other connection.
    engine = FakeEngine()

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        host, _, port = server.addresses[0].partition(":")[2].rpartition(":")
        client = socket.create_connection((host, int(port)), PATIENCE)
        client.sendall(policy_request())
        # No await between the request and the stop: nothing was accepted.
        await asyncio.wait_for(server.stop(), PATIENCE)
        client.settimeout(PATIENCE)
        data = b""
        while chunk := client.recv(4096):
            data += chunk
        client.close()
        return data

    assert run(scenario()) == f"action=PREPEND {AR}\n\n".encode()


# --- clients that pipeline, never read, trickle -------------------------------
#
# The server runs in a child process here (as a policyd worker does), so
# that the clients' threads take no time from its event loop and latency
# is the server's alone.

class LoopEngine(FakeEngine):
    """Decides every request on the event loop, as with a warm cache, at
    about the cost of a real cached decision."""

    def decide_cached(self, request: Request) -> Decision:
        deadline = time.perf_counter() + 30e-6
        while time.perf_counter() < deadline:
            pass
        return REJECT


@contextlib.contextmanager
def server_process(engine_class=LoopEngine, policy: str = ""):
    """(host, port) of a PolicyServer in a forked child, stopped at the end."""
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready_read)
            from policyd.policy import service as daemon
            daemon._use_fast_loop()

            async def serve():
                engine = engine_class(config=make_config(policy))
                server = PolicyServer(engine, decision_logger=lambda r, d: None)
                await server.start()
                os.write(ready_write, server.addresses[0].encode())
                await asyncio.Event().wait()

            asyncio.run(serve())
        finally:
            os._exit(status)
    os.close(ready_write)
    try:
        address = os.read(ready_read, 200).decode()
        host, _, port = address.partition(":")[2].rpartition(":")
        yield host, int(port)
    finally:
        os.close(ready_read)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def round_trips(address, count: int, pause: float = 0.005) -> list[float]:
    """Seconds each of `count` requests took on one connection, Postfix's way."""
    latencies = []
    with socket.create_connection(address, PATIENCE) as sock:
        for i in range(count):
            started = time.monotonic()
            sock.sendall(policy_request(instance=f"probe{i}"))
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                assert chunk, "closed"
                data += chunk
            latencies.append(time.monotonic() - started)
            time.sleep(pause)
    return latencies


class Pipeliners:
    """`count` connections that send requests back to back without waiting
    for replies; `reading`: whether they read the replies at all.  They run
    in a child process of their own, so that their work takes nothing from
    the measuring thread.  `replies`: how many they read, once done."""

    def __init__(self, address, count: int, reading: bool, requests: int = 2000):
        self.address = address
        self.count = count
        self.reading = reading
        self.requests = requests
        self.replies = 0
        self._pid = 0
        self._report = -1

    def __enter__(self):
        report_read, report_write = os.pipe()
        ready_read, ready_write = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:
            try:
                os.close(report_read)
                os.close(ready_read)
                self._run(report_write, ready_write)
            finally:
                os._exit(0)
        os.close(report_write)
        os.close(ready_write)
        self._report = report_read
        os.read(ready_read, 1)   # connected
        os.close(ready_read)
        time.sleep(0.1)          # under way before anyone measures
        return self

    def __exit__(self, *exc_info):
        os.kill(self._pid, signal.SIGTERM)
        self.replies = int(os.read(self._report, 100) or b"0")
        os.close(self._report)
        os.waitpid(self._pid, 0)

    def _run(self, report: int, ready: int) -> None:
        import selectors
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        blob = memoryview(policy_request(protocol_state="RCPT") * self.requests)
        sockets = [socket.create_connection(self.address, PATIENCE) for _ in range(self.count)]
        os.write(ready, b"x")
        selector = selectors.DefaultSelector()
        sent, replies = {}, 0
        for sock in sockets:
            sock.setblocking(False)
            sent[sock] = 0
            selector.register(sock, selectors.EVENT_WRITE |
                              (selectors.EVENT_READ if self.reading else 0))
        while not stop:
            for key, events in selector.select(0.05):
                sock = key.fileobj
                try:
                    if events & selectors.EVENT_READ:
                        replies += sock.recv(65536).count(b"\n\n")
                    if events & selectors.EVENT_WRITE:
                        sent[sock] = (sent[sock] + sock.send(blob[sent[sock]:])) % len(blob)
                except (BlockingIOError, ConnectionError):
                    pass
        os.write(report, str(replies).encode())


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "not-reading"])
def test_pipelining_clients_do_not_hold_up_the_others(reading):
    # Before fair turns one read of a pipelining client (hundreds of
    # requests) was answered in one go while every other client waited:
    # with 20 of them a well-formed client's median went from 0.3 ms to
    # tens of milliseconds.  Now a pipelining client is answered TURN
    # requests at a time, in turns.  The margins are wide (a loaded
    # 2-core machine): 10x the idle median and 20 ms more.
    with server_process() as address:
        idle = median(round_trips(address, 40))
        with Pipeliners(address, 20, reading) as attack:
            loaded = round_trips(address, 40)
    assert median(loaded) < 10 * idle + 0.02, (idle, sorted(loaded))
    if reading:
        # They are served too, only not first: at PIPELINE_SHARE, about
        # 100 replies in this third of a second.
        assert attack.replies > 30, attack.replies


def test_a_trickled_request_is_closed_at_its_deadline(caplog):
    # Each octet restarts idle_timeout; before the deadline a request sent
    # an octet at a time kept its connection open for ever.
    engine = FakeEngine(config=make_config("  idle_timeout: 30\n  request_timeout: 0.6\n"))
    request = policy_request()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            # The first request trickles in well within its deadline and is
            # answered; the deadline starts again with the next.
            for offset in range(0, len(request), 40):
                w.write(request[offset:offset + 40])
                await asyncio.sleep(0.05)
            first = await asyncio.wait_for(r.readuntil(b"\n\n"), PATIENCE)
            started = time.monotonic()
            closed = False
            for octet in request:
                w.write(bytes([octet]))
                if closed := await _closed_within(r, 0.05):
                    break
            closed_after = time.monotonic() - started
            w.close()
            return first, closed, closed_after

    with caplog.at_level(logging.WARNING, logger="policyd.policy"):
        first, closed, closed_after = run(scenario())
    assert first == f"action=PREPEND {AR}\n\n".encode()
    assert closed, "the trickling client was never closed"
    assert 0.5 <= closed_after < 5
    assert "request not complete 0.6 s after its first octet; closing" in caplog.text
    assert len(engine.requests) == 1


def test_half_a_request_and_then_silence_is_closed_after_idle_timeout(caplog):
    # The request's deadline replaced the idle timer: with idle_timeout
    # shorter than request_timeout, a client that went silent inside a
    # request (or was held inside one, not reading its replies) was
    # closed only at the deadline, here 105 s.
    engine = FakeEngine(config=make_config("  idle_timeout: 0.5\n  request_timeout: 105\n"))
    request = policy_request()

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            w.write(request[:len(request) // 2])
            started = time.monotonic()
            closed = await _closed_within(r, PATIENCE)
            w.close()
            return closed, time.monotonic() - started

    with caplog.at_level(logging.INFO, logger="policyd.policy"):
        closed, closed_after = run(scenario())
    assert closed, "still open"
    assert 0.4 <= closed_after < 2, closed_after
    assert "idle for 0.5 s; closing" in caplog.text
    assert engine.requests == []


async def _closed_within(reader, seconds: float) -> bool:
    """True when the server closed the connection within `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except asyncio.TimeoutError:
        return False
    except ConnectionError:
        return True


# --- floods and descriptors -----------------------------------------------------

@contextlib.contextmanager
def worker_processes(count: int, policy: str = "", before=None):
    """(host, port) served by `count` forked PolicyServers on one listening
    socket with an AcceptShare, as `policyd serve` runs its workers;
    `before()` runs in each worker first."""
    config = make_config(policy)
    from policyd.policy.server import bind_listener
    listener = bind_listener("inet:127.0.0.1:0", config.policy)
    share = AcceptShare(count)
    ready_read, ready_write = os.pipe()
    pids = []
    for slot in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_read)
                if before is not None:
                    before()
                from policyd.policy import service as daemon
                daemon._use_fast_loop()
                share.take(slot)

                async def serve():
                    server = PolicyServer(FakeEngine(config=config), bound=[listener],
                                          share=share, decision_logger=lambda r, d: None)
                    await server.start()
                    os.write(ready_write, b"x")
                    await asyncio.Event().wait()

                asyncio.run(serve())
            finally:
                os._exit(1)
        pids.append(pid)
    os.close(ready_write)
    try:
        for _ in range(count):
            assert os.read(ready_read, 1) == b"x"
        yield listener.sockets[0].getsockname()[:2]
    finally:
        os.close(ready_read)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        listener.close()


def connect_and_close_flood(address, seconds: float, send: bytes = b"",
                            rate: float = 0) -> tuple[int, int]:
    """In a child process: connects that close at once, as fast as it can,
    for `seconds`; (connects, connects not established at once).  On
    loopback the handshake completes inside connect() unless the listening
    queue is full, when the kernel drops the SYN (ListenOverflows) and the
    client would try again only after a second.  `send`: what each
    connection sends before it closes; `rate`: connects a second at most
    (0: no limit)."""
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import select as select_module
            connects = dropped = 0
            start = time.monotonic()
            end = start + seconds
            while (now := time.monotonic()) < end:
                if rate and connects > (now - start) * rate:
                    time.sleep(0.002)
                    continue
                sock = socket.socket()
                sock.setblocking(False)
                try:
                    sock.connect(address)
                except BlockingIOError:
                    poller = select_module.poll()
                    poller.register(sock, select_module.POLLOUT)
                    if not poller.poll(0):
                        dropped += 1
                if send:
                    try:
                        sock.send(send)
                    except OSError:
                        pass
                sock.close()
                connects += 1
            os.write(report_write, f"{connects} {dropped}".encode())
        finally:
            os._exit(0)
    os.close(report_write)
    try:
        connects, dropped = map(int, os.read(report_read, 100).split())
    finally:
        os.close(report_read)
        os.waitpid(pid, 0)
    return connects, dropped


def fresh_connections(address, count: int, pause: float = 0.01) -> list[float]:
    """Seconds from connect to the first answer, each on a new connection."""
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        with socket.create_connection(address, PATIENCE) as sock:
            sock.sendall(policy_request(protocol_state="CONNECT"))
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                assert chunk, "closed"
                data += chunk
        latencies.append(time.monotonic() - started)
        time.sleep(pause)
    return latencies


@pytest.mark.parametrize("workers, send, rate", [(1, b"", 0), (2, b"", 0), (2, b"x", 4000)],
                         ids=["1-worker", "2-workers", "2-workers-sending"])
def test_a_flood_of_connects_that_close_leaves_the_queue_free(workers, send, rate):
    # Before: with two workers, each over its share in turn as the
    # flood's connections came and went, both waited while the queue
    # overflowed (19 connects in 20 dropped), and a new connection whose
    # SYN is dropped waits a second for its retry.  A flood whose
    # connections send something is set up in full (then read and closed):
    # it is held to a rate two workers take with room to spare, and that
    # they took at 1,000 a second before.
    with worker_processes(workers) as address:
        result = {}
        flood = threading.Thread(
            target=lambda: result.update(zip(("connects", "dropped"),
                                             connect_and_close_flood(address, 2.0,
                                                                     send, rate))))
        flood.start()
        time.sleep(0.2)
        latencies = fresh_connections(address, 60)
        flood.join()
    # Measured before: 42 % dropped with one worker, 94 % with two; now
    # none on an idle machine, and the margin is for a loaded one, where
    # the flood and the workers share two cores with other work.
    assert result["dropped"] < result["connects"] / 4, result
    assert sorted(latencies)[len(latencies) // 2] < 0.1, sorted(latencies)


def _low_descriptor_limit() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _answer_or_close(address, timeout: float) -> bytes | None:
    """The first reply on a new connection; b"" when the server closes it;
    None when neither happens within `timeout`."""
    try:
        sock = socket.create_connection(address, PATIENCE)
    except ConnectionError:
        return b""     # reset as soon as accepted, before connect() returned
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(policy_request(protocol_state="CONNECT"))
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return b""
                data += chunk
            return data
        except ConnectionError:
            return b""
        except TimeoutError:
            return None


def test_out_of_descriptors_a_new_connection_is_closed_at_once():
    # Before: accept() failing with EMFILE paused the listener a second
    # at a time, and new connections waited in the queue until their
    # client gave up; Postfix applies its default_action only then.
    with worker_processes(1, "  idle_timeout: 30\n", before=_low_descriptor_limit) as address:
        held = []
        try:
            for _ in range(80):     # more than the 64 descriptors the worker may have
                try:
                    held.append(socket.create_connection(address, PATIENCE))
                except ConnectionError:
                    pass            # closed at once already, as it should be
            started = time.monotonic()
            assert _answer_or_close(address, 3.0) == b""
            assert time.monotonic() - started < 2.0
        finally:
            for sock in held:
                sock.close()
        # Descriptors free again: served as usual (the spare is back).
        assert _first_answer_once_served(address) == b"action=DUNNO\n\n"
        assert _answer_or_close(address, 3.0) == b"action=DUNNO\n\n"


class _RacingOs:
    """`os` for the server module, where another thread opens a descriptor
    right after the server closes its spare, before its accept: a pool
    thread's DNS socket.  That descriptor is closed again after `hold`
    seconds, or never (None)."""

    def __init__(self, hold: float | None):
        self._hold = hold
        self._raced = False

    def __getattr__(self, name):
        return getattr(os, name)

    def close(self, fd: int) -> None:
        os.close(fd)
        if not self._raced:
            self._raced = True
            taken = os.open(os.devnull, os.O_RDONLY)
            if self._hold is not None:
                threading.Timer(self._hold, os.close, (taken,)).start()


@pytest.mark.parametrize("hold", [0.3, None], ids=["taken-for-a-moment", "taken-for-good"])
def test_out_of_descriptors_a_spare_lost_to_a_race_comes_back(hold):
    # Before: the spare was reopened only right after its own close, and
    # at start; lost once to a thread's socket, it stayed lost, and new
    # connections waited in the queue as before there was a spare.
    def before():
        _low_descriptor_limit()
        from policyd.policy import server
        server.os = _RacingOs(hold)

    with worker_processes(1, "  idle_timeout: 30\n", before=before) as address:
        held = []
        try:
            for _ in range(80):
                try:
                    held.append(socket.create_connection(address, PATIENCE))
                except ConnectionError:
                    pass
            if hold is None:
                time.sleep(0.2)
                for sock in held[:3]:   # their descriptors back to the server
                    sock.close()
            started = time.monotonic()
            assert _answer_or_close(address, 3.0) == b""
            assert time.monotonic() - started < 2.0
            started = time.monotonic()
            assert _answer_or_close(address, 3.0) == b""
            assert time.monotonic() - started < 0.5
        finally:
            for sock in held:
                sock.close()
        assert _first_answer_once_served(address) == b"action=DUNNO\n\n"


def _first_answer_once_served(address) -> bytes:
    """The first answer other than a close at once, within PATIENCE (the
    worker has descriptors again once the clients' departure is seen)."""
    deadline = time.monotonic() + PATIENCE
    while (answer := _answer_or_close(address, 3.0)) == b"" and time.monotonic() < deadline:
        time.sleep(0.1)
    return answer


def _child_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as stream:
                    if int(stream.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        pids.append(int(entry))
    return pids


def _runnable_seconds(pid: int) -> float:
    """How long the process's main thread has run or waited to run
    (/proc/PID/schedstat: on the CPU, then on the run queue, in ns)."""
    with open(f"/proc/{pid}/schedstat") as stream:
        on_cpu, waiting, _ = stream.read().split()
    return (int(on_cpu) + int(waiting)) / 1e9


def test_pipelined_requests_leave_the_worker_asleep_part_of_the_time():
    # Before: a worker answering pipelining clients was runnable all the
    # time (100 non-readers kept both workers of a 2-core machine so), and
    # a well-formed request waited for the scheduler to come back to it:
    # its p99 10.8 ms against 0.8 ms idle.  Counted as time on the CPU or
    # waiting for it, which another load on the machine does not change.
    # Other children of the test run (a session's unbound) are not it.
    others = set(_child_pids())
    with server_process() as address:
        (server,) = set(_child_pids()) - others
        with Pipeliners(address, 20, reading=True) as attack:
            before, started = _runnable_seconds(server), time.monotonic()
            time.sleep(1.0)
            share = (_runnable_seconds(server) - before) / (time.monotonic() - started)
    # Measured: 1.00 before, 0.53 with half the time for passes, 0.04
    # with a thirty-second (reading and writing come on top of the passes).
    assert share < 0.15, (share, attack.replies)
    assert attack.replies > 100      # still served: about 270 in the second


def test_pipelined_requests_take_a_thirty_second_of_the_loop():
    # Clients that never read are not pushed back by the kernel until
    # their receive buffers fill, which on loopback took minutes of short
    # replies: 100 of them were answered at half of each worker meanwhile
    # (the rest after a slice of passes was as long as the slice), then at
    # a quarter, beside the well-formed clients (bench/battery.py
    # slow-clients).  Measured as the rest after each slice against the
    # slice, both in wall time: load on the machine can only lengthen a
    # rest, so the median is taken.
    async def main():
        engine = LoopEngine(config=make_config())
        async with running(engine) as server:
            slices: list[tuple[float, float]] = []   # (the slice, the rest after it)
            began = ended = None    # the slice's first pass, its last pass's end
            take_turns = server._take_turns

            def timed():
                nonlocal began, ended
                now = time.monotonic()
                if began is None:
                    began = now
                elif ended is not None:   # a rest came before this pass
                    slices.append((ended - began, now - ended))
                    began, ended = now, None
                take_turns()
                # A rest is due: a pass leaves time spent in the slice,
                # unless it has just scheduled the rest.
                if server._turns_due and server._slice_spent == 0.0:
                    ended = time.monotonic()

            server._take_turns = timed
            host, _, port = server.addresses[0].partition(":")[2].rpartition(":")
            with Pipeliners((host, int(port)), 10, reading=False):
                await asyncio.sleep(0.2)   # their first reads in
                slices.clear()
                deadline = time.monotonic() + PATIENCE / 2
                while len(slices) < 40 and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            return slices

    slices = run(main())
    assert len(slices) >= 20, slices      # they were answered, in slices
    ratios = sorted(rest / busy for busy, rest in slices)
    # Measured: about 1 with the rest as long as the slice, 3 at a
    # quarter, 31 or more now.
    assert ratios[len(ratios) // 2] > 20, ratios


def test_the_share_holds_when_the_loop_is_busy_between_passes():
    # The slice was counted from its first pass in wall time and began
    # anew when a pass came more than two slices after that: with other
    # work of a millisecond between passes (Postfix's requests, threads'
    # decisions), every pass began a slice and none ended in a rest, so
    # pipelined requests had a pass every iteration.  Now only the time in
    # passes counts.
    async def main():
        engine = LoopEngine(config=make_config())
        async with running(engine) as server:
            in_passes = 0.0
            take_turns = server._take_turns

            def timed():
                # CPU time of the loop's thread: a pass that loses its CPU
                # on a loaded machine does not count against the share.
                nonlocal in_passes
                began = time.thread_time()
                take_turns()
                in_passes += time.thread_time() - began

            async def other_work():
                while True:
                    time.sleep(0.001)     # a millisecond of work per iteration
                    await asyncio.sleep(0)

            server._take_turns = timed
            host, _, port = server.addresses[0].partition(":")[2].rpartition(":")
            with Pipeliners((host, int(port)), 10, reading=False):
                await asyncio.sleep(0.2)   # their first reads in
                busy = asyncio.get_running_loop().create_task(other_work())
                await asyncio.sleep(0.1)
                in_passes, began = 0.0, time.monotonic()
                await asyncio.sleep(1.0)
                share = in_passes / (time.monotonic() - began)
                busy.cancel()
            return share

    share = run(main())
    # Measured: 0.14 before, 0.03 now (PIPELINE_SHARE is 1/32).
    assert share < 0.06, share


def _unread_replies(sock: socket.socket) -> int:
    """Octets the kernel holds for `sock`, not yet read (FIONREAD)."""
    import array
    import fcntl
    import termios
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count, True)
    return count[0]


def _send_without_reading(sock: socket.socket, blob: bytes, seconds: float) -> None:
    """Pipelined requests, as many as the kernel takes, for `seconds`."""
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(blob[sent % len(blob):])
        except BlockingIOError:
            time.sleep(0.01)


def _cpu_seconds(pid: int) -> float:
    """User and system time of a process (proc(5) stat utime, stime)."""
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def quarter_share(monkeypatch):
    """Pipelined requests at a quarter of the loop, as before the
    thirty-second: the hold below comes once UNREAD_LIMIT waits unread,
    and at a thirty-second a client gets there only after seconds.  The
    share sets how soon, not whether (forked servers inherit it)."""
    from policyd.policy import server as server_module
    monkeypatch.setattr(server_module, "PIPELINE_SHARE", 0.25)


def test_a_client_that_leaves_its_replies_unread_is_answered_no_further(quarter_share):
    # Before: a client that pipelines and never reads was answered until
    # its receive buffer and then our send buffer (up to 4 MB, 16,000
    # replies) were full, a quarter of a worker all the while: 100 of
    # them kept the workers busy for minutes.  Now it is held once
    # UNREAD_LIMIT waits unread, and costs one reply a second.
    others = set(_child_pids())
    with server_process() as address:
        (server,) = set(_child_pids()) - others
        with socket.create_connection(address, PATIENCE) as sock:
            sock.setblocking(False)
            _send_without_reading(sock, policy_request(protocol_state="RCPT") * 500, 1.5)
            held, cpu = _unread_replies(sock), _cpu_seconds(server)
            time.sleep(1.0)
            # Measured: 0.25 s before (the quarter share), 0 or 0.01 now.
            assert _cpu_seconds(server) - cpu < 0.08
            assert _unread_replies(sock) - held < 1024      # a reply or two at most
            assert held >= 16 * 1024, held
            # Once it reads, it is answered again (within HOLD_RECHECK_MAX).
            sock.setblocking(True)
            sock.settimeout(PATIENCE)
            replies = 0
            while replies < 1000:
                data = sock.recv(65536)
                assert data, "closed"
                replies += data.count(b"\n\n")


def test_a_held_client_is_closed_when_it_reads_nothing_for_idle_timeout(quarter_share):
    # The one reply per look that a held connection gets is not activity:
    # without this it would be kept open for ever.
    with server_process(policy="  idle_timeout: 1\n") as address:
        with socket.create_connection(address, PATIENCE) as sock:
            sock.setblocking(False)
            _send_without_reading(sock, policy_request(protocol_state="RCPT") * 500, 0.5)
            deadline = time.monotonic() + PATIENCE
            # tcp(7) TCP_INFO: tcpi_state, 1 while established.
            while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1:
                assert time.monotonic() < deadline, "still open"
                time.sleep(0.05)
            closed_after = time.monotonic() - deadline + PATIENCE
    assert closed_after < 3.0, closed_after


def test_stop_does_not_wait_for_a_client_that_reads_nothing(quarter_share):
    # A held connection had the stop wait its drain_timeout for answers
    # it would never read.
    engine = LoopEngine(config=make_config("  drain_timeout: 5\n"))

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        host, _, port = server.addresses[0].partition(":")[2].rpartition(":")
        with socket.create_connection((host, int(port)), PATIENCE) as sock:
            sock.setblocking(False)
            await asyncio.to_thread(_send_without_reading, sock,
                                    policy_request(protocol_state="RCPT") * 500, 1.5)
            held = [c for c in server._connections if c.held_since is not None]
            began = time.monotonic()
            await asyncio.wait_for(server.stop(), PATIENCE)
            return len(held), time.monotonic() - began

    held, took = run(scenario())
    assert held == 1
    assert took < 1.0, took


def test_stop_answers_what_a_pipelining_client_sent_without_rests():
    # At a thirty-second of the loop, the requests a pipelining client had
    # sent (one read, hundreds of them) took the stop its whole
    # drain_timeout; at stop they are answered without rests.
    engine = LoopEngine(config=make_config("  drain_timeout: 5\n"))
    requests = b"".join(policy_request(instance=f"m{i}") for i in range(1000))

    def client(sock, replies, stop_began):
        """Reads until the server closes (a reset, when requests it did
        not read are left, RFC 1122 §4.2.2.13: those are not answered)."""
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                data += chunk
                replies[1 if stop_began.is_set() else 0] = data.count(b"\n\n")

    async def scenario():
        server = PolicyServer(engine, decision_logger=lambda r, d: None)
        await server.start()
        host, _, port = server.addresses[0].partition(":")[2].rpartition(":")
        with socket.create_connection((host, int(port)), PATIENCE) as sock:
            sock.sendall(requests)
            replies, stop_began = [0, 0], threading.Event()
            reader = asyncio.get_running_loop().run_in_executor(
                None, client, sock, replies, stop_began)
            await asyncio.sleep(0.2)
            waiting = [c for c in server._connections if c.waiting]
            stop_began.set()
            began = time.monotonic()
            await asyncio.wait_for(server.stop(), PATIENCE)
            took = time.monotonic() - began
            await reader
            return len(waiting), took, replies

    waiting, took, (before, after) = run(scenario())
    assert waiting == 1           # pipelined requests still to answer
    # Measured: 2.5 s with rests (drain_timeout 5 s); 0.1 s now.
    assert took < 1.0, took
    assert after - before > 50, (before, after)


def test_a_held_client_is_let_go_only_once_it_has_read_half(monkeypatch, quarter_share):
    # The count of unread octets (TCP_INFO) stands in for a client's
    # kernel here, so that each step is exact.  Before: held past
    # UNREAD_LIMIT, a client that read down to between half of it and
    # all of it was answered as usual after one look, yet still counted
    # as held: closed as reading nothing after idle_timeout while it read.
    from policyd.policy import server as server_module
    unread = [0]

    def fake_unread(connection):
        connection.unchecked = 0
        return unread[0]

    monkeypatch.setattr(server_module._PolicyConnection, "_unread", fake_unread)
    engine = LoopEngine(config=make_config("  idle_timeout: 3\n"))
    batch = b"".join(policy_request(instance=f"m{i}") for i in range(20))

    async def scenario():
        async with running(engine) as server:
            r, w = await connect(server)
            answered = []          # the time of each reply

            async def pipeline():
                while True:
                    w.write(batch)   # 20 ahead of their replies: turns
                    for _ in range(20):
                        await r.readuntil(b"\n\n")
                        answered.append(time.monotonic())

            client = asyncio.get_running_loop().create_task(pipeline())
            steps = {}
            for name, octets, settle in (("reads", 0, 0.2), ("behind", 20 * 1024, 0.2),
                                         ("read some", 12 * 1024, 0.2),
                                         # the next look comes within HOLD_RECHECK_MAX
                                         ("read half", 4 * 1024, 1.1)):
                unread[0] = octets
                await asyncio.sleep(settle)
                mark = len(answered)
                await asyncio.sleep(0.4)
                steps[name] = len(answered) - mark
            await asyncio.sleep(0.8)           # idle_timeout after the hold began
            mark = len(answered)
            await asyncio.sleep(0.3)
            steps["after idle_timeout"] = len(answered) - mark
            client.cancel()
            w.close()
            return steps

    steps = run(scenario())
    assert steps["reads"] > 100, steps
    assert steps["behind"] <= 3, steps         # a reply per look (at most 1 s apart)
    assert steps["read some"] <= 3, steps      # still held: not down to half
    assert steps["read half"] > 100, steps
    assert steps["after idle_timeout"] > 10, steps   # answered, not closed

