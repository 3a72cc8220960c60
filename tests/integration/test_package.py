"""The Debian package, as an admin gets it: built from this checkout
(packaging/build-deb.sh), checked by lintian, installed with apt-get (its
Depends from Debian's archive), run as its systemd unit says, purged.

There is no systemd running here, so the service is started as the unit's
ExecStart says, as its User= and Group=, with no capabilities and no new
privileges (setpriv), its UMask and / as the working directory; the
rest of the unit's sandbox is systemd's to apply and is scored by
tests/unit/test_packaging.py.  The config is a copy of the installed
conffile resolving through the tests' unbound, never /etc/resolv.conf.

Postfix's side is played as Postfix plays it: the policy request comes
from a process chrooted into /var/spool/postfix as the user postfix,
connecting to private/policyd; miltertest, as the user postfix, connects
to private/policyd-milter.

The package is purged at the end, whatever happened: the other tests
run the checkout's policyd (from the repository, which is first on
sys.path) and must never meet an installed /etc/policyd/policyd.yaml.
Needs root.  POLICYD_TEST_INSTALLED=1 (autopkgtest, debian/tests/control)
tests the package already installed instead of building one.
"""
from __future__ import annotations

import grp
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
