#!/usr/bin/env bash
# benchmarks/knowledge.py trains on real text nobody here wrote: the Debian Policy Manual
# from Debian's debian-policy package (/usr/share/doc/debian-policy/policy.txt.gz).
# Install it if absent.
set -euo pipefail
[ -f /usr/share/doc/debian-policy/policy.txt.gz ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debian-policy >/dev/null
else
  echo "debian-policy missing: install the 'debian-policy' package (needed by benchmarks/knowledge.py)" >&2
  exit 1
fi
