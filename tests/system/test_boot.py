"""The boot test: the Debian package under a real systemd.

One systemd is booted for the module (see harness.py) and the .deb built from this
tree is installed into it; the scenarios then share that system, in this order
(each one leaves the state the next needs):

  s1  apt-get install; the socket listens, the service waits for a connection
  s7  no machine key yet: clear 'unconfigured' answers, no restart loop
  s2  vault + machine key; a caller unit (User=, SupplementaryGroups=,
      LoadCredential=) runs a command that sees the secret, as the caller's uid,
      in the caller's cgroup; the unit's result is the command's exit status;
      the same for a DynamicUser= caller
  s3  the audit record in the journal (MESSAGE_ID, secret names, peer uid and unit),
      and the catalog text under journalctl -x
  s6  readiness (Type=notify: ordered units start after READY=1) and the watchdog
  s4  restart of the agent while clients keep connecting and a command runs (drained,
      then, with a short --drain, detached); the same across a package upgrade
  s5  stopping a caller stops its command; a SIGKILLed client leaves no orphan
  s8  systemd-analyze security stays at or below what the unit file claims
  s9  apt-get remove, then purge

Secret values never appear in assertion messages: commands report sha256 digests,
and checks for leaks compute booleans before asserting.
"""

import hashlib
import re
import secrets
import time

import pytest

from . import harness
from .conftest import REPORT

PASSWORD = "boot-test correct horse"
VALUE = "ov-boot-SECRET-" + secrets.token_hex(16)   # the secret the callers ask for
OTHER = "ov-boot-OTHER-" + secrets.token_hex(16)    # a secret nobody asks for
DIGEST = hashlib.sha256(VALUE.encode()).hexdigest()
APP, ENV = "demo", "production"
CALLER = "ovcaller"                                  # an ordinary system user
KEY = "/etc/ov/machine.kek"
VAULT = "/var/lib/ov/vault.db"
SOCKET = "/run/ov-agent/ov-agent.sock"
ACCEPTED = "f9136daab94d4ba3952e4e0cdf137d78"        # ovagent.systemd_glue.MESSAGE_IDS
READY = "ea336cdaac054a37b2d05c67a7c84f1e"
EXITED = "dcb7d95420d34b37b6fe98aee30ccad3"
UNCONFIGURED = "a553112588694f158a83055a88dbd802"

# Prints what the command sees without ever printing a value.
PROBE = r"""#!/bin/sh
printf 'digest=%s\n' "$(printf %s "$DB_URL" | sha256sum | cut -d' ' -f1)"
printf 'other=%s\n' "${OTHER_SECRET+set}"
printf 'uid=%s gid=%s groups=%s\n' "$(id -u)" "$(id -g)" "$(id -G)"
printf 'cgroup=%s\n' "$(grep '^0::' /proc/self/cgroup)"
exit "${1:-0}"
"""

STATE = {}   # facts earlier scenarios established for later ones


def need(*facts):
    missing = [fact for fact in facts if fact not in STATE]
    if missing:
        pytest.skip(f"needs an earlier scenario to have passed: {', '.join(missing)}")


@pytest.fixture(scope="module")
def box(system, deb):
    """The booted system with the .deb copied in and a caller user created."""
    if system.run("dpkg-query", "-W", "ov-agent", check=False).returncode == 0:
        # The host has the package: start from a clean slate inside the overlay.
        apt(system, "purge", "ov-agent")
    system.run("rm", "-rf", "/etc/ov", "/var/lib/ov")
    system.write(f"/root/{deb.name}", deb.read_bytes())
    system.write("/usr/local/bin/ov-probe", PROBE, 0o755)
    system.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
               CALLER)
    STATE["caller_uid"] = int(system.run("id", "-u", CALLER).out)
    STATE["deb"] = deb.name
    return system


# -- helpers -----------------------------------------------------------------------


def apt(box, *args):
    """apt-get ARGS inside, in /root.  The overlay's lower layer is the live host: if
    the host's dpkg is busy right now, its half-written state shows through; retry."""
    for attempt in range(4):
        result = box.run("sh", "-c", 'cd /root && exec apt-get -y -q "$@"', "apt", *args,
                         check=False, timeout=300)
        if result.returncode == 0 or not re.search(
                r"dpkg was interrupted|Could not get lock|Unable to acquire", result.err):
            break
        REPORT["apt_retries"] = REPORT.get("apt_retries", 0) + 1
        time.sleep(5)
    assert result.returncode == 0, result.out[-3000:] + result.err[-3000:]
    return result


