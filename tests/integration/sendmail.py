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
the headers the milter changed.  It must not use the machine's resolver:
it runs in a private mount namespace (`unshare --mount`) where
/etc/nsswitch.conf says `hosts: files`, /etc/hosts is the test's (the
client names Sendmail finds for the milter's {client_resolve} macros), and
/etc/resolv.conf names an address where nothing listens, and
/etc/hosts.allow and hosts.deny (Sendmail is built with TCP wrappers) are
empty; its own service switch says `hosts files`, and its other files
(relay-domains, no help file) are the test's.  It listens on the test's
port only (no submission port) and logs nothing to syslog.  The real
files are never touched.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
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
# Nothing answers DNS here (a loopback address nobody uses).
NO_RESOLVER = "127.0.0.254"


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
                 local_domains: tuple[str, ...] = ("own.example",)):
        """hosts: address -> name, the only names Sendmail can find."""
        self.base = base
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
            # Only the test's daemon: no submission port (587) on every address.
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`nocanonify')dnl",
            f"DAEMON_OPTIONS(`Port={self.port}, Addr={self.host}, Name=MTA')dnl",
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
        (base / "resolv.conf").write_text(f"nameserver {NO_RESOLVER}\n")
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
        mounts = [f'mount --bind "{base}/{name}" /etc/{name}'
                  for name in ("hosts", "nsswitch.conf", "resolv.conf", "hosts.allow",
                               "hosts.deny")
                  if not name.startswith("hosts.") or Path("/etc", name).exists()]
        if Path("/run/nscd").is_dir():
            # A running nscd would answer host lookups from the real files
            # and resolver, past the nsswitch.conf above.
            mounts.append("mount -t tmpfs tmpfs /run/nscd")
        mounts = " && ".join(mounts)
        # unshare and sh exec, so the PID is sendmail's, and a session of
        # its own holds the children it forks per connection.
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'{mounts} && exec "$0" -bD -C "$1"', str(SENDMAIL),
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
        return greets(self.host, self.port)

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


ACCEPTED = re.compile(r"^2\.0\.0 (\S+) Message accepted for delivery")


def queue_id(reply: bytes) -> str:
    """The queue id in Sendmail's reply to the end of data."""
    match = ACCEPTED.match(reply.decode("ascii", "replace"))
    if match is None:
        raise AssertionError(f"not accepted: {reply!r}")
    return match.group(1)
