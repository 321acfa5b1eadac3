"""The Debian package: built with dpkg-buildpackage from a copy of the tree (the
artifacts land beside the copy, never in the repository), then checked: contents,
dependencies, maintainer scripts, and lintian (no errors, no warnings).  Installing,
upgrading and removing it under a real systemd is tests/system/test_boot.py."""

import os
import re
import shutil
import subprocess
import time
import types

import pytest
from packaging_helpers import REPO, system_env, which

from ovagent import __version__

BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "rst2man")
ALLOWED_DEPENDS = {"python3-systemd", "python3-cryptography", "python3-argh",
                   "python3-sdnotify", "python3-argon2", "python3-yaml", "python3:any",
                   "init-system-helpers", "systemd", "systemd-standalone-sysusers",
                   "systemd-sysusers"}
IGNORE = shutil.ignore_patterns(".git", ".venv*", ".hypothesis", ".pytest_cache",
                                ".ruff_cache", "__pycache__", "*.egg-info", "build",
                                "dist", ".pybuild", "bench")


def _unavailable():
    if os.geteuid() != 0:
        return "the package build test runs as root (as CI does)"
    missing = [tool for tool in BUILD_TOOLS if which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (debhelper, dh-python, dpkg-dev, "
                "python3-docutils: tests/extra-apt-packages)")
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def _tree_state():
    """What an in-tree build would change: the top-level names of the repository
    (build/, .pybuild/, *.egg-info) and every file under debian/ with its size and
    mtime.  (Other files may legitimately change while the suite runs.)"""
    state = {"/": sorted(os.listdir(REPO))}
    for directory, _, files in os.walk(REPO / "debian"):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            state[os.path.join(directory, name)] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """.out (the artifacts' directory), .deb, .log, .state_before (of the repository)."""
    state_before = _tree_state()
    out = tmp_path_factory.mktemp("debbuild")
    tree = out / "src"
    shutil.copytree(REPO, tree, ignore=IGNORE, symlinks=True)
    deps = subprocess.run(["dpkg-checkbuilddeps"], cwd=tree, capture_output=True,
                          env=system_env(), timeout=60)
    if deps.returncode != 0:
        pytest.skip("build dependencies missing (tests/extra-apt-packages): "
                    + deps.stderr.decode(errors="replace").strip().splitlines()[-1])
    started = time.monotonic()
    result = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree,
                            capture_output=True, timeout=600,
                            env=system_env(HOME=str(out)))
    log = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, log[-6000:]
    print(f"dpkg-buildpackage took {time.monotonic() - started:.1f}s")
    deb = out / f"ov-agent_{__version__}_all.deb"
    assert deb.exists(), sorted(os.listdir(out))
    return types.SimpleNamespace(out=out, deb=deb, log=log, state_before=state_before)


def dpkg_deb(*args):
    return subprocess.run(["dpkg-deb", *args], capture_output=True, check=True,
                          timeout=60, env=system_env()).stdout.decode()


def test_build_leaves_the_repository_as_it_was(built):
    assert _tree_state() == built.state_before, "the package build touched the repository"
    assert not list(REPO.parent.glob("ov-agent_*"))


def test_contents(built):
    deb = built.deb
    listing = dpkg_deb("-c", str(deb))
    entries = {line.split()[-1].lstrip("."): line.split()[0]
               for line in listing.splitlines()}
    expected = [
        "/usr/bin/ov",
        "/lib/systemd/system/ov-agent.socket", "/lib/systemd/system/ov-agent.service",
        "/usr/lib/systemd/user/ov-agent.socket", "/usr/lib/systemd/user/ov-agent.service",
        "/usr/lib/sysusers.d/ov-agent.conf", "/usr/lib/tmpfiles.d/ov-agent.conf",
        "/usr/lib/systemd/catalog/ov-agent.catalog",
        "/usr/share/bash-completion/completions/ov",
        "/usr/share/man/man1/ov.1.gz", "/usr/share/man/man1/ov-run.1.gz",
        "/usr/share/man/man1/ov-auth.1.gz", "/usr/share/man/man1/ov-app.1.gz",
        "/usr/share/man/man1/ov-env.1.gz", "/usr/share/man/man1/ov-secret.1.gz",
        "/usr/share/man/man8/ov-agent.8.gz",
        "/usr/lib/python3/dist-packages/ovagent/agent.py",
        "/usr/lib/python3/dist-packages/ovagent/install.py",
        "/usr/share/doc/ov-agent/README.Debian",
    ]
    missing = [path for path in expected if path not in entries]
    assert not missing, (missing, listing)
    assert entries["/etc/ov/"] == "drwx------", "/etc/ov holds the key: root only"
    assert not [path for path in entries if path.startswith("/var/")], \
        "the vault directory is not the package's (it survives purge)"