def unit_file(box, name, text):
    box.write(f"/etc/systemd/system/{name}", text)
    box.systemctl("daemon-reload")


def caller_unit(name, exec_start, *, type_="exec", credential=True, extra=""):
    """A service running as the unprivileged caller, in the agent's group."""
    lines = ["[Unit]", f"Description=ov-agent boot test caller {name}", "",
             "[Service]", f"Type={type_}", f"User={CALLER}",
             f"SupplementaryGroups={STATE.get('group', 'ov-agent')}"]
    if credential:
        lines.append(f"LoadCredential=machine.kek:{KEY}")
    lines.append(f"ExecStart={exec_start}")
    return "\n".join(lines) + "\n" + extra


def wait_inactive(box, unit, timeout=60):
    def finished():
        props = box.show(unit, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode",
                         "InvocationID")
        return props if props["ActiveState"] in ("inactive", "failed") else None

    return box.wait_for(finished, timeout=timeout, what=f"{unit} to finish")


def unit_output(box, unit, invocation=None):
    args = ["-u", unit, "-o", "cat"]
    if invocation:
        args = [f"_SYSTEMD_INVOCATION_ID={invocation}", "-o", "cat"]
    return box.run("journalctl", "--no-pager", *args).out


def journal_has_value(box):
    """True if a secret value or the machine key (raw or hex) appears anywhere in the
    journal (it must not)."""
    export = box.run("journalctl", "--no-pager", "-o", "export").stdout
    key = box.run("cat", KEY, check=False).stdout
    material = [VALUE.encode(), OTHER.encode()]
    if len(key) == 32:
        material += [key, key.hex().encode()]
    return any(item in export for item in material)


def agent_main_pid(box):
    return int(box.show("ov-agent.service", "MainPID")["MainPID"])


def pgrep(box, pattern):
    out = box.run("pgrep", "-f", pattern, check=False).out
    return [int(pid) for pid in out.split()]


def ov_as_caller(box, *args, credential=True, timeout=60):
    """`ov ARGS` as the caller in a transient unit; returns the Result (exit status of
    the unit's command is the Result's returncode)."""
    props = ["-p", f"User={CALLER}", "-p", f"SupplementaryGroups={STATE['group']}"]
    if credential:
        props += ["-p", f"LoadCredential=machine.kek:{KEY}"]
    return box.run("systemd-run", "--wait", "--pipe", "--quiet", *props, "--",
                   "/usr/bin/ov", *args, check=False, timeout=timeout)


# -- s1: install and socket activation -------------------------------------------------


def test_s1_install_activates_socket_not_service(box):
    apt(box, "install", f"./{STATE['deb']}")
    assert box.run("dpkg-query", "-W", "-f=${Status}", "ov-agent").out == \
        "install ok installed"
    socket = box.show("ov-agent.socket", "ActiveState", "SubState", "UnitFileState",
                      "Listen", "SocketGroup", "SocketMode")
    assert socket["ActiveState"] == "active" and socket["SubState"] == "listening", socket
    assert socket["UnitFileState"] == "enabled", socket
    assert SOCKET in socket["Listen"], socket
    service = box.show("ov-agent.service", "ActiveState", "Type", "MainPID")
    assert service["ActiveState"] == "inactive", \
        f"the service started before any connection: {service}"
    assert service["Type"] == "notify", service
    stat = box.run("stat", "-c", "%F %U %G %a", SOCKET).out.split()
    assert stat[:2] == ["socket", "root"], stat
    STATE["group"] = socket["SocketGroup"] or "ov-agent"
    assert STATE["group"] == stat[-2], (socket, stat)
    assert box.run("getent", "group", STATE["group"], check=False).returncode == 0
    # Only root and the group may enter the socket's directory.
    directory = box.run("stat", "-c", "%U %G %a", "/run/ov-agent").out.split()
    assert directory == ["root", STATE["group"], "750"], directory
    STATE["installed"] = True


# -- s7: no machine key ----------------------------------------------------------------


