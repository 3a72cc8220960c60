"""The Debian package, as an admin gets it: built from this checkout
(packaging/build-deb.sh), checked by lintian, installed with apt-get (its
Depends from Debian's archive), run as its systemd unit says, purged.

CI's machine runs no systemd, so the service is started as the unit's
ExecStart says, as its User= and Group=, with no capabilities and no new
privileges (setpriv), its UMask and / as the working directory.  The
rest of the unit's sandbox is systemd's to apply: where systemd-nspawn
works, the last test boots this machine under systemd in a container
and runs the package there (below); tests/unit/test_packaging.py scores
the unit with systemd-analyze.  The config is a copy of the installed
conffile resolving through the tests' unbound, never /etc/resolv.conf.

Postfix's side is played as Postfix plays it: the policy request comes
from a process chrooted into /var/spool/postfix as the user postfix,
connecting to private/policyd; miltertest, as the user postfix, connects
to private/policyd-milter.  In the container (below) Debian's own
Postfix asks instead: smtpd chrooted as Debian's master.cf says, main.cf
from contrib/postfix/main.cf.unix, mail sent to it over SMTP.

The package is purged at the end, whatever happened: the other tests
run the checkout's policyd (from the repository, which is first on
sys.path) and must never meet an installed /etc/policyd/policyd.yaml.
Needs root.  POLICYD_TEST_INSTALLED=1 (autopkgtest, debian/tests/control)
tests the package already installed instead of building one.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import policyd
from policyd.config import EX_CONFIG

from tests.integration.dnsworld import free_port
from tests.integration.process_session import session_members, stop_process_session

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "miltertest"
INSTALLED = os.environ.get("POLICYD_TEST_INSTALLED") == "1"

PACKAGE = "policyd"
UNIT = Path("/lib/systemd/system/policyd.service")
CONFFILE = Path("/etc/policyd/policyd.yaml")
SPOOL = Path("/var/spool/postfix")
SOCKETS = SPOOL / "policyd"
POLICY_LINK = "private/policyd"          # what main.cf.unix names
MILTER_LINK = "private/policyd-milter"
# Environment as systemd gives a service (systemd.exec(5), "Environment
# variables in spawned processes"), less what only a manager can give.
SERVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}

START_TIMEOUT = 30.0
# The unit's TimeoutStopSec; the drain has nothing in flight here.
STOP_TIMEOUT = 45.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="installs a Debian package: needs root")


def run(command: list[str], timeout: float = 300, cwd: Path | str = "/",
        **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            cwd=cwd, **kwargs)
    assert result.returncode == 0, \
        f"{shlex.join(command)}: status {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def is_installed() -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", PACKAGE],
                            capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.startswith("ii")


def purge() -> None:
    run(["apt-get", "purge", "-y", "-q", PACKAGE], env=apt_env())


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path | None:
    """The package, built once per session into a directory apt's
    sandbox user can read."""
    if INSTALLED:
        yield None
        return
    # As root the suite proves the package (.ci/run): missing tools are a
    # failure, not a skip.
    missing = [tool for tool in ("dpkg-buildpackage", "dh", "lintian", "miltertest",
                                 "setpriv") if not shutil.which(tool)]
    assert not missing, f"{missing}: run packaging/setup-debian.sh"
    outdir = Path(tempfile.mkdtemp(prefix="policyd-deb-"))
    outdir.chmod(0o755)
    try:
        run([str(REPO / "packaging" / "build-deb.sh"), str(outdir)], timeout=600)
        [package] = outdir.glob("policyd_*_all.deb")
        yield package
    finally:
        shutil.rmtree(outdir)


@pytest.fixture(scope="module")
def installed(deb) -> list[Path]:
    """The package installed by apt-get, purged again at the end; the
    files it installed."""
    # This process runs the checkout, never what is installed.
    assert Path(policyd.__file__).resolve().is_relative_to(REPO)
    if not INSTALLED:
        if is_installed():
            pytest.skip("a policyd package is installed already; this test installs "
                        "and purges its own (apt-get purge policyd to run it)")
        run(["apt-get", "install", "-y", "-q", f"./{deb.name}"], env=apt_env(),
            timeout=600, cwd=deb.parent)
    try:
        files = [Path(line) for line in run(["dpkg-query", "-L", PACKAGE]).stdout.splitlines()
                 if line.startswith("/")]
        yield files
    finally:
        if is_installed():
            purge()


@pytest.fixture
def service_dir():
    """A directory the user policyd can read (pytest's tmp_path is root's
    alone): the config copy, the message, the miltertest script."""
    directory = Path(tempfile.mkdtemp(prefix="policyd-package-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            name, _, value = line.partition("=")
            settings.setdefault(name.strip(), []).append(value.strip())
    return settings


def test_lintian_has_no_errors_or_warnings(deb):
    if deb is None:
        pytest.skip("tests the package installed")
    result = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]


def test_installed_conffile_is_a_valid_config(installed):
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", PACKAGE]).stdout
    assert str(CONFFILE) in conffiles.split()
    result = run(["/usr/bin/policyd", "check-config", "-c", str(CONFFILE)], env=SERVICE_ENV)
    assert result.stdout == f"policyd: {CONFFILE}: ok\n"
    for page in ("man8/policyd.8.gz", "man5/policyd.yaml.5.gz"):
        assert Path("/usr/share/man") / page in installed


def test_installing_again_keeps_the_admin_s_edits(installed, deb):
    if deb is None:
        pytest.skip("tests the package installed")
    edited = CONFFILE.read_text().replace("test_mode: false", "test_mode: false  # admin")
    assert edited != CONFFILE.read_text()
    CONFFILE.write_text(edited)
    run(["apt-get", "install", "--reinstall", "-y", "-q", f"./{deb.name}"], env=apt_env(),
        timeout=600, cwd=deb.parent)
    assert CONFFILE.read_text() == edited


def test_user_and_socket_directory(installed):
    user = pwd.getpwnam("policyd")
    assert user.pw_uid < 1000 and user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    info = SOCKETS.stat()
    assert (info.st_uid, info.st_gid) == (user.pw_uid, grp.getgrnam("postfix").gr_gid)
    assert stat.S_IMODE(info.st_mode) == 0o2750
    assert os.readlink(SPOOL / POLICY_LINK) == "../policyd/policy.sock"
    assert os.readlink(SPOOL / MILTER_LINK) == "../policyd/milter.sock"
    # `postfix check` wants everything in private/ owned by postfix.
    for link in (POLICY_LINK, MILTER_LINK):
        assert (SPOOL / link).lstat().st_uid == pwd.getpwnam("postfix").pw_uid


def service_command(config: Path) -> list[str]:
    """ExecStart of the installed unit, with the copy of the conffile in
    place of the conffile; started as the unit's User= and Group=, with
    no capabilities and no new privileges, as its CapabilityBoundingSet=
    and NoNewPrivileges= say."""
    settings = unit_settings()
    [exec_start] = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[argv.index("-c") + 1] == str(CONFFILE)
    argv[argv.index("-c") + 1] = str(config)
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["NoNewPrivileges"] == ["yes"]
    [user], [group] = settings["User"], settings["Group"]
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--", *argv]


def wait_for(connectable, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert process.poll() is None, f"policyd exited with status {process.returncode}"
        try:
            connectable().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: nothing listens after {START_TIMEOUT} s")
            time.sleep(0.1)


def unix_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def ask_as_chrooted_smtpd(request: bytes) -> bytes:
    """What a chrooted smtpd does: chroot into the queue directory, become
    postfix, connect to private/policyd, send a request, read the reply."""
    postfix = pwd.getpwnam("postfix")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.chroot(SPOOL)
            os.chdir("/")
            os.setgroups([])
            os.setgid(postfix.pw_gid)
            os.setuid(postfix.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(20)
                sock.connect(POLICY_LINK)
                sock.sendall(request)
                reply = b""
                while not reply.endswith(b"\n\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            os.write(write_end, reply)
            status = 0
        except BaseException as error:
            os.write(write_end, f"error: {error!r}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        reply = stream.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, reply
    return reply


def policy_request(**attributes: str) -> bytes:
    attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                  "protocol_name": "ESMTP", "client_name": "unknown",
                  "reverse_client_name": "unknown", "recipient": "bob@own.example",
                  "instance": f"{time.monotonic_ns()}.check", **attributes}
    return "".join(f"{name}={value}\n" for name, value in attributes.items()).encode() + b"\n"


def miltertest(directory: Path, **variables: str) -> dict[str, str]:
    """One session through private/policyd-milter, miltertest as postfix."""
    script = directory / "session.lua"
    shutil.copy(SCRIPTS / "session.lua", script)
    script.chmod(0o644)
    command = ["miltertest", "-s", str(script), "-D",
               f"sock=unix:{SPOOL / MILTER_LINK}"]
    for name, value in variables.items():
        command += ["-D", f"{name}={value}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/",
                            user="postfix", group="postfix", extra_groups=[])
    assert result.returncode == 0, f"miltertest failed:\n{result.stdout}\n{result.stderr}"
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_the_service_as_its_unit_starts_it(installed, unbound, service_dir):
    # The conffile as shipped, but resolving through the tests' unbound,
    # and its TCP listener and the metrics on free ports.
    settings = yaml.safe_load(CONFFILE.read_text())
    policy_port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    settings["authserv_id"] = "mx.test.example"
    settings["dns"].update(nameservers=[unbound.address], port=unbound.port)
    settings["policy"]["listen"] = [spec if spec.startswith("unix:")
                                    else f"inet:127.0.0.1:{policy_port}"
                                    for spec in settings["policy"]["listen"]]
    settings["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    config = service_dir / "policyd.yaml"
    config.write_text(yaml.safe_dump(settings))
    config.chmod(0o644)
    log_path = service_dir / "policyd.log"
    [umask] = unit_settings()["UMask"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(service_command(config), cwd="/", env=SERVICE_ENV,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   umask=int(umask, 8), start_new_session=True)
    try:
        wait_for(lambda: unix_connect(SOCKETS / "policy.sock"), "policy socket", process)
        wait_for(lambda: unix_connect(SOCKETS / "milter.sock"), "milter socket", process)
        wait_for(lambda: socket.create_connection(("127.0.0.1", policy_port)), "TCP", process)
        policyd_uid = pwd.getpwnam("policyd").pw_uid
        for pid in session_members(process.pid):
            uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[:4]
            assert uids == [str(policyd_uid)] * 4, f"process {pid} runs as {uids}"
        for name in ("policy.sock", "milter.sock"):
            info = (SOCKETS / name).stat()
            assert info.st_gid == grp.getgrnam("postfix").gr_gid
            assert stat.S_IMODE(info.st_mode) == 0o660

        # The README's operability check, as a chrooted smtpd asks it.
        reply = ask_as_chrooted_smtpd(policy_request(
            client_address="192.0.2.50", helo_name="client.example",
            sender="alice@own.example"))
        assert reply.startswith(b"action=550 5.7.23 SPF fail: own.example does not "
                                b"designate this host"), reply

        message = service_dir / "message.eml"
        message.write_bytes(b"From: a@other.example\r\nTo: postmaster@own.example\r\n"
                            b"Subject: package test\r\n\r\nHello.\r\n")
        message.chmod(0o644)
        outcome = miltertest(service_dir, client_addr="198.51.100.10",
                             helo="helo.other.example", sender="a@other.example",
                             message=str(message))
        assert (outcome["rcpt"], outcome["eom"], outcome["inserted"]) == \
            ("continue", "accept", "true"), outcome
        assert "spf=pass" in outcome["ar"] and "mx.test.example;" in outcome["ar"]
        rejected = miltertest(service_dir, client_addr="192.0.2.50", helo="client.example",
                              sender="alice@own.example", message=str(message))
        assert rejected["rcpt"] == "replycode", rejected

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            metrics = response.read().decode()
        assert 'policyd_decisions_total{action="REJECT",rule="spf.mailfrom.fail"} 2.0' \
            in metrics

        # ExecReload as systemd runs it: the check first, then the signal.
        for line in unit_settings()["ExecReload"]:
            argv = [str(config) if arg == str(CONFFILE) else arg for arg in shlex.split(
                line.replace("$MAINPID", str(process.pid)))]
            run(argv, env=SERVICE_ENV)
        deadline = time.monotonic() + START_TIMEOUT
        while "reload" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ask_as_chrooted_smtpd(policy_request(
            client_address="192.0.2.50", helo_name="client.example",
            sender="alice@own.example")).startswith(b"action=550 5.7.23")

        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT) == 0, log_path.read_text()
        assert not session_members(process.pid)
        assert not list(SOCKETS.iterdir()), "the sockets are removed at the stop"
    finally:
        stop_process_session(process, STOP_TIMEOUT)
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text


def test_a_bad_config_stops_the_start_with_ex_config(installed, service_dir):
    config = service_dir / "bad.yaml"
    config.write_text(CONFFILE.read_text() + "dns_typo: 1\n")
    config.chmod(0o644)
    result = subprocess.run(service_command(config), cwd="/", env=SERVICE_ENV,
                            capture_output=True, text=True, timeout=START_TIMEOUT)
    assert result.returncode == EX_CONFIG
    assert "dns_typo: unknown key" in result.stderr
    assert [str(EX_CONFIG)] == unit_settings()["RestartPreventExitStatus"]


def test_purge_leaves_nothing_of_ours(installed):
    """Debian policy lets the system user stay (files it owned may
    remain); everything else goes."""
    purge()
    assert not is_installed()
    ours = [path for path in installed if not path.is_dir() or PACKAGE in path.parts
            or path.name.startswith(PACKAGE)]
    assert [path for path in ours if os.path.lexists(path)] == []
    for path in (CONFFILE.parent, SOCKETS, SPOOL / POLICY_LINK, SPOOL / MILTER_LINK,
                 Path("/usr/lib/python3/dist-packages/policyd"),
                 Path("/etc/systemd/system/multi-user.target.wants/policyd.service"),
                 Path("/var/lib/systemd/deb-systemd-helper-enabled/policyd.service.dsh-also")):
        assert not os.path.lexists(path), path
    pwd.getpwnam("policyd")   # stays, as Debian policy allows
    assert Path(policyd.__file__).resolve().is_relative_to(REPO)
    assert sys.modules["policyd"] is policyd


# --- under systemd ---------------------------------------------------------------
#
# The unit's sandbox (seccomp, MemoryDenyWriteExecute, PrivateUsers,
# ProtectSystem, ...) is applied by systemd alone.  Where systemd-nspawn
# can boot this machine with systemd as PID 1, in a container whose root
# is an overlay of ours (nothing it writes reaches this machine) and whose
# network is its own loopback, the package is installed there and run by
# systemd: DNS, DKIM through python3-cryptography, the chrooted socket
# path asked by Debian's chrooted Postfix, the metrics port, reload, a bad
# config and the stop, all under the sandbox.

# A resolver of the container's own (its loopback is not ours), with the
# records the checks below ask for.
DNS_READY = """
import sys
import dns.message
import dns.query
try:
    answer = dns.query.udp(dns.message.make_query("own.example.", "TXT"), "127.0.0.1",
                           timeout=0.5)
