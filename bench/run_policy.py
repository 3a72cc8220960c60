"""Benchmark policyd's Postfix policy server against Debian's policyd-spf.

    /usr/bin/python3 bench/run_policy.py [--duration S]
    /usr/bin/python3 bench/run_policy.py --only policyd --relay   # relay + Redis limits

Starts a private unbound serving a seeded synthetic world (bench/world.py),
then for each server measures decisions/s and latency at 1, 8 and 32
persistent connections with bench/policy_loadgen.py, and policyd's memory
with 1000 idle connections.  Prints markdown tables for the README.  Every
process it starts it stops, by PID; needs root (a mount namespace for
policyd-spf's resolv.conf, port 53 for its resolver).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import policy_profile  # noqa: E402  (bench/ is not a package)
import world  # noqa: E402
from policy_servers import (Policyd, PolicydSpf, descendants, memory_kib,  # noqa: E402
                            stop_process)

LOADGEN = os.path.join(HERE, "policy_loadgen.py")
AUTHSERV_ID = "mx.own.example"
NAT = {"own_domains": [world.OWN_DOMAIN], "networks": list(world.NAT_NETWORKS),
       "public_addresses": [world.OWN_PUBLIC_ADDRESS]}

WARM_UP_PASSES = 3

# Targets from the issue.
TARGET_SPEEDUP = 5.0      # policyd decisions/s vs policyd-spf, at 32 connections
TARGET_P99_MS = 5.0
TARGET_IDLE_RSS_MB = 80.0
TARGET_RELAY_SHARE = 0.80    # relay + Redis limits: decisions/s against policyd's
TARGET_RELAY_P50_MS = 0.3    # ... and what they may add to p50

RELAY_OFF = "policyd, relay mix, relay off"
RELAY_ON = "policyd, relay + Redis limits"


def action_class(word: str) -> str:
    """reject / defer / accept, as Postfix would act on the access(5) word."""
    if word == "REJECT" or (len(word) == 3 and word.isdigit() and word[0] == "5"):
        return "reject"
    if word.startswith("DEFER") or (len(word) == 3 and word.isdigit() and word[0] == "4"):
        return "defer"
    if word == "NO-ACTION":
        return "broken"
    return "accept"


def wrong_decisions(actions: list, nat_relaxed: bool, relay: bool = False) -> list[str]:
    """Decisions that contradict the world: an unauthorized client of a
    -all domain must be rejected, an authorized one accepted, and with the
    NAT rule, own-domain mail from the NAT networks accepted.  Other
    expectations (softfail, none...) depend on the HELO check too, so only
    these three are held to a single answer.  In the relay mix a login
    relaying as itself is accepted, and with relay checks on a stranger
    relaying is rejected."""
    wanted = {"fail": "reject", "pass": "accept", "login": "accept"}
    if nat_relaxed:
        wanted["nat"] = "accept"
    if relay:
        wanted["stranger"] = "reject"
    problems = []
    for expect, word, count in actions:
        if expect in wanted and action_class(word) != wanted[expect]:
            problems.append(f"{count} x expected {expect} -> {word}")
        elif action_class(word) == "broken":
            problems.append(f"{count} x reply without action")
    return problems


def ask(port: int, attributes: list, instance: str) -> str:
    """One request on a fresh connection, the whole reply back."""
    body = "".join(f"{name}={value}\n" for name, value in attributes)
    body += f"instance={instance}\n\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(body.encode("utf-8"))
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode("utf-8", "replace")


def verify(server, samples: dict, nat_relaxed: bool) -> None:
    """Before measuring: a known pass and a known fail get the right
    decision, which also proves the server resolves through our unbound
    (no other resolver knows bench.example)."""
    rng = random.Random(0)
    checks = [("pass", "accept"), ("fail", "reject")]
    if nat_relaxed:
        checks.append(("nat", "accept"))
    for expect, wanted in checks:
        transaction = samples[expect]
        reply = ask(server.port, transaction.policy_attributes(rng),
                    f"{os.getpid():x}.{time.time_ns():x}.verify.{expect}")
        first = reply.split("\n", 1)[0]
        word = first[len("action="):].split(None, 1)[0].upper() if first.startswith("action=") else ""
        if action_class(word) != wanted:
            raise RuntimeError(f"{server.name}: {expect} sample "
                               f"({transaction.sender} from {transaction.host.address}) "
                               f"got {first!r}, wanted {wanted}")
        if expect == "pass" and "spf=" in first and "spf=pass" not in first:
            raise RuntimeError(f"{server.name}: pass sample got {first!r}")
        print(f"  verified {expect}: {first[:110]}", flush=True)


# The relay mix (--relay): of every RELAY_EVERY requests of the world, one
# is replaced by a login relaying as itself and, of every STRANGER_EVERY
# of those, one by a stranger relaying (the world's client and sender, a
# remote recipient).  Limits are high enough never to refuse this load
# (the report gives the share deferred, 0 expected): they are measured
# counting, not refusing.
RELAY_EVERY = 5
STRANGER_EVERY = 4
RELAY_LOGINS = 50
RELAY_DESTINATIONS = 50
RELAY_LIMIT = {"messages": 100_000_000, "recipients": 100_000_000, "period": 3600}


def write_relay_requests(source: str, path: str) -> dict[str, int]:
    """The world's requests with a share replaced as said above; returns
    how many of each expectation there are."""
    expectations: dict[str, int] = {}
    with open(source, encoding="utf-8") as reading, \
            open(path, "w", encoding="utf-8") as writing:
        for n, line in enumerate(reading):
            item = json.loads(line)
            if n % RELAY_EVERY == RELAY_EVERY - 1:
                attributes = dict(item["attributes"])
                target = f"rcpt{n % 997}@dest{n % RELAY_DESTINATIONS}.example"
                if (n // RELAY_EVERY) % STRANGER_EVERY == STRANGER_EVERY - 1:
                    item = {"expect": "stranger", "fresh": item.get("fresh") or {},
                            "attributes": [(k, target if k == "recipient" else v)
                                           for k, v in item["attributes"]]}
                else:
                    login = f"user{n % RELAY_LOGINS}"
                    client = (f"198.51.100.{n % 250 + 1}" if n % 3
                              else f"2001:db8:100:{n % 250:x}::25")
                    attributes.update(client_address=client, client_name="unknown",
                                      reverse_client_name="unknown",
                                      helo_name=f"laptop{n % 250}.example",
                                      sender=f"{login}@{world.OWN_DOMAIN}",
                                      recipient=target, server_port="587",
                                      sasl_method="PLAIN", sasl_username=login)
                    item = {"expect": "login", "attributes": list(attributes.items())}
            expectations[item["expect"]] = expectations.get(item["expect"], 0) + 1
            writing.write(json.dumps(item) + "\n")
    return expectations


def relay_settings(redis_url: str, scope: str = "all") -> str:
    """The config sections of the relay row: relay checks on every request
    (own.example local, everything else relaying), sender ownership
    enforced, and every limit (messages and recipients per login, client,
    sender and recipient domain: 8 counters) counted in Redis for every
    accepted recipient: with scope all, inbound mail too (the most Redis
    work a decision can bring); with scope relay, the logins' only."""
    senders = ", ".join(f"{{login: user{n}, addresses: [user{n}@{world.OWN_DOMAIN}]}}"
                        for n in range(RELAY_LOGINS))
    rate = "{" + ", ".join(f"{k}: {v}" for k, v in RELAY_LIMIT.items()) + "}"
    return "\n".join([
        "relay:", "  enabled: true", f"  local_domains: [{world.OWN_DOMAIN}]",
        "  sender_ownership: enforce", f"  senders: [{senders}]",
        "limits:", "  enabled: true", f"  scope: {scope}",
        *(f"  {name}: {rate}" for name in ("per_user", "per_client", "per_sender_domain",
                                           "per_recipient_domain")),
        "redis:", f"  url: {redis_url}", "  key_prefix: 'bench:'",
    ]) + "\n"


