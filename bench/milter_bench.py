"""Messages per second through the milter protocol: policyd's milter against
Debian's pyspf-milter, on the same load and the same loopback resolver.

    /usr/bin/python3 bench/milter_bench.py [--messages 3000] [--concurrency 16]
        [--rounds 3] [--workers 2,4] [--tcp] [--own-lookups] [--ceiling]
        [--client c|python] [--signing] [--json FILE]

The load: bench/world.py's sender domains and transactions (SPF records of
every common shape, FCrDNS/PTR-less/forged IPv4 and IPv6 clients, own-domain
mail from the NAT networks), turned into whole messages of a realistic size
mix (60 % 2 KB, 30 % 20 KB, 10 % 100 KB), most of them DKIM-signed with a
2048-bit RSA key published in the world's zone, some with a signature
broken in transit.  Each message is one SMTP session as Postfix runs it:
connect, option negotiation, macros, HELO, MAIL, RCPT, headers, body, end
of message, QUIT; `--concurrency` sessions at a time.

The MTA side is bench/milter_load.c (built with cc for the run): C, as
the MTAs that talk to milters are, packet for packet what
bench/milter_client.py sends (the sessions are recorded through it, and an
integration test holds the two to the same verdicts).  It matters on a
small machine, where the load generator shares the cores with the milter
it measures: the Python client spends 0.25 ms of CPU per message, this
one 0.13 ms (most of it the kernel's: waking the milter's thread for each
packet is charged to the sender), and what it spends is taken from a
milter at 1,500 messages/s three times as much as from one at 500.
`--client python` runs the old one (two processes, --concurrency threads
between them).

policyd runs once per `--workers` count (`milter.workers`: 1 is one
process, as pyspf-milter is; more is that many worker processes sharing the
socket, the default being 4), each a row of its own.  The workers share
their DNS answers and SPF outcomes (dns.SharedAnswers), so "warm" means
warm for every worker, not only for the one that saw a sender before.

Both milters resolve through one unbound on a 127.53.x.y address: policyd
through its config (dns.nameservers and port), pyspf-milter through the
system resolver, so it runs in a private mount namespace (`unshare -m`)
where a temporary resolv.conf is bind-mounted over /etc/resolv.conf; the
real file is never touched.  Both listen on UNIX sockets: no Nagle delay on
either side (docs/protocols.md §2); `--tcp` adds a run of policyd over TCP,
whose listening socket has TCP_NODELAY.

pyspf-milter checks SPF at MAIL FROM (and a HELO check on the connect
host name, not the HELO).  policyd checks SPF for MAIL FROM and HELO, iprev
(from the MTA's {client_resolve} macros, or with --own-lookups also by its
own lookups) and DKIM, removes forged Authentication-Results and inserts
its own.  Every milter is started afresh for each round and measured three
times: with an empty DNS cache; again on the same messages, every answer
cached; and again with each forged message (30 % of the mail) from a
client address, and half of them a HELO name, never seen before, as a
running milter meets a botnet while its real senders are cached (the
policy service's benchmark forges the same way).  The milter's CPU
time per message comes from /proc, summed over the milter's process and
its workers; the medians of the rounds are printed last, then each
configuration's verdicts by what the world expects.  "machine busy" is
every core's use during the run, load generator and resolver included: on
a small machine they share the cores with the milter, and a milter cannot
go faster than the cores left to it.

`--signing` adds the cost of DKIM signing (issue 12): outbound mail (a
SASL login, From one of the own domains, 20 KB each) through policyd's
milter with signing off, with RSA-2048, and with RSA-2048 and Ed25519,
and through OpenDKIM's milter signing the same sessions with the same
RSA key; each milter's first session is played through
bench/milter_client.py and its signatures verified with dkimpy before
it is measured.  Before that, the signer alone, in this process: CPU per
20 KB message for each key.

`--ceiling` adds a row for bench/milter_null.py, a pymilter milter that
takes the same protocol steps as pyspf-milter and does no work: the rate
the load generator and libmilter leave room for on this machine.  After
the medians, each policyd row is given as a multiple of pyspf-milter's
rate in the same rounds.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from milter_client import (SMFIC_BODY, SMFIC_BODYEOB, SMFIC_CONNECT,  # noqa: E402
                           SMFIC_EOH, SMFIC_HEADER, SMFIC_HELO, SMFIC_MACRO, SMFIC_MAIL,
                           SMFIC_RCPT, SMFIP_HDR_LEADSPC, SMFIR_ACCEPT, SMFIR_CONTINUE,
                           SMFIR_REJECT, SMFIR_REPLYCODE, SMFIR_TEMPFAIL, MilterClient)
from world import (NAT_NETWORKS, OWN_DOMAIN, OWN_PUBLIC_ADDRESS, Unbound,  # noqa: E402
                   World, free_loopback_address, free_port, fresh_value)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from policyd.config import MilterConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SELECTOR = "bench"
SIZES = ((0.6, 2000), (0.3, 20000), (0.1, 100000))
SIGNED_SHARE = 0.8          # legitimate mail that carries a DKIM signature
BROKEN_SHARE = 0.1          # forged mail with a signature that no longer verifies
START_TIMEOUT = 30.0
# Each milter, started afresh, gets the sessions three times: with empty
# caches; again, every answer cached; and again with every forged session
# from a client (and HELO name) never seen before (with_new_forgers).
PASSES = ("cold cache", "warm cache", "steady: forgers new")


# --- the load ----------------------------------------------------------------------

@dataclass(frozen=True)
class Session:
    kind: str                 # the world's expectation: pass, fail, ..., nat
    address: str
    helo: str
    client_name: str
    reverse_client_name: str
    sender: str
    recipient: str
    message: bytes
    fresh: tuple[tuple[str, str], ...] = ()   # world.Transaction.fresh: forged, new each time
    login: str = ""           # {auth_authen}: a SASL login (--signing's outbound mail)


def with_new_forgers(sessions: list[Session], serial_base: int) -> list[Session]:
    """The same sessions, each forged one from a client address (and, where
    it had a made-up HELO name, a HELO name) nobody has seen: what a
    running milter meets, its senders cached and the forgers new (as
    bench/run_policy.py makes them for the policy service)."""
    result = []
    for number, session in enumerate(sessions):
        if not session.fresh:
            result.append(session)
            continue
        serial = serial_base + number
        fresh = dict(session.fresh)
        result.append(dataclasses.replace(
            session, address=fresh_value(fresh["client_address"], serial),
            helo=fresh_value("helo", serial) if "helo_name" in fresh else session.helo))
    return result


def make_key() -> tuple[bytes, str]:
    private = subprocess.run(["openssl", "genrsa", "-traditional", "2048"],
                             capture_output=True, check=True).stdout
    public = subprocess.run(["openssl", "rsa", "-pubout", "-outform", "DER"], input=private,
                            capture_output=True, check=True).stdout
    return private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode("ascii")


def publish_key(world: World, record: str) -> None:
    """One key for every sender domain: what is measured is verification,
    and every domain's record is a separate DNS answer all the same."""
    strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    for name in [d.name for d in world.domains] + [OWN_DOMAIN]:
        world.records.append(f"{SELECTOR}._domainkey.{name}. 3600 IN TXT {strings}")