except Exception:
    sys.exit(1)
sys.exit(0 if answer.rcode() == 0 and answer.answer else 1)
"""
CONTAINER_DNS = """server:
  interface: 127.0.0.1
  do-ip6: no
  username: ""
  chroot: ""
  directory: "/opt/policyd-test"
  pidfile: ""
  use-syslog: no
  module-config: "iterator"
  local-zone: "example." static
  local-data: 'own.example. TXT "v=spf1 ip4:203.0.113.7 -all"'
  local-data: 'other.example. TXT "v=spf1 ip4:198.51.100.0/24 -all"'
  local-data: 'helo.other.example. TXT "v=spf1 ip4:198.51.100.0/24 -all"'
  local-data: 'client.example. TXT "v=spf1 -all"'
"""

# Run inside the container by its python3: the chrooted smtpd's request.
CHROOTED_ASK = """
import os, pwd, socket
postfix = pwd.getpwnam("postfix")
os.chroot("/var/spool/postfix"); os.chdir("/")
os.setgroups([]); os.setgid(postfix.pw_gid); os.setuid(postfix.pw_uid)
with socket.socket(socket.AF_UNIX) as sock:
    sock.settimeout(20)
    sock.connect("private/policyd")
    sock.sendall(b"request=smtpd_access_policy\\nprotocol_state=RCPT\\n"
                 b"client_address=192.0.2.50\\nhelo_name=client.example\\n"
                 b"sender=alice@own.example\\nrecipient=bob@own.example\\ninstance=1.1\\n\\n")
    print(sock.recv(4096).decode().strip())
