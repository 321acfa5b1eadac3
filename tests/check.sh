#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every test against
# Debian 12's packaged libraries and against current PyPI releases.
# Extra arguments go to pytest (e.g. tests/check.sh -k agent -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/bootstrap.sh all
status=0
for venv in .venv-debian .venv-pypi; do
    echo "=== tests with $venv ($($venv/bin/python -c 'from importlib.metadata import version as v; print("argh", v("argh"), "cryptography", v("cryptography"))'))"
    # The system suite (tests/system: boots systemd, installs the .deb) tests the
    # package, not the venv's libraries: it runs once, in the first pass (unless
    # OV_SKIP_SYSTEM_SUITE=REASON is already set to skip it everywhere).
    if [ "$venv" = .venv-debian ]; then skip_system=${OV_SKIP_SYSTEM_SUITE:-}; else
        skip_system="system suite runs once, in the .venv-debian pass"; fi
    OV_SKIP_SYSTEM_SUITE="$skip_system" \
        $venv/bin/python -m pytest -p no:cacheprovider -rs "$@" || status=$?
done
exit $status