def body_text(size: int, rng: random.Random) -> str:
    words = ["policy", "mail", "report", "meeting", "invoice", "delivery", "the", "and",
             "of", "a", "to", "in", "is", "for", "on", "with", "as", "at", "by", "from"]
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(words) for _ in range(11))
        lines.append(line)
        total += len(line) + 2
    return "\r\n".join(lines) + "\r\n"


def build_message(number: int, sender: str, recipient: str, rng: random.Random,
                  size: int = 0) -> bytes:
    size = size or rng.choices([s for _, s in SIZES], [w for w, _ in SIZES])[0]
    headers = (f"Received: from client{number}.example (client{number}.example [192.0.2.1])\r\n"
               f"\tby relay.example with ESMTPS id R{number:08d}\r\n"
               f"From: Sender {number} <{sender or 'postmaster@example'}>\r\n"
               f"To: <{recipient}>\r\n"
               f"Subject: Message {number} about the quarterly report\r\n"
               f"Date: Mon, 01 Jan 2024 10:{number % 60:02d}:00 +0000\r\n"
               f"Message-ID: <{number}.{rng.getrandbits(32):x}@{sender.rpartition('@')[2] or 'x'}>\r\n"
               f"MIME-Version: 1.0\r\n"
               f"Content-Type: text/plain; charset=utf-8\r\n")
    return (headers + "\r\n" + body_text(size, rng)).encode("utf-8")


def sign(message: bytes, domain: str, private: bytes) -> bytes:
    signature = dkim.sign(message, SELECTOR.encode(), domain.encode(), private,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                                           b"mime-version", b"content-type"])
    return signature + message


def _sign_one(job):
    index, message, domain, private, broken = job
    signed = sign(message, domain, private)
    if broken:
        signed = signed.replace(b"quarterly report", b"quarterly rep0rt", 1)
    return index, signed


