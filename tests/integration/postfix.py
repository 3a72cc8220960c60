"""A private, throwaway Postfix for integration tests, and an SMTP client.

`PostfixInstance` runs the Debian-packaged Postfix from a temporary
config_directory with its own queue_directory and data_directory, so the
system's /etc/postfix and /var/spool/postfix are never read or written.
It listens on 127.0.0.1 and a free port, logs to a file of its own
(postlogd, maillog_file), does no DNS lookups, and delivers every accepted
message into one Maildir so tests can read the headers policyd prepended.

Its policyd settings are not written here: they are the text of
contrib/postfix/main.cf.tcp or main.cf.unix, and the smtpd line of
contrib/postfix/master.cf, with the test's port, so the documentation is
what gets tested.

`smtp_transaction` plays one SMTP client: one connection, XCLIENT to fake
the client's address and names (Postfix XCLIENT_README), EHLO again, then
the envelope and optionally a message.
"""
from __future__ import annotations

import email
import email.message
import email.policy
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.integration.process_session import session_members

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "postfix"

# The address and port policyd listens on by default, as the contrib files
# spell them; the harness swaps in its own.
CONTRIB_INET_POLICY = "inet:127.0.0.1:10023"
CONTRIB_UNIX_POLICY = "unix:private/policyd"
# And the milter's, as the optional milter lines of main.cf.<transport>
# spell it.
CONTRIB_MILTER = {"tcp": "inet:127.0.0.1:10025", "unix": "unix:private/policyd-milter"}

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin") or "/usr/sbin/postfix"

# Recipient domains the instance delivers (into the test Maildir).
MAILBOX_DOMAINS = ("own.example", "local.test")

# How long Postfix may take to start, stop or deliver before a test fails.
READY_TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def greets(host: str, port: int) -> bool:
    """Whether an SMTP server on host:port answers with its 220 greeting."""
    try:
        with socket.create_connection((host, port), timeout=1) as connection:
            return connection.recv(3) == b"220"
    except OSError:
        return False


def wait_until(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll `condition` until it returns something true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# The optional lines of the contrib main.cf files, commented out there.
_OPTIONAL_DATA_STAGE = re.compile(
    r"^#(smtpd_data_restrictions =$|\s+check_policy_service )", re.MULTILINE)


_OPTIONAL_MILTER = re.compile(r"^#((?:smtpd_milters|milter_\w+) =)", re.MULTILINE)


def contrib_main_cf(transport: str, data_stage: bool = False,
                    milter: str | None = None) -> str:
    """contrib/postfix/main.cf.<transport>, with the optional
    smtpd_data_restrictions uncommented if asked, and the optional milter
    lines if `milter` names the milter's socket (Postfix's notation)."""
    text = (CONTRIB / f"main.cf.{transport}").read_text(encoding="utf-8")
    if data_stage:
        text, count = _OPTIONAL_DATA_STAGE.subn(r"\1", text)
        if count != 2:
            raise AssertionError(f"main.cf.{transport}: no optional smtpd_data_restrictions")
    if milter:
        text, count = _OPTIONAL_MILTER.subn(r"\1", text)
        default = CONTRIB_MILTER[transport]
        if not count or f"smtpd_milters = {default}\n" not in text:
            raise AssertionError(f"main.cf.{transport}: no optional smtpd_milters "
                                 f"= {default}")
        text = text.replace(f"smtpd_milters = {default}\n", f"smtpd_milters = {milter}\n")
    return text


def with_policy_service(text: str, transport: str, policy_service: str) -> str:
    """A contrib snippet with policyd's default socket replaced by ours."""
    default = CONTRIB_INET_POLICY if transport == "tcp" else CONTRIB_UNIX_POLICY
    if default not in text:
        raise AssertionError(f"the main.cf snippet does not name {default}:\n{text}")
    return text.replace(default, policy_service)


def readme_blocks(info: str = "") -> list[str]:
    """The fenced code blocks of contrib/postfix/README.md whose info
    string is `info`, each without the indentation of its fence."""
    blocks, current, indent = [], None, ""
    for line in (CONTRIB / "README.md").read_text(encoding="utf-8").splitlines():
        stripped = line.lstrip(" ")
        if current is None:
            if stripped.startswith("```"):
                current, indent = [], line[:len(line) - len(stripped)]
                wanted = stripped[3:].strip() == info
        elif stripped == "```" and line.startswith(indent):
            if wanted:
                blocks.append("\n".join(current) + "\n")
            current = None
        else:
            current.append(line[len(indent):] if line.startswith(indent) else line)
    return blocks


def contrib_smtpd_service(listen: str, chroot: bool) -> str:
    """The smtp line of contrib/postfix/master.cf, on `listen`, chrooted or not."""
    text = (CONTRIB / "master.cf").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines()
             if line.split()[:2] == ["smtp", "inet"]]
    if len(lines) != 1:
        raise AssertionError("contrib/postfix/master.cf should have one smtp inet line")
    fields = lines[0].split()
    # master.cf(5) columns: service type private unpriv chroot wakeup maxproc command
    fields[0] = listen
    fields[4] = "y" if chroot else "n"
    return "  ".join(fields)