def test_s7_without_machine_key_answers_unconfigured_without_restart_loop(box):
    need("installed")
    assert not box.exists(KEY)
    # A user outside the group cannot even reach the socket.
    outsider = box.run("systemd-run", "--wait", "--pipe", "--quiet", "-p",
                       f"User={CALLER}", "--", "/usr/bin/ov", "run", "--agent", "--",
                       "true", check=False)
    assert outsider.returncode == 6 and "Permission denied" in outsider.err, \
        outsider.err
    # More requests than the socket's trigger limit allows activations: were the
    # agent to exit (or fail) after each one, the socket would fail.
    burst = int(box.show("ov-agent.socket", "TriggerLimitBurst")["TriggerLimitBurst"])
    requests = max(25, burst + 5)
    script = (f"for i in $(seq {requests}); do /usr/bin/ov run --agent -- true "
              "2>>/tmp/err; echo $?; done")
    result = box.run("systemd-run", "--wait", "--pipe", "--quiet", "-p",
                     f"User={CALLER}", "-p", f"SupplementaryGroups={STATE['group']}",
                     "-p", "PrivateTmp=no", "--", "sh", "-c", script, timeout=180)
    codes = result.out.split()
    errors = box.read("/tmp/err").decode(errors="replace").splitlines()
    box.run("rm", "-f", "/tmp/err")
    assert codes == ["6"] * requests, (codes, errors[:3])
    assert len(errors) == requests and all(
        "[unconfigured]" in line for line in errors), errors[:3]
    assert "machine key" in errors[0], errors[0]
    socket = box.show("ov-agent.socket", "ActiveState", "Result")
    service = box.show("ov-agent.service", "ActiveState", "Result", "NRestarts",
                       "StatusText")
    assert socket == {"ActiveState": "active", "Result": "success"}, socket
    assert service["ActiveState"] == "active" and service["Result"] == "success", service
    assert service["NRestarts"] == "0", service
    events = box.journal("-u", "ov-agent.service", f"MESSAGE_ID={UNCONFIGURED}")
    assert events, "no 'unconfigured' audit event in the journal"
    STATE["unconfigured_status"] = service["StatusText"]


# -- s2: a caller unit runs a command with the secret ----------------------------------


def test_s2_caller_unit_runs_command_with_secret_as_its_user(box):
    need("installed")
    ov = ["/usr/bin/ov"]
    box.run(*ov, "auth", "init", "--password-stdin", input=PASSWORD + "\n")
    box.run("install", "-d", "-m", "0700", "/etc/ov")
    box.run(*ov, "auth", "derive-machine-key", "--out", KEY, "--password-stdin",
            input=PASSWORD + "\n")
    key = ["--machine-key", KEY]
    box.run(*ov, "app", "create", APP, *key)
    box.run(*ov, "env", "create", ENV, "--app", APP)
    box.run(*ov, "secret", "set", "DB_URL", "--app", APP, "--env", ENV, *key, input=VALUE)
    box.run(*ov, "secret", "set", "OTHER_SECRET", "--app", APP, "--env", ENV, *key,
            input=OTHER)
    assert box.run("stat", "-c", "%a %U", KEY).out.split() == ["600", "root"]
    # The key is new: the running (key-less) agent must be restarted, as it says.
    box.systemctl("restart", "ov-agent.service")
    status = box.show("ov-agent.service", "StatusText", "ActiveState")
    assert status["ActiveState"] == "active" and "machine-key" in status["StatusText"], \
        status
    STATE["configured"] = True

    unit_file(box, "ov-caller.service", caller_unit(
        "ov-caller", f"/usr/bin/ov run --agent --app {APP} --env {ENV} --secrets DB_URL "
        "-- /usr/local/bin/ov-probe 3"))
    box.systemctl("start", "ov-caller.service")
    props = wait_inactive(box, "ov-caller.service")
    out = unit_output(box, "ov-caller.service", props["InvocationID"])
    assert props["ActiveState"] == "failed" and props["Result"] == "exit-code", \
        (props, out)
    assert props["ExecMainStatus"] == "3", (props, out)
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert seen.get("digest") == DIGEST, ("the command did not see the secret", seen)
    assert seen.get("other") == "", "a secret not asked for reached the command"
    ids = seen["uid"].split()
    assert ids[0] == str(STATE["caller_uid"]), ("not run as the caller", seen)
    assert seen.get("cgroup") == "0::/system.slice/ov-caller.service", \
        ("the command ran outside the caller's unit", seen)
    assert not journal_has_value(box), "a secret value reached the journal"
    STATE["caller_invocation"] = props["InvocationID"]


