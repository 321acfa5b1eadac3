"""Fixtures of the system suite: one package build per session, one booted systemd
per module (torn down by a finalizer even when a test fails or is interrupted)."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from . import harness

# OV_BOOT_TEST_SOURCE: build the package from another tree (default: this one).
REPO = Path(os.environ.get("OV_BOOT_TEST_SOURCE") or Path(__file__).resolve().parents[2])
REPORT = {}   # facts the terminal summary prints (wall time, exposure score, ...)


def pytest_collection_modifyitems(config, items):
    """Skip the whole suite, once, with a reason the summary shows (pytest -rs)."""
    here = Path(__file__).parent
    ours = [item for item in items if Path(str(item.fspath)).parent == here]
    if not ours:
        return
    reason = harness.unavailable_reason()
    if reason:
        marker = pytest.mark.skip(reason=reason)
        for item in ours:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def deb(tmp_path_factory):
    """The .deb built from this tree (a copy of it) with dpkg-buildpackage."""
    if not (REPO / "debian" / "control").exists():
        pytest.skip("system suite: no debian/control in this tree yet; cannot build")
    if shutil.which("dpkg-buildpackage") is None:
        pytest.skip("system suite needs dpkg-buildpackage (dpkg-dev) to build the .deb")
    unmet = subprocess.run(["dpkg-checkbuilddeps"], cwd=REPO, capture_output=True,
                           text=True, check=False)
    if unmet.returncode != 0:
        pytest.fail(f"cannot build the .deb: {unmet.stderr.strip()} (list them in "
                    "tests/extra-apt-packages, which tests/bootstrap.sh installs)")
    started = time.monotonic()
    path = harness.build_deb(REPO, tmp_path_factory.mktemp("debbuild"))
    REPORT["build_seconds"] = time.monotonic() - started
    return path


@pytest.fixture(scope="module")
def system(request):
    """A booted systemd on a throw-away overlay of the host root."""
    box = harness.System()
    request.addfinalizer(box.teardown)   # registered before booting: always torn down
    try:
        box.boot()
    except harness.Unavailable as exc:
        pytest.skip(str(exc))
    REPORT["boot_seconds"] = box.boot_seconds
    return box


@pytest.fixture(scope="module", autouse=True)
def _wall_time(request):
    """Wall time of the system suite: package build (a session fixture set up
    before this one), boot, scenarios, teardown."""
    started = time.monotonic()
    yield
    REPORT["wall_seconds"] = (time.monotonic() - started + REPORT.get("build_seconds", 0))


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    terminalreporter.section("system suite")
    for key, value in REPORT.items():
        if isinstance(value, float):
            value = f"{value:.1f}"
        terminalreporter.write_line(f"{key}: {value}")
