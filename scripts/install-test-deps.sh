#!/usr/bin/env bash
# Installs what the test suite uses but pip cannot: Debian's prometheus (/usr/bin/prometheus, promtool).
# Idempotent and quick when present. Without root or apt-get it only says what to do and exits 0:
# the tests that need prometheus then skip with that reason.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "install-test-deps: installing Debian's prometheus (prometheus + promtool)"
  export DEBIAN_FRONTEND=noninteractive
  # Tests start their own Prometheus on loopback; the package's service is not needed.
  if apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    exit 0
  fi
  echo "install-test-deps: apt-get could not install prometheus; the Prometheus tests will be skipped" >&2
  exit 0
fi
echo "install-test-deps: prometheus/promtool not found; install them (Debian/Ubuntu:" \
  "sudo apt-get install prometheus) or the Prometheus tests will be skipped." >&2
exit 0
