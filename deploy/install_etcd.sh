#!/usr/bin/env bash
# Installs Debian's etcd-server (etcd 3.4) when etcd is not on PATH, so that the cluster's tests
# and `quotad cluster up` run on a fresh machine; its service is not started, so no system-wide
# etcd is left listening on ports 2379 and 2380 (see install_debian_package.sh).
# ETCD_INSTALL_STEP_TIMEOUT_S bounds each apt-get step (default 600 s).
#
# Exit codes: 0 etcd is on PATH; 2 cannot install here (not root, or no apt-get: the caller
# skips, with this script's message); 1 the install failed.
set -euo pipefail
INSTALL_STEP_TIMEOUT_S="${ETCD_INSTALL_STEP_TIMEOUT_S:-600}" \
    exec bash "$(dirname "$0")/install_debian_package.sh" etcd-server etcd
