"""``ov agent install``: the real ov, a fake root directory ($OV_INSTALL_ROOT) and
stub programs ($SYSTEMCTL, $SYSTEMD_SYSUSERS, $SYSTEMD_TMPFILES) that log their
arguments."""

import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
from packaging_helpers import UNITS, parse_unit, system_env, which

OV = str(Path(sys.executable).with_name("ov"))
MARKER = "# Written by 'ov agent install'"

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="system units are written only when run as root")


@pytest.fixture
def setup(ov, tmp_path):
    """.run('--machine-key', ...) runs 'ov agent install' with the fake .root and
    the stubs, which append their command lines to .log."""
    root = tmp_path / "root"
    log = tmp_path / "stub.log"
    stubs = {}
    for name in ("systemctl", "systemd-sysusers", "systemd-tmpfiles"):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
                        'exit "${STUB_STATUS:-0}"\n')
        stub.chmod(0o755)
        stubs[name] = str(stub)
    env = {"OV_INSTALL_ROOT": str(root), "SYSTEMCTL": stubs["systemctl"],
           "SYSTEMD_SYSUSERS": stubs["systemd-sysusers"],
           "SYSTEMD_TMPFILES": stubs["systemd-tmpfiles"]}

    def run(*args, **kwargs):
        extra = dict(env, **kwargs.pop("env", {}))
        return ov("agent", "install", *args, env=extra, **kwargs)

    return types.SimpleNamespace(run=run, root=root, log=log)


def logged(log):
    return log.read_text().splitlines() if log.exists() else []


def normalized(text):
    """Directives with this install's ov and key replaced by the package's, and
    without the descriptions (they name the unit)."""
    entries = []
    for section, key, value in parse_unit(text):
        if key == "Description":
            continue
        if key == "ExecStart":
            value = "/usr/bin/ov " + value.split(" ", 1)[1]
        entries.append((section, key, value))
    return entries


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "machine.kek"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