def test_s2_dynamic_user_caller(box):
    """The same with DynamicUser=yes (a transient unit, systemd-run --wait --pipe):
    the command runs as the unit's dynamic uid, and the client's exit status is the
    unit's."""
    need("configured")
    result = box.run(
        "systemd-run", "--wait", "--pipe", "--quiet", "-p", "DynamicUser=yes",
        "-p", f"SupplementaryGroups={STATE['group']}",
        "-p", f"LoadCredential=machine.kek:{KEY}", "--",
        "/usr/bin/ov", "run", "--agent", "--app", APP, "--secrets", "DB_URL", "--",
        "/usr/local/bin/ov-probe", "4", check=False)
    assert result.returncode == 4, result.err
    seen = dict(line.split("=", 1) for line in result.out.splitlines() if "=" in line)
    assert seen.get("digest") == DIGEST, ("the command did not see the secret", seen)
    uid = int(seen["uid"].split()[0])
    assert 61184 <= uid <= 65519, ("not a dynamic uid", seen)
    assert seen["cgroup"].startswith("0::/system.slice/run-"), seen


# -- s3: the audit trail ---------------------------------------------------------------


def test_s3_audit_record_in_journal_with_catalog(box):
    need("caller_invocation")
    entries = box.journal("-u", "ov-agent", f"MESSAGE_ID={ACCEPTED}",
                          "PEER_UNIT=ov-caller.service")
    assert entries, "no 'accepted' record for ov-caller.service"
    record = entries[-1]
    assert record["SECRETS"] == "DB_URL", record
    assert record["PEER_UID"] == str(STATE["caller_uid"]), record
    assert record["APP"] == APP and record["ENV"] == ENV, record
    assert record["_SYSTEMD_UNIT"] == "ov-agent.service", record
    assert record.get("PRIORITY") == "6", record
    exited = box.journal("-u", "ov-agent", f"MESSAGE_ID={EXITED}",
                         f"REQUEST_ID={record['REQUEST_ID']}")
    assert exited and exited[-1]["EXIT_STATUS"] == "3", exited
    # journalctl -x: the catalog entry explains the record.
    catalog = box.run("journalctl", "--no-pager", "-x", "-u", "ov-agent",
                      f"MESSAGE_ID={ACCEPTED}", "-n", "1").out
    body = catalog_body(box, ACCEPTED)
    assert body, "the package ships no catalog entry for the 'accepted' MESSAGE_ID"
    assert any(line in catalog for line in body), (catalog, body)
    assert "Subject:" in catalog or "░░" in catalog, catalog
    assert not journal_has_value(box), "a secret value reached the journal"


def catalog_body(box, message_id):
    """Lines of the installed catalog's entry for message_id, without @FIELD@s."""
    files = box.run("sh", "-c", "dpkg -L ov-agent | grep '\\.catalog$'", check=False)
    lines = []
    for path in files.out.split():
        text = box.read(path).decode()
        match = re.search(rf"^-- {message_id}\n(.*?)(?=^-- [0-9a-f]{{32}}|\Z)", text,
                          re.M | re.S)
        if match:
            lines = [line.strip() for line in match.group(1).splitlines()
                     if line.strip() and "@" not in line and ":" not in line[:20]]
    return lines[:3]


# -- s6: readiness and the watchdog ----------------------------------------------------


def test_s6_ordered_unit_starts_after_ready(box):
    need("configured")
    box.systemctl("stop", "ov-agent.service")
    assert box.show("ov-agent.socket", "ActiveState")["ActiveState"] == "active"
    unit_file(box, "ov-after.service", caller_unit(
        "ov-after", "/usr/bin/ov run --agent --app demo --secrets DB_URL -- "
        "/usr/local/bin/ov-probe 0", type_="oneshot",
        extra="RemainAfterExit=yes\n").replace(
            "[Service]", "Wants=ov-agent.service\nAfter=ov-agent.service\n\n[Service]"))
    box.systemctl("start", "ov-after.service")
    after = box.show("ov-after.service", "Result", "InactiveExitTimestampMonotonic",
                     "ExecMainStatus")
    agent = box.show("ov-agent.service", "ActiveEnterTimestampMonotonic",
                     "ExecMainStartTimestampMonotonic", "Type", "StatusText")
    assert after["Result"] == "success" and after["ExecMainStatus"] == "0", after
    ready = box.journal("-u", "ov-agent", f"MESSAGE_ID={READY}", "-n", "1")
    ready_at = int(ready[-1]["__MONOTONIC_TIMESTAMP"]) if ready else None
    agent_started = int(agent["ExecMainStartTimestampMonotonic"])
    agent_active = int(agent["ActiveEnterTimestampMonotonic"])
    caller_started = int(after["InactiveExitTimestampMonotonic"])
    # Type=notify: active only at READY=1, which the agent sends once it can serve.
    assert agent_started < agent_active <= caller_started, (agent, after)
    assert ready_at is not None and ready_at <= caller_started, (ready_at, after)
    REPORT["ready_after_exec_ms"] = (agent_active - agent_started) / 1000


