#!/usr/bin/env bash
# Installs what the test suite uses but pip cannot: Debian's prometheus (/usr/bin/prometheus, promtool)
# apache2-utils (/usr/bin/ab, for the host-path benchmark's test), nghttp2-client (/usr/bin/h2load,
# the C open-loop generator of the reliability benchmark) and nginx-light (/usr/sbin/nginx, for
# tests/deploy/test_nginx_live.py).
# Idempotent and quick when present. Without root or apt-get it only says what to do and exits 0:
# the tests that need them then skip with that reason.
set -euo pipefail

missing=()
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  missing+=(prometheus)
fi
if ! command -v ab >/dev/null; then
  missing+=(apache2-utils)
fi
if ! command -v h2load >/dev/null; then
  missing+=(nghttp2-client)
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  missing+=(nginx-light)
fi
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "install-test-deps: installing Debian's ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Tests start their own Prometheus on loopback; the package's service is not needed.
  if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
    exit 0
  fi
  echo "install-test-deps: apt-get could not install ${missing[*]}; the tests that need them will be skipped" >&2
  exit 0
fi
echo "install-test-deps: ${missing[*]} not found; install them (Debian/Ubuntu:" \
  "sudo apt-get install ${missing[*]}) or the tests that need them will be skipped." >&2
exit 0
