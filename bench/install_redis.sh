#!/usr/bin/env bash
# Installs Debian's redis-server when it is not on PATH, so that the Redis peer's tests and the
# bench's Redis peers run on a fresh machine; its service is not started, so no system-wide
# Redis is left listening on port 6379 (see deploy/install_debian_package.sh).
# REDIS_INSTALL_STEP_TIMEOUT_S bounds each apt-get step (default 600 s).
#
# Exit codes: 0 redis-server is on PATH; 2 cannot install here (not root, or no apt-get: the
# caller skips, with this script's message); 1 the install failed.
set -euo pipefail
INSTALL_STEP_TIMEOUT_S="${REDIS_INSTALL_STEP_TIMEOUT_S:-600}" \
    exec bash "$(dirname "$0")/../deploy/install_debian_package.sh" redis-server redis-server
