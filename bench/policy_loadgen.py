"""Closed-loop load generator for a Postfix policy server (SMTPD_POLICY_README).

Runs as its own process so that it does not share an interpreter (or a
GIL) with anything it measures.  One epoll loop drives N persistent
connections, as N Postfix smtpd processes would: each connection sends a
request, waits for the reply `action=...\\n\\n`, and sends the next one at
once.  The per-request work here is a send, a recv and a few list
operations, so one process drives tens of thousands of requests a second
(`run_policy.py` measures that ceiling against a null responder).

Modes:
  run          measure for --duration seconds (or --count requests), print JSON
  idle         open N connections, one request each, print JSON, hold them
               open until stdin closes (for measuring the server's memory)
  null-server  answer every request with action=DUNNO (the ceiling check)
"""
from __future__ import annotations

import argparse
import array
import collections
import json
import os
import random
import resource
import select
import signal
import socket
import sys
import time

from world import fresh_value

REPLY_END = b"\n\n"


def load_requests(path: str, fresh_forgers: bool = True) -> tuple[list, list[str]]:
    """Request bodies without `instance`, and the expectation of each.

    A body is bytes, or for a forged message a tuple of bytes and the kinds
    of value (world.fresh_value) to put between them at every send.
    """
    bodies, expectations = [], []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            item = json.loads(line)
            fresh = (item.get("fresh") or {}) if fresh_forgers else {}
            parts, text = [], ""
            for name, value in item["attributes"]:
                if name in fresh:
                    parts += [(text + f"{name}=").encode("utf-8"), fresh[name]]
                    text = "\n"
                else:
                    text += f"{name}={value}\n"
            parts.append(text.encode("utf-8"))
            bodies.append(tuple(parts) if fresh else parts[0])
            expectations.append(item["expect"])
    if not bodies:
        raise SystemExit(f"{path}: no requests")
    return bodies, expectations


def raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def connect(address: tuple[str, int], count: int) -> list[socket.socket]:
    connections = []
    for _ in range(count):
        connection = socket.create_connection(address, timeout=30)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.setblocking(False)
        connections.append(connection)
    return connections


def action_word(reply: bytes) -> str:
    """The access(5) action of a reply: its first word, upper-cased;
    "NO-ACTION" when the reply lacks the action attribute."""
    for line in reply.split(b"\n"):
        if line.startswith(b"action="):
            words = line[7:].split(None, 1)
            return words[0].decode("utf-8", "replace").upper() if words else "OK"
    return "NO-ACTION"