def test_control_fields(built):
    deb = built.deb
    fields = {name: dpkg_deb("-f", str(deb), name).strip()
              for name in ("Package", "Version", "Architecture", "Depends")}
    assert fields["Package"] == "ov-agent"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == "all"
    names = {re.split(r"[\s(]", alternative.strip())[0]
             for dependency in fields["Depends"].split(",")
             for alternative in dependency.split("|")}
    assert names <= ALLOWED_DEPENDS, names - ALLOWED_DEPENDS
    assert {"python3-systemd", "python3-cryptography", "python3-argh", "python3-sdnotify",
            "python3-argon2", "python3-yaml"} <= names
    control = (REPO / "debian" / "control").read_text()
    assert re.search(r"^Rules-Requires-Root: no$", control, re.M)


def test_maintainer_scripts_start_only_the_socket(built, tmp_path):
    deb = built.deb
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True,
                   timeout=60)
    postinst = (tmp_path / "control" / "postinst").read_text()
    prerm = (tmp_path / "control" / "prerm").read_text()
    postrm = (tmp_path / "control" / "postrm").read_text()
    assert "systemd-sysusers" in postinst and "ov-agent.conf" in postinst
    assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles") < \
        postinst.index("deb-systemd-invoke")
    assert "deb-systemd-helper enable 'ov-agent.socket'" in postinst
    # Started on install: the socket only.  On upgrade: the socket keeps listening
    # (not stopped, not restarted: clients queue in its backlog) and a running agent
    # is try-restarted.  On removal: the socket is stopped (the service with it).
    invoked = re.findall(r"deb-systemd-invoke .*", postinst)
    assert invoked == ["deb-systemd-invoke start 'ov-agent.socket' >/dev/null || true",
                       "deb-systemd-invoke try-restart 'ov-agent.service' >/dev/null "
                       "|| true"], invoked
    assert re.findall(r"deb-systemd-invoke .*", prerm) == [
        "deb-systemd-invoke stop 'ov-agent.socket' >/dev/null || true"]
    assert not (tmp_path / "control" / "preinst").exists(), "nothing stops before unpacking"
    assert "deb-systemd-helper enable 'ov-agent.service'" not in postinst
    # dh_installsystemduser --no-enable: re-enable only where the package did before.
    assert "deb-systemd-helper --user debian-installed 'ov-agent.socket'" in postinst, \
        "user units must not be enabled for every user"
    assert not re.search(r"\brm\b[^\n]*(/var/lib/ov|/etc/ov)", postrm), \
        "purge keeps the vault and the key (README.Debian)"


@pytest.mark.skipif(which("lintian") is None, reason="lintian not installed "
                    "(tests/extra-apt-packages)")
def test_lintian_reports_no_errors_or_warnings(built):
    out = built.out
    changes = out / f"ov-agent_{__version__}_{_build_arch()}.changes"
    result = subprocess.run(["lintian", "--pedantic", "--display-info", str(changes)],
                            capture_output=True, timeout=300, env=system_env())
    output = result.stdout.decode(errors="replace")
    print(output or "lintian: clean")
    bad = [line for line in output.splitlines() if line.startswith(("E:", "W:"))]
    assert not bad, output
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")


def _build_arch():
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          check=True, timeout=60).stdout.decode().strip()