def build_sessions(world: World, count: int, private: bytes, seed: int) -> list[Session]:
    rng = random.Random(seed * 31 + count)
    sessions, jobs = [], []
    for number, transaction in enumerate(world.transactions(count)):
        message = build_message(number, transaction.sender, transaction.recipient, rng)
        domain = transaction.sender.rpartition("@")[2]
        if transaction.expect in ("pass", "none", "nat"):
            if rng.random() < SIGNED_SHARE:
                jobs.append((number, message, domain, private, False))
        elif rng.random() < BROKEN_SHARE:
            jobs.append((number, message, domain, private, True))
        host = transaction.host
        sessions.append(Session(transaction.expect, host.address, host.helo, host.client_name,
                                host.reverse_client_name, transaction.sender,
                                transaction.recipient, message, transaction.fresh))
    with multiprocessing.get_context("fork").Pool() as pool:
        for index, signed in pool.imap_unordered(_sign_one, jobs, chunksize=16):
            sessions[index] = dataclasses.replace(sessions[index], message=signed)
        # Workers that end by themselves: the `with` alone terminates them,
        # and with main()'s SIGTERM handler inherited, one could be left
        # waiting on the queue's lock forever (seen once).
        pool.close()
        pool.join()
    return sessions


# --- one session, as Postfix runs it -------------------------------------------------

def connect_macros(session: Session, with_names: bool) -> dict[str, str]:
    """Postfix's default connect macros; with_names adds the four it sends
    when a milter asks for them (policyd does, with setsymlist)."""
    macros = {"j": "mx.own.example", "{daemon_name}": "smtpd", "v": "Postfix 3.7.11",
              "_": f"unknown [{session.address}]"}
    if with_names:
        if session.client_name != "unknown":
            resolve = "OK"
        elif session.reverse_client_name != "unknown":
            resolve = "FORGED"
        else:
            resolve = "FAIL"
        macros.update({"{client_addr}": session.address, "{client_resolve}": resolve,
                       "{client_name}": session.client_name,
                       "{client_ptr}": session.reverse_client_name})
    return macros


def verdict_of(reply, stage: str) -> str:
    return "" if reply is None else verdict_name(reply.command, reply.data[:1], stage)


def verdict_name(command: bytes, code: bytes, stage: str) -> str:
    """A final reply as a verdict; "" for CONTINUE.  code: the reply
    data's first octet (a reply code's class)."""
    if command == SMFIR_CONTINUE:
        return ""
    if command == SMFIR_ACCEPT:
        return "accept"
    if command == SMFIR_REJECT or (command == SMFIR_REPLYCODE and code == b"5"):
        return f"reject@{stage}"
    if command == SMFIR_TEMPFAIL or command == SMFIR_REPLYCODE:
        return f"defer@{stage}"
    return f"{command.decode()}@{stage}"


def run_session(spec: str, session: Session, with_names: bool, number: int) -> str:
    client = MilterClient.connect_to(spec)
    try:
        client.negotiate()
        return play_session(client, session, with_names, number)
    finally:
        client.quit()


def play_session(client: MilterClient, session: Session, with_names: bool,
                 number: int) -> str:
    """One session after option negotiation, as Postfix runs it."""
    client.conninfo(f"[{session.address}]", session.address,
                    macros=connect_macros(session, with_names))
    client.helo(session.helo)
    queue_id = f"{number:010X}"
    verdict = verdict_of(client.mail(f"<{session.sender}>",
                                     macros={"{auth_type}": "PLAIN" if session.login else "",
                                             "{auth_authen}": session.login,
                                             "{mail_addr}": session.sender}), "mail")
    if verdict:
        return verdict
    verdict = verdict_of(client.rcpt(f"<{session.recipient}>",
                                     macros={"i": queue_id,
                                             "{rcpt_addr}": session.recipient}), "rcpt")
    if verdict:
        return verdict
    client.message(session.message)
    return verdict_of(client.eom(macros={"i": queue_id}), "eom") or "accept"


class _Recorder(MilterClient):
    """play_session's packets, for bench/milter_load.c to send: each with
    its step kind (milter_load.c's enum kind), none answered.  Headers keep
    their leading space; milter_load.c drops it unless the milter asks for
    it (SMFIP_HDR_LEADSPC)."""

    KINDS = {SMFIC_MACRO: 0, SMFIC_CONNECT: 1, SMFIC_HELO: 2, SMFIC_MAIL: 3, SMFIC_RCPT: 4,
             SMFIC_HEADER: 5, SMFIC_EOH: 6, SMFIC_BODY: 7, SMFIC_BODYEOB: 8}

    def __init__(self):
        super().__init__(None)
        self.protocol = SMFIP_HDR_LEADSPC
        self.steps: list[tuple[int, bytes]] = []

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.steps.append((self.KINDS[command], command + data))

    def reply(self):
        return None


def write_script(sessions: list[Session], with_names: bool, path: Path) -> None:
    """The sessions file bench/milter_load.c reads (its header comment)."""
    with open(path, "wb") as stream:
        stream.write(struct.pack("<I", len(sessions)))
        for number, session in enumerate(sessions):
            recorder = _Recorder()
            play_session(recorder, session, with_names, number)
            stream.write(struct.pack("<I", len(recorder.steps)))
            for kind, packet in recorder.steps:
                stream.write(struct.pack("<BI", kind, len(packet)) + packet)