def start_redis(directory: str) -> subprocess.Popen:
    """redis-server on 127.0.0.1 and a free port, nothing saved, as the
    tests start it; the caller stops it by PID (stop_process)."""
    if not os.access("/usr/bin/redis-server", os.X_OK):
        raise RuntimeError("/usr/bin/redis-server is missing (apt-get install redis-server)")
    port = world.free_port("127.0.0.1")
    process = subprocess.Popen(
        ["/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no", "--dir", directory,
         "--logfile", os.path.join(directory, "redis.log"), "--daemonize", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.port = port
    deadline = time.monotonic() + 10
    while redis_command(port, "PING") != "+PONG":
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return process


def redis_command(port: int, command: str) -> str:
    """One inline command's first reply line ("" when nobody answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            connection.sendall(command.encode("ascii") + b"\r\n")
            return connection.recv(4096).split(b"\r\n", 1)[0].decode("ascii", "replace")
    except OSError:
        return ""


def verify_relay(server, path: str) -> None:
    """Before measuring the relay row: a login relaying as itself is
    accepted, a stranger relaying gets the 554 of the relay check, and the
    login's charge reached Redis (checked after the runs, by DBSIZE)."""
    wanted = {"login": ("accept", "DUNNO"), "stranger": ("reject", "554")}
    with open(path, encoding="utf-8") as stream:
        items = {}
        for line in stream:
            item = json.loads(line)
            items.setdefault(item["expect"], item)
            if len(items.keys() & wanted.keys()) == len(wanted):
                break
    for expect, (action, word) in wanted.items():
        reply = ask(server.port, items[expect]["attributes"],
                    f"{os.getpid():x}.{time.time_ns():x}.verify.{expect}")
        first = reply.split("\n", 1)[0]
        if not first.startswith(f"action={word}"):
            raise RuntimeError(f"{server.name}: {expect} sample got {first!r}, wanted {word}")
        print(f"  verified {expect}: {first[:110]}", flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants (all threads), from
    /proc: policyd may fork workers (policy.processes)."""
    ticks = 0
    for member in [pid] + descendants(pid):
        try:
            with open(f"/proc/{member}/stat", encoding="ascii") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except OSError:
            continue   # exited meanwhile
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Messages:
    """Where the next load generator starts numbering messages: forged
    ones get addresses and HELO names from the number, so a run never
    repeats one that an earlier run left in a server's cache."""
    next_serial = 0


class Workload:
    """Load generator options every run shares (set from the command line)."""
    repeat_forgers = False


def run_load(port: int, connections: int, duration: float, requests_path: str,
             server_pid: int | None = None, count: int = 0, rate: float = 0) -> dict:
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    wall_before = time.monotonic()
    completed = subprocess.run(
        [sys.executable, LOADGEN, "run", "--connect", f"127.0.0.1:{port}",
         "--connections", str(connections), "--requests", requests_path,
         "--first-serial", str(Messages.next_serial),
         *(["--count", str(count)] if count else ["--duration", str(duration)]),
         *(["--rate", str(rate)] if rate else []),
         *(["--repeat-forgers"] if Workload.repeat_forgers else [])],
        capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"load generator failed: {completed.stderr.strip()}")
    result = json.loads(completed.stdout)
    Messages.next_serial = result["last_serial"] + 1
    if server_pid:
        # Over the load generator's whole life, warm-up included: close
        # enough to tell a saturated core from an idle one.
        result["server_cpu_share"] = ((cpu_seconds(server_pid) - cpu_before)
                                      / (time.monotonic() - wall_before))
    return result


def hold_idle(port: int, connections: int, requests_path: str, pid: int) -> dict:
    """Memory of the server tree while `connections` idle ones are open."""
    holder = subprocess.Popen(
        [sys.executable, LOADGEN, "idle", "--connect", f"127.0.0.1:{port}",
         "--connections", str(connections), "--requests", requests_path,
         "--first-serial", str(Messages.next_serial),
         *(["--repeat-forgers"] if Workload.repeat_forgers else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = holder.stdout.readline()
        if not ready:
            raise RuntimeError("idle connection holder failed")
        memory = memory_kib(pid)
        state = json.loads(ready)
        memory["connections"] = state["idle_connections"]
        Messages.next_serial = state["last_serial"] + 1
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
    return memory


def profile(server, connections: int, arguments, requests_path: str) -> None:
    """One more, unreported, run with py-spy attached (it takes CPU of its
    own, so the measured runs go without it), then the summary."""
    py_spy = arguments.py_spy or shutil.which("py-spy")
    if not py_spy:
        print("  --profile: py-spy not found (pip install py-spy, or --py-spy PATH)")
        return
    print(f"  {server.name}: {connections} connection(s) under py-spy ...", flush=True)
    seconds = max(2, int(arguments.duration))
    recorder = subprocess.Popen(
        [py_spy, "record", "--pid", str(server.pid), "--subprocesses", "--gil",
         "--format", "raw",
         "--rate", "250", "--duration", str(seconds), "-o", arguments.profile],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run_load(server.port, connections, seconds + 1, requests_path)
    finally:
        _, errors = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0:
        print(f"  py-spy failed: {errors.strip()[-500:]}")
        return
    print(policy_profile.summarize(arguments.profile), flush=True)


def row(result: dict) -> str:
    latency = result["latency_ms"]
    server_cpu = result.get("server_cpu_share")
    load = str(result["connections"])
    if result.get("offered_rate"):
        load += f", {result['offered_rate']:g}/s offered"
    rate = f"{result['decisions_per_second']:,.0f}"
    p99 = f"{latency['p99']:.2f}"
    spread = result.get("spread")
    if spread and len(spread["p99_ms"]) > 1:
        low, high = spread["decisions_per_second"]
        rate += f" ({low:,.0f}-{high:,.0f})"
        p99 += f" ({spread['p99_ms'][0]:.2f}-{spread['p99_ms'][-1]:.2f})"
    return (f"| {result['server']} | {load} | {rate} | {latency['p50']:.2f} | "
            f"{p99} | {latency['max']:.1f} | "
            f"{'' if server_cpu is None else f'{server_cpu:.0%}'} | "
            f"{result['loadgen_cpu_share']:.0%} |")


def report(results: list[dict], memory: list[dict], arguments, expectations: dict) -> str:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as stream:
            cpu_model = next((line.split(":", 1)[1].strip() for line in stream
                              if line.startswith("model name")), "")
    except OSError:
        pass
    mix = ", ".join(f"{name} {count / sum(expectations.values()):.0%}"
                    for name, count in sorted(expectations.items(), key=lambda i: -i[1]))
    forgers = ("forged mail repeats from listed addresses" if arguments.repeat_forgers
               else "forged mail from a new address (and half the time a new HELO "
                    "name) every time")
    lines = [
        f"Machine: {os.cpu_count()} CPU ({cpu_model}, load average {arguments.load_before} "
        f"before the run), Linux {platform.release()}, "
        f"Python {platform.python_version()}; {arguments.duration:g} s per run, "
        f"{arguments.repeat} run(s) per point"
        + (" (median by decisions/s, range of all runs in brackets)" if arguments.repeat > 1
           else "") + ".  "
        "Closed loop (each connection sends its next request on the reply) unless "
        "a rate is offered (open loop, Poisson arrivals).",
        f"World: {arguments.domains} sender domains (seed {arguments.seed}), "
        f"{arguments.requests} distinct requests cycled, {forgers}; "
        f"expected MAIL FROM results: {mix}.  policyd measured with warm caches.",
        "",
        "| Server | Connections | Decisions/s | p50 ms | p99 ms | max ms | server CPU | loadgen CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if getattr(arguments, "relay_mix", None):
        total = sum(arguments.relay_mix.values())
        lines.insert(2, "Relay mix (rows \"relay\"): the same requests, of every "
                     f"{RELAY_EVERY} one replaced by a login relaying as itself or (one in "
                     f"{STRANGER_EVERY} of those) a stranger relaying: "
                     + ", ".join(f"{name} {count / total:.0%}" for name, count in
                                 sorted(arguments.relay_mix.items(), key=lambda i: -i[1]))
                     + f".  {RELAY_ON}: relay checks, sender ownership, and four limits "
                     "(messages and recipients each) counted in a redis-server on "
                     "loopback for every accepted recipient"
                     + (" (limits.scope: all)." if arguments.relay_scope == "all"
                        else " of a login (limits.scope: relay)."))
    lines += [row(result) for result in results]
    if memory:
        lines += ["", "| Server | Idle connections | Processes | RSS MB | PSS MB |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {m['server']} | {m['connections']} | {m['processes']} | "
                  f"{m['rss_kib'] / 1024:.1f} | {m['pss_kib'] / 1024:.1f} |" for m in memory]
    lines += ["", "Targets:"] + targets(results, memory)
    problems = [f"- {r['server']} at {r['connections']}: " + "; ".join(r["wrong"])
                for r in results if r.get("wrong")]
    if problems:
        lines += ["", "WRONG DECISIONS (numbers of these rows do not count):"] + problems
    return "\n".join(lines)


def targets(results: list[dict], memory: list[dict]) -> list[str]:
    def find(server, connections):
        return next((r for r in results if r["server"] == server and not r["offered_rate"]
                     and r["connections"] == connections), None)
    most = max((r["connections"] for r in results), default=0)
    policyd, reference = find("policyd", most), find("policyd-spf", most)
    lines = []
    if policyd and reference:
        speedup = policyd["decisions_per_second"] / reference["decisions_per_second"]
        lines.append(f"- decisions/s at {most} connections: policyd {speedup:.1f}x policyd-spf "
                     f"(target >= {TARGET_SPEEDUP:g}x): "
                     f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'}")
    for result in results:
        if result["server"] == "policyd":
            p99 = result["latency_ms"]["p99"]
            load = f"{result['connections']} connection(s)" + (
                f", {result['offered_rate']:g}/s offered" if result["offered_rate"] else "")
            lines.append(f"- policyd p99 at {load}: {p99:.2f} ms "
                         f"(target <= {TARGET_P99_MS:g} ms): "
                         f"{'met' if p99 <= TARGET_P99_MS else 'MISSED'}")
    for m in memory:
        if m["server"].startswith("policyd") and m["server"] != "policyd-spf" \
                and m["connections"] >= 1000:
            # Summed over forked workers, RSS counts the pages they share
            # once per process; PSS shares them out, so both are given.
            rss, pss = m["rss_kib"] / 1024, m["pss_kib"] / 1024
            lines.append(f"- {m['server']} RSS with {m['connections']} idle connections: "
                         f"{rss:.1f} MB "
                         f"over {m['processes']} process(es), PSS {pss:.1f} MB "
                         f"(target <= {TARGET_IDLE_RSS_MB:g} MB): "
                         f"{'met' if rss <= TARGET_IDLE_RSS_MB else 'MISSED'}")
    lines += relay_targets(results)
    return lines or ["- (policyd not measured)"]


def relay_targets(results: list[dict]) -> list[str]:
    """The relay row against the policyd row (and the relay mix with relay
    off) of the same run: decisions/s kept, p50 added, share deferred."""
    def key(result):
        return (result["connections"], result["offered_rate"])
    by_label = {label: {key(r): r for r in results if r["server"] == label}
                for label in ("policyd", RELAY_OFF, RELAY_ON)}
    lines = []
    for point, relay in sorted(by_label[RELAY_ON].items()):
        load = f"{point[0]} connection(s)" + (f", {point[1]:g}/s offered" if point[1] else "")
        deferred = sum(count for _, word, count in relay["actions"]
                       if action_class(word) == "defer")
        total = sum(count for _, _, count in relay["actions"]) or 1
        parts = []
        for label in ("policyd", RELAY_OFF):
            base = by_label[label].get(point)
            if base is None:
                continue
            share = relay["decisions_per_second"] / base["decisions_per_second"]
            added = relay["latency_ms"]["p50"] - base["latency_ms"]["p50"]
            # Closed loop over several connections, p50 is queueing (it
            # follows decisions/s): the p50 target is read at one
            # connection and in open loop, the rate target everywhere.
            latency_point = point[0] == 1 or bool(point[1])
            met = share >= TARGET_RELAY_SHARE and (
                not latency_point or added <= TARGET_RELAY_P50_MS)
            verdict = ("" if label != "policyd" else
                       f" (target >= {TARGET_RELAY_SHARE:.0%}"
                       + (f", p50 <= +{TARGET_RELAY_P50_MS:g} ms" if latency_point else "")
                       + f": {'met' if met else 'MISSED'})")
            parts.append(f"vs {label}: {share:.0%} of decisions/s, p50 {added:+.2f} ms"
                         + verdict)
        lines.append(f"- {RELAY_ON} at {load}: " + "; ".join(parts)
                     + f"; deferred {deferred / total:.2%}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds measured per point (default 10)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per point; the median by decisions/s is reported, "
                             "with the range of all runs (default 1)")
    parser.add_argument("--connections", default="1,8,32",
                        help="comma-separated connection counts (default 1,8,32)")
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20000,
                        help="distinct requests the load cycles through (default 20000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=lambda text: [float(r) for r in text.split(",") if r],
                        default=[300.0, 1000.0],
                        help="also measure latency in open loop at these rates (comma-"
                             "separated messages a second) over the most connections "
                             "(default 300,1000; empty: skip)")
    parser.add_argument("--repeat-forgers", action="store_true",
                        help="forged mail repeats from the listed addresses (every "
                             "decision cacheable) instead of coming from new ones")
    parser.add_argument("--only", choices=("policyd", "policyd-spf"),
                        help="measure one server only")
    parser.add_argument("--relay", action="store_true",
                        help="right after policyd, the same points on a request mix with "
                             "logins relaying and strangers trying to, first with relay "
                             "and limits off, then on with every limit counted in a "
                             "redis-server started for the run")
    parser.add_argument("--relay-scope", choices=("all", "relay"), default="all",
                        help="limits.scope of the --relay row: all (default: every accepted "
                             "recipient counted in Redis) or relay (the logins' only)")
    parser.add_argument("--no-variants", action="store_true",
                        help="skip policyd with the DNS cache off and with info logging")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--profile", metavar="FILE",
                        help="after the measured runs, record policyd with py-spy at the "
                             "most connections into FILE (raw collapsed stacks) and "
                             "summarize where the time goes")
    parser.add_argument("--py-spy", help="the py-spy binary (default: from PATH)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (configs, logs, zone)")
    arguments = parser.parse_args(argv)
    counts = [int(n) for n in arguments.connections.split(",")]
    Workload.repeat_forgers = arguments.repeat_forgers
    # Other work on the machine moves every figure: say how busy it was.
    with open("/proc/loadavg", encoding="ascii") as stream:
        arguments.load_before = stream.read().split()[0]
    if os.geteuid() != 0:
        parser.error("run as root: policyd-spf needs a mount namespace and port 53")

    # Children inherit the limit: the server needs a descriptor per idle
    # connection (Postfix keeps up to one per smtpd process).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = arguments.idle_connections + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    # SIGTERM unwinds like Ctrl-C, so the finally below stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    directory = tempfile.mkdtemp(prefix="policyd-bench-")
    started = []
    results, memory = [], []
    try:
        the_world = world.World(arguments.domains, arguments.seed)
        requests_path = os.path.join(directory, "requests.jsonl")
        expectations = the_world.write_policy_requests(requests_path, arguments.requests)
        samples = {}
        for transaction in the_world.transactions(arguments.requests):
            samples.setdefault(transaction.expect, transaction)

        resolver_address = world.free_loopback_address(53)
        resolver_port = world.free_port(resolver_address)
        unbound = world.Unbound(the_world, directory, resolver_address, (53, resolver_port))
        unbound.start()
        started.append(unbound)
        print(f"unbound on {resolver_address} ports 53 and {resolver_port}, "
              f"{len(the_world.records)} records (pid {unbound.process.pid})", flush=True)

        null = None

        def measure(server, connections, pid=None, rate=0, path=None):
            print(f"  {server.name}: {connections} connection(s)"
                  + (f", {rate:g}/s offered" if rate else "") + " ...", end=" ", flush=True)
            runs = [run_load(server.port, connections, arguments.duration,
                             path or requests_path, pid, rate=rate)
                    for _ in range(arguments.repeat)]
            # This box's figures move from run to run (two shared cores):
            # the median run by decisions/s stands for the point, the
            # others give its spread.
            runs.sort(key=lambda run: run["decisions_per_second"])
            result = runs[len(runs) // 2]
            result["spread"] = {
                "decisions_per_second": [runs[0]["decisions_per_second"],
                                         runs[-1]["decisions_per_second"]],
                "p99_ms": sorted(run["latency_ms"]["p99"] for run in runs)}
            result["server"] = server.name
            # The null responder answers DUNNO to all: nothing to check.
            result["wrong"] = [] if server is null else [
                problem for run in runs for problem in wrong_decisions(
                    run["actions"], nat_relaxed=isinstance(server, Policyd),
                    relay=server.name == RELAY_ON)]
            results.append(result)
            print(f"{result['decisions_per_second']:,.0f}/s p50 "
                  f"{result['latency_ms']['p50']:.2f} ms p99 "
                  f"{result['latency_ms']['p99']:.2f} ms"
                  + (f"  WRONG: {result['wrong']}" if result["wrong"] else ""), flush=True)

        # The ceiling of the load generator itself, against a server that
        # does nothing: it must sit far above what the servers reach.
        print("null responder (load generator ceiling)", flush=True)
        null = subprocess.Popen([sys.executable, LOADGEN, "null-server"],
                                stdout=subprocess.PIPE, text=True)
        started.append(null)
        null.port = int(null.stdout.readline())
        null.name = "null responder"
        measure(null, max(counts), null.pid)
        stop_process(null)

        if arguments.only != "policyd":
            reference = PolicydSpf(directory, resolver_address, world.free_port("127.0.0.1"),
                                   AUTHSERV_ID)
            print(f"policyd-spf under socat, port {reference.port}", flush=True)
            reference.start()
            started.append(reference)
            verify(reference, samples, nat_relaxed=False)
            for connections in counts:
                measure(reference, connections)
            for rate in arguments.rate:
                measure(reference, max(counts), rate=rate)
            idle = hold_idle(reference.port, max(counts), requests_path, reference.process.pid)
            idle["server"] = "policyd-spf"
            memory.append(idle)
            reference.stop()

        if arguments.only != "policyd-spf":
            variants = [("policyd", {}, counts)]
            # label -> (requests, config sections added)
            relay_rows: dict[str, tuple[str, str]] = {}
            if arguments.relay:
                relay_path = os.path.join(directory, "relay-requests.jsonl")
                expectations_relay = write_relay_requests(requests_path, relay_path)
                redis = start_redis(directory)
                started.append(redis)
                arguments.relay_mix = expectations_relay
                print(f"redis-server on 127.0.0.1:{redis.port} (pid {redis.pid}); relay mix: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(expectations_relay.items())),
                      flush=True)
                relay_rows = {RELAY_OFF: (relay_path, ""),
                              RELAY_ON: (relay_path,
                                         relay_settings(f"redis://127.0.0.1:{redis.port}/0",
                                                        arguments.relay_scope))}
                # Back to back with the policyd row: the ratio is taken
                # within one run, the machine's load alike for both.
                variants += [(RELAY_OFF, {}, counts), (RELAY_ON, {}, counts)]
            if not arguments.no_variants:
                variants += [("policyd, dns.cache_size 0", {"cache_size": 0}, [max(counts)]),
                             ("policyd, log_level info", {"log_level": "info"}, [max(counts)]),
                             ("policyd, policy.processes 1", {"processes": 1}, [max(counts)])]
            for label, settings, points in variants:
                server = Policyd(directory, REPOSITORY, resolver_address, resolver_port,
                                 world.free_port("127.0.0.1"), AUTHSERV_ID, NAT,
                                 label=label, **settings)
                path, extra = relay_rows.get(label, (requests_path, ""))
                if extra:
                    with open(server.config_path, "a", encoding="ascii") as stream:
                        stream.write(extra)
                print(f"{label}, port {server.port}", flush=True)
                server.start()
                started.append(server)
                if label in ("policyd", RELAY_ON):
                    verify(server, samples, nat_relaxed=True)
                if label == RELAY_ON:
                    verify_relay(server, path)
                if label == "policyd":
                    memory.append(dict(memory_kib(server.pid), connections=0,
                                       server="policyd, just started"))
                # Steady state: unreported passes over every request fill
                # the caches with what repeat senders need.  Forged mail
                # still brings new addresses and HELO names each time.
                # Each pass opens new connections, which the kernel deals
                # out afresh among policyd's worker processes (each has its
                # own cache), so three passes warm every worker.
                print(f"  {label}: warming the caches ({WARM_UP_PASSES} x "
                      f"{arguments.requests} requests) ...", flush=True)
                for _ in range(WARM_UP_PASSES):
                    run_load(server.port, max(counts), 0, path,
                             count=arguments.requests)
                for connections in points:
                    measure(server, connections, server.pid, path=path)
                for rate in arguments.rate if label in ("policyd", RELAY_OFF, RELAY_ON) else ():
                    measure(server, max(counts), server.pid, rate=rate, path=path)
                if label == RELAY_ON:
                    # The limits really counted in Redis (keys with TTLs).
                    keys = redis_command(redis.port, "DBSIZE").lstrip(":")
                    print(f"  {label}: {keys} keys in Redis", flush=True)
                    if not keys.isdigit() or int(keys) == 0:
                        raise RuntimeError(f"{label}: nothing counted in Redis")
                # The caches are full now: the baseline idle connections add to.
                memory.append(dict(memory_kib(server.pid), connections=0,
                                   server=f"{label}, after the load"))
                if label == "policyd" and arguments.profile:
                    profile(server, max(counts), arguments, requests_path)
                if label in ("policyd", "policyd, policy.processes 1"):
                    idle = hold_idle(server.port, arguments.idle_connections,
                                     requests_path, server.pid)
                    idle["server"] = label
                    memory.append(idle)
                server.stop()

        text = report(results, memory, arguments, expectations)
        print()
        print(text)
        if arguments.json:
            with open(arguments.json, "w", encoding="utf-8") as stream:
                json.dump({"results": results, "memory": memory,
                           "expectations": expectations}, stream, indent=1)
        return 1 if any(r.get("wrong") for r in results) else 0
    finally:
        for thing in reversed(started):
            if isinstance(thing, subprocess.Popen):
                stop_process(thing)
            else:
                thing.stop()
        if arguments.keep:
            print(f"scratch directory kept: {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