class Load:
    """The state of every connection, in parallel lists indexed by slot."""

    def __init__(self, connections: list[socket.socket], bodies: list,
                 expectations: list[str], first_serial: int = 0):
        self.connections = connections
        self.bodies, self.expectations = bodies, expectations
        self.poller = select.epoll()
        self.slot_of_fd = {}
        for slot, connection in enumerate(connections):
            self.slot_of_fd[connection.fileno()] = slot
            self.poller.register(connection.fileno(), select.EPOLLIN)
        count = len(connections)
        # Connections start at different places in the request list so
        # that they do not ask the same questions at the same moment.
        self.next_request = [slot * len(bodies) // count for slot in range(count)]
        self.current = [0] * count
        self.sent_at = [0] * count
        self.last_payload = [b""] * count
        self.partial = [b""] * count
        # Numbers the messages; it also picks the fresh values of forged
        # ones, so the runner hands each run the serial the last one ended
        # at, and no run repeats an address an earlier one used.
        self.serial = first_serial
        self.instance_prefix = b"instance=%x.%x" % (os.getpid(), time.time_ns() // 1000)

    def send(self, slot: int, arrived: int = 0) -> None:
        index = self.next_request[slot] % len(self.bodies)
        self.next_request[slot] = index + 1
        self.current[slot] = index
        self.serial += 1
        # Postfix's instance is unique per message, and both servers keep
        # state per instance (the decision, the headers still to add), so
        # each request is a new message: unique across runs too, like
        # Postfix's own "pid.time.counter" shape.
        body = self.bodies[index]
        if type(body) is tuple:
            body = b"".join(part if type(part) is bytes
                            else fresh_value(part, self.serial).encode() for part in body)
        payload = b"%s%s.%x.%x\n\n" % (body, self.instance_prefix, slot, self.serial)
        self.last_payload[slot] = payload
        # A message that waited for a free connection counts from its arrival.
        self.sent_at[slot] = arrived or time.perf_counter_ns()
        sent = self.connections[slot].send(payload)
        if sent != len(payload):
            # The reply to the previous request was read, so the socket
            # buffer is empty; a short send here means something odd.
            raise RuntimeError("short send")

    def round_trips(self, keep_going, on_reply) -> None:
        """Read replies until every connection is done.  After each reply
        `keep_going()` says whether that connection sends again."""
        outstanding = len(self.connections)
        poll = self.poller.poll
        while outstanding:
            events = poll(30.0)
            if not events:
                raise RuntimeError(f"no reply within 30 s on {outstanding} connection(s)")
            for fd, _ in events:
                slot = self.slot_of_fd[fd]
                if not self.receive(slot, on_reply):
                    continue
                if keep_going():
                    self.send(slot)
                else:
                    outstanding -= 1

    def receive(self, slot: int, on_reply) -> bool:
        """Reads what connection `slot` has; True when that completed its
        reply, which `on_reply(slot, reply, latency_ns)` is given."""
        data = self.connections[slot].recv(65536)
        now = time.perf_counter_ns()
        if not data:
            raise RuntimeError("server closed a connection")
        if self.partial[slot]:
            data = self.partial[slot] + data
        if not data.endswith(REPLY_END):
            self.partial[slot] = data
            return False
        self.partial[slot] = b""
        on_reply(slot, data, now - self.sent_at[slot])
        return True

    def paced(self, rate: float, seconds: float, on_reply, rng) -> int:
        """Open loop: messages arrive at `rate` a second (Poisson, seeded)
        whatever the server's speed, as mail reaches a busy MX.  Each goes
        out on an idle connection, or waits for one and counts its wait.
        Returns how many had to wait."""
        clock, poll, connections = time.perf_counter_ns, self.poller.poll, self.connections
        end = clock() + int(seconds * 1e9)
        next_arrival = clock()
        idle = list(range(len(connections)))
        queued: collections.deque[int] = collections.deque()
        waited = busy = 0
        while True:
            now = clock()
            while next_arrival <= now and next_arrival < end:
                if idle:
                    self.send(idle.pop())
                    busy += 1
                else:
                    queued.append(next_arrival)
                    waited += 1
                    if len(queued) > 100000:
                        raise RuntimeError(f"offered {rate:g}/s is beyond the server's capacity")
                next_arrival += int(rng.expovariate(rate) * 1e9) + 1
            if next_arrival >= end and not busy:
                return waited
            # epoll counts milliseconds: round up rather than spin.
            timeout = 30.0 if next_arrival >= end else (next_arrival - now + 999_999) // 1_000_000 / 1000
            events = poll(timeout)
            if not events and next_arrival >= end:
                raise RuntimeError(f"no reply within 30 s on {busy} connection(s)")
            for fd, _ in events:
                slot = self.slot_of_fd[fd]
                if not self.receive(slot, on_reply):
                    continue
                if queued:
                    self.send(slot, arrived=queued.popleft())
                else:
                    idle.append(slot)
                    busy -= 1

    def warm_up(self) -> None:
        """One request per connection, not measured: a spawned server
        (policyd-spf under socat) starts its interpreter on the first one."""
        for slot in range(len(self.connections)):
            self.send(slot)
        self.round_trips(lambda: False, lambda slot, data, latency: None)


def run(arguments) -> dict:
    bodies, expectations = load_requests(arguments.requests, not arguments.repeat_forgers)
    raise_file_limit(arguments.connections + 64)
    host, port = arguments.connect.rsplit(":", 1)
    connect_started = time.monotonic()
    connections = connect((host, int(port)), arguments.connections)
    load = Load(connections, bodies, expectations, arguments.first_serial)
    load.warm_up()
    warm_up_seconds = time.monotonic() - connect_started

    latencies = array.array("q")
    tally: dict[tuple[str, str], int] = {}
    record = latencies.append

    samples: dict[tuple[str, str], list] = {}

    def on_reply(slot, data, latency):
        record(latency)
        key = (expectations[load.current[slot]], action_word(data))
        seen = tally.get(key, 0)
        tally[key] = seen + 1
        if seen < arguments.samples:
            samples.setdefault(key, []).append(
                [load.last_payload[slot].decode("utf-8", "replace"),
                 data.decode("utf-8", "replace")])

    sent = len(connections)
    if arguments.count:
        limit = arguments.count

        def keep_going():
            nonlocal sent
            if sent < limit:
                sent += 1
                return True
            return False
    else:
        deadline = time.perf_counter() + arguments.duration

        def keep_going():
            return time.perf_counter() < deadline

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    waited = 0
    if arguments.rate:
        waited = load.paced(arguments.rate, arguments.duration, on_reply,
                            random.Random(arguments.first_serial))
    else:
        for slot in range(len(connections)):
            load.send(slot)
        load.round_trips(keep_going, on_reply)
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    for connection in connections:
        connection.close()

    ordered = sorted(latencies)
    count = len(ordered)

    def percentile(fraction: float) -> float:
        return ordered[min(count - 1, int(fraction * count))] / 1e6

    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "connections": len(connections),
        "offered_rate": arguments.rate,
        "waited_for_connection": waited,
        "requests": count,
        "seconds": elapsed,
        "decisions_per_second": count / elapsed,
        "latency_ms": {"mean": sum(ordered) / count / 1e6, "p50": percentile(0.50),
                       "p90": percentile(0.90), "p99": percentile(0.99),
                       "p999": percentile(0.999), "max": ordered[-1] / 1e6},
        "warm_up_seconds": warm_up_seconds,
        "last_serial": load.serial,
        "loadgen_cpu_share": cpu / elapsed,
        "actions": [[expect, action, n] for (expect, action), n in sorted(tally.items())],
        "samples": [[expect, action, pairs] for (expect, action), pairs in sorted(samples.items())],
    }


def idle(arguments) -> None:
    bodies, expectations = load_requests(arguments.requests, not arguments.repeat_forgers)
    raise_file_limit(arguments.connections + 64)
    host, port = arguments.connect.rsplit(":", 1)
    connections = connect((host, int(port)), arguments.connections)
    load = Load(connections, bodies, expectations, arguments.first_serial)
    load.warm_up()
    print(json.dumps({"idle_connections": len(connections), "last_serial": load.serial}),
          flush=True)
    sys.stdin.read()   # the runner closes our stdin when it has measured
    for connection in connections:
        connection.close()


def null_server(arguments) -> None:
    """action=DUNNO to everything, as fast as Python's epoll allows."""
    raise_file_limit(4096)
    host, port = arguments.listen.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(1024)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    clients: dict[int, socket.socket] = {}
    partial: dict[int, bytes] = {}
    reply = b"action=DUNNO\n\n"
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                client, _ = listener.accept()
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                clients[client.fileno()] = client
                partial[client.fileno()] = b""
                poller.register(client.fileno(), select.EPOLLIN)
                continue
            client = clients[fd]
            data = client.recv(65536)
            if not data:
                poller.unregister(fd)
                client.close()
                del clients[fd], partial[fd]
                continue
            data = partial[fd] + data
            if data.endswith(REPLY_END):
                partial[fd] = b""
                client.send(reply)
            else:
                partial[fd] = data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("run", "idle"):
        mode = modes.add_parser(name)
        mode.add_argument("--connect", required=True, help="HOST:PORT of the policy server")
        mode.add_argument("--connections", type=int, default=1)
        mode.add_argument("--requests", required=True,
                          help="JSON lines from world.World.write_policy_requests")
        mode.add_argument("--first-serial", type=int, default=0,
                          help="number messages from here (the last run's last_serial)")
        mode.add_argument("--repeat-forgers", action="store_true",
                          help="send forged messages as listed, not from new addresses")
        if name == "run":
            mode.add_argument("--duration", type=float, default=10.0)
            mode.add_argument("--count", type=int, default=0,
                              help="stop after this many requests instead of --duration")
            mode.add_argument("--rate", type=float, default=0,
                              help="open loop: this many messages a second arrive "
                                   "(Poisson) instead of each connection sending on "
                                   "the last reply")
            mode.add_argument("--samples", type=int, default=0,
                              help="keep the first N requests and replies of each "
                                   "(expectation, action) pair in the output")
    mode = modes.add_parser("null-server")
    mode.add_argument("--listen", default="127.0.0.1:0")
    arguments = parser.parse_args(argv)
    if arguments.mode == "run":
        print(json.dumps(run(arguments)))
    elif arguments.mode == "idle":
        idle(arguments)
    else:
        null_server(arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
