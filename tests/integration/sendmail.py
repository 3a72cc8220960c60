"""A private, throwaway Sendmail for the milter's integration tests.

Debian's sendmail packages conflict with postfix (each is the
mail-transport-agent), so packaging/setup-debian.sh unpacks them, without
installing them, under SENDMAIL_ROOT; `SendmailInstance` runs that
sendmail as a foreground daemon (`-bD`) on 127.0.0.1 and a free port, from
a sendmail.cf that m4 builds from Sendmail's own cf macros and a
sendmail.mc whose milter line is the one of contrib/sendmail/policyd.mc,
with the test's socket: the documentation is what gets tested.

It queues what it accepts (DeliveryMode=deferred: no delivery, no map
lookups at SMTP time) in a queue directory of its own, where the tests read
the headers the milter changed.  It must not use the machine's resolver,
and it asks no DNS question at all (nor /etc/resolv.conf's server): its service
switch says `hosts files` (Sendmail's own lookups: MX, names), and it runs
in a private mount namespace (`unshare --mount`) where
/etc/nsswitch.conf says `hosts: files` (the C library's lookups, the
client's reverse name among them) and /etc/hosts is the test's (the client
names Sendmail finds for the milter's {client_resolve} macros); a UDP
listener on the port resolv.conf would have named got no query in a whole
run.  /etc/hosts.allow and hosts.deny (Sendmail is built with TCP
wrappers) are empty there too, and its other files
(relay-domains, no help file) are the test's.  It listens on the test's
port only (no submission port) and logs nothing to syslog.  The real
files are never touched.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import smtplib
import subprocess
import threading
from pathlib import Path

from tests.integration.postfix import free_port, greets, wait_until
from tests.integration.process_session import session_members, signal_session

REPO = Path(__file__).resolve().parents[2]
CONTRIB_MC = REPO / "contrib" / "sendmail" / "policyd.mc"
SENDMAIL_ROOT = Path(os.environ.get("POLICYD_SENDMAIL_ROOT", "/opt/policyd-tests/sendmail"))
SENDMAIL = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
CF_DIR = SENDMAIL_ROOT / "usr/share/sendmail/cf"
READY_TIMEOUT = 20.0
# The milter socket as contrib/sendmail/policyd.mc spells it.
CONTRIB_SOCKET = "S=inet:10025@127.0.0.1"
CLONE_NEWNET = 0x40000000   # sched.h
_libc = ctypes.CDLL(None, use_errno=True)


def contrib_filter_line(socket_spec: str) -> str:
    """The INPUT_MAIL_FILTER line of contrib/sendmail/policyd.mc, with
    S= naming socket_spec (Sendmail's notation: inet:PORT@HOST or
    local:PATH)."""
    lines = [line for line in CONTRIB_MC.read_text().splitlines()
             if line.startswith("INPUT_MAIL_FILTER(")]
    if len(lines) != 1 or CONTRIB_SOCKET not in lines[0]:
        raise AssertionError(f"{CONTRIB_MC}: expected one INPUT_MAIL_FILTER with "
                             f"{CONTRIB_SOCKET}, found {lines}")
    return lines[0].replace(CONTRIB_SOCKET, f"S={socket_spec}")


class SendmailInstance:
    def __init__(self, base: Path, milter_socket: str, hosts: dict[str, str],
                 local_domains: tuple[str, ...] = ("own.example",),
                 ipv6_clients: tuple[str, ...] = ()):
        """hosts: address -> name, the only names Sendmail can find.

        ipv6_clients: Sendmail runs in a network namespace of its own whose
        loopback interface has these addresses too, listens on ::1 as well,
        and the clients (`transaction`) run in that namespace; the milter
        must then be on a UNIX socket, which a path names in every network
        namespace."""
        self.base = base
        self.ipv6_clients = ipv6_clients
        self.milter_socket = milter_socket
        self.hosts = hosts
        self.local_domains = local_domains
        self.host, self.port = "127.0.0.1", free_port()
        self.queue_dir = base / "queue"
        self.log_path = base / "sendmail.log"
        self.process: subprocess.Popen | None = None

    def mc(self) -> str:
        base = self.base
        return "\n".join([
            "divert(-1)",
            f"define(`_CF_DIR_', `{CF_DIR}/')",
            "divert(0)dnl",
            f"include(`{CF_DIR}/m4/cf.m4')dnl",
            "VERSIONID(`policyd integration test')dnl",
            "OSTYPE(`linux')dnl",
            # $j given: Sendmail need not qualify the machine's name.
            "define(`confDOMAIN_NAME', `mx.own.example')dnl",
            f"define(`QUEUE_DIR', `{base}/queue')dnl",
            f"define(`STATUS_FILE', `{base}/statistics')dnl",
            f"define(`confPID_FILE', `{base}/sendmail.pid')dnl",
            "define(`ALIAS_FILE', `')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{base}/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{base}/hosts')dnl",
            "define(`confDELIVERY_MODE', `deferred')dnl",
            # pytest's directories are under /tmp, world-writable but sticky.
            "define(`confDONT_BLAME_SENDMAIL', `GroupWritableDirPathSafe,TrustStickyBit')dnl",
            "define(`confDONT_PROBE_INTERFACES', `true')dnl",
            # Nothing of the machine's /etc/mail, and nothing to its syslog.
            f"define(`confCR_FILE', `{base}/relay-domains')dnl",
            f"define(`HELP_FILE', `{base}/helpfile')dnl",
            "define(`confLOG_LEVEL', `0')dnl",
            # No RFC 1413 ident query back to each client.
            "define(`confTO_IDENT', `0')dnl",
            # Only the test's daemon: no submission port (587) on every address.
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`nocanonify')dnl",
            f"DAEMON_OPTIONS(`Port={self.port}, Addr={self.host}, Name=MTA')dnl",
            *([f"DAEMON_OPTIONS(`Port={self.port}, Addr=::1, Name=MTA6, Family=inet6')dnl"]
              if self.ipv6_clients else []),
            contrib_filter_line(self.milter_socket),
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
            "LOCAL_CONFIG",
            *[f"Cw{domain}" for domain in self.local_domains],
            ""])

    def prepare(self) -> None:
        if not SENDMAIL.exists():
            raise AssertionError(f"{SENDMAIL} is missing: run packaging/setup-debian.sh, "
                                 "which unpacks Debian's sendmail there")
        base = self.base
        self.queue_dir.mkdir(mode=0o700)
        (base / "statistics").touch()
        (base / "service.switch").write_text("hosts files\naliases files\n")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n"
                                                 for address, name in self.hosts.items())
        (base / "hosts").write_text(hosts)
        (base / "nsswitch.conf").write_text("hosts: files\n")
        # Sendmail is built with TCP wrappers: the machine's rules must not
        # refuse the test's clients.
        (base / "hosts.allow").write_text("")
        (base / "hosts.deny").write_text("")
        (base / "relay-domains").write_text("")
        (base / "sendmail.mc").write_text(self.mc())
        built = subprocess.run(["m4", str(base / "sendmail.mc")], capture_output=True,
                               text=True, check=True)
        (base / "sendmail.cf").write_text(built.stdout)

    def start(self) -> None:
        base = self.base
        # hosts.allow and hosts.deny may be missing, which allows all; the
        # others must be there to be covered (a failed mount stops the start).
        steps = [f'mount --bind "{base}/{name}" /etc/{name}'
                  for name in ("hosts", "nsswitch.conf", "hosts.allow", "hosts.deny")
                  if not name.startswith("hosts.") or Path("/etc", name).exists()]
        if Path("/run/nscd").is_dir():
            # A running nscd would answer host lookups from the real files
            # and resolver, past the nsswitch.conf above.
            steps.append("mount -t tmpfs tmpfs /run/nscd")
        namespaces = ["--mount", "--propagation", "private"]
        if self.ipv6_clients:
            namespaces.append("--net")
            # RFC 3849 documentation addresses, here and nowhere else.
            steps = (["ip link set lo up"]
                     + [f"ip -6 addr add {address}/128 dev lo nodad"
                        for address in self.ipv6_clients] + steps)
        # unshare and sh exec, so the PID is sendmail's, and a session of
        # its own holds the children it forks per connection.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", *namespaces, "sh", "-c",
                 f'{" && ".join(steps)} && exec "$0" -bD -C "$1"', str(SENDMAIL),
                 str(base / "sendmail.cf")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            wait_until(self._answers, READY_TIMEOUT, f"Sendmail on {self.host}:{self.port}")
        except TimeoutError as error:
            self.stop()
            raise RuntimeError(f"{error}\n{self.log()}") from None
        except BaseException:
            self.stop()   # it exited: reaped, and nothing of its session left
            raise

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"sendmail exited {self.process.returncode}:\n{self.log()}")
        return self._here(greets, self.host, self.port)

    def _here(self, function, *args):
        """function(*args) where Sendmail's network is: in a thread that
        has joined its network namespace (setns(2) moves the calling thread
        only), or right here when it has none of its own."""
        if not self.ipv6_clients:
            return function(*args)
        outcome: list = []

        def run():
            try:
                with open(f"/proc/{self.process.pid}/ns/net", "rb") as namespace:
                    if _libc.setns(namespace.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                outcome.append((True, function(*args)))
            except BaseException as error:   # handed to the caller's thread
                outcome.append((False, error))
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        succeeded, value = outcome[0]
        if not succeeded:
            raise value
        return value

    def transaction(self, client: str, helo: str, sender: str,
                    raw: bytes | None = None) -> dict[str, tuple[int, bytes]]:
        """One SMTP session from `client` (an address to bind), to Sendmail
        on the same family; the replies by command, up to the first that
        refused."""
        host = "::1" if ":" in client else self.host
        return self._here(_transaction, host, self.port, client, helo, sender, raw)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        signal_session(process.pid, signal.SIGTERM)
        try:
            process.wait(READY_TIMEOUT)
            wait_until(lambda: not session_members(process.pid), READY_TIMEOUT,
                       f"Sendmail session {process.pid} to exit")
        except (subprocess.TimeoutExpired, TimeoutError):
            signal_session(process.pid, signal.SIGKILL)
            process.wait(READY_TIMEOUT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queued_headers(self, queue_id: str) -> list[tuple[str, str]]:
        """The header fields of a queued message, in order, as (name,
        value): the qf file's H lines (Sendmail's queue file format:
        "H??Name: value", continuation lines starting with white space).
        A field that names mailer flags ("H?P?Return-Path: ...") is a
        template Sendmail fills in at delivery, and is left out."""
        fields: list[list[str]] = []
        keep = False
        for line in (self.queue_dir / f"qf{queue_id}").read_text(errors="replace").splitlines():
            if line.startswith("H"):
                flags = re.match(r"H(\?([^?]*)\?)?", line)
                keep = not flags.group(2)
                if keep:
                    fields.append([line[flags.end():]])
            elif keep and line[:1] in (" ", "\t"):
                fields[-1].append(line)
            else:
                keep = False
        result = []
        for lines in fields:
            name, _, value = "\n".join(lines).partition(":")
            result.append((name, value.strip()))
        return result


def _transaction(host: str, port: int, client: str, helo: str, sender: str,
                 raw: bytes | None) -> dict[str, tuple[int, bytes]]:
    replies = {}
    with smtplib.SMTP(host, port, timeout=30, source_address=(client, 0)) as smtp:
        replies["ehlo"] = smtp.ehlo(helo)
        replies["mail"] = smtp.docmd("MAIL", f"FROM:<{sender}>")
        replies["rcpt"] = smtp.docmd("RCPT", "TO:<root@own.example>")
        if raw is not None and replies["rcpt"][0] == 250:
            replies["data"] = smtp.data(raw)
    return replies


ACCEPTED = re.compile(r"^2\.0\.0 (\S+) Message accepted for delivery")


def queue_id(reply: bytes) -> str:
    """The queue id in Sendmail's reply to the end of data."""
    match = ACCEPTED.match(reply.decode("ascii", "replace"))
    if match is None:
        raise AssertionError(f"not accepted: {reply!r}")
    return match.group(1)