def test_s6_watchdog_restarts_a_hung_agent(box):
    need("configured")
    watchdog = box.show("ov-agent.service", "WatchdogUSec", "Restart")
    assert watchdog["WatchdogUSec"] not in ("0", "infinity", ""), \
        f"ov-agent.service sets no WatchdogSec=: {watchdog}"
    # Shorten the watchdog for the test only (a runtime drop-in).
    box.write("/run/systemd/system/ov-agent.service.d/50-boot-test-watchdog.conf",
              "[Service]\nWatchdogSec=2s\n")
    try:
        box.systemctl("daemon-reload")
        box.systemctl("restart", "ov-agent.service")
        before = box.show("ov-agent.service", "MainPID", "NRestarts")
        pid = int(before["MainPID"])
        box.run("kill", "-STOP", str(pid))
        box.wait_for(lambda: int(box.show("ov-agent.service", "NRestarts")["NRestarts"])
                     > int(before["NRestarts"]), timeout=30, what="a watchdog restart")
        box.wait_for(lambda: box.show("ov-agent.service", "ActiveState")["ActiveState"]
                     == "active", timeout=15, what="the restarted agent")
        assert agent_main_pid(box) != pid
        log = box.run("journalctl", "--no-pager", "-u", "ov-agent.service",
                      "-o", "cat").out
        assert "Watchdog timeout" in log, log[-2000:]
        result = ov_as_caller(box, "run", "--agent", "--app", APP, "--secrets", "DB_URL",
                              "--", "/usr/local/bin/ov-probe", "0")
        assert result.returncode == 0 and f"digest={DIGEST}" in result.out, result.err
    finally:
        box.run("rm", "-f", "/run/systemd/system/ov-agent.service.d/"
                "50-boot-test-watchdog.conf")
        box.systemctl("daemon-reload")
        box.systemctl("restart", "ov-agent.service")


# -- s4: restarting the agent under load -----------------------------------------------

LOAD = r"""#!/bin/sh
# ov-load: requests one after the other until /run/ov-load.stop exists (at most
# 1000); prints rc=STATUS for each, then done=N.
i=0
while [ ! -e /run/ov-load.stop ] && [ "$i" -lt 1000 ]; do
    /usr/bin/ov run --agent --app demo --secrets DB_URL -- true
    echo "rc=$?"
    i=$((i + 1))
done
echo "done=$i"
"""


def start_load(box, units=("ov-load1.service", "ov-load2.service")):
    box.run("rm", "-f", "/run/ov-load.stop")
    box.systemctl("start", *units)
    runs = {unit: box.show(unit, "InvocationID")["InvocationID"] for unit in units}
    box.wait_for(lambda: all(re.search(r"^rc=", unit_output(box, unit, run), re.M)
                             for unit, run in runs.items()), timeout=30,
                 what="the first requests")


def stop_load(box, units=("ov-load1.service", "ov-load2.service")):
    """Stop the load; return the exit statuses of all its requests."""
    box.run("touch", "/run/ov-load.stop")
    codes = []
    for unit in units:
        props = wait_inactive(box, unit, timeout=120)
        out = unit_output(box, unit, props["InvocationID"])
        assert props["Result"] == "success" and "done=" in out, (props, out[-2000:])
        codes += re.findall(r"^rc=(\d+)$", out, re.M)
    return codes


def agent_option(box, name, default):
    """A numeric option (--drain, --grace) of the installed agent's ExecStart."""
    text = box.systemctl("cat", "ov-agent.service").out
    match = re.search(rf"^ExecStart=.*--{name}[= ]+(\d+(?:\.\d+)?)", text, re.M)
    return float(match.group(1)) if match else default


