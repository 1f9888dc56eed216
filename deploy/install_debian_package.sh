#!/usr/bin/env bash
# Installs a Debian package when the program it provides is not on PATH, without starting its
# service: what deploy/install_etcd.sh and bench/install_redis.sh do for etcd and Redis, so
# that their tests run on a fresh machine. Nothing to do when the program is already there.
#
#   deploy/install_debian_package.sh PACKAGE PROGRAM
#
# The package's own service is not started: a policy-rc.d that forbids starting services is in
# place during the install (unless the machine already has one), so no system-wide server is
# left listening on its default ports. The tests and the benches start their own servers on
# loopback ports of their choosing, and never rely on a system service either way.
# INSTALL_STEP_TIMEOUT_S bounds each apt-get step (default 600 s).
#
# Exit codes: 0 PROGRAM is on PATH; 2 cannot install here (not root, or no apt-get: the caller
# skips, with this script's message), or bad arguments; 1 the install failed.
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 PACKAGE PROGRAM" >&2
    exit 2
fi
package=$1
program=$2
STEP_TIMEOUT_S="${INSTALL_STEP_TIMEOUT_S:-600}"
LOCK_TIMEOUT_S=120

if command -v "$program" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "$program is not on PATH and installing it needs root (apt-get install $package)" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$program is not on PATH and there is no apt-get to install it with" >&2
    exit 2
fi

# One install at a time on this machine: the test suite's workers may each find the program
# missing at once, and the policy-rc.d below must stay in place until the last install ends.
exec 9>/tmp/quotad-install-debian-package.lock
if ! flock -w "$LOCK_TIMEOUT_S" 9; then
    echo "another install held the lock for over $LOCK_TIMEOUT_S s" >&2
    exit 1
fi
if command -v "$program" >/dev/null 2>&1; then
    exit 0
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# in place only while %s is installed\nexit 101\n' "$package" >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() {
    timeout --kill-after=30 "$STEP_TIMEOUT_S" \
        apt-get -o DPkg::Lock::Timeout="$LOCK_TIMEOUT_S" -o Dpkg::Use-Pty=0 "$@"
}
apt_get -q update >&2
apt_get -q install -y --no-install-recommends "$package" >&2

if ! command -v "$program" >/dev/null 2>&1; then
    echo "apt-get installed $package but $program is not on PATH" >&2
    exit 1
fi
"$program" --version