"""

# The container's Postfix: Debian's master.cf (smtpd chrooted) and a
# main.cf of these lines plus contrib/postfix/main.cf.unix as written, as
# contrib/postfix/README.md tells a packaged install's admin.  Nothing
# leaves the container (its network is its own loopback) and Postfix
# makes no DNS lookup: no client name lookups, every delivery an error.
CONTAINER_MAIN_CF = """compatibility_level = 3.6
myhostname = mx.test.example
mydestination =
relay_domains = own.example
# The test client alone: the addresses XCLIENT gives must not be here, or
# permit_mynetworks would skip policyd.
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
dnssec_probe =
default_transport = error:5.3.0 the test instance sends no mail out
# smtpd refuses a recipient whose transport is error: own.example's mail,
# were any sent, would be discarded.
relay_transport = discard:the test instance delivers no mail
alias_maps =
alias_database =
biff = no
maillog_file = /var/log/postfix-test.log
"""

# Run inside the container: one SMTP transaction to its Postfix, the
# client's address given by XCLIENT (Postfix's XCLIENT_README); prints
# the reply codes and texts of MAIL and RCPT.
CONTAINER_SMTP = """
import json, smtplib, sys
address, helo, sender = sys.argv[1:4]
with smtplib.SMTP("127.0.0.1", 25, timeout=60) as client:
    client.ehlo("xclient.test")
    code, text = client.docmd("XCLIENT", f"ADDR={address} NAME=[UNAVAILABLE] HELO={helo}")
    assert code == 220, (code, text)
    client.ehlo(helo)
    replies = [client.mail(sender), client.rcpt("bob@own.example")]
