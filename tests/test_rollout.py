"""Rolling a changed secret out (issue 17), in-process and fast: the CLI's side
(ovagent/client/rollout.py: which units hold an older version, the systemctl command,
acting on units one at a time with a fake systemctl) and the agent's registry of
consumers (ovagent/agent/consumers.py: recording, filtering, its bound, its file).
The end-to-end tests with real agents are in test_agent_consumers.py."""

import json
import os
import shlex
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import cgroup2_mount
from ovagent.agent import consumers as consumers_module
from ovagent.agent.consumers import Consumers
from ovagent.client import rollout, talk

SPLAY = 0.2

# A fake systemctl: logs "TIME ARGV..." to $FAKE_SYSTEMCTL_LOG, and fails (a message
# on stderr, exit 1) for a unit whose name is listed in $FAKE_SYSTEMCTL_FAIL.
FAKE_SYSTEMCTL = """\
#!/bin/sh
unit=""
for arg; do unit="$arg"; done
echo "$(date +%s.%N) $*" >> "$FAKE_SYSTEMCTL_LOG"
if [ -f "$FAKE_SYSTEMCTL_FAIL" ] && grep -qxF "$unit" "$FAKE_SYSTEMCTL_FAIL"; then
    echo "Job for $unit failed because the control process exited with error code." >&2
    exit 1
fi
exit 0
"""


@pytest.fixture
def systemctl(tmp_path, monkeypatch):
    """$SYSTEMCTL pointed at the fake; .calls(): [(time, argv)]; .fail(*units)."""
    script = tmp_path / "systemctl"
    script.write_text(FAKE_SYSTEMCTL)
    script.chmod(0o755)
    log, failing = tmp_path / "systemctl.log", tmp_path / "systemctl.fail"
    monkeypatch.setenv("SYSTEMCTL", str(script))
    monkeypatch.setenv("FAKE_SYSTEMCTL_LOG", str(log))
    monkeypatch.setenv("FAKE_SYSTEMCTL_FAIL", str(failing))

    def calls():
        if not log.exists():
            return []
        return [(float(line.split()[0]), line.split()[1:])
                for line in log.read_text().splitlines()]

    def fail(*units):
        failing.write_text("".join(f"{unit}\n" for unit in units))

    return SimpleNamespace(path=str(script), calls=calls, fail=fail)


def unit(name, versions=None, user_manager=None, app="demo", env="production"):
    """A consumers entry as the agent lists it."""
    return {"unit": name, "user_manager": user_manager, "uid": 0, "app": app, "env": env,
            "versions": versions or {"DB_URL": 1}, "seen": 1700000000}


def quiet(line):
    """say= for apply(): collected instead of printed."""
    quiet.lines.append(line)


# -- rollout.command ------------------------------------------------------------------


def test_command_for_a_system_unit(monkeypatch):
    monkeypatch.delenv("SYSTEMCTL", raising=False)
    assert rollout.command(unit("shop.service"), "restart") == [
        "systemctl", "try-restart", "shop.service"]
    assert rollout.command(unit("shop.service"), "reload") == [
        "systemctl", "try-reload-or-restart", "shop.service"]


def test_command_for_a_unit_of_a_users_own_manager(monkeypatch):
    monkeypatch.delenv("SYSTEMCTL", raising=False)
    entry = unit("app.service", user_manager=1000)
    assert rollout.command(entry, "restart") == [
        "systemctl", "--user", "--machine=1000@", "try-restart", "app.service"]
    assert rollout.command(entry, "reload") == [
        "systemctl", "--user", "--machine=1000@", "try-reload-or-restart", "app.service"]
    # uid 0 is a user manager too (user@0.service), not "no manager".
    assert rollout.command(unit("x.service", user_manager=0), "restart")[:3] == [
        "systemctl", "--user", "--machine=0@"]


