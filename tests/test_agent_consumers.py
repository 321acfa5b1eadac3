"""Rolling a changed secret out (issue 17) end to end: real agents, real ``ov run
--agent`` clients put into cgroups named like units (root may create any), ``ov
agent consumers``, and ``ov secret set|app rotate-key --apply`` with a fake
systemctl ($SYSTEMCTL).  The in-process tests are in test_rollout.py.

The test process runs outside any unit here; a client moved into a cgroup
``.../ov-consumers-XXXX.slice/shop.service`` counts as unit shop.service."""

import json
import os
import stat
import subprocess

import pytest

import leaks
from helpers import DEMO_SECRETS, OV, SENTINEL, SETPRIV, needs_setpriv, redact

NEW_VALUE = "postgres://u:rotated-value@db/app"
DENIED_EXIT = 4

FAKE_SYSTEMCTL = """\
#!/bin/sh
echo "$*" >> "$FAKE_SYSTEMCTL_LOG"
for arg; do unit="$arg"; done
if [ -n "$FAKE_SYSTEMCTL_FAIL" ] && [ "$unit" = "$FAKE_SYSTEMCTL_FAIL" ]; then
    echo "Job for $unit failed." >&2
    exit 1
fi
"""


# -- helpers -----------------------------------------------------------------------


def released_in(group, agent, *secrets, env=None):
    """``ov run --agent --secrets NAME... -- true`` from a process moved into cgroup
    *group* first (None: where the test runs, outside any unit)."""
    options = [arg for name in secrets for arg in ("--secrets", name)]
    command = [OV, "run", "--agent", *options, "--socket", str(agent.socket),
               "--machine-key", str(agent.key), "--", "true"]
    if group is not None:
        command = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group),
                   *command]
    result = subprocess.run(command, check=False, capture_output=True, timeout=30,
                            cwd=agent.harness.tmp, env=env or agent.harness.demo.ov.env)
    leaks.watch.saw("the output of a client in a unit", result.stderr + result.stdout)
    assert result.returncode == 0, (result.returncode, redact(result.stderr))


def consumers(agent, *options, check=0):
    """``ov agent consumers OPTIONS``: the lines it printed, sorted."""
    result = agent.harness.demo.ov("agent", "consumers", "--socket", str(agent.socket),
                                   "--machine-key", str(agent.key), *options)
    assert result.returncode == check, (result.returncode, redact(result.err))
    assert SENTINEL not in result.out
    for value in DEMO_SECRETS.values():
        assert not value or value not in result.out
    return sorted(result.out.splitlines())


@pytest.fixture
def systemctl(tmp_path):
    """A fake systemctl: env() is what ov needs to use it (and to reach *agent*),
    calls() the argument lists it was run with."""
    script = tmp_path / "fake-systemctl"
    script.write_text(FAKE_SYSTEMCTL)
    script.chmod(0o755)
    log = tmp_path / "systemctl.log"

    class Fake:
        path = str(script)

        @staticmethod
        def env(agent, fail=""):
            return {"OV_AGENT_SOCK": str(agent.socket), "SYSTEMCTL": str(script),
                    "FAKE_SYSTEMCTL_LOG": str(log), "FAKE_SYSTEMCTL_FAIL": fail}

        @staticmethod
        def calls():
            return [line.split() for line in log.read_text().splitlines()] \
                if log.exists() else []

    return Fake


def set_secret(demo, agent, systemctl, *options, fail="", check=None):
    """``ov secret set DB_URL --app demo --env production OPTIONS`` (new value on
    stdin), asking *agent*, with the fake systemctl."""
    return demo.ov("secret", "set", "DB_URL", "--app", "demo", "--env", "production",
                   "--machine-key", str(demo.key), *options, input=NEW_VALUE,
                   env=systemctl.env(agent, fail), check=check)


def shop_and_cart(agent, unit_cgroup):
    """shop.service received DB_URL (version 1), cart.service API_TOKEN (version 1),
    and a caller outside any unit both."""
    shop, cart = unit_cgroup("shop.service"), unit_cgroup("cart.service")
    released_in(shop, agent, "DB_URL")
    released_in(cart, agent, "API_TOKEN")
    released_in(None, agent, "DB_URL", "API_TOKEN")
    return shop, cart


SHOP = "shop.service (demo/production: DB_URL=1)"
CART = "cart.service (demo/production: API_TOKEN=1)"


# -- ov agent consumers ----------------------------------------------------------------