print(json.dumps([[code, text.decode()] for code, text in replies]))
"""


class Container:
    """This machine booted by systemd-nspawn on an overlay of its root."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.root = directory / "root"
        self.process: subprocess.Popen | None = None
        self.leader = 0

    def start(self) -> None:
        for name in ("upper", "work", "root"):
            (self.directory / name).mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir=/,upperdir={self.directory / 'upper'},"
             f"workdir={self.directory / 'work'}", str(self.root)])
        self.log = open(self.directory / "nspawn.log", "w")
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(self.root), "--private-network", "-b",
             "-M", f"policyd-test-{os.getpid()}", "--register=no", "--keep-unit"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            start_new_session=True)
        # The container's PID 1 is nspawn's child once it has become
        # systemd; the bus answers when systemd has started it.
        deadline = time.monotonic() + 60
        state = ""
        while state not in ("running", "degraded"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"systemd-nspawn cannot boot this machine here ({state!r}): "
                            + (self.directory / "nspawn.log").read_text()[-500:])
            time.sleep(0.5)
            found = subprocess.run(["pgrep", "-P", str(self.process.pid)],
                                   capture_output=True, text=True).stdout.split()
            if not found or Path(f"/proc/{found[0]}/comm").read_text().strip() != "systemd":
                continue
            self.leader = int(found[0])
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=120).stdout.strip()

    def run(self, *command: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *command],
                                capture_output=True, text=True, timeout=timeout, cwd="/",
                                env=env or SERVICE_ENV)
        if check:
            assert result.returncode == 0, \
                f"{shlex.join(command)}: {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """A file in the container (its upper layer; /tmp is its own)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        target.chmod(mode)

    def wait_for_sockets(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        for name in ("policy.sock", "milter.sock"):
            while self.run("test", "-S", str(SOCKETS / name), check=False).returncode:
                assert time.monotonic() < deadline, self.run(
                    "journalctl", "-u", "policyd", "--no-pager").stdout
                time.sleep(0.2)

    def wait_for_dns(self) -> None:
        """The test unbound answers own.example's SPF record: systemd-run
        returns before it listens."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.run("/usr/bin/python3", "-c", DNS_READY, check=False).returncode:
            assert time.monotonic() < deadline, self.run(
                "journalctl", "-u", "policyd-test-dns", "--no-pager").stdout
            time.sleep(0.2)

    def show(self, *properties: str) -> dict[str, str]:
        output = self.run("systemctl", "show", "policyd",
                          *[f"--property={name}" for name in properties]).stdout
        return dict(line.split("=", 1) for line in output.splitlines())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            if self.leader:
                self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                stop_process_session(self.process, 30)
        self.log.close()
        subprocess.run(["umount", str(self.root)], capture_output=True)
        if os.path.ismount(self.root):
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


def postfix_answers_through_the_package_socket(container: Container) -> None:
    """Debian's Postfix, chrooted smtpd and main.cf from contrib/postfix,
    asks the packaged policyd over unix:private/policyd."""
    main_cf = CONTAINER_MAIN_CF + (REPO / "contrib/postfix/main.cf.unix").read_text()
    container.write("/etc/postfix/main.cf", main_cf)
    container.write("/opt/policyd-test/smtp.py", CONTAINER_SMTP)
    container.run("postfix", "check")
    container.run("systemctl", "restart", "postfix@-.service")
    deadline = time.monotonic() + START_TIMEOUT
    while container.run("/usr/bin/python3", "-c", "import socket; socket.create_connection("
                        "('127.0.0.1', 25), timeout=5).close()", check=False).returncode:
        assert time.monotonic() < deadline, container.run(
            "journalctl", "-u", "postfix@-", "--no-pager").stdout
        time.sleep(0.2)

    def transaction(address: str, helo: str) -> list[list]:
        return json.loads(container.run("/usr/bin/python3", "/opt/policyd-test/smtp.py",
                                        address, helo, "alice@own.example").stdout)

    # A spoofed own-domain sender from outside: policyd's 550 5.7.23.
    mail, rcpt = transaction("192.0.2.77", "spoof.test.example")
    assert mail[0] == 250, mail
    assert rcpt == [550, "5.7.23 <bob@own.example>: Recipient address rejected: SPF fail: "
                    "own.example does not designate this host as a permitted sender "
                    "(mailfrom)"], rcpt
    # The same sender from the NAT network: accepted.
    mail, rcpt = transaction("192.168.1.20", "nat.test.example")
    assert (mail[0], rcpt[0]) == (250, 250), (mail, rcpt)

    # policyd decided both, and the only policy service main.cf names is
    # unix:private/policyd, asked by an smtpd chrooted in the spool.
    journal = container.run("journalctl", "-u", "policyd", "--no-pager", "-o", "cat").stdout
    [spoof] = [line for line in journal.splitlines() if "client=192.0.2.77" in line]
    assert "action=REJECT" in spoof and "helo=spoof.test.example" in spoof, spoof
    [nat] = [line for line in journal.splitlines() if "client=192.168.1.20" in line]
    assert "action=ACCEPT" in nat and "nat=" in nat, nat
    restrictions = container.run("postconf", "-h", "smtpd_recipient_restrictions").stdout
    assert "check_policy_service { unix:private/policyd," in restrictions, restrictions
    assert "inet:" not in restrictions, restrictions
    smtpds = container.run("pgrep", "-x", "smtpd").stdout.split()
    assert smtpds
    for pid in smtpds:
        assert container.run("readlink", f"/proc/{pid}/root").stdout.strip() == str(SPOOL)
    maillog = (container.root / "var/log/postfix-test.log").read_text()
    assert "reject: RCPT from unknown[192.0.2.77]: 550 5.7.23" in maillog, maillog
    assert "warning" not in maillog.replace("warning: dnssec_probe", ""), maillog


def signed_message() -> tuple[bytes, str]:
    """A message DKIM-signed for other.example (selector sel), and the
    unbound local-data of its key."""
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    message = (b"From: a@other.example\r\nTo: postmaster@own.example\r\n"
               b"Subject: signed\r\n\r\nHello.\r\n")
    signature = dkim.sign(message, b"sel", b"other.example", private,
                          include_headers=[b"From", b"To", b"Subject"])
    record = f"v=DKIM1; k=rsa; p={public}"
    strings = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    return signature + message, f"  local-data: 'sel._domainkey.other.example. TXT {strings}'\n"


@pytest.mark.skipif(not shutil.which("systemd-nspawn"),
                    reason="needs systemd-nspawn (systemd-container)")
def test_the_service_under_systemd_in_a_container(deb):
    if deb is None:
        pytest.skip("builds its container from this machine and the package built")
    assert not is_installed()
    container = Container(Path(tempfile.mkdtemp(prefix="policyd-nspawn-")))
    try:
        container.start()
        message, key_record = signed_message()
        container.write("/opt/policyd-test/unbound.conf", CONTAINER_DNS + key_record)
        # The container boots this machine's enabled units: its DNS servers
        # would hold port 53 before the test's unbound (nsd did, where
        # setup-debian.sh could not disable it: no systemd running there).
        container.run("systemctl", "stop", "unbound", "nsd", check=False)
        container.run("systemd-run", "--unit=policyd-test-dns", "/usr/sbin/unbound", "-d",
                      "-c", "/opt/policyd-test/unbound.conf")
        container.wait_for_dns()
        container.write(f"/root/{deb.name}", deb.read_bytes())
        container.run("apt-get", "install", "-y", "-q", f"/root/{deb.name}",
                      env={**SERVICE_ENV, "DEBIAN_FRONTEND": "noninteractive"}, timeout=300)
        settings = yaml.safe_load((container.root / "etc/policyd/policyd.yaml").read_text())
        settings["authserv_id"] = "mx.test.example"
        settings["dns"]["nameservers"] = ["127.0.0.1"]
        settings["metrics"]["listen"] = "127.0.0.1:9464"
        # Own-domain mail from a NAT network, sent out as 203.0.113.7
        # (which own.example's SPF record names).
        settings["nat"] = {"own_domains": ["own.example"], "networks": ["192.168.1.0/24"],
                           "public_addresses": ["203.0.113.7"]}
        container.write(str(CONFFILE), yaml.safe_dump(settings))
        container.run("systemctl", "restart", "policyd")
        container.wait_for_sockets()

        main_pid = container.show("MainPID")["MainPID"]
        status = dict(line.split(":", 1) for line in container.run(
            "cat", f"/proc/{main_pid}/status").stdout.splitlines())
        assert status["CapEff"].strip() == status["CapBnd"].strip() == "0" * 16
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2"
        uid = container.run("id", "-u", "policyd").stdout.strip()
        assert status["Uid"].split() == [uid] * 4

        ask = container.run("/usr/bin/python3", "-c", CHROOTED_ASK).stdout
        assert ask.startswith("action=550 5.7.23 SPF fail: own.example"), ask
        postfix_answers_through_the_package_socket(container)
        container.write("/opt/policyd-test/session.lua", (SCRIPTS / "session.lua").read_bytes())
        container.write("/opt/policyd-test/signed.eml", message)
        outcome = dict(line.split("=", 1) for line in container.run(
            "setpriv", "--reuid=postfix", "--regid=postfix", "--clear-groups",
            "miltertest", "-s", "/opt/policyd-test/session.lua",
            "-D", f"sock=unix:{SPOOL / MILTER_LINK}", "-D", "client_addr=198.51.100.10",
            "-D", "helo=helo.other.example", "-D", "sender=a@other.example",
            "-D", "message=/opt/policyd-test/signed.eml").stdout.splitlines() if "=" in line)
        assert outcome["eom"] == "accept", outcome
        assert "dkim=pass" in outcome["ar"] and "spf=pass" in outcome["ar"], outcome
        metrics = container.run("/usr/bin/python3", "-c",
                                "import urllib.request; print(urllib.request.urlopen("
                                "'http://127.0.0.1:9464/metrics', timeout=10).read().decode())")
        assert 'policyd_dkim_results_total{result="pass"} 1.0' in metrics.stdout

        # A bad file: the reload is refused and the service goes on; a
        # start with it ends with 78 and no restart is scheduled.
        good = (container.root / "etc/policyd/policyd.yaml").read_text()
        container.write(str(CONFFILE), good + "dns_typo: 1\n")
        assert container.run("systemctl", "reload", "policyd", check=False).returncode != 0
        assert container.show("ActiveState", "MainPID") == {"ActiveState": "active",
                                                            "MainPID": main_pid}
        assert container.run("/usr/bin/python3", "-c", CHROOTED_ASK).stdout.startswith(
            "action=550 5.7.23")
        container.run("systemctl", "restart", "policyd", check=False)
        deadline = time.monotonic() + START_TIMEOUT
        while container.show("ActiveState")["ActiveState"] not in ("failed", "inactive"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert container.show("ExecMainStatus", "ActiveState") == \
            {"ExecMainStatus": str(EX_CONFIG), "ActiveState": "failed"}

        container.write(str(CONFFILE), good)
        container.run("systemctl", "reset-failed", "policyd")
        container.run("systemctl", "start", "policyd")
        # Type=exec: started is not yet listening (Type=notify will wait).
        container.wait_for_sockets()
        container.run("systemctl", "stop", "policyd", timeout=STOP_TIMEOUT + 15)
        assert container.show("Result", "ExecMainStatus") == \
            {"Result": "success", "ExecMainStatus": "0"}

        container.run("apt-get", "purge", "-y", "-q", "policyd",
                      env={**SERVICE_ENV, "DEBIAN_FRONTEND": "noninteractive"})
        for path in (CONFFILE.parent, SOCKETS, SPOOL / POLICY_LINK, SPOOL / MILTER_LINK):
            assert container.run("test", "-e", str(path), check=False).returncode != 0, path
    finally:
        container.stop()
        if not os.path.ismount(container.root):
            shutil.rmtree(container.directory)