@needs_root
def test_system_units_match_the_packaged_ones(setup, key):
    run = setup.run
    root = setup.root
    log = setup.log
    result = run("--machine-key", str(key), check=0)
    system = root / "etc" / "systemd" / "system"
    socket = (system / "ov-agent.socket").read_text()
    service = (system / "ov-agent.service").read_text()
    for text in (socket, service):
        assert text.startswith(MARKER)
    assert normalized(socket) == normalized((UNITS / "ov-agent.socket").read_text())
    packaged = (UNITS / "ov-agent.service").read_text().replace(
        "LoadCredential=machine.kek:/etc/ov/machine.kek", f"LoadCredential=machine.kek:{key}")
    assert normalized(service) == normalized(packaged)
    assert f"ExecStart={OV} agent start --foreground" in service
    for kind in ("sysusers.d", "tmpfiles.d"):
        written = (root / "etc" / kind / "ov-agent.conf").read_text()
        assert written.startswith(MARKER)
        ours = [line for line in written.splitlines() if not line.startswith("#")]
        packaged = [line for line in (UNITS / kind / "ov-agent.conf").read_text().splitlines()
                    if line and not line.startswith("#")]
        assert ours == packaged
    for path in (system / "ov-agent.socket", system / "ov-agent.service"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # Without --enable nothing runs; the commands are printed.
    assert logged(log) == []
    assert "systemctl enable --now ov-agent.socket" in result.out
    assert "systemctl daemon-reload" in result.out
    assert "Note: services that use the agent need SupplementaryGroups=ov-agent" in result.out


@needs_root
def test_enable_runs_sysusers_tmpfiles_and_systemctl(setup, key):
    run = setup.run
    log = setup.log
    result = run("--machine-key", str(key), "--enable", check=0)
    assert logged(log) == ["systemd-sysusers ov-agent.conf",
                           "systemd-tmpfiles --create ov-agent.conf",
                           "systemctl daemon-reload",
                           "systemctl enable --now ov-agent.socket"]
    assert result.out.count("Ran: ") == 4


def test_user_units_match_the_packaged_ones(setup, key, home):
    run = setup.run
    root = setup.root
    log = setup.log
    run("--machine-key", str(key), "--user", "--enable", check=0)
    units = root / str(home / "config").lstrip("/") / "systemd" / "user"
    socket = (units / "ov-agent.socket").read_text()
    service = (units / "ov-agent.service").read_text()
    assert normalized(socket) == normalized((UNITS / "user" / "ov-agent.socket").read_text())
    packaged = (UNITS / "user" / "ov-agent.service").read_text().replace(
        "LoadCredential=machine.kek:%E/ov/machine.kek", f"LoadCredential=machine.kek:{key}")
    assert normalized(service) == normalized(packaged)
    assert not (root / "etc").exists()
    assert logged(log) == ["systemctl --user daemon-reload",
                           "systemctl --user enable --now ov-agent.socket"]


@needs_root
def test_other_name_and_socket(setup, key):
    run = setup.run
    root = setup.root
    result = run("--machine-key", str(key), "--unit-name", "ov-test", check=0)
    system = root / "etc" / "systemd" / "system"
    socket = parse_unit((system / "ov-test.socket").read_text())
    assert ("Socket", "ListenStream", "/run/ov-test/ov-test.sock") in socket
    service = parse_unit((system / "ov-test.service").read_text())
    assert ("Unit", "Requires", "ov-test.socket") in service
    assert "d /run/ov-test 0750 root ov-agent -" in \
        (root / "etc" / "tmpfiles.d" / "ov-test.conf").read_text()
    assert "--socket /run/ov-test/ov-test.sock" in result.out
    run("--machine-key", str(key), "--unit-name", "ov-x", "--socket", "/run/x/agent.sock",
        check=0)
    assert ("Socket", "ListenStream", "/run/x/agent.sock") in parse_unit(
        (system / "ov-x.socket").read_text())


@needs_root
@pytest.mark.parametrize("socket", ["/tmp/agent.sock", "/run/agent.sock", "relative.sock",
                                    "/run/a b/agent.sock"])
def test_unsafe_socket_paths_are_refused(setup, key, socket, expect_error):
    run = setup.run
    root = setup.root
    expect_error(run("--machine-key", str(key), "--socket", socket), 2)
    assert not root.exists()


@pytest.mark.parametrize("name", ["../evil", "ov-agent.service", "a b", "-x", "x@y"])
def test_invalid_unit_names_are_refused(setup, key, name, expect_error):
    run = setup.run
    root = setup.root
    expect_error(run("--machine-key", str(key), f"--unit-name={name}"), 2, "unit name")
    assert not root.exists()


def test_machine_key_is_required(setup):
    run = setup.run
    root = setup.root
    result = run()
    assert result.returncode == 2 and "--machine-key" in result.err, result.err
    assert not root.exists()


def test_a_key_with_loose_permissions_is_refused(setup, key, expect_error):
    run = setup.run
    root = setup.root
    key.chmod(0o644)
    expect_error(run("--machine-key", str(key), "--user"), 2, "0644")
    assert not root.exists()


def test_missing_key_is_allowed_with_a_note(setup, tmp_path):
    run = setup.run
    missing = tmp_path / "later.kek"
    result = run("--machine-key", str(missing), "--user", check=0)
    assert f"{missing} does not exist yet" in result.out
    assert "unconfigured" in result.out


def test_relative_key_path_and_percent_are_written_safely(setup, tmp_path):
    run = setup.run
    root = setup.root
    (tmp_path / "100%").mkdir()
    result = run("--machine-key", "100%/machine.kek", "--user", check=0,
                 cwd=tmp_path)
    service = next(root.rglob("ov-agent.service")).read_text()
    assert f"LoadCredential=machine.kek:{tmp_path}/100%%/machine.kek" in service, \
        (service, result.out)


def test_refuses_to_overwrite_a_unit_it_did_not_write(setup, key, home, expect_error):
    run = setup.run
    root = setup.root
    units = root / str(home / "config").lstrip("/") / "systemd" / "user"
    units.mkdir(parents=True)
    (units / "ov-agent.service").write_text("[Service]\nExecStart=/bin/true\n")
    expect_error(run("--machine-key", str(key), "--user"), 2, "refusing to overwrite",
                 "ov-agent.service")
    assert (units / "ov-agent.service").read_text() == "[Service]\nExecStart=/bin/true\n"
    assert not (units / "ov-agent.socket").exists(), "nothing is written when refusing"


def test_rewrites_its_own_units(setup, key, tmp_path):
    run = setup.run
    root = setup.root
    run("--machine-key", str(key), "--user", check=0)
    other = tmp_path / "other.kek"
    result = run("--machine-key", str(other), "--user", check=0)
    service = next(root.rglob("ov-agent.service")).read_text()
    assert f"LoadCredential=machine.kek:{other}" in service
    assert "restart ov-agent.socket ov-agent.service" in result.out


def test_a_failing_systemctl_is_reported(setup, key, expect_error):
    run = setup.run
    log = setup.log
    result = run("--machine-key", str(key), "--user", "--enable",
                 env={"STUB_STATUS": "1"})
    assert result.returncode == 1, (result.out, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ov: ") and \
        "daemon-reload' failed with status 1" in lines[0], result.err
    assert logged(log) == ["systemctl --user daemon-reload"]


@pytest.mark.skipif(which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("mode", ["system", "user"])
def test_written_units_verify_clean(setup, key, mode, tmp_path):
    if mode == "system" and os.geteuid() != 0:
        pytest.skip("system units are written only when run as root")
    run = setup.run
    root = setup.root
    run("--machine-key", str(key), *(["--user"] if mode == "user" else []), check=0)
    written = sorted(str(path) for path in root.rglob("ov-agent.s*"))
    assert len(written) == 2
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(["--user"] if mode == "user" else []),
         *written], capture_output=True, timeout=60,
        env=system_env(XDG_RUNTIME_DIR=str(runtime)))
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0 and output == "", output