def agent_requests(box, pid):
    """How many requests the agent process *pid* accepted (from the journal)."""
    return len(box.journal("-u", "ov-agent", f"MESSAGE_ID={ACCEPTED}", f"_PID={pid}"))


def test_s4_restart_under_load_loses_nothing(box):
    need("configured")
    box.write("/usr/local/bin/ov-load", LOAD, 0o755)
    box.systemctl("start", "ov-agent.service")
    drain = agent_option(box, "drain", 30.0)
    duration = 4   # the running command's length, below the drain time
    assert duration + 1 < drain, f"--drain {drain} is too short for this scenario"
    unit_file(box, "ov-long.service", caller_unit(
        "ov-long", "/usr/bin/ov run --agent --app demo --secrets DB_URL -- "
        f"/bin/sh -c 'sleep {duration}.5; exit 5'"))
    for n in (1, 2):
        unit_file(box, f"ov-load{n}.service",
                  caller_unit(f"ov-load{n}", "/usr/local/bin/ov-load"))
    inode = box.run("stat", "-c", "%i", SOCKET).out
    old_pid = agent_main_pid(box)
    box.systemctl("start", "ov-long.service")
    box.wait_for(lambda: pgrep(box, f"^sleep {duration}.5$"), timeout=20,
                 what="the long command")
    start_load(box)
    started = time.monotonic()
    box.systemctl("restart", "ov-agent.service")
    REPORT["restart_seconds_with_running_command"] = time.monotonic() - started
    new_pid = agent_main_pid(box)
    assert new_pid != old_pid
    assert box.show("ov-agent.socket", "ActiveState")["ActiveState"] == "active"
    assert box.run("stat", "-c", "%i", SOCKET).out == inode, "the socket was recreated"
    box.wait_for(lambda: agent_requests(box, new_pid) >= 10, timeout=30,
                 what="the new agent to serve the load")
    results = stop_load(box)
    lost = len([code for code in results if code != "0"])
    REPORT["restart_requests_lost"] = f"{lost} of {len(results)}"
    assert lost == 0, f"{lost} of {len(results)} requests failed across the restart"
    # Requests were served by both instances: none lost across the restart.
    accepted = box.journal("-u", "ov-agent", f"MESSAGE_ID={ACCEPTED}",
                           "PEER_UNIT=ov-load1.service", "+",
                           f"MESSAGE_ID={ACCEPTED}", "PEER_UNIT=ov-load2.service")
    by_pid = {entry["_PID"] for entry in accepted}
    REPORT["load_requests_per_agent_pid"] = {
        pid: sum(entry["_PID"] == pid for entry in accepted) for pid in by_pid}
    # The running command: the old agent drained (it is shorter than --drain) and
    # relayed its exit status; it was never killed by the restart.
    props = wait_inactive(box, "ov-long.service", timeout=60)
    long_out = unit_output(box, "ov-long.service", props["InvocationID"])
    assert props["ExecMainStatus"] == "5", (props, long_out)
    exited = [e for e in box.journal("-u", "ov-agent", f"MESSAGE_ID={EXITED}",
                                     "PEER_UNIT=ov-long.service")]
    assert exited and exited[-1]["EXIT_STATUS"] == "5", exited[-1:]
    assert exited[-1]["_PID"] == str(old_pid), "the long command's exit was not seen " \
        "by the agent that started it"
    assert str(new_pid) in by_pid and str(old_pid) in by_pid, REPORT[
        "load_requests_per_agent_pid"]


