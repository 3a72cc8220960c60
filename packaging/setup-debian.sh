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
    python3-aiosmtpd python3-cryptography python3-uvloop \
    unbound ldnsutils dnsutils postfix miltertest libmilter-dev lua5.3 \
    redis-server socat procps iproute2 gcc libc6-dev \
    postfix-policyd-spf-python pyspf-milter >/dev/null