# Every service Postfix needs to accept and deliver mail, chrooted as the
# Debian master.cf has them.  No pickup (nothing is submitted locally), no
# smtp client (nothing leaves), no local(8) (no local users).
_MASTER_CF = """\
cleanup   unix  n       -       {chroot}       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       {chroot}       -       -       trivial-rewrite
bounce    unix  -       -       {chroot}       -       0       bounce
defer     unix  -       -       {chroot}       -       0       bounce
trace     unix  -       -       {chroot}       -       0       bounce
verify    unix  -       -       {chroot}       -       1       verify
flush     unix  n       -       {chroot}       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       {chroot}       -       -       showq
error     unix  -       -       {chroot}       -       -       error
retry     unix  -       -       {chroot}       -       -       error
discard   unix  -       -       {chroot}       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       {chroot}       -       1       anvil
scache    unix  -       -       {chroot}       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_MAIN_CF = """\
# Generated by tests/integration/postfix.py for one test run.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.local.test
mydomain = local.test
myorigin = $myhostname
mydestination =
relay_domains =
# Only the test client itself: the addresses XCLIENT fakes must not be
# here, or permit_mynetworks would skip policyd.
mynetworks = 127.0.0.0/8 [::1]/128
inet_interfaces = loopback-only
# XCLIENT ADDR=IPV6:... is refused unless IPv6 is enabled.
inet_protocols = all
smtpd_authorized_xclient_hosts = 127.0.0.0/8 [::1]/128
# Postfix must not use the machine's resolver: no client name lookups,
# no outbound mail, no DNSSEC probe.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
dnssec_probe =
default_transport = error:5.3.0 the test instance sends no mail out
relay_transport = error:5.3.0 the test instance sends no mail out
alias_maps =
alias_database =
biff = no
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:mailbox/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
maillog_file = {maillog}
maillog_file_prefixes = {base}
smtpd_banner = $myhostname ESMTP policyd test instance
"""


class PostfixInstance:
    """One Postfix master with everything it owns under `base`.

    `policy_service` is what main.cf's check_policy_service names:
    "inet:127.0.0.1:PORT", or "unix:private/policyd", which Postfix reads
    relative to the queue directory; `policy_socket_path` is then the file
    policyd must listen on.  `policy_main_cf` is the policyd part of
    main.cf, as the contrib files or the README write it (policyd's
    default socket in it is replaced); contrib/postfix/main.cf.<transport>
    by default.
    """

    def __init__(self, base: Path, transport: str, chroot: bool,
                 policy_service: str, policy_main_cf: str | None = None):
        if transport not in ("tcp", "unix"):
            raise ValueError(transport)
        self.base = base
        self.transport = transport
        self.chroot = chroot
        self.policy_service = policy_service
        self.policy_main_cf = (contrib_main_cf(transport) if policy_main_cf is None
                               else policy_main_cf)
        self.config_dir = base / "etc"
        self.queue_dir = base / "spool"
        self.data_dir = base / "data"
        self.mail_dir = base / "mail"
        self.maillog = base / "maillog"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.master_pid: int | None = None

    @property
    def policy_socket_path(self) -> Path | None:
        if self.policy_service.startswith("unix:"):
            path = self.policy_service[len("unix:"):]
            return Path(path) if path.startswith("/") else self.queue_dir / path
        return None

    @property
    def main_cf(self) -> str:
        owner = pwd.getpwnam("postfix")
        return (_MAIN_CF.format(
            queue=self.queue_dir, data=self.data_dir, mail=self.mail_dir,
            maillog=self.maillog, base=self.base, domains=" ".join(MAILBOX_DOMAINS),
            uid=owner.pw_uid, gid=owner.pw_gid)
            + "\n# policyd, from contrib/postfix\n"
            + with_policy_service(self.policy_main_cf, self.transport, self.policy_service))

    @property
    def master_cf(self) -> str:
        return (contrib_smtpd_service(f"{self.host}:{self.port}", self.chroot) + "\n"
                + _MASTER_CF.format(chroot="y" if self.chroot else "n"))

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=READY_TIMEOUT,
                              check=check)

    def prepare(self) -> None:
        """Write the configuration and let `postfix check` create the queue.

        Postfix processes drop to the postfix user; they must be able to
        walk into `base`, which pytest's 0700 tmp_path would not allow.
        """
        os.chmod(self.base, 0o755)
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(mode=0o755, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        self.mail_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.mail_dir, owner.pw_uid, owner.pw_gid)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        (self.config_dir / "main.cf").write_text(self.main_cf, encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self.master_cf, encoding="utf-8")
        # Creates private/, public/ and the queues with Postfix's owners,
        # and fails on a configuration Postfix would not start with.
        result = self.postfix("check", check=False)
        if result.returncode != 0 or "fatal" in result.stderr:
            # postfix(1) says nothing on stderr about a main.cf it cannot
            # parse; postconf(1) does.
            postconf = subprocess.run(
                [Path(POSTFIX).with_name("postconf"), "-c", str(self.config_dir), "-n"],
                capture_output=True, text=True, timeout=READY_TIMEOUT)
            raise RuntimeError(f"postfix check failed:\n{result.stderr}{postconf.stderr}"
                               f"{self.log()}")

    def start(self) -> None:
        result = self.postfix("start", check=False)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed:\n{result.stderr}\n{self.log()}")
        self.master_pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        try:
            wait_until(self._answers, READY_TIMEOUT, f"Postfix on {self.host}:{self.port}")
        except TimeoutError as error:
            raise RuntimeError(f"{error}\n--- maillog ---\n{self.log()}") from None

    def _answers(self) -> bool:
        return greets(self.host, self.port)

    def stop(self) -> None:
        """Stop the master and wait until every process of its session is gone.

        The master is a session leader (setsid); its children share its
        session id, which is how they are found after it exits.
        """
        if self.master_pid is None:
            return
        master_pid, self.master_pid = self.master_pid, None
        # `postfix stop` would poll with `sleep 1`; `abort` just signals
        # the master, which takes its children down, and we poll.
        self.postfix("abort", check=False)
        try:
            wait_until(lambda: not session_members(master_pid), READY_TIMEOUT,
                       f"Postfix session {master_pid} to exit")
        except TimeoutError:
            # What `postfix stop` does as a last resort.
            for pid in session_members(master_pid):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not session_members(master_pid), READY_TIMEOUT,
                       f"Postfix session {master_pid} to die")

    def log(self) -> str:
        try:
            return self.maillog.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def delivered(self, queue_id: str, count: int = 1,
                  timeout: float = READY_TIMEOUT) -> list[email.message.Message]:
        """The copies delivered for `queue_id`, once there are `count` of them.

        The virtual(8) agent writes one copy per recipient; Postfix names
        the queue id in its own Received: header ("id ABC123").
        """
        pattern = re.compile(rb"\bid " + re.escape(queue_id.encode()) + rb"\b")

        def copies():
            found = []
            for path in sorted((self.mail_dir / "mailbox" / "new").glob("*")):
                raw = path.read_bytes()
                head = raw.split(b"\n\n", 1)[0]
                if pattern.search(head):
                    found.append(email.message_from_bytes(raw, policy=email.policy.compat32))
            return found if len(found) >= count else None

        try:
            return wait_until(copies, timeout, f"{count} deliveries of {queue_id}")
        except TimeoutError as error:
            raise AssertionError(f"{error}\n--- maillog ---\n{self.log()}") from None


def postfix_instance(transport: str, chroot: bool, policy_service: str,
                     policy_main_cf: str | None = None):
    """Generator for a pytest fixture: a started instance, stopped afterwards.

    The directory is made here, not by tmp_path, because Postfix's
    unprivileged processes must traverse it.
    """
    base = Path(tempfile.mkdtemp(prefix="policyd-postfix-"))
    instance = PostfixInstance(base, transport, chroot, policy_service, policy_main_cf)
    try:
        instance.prepare()
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- the SMTP client -----------------------------------------------------

def xtext(value: str) -> str:
    """RFC 3461 §4 xtext, which XCLIENT values use."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)