def test_s4_drain_then_detach(box):
    """A command longer than --drain: the stopping agent answers 'detached', the
    command keeps running in its caller's unit, the client waits and exits 6."""
    need("configured")
    text = box.systemctl("cat", "ov-agent.service").out
    exec_start = [line for line in text.splitlines() if line.startswith("ExecStart=")
                  and line != "ExecStart="][-1]
    exec_start = re.sub(r"\s--drain[= ]+\S+", "", exec_start)
    dropin = "/run/systemd/system/ov-agent.service.d/50-boot-test-drain.conf"
    box.write(dropin, f"[Service]\nExecStart=\n{exec_start} --drain 1\n")
    try:
        box.systemctl("daemon-reload")
        box.systemctl("restart", "ov-agent.service")
        unit_file(box, "ov-detach.service", caller_unit(
            "ov-detach", "/usr/bin/ov run --agent --app demo --secrets DB_URL -- "
            "/bin/sh -c 'sleep 5.5; exit 7'"))
        box.systemctl("start", "ov-detach.service")
        [pid] = box.wait_for(lambda: pgrep(box, "^sleep 5.5$"), timeout=20,
                             what="the long command")
        started = time.monotonic()
        box.systemctl("restart", "ov-agent.service")
        REPORT["restart_seconds_with_drain_1"] = time.monotonic() - started
        assert pgrep(box, "^sleep 5.5$") == [pid], "the restart killed the command"
        cgroup = box.read(f"/proc/{pid}/cgroup").decode()
        assert "0::/system.slice/ov-detach.service" in cgroup, cgroup
        props = wait_inactive(box, "ov-detach.service", timeout=30)
        out = unit_output(box, "ov-detach.service", props["InvocationID"])
        assert props["ExecMainStatus"] == "6", (props, out)
        assert "keeps running" in out, out
        assert not pgrep(box, "^sleep 5.5$")
    finally:
        box.run("rm", "-f", dropin)
        box.systemctl("daemon-reload")
        box.systemctl("restart", "ov-agent.service")


def test_s4_package_upgrade_under_load_loses_nothing(box):
    """An upgrade (apt-get install --reinstall: postinst configure with the old
    version) while a command runs and clients keep connecting, as with s4's restart:
    the socket must stay with systemd and only the agent restart (an upgrade that
    restarts the socket resets every connection queued during the agent's drain)."""
    need("configured")
    box.systemctl("start", "ov-agent.service")
    old_pid = agent_main_pid(box)
    inode = box.run("stat", "-c", "%i", SOCKET).out
    unit_file(box, "ov-long.service", caller_unit(
        "ov-long", "/usr/bin/ov run --agent --app demo --secrets DB_URL -- "
        "/bin/sh -c 'sleep 3.5; exit 5'"))
    box.systemctl("start", "ov-long.service")
    box.wait_for(lambda: pgrep(box, "^sleep 3.5$"), timeout=20, what="the long command")
    start_load(box)
    apt(box, "install", "--reinstall", f"./{STATE['deb']}")
    box.wait_for(lambda: box.show("ov-agent.service", "ActiveState")["ActiveState"]
                 == "active", timeout=30, what="an agent after the upgrade")
    box.wait_for(lambda: agent_requests(box, agent_main_pid(box)) >= 10, timeout=30,
                 what="the agent to serve the load after the upgrade")
    results = stop_load(box)
    lost = len([code for code in results if code != "0"])
    REPORT["upgrade_requests_lost"] = f"{lost} of {len(results)}"
    assert agent_main_pid(box) != old_pid, "the upgrade did not restart the agent"
    assert box.run("stat", "-c", "%i", SOCKET).out == inode, \
        "the upgrade recreated the socket"
    props = wait_inactive(box, "ov-long.service", timeout=60)
    assert props["ExecMainStatus"] == "5", props
    assert box.show("ov-agent.socket", "ActiveState")["ActiveState"] == "active"
    assert lost == 0, f"{lost} of {len(results)} requests failed across the upgrade"


# -- s5: stopping callers, killing clients ---------------------------------------------


def test_s5_stopping_the_caller_stops_its_command(box):
    need("configured")
    unit_file(box, "ov-sleeper.service", caller_unit(
        "ov-sleeper", "/usr/bin/ov run --agent --app demo --secrets DB_URL -- sleep 301"))
    box.systemctl("start", "ov-sleeper.service")
    [pid] = box.wait_for(lambda: pgrep(box, "^sleep 301$"), timeout=20,
                         what="the command")
    assert pid in box.pids_with_environ(VALUE.encode()), "the command lacks the secret"
    status = box.read(f"/proc/{pid}/status").decode()
    assert re.search(rf"^Uid:\s+{STATE['caller_uid']}\s", status, re.M), status
    cgroup = box.read(f"/proc/{pid}/cgroup").decode()
    assert "0::/system.slice/ov-sleeper.service" in cgroup, cgroup
    box.systemctl("stop", "ov-sleeper.service")
    box.wait_for(lambda: not pgrep(box, "^sleep 301$"), timeout=15,
                 what="the command to stop")
    assert not box.pids_with_environ(VALUE.encode()), "a process still holds the secret"