def test_command_takes_systemctl_from_the_environment(monkeypatch):
    monkeypatch.setenv("SYSTEMCTL", "/opt/bin/systemctl")
    assert rollout.command(unit("shop.service"), "restart")[0] == "/opt/bin/systemctl"


# -- rollout.apply with a fake systemctl ------------------------------------------------


def test_apply_restarts_only_the_units_given_in_order(systemctl):
    quiet.lines = []
    units = [unit("b.service"), unit("a.service"), unit("c.service", user_manager=1000)]
    done = rollout.apply(units, "restart", say=quiet)
    assert [argv for _, argv in systemctl.calls()] == [
        ["try-restart", "b.service"], ["try-restart", "a.service"],
        ["--user", "--machine=1000@", "try-restart", "c.service"]]
    assert [(entry["unit"], outcome) for entry, outcome in done] == [
        ("b.service", "ok"), ("a.service", "ok"), ("c.service", "ok")]
    assert len(quiet.lines) == 3
    assert quiet.lines[0] == "restart b.service (demo/production: DB_URL=1): ok"
    assert quiet.lines[2].startswith("restart user@1000.service/c.service ")


def test_apply_with_no_units_runs_nothing(systemctl):
    assert rollout.apply([], "restart", splay=SPLAY, say=quiet) == []
    assert systemctl.calls() == []


def test_reload_uses_try_reload_or_restart(systemctl):
    quiet.lines = []
    rollout.apply([unit("shop.service"), unit("cart.service")], "reload", say=quiet)
    assert [argv for _, argv in systemctl.calls()] == [
        ["try-reload-or-restart", "shop.service"],
        ["try-reload-or-restart", "cart.service"]]
    assert all(line.startswith("reload ") for line in quiet.lines)


def test_restart_uses_try_restart(systemctl):
    rollout.apply([unit("shop.service")], "restart", say=quiet)
    assert [argv for _, argv in systemctl.calls()] == [["try-restart", "shop.service"]]


def test_splay_spaces_the_units(systemctl):
    units = [unit(f"u{number}.service") for number in range(3)]
    rollout.apply(units, "restart", splay=SPLAY, say=quiet)
    calls = systemctl.calls()
    assert [argv[-1] for _, argv in calls] == ["u0.service", "u1.service", "u2.service"]
    times = [when for when, _ in calls]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(gap >= SPLAY - 0.01 for gap in gaps), gaps


def test_the_first_failure_stops_the_rollout(systemctl):
    systemctl.fail("b.service")
    quiet.lines = []
    with pytest.raises(rollout.RolloutError) as raised:
        rollout.apply([unit("a.service"), unit("b.service"), unit("c.service"),
                       unit("d.service")], "restart", say=quiet)
    assert [argv[-1] for _, argv in systemctl.calls()] == ["a.service", "b.service"]
    message = str(raised.value)
    assert "b.service" in message and "2 unit(s) left as they were" in message, message
    assert "c.service" not in message
    assert raised.value.exit_code != 0
    # systemctl's own last line says why.
    assert "b.service" in quiet.lines[-1] and "control process exited" in quiet.lines[-1]
    assert quiet.lines[-1].startswith("restart b.service") and "failed" in quiet.lines[-1]


def test_keep_going_tries_every_unit_and_names_the_failed(systemctl):
    systemctl.fail("a.service", "c.service")
    with pytest.raises(rollout.RolloutError) as raised:
        rollout.apply([unit("a.service"), unit("b.service"), unit("c.service"),
                       unit("d.service")], "restart", keep_going=True, say=quiet)
    assert [argv[-1] for _, argv in systemctl.calls()] == [
        "a.service", "b.service", "c.service", "d.service"]
    message = str(raised.value)
    assert "a.service" in message and "c.service" in message, message
    assert "b.service" not in message and "d.service" not in message, message
    assert "left as they were" not in message


