#!/usr/bin/env bash
# Installs what the shared-mode tests start (they start and stop the servers themselves, on loopback):
# PostgreSQL and haproxy from the distribution's packages. Needs root (CI runs as root); a no-op when both
# are already installed. moto (the S3 server) comes with pip install ".[cluster-test]".
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The tests run PostgreSQL as this user (it refuses to run as root); the package creates it.
id postgres >/dev/null