def build_load_generator(directory: Path) -> Path:
    binary = directory / "milter_load"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(binary),
                    str(REPO / "bench" / "milter_load.c")], check=True)
    return binary


# --- the load generator ------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    verdicts: dict[str, dict[str, int]] = field(default_factory=dict)
    by_session: dict[int, str] = field(default_factory=dict)   # run_load_c's only
    errors: int = 0
    milter_cpu: float = 0.0     # seconds of CPU the milter process(es) used
    machine_busy: float = 0.0   # cores busy on the whole machine (load generator too)

    @property
    def messages(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def _worker(specs, sessions, indexes, threads, with_names, barrier, results):
    latencies, verdicts, errors = [], {}, [0]
    lock = threading.Lock()
    chunks = [indexes[i::threads] for i in range(threads)]

    def loop(chunk):
        for index in chunk:
            started = time.perf_counter()
            try:
                verdict = run_session(specs[index % len(specs)], sessions[index],
                                      with_names, index)
            except Exception:   # counted and reported: a benchmark keeps going
                with lock:
                    errors[0] += 1
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                kind = verdicts.setdefault(sessions[index].kind, {})
                kind[verdict] = kind.get(verdict, 0) + 1

    barrier.wait()
    started = time.time()
    workers = [threading.Thread(target=loop, args=(chunk,)) for chunk in chunks]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put((started, time.time(), latencies, verdicts, errors[0]))


def run_load(name: str, specs: list[str], sessions: list[Session], concurrency: int,
             with_names: bool, processes: int = 2) -> RunResult:
    """Every session once, `concurrency` at a time from `processes` client
    processes; session i goes to specs[i % len(specs)] (one spec per milter
    here: a milter's workers share its socket)."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes)
    results = context.Queue()
    indexes = list(range(len(sessions)))
    per_process = [indexes[i::processes] for i in range(processes)]
    threads = max(1, concurrency // processes)
    children = [context.Process(target=_worker, args=(specs, sessions, part, threads,
                                                      with_names, barrier, results))
                for part in per_process]
    for child in children:
        child.start()
    collected = [results.get() for _ in children]
    for child in children:
        child.join()
    result = RunResult(name, max(c[1] for c in collected) - min(c[0] for c in collected))
    for _, _, latencies, verdicts, errors in collected:
        result.latencies.extend(latencies)
        result.errors += errors
        for kind, counts in verdicts.items():
            merged = result.verdicts.setdefault(kind, {})
            for verdict, count in counts.items():
                merged[verdict] = merged.get(verdict, 0) + count
    return result


def run_load_c(name: str, binary: Path, spec: str, script: Path, sessions: list[Session],
               concurrency: int) -> RunResult:
    """Every session once, `concurrency` at a time, from bench/milter_load.c
    (script: write_script's file of the same sessions)."""
    # Each session has 30 s socket timeouts; a pass takes seconds.
    done = subprocess.run([str(binary), spec, str(script), str(concurrency)],
                          capture_output=True, text=True, check=True, timeout=900)
    if done.stderr:
        print(done.stderr.rstrip(), file=sys.stderr)
    lines = done.stdout.splitlines()
    result = RunResult(name, float(lines[0].split()[1]))
    for line in lines[1:]:
        index, stage, command, code, nanoseconds = line.split()
        if stage == "error":
            result.errors += 1
            continue
        result.latencies.append(int(nanoseconds) / 1e9)
        verdict = verdict_name(command.encode(), code.encode(), stage) or "accept"
        result.by_session[int(index)] = verdict
        kind = result.verdicts.setdefault(sessions[int(index)].kind, {})
        kind[verdict] = kind.get(verdict, 0) + 1
    return result


# --- the milters -----------------------------------------------------------------------

def wait_for_socket(spec: str, process: subprocess.Popen, log_path: Path) -> None:
    """Returns once the milter answers; stops it and raises if it does not."""
    try:
        _wait_for_socket(spec, process, log_path)
    except BaseException:
        stop(process)   # a milter that did not start is not left behind
        raise


def _wait_for_socket(spec: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{spec}: exited {process.returncode}: {log_path.read_text()}")
        try:
            client = MilterClient.connect_to(spec, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{spec}: no answer; see {log_path}") from None
            time.sleep(0.05)
            continue
        client.close()
        return


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_policyd(directory: Path, unbound: Unbound, listen: str,
                  workers: int, extra: dict | None = None) -> subprocess.Popen:
    settings = {
        "authserv_id": "mx.own.example",
        "log_level": "info",
        "dns": {"nameservers": [unbound.address], "port": unbound.ports[0]},
        "nat": {"own_domains": [OWN_DOMAIN], "networks": list(NAT_NETWORKS),
                "public_addresses": [OWN_PUBLIC_ADDRESS]},
        "milter": {"listen": listen, "workers": workers},
        **(extra or {}),
    }
    config = directory / "policyd.yaml"
    config.write_text(yaml.safe_dump(settings))
    log_path = directory / "policyd-milter.log"
    process = subprocess.Popen([sys.executable, "-m", "policyd", "milter", "-c", str(config)],
                               cwd=REPO, stdin=subprocess.DEVNULL,
                               stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    wait_for_socket(listen, process, log_path)
    # Measured from the first session on: every worker is up.
    deadline = time.monotonic() + START_TIMEOUT
    while workers > 1 and log_path.read_text().count(" INFO: milter worker ") < workers:
        if time.monotonic() > deadline or process.poll() is not None:
            stop(process)
            raise RuntimeError(f"{listen}: not {workers} workers; see {log_path}")
        time.sleep(0.05)
    return process


def start_null_milter(directory: Path, listen: str) -> subprocess.Popen:
    log_path = directory / "null-milter.log"
    process = subprocess.Popen([sys.executable, str(REPO / "bench" / "milter_null.py"), listen],
                               stdin=subprocess.DEVNULL, stdout=open(log_path, "wb"),
                               stderr=subprocess.STDOUT)
    wait_for_socket(listen, process, log_path)
    return process


def start_pyspf_milter(directory: Path, unbound: Unbound, listen: str) -> subprocess.Popen:
    """In a private mount namespace whose /etc/resolv.conf names our
    unbound (port 53: resolv.conf has no port syntax)."""
    resolv = directory / "resolv.conf"
    resolv.write_text(f"nameserver {unbound.address}\n")
    pid_file = directory / "pyspf-milter.pid"
    pid_file.unlink(missing_ok=True)   # it refuses to start over its last one
    config = directory / "pyspf-milter.conf"
    config.write_text("\n".join([
        "debugLevel = 1", "TestOnly = 1", "HELO_reject = Fail", "Mail_From_reject = Fail",
        "PermError_reject = False", "TempError_Defer = False",
        "skip_addresses = 127.0.0.0/8,::ffff:127.0.0.0/104,::1",
        f"Socket = {listen}", f"PidFile = {pid_file}",
        "UserID = root", ""]))
    log_path = directory / "pyspf-milter.log"
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$0" /etc/resolv.conf && exec /usr/bin/pyspf-milter "$1"',
         str(resolv), str(config)],
        stdin=subprocess.DEVNULL, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    wait_for_socket(listen, process, log_path)
    return process


# --- signing (issue 12) ---------------------------------------------------------------

SIGNING_SIZE = 20000        # "a typical message" of the 1 ms budget
SIGNING_SELECTOR = "sign"
OPENDKIM = "/usr/sbin/opendkim"


def outbound_sessions(count: int, seed: int) -> list[Session]:
    """Mail a relay's own users send: a SASL login, From an own domain."""
    rng = random.Random(seed * 17 + count)
    sessions = []
    for number in range(count):
        sender = f"user{number % 50}@{OWN_DOMAIN}"
        message = build_message(number, sender, f"friend{number}@example.net", rng,
                                size=SIGNING_SIZE)
        sessions.append(Session("outbound", "203.0.113.50", "laptop.example", "unknown",
                                "unknown", sender, f"friend{number}@example.net", message,
                                login=f"user{number % 50}"))
    return sessions


def write_private(path: Path, pem: bytes) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(pem)
    return path


def signer_cpu(keys_by_name: dict[str, list[Path]], message: bytes,
               count: int = 2000) -> dict[str, float]:
    """CPU ms per message of the signer alone (policyd/signing/signer.py):
    fields and body fed as the milter feeds them, the signatures made."""
    from policyd.signing.outbound import Origin
    from policyd.signing.settings import SigningConfig, SigningKey
    from policyd.signing.signer import Signer
    head, _, body = message.partition(b"\r\n\r\n")
    fields = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name.decode(), value))
    chunks = [body[i:i + 65535] for i in range(0, len(body), 65535)]
    found = {}
    for name, paths in keys_by_name.items():
        signer = Signer(SigningConfig(table=tuple(
            SigningKey(OWN_DOMAIN, "", f"s{n}", str(path)) for n, path in enumerate(paths))))
        started = time.process_time()
        for _ in range(count):
            signing = signer.start(Origin.RELAY)
            for field_name, value in fields:
                signing.add_header(field_name, value, True)
            for chunk in chunks:
                signing.add_body(chunk)
            result = signing.finish()
        found[name] = (time.process_time() - started) * 1000 / count
        assert result.status == "signed", result
    return found


def start_opendkim(directory: Path, listen: str, key: Path) -> subprocess.Popen:
    """OpenDKIM's milter signing own-domain mail of authenticated clients
    (its rule: {auth_authen} set, or a client in InternalHosts) with the
    same RSA key, relaxed/relaxed, From oversigned.  `directory` and the
    key's must have no ancestor others may write (OpenDKIM refuses /tmp)."""
    config = directory / "opendkim.conf"
    config.write_text("\n".join([
        "Mode s", f"Socket {listen}", f"Domain {OWN_DOMAIN}", f"Selector {SIGNING_SELECTOR}",
        f"KeyFile {key}", "Canonicalization relaxed/relaxed", "OversignHeaders From",
        "Syslog no", f"PidFile {directory / 'opendkim.pid'}", ""]))
    log_path = directory / "opendkim.log"
    process = subprocess.Popen([OPENDKIM, "-f", "-x", str(config)], stdin=subprocess.DEVNULL,
                               stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    wait_for_socket(listen, process, log_path)
    return process


def check_signed(spec: str, session: Session, records: dict[str, str]) -> int:
    """Plays one session through milter_client.py; the number of
    DKIM-Signature fields the milter inserted that dkimpy verifies."""
    client = MilterClient.connect_to(spec)
    try:
        client.negotiate()
        client.conninfo(f"[{session.address}]", session.address,
                        macros=connect_macros(session, True))
        client.helo(session.helo)
        client.mail(f"<{session.sender}>", macros={"{auth_type}": "PLAIN",
                                                   "{auth_authen}": session.login})
        client.rcpt(f"<{session.recipient}>", macros={"i": "CHECK"})
        client.message(session.message)
        reply = client.eom(macros={"i": "CHECK"})
    finally:
        client.quit()
    added = [(name, value) for _, name, value in
             reply.headers(b"i") + reply.headers(b"h") if name.lower() == "dkim-signature"]
    message = b"".join(f"{name}: {value.strip()}\r\n".replace("\r\n", "\n")
                       .replace("\n", "\r\n").encode() for name, value in added)
    message += session.message

    def dnsfunc(name, timeout=5):
        found = records.get(name.decode().rstrip("."))
        return found.encode() if found else None
    verifier = dkim.DKIM(message)
    return sum(1 for n in range(len(added)) if verifier.verify(idx=n, dnsfunc=dnsfunc))


def signing_runs(args, directory: Path, unbound: Unbound, binary: Path | None) -> list:
    """The --signing rows: (name, result) per round."""
    from policyd.signing import keys as signing_keys
    rsa, rsa_pem = signing_keys.generate("rsa", 2048)
    ed, ed_pem = signing_keys.generate("ed25519")
    rsa_path = write_private(directory / "sign-rsa.pem", rsa_pem)
    ed_path = write_private(directory / "sign-ed.pem", ed_pem)
    sessions = outbound_sessions(args.messages, args.seed)
    cpu = signer_cpu({"RSA-2048": [rsa_path], "Ed25519": [ed_path],
                      "RSA-2048 + Ed25519": [rsa_path, ed_path]}, sessions[0].message)
    print(f"\nthe signer alone, {SIGNING_SIZE // 1000} KB messages: " + ", ".join(
        f"{name} {ms:.3f} ms CPU/msg" for name, ms in cpu.items()), flush=True)
    workers = MilterConfig().workers
    table = {"off": [], "RSA-2048": [(0, rsa_path)],
             "RSA-2048 + Ed25519": [(0, rsa_path), (1, ed_path)]}
    records = {f"s0._domainkey.{OWN_DOMAIN}": rsa.record(),
               f"s1._domainkey.{OWN_DOMAIN}": ed.record(),
               f"{SIGNING_SELECTOR}._domainkey.{OWN_DOMAIN}": rsa.record()}
    runs = [(f"policyd milter, {workers} workers, signing {name}", "policyd", lines)
            for name, lines in table.items()]
    if os.path.exists(OPENDKIM):
        runs.append(("OpenDKIM 2.11 milter, signing RSA-2048", "opendkim", None))
    else:
        print(f"({OPENDKIM} not installed: apt-get install opendkim; no OpenDKIM row)")
    if binary is not None:
        script = directory / "outbound.load"
        write_script(sessions, True, script)
    # OpenDKIM's files in a place of the caller's home, /tmp being open to all.
    private_place = Path(tempfile.mkdtemp(prefix="policyd-bench-opendkim-",
                                          dir=Path.home()))
    try:
        private_key = write_private(private_place / "key.pem", rsa_pem)
        return _signing_rounds(args, directory, unbound, binary, runs, sessions, records,
                               private_place, private_key, script if binary else None)
    finally:
        shutil.rmtree(private_place, ignore_errors=True)


def _signing_rounds(args, directory, unbound, binary, runs, sessions, records,
                    private_place, private_key, script) -> list:
    workers = MilterConfig().workers
    results = []
    for _ in range(args.rounds):
        for name, kind, lines in runs:
            spec = f"unix:{directory}/{kind}-sign.sock"
            place = directory / f"{kind}-sign"
            place.mkdir(exist_ok=True)
            if kind == "policyd":
                extra = {"signing": {"table": [
                    {"match": OWN_DOMAIN, "selector": f"s{n}", "key_file": str(path)}
                    for n, path in lines]}} if lines else None
                process = start_policyd(place, unbound, spec, workers, extra)
                expected = len(lines)
            else:
                process = start_opendkim(private_place, spec, private_key)
                expected = 1
            try:
                verified = check_signed(spec, sessions[0], records)
                if verified != expected:
                    raise RuntimeError(f"{name}: {verified} of {expected} signatures verify")
                before, ticks_before = cpu_seconds(process), machine_ticks()
                label = f"{name} (outbound, {SIGNING_SIZE // 1000} KB)"
                if binary is not None:
                    result = run_load_c(label, binary, spec, script, sessions, args.concurrency)
                else:
                    result = run_load(label, [spec], sessions, args.concurrency, True)
                result.milter_cpu = cpu_seconds(process) - before
                busy, ticks = (after - earlier for after, earlier
                               in zip(machine_ticks(), ticks_before))
                result.machine_busy = os.cpu_count() * busy / max(ticks, 1)
                print(describe(result), flush=True)
                results.append(result)
            finally:
                stop(process)
    return results


# --- main ----------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """proc(5) stat fields from the third (state) on; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
            return stream.read().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_seconds(process: subprocess.Popen) -> float:
    """utime + stime (proc(5), fields 14 and 15) of a running milter and of
    every live process under it: policyd's workers are its children, and
    their CPU reaches the parent's cutime only when they are reaped."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    total, pending = 0, [process.pid]
    while pending:
        pid = pending.pop()
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
        pending.extend(parents.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, all) jiffies of every CPU since boot (proc(5) /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as stream:
        values = [int(v) for v in stream.readline().split()[1:]]
    idle = values[3] + values[4]        # idle, iowait
    return sum(values) - idle, sum(values)


def describe(result: RunResult) -> str:
    latencies = sorted(result.latencies)
    p50 = statistics.median(latencies) * 1000 if latencies else 0
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0
    cpu = result.milter_cpu * 1000 / result.messages if result.messages else 0
    return (f"{result.name:<56} {result.rate:>7.0f} msgs/s  p50 {p50:5.1f} ms  "
            f"p99 {p99:6.1f} ms  milter CPU {cpu:5.2f} ms/msg  "
            f"machine {result.machine_busy:4.2f}/{os.cpu_count()} cores busy  "
            f"errors {result.errors}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tcp", action="store_true", help="also policyd over TCP")
    parser.add_argument("--client", choices=("c", "python"), default="c",
                        help="the load generator: bench/milter_load.c (as an MTA, C) or "
                             "bench/milter_client.py")
    parser.add_argument("--own-lookups", action="store_true",
                        help="also policyd without the MTA's name macros")
    parser.add_argument("--workers", default=f"2,{MilterConfig().workers}",
                        help="policyd's milter.workers, one row per count "
                             "(default: 2, one per core here, and the default of "
                             f"{MilterConfig().workers} workers)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also a milter that does no work (bench/milter_null.py): "
                             "what the load generator and libmilter leave room for")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each milter, taking turns; the medians are reported")
    parser.add_argument("--signing", action="store_true",
                        help="also the cost of DKIM signing, beside OpenDKIM's")
    parser.add_argument("--only-signing", action="store_true",
                        help="the --signing rows alone")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally clauses stop every
    # process this run started (unbound, the milters).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    world = World(args.domains, args.seed)
    print(f"world: {len(world.domains)} domains; signing {args.messages} messages "
          f"(RSA 2048) ...", flush=True)
    private, record = make_key()
    publish_key(world, record)
    sessions = build_sessions(world, args.messages, private, args.seed)
    signed = sum(b"DKIM-Signature" in s.message for s in sessions)
    print(f"{len(sessions)} sessions, {signed} signed, "
          f"{sum(len(s.message) for s in sessions) // len(sessions)} octets on average",
          flush=True)
    # Serials past 2**21: apart from most of those the world drew (22 bits).
    passes = list(zip(PASSES, (sessions, sessions, with_new_forgers(sessions, 1 << 21))))
    forged = sum(1 for s in sessions if s.fresh)
    print(f"{forged} of them forged from a new client each time in the steady pass",
          flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="milter-bench-") as temporary:
        directory = Path(temporary)
        address = free_loopback_address(53)
        port = free_port(address)
        unbound = Unbound(world, str(directory), address, (port, 53))
        unbound.start()
        try:
            # (name, milter, workers, socket, MTA name macros)
            default = MilterConfig().workers
            runs = []
            for workers in [int(w) for w in args.workers.split(",")]:
                label = f"{workers} worker{'s' if workers > 1 else ''}" if workers > 1 \
                    else "1 process"
                if workers == default:
                    label += " (default)"
                runs.append((f"policyd milter, {label}, unix", "policyd", workers,
                             "unix:{d}/p.sock", True))
            if args.own_lookups:
                runs.append((f"policyd milter, {default} workers, unix, own iprev lookups",
                             "policyd", default, "unix:{d}/p.sock", False))
            if args.tcp:
                runs.append((f"policyd milter, {default} workers, tcp", "policyd", default,
                             "inet:{port}@127.0.0.1", True))
            runs.append(("pyspf-milter, unix", "pyspf", 1, "unix:{d}/s.sock", True))
            if args.ceiling:
                runs.append(("null milter (pymilter, no work), unix", "null", 1,
                             "unix:{d}/n.sock", True))
            if args.only_signing:
                runs = []
            binary = None
            if args.client == "c":
                binary = build_load_generator(directory)
                scripts = {}
                for label, load in passes:
                    for with_names in {run[4] for run in runs}:
                        scripts[label, with_names] = directory / f"{label}-{with_names}.load"
                        write_script(load, with_names, scripts[label, with_names])
            # Rounds take turns between the milters, so that a slow moment
            # of the machine does not fall on one of them only.
            for _ in range(args.rounds):
                for name, kind, workers, spec, with_names in runs:
                    # A new port each round: the last round's thousands of
                    # connections to the old one are still in TIME_WAIT.
                    spec = spec.format(d=directory, port=free_port("127.0.0.1"))
                    place = directory / kind
                    place.mkdir(exist_ok=True)
                    if kind == "policyd":
                        process = start_policyd(place, unbound, spec, workers)
                    elif kind == "null":
                        process = start_null_milter(place, spec)
                    else:
                        process = start_pyspf_milter(place, unbound, spec)
                    try:
                        for label, load in passes:
                            before, ticks_before = cpu_seconds(process), machine_ticks()
                            if args.client == "c":
                                result = run_load_c(f"{name} ({label})", binary, spec,
                                                    scripts[label, with_names], load,
                                                    args.concurrency)
                            else:
                                result = run_load(f"{name} ({label})", [spec], load,
                                                  args.concurrency, with_names)
                            result.milter_cpu = cpu_seconds(process) - before
                            busy, ticks = (after - earlier for after, earlier
                                           in zip(machine_ticks(), ticks_before))
                            result.machine_busy = os.cpu_count() * busy / max(ticks, 1)
                            print(describe(result), flush=True)
                            results.append(result)
                    finally:
                        stop(process)
            if args.signing or args.only_signing:
                results += signing_runs(args, directory, unbound, binary)
        finally:
            unbound.stop()
    by_name: dict[str, list[RunResult]] = {}
    for result in results:
        by_name.setdefault(result.name, []).append(result)
    print(f"\nmedian of {args.rounds} round(s), {args.concurrency} sessions at a time:")
    for name, rounds in by_name.items():
        rate = statistics.median(r.rate for r in rounds)
        cpu = statistics.median(1000 * r.milter_cpu / max(r.messages, 1) for r in rounds)
        busy = statistics.median(r.machine_busy for r in rounds)
        print(f"  {name:<56} {rate:>7.0f} msgs/s  milter CPU {cpu:5.2f} ms/msg  "
              f"machine {busy:4.2f}/{os.cpu_count()} cores busy")
    medians = {name: statistics.median(r.rate for r in rounds)
               for name, rounds in by_name.items()}
    # Also round by round: a round's milters met the same host, and the
    # host's speed changes from round to round.
    for label in PASSES:
        reference_name = f"pyspf-milter, unix ({label})"
        reference = medians.get(reference_name)
        for name, rate in medians.items():
            if reference and name.startswith("policyd") and name.endswith(f"({label})"):
                per_round = [policyd.rate / pyspf.rate for policyd, pyspf
                             in zip(by_name[name], by_name[reference_name])]
                print(f"  {name:<56} {rate / reference:5.2f} x pyspf-milter "
                      f"(rounds: {', '.join(f'{r:.2f}' for r in per_round)})")
    for name, rounds in by_name.items():
        if name.startswith("null milter"):
            continue
        print(f"\n{name}: verdicts by the world's expectation (last round)")
        for kind, counts in sorted(rounds[-1].verdicts.items()):
            print(f"  {kind:<9} " + ", ".join(f"{v}={n}" for v, n in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"name": r.name, "messages": r.messages, "seconds": r.seconds, "rate": r.rate,
              "milter_cpu_ms_per_message": 1000 * r.milter_cpu / max(r.messages, 1),
              "machine_cores_busy": r.machine_busy,
              "errors": r.errors, "verdicts": r.verdicts} for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
