#!/usr/bin/env bash
# Installs what policyd and its test suite need on Debian 12, from Debian's
# archive only: the Python libraries as Debian packages (the versions the
# Debian package of policyd depends on), and the real servers the tests use.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    # apt-get needs root; a fresh Debian 12 has sudo only if it was set up so.
    exec sudo -- "$0" "$@"
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix is installed for its binaries; the tests run private instances.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
if [ "${POLICYD_SKIP_APT_UPDATE:-}" != 1 ]; then
    apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-pip \
    python3-milter python3-spf python3-dkim python3-dnspython python3-yaml \
    python3-authres python3-prometheus-client python3-redis python3-pytest \
    python3-aiosmtpd python3-cryptography python3-uvloop python3-hypothesis mypy \
    unbound ldnsutils dnsutils nsd postfix miltertest libmilter-dev lua5.3 \
    redis-server socat procps iproute2 gcc libc6-dev \
    postfix-policyd-spf-python pyspf-milter opendkim opendkim-tools \
    m4 libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0 >/dev/null

# The tests start their own nsd, opendkim and redis-server on loopback; the
# system's own, which the packages enable (and start, where systemd runs and
# no policy-rc.d forbids it), would hold ports the tests use (nsd: 53), here
# or in the container test_package.py boots from this machine's root.
# Disabled without systemd running too (systemctl edits the links offline).
if [ -d /run/systemd/system ]; then
    systemctl disable --now nsd opendkim >/dev/null 2>&1 || true
else
    systemctl disable nsd opendkim >/dev/null 2>&1 || true
fi

# The Debian package (packaging/build-deb.sh, tests/integration/test_package.py):
# its Build-Depends (packaging/debian/control), lintian, and systemd for
# `systemd-analyze security --offline=yes` on its unit (no running systemd needed),
# and systemd-nspawn, to run the package under systemd in a container.
apt-get install -y -qq --no-install-recommends \
    dpkg-dev debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
    python3-cryptography python3-dnspython python3-redis python3-spf \
    python3-yaml lintian fakeroot systemd systemd-container util-linux >/dev/null

# Sendmail, for the milter's integration test (tests/integration/sendmail.py).
# Debian's sendmail packages conflict with postfix (each is the
# mail-transport-agent), so they are unpacked, not installed, into a
# directory of the tests' own; the libraries and m4 it needs are above.
SENDMAIL_ROOT=/opt/policyd-tests/sendmail
# The archive's version now: unpacked again when it changes (a security
# update), and into a new directory first, so an interrupted run leaves
# either the old tree or none, never half of one.
sendmail_version=$(apt-cache policy sendmail-bin | awk '/Candidate:/ { print $2 }')
if [ "$(cat "$SENDMAIL_ROOT/VERSION" 2>/dev/null)" != "$sendmail_version" ]; then
    download=$(mktemp -d)
    chown _apt "$download" 2>/dev/null || true   # apt's download sandbox
    (cd "$download" && apt-get download -qq sendmail-bin sendmail-base sendmail-cf)
    rm -rf "$SENDMAIL_ROOT.new"
    mkdir -p "$SENDMAIL_ROOT.new"
    for package in "$download"/*.deb; do
        dpkg-deb -x "$package" "$SENDMAIL_ROOT.new"
    done
    echo "$sendmail_version" > "$SENDMAIL_ROOT.new/VERSION"
    rm -rf "$download" "$SENDMAIL_ROOT"
    mv "$SENDMAIL_ROOT.new" "$SENDMAIL_ROOT"
fi
