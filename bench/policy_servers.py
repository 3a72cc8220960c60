"""The two policy servers under test, each with start()/stop() by PID.

policyd runs as one long-lived process, as it would in production.

policyd-spf (Debian's postfix-policyd-spf-python) runs as Postfix's
spawn(8) would run it: one process per connection, each serving that
connection's requests until it closes.  socat plays spawn(8).  pyspf looks
names up through dnspython's module-level resolver, which reads
/etc/resolv.conf; to point it at the benchmark's unbound without touching
that file, socat runs in a private mount namespace where a temporary
resolv.conf is bind-mounted over /etc/resolv.conf.  The real file, and
every other process, never see the change.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

POLICYD_SPF = "/usr/bin/policyd-spf"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children first seen first)."""
    children_of: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stream:
                stat = stream.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields after it
        # are space-separated, the parent PID is the second of them.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children_of.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children_of.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS of `pid` and its descendants, in KiB.  RSS counts pages
    shared between processes once per process; PSS splits them, so the
    PSS sum is what the tree really costs."""
    totals = {"rss_kib": 0, "pss_kib": 0, "processes": 0}
    for member in [pid] + descendants(pid):
        try:
            with open(f"/proc/{member}/status", encoding="ascii") as stream:
                for line in stream:
                    if line.startswith("VmRSS:"):
                        totals["rss_kib"] += int(line.split()[1])
            with open(f"/proc/{member}/smaps_rollup", encoding="ascii") as stream:
                for line in stream:
                    if line.startswith("Pss:"):
                        totals["pss_kib"] += int(line.split()[1])
        except OSError:
            continue   # exited meanwhile
        totals["processes"] += 1
    return totals


def wait_for_listener(port: int, process: subprocess.Popen, what: str,
                      log_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n"
                               + tail(log_path))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} is not listening on port {port}:\n"
                                   + tail(log_path)) from None
            time.sleep(0.05)


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return "".join(stream.readlines()[-lines:])
    except OSError:
        return ""


def stop_process(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_tree(process: subprocess.Popen | None) -> None:
    """Stops `process`, then every process below it still there, by PID."""
    if process is None:
        return
    below = descendants(process.pid)
    stop_process(process)
    for pid in below:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class PolicydSpf:
    """socat spawning /usr/bin/policyd-spf per connection, in a mount
    namespace whose /etc/resolv.conf names the benchmark's unbound."""

    name = "policyd-spf"

    def __init__(self, directory: str, resolver_address: str, port: int, authserv_id: str):
        self.directory, self.port = directory, port
        self.config_path = os.path.join(directory, "policyd-spf.conf")
        self.resolv_conf_path = os.path.join(directory, "resolv.conf")
        self.log_path = os.path.join(directory, "policyd-spf.log")
        self.process: subprocess.Popen | None = None
        with open(self.resolv_conf_path, "w", encoding="ascii") as stream:
            stream.write(f"nameserver {resolver_address}\n")
        # The Debian default file, with the settings of policyd's config:
        # HELO and MAIL FROM checked, reject on Fail, act (TestOnly = 1),
        # an Authentication-Results header (policyd writes one too), no
        # debug logging.
        with open(self.config_path, "w", encoding="ascii") as stream:
            stream.write("debugLevel = 0\n"
                         "TestOnly = 1\n"
                         "HELO_reject = Fail\n"
                         "Mail_From_reject = Fail\n"
                         "PermError_reject = False\n"
                         "TempError_Defer = False\n"
                         "skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1\n"
                         "Header_Type = AR\n"
                         f"Authserv_Id = {authserv_id}\n")

    def start(self) -> None:
        for path in (POLICYD_SPF, "/usr/bin/socat", "/usr/bin/unshare"):
            if not os.access(path, os.X_OK):
                raise RuntimeError(f"{path} is missing (apt-get install "
                                   "postfix-policyd-spf-python socat util-linux)")
        listen = f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
        spawn = f"EXEC:{POLICYD_SPF} {self.config_path}"
        # unshare and sh both exec, so the PID we hold is socat's.  The
        # mount happens inside the new namespace only; if it fails, `&&`
        # keeps socat (and so policyd-spf) from starting at all, so it can
        # never fall back to the machine's resolver.
        script = 'mount --bind "$1" /etc/resolv.conf && exec socat "$2" "$3"'
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private",
             "sh", "-c", script, "sh", self.resolv_conf_path, listen, spawn],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "wb"))
        wait_for_listener(self.port, self.process, self.name, self.log_path)

    def stop(self) -> None:
        # Spawned servers end when their connection closes; any left (a
        # client that did not close) are ours to end, by PID.
        stop_tree(self.process)


class Policyd:
    """`python3 -m policyd serve -c CONFIG` from the repository."""

    def __init__(self, directory: str, repository: str, resolver_address: str,
                 resolver_port: int, port: int, authserv_id: str, nat: dict,
                 cache_size: int | None = None, log_level: str = "warning",
                 processes: int | None = None, label: str = "policyd"):
        self.name = label
        self.repository, self.port = repository, port
        slug = label.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        self.config_path = os.path.join(directory, f"{slug}.yaml")
        self.log_path = os.path.join(directory, f"{slug}.log")
        self.process: subprocess.Popen | None = None
        dns_lines = [f"  nameservers: [{resolver_address}]", f"  port: {resolver_port}"]
        if cache_size is not None:
            dns_lines.append(f"  cache_size: {cache_size}")
        text = "\n".join([
            f"authserv_id: {authserv_id}",
            f"log_level: {log_level}",
            "dns:", *dns_lines,
            "nat:",
            f"  own_domains: [{', '.join(nat['own_domains'])}]",
            f"  networks: [{', '.join(nat['networks'])}]",
            f"  public_addresses: [{', '.join(nat['public_addresses'])}]",
            "  mode: reevaluate",
            "policy:",
            f'  listen: ["inet:127.0.0.1:{port}"]',
            *([f"  processes: {processes}"] if processes else []),
        ]) + "\n"
        with open(self.config_path, "w", encoding="ascii") as stream:
            stream.write(text)

    def start(self) -> None:
        environment = dict(os.environ, PYTHONPATH=self.repository)
        self.process = subprocess.Popen(
            ["/usr/bin/python3", "-m", "policyd", "serve", "-c", self.config_path],
            cwd=self.repository, env=environment, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"))
        wait_for_listener(self.port, self.process, self.name, self.log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_tree(self.process)   # the parent, then any worker left
