"""The systemd units, sysusers/tmpfiles entries and journal catalog in units/:
systemd-analyze verify, the exposure score against the unit's claim, the catalog
compiled by journalctl, and the settings the code depends on."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging_helpers import (
    EXPOSURE_RE,
    UNITS,
    build_man_pages,
    directive,
    exposure_claim,
    parse_unit,
    system_env,
    which,
)

from ovagent.agent import systemd
from ovagent.core import audit
from ovagent.core import keyfile, paths

OV = str(Path(sys.executable).with_name("ov"))
SYSTEM = {name: UNITS / name for name in ("ov-agent.socket", "ov-agent.service")}
SYNC = {name: UNITS / name for name in ("ov-sync.service", "ov-sync.timer")}
USER = {name: UNITS / "user" / name for name in ("ov-agent.socket", "ov-agent.service")}

needs_analyze = pytest.mark.skipif(which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (package systemd)")


def units(files):
    return {name: parse_unit(path.read_text()) for name, path in files.items()}


@pytest.fixture(scope="module")
def manpath(tmp_path_factory):
    """Built man pages, so that verify can check Documentation=man:... links."""
    dest = tmp_path_factory.mktemp("man")
    return dest if build_man_pages(dest) is not None else None


def verify(files, tmp_path, manpath, user=False):
    """systemd-analyze verify on copies of *files* whose ExecStart runs this venv's
    ov instead of /usr/bin/ov (which only the package installs); returns output."""
    for name, path in files.items():
        copy = re.sub(r"^ExecStart=/usr/bin/ov ", f"ExecStart={OV} ", path.read_text(),
                      flags=re.M)
        (tmp_path / name).write_text(copy)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    args = ["systemd-analyze", "verify", *(["--user"] if user else []),
            *([] if manpath else ["--man=no"]), *(str(tmp_path / name) for name in files)]
    result = subprocess.run(args, capture_output=True, timeout=60, env=system_env(
        MANPATH=str(manpath or ""), XDG_RUNTIME_DIR=str(runtime)))
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    return output


@needs_analyze
def test_system_units_verify_clean(tmp_path, manpath):
    assert verify(SYSTEM, tmp_path, manpath) == ""


@needs_analyze
def test_user_units_verify_clean(tmp_path, manpath):
    assert verify(USER, tmp_path, manpath, user=True) == ""


@needs_analyze
def test_sync_units_verify_clean(tmp_path, manpath):
    assert verify(SYNC, tmp_path, manpath) == ""


@needs_analyze
@pytest.mark.parametrize("path", [SYSTEM["ov-agent.service"], SYNC["ov-sync.service"]],
                         ids=["ov-agent", "ov-sync"])
def test_exposure_score_within_the_claim_in_the_unit(path):
    text = path.read_text()
    claim = exposure_claim(text)
    assert claim is not None, f"{path.name} has no comment claiming its exposure"
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                             str(path)], capture_output=True, timeout=60, env=system_env())
    output = result.stdout.decode(errors="replace")
    match = EXPOSURE_RE.search(output)
    assert match, output + result.stderr.decode(errors="replace")
    score = float(match.group(1))
    print(f"systemd-analyze security --offline=true: exposure {score} (claimed {claim})")
    assert score <= claim, f"exposure {score} is above the {claim} the unit claims:\n{output}"
    # Every point still counted must be explained in the unit's comment.
    counted = re.findall(r"^✗ (\S+)", output, re.M)
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for item in counted:
        key = item.split("=", 1)[0].split("/", 1)[0]
        assert key in comments, f"{item} costs exposure but is not explained"


@pytest.mark.skipif(which("journalctl") is None, reason="journalctl not installed")
def test_catalog_compiles_and_covers_every_message_id(tmp_path):
    catalog = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog.mkdir(parents=True)
    (catalog / "ov-agent.catalog").write_bytes((UNITS / "ov-agent.catalog").read_bytes())
    (tmp_path / "var" / "lib" / "systemd" / "catalog").mkdir(parents=True)
    result = subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"],
                            capture_output=True, timeout=60, env=system_env())
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"],
                            capture_output=True, timeout=60, env=system_env(), check=True)
    entries = dict(line.split(" ", 1) for line in listed.stdout.decode().splitlines())
    assert set(entries) == set(audit.MESSAGE_IDS.values()), entries
    for kind, message_id in audit.MESSAGE_IDS.items():
        assert entries[message_id].startswith("ov-agent: "), (kind, entries[message_id])


def test_catalog_substitutes_only_fields_the_agent_sends():
    text = (UNITS / "ov-agent.catalog").read_text()
    sent = {"MESSAGE", "MODE", "SCOPE", "SOCKET", "HARDENING", "REQUEST_ID", "OP", "APP",
            "ENV", "COMMAND", "SECRETS", "VERSIONS", "PEER_PID", "PEER_UID", "PEER_GID",
            "PEER_UNIT", "CODE", "REASON", "CHILD_PID", "EXIT_STATUS", "OUTCOME", "RUNNING",
            "POLICY", "POLICY_RULE", "POLICY_DIR", "POLICY_FILES", "ERROR", "STORE",
            "FROM_SEQ", "TO_SEQ", "CHANGED", "ACTION", "UNITS"}
    used = set(re.findall(r"@([A-Z0-9_]+)@", text))
    assert used <= sent, used - sent


def test_socket_matches_what_the_code_expects():
    system, user = units(SYSTEM)["ov-agent.socket"], units(USER)["ov-agent.socket"]
    assert directive(system, "ListenStream") == [paths.SYSTEM_SOCKET]
    assert directive(user, "ListenStream") == ["%t/ov-agent/ov-agent.sock"]
    assert paths.user_socket().endswith("/ov-agent/ov-agent.sock") \
        if paths.user_socket() else True
    for socket in (system, user):
        assert directive(socket, "Accept") == ["no"]
        assert directive(socket, "FileDescriptorName") == [systemd.FD_NAME]
        assert directive(socket, "RemoveOnStop") == ["yes"]
        assert directive(socket, "TriggerLimitBurst") and \
            directive(socket, "TriggerLimitIntervalSec")
        assert directive(socket, "WantedBy") == ["sockets.target"]
    assert directive(system, "SocketMode") == ["0660"]
    assert directive(system, "DirectoryMode") == ["0750"]
    assert directive(user, "SocketMode") == ["0600"]
    assert directive(user, "DirectoryMode") == ["0700"]


def test_group_and_socket_directory_come_from_sysusers_and_tmpfiles():
    system = units(SYSTEM)["ov-agent.socket"]
    [group] = directive(system, "SocketGroup")
    sysusers = (UNITS / "sysusers.d" / "ov-agent.conf").read_text()
    assert re.search(rf"^g {re.escape(group)} - -$", sysusers, re.M), sysusers
    tmpfiles = (UNITS / "tmpfiles.d" / "ov-agent.conf").read_text()
    directory = paths.SYSTEM_SOCKET.rsplit("/", 1)[0]
    assert re.search(rf"^d {re.escape(directory)} 0750 root {group} -$", tmpfiles, re.M)


@pytest.mark.parametrize("files, kill_mode", [(SYSTEM, []), (USER, ["process"])],
                         ids=["system", "user"])
def test_service_starts_without_a_key_and_keeps_commands_on_restart(files, kill_mode):
    """The user agent may spawn commands (--spawn from the user's world): a restart
    must not kill them.  The system agent spawns nothing (no caller shares its
    sandbox), so stopping it may stop everything in its cgroup."""
    service = units(files)["ov-agent.service"]
    [exec_start] = directive(service, "ExecStart")
    assert exec_start.startswith("/usr/bin/ov agent start --foreground")
    assert directive(service, "Type") == ["notify"]
    [load] = directive(service, "LoadCredential")
    assert load.startswith(f"{keyfile.CREDENTIAL_NAME}:")
    # The key-less fallback: systemd uses it only when the key file cannot be read,
    # and ov reads it as "no key" (unconfigured mode instead of a failed start).
    assert directive(service, "SetCredential") == [
        f"{keyfile.CREDENTIAL_NAME}:{keyfile.NO_KEY_PLACEHOLDER.decode()}"]
    assert directive(service, "KillMode") == kill_mode
    assert directive(service, "Restart") == ["on-failure"]
    assert directive(service, "WatchdogSec")
    assert directive(service, "Requires") == ["ov-agent.socket"]
    assert any(doc.startswith("man:ov-agent(8)")
               for doc in directive(service, "Documentation"))
    drain = float(re.search(r"--drain (\d+)", exec_start).group(1))
    stop = directive(service, "TimeoutStopSec")[0]
    assert float(stop.rstrip("s")) > drain, "TimeoutStopSec= must cover --drain"


def test_system_service_runs_unprivileged():
    """Nothing to spawn for other users, so nothing to be root for: its own user, no
    capabilities, no network, Unix sockets only (issue 12)."""
    service = units(SYSTEM)["ov-agent.service"]
    assert directive(service, "User") == ["_ov-agent"]
    assert directive(service, "CapabilityBoundingSet") == [""]
    assert directive(service, "PrivateNetwork") == ["yes"]
    assert directive(service, "RestrictAddressFamilies") == ["AF_UNIX"]
    assert "--system" in directive(service, "ExecStart")[0]
    sysusers = (UNITS / "sysusers.d" / "ov-agent.conf").read_text()
    assert re.search(r"^u _ov-agent - .* /var/lib/ov ", sysusers, re.M), sysusers
    assert directive(service, "StateDirectory") == ["ov"]


def test_system_service_key_and_keyless_start():
    service = units(SYSTEM)["ov-agent.service"]
    assert directive(service, "LoadCredential") == ["machine.kek:/etc/ov/machine.kek"]
    assert directive(units(USER)["ov-agent.service"], "LoadCredential") == [
        "machine.kek:%E/ov/machine.kek"]


def test_placeholder_credential_counts_as_no_key(tmp_path, monkeypatch):
    (tmp_path / "machine.kek").write_bytes(keyfile.NO_KEY_PLACEHOLDER)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert keyfile.credential_path() is None
    (tmp_path / "machine.kek").write_bytes(b"k" * keyfile.KEY_LEN)
    assert keyfile.credential_path() == str(tmp_path / "machine.kek")


@pytest.mark.parametrize("files", [SYSTEM, USER], ids=["system", "user"])
def test_units_read_like_systemds_own(files):
    """As systemd's own units: the service's [Install] only names its socket (Also=:
    systemctl enable ov-agent.service enables the socket); in [Service] and [Socket],
    directives in groups, sorted within each group; comments of one line.  What the
    settings mean is ov-agent(8)'s job."""
    assert directive(units(files)["ov-agent.service"], "Also") == ["ov-agent.socket"]
    for name, path in files.items():
        section, group, previous = None, [], ""
        for line in path.read_text().splitlines() + [""]:
            assert not (line.startswith("#") and previous.startswith("#")), \
                f"{name}: a comment of more than one line: {previous!r} {line!r}"
            previous = line
            if line and not line.startswith(("#", "[")):
                group.append(line.partition("=")[0])
                continue
            if section in ("[Service]", "[Socket]"):
                assert group == sorted(group), f"{name} {section}: not sorted: {group}"
            group = []
            if line.startswith("["):
                section = line
