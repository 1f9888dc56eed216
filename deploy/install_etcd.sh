#!/usr/bin/env bash
# Installs Debian's etcd-server (etcd 3.4) when etcd is not on PATH, so that the cluster's tests
# and `quotad cluster up` run on a fresh machine. Nothing to do when it is already there.
#
# The package's own service is not started: a policy-rc.d that forbids starting services is in
# place during the install (unless the machine already has one), so no system-wide etcd is left
# listening on ports 2379 and 2380. The tests and `quotad cluster up` start their own etcd on
# loopback ports of their choosing, with their own data directory.
#
# Exit codes: 0 etcd is on PATH; 2 cannot install here (not root, or no apt-get: the caller
# skips, with this script's message); 1 the install failed.
set -euo pipefail

STEP_TIMEOUT_S="${ETCD_INSTALL_STEP_TIMEOUT_S:-600}"
LOCK_TIMEOUT_S=120

if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "etcd is not on PATH and installing it needs root (apt-get install etcd-server)" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "etcd is not on PATH and there is no apt-get to install it with" >&2
    exit 2
fi

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# in place only while etcd-server is installed\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() {
    timeout --kill-after=30 "$STEP_TIMEOUT_S" \
        apt-get -o DPkg::Lock::Timeout="$LOCK_TIMEOUT_S" -o Dpkg::Use-Pty=0 "$@"
}
apt_get -q update >&2
apt_get -q install -y --no-install-recommends etcd-server >&2

if ! command -v etcd >/dev/null 2>&1; then
    echo "apt-get installed etcd-server but etcd is not on PATH" >&2
    exit 1
fi
etcd --version
