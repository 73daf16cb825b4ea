#!/usr/bin/env bash
# The unit-file tests run `systemd-analyze verify`; install Debian's systemd if it is absent.
set -euo pipefail
command -v systemd-analyze >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
else
  echo "systemd-analyze missing: install the 'systemd' package (needed by tests/test_systemd.py)" >&2
  exit 1
fi