def test_units_that_received_secrets_are_listed_with_versions(agent, unit_cgroup):
    shop_and_cart(agent, unit_cgroup)
    assert consumers(agent) == [CART, SHOP]       # the caller outside a unit: not there
    assert consumers(agent, "--secret", "DB_URL") == [SHOP]
    assert consumers(agent, "--secret", "EMPTY") == []
    assert consumers(agent, "--app", "demo", "--env", "production") == [CART, SHOP]
    assert consumers(agent, "--env", "staging") == []
    assert consumers(agent, "--app", "other") == []
    # A unit that asks for more: one entry, every version it holds.
    released_in(unit_cgroup("shop.service"), agent, "API_TOKEN")
    assert consumers(agent, "--secret", "API_TOKEN") == [
        CART, "shop.service (demo/production: API_TOKEN=1)"]
    assert consumers(agent) == [CART, "shop.service (demo/production: API_TOKEN=1,"
                                      "DB_URL=1)"]


def test_a_spawned_command_in_a_unit_is_listed(agent, unit_cgroup):
    group = unit_cgroup("spawned.service")
    command = [OV, "run", "--agent", "--spawn", "--secrets", "DB_URL", "--socket",
               str(agent.socket), "--machine-key", str(agent.key), "--", "true"]
    result = subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"',
                             str(group), *command], check=False, capture_output=True,
                            timeout=30, cwd=agent.harness.tmp,
                            env=agent.harness.demo.ov.env)
    assert result.returncode == 0, redact(result.stderr)
    assert consumers(agent) == ["spawned.service (demo/production: DB_URL=1)"]


def test_a_caller_outside_any_unit_is_not_listed(agent):
    released_in(None, agent, "DB_URL")
    assert consumers(agent) == []


# -- ov secret set --apply --------------------------------------------------------------


def test_without_apply_the_units_and_the_command_are_named(demo, agent, unit_cgroup,
                                                           systemctl):
    shop_and_cart(agent, unit_cgroup)
    for options in ((), ("--apply", "none")):
        result = set_secret(demo, agent, systemctl, *options, check=0)
        version = 2 if not options else 3
        assert result.out.splitlines() == [
            f"Set DB_URL in demo/production (version {version})",
            f"still holds an older version: {SHOP}; {systemctl.path} try-restart "
            "shop.service"], result.out
    assert systemctl.calls() == []
    # The registry says what the unit holds: still the old version.
    assert consumers(agent) == [CART, SHOP]
    # A unit that receives it now holds the new one, and needs nothing.
    released_in(unit_cgroup("fresh.service"), agent, "DB_URL")
    assert "fresh.service (demo/production: DB_URL=3)" in consumers(agent)


def test_apply_restart_acts_on_the_units_holding_the_old_version(demo, agent,
                                                                  unit_cgroup, systemctl):
    shop_and_cart(agent, unit_cgroup)
    result = set_secret(demo, agent, systemctl, "--apply", "restart", check=0)
    assert systemctl.calls() == [["try-restart", "shop.service"]]
    assert result.out.splitlines() == [
        "Set DB_URL in demo/production (version 2)", f"restart {SHOP}: ok"], result.out
    assert result.err == ""


def test_apply_reload_uses_try_reload_or_restart(demo, agent, unit_cgroup, systemctl):
    shop_and_cart(agent, unit_cgroup)
    released_in(unit_cgroup("other.service"), agent, "DB_URL")
    result = set_secret(demo, agent, systemctl, "--apply", "reload", "--splay", "0.1",
                        check=0)
    assert sorted(systemctl.calls()) == [["try-reload-or-restart", "other.service"],
                                         ["try-reload-or-restart", "shop.service"]]
    assert f"reload {SHOP}: ok" in result.out.splitlines()


def test_no_unit_holding_an_older_version_is_said(demo, agent, unit_cgroup, systemctl):
    released_in(unit_cgroup("cart.service"), agent, "API_TOKEN")
    result = set_secret(demo, agent, systemctl, "--apply", "restart", check=0)
    assert result.out.splitlines()[1:] == ["No running unit holds an older version"]
    assert systemctl.calls() == []


def test_a_unit_systemd_fails_on_is_an_error_after_the_secret_is_stored(
        demo, agent, unit_cgroup, systemctl):
    shop_and_cart(agent, unit_cgroup)
    result = set_secret(demo, agent, systemctl, "--apply", "restart", fail="shop.service")
    assert result.returncode != 0, result.out
    assert result.out.splitlines()[0] == "Set DB_URL in demo/production (version 2)"
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ov: "), result.err
    assert "shop.service" in lines[0] and "Traceback" not in result.err
    assert systemctl.calls() == [["try-restart", "shop.service"]]


def test_apply_without_a_reachable_agent_is_an_error(demo, tmp_path, systemctl):
    class Nowhere:
        socket = tmp_path / "no-agent.sock"
    result = set_secret(demo, Nowhere, systemctl, "--apply", "restart")
    assert result.returncode != 0
    assert result.out.startswith("Set DB_URL in demo/production (version 2)")
    assert "cannot ask the agent which units to restart" in result.err, result.err
    # Without --apply, an agent that cannot be asked is no error.
    result = set_secret(demo, Nowhere, systemctl, check=0)
    assert result.out.splitlines() == ["Set DB_URL in demo/production (version 3)"]
    assert systemctl.calls() == []


