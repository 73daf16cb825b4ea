#!/usr/bin/env bash
# The monitoring tests run `promtool` and a real `prometheus` server; install Debian's
# prometheus package (it ships both) if either is absent. On a host that runs systemd the
# package also enables its own prometheus.service on :9090; the tests start their own server.
set -euo pipefail
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
else
  echo "promtool/prometheus missing: install the 'prometheus' package (needed by tests/test_deploy_prometheus.py)" >&2
  exit 1
fi