def test_a_missing_systemctl_is_a_failure_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("SYSTEMCTL", str(tmp_path / "no-such-systemctl"))
    quiet.lines = []
    with pytest.raises(rollout.RolloutError):
        rollout.apply([unit("a.service"), unit("b.service")], "restart", say=quiet)
    assert len(quiet.lines) == 1 and "failed" in quiet.lines[0]


# -- rollout.holders ----------------------------------------------------------------------


@pytest.fixture
def agent_says(monkeypatch):
    """talk.consumers replaced: answers the entries given; .asked: its arguments."""
    asked = []

    def install(entries):
        def consumers(socket_path, key, app=None, env=None, secrets=None):
            asked.append((socket_path, key, app, env, secrets))
            return entries
        monkeypatch.setattr(talk, "consumers", consumers)
        return asked
    return install


def test_holders_are_the_units_on_an_older_version(agent_says):
    entries = [unit("old.service", {"DB_URL": 2}),
               unit("current.service", {"DB_URL": 3}),
               unit("mixed.service", {"DB_URL": 3, "API_TOKEN": 1}),
               unit("other.service", {"API_TOKEN": 1}),
               unit("older.service", {"DB_URL": 1, "API_TOKEN": 5})]
    asked = agent_says(entries)
    found = rollout.holders("demo", "production", {"DB_URL": 3}, socket="/s", key=b"k")
    assert [entry["unit"] for entry in found] == ["old.service", "older.service"]
    assert asked == [("/s", b"k", "demo", "production", ["DB_URL"])]


def test_holders_of_several_secrets(agent_says):
    entries = [unit("a.service", {"DB_URL": 3, "API_TOKEN": 1}),
               unit("b.service", {"DB_URL": 3, "API_TOKEN": 2})]
    asked = agent_says(entries)
    found = rollout.holders("demo", "production", {"DB_URL": 3, "API_TOKEN": 2},
                            socket="/s", key=b"k")
    assert [entry["unit"] for entry in found] == ["a.service"]
    assert asked[0][4] == ["API_TOKEN", "DB_URL"]       # sorted names


def test_holders_of_every_secret_of_an_app(agent_says):
    """A key rotation (versions None): every unit the agent names."""
    entries = [unit("a.service", {"DB_URL": 3}), unit("b.service", {"API_TOKEN": 9})]
    asked = agent_says(entries)
    assert rollout.holders("demo", None, None, socket="/s", key=b"k") == entries
    assert asked == [("/s", b"k", "demo", None, None)]


# -- rollout.advice ----------------------------------------------------------------------


def test_advice_names_each_unit_and_its_command(monkeypatch):
    monkeypatch.delenv("SYSTEMCTL", raising=False)
    units = [unit("shop.service", {"DB_URL": 1, "API_TOKEN": 2}),
             unit("app.service", user_manager=1000)]
    lines = rollout.advice(units)
    assert len(lines) == 2
    assert "shop.service (demo/production: API_TOKEN=2,DB_URL=1)" in lines[0]
    assert lines[0].endswith("systemctl try-restart shop.service"), lines[0]
    assert lines[1].endswith(shlex.join(rollout.command(units[1], "restart"))), lines[1]
    assert "user@1000.service/app.service" in lines[1]
    assert rollout.advice(units[:1], "reload")[0].endswith(
        "systemctl try-reload-or-restart shop.service")


# -- the agent's registry of consumers ------------------------------------------------------


def peer(unit_name="shop.service", manager_uid=None, cgroup=None, uid=0):
    return SimpleNamespace(unit=unit_name, manager_uid=manager_uid, cgroup=cgroup, uid=uid)


class Clock:
    def __init__(self):
        self.now = 1700000000.0

    def __call__(self):
        self.now += 1
        return self.now


def names(listing):
    return [(entry["unit"], entry["app"], entry["env"]) for entry in listing]


