#!/usr/bin/env bash
# Installs Debian's redis-server when it is not on PATH, so that the Redis peer's tests and the
# bench's Redis peers run on a fresh machine. Nothing to do when it is already there.
#
# The package's own service is not started: a policy-rc.d that forbids starting services is in
# place during the install (unless the machine already has one), so no system-wide Redis is
# left listening on port 6379. The tests and the bench start their own redis-server on a free
# loopback port with their own settings, and never rely on a system service either way.
#
# Exit codes: 0 redis-server is on PATH; 2 cannot install here (not root, or no apt-get: the
# caller skips, with this script's message); 1 the install failed.
set -euo pipefail

STEP_TIMEOUT_S="${REDIS_INSTALL_STEP_TIMEOUT_S:-600}"
LOCK_TIMEOUT_S=120

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "redis-server is not on PATH and installing it needs root (apt-get install redis-server)" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is not on PATH and there is no apt-get to install it with" >&2
    exit 2
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# in place only while redis-server is installed\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() {
    timeout --kill-after=30 "$STEP_TIMEOUT_S" \
        apt-get -o DPkg::Lock::Timeout="$LOCK_TIMEOUT_S" -o Dpkg::Use-Pty=0 "$@"
}
apt_get -q update >&2
apt_get -q install -y --no-install-recommends redis-server >&2

if ! command -v redis-server >/dev/null 2>&1; then
    echo "apt-get installed redis-server but it is not on PATH" >&2
    exit 1
fi
redis-server --version
