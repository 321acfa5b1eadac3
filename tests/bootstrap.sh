#!/usr/bin/env bash
# Install what the project needs on Debian 12, then build two virtualenvs:
#   .venv-debian  Debian's packaged libraries (python3-argh 0.26, cryptography 38, ...)
#   .venv-pypi    current PyPI releases (systemd-python built against libsystemd-dev),
#                 plus the test tools hypothesis, pytest, shtab and atheris (the fuzzer)
# The PostgreSQL tests (tests/pg.py) run a throwaway cluster with postgresql-15's own
# initdb and pg_ctl; they never use the system cluster that installing it creates.
# Usage: tests/bootstrap.sh [debian|pypi|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}

APT_PACKAGES=(
    python3 python3-venv python3-pip python3-dev python3-setuptools gcc pkg-config
    libsystemd-dev systemd
    python3-systemd python3-cryptography python3-argh python3-sdnotify python3-argon2
    python3-yaml python3-pytest python3-hypothesis
    python3-psycopg postgresql-15
)
if [ -r tests/extra-apt-packages ]; then
    mapfile -t extra < <(grep -v '^#' tests/extra-apt-packages)
    APT_PACKAGES+=("${extra[@]}")
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "bootstrap: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: missing Debian packages: ${missing[*]}" >&2
        echo "bootstrap: run as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

PY=/usr/bin/python3
if [ "$which" = debian ] || [ "$which" = all ]; then
    if [ ! -x .venv-debian/bin/ov ]; then
        $PY -m venv --system-site-packages .venv-debian
        .venv-debian/bin/pip install -q --no-deps --no-build-isolation -e .
    fi
fi
if [ "$which" = pypi ] || [ "$which" = all ]; then
    # (Re)install when the venv lacks ov, or a dependency (psycopg) or test tool added
    # since it was built.
    if [ ! -x .venv-pypi/bin/ov ] || ! .venv-pypi/bin/python -c \
            'import psycopg, atheris, hypothesis, pytest, shtab' 2>/dev/null; then
        [ -x .venv-pypi/bin/python ] || $PY -m venv .venv-pypi
        .venv-pypi/bin/pip install -q --upgrade pip
        .venv-pypi/bin/pip install -q -e '.[test,fuzz]'
    fi
fi