def test_a_release_is_recorded_with_its_versions():
    clock = Clock()
    registry = Consumers(None, clock=clock)
    registry.record(peer("shop.service", uid=1000), "demo", "production",
                    {"DB_URL": 1, "API_TOKEN": 2})
    assert registry.listing() == [{
        "unit": "shop.service", "user_manager": None, "uid": 1000, "app": "demo",
        "env": "production", "versions": {"DB_URL": 1, "API_TOKEN": 2},
        "seen": 1700000001}]
    # A later release updates the versions it names and keeps the others.
    registry.record(peer("shop.service", uid=1000), "demo", "production", {"DB_URL": 3})
    [entry] = registry.listing()
    assert entry["versions"] == {"DB_URL": 3, "API_TOKEN": 2}
    assert entry["seen"] == 1700000002


def test_a_caller_outside_any_unit_is_not_recorded():
    registry = Consumers(None)
    registry.record(peer(None), "demo", "production", {"DB_URL": 1})
    assert registry.listing() == []


def test_units_of_user_managers_are_told_apart():
    registry = Consumers(None)
    registry.record(peer("x.service"), "demo", "production", {"DB_URL": 1})
    registry.record(peer("x.service", manager_uid=1000, uid=1000), "demo", "production",
                    {"DB_URL": 2})
    listing = registry.listing()
    assert sorted((entry["user_manager"] is None, entry["versions"]["DB_URL"])
                  for entry in listing) == [(False, 2), (True, 1)]


def test_listing_filters_by_app_env_and_secrets():
    registry = Consumers(None)
    registry.record(peer("shop.service"), "demo", "production", {"DB_URL": 1})
    registry.record(peer("cart.service"), "demo", "production", {"API_TOKEN": 1})
    registry.record(peer("stage.service"), "demo", "staging", {"DB_URL": 4})
    registry.record(peer("blog.service"), "blog", "production",
                    {"DB_URL": 2, "API_TOKEN": 7})
    assert len(registry.listing()) == 4
    assert sorted(names(registry.listing(app="demo"))) == [
        ("cart.service", "demo", "production"), ("shop.service", "demo", "production"),
        ("stage.service", "demo", "staging")]
    assert sorted(names(registry.listing(env="production"))) == [
        ("blog.service", "blog", "production"), ("cart.service", "demo", "production"),
        ("shop.service", "demo", "production")]
    assert names(registry.listing(app="demo", env="staging")) == [
        ("stage.service", "demo", "staging")]
    by_secret = registry.listing(secrets=["API_TOKEN"])
    assert sorted(names(by_secret)) == [("blog.service", "blog", "production"),
                                        ("cart.service", "demo", "production")]
    # Only the versions asked about.
    assert {entry["unit"]: entry["versions"] for entry in by_secret} == {
        "blog.service": {"API_TOKEN": 7}, "cart.service": {"API_TOKEN": 1}}
    assert registry.listing(app="demo", env="production", secrets=["EMPTY"]) == []
    assert registry.listing(app="nope") == []


def test_the_registry_is_bounded_least_recently_seen_first(monkeypatch):
    monkeypatch.setattr(consumers_module, "MAX_ENTRIES", 3)
    registry = Consumers(None)
    for name in ("a", "b", "c"):
        registry.record(peer(f"{name}.service"), "demo", "production", {"DB_URL": 1})
    registry.record(peer("a.service"), "demo", "production", {"DB_URL": 2})  # seen again
    registry.record(peer("d.service"), "demo", "production", {"DB_URL": 1})
    assert sorted(entry["unit"] for entry in registry.listing()) == [
        "a.service", "c.service", "d.service"]
    registry.record(peer("e.service"), "demo", "production", {"DB_URL": 1})
    assert sorted(entry["unit"] for entry in registry.listing()) == [
        "a.service", "d.service", "e.service"]


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "state" / "ov" / consumers_module.FILE_NAME
    registry = Consumers(str(path))
    registry.record(peer("shop.service", uid=1000), "demo", "production", {"DB_URL": 1})
    registry.record(peer("x.service", manager_uid=1000, uid=1000), "demo", "staging",
                    {"API_TOKEN": 3})
    registry.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert saved["format"] == consumers_module.FORMAT
    loaded = Consumers(str(path))
    assert loaded.listing() == registry.listing()
    assert len(loaded.listing()) == 2