def test_s5_sigkilled_client_leaves_no_orphan(box):
    """The client is SIGKILLed; its command ignores SIGTERM: the agent sends SIGTERM,
    then SIGKILL after --grace seconds."""
    need("configured")
    grace = agent_option(box, "grace", 5.0)
    box.write("/usr/local/bin/ov-stubborn", "#!/bin/sh\ntrap '' TERM\nexec sleep 302\n",
              0o755)
    unit_file(box, "ov-orphan.service", caller_unit(
        "ov-orphan", "/bin/sh -c '/usr/bin/ov run --agent --app demo --secrets DB_URL "
        "-- /usr/local/bin/ov-stubborn; exec sleep 600'"))
    box.systemctl("start", "ov-orphan.service")
    box.wait_for(lambda: pgrep(box, "^sleep 302$"), timeout=20, what="the command")
    shell = box.show("ov-orphan.service", "MainPID")["MainPID"]
    [client] = [int(p) for p in box.run("ps", "-o", "pid=", "--ppid", shell).out.split()]
    assert b"ov\0run\0--agent" in box.read(f"/proc/{client}/cmdline")
    killed = time.monotonic()
    box.run("kill", "-KILL", str(client))
    box.wait_for(lambda: not pgrep(box, "^sleep 302$"), timeout=grace + 10,
                 what="the orphaned command to be killed")
    gone_after = time.monotonic() - killed
    REPORT["orphan_gone_after_seconds"] = gone_after
    assert gone_after >= grace - 0.5, "SIGKILL came before the grace period ended"
    assert not box.pids_with_environ(VALUE.encode()), "a process still holds the secret"
    assert box.show("ov-orphan.service", "ActiveState")["ActiveState"] == "active", \
        "the caller unit itself should still run (its shell moved on)"
    exited = box.journal("-u", "ov-agent", f"MESSAGE_ID={EXITED}",
                         "PEER_UNIT=ov-orphan.service")
    assert exited and "went away" in exited[-1]["OUTCOME"], exited[-1:]
    box.systemctl("stop", "ov-orphan.service")


# -- s8: the exposure score ------------------------------------------------------------


def test_s8_security_exposure_within_the_claim(box):
    need("installed")
    out = box.run("systemd-analyze", "security", "--no-pager", "ov-agent.service").out
    score = harness.parse_exposure(out)
    assert score is not None, out[-2000:]
    claim = harness.exposure_claim(box.systemctl("cat", "ov-agent.service").out)
    REPORT["exposure"] = score
    REPORT["exposure_claimed"] = claim
    assert claim is not None, ("ov-agent.service has no comment claiming its "
                               "'systemd-analyze security' exposure")
    assert score <= claim, f"exposure {score} is above the claimed {claim}"


# -- s9: remove and purge --------------------------------------------------------------


def test_s9_remove_keeps_data_purge_cleans(box):
    need("installed")
    box.systemctl("start", "ov-agent.service", check=False)
    apt(box, "remove", "ov-agent")
    assert box.run("dpkg-query", "-W", "-f=${Status}", "ov-agent").out == \
        "deinstall ok config-files"
    for unit in ("ov-agent.socket", "ov-agent.service"):
        props = box.show(unit, "LoadState", "ActiveState")
        assert props == {"LoadState": "not-found", "ActiveState": "inactive"}, \
            (unit, props)
    assert not pgrep(box, "ov agent"), "an agent process survived the removal"
    assert not box.exists(SOCKET), "RemoveOnStop=yes: no stale socket file"
    assert not box.exists("/run/ov-agent"), "postrm removes the socket's directory"
    if STATE.get("configured"):
        assert box.exists(VAULT) and box.exists(KEY), "remove must keep vault and key"
        assert box.run("stat", "-c", "%a", "/etc/ov").out.strip() == "700"
    apt(box, "purge", "ov-agent")
    assert box.run("dpkg-query", "-W", "-f=${Status}", "ov-agent",
                   check=False).out in ("", "unknown ok not-installed")
    for unit in ("ov-agent.socket", "ov-agent.service"):
        assert box.show(unit, "LoadState")["LoadState"] == "not-found", unit
    assert not box.exists("/etc/systemd/system/sockets.target.wants/ov-agent.socket")
    assert not box.exists("/usr/bin/ov")
    if STATE.get("configured"):
        # ov-agent(8): "The package never removes [the vault], nor the key, not even
        # on purge: remove them by hand."
        assert box.exists(VAULT) and box.exists(KEY), "purge must keep vault and key"
        assert box.run("stat", "-c", "%a", "/etc/ov").out.strip() == "700"