class Transcript(list):
    """The replies of one transaction, as (code, text) pairs in order:
    XCLIENT, MAIL, one per RCPT, then DATA and the end of data if a
    message was sent.  The attributes name the same replies."""
    xclient: tuple[int, str]
    mail: tuple[int, str]
    rcpts: list[tuple[int, str]]
    data: tuple[int, str] | None = None
    end_of_data: tuple[int, str] | None = None

    @property
    def queue_id(self) -> str | None:
        if self.end_of_data and self.end_of_data[0] == 250:
            match = re.search(r"queued as (\w+)", self.end_of_data[1])
            return match.group(1) if match else None
        return None


def smtp_transaction(host: str, port: int, xclient: dict[str, str], mail_from: str,
                     rcpts: list[str], data: str | None = None,
                     timeout: float = 60.0, raw_mail_from: bool = False) -> Transcript:
    """One simulated client on its own connection.

    XCLIENT ADDR must carry IPV6: for IPv6 (`IPV6:2001:db8::25`).  Postfix
    re-checks XCLIENT authorisation against the new address, so everything
    goes in one command, and EHLO follows it (XCLIENT_README).  raw_mail_from
    sends MAIL FROM:<mail_from> exactly as given.  Replies
    are returned, not raised, so a test can assert a rejection.
    """
    transcript = Transcript()

    def record(reply):
        pair = (reply[0], reply[1].decode("utf-8", errors="replace"))
        transcript.append(pair)
        return pair

    with smtplib.SMTP(host, port, timeout=timeout) as client:
        client.ehlo("xclient.test")
        arguments = " ".join(f"{name}={xtext(value)}" for name, value in xclient.items())
        transcript.xclient = record(client.docmd("XCLIENT", arguments))
        if transcript.xclient[0] != 220:
            raise AssertionError(f"XCLIENT refused: {transcript.xclient}")
        client.ehlo(xclient.get("HELO", "xclient.test"))
        if raw_mail_from:
            # As written: smtplib.mail would re-quote an odd address.
            transcript.mail = record(client.docmd("MAIL", f"FROM:<{mail_from}>"))
        else:
            transcript.mail = record(client.mail(mail_from))
        transcript.rcpts = [record(client.rcpt(rcpt)) for rcpt in rcpts]
        if data is not None and any(code == 250 for code, _ in transcript.rcpts):
            transcript.data = record(client.docmd("DATA"))
            if transcript.data[0] == 354:
                # What smtplib.SMTP.data does, minus raising on a refusal:
                # CRLF line ends, dot-stuffing (RFC 5321 §4.5.2), "." alone.
                body = smtplib.quotedata(data)
                if not body.endswith("\r\n"):
                    body += "\r\n"
                client.send((body + ".\r\n").encode("utf-8"))
                transcript.end_of_data = record(client.getreply())
    return transcript