def test_save_writes_only_a_changed_registry(tmp_path):
    path = tmp_path / consumers_module.FILE_NAME
    registry = Consumers(str(path))
    registry.save()
    assert not path.exists()                   # nothing recorded: nothing written
    registry.record(peer(), "demo", "production", {"DB_URL": 1})
    registry.save()
    path.unlink()
    registry.save()
    assert not path.exists()                   # unchanged since: not written again
    registry.record(peer(), "demo", "production", {"DB_URL": 2})
    registry.save()
    assert path.exists()


def test_a_registry_in_memory_only_saves_nothing(tmp_path):
    registry = Consumers(None)
    registry.record(peer(), "demo", "production", {"DB_URL": 1})
    registry.save()
    assert registry.listing()


def test_load_keeps_only_the_newest_entries_when_the_bound_shrank(tmp_path, monkeypatch):
    path = tmp_path / consumers_module.FILE_NAME
    registry = Consumers(str(path))
    for name in ("a", "b", "c", "d"):
        registry.record(peer(f"{name}.service"), "demo", "production", {"DB_URL": 1})
    registry.save()
    monkeypatch.setattr(consumers_module, "MAX_ENTRIES", 2)
    assert sorted(entry["unit"] for entry in Consumers(str(path)).listing()) == [
        "c.service", "d.service"]


@pytest.mark.parametrize("content", [
    b"", b"\0\xff garbage", b"{", b"[]", b"{}", b'{"format": 1, "entries": 7}',
    b'{"format": 1, "entries": [["x.service", null, "demo"]]}',
    b'{"format": 1, "entries": [[["x"], null, "demo", "production", {"versions": {}}]]}',
], ids=["empty", "binary", "truncated", "list", "no-entries", "entries-not-a-list",
        "short-entry", "unhashable-key"])
def test_a_corrupt_file_loads_empty(tmp_path, content):
    path = tmp_path / consumers_module.FILE_NAME
    path.write_bytes(content)
    registry = Consumers(str(path))
    assert registry.listing() == []
    registry.record(peer(), "demo", "production", {"DB_URL": 1})   # and works on
    registry.save()
    assert [entry["unit"] for entry in Consumers(str(path)).listing()] == ["shop.service"]


def test_an_entry_without_versions_is_dropped_on_load(tmp_path):
    path = tmp_path / consumers_module.FILE_NAME
    good = {"versions": {"DB_URL": 1}, "cgroup": None, "uid": 0, "seen": 1}
    path.write_text(json.dumps({"format": 1, "entries": [
        ["bad.service", None, "demo", "production", {"versions": ["DB_URL"]}],
        ["good.service", None, "demo", "production", good]]}))
    assert [entry["unit"] for entry in Consumers(str(path)).listing()] == [
        "good.service"]


def test_an_entry_missing_its_other_fields_does_not_break_listing(tmp_path):
    """A saved entry with versions but without uid or seen (another format, a file
    edited by hand): loading it must not make every later listing fail."""
    path = tmp_path / consumers_module.FILE_NAME
    path.write_text(json.dumps({"format": 1, "entries": [
        ["odd.service", None, "demo", "production", {"versions": {"DB_URL": 1}}]]}))
    registry = Consumers(str(path))
    registry.record(peer("good.service"), "demo", "production", {"DB_URL": 1})
    assert "good.service" in [entry["unit"] for entry in registry.listing()]


def test_a_missing_file_loads_empty(tmp_path):
    assert Consumers(str(tmp_path / "nothing" / "here.json")).listing() == []