def test_rotate_key_apply_restarts_every_unit_of_the_app(demo, agent, unit_cgroup,
                                                         systemctl):
    shop_and_cart(agent, unit_cgroup)
    result = demo.ov("app", "rotate-key", "demo", "--machine-key", str(demo.key),
                     "--apply", "restart", env=systemctl.env(agent), check=0)
    assert sorted(systemctl.calls()) == [["try-restart", "cart.service"],
                                         ["try-restart", "shop.service"]], result.out


# -- the registry across agent restarts ---------------------------------------------------


def test_the_registry_survives_a_restart_and_forgets_stopped_units(agents, unit_cgroup,
                                                                    tmp_path):
    first = agents.start()          # its state directory: the harness's, per test
    shop, _ = shop_and_cart(first, unit_cgroup)
    assert first.terminate() == 0
    saved = agents.state / "consumers.json"
    assert saved.exists()
    leaks.watch.watch_file("the registry of consumers", saved)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert SENTINEL not in saved.read_text()
    units = sorted(entry[0] for entry in json.loads(saved.read_text())["entries"])
    assert units == ["cart.service", "shop.service"]

    second = agents.start()
    assert consumers(second) == [CART, SHOP]
    unit_cgroup.remove(shop)                 # shop.service stopped
    assert consumers(second) == [CART]
    assert second.terminate() == 0
    units = sorted(entry[0] for entry in json.loads(saved.read_text())["entries"])
    assert units == ["cart.service"]


# -- who may ask ---------------------------------------------------------------------------


@needs_setpriv
def test_another_uid_may_not_list_a_system_agents_consumers(agents, demo, shared_place,
                                                            tmp_path, unit_cgroup):
    base, key = shared_place
    os.chown(key, 65534, 65534)
    state = tmp_path / "state"
    agent = agents.start_shared(base, env={"STATE_DIRECTORY": str(state)})
    released_in(unit_cgroup("shop.service"), agent, "DB_URL")
    assert consumers(agent) == [SHOP]                   # root may

    result = subprocess.run(
        [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", OV, "agent",
         "consumers", "--socket", str(agent.socket), "--machine-key", str(key)],
        check=False, capture_output=True, timeout=30, cwd=base,
        env=dict(demo.ov.env, HOME=str(base)))
    err = result.stderr.decode(errors="replace")
    assert result.returncode == DENIED_EXIT, (result.returncode, redact(err))
    assert result.stdout == b"" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ov: "), redact(err)
    assert "[peer-refused]" in lines[0], lines[0]
    assert "shop.service" not in err


@pytest.mark.parametrize("splay", ["-1", "nan", "inf"])
def test_an_invalid_splay_is_a_usage_error_not_a_traceback(demo, agent, unit_cgroup,
                                                           systemctl, splay):
    shop_and_cart(agent, unit_cgroup)
    released_in(unit_cgroup("other.service"), agent, "DB_URL")
    result = set_secret(demo, agent, systemctl, "--apply", "restart", "--splay", splay)
    assert "Traceback" not in result.err, redact(result.err)
    assert result.returncode == 2, (result.returncode, redact(result.err))
    lines = result.err.splitlines()
    assert len(lines) == 1 and "splay" in lines[0], redact(result.err)
    assert systemctl.calls() == []            # no unit acted on with a bad splay


def test_without_apply_the_policys_on_change_decides(agents, demo, systemctl,
                                                     unit_cgroup):
    """The agent's policy gives shop.service on_change = "restart": a change of
    DB_URL restarts it without --apply; --apply none still only names it."""
    directory = demo.ov.env["XDG_CONFIG_HOME"] + "/ov/policy.d"
    os.makedirs(directory, mode=0o700)
    with open(f"{directory}/10-shop.toml", "w") as handle:
        handle.write('[[allow]]\nunit = "shop.service"\nuser = "root"\napp = "demo"\n'
                     'secrets = "DB_URL"\non_change = "restart"\n')
    agent = agents.start()
    released_in(unit_cgroup("shop.service"), agent, "DB_URL")
    result = set_secret(demo, agent, systemctl, check=0)
    assert "restart shop.service" in result.out, result.out
    assert systemctl.calls() == [["try-restart", "shop.service"]]
    released_in(unit_cgroup("shop.service"), agent, "DB_URL")
    result = set_secret(demo, agent, systemctl, "--apply", "none", check=0)
    assert "still holds an older version: shop.service" in result.out, result.out
    assert len(systemctl.calls()) == 1