def test_a_stopped_unit_is_forgotten(tmp_path):
    path = tmp_path / consumers_module.FILE_NAME
    registry = Consumers(str(path))
    gone = "/ov-test-no-such.slice/gone.service"
    registry.record(peer("gone.service", cgroup=gone), "demo", "production", {"DB_URL": 1})
    registry.save()
    registry.forget_stopped()
    assert registry.listing() == []
    registry.save()                            # forgetting changed it: written again
    assert Consumers(str(path)).listing() == []


def own_cgroup2():
    """This process's cgroup2 path when its directory is visible, else None."""
    root = cgroup2_mount()
    if root is None:
        return None
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None or not os.path.isdir(os.path.join(root, path.lstrip("/"))):
        return None
    return path


def test_a_running_unit_is_kept():
    cgroup = own_cgroup2()
    if cgroup is None:
        pytest.skip("no cgroup2 hierarchy with this process's cgroup in it")
    registry = Consumers(None)
    registry.record(peer("running.service", cgroup=cgroup), "demo", "production",
                    {"DB_URL": 1})
    registry.record(peer("gone.service", cgroup="/ov-test-no-such.slice/gone.service"),
                    "demo", "production", {"DB_URL": 1})
    registry.forget_stopped()
    assert [entry["unit"] for entry in registry.listing()] == ["running.service"]


# -- who may list them ----------------------------------------------------------------------


def test_only_root_or_the_agents_own_user_may_list_consumers():
    from ovagent.agent.state import AgentState
    from ovagent.core import protocol

    registry = Consumers(None)
    registry.record(peer("shop.service"), "demo", "production", {"DB_URL": 1})
    registry.record(peer("cart.service"), "demo", "production", {"API_TOKEN": 1})
    state = AgentState(SimpleNamespace(scope=None), all_users=True, consumers=registry)
    req = {"app": "demo", "env": None, "secrets": ["DB_URL"]}
    for uid in {0, os.geteuid()}:
        answer = state.list_consumers(SimpleNamespace(uid=uid), req)
        assert answer["type"] == "consumers"
        assert [entry["unit"] for entry in answer["units"]] == ["shop.service"]
    other = 65534 if os.geteuid() != 65534 else 65533
    with pytest.raises(protocol.ProtocolError) as raised:
        state.list_consumers(SimpleNamespace(uid=other), req)
    assert raised.value.code == protocol.E_PEER


@pytest.mark.parametrize("unit_name", ["session-3.scope", "-Hevil.service",
                                       "a\x1bb.service", "x" * 300 + ".service"])
def test_only_service_names_systemctl_takes_are_recorded(unit_name):
    """A scope cannot be restarted; a name a user chose in their own manager must not
    reach systemctl as an option, nor a terminal as an escape sequence."""
    registry = Consumers(None)
    registry.record(peer(unit_name, manager_uid=1000), "demo", "production", {"A": 1})
    assert registry.listing() == []


def test_a_user_manager_cannot_push_the_systems_units_out(monkeypatch):
    monkeypatch.setattr(consumers_module, "MAX_PER_USER_MANAGER", 3)
    registry = Consumers(None)
    registry.record(peer("system.service"), "demo", "production", {"A": 1})
    for number in range(10):
        registry.record(peer(f"u{number}.service", manager_uid=1000), "demo",
                        "production", {"A": 1})
    units = sorted(entry["unit"] for entry in registry.listing())
    assert units == ["system.service", "u7.service", "u8.service", "u9.service"]


def test_a_systemctl_that_does_not_answer_is_a_failure_not_a_crash(monkeypatch):
    def slow(*args, **kwargs):
        raise rollout.subprocess.TimeoutExpired(args[0], 300)

    monkeypatch.setattr(rollout.subprocess, "run", slow)
    with pytest.raises(rollout.RolloutError, match="shop.service"):
        rollout.apply([{"unit": "shop.service", "user_manager": None, "app": "demo",
                        "env": "production", "versions": {"A": 1}}], "restart",
                      say=lambda line: None)
