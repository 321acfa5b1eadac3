"""Per-caller policy (issue 15, ov-agent(8) POLICY) end to end: real agents started
with ``--policy-dir``, real ``ov run --agent`` clients (in place and ``--spawn``, as
root and as uid 65534), SIGHUP reloads, and ``ov agent policy check|show``.  The
unit tests of the matching itself are in test_policy.py.

The test process runs outside any systemd unit here (its cgroup is the root), so a
caller's unit is "none": most rules below name users (and ``unit = "*"``, which
matches any unit or none).  Units are tested by putting a client into a cgroup
named like one (root may create any), system units and units of a user's manager
(user@UID.service/...) alike."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import (DEMO_SECRETS, OV, SETPRIV, PROBE, answer, descriptor_count,
                     needs_setpriv, protocol, redact, sha256, signed, wait_for)

DIGESTS = {name: sha256(value) for name, value in DEMO_SECRETS.items()}
DENIED_EXIT = 4
MARKER = ("sh", "-c", 'touch "$0"')

ALLOW_ROOT = """\
[[allow]]
user    = "root"
app     = "demo"
env     = ["production"]
secrets = ["{}"]
"""
ALLOW_ROOT_DB_URL = ALLOW_ROOT.format("DB_URL")
ALLOW_ROOT_API_TOKEN = ALLOW_ROOT.format("API_TOKEN")

ALLOW_ROOT_ALL = """\
[[allow]]
user    = "root"
app     = "demo"
secrets = "*"
"""

DENY_DB_URL = """\
[[deny]]
unit    = "*"
app     = "demo"
secrets = ["DB_URL"]
"""


# -- helpers -----------------------------------------------------------------------


def write_policy(directory, files, mode=0o700):
    """A policy directory holding *files* (name -> TOML text), owned by root."""
    directory.mkdir(mode=mode, exist_ok=True)
    os.chmod(directory, mode)
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        os.chmod(path, 0o644)
    return directory


def records(agent, kind):
    """The agent's audit lines of one kind (``ov-agent[PID]: KIND: ...``)."""
    return [line for line in agent.log().splitlines() if f"]: {kind}: " in line]


def wait_record(agent, kind, *fragments, count=1):
    """Wait for *count* audit lines of *kind* holding every fragment; return them."""
    def found():
        lines = [line for line in records(agent, kind)
                 if all(fragment in line for fragment in fragments)]
        return lines if len(lines) >= count else None
    return wait_for(found, f"{count} '{kind}' record(s) with {fragments} in the agent's "
                           "log")


def seen(agent, *options, spawn=False):
    """Run PROBE through the agent; return the names -> digests it saw, of the demo
    secrets only (the rest of its environment is the client's)."""
    result = agent.run(sys.executable, "-c", PROBE,
                       options=[*(["--spawn"] if spawn else []), *options])
    assert result.returncode == 0, (result.returncode, redact(result.err))
    environ = json.loads(result.out)["env"]
    return {name: digest for name, digest in environ.items() if name in DEMO_SECRETS}


def refused(agent, marker, *options, spawn=False):
    """Run a command that would create *marker*; check it is refused by the policy
    (exit 4, one line naming the policy) and never ran.  Returns the error line."""
    result = agent.run(*MARKER, str(marker),
                       options=[*(["--spawn"] if spawn else []), *options])
    assert result.returncode == DENIED_EXIT, (result.returncode, redact(result.err))
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ov: "), redact(result.err)
    assert "policy" in lines[0] and "[policy-denied]" in lines[0], redact(lines[0])
    assert not marker.exists(), "a request the policy refused ran its command"
    return lines[0]


def policy_line(agent):
    result = agent.status()
    assert result.returncode == 0, redact(result.err)
    return next(line for line in result.out.splitlines() if line.startswith("policy:"))


# -- no policy files: policy off ----------------------------------------------------


@pytest.mark.parametrize("exists", [False, True], ids=["no-directory", "empty-directory"])
def test_without_policy_files_the_agent_serves_as_before(agents, tmp_path, exists):
    """The default directory ($XDG_CONFIG_HOME/ov/policy.d) absent, or a named one
    holding no policy file."""
    options = ()
    if exists:
        directory = write_policy(tmp_path / "policy.d", {
            "README": "not a policy file", ".hidden.toml": "x ="})
        options = ("--policy-dir", str(directory))
    agent = agents.start(*options)
    started = wait_record(agent, "started", "policy: off")
    assert "policy=off" in started[0], started
    assert policy_line(agent) == "policy: off"
    assert seen(agent) == DIGESTS
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    released = wait_record(agent, "released", count=2)
    assert all("policy_rule=policy off" in line for line in released), released
    assert not records(agent, "policy-invalid")


def test_a_named_policy_directory_that_is_missing_denies_every_request(agents, tmp_path):
    """--policy-dir names a directory that is not there (a typo, or one the agent's
    sandbox hides): not 'policy off' but an invalid policy."""
    agent = agents.start("--policy-dir", str(tmp_path / "typo.d"))
    invalid = wait_record(agent, "policy-invalid", "no policy directory")
    assert "denying every request" in invalid[0], invalid
    refused(agent, tmp_path / "ran", "--secrets", "DB_URL")


# -- a policy for root ------------------------------------------------------------------


def test_an_allowed_secret_is_released_and_every_other_refused(agents, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    started = wait_record(agent, "started", "policy: enforcing, 1 rule(s) from 1 file(s)")
    assert str(directory) in started[0]
    loaded = wait_record(agent, "policy-loaded")
    digest = hashlib.sha256(ALLOW_ROOT_DB_URL.encode()).hexdigest()
    assert f"10-demo.toml:sha256={digest}:rules=1" in loaded[0], loaded
    assert policy_line(agent) == (f"policy: enforcing, 1 rule(s) from 1 file(s) in "
                                  f"{directory}")

    # The allowed secret, asked for by name.
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    released = wait_record(agent, "released")
    assert "policy_rule=10-demo.toml:allow#1" in released[0], released

    # Another one, alone or with the allowed one: refused whole, nothing runs.
    marker = tmp_path / "ran"
    line = refused(agent, marker, "--secrets", "API_TOKEN")
    assert "API_TOKEN" in line
    denied = wait_record(agent, "denied", "code=policy-denied")
    assert "policy_rule=no rule for unit=none uid=0 allows API_TOKEN of demo/production" \
        in denied[0], denied
    refused(agent, marker, "--secrets", "DB_URL,API_TOKEN")
    wait_record(agent, "denied", "code=policy-denied", count=2)

    # A request naming none gets exactly the allowed set.
    assert seen(agent) == {"DB_URL": DIGESTS["DB_URL"]}
    released = wait_record(agent, "released", count=2)
    assert "policy_rule=10-demo.toml:allow#1" in released[1], released
    assert "secrets=['DB_URL']" in released[1] or "secrets=DB_URL" in released[1], \
        released[1]

    # Another app or env of the same vault: no rule speaks of it.
    refused(agent, marker, "--env", "staging", "--secrets", "DB_URL")
    assert len(records(agent, "released")) == 2


def test_a_caller_no_rule_speaks_of_learns_nothing_of_the_vault(agents, tmp_path):
    """A request is served only if the policy allows it, otherwise refused whole with
    policy-denied: a caller without any rule for an app/env gets the same answer
    whether that app/env exists or not (no probing the vault's names with a stolen
    key), with or without --secrets."""
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    marker = tmp_path / "ran"
    for options in (["--env", "staging"], ["--app", "nope"],
                    ["--env", "staging", "--secrets", "DB_URL"],
                    ["--app", "nope", "--secrets", "DB_URL"]):
        refused(agent, marker, *options)
        refused(agent, marker, *options, spawn=True)
    assert not records(agent, "released") and not records(agent, "accepted")


def test_a_caller_that_exited_before_the_agent_saw_it_is_refused(agents, key, tmp_path):
    """A key holder in a unit a deny rule names connects from a child that exits
    before the agent reads its cgroup, and finishes the request from the parent: its
    unit is unknown, not "none", and an enforcing policy refuses it (a rule naming
    only its user would otherwise allow it, and the deny rule miss it)."""
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": """\
[[allow]]
user = "root"
app = "demo"

[[deny]]
unit = "web.service"
app = "demo"
secrets = "DB_URL"
"""})
    agent = agents.start("--policy-dir", str(directory))
    wait_record(agent, "policy-loaded", "1 file(s)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.kill(agent.pid, signal.SIGSTOP)         # the agent accepts only once it is gone
    try:
        child = os.fork()
        if child == 0:
            try:
                sock.connect(str(agent.socket))
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    with sock:
        sock.settimeout(5.0)
        hello = answer(sock)
        sock.sendall(protocol.encode_frame(signed(key, hello["challenge"], op="release",
                                                  app="demo", env="production",
                                                  secrets=["DB_URL"])))
        reply = answer(sock)
    assert reply["type"] == "error" and reply["code"] == protocol.E_POLICY, reply
    denied = wait_record(agent, "denied", "code=policy-denied")
    assert "exited before the agent could tell its unit" in denied[0], denied
    assert not records(agent, "released")


def test_deny_beats_allow_across_files(agents, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-allow.toml": ALLOW_ROOT_ALL,
                                                     "20-deny.toml": DENY_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    wait_record(agent, "started", "policy: enforcing, 2 rule(s) from 2 file(s)")
    marker = tmp_path / "ran"
    refused(agent, marker, "--secrets", "DB_URL")
    denied = wait_record(agent, "denied", "code=policy-denied")
    assert "policy_rule=20-deny.toml:deny#1" in denied[0], denied
    refused(agent, marker, "--secrets", "API_TOKEN,DB_URL")
    # Everything else the allow covers; a request naming none gets all but DB_URL.
    assert seen(agent, "--secrets", "API_TOKEN") == {"API_TOKEN": DIGESTS["API_TOKEN"]}
    expected = {name: digest for name, digest in DIGESTS.items() if name != "DB_URL"}
    assert seen(agent) == expected
    released = wait_record(agent, "released", count=2)
    assert all("policy_rule=10-allow.toml:allow#1" in line for line in released), released


@pytest.mark.parametrize("identity", ['group = "root"', 'unit = "*"\ngroup = "root"',
                                      'group = 0'], ids=["group-root", "any-unit", "gid-0"])
def test_root_must_be_named_to_be_allowed(agents, tmp_path, identity):
    """A rule that speaks of root only through its group, or of any unit, does not
    allow uid 0; the same rule naming the user does."""
    text = f"[[allow]]\n{identity}\napp = \"demo\"\nsecrets = [\"DB_URL\"]\n"
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": text})
    agent = agents.start("--policy-dir", str(directory))
    marker = tmp_path / "ran"
    refused(agent, marker, "--secrets", "DB_URL")
    refused(agent, marker)
    denied = wait_record(agent, "denied", "code=policy-denied", count=2)
    assert "policy_rule=no rule for unit=none uid=0" in denied[0], denied
    assert not records(agent, "released")
    # Named (by uid, in a second rule): allowed.
    (directory / "10-demo.toml").write_text(
        text + "\n[[allow]]\nuser = 0\napp = \"demo\"\nsecrets = [\"DB_URL\"]\n")
    os.kill(agent.pid, signal.SIGHUP)
    wait_record(agent, "policy-loaded", "2 rule(s)")
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    released = wait_record(agent, "released")
    assert "policy_rule=10-demo.toml:allow#2" in released[0], released


# -- another uid, against the system agent ----------------------------------------------


def as_nobody(agent, key, base, env, *command, options=()):
    return subprocess.run(
        [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", OV, "run",
         "--agent", *options, "--socket", str(agent.socket), "--machine-key", str(key),
         "--", *command],
        check=False, capture_output=True, timeout=30, cwd=base, env=env)


@needs_setpriv
def test_a_system_agents_policy_tells_uids_apart(agents, demo, shared_place, tmp_path):
    """uid 65534 (user = "nobody") may receive API_TOKEN; root, with no rule, nothing;
    then the other way round after a reload."""
    base, key = shared_place
    os.chown(key, 65534, 65534)
    directory = write_policy(tmp_path / "policy.d", {"50-nobody.toml": """\
[[allow]]
user    = "nobody"
app     = "demo"
env     = "production"
secrets = ["API_TOKEN"]
"""})
    agent = agents.start_shared(base, "--policy-dir", str(directory))
    (base / "out").mkdir(mode=0o777)
    os.chmod(base / "out", 0o777)
    env = dict(demo.ov.env, HOME=str(base))
    token = ("sh", "-c", 'id -u; printf %s "$API_TOKEN" | sha256sum; '
                         'printf %s "${DB_URL-unset}"| sha256sum')

    result = as_nobody(agent, key, base, env, *token)
    assert result.returncode == 0, redact(result.stderr)
    uid, got_token, got_db = result.stdout.decode().splitlines()
    assert uid == "65534"
    assert got_token.split()[0] == DIGESTS["API_TOKEN"]
    assert got_db.split()[0] == sha256("unset")        # exactly the allowed set
    released = wait_record(agent, "released", "peer_uid=65534")
    assert "policy_rule=50-nobody.toml:allow#1" in released[0], released
    marker = base / "out" / "ran"
    result = as_nobody(agent, key, base, env, *MARKER, str(marker),
                       options=["--secrets", "DB_URL"])
    assert result.returncode == DENIED_EXIT, redact(result.stderr)
    assert b"policy" in result.stderr and not marker.exists()
    denied = wait_record(agent, "denied", "code=policy-denied", "peer_uid=65534")
    assert "policy_rule=no rule for unit=none uid=65534 allows DB_URL" in denied[0]

    # Root: no rule names it.
    refused(agent, marker, "--secrets", "API_TOKEN")
    denied = wait_record(agent, "denied", "code=policy-denied", "peer_uid=0")
    assert "policy_rule=no rule for unit=none uid=0 allows demo/production" in denied[0]

    # Vice versa: root allowed, nobody denied by name.
    (directory / "50-nobody.toml").write_text(ALLOW_ROOT_API_TOKEN + """
[[deny]]
user    = 65534
secrets = "*"
""")
    os.kill(agent.pid, signal.SIGHUP)
    wait_record(agent, "policy-loaded", count=2)
    assert seen(agent, "--secrets", "API_TOKEN") == {"API_TOKEN": DIGESTS["API_TOKEN"]}
    result = as_nobody(agent, key, base, env, *MARKER, str(marker))
    assert result.returncode == DENIED_EXIT, redact(result.stderr)
    assert not marker.exists()


# -- --spawn ---------------------------------------------------------------------------


def test_spawn_is_subject_to_the_policy(agents, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    assert seen(agent, "--secrets", "DB_URL", spawn=True) == {"DB_URL": DIGESTS["DB_URL"]}
    assert seen(agent, spawn=True) == {"DB_URL": DIGESTS["DB_URL"]}
    accepted = wait_record(agent, "accepted", count=2)
    assert all("policy_rule=10-demo.toml:allow#1" in line for line in accepted), accepted
    marker = tmp_path / "ran"
    refused(agent, marker, "--secrets", "API_TOKEN", spawn=True)
    denied = wait_record(agent, "denied", "code=policy-denied")
    assert "policy_rule=no rule for unit=none uid=0 allows API_TOKEN" in denied[0]
    assert len(records(agent, "accepted")) == 2, "a refused spawn was accepted"


# -- an invalid policy at start: fail closed ------------------------------------------------


def _unknown_key(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL + 'colour = "blue"\n'})
    return "unknown key 'colour'"


def _writable_by_others(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL})
    os.chmod(directory / "10-demo.toml", 0o666)
    return "writable by group or others"


def _owned_by_another_uid(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL})
    os.chown(directory / "10-demo.toml", 65534, 65534)
    return "owned by uid 65534"


def _open_directory(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL}, mode=0o777)
    return "writable by group or others"


def _no_identity(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL,
                             "20-bad.toml": '[[allow]]\napp = "demo"\n'})
    return "names no unit, user or group"


def _not_toml(directory):
    write_policy(directory, {"10-demo.toml": "[[allow]\nuser = root\n"})
    return "10-demo.toml"


def _symlink(directory):
    write_policy(directory, {"real.txt": ALLOW_ROOT_DB_URL})
    os.symlink(directory / "real.txt", directory / "10-demo.toml")
    return "symbolic link"


def _parent_writable_by_others(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL})
    os.chmod(directory.parent, 0o777)                # not sticky
    return "writable by group or others"


def _too_large(directory):
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL + "#" * (300 * 1024)})
    return "larger than"


INVALID = {"unknown-key": _unknown_key, "parent-0777": _parent_writable_by_others,
           "too-large": _too_large, "file-0666": _writable_by_others,
           "owned-by-65534": _owned_by_another_uid, "directory-0777": _open_directory,
           "no-identity": _no_identity, "not-toml": _not_toml, "symlink": _symlink}


@pytest.mark.parametrize("kind", INVALID)
def test_an_invalid_policy_at_start_denies_every_request(agents, demo, tmp_path, kind):
    (tmp_path / "etc").mkdir(mode=0o755)
    directory = tmp_path / "etc" / "policy.d"
    reason = INVALID[kind](directory)
    agent = agents.start("--policy-dir", str(directory))
    invalid = wait_record(agent, "policy-invalid", reason)
    assert "denying every request" in invalid[0], invalid
    wait_record(agent, "started", "policy: enforcing, 0 rule(s)")
    assert policy_line(agent).startswith("policy: enforcing, 0 rule(s)")
    marker = tmp_path / "ran"
    refused(agent, marker, "--secrets", "DB_URL")
    refused(agent, marker)
    refused(agent, marker, "--secrets", "DB_URL", spawn=True)
    assert not records(agent, "released") and not records(agent, "accepted")
    assert len(records(agent, "denied")) == 3
    # ov agent policy show refuses it the same way: one line, exit 2.
    result = demo.ov("agent", "policy", "show", "--policy-dir", str(directory))
    assert result.returncode == 2, (result.returncode, result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ov: ") and reason in lines[0], \
        result.err


def test_a_sticky_world_writable_directory_above_is_accepted(agents, tmp_path):
    """As /tmp: a directory above the policy's may be writable by others if sticky."""
    (tmp_path / "tmp").mkdir()
    os.chmod(tmp_path / "tmp", 0o1777)
    directory = write_policy(tmp_path / "tmp" / "policy.d",
                             {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    wait_record(agent, "policy-loaded", "10-demo.toml:sha256=")
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}


def test_a_policy_fixed_after_an_invalid_start_is_loaded_on_sighup(agents, tmp_path):
    directory = tmp_path / "policy.d"
    _unknown_key(directory)
    agent = agents.start("--policy-dir", str(directory))
    wait_record(agent, "policy-invalid", "unknown key")
    marker = tmp_path / "ran"
    refused(agent, marker, "--secrets", "DB_URL")
    write_policy(directory, {"10-demo.toml": ALLOW_ROOT_DB_URL})
    os.kill(agent.pid, signal.SIGHUP)
    wait_record(agent, "policy-loaded", "10-demo.toml:sha256=")
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    assert agent.proc.poll() is None


def test_a_detached_agent_reads_a_relative_policy_dir_from_where_it_started(
        agents, demo, tmp_path):
    """ov agent start (detached) --policy-dir policy.d: the directory is the one
    beside where it was started, at start and on every reload, however the agent
    moves itself once in the background."""
    write_policy(tmp_path / "policy.d", {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", "policy.d", foreground=False, wait=False,
                         cwd=tmp_path)
    assert agent.proc.wait(20) == 0, redact(agent.log())
    pid = agents.detached_pid(agent.pid_file)
    assert policy_line(agent) == (f"policy: enforcing, 1 rule(s) from 1 file(s) in "
                                  f"{tmp_path / 'policy.d'}")
    marker = tmp_path / "ran"
    refused(agent, marker, "--secrets", "API_TOKEN")
    os.kill(pid, signal.SIGHUP)                     # (its audit goes to /dev/null)
    refused(agent, marker, "--secrets", "API_TOKEN")
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    assert demo.ov("agent", "stop", "--pid-file", str(agent.pid_file)).returncode == 0


def test_enforce_without_policy_files_denies_everything(agents, tmp_path):
    directory = tmp_path / "policy.d"
    agent = agents.start("--policy-dir", str(directory), "--policy", "enforce")
    wait_record(agent, "started", "policy: enforcing, 0 rule(s) from 0 file(s)")
    assert policy_line(agent) == (f"policy: enforcing, 0 rule(s) from 0 file(s) in "
                                  f"{directory}")
    marker = tmp_path / "ran"
    refused(agent, marker)
    refused(agent, marker, "--secrets", "DB_URL")
    refused(agent, marker, spawn=True)
    denied = wait_record(agent, "denied", "code=policy-denied", count=3)
    assert "policy_rule=no rule for unit=none uid=0 allows demo/production" in denied[0]
    assert not records(agent, "released") and not records(agent, "accepted")


# -- reload on SIGHUP -----------------------------------------------------------------------


def test_sighup_reloads_and_an_invalid_reload_keeps_the_previous_policy(agents, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    marker = tmp_path / "ran"
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    refused(agent, marker, "--secrets", "API_TOKEN")

    # A valid new policy decides the next request; the same process.
    new = (directory / "10-demo.toml.new")
    new.write_text(ALLOW_ROOT_API_TOKEN)
    os.chmod(new, 0o644)
    os.rename(new, directory / "10-demo.toml")
    os.kill(agent.pid, signal.SIGHUP)
    digest = hashlib.sha256(ALLOW_ROOT_API_TOKEN.encode()).hexdigest()
    wait_record(agent, "policy-loaded", f"10-demo.toml:sha256={digest}")
    assert agent.proc.poll() is None
    assert seen(agent, "--secrets", "API_TOKEN") == {"API_TOKEN": DIGESTS["API_TOKEN"]}
    assert seen(agent) == {"API_TOKEN": DIGESTS["API_TOKEN"]}
    refused(agent, marker, "--secrets", "DB_URL")
    released = records(agent, "released")
    assert "policy_rule=10-demo.toml:allow#1" in released[-1]

    # An invalid one is refused and recorded; the previous policy keeps deciding.
    (directory / "20-broken.toml").write_text('[[allow]]\nuser = "root"\nsecret = "x"\n')
    os.chmod(directory / "20-broken.toml", 0o644)
    os.kill(agent.pid, signal.SIGHUP)
    invalid = wait_record(agent, "policy-invalid", "unknown key 'secret'")
    assert "keeping the previous policy" in invalid[0], invalid
    assert agent.proc.poll() is None
    assert seen(agent, "--secrets", "API_TOKEN") == {"API_TOKEN": DIGESTS["API_TOKEN"]}
    refused(agent, marker, "--secrets", "DB_URL")
    assert policy_line(agent) == (f"policy: enforcing, 1 rule(s) from 1 file(s) in "
                                  f"{directory}")

    # Removing every file: policy off again (auto), on the next HUP.
    for path in directory.iterdir():
        path.unlink()
    os.kill(agent.pid, signal.SIGHUP)
    wait_record(agent, "policy-loaded", "policy off")
    assert seen(agent) == DIGESTS
    assert agent.proc.poll() is None
    assert len(records(agent, "started")) == 1 and len(records(agent, "ready")) == 1


def test_ten_sighups_in_a_row_are_harmless(agents, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-demo.toml": ALLOW_ROOT_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    baseline = descriptor_count(agent.pid)
    for _ in range(10):
        os.kill(agent.pid, signal.SIGHUP)
    wait_record(agent, "policy-loaded", count=2)
    for _ in range(3):
        assert seen(agent, "--secrets", "DB_URL") == {"DB_URL": DIGESTS["DB_URL"]}
    assert agent.proc.poll() is None
    loaded = records(agent, "policy-loaded")
    assert 2 <= len(loaded) <= 11, loaded
    assert not records(agent, "policy-invalid") and not records(agent, "stopping")
    wait_for(lambda: descriptor_count(agent.pid) <= baseline,
             f"the agent's descriptors to return to {baseline}")
    assert policy_line(agent).startswith("policy: enforcing, 1 rule(s)")


# -- ov agent policy check | show -------------------------------------------------------


POLICY_FOR_CHECK = """\
[[allow]]
unit    = "x.service"
user    = "root"
app     = "demo"
env     = "production"
secrets = ["DB_URL", "API_TOKEN"]

[[deny]]
unit    = "*"
app     = "demo"
secrets = ["API_TOKEN"]
"""


def test_policy_check_says_allow_or_deny_and_which_rule(demo, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-x.toml": POLICY_FOR_CHECK})

    def check(*options):
        return demo.ov("agent", "policy", "check", "--policy-dir", str(directory),
                       "--user", "root", "--app", "demo", "--env", "production",
                       *options)

    result = check("--unit", "x.service", "--secrets", "DB_URL")
    assert result.returncode == 0, (result.out, result.err)
    assert result.out.startswith("ALLOW ") and "10-x.toml:allow#1" in result.out, result.out
    result = check("--unit", "x.service", "--secrets", "DB_URL,API_TOKEN")
    assert result.returncode == DENIED_EXIT, (result.out, result.err)
    assert result.out.startswith("DENY") and "10-x.toml:deny#1" in result.out, result.out
    result = check("--unit", "y.service", "--secrets", "DB_URL")
    assert result.returncode == DENIED_EXIT, (result.out, result.err)
    assert result.out.startswith("DENY: no rule for unit=y.service uid=0"), result.out
    result = check("--secrets", "DB_URL")                       # no unit
    assert result.returncode == DENIED_EXIT, (result.out, result.err)
    # No --secrets: which may it get?
    result = check("--unit", "x.service")
    assert result.returncode == 0, (result.out, result.err)
    assert result.out.startswith("ALLOW ") and "10-x.toml:allow#1" in result.out
    assert "except API_TOKEN (10-x.toml:deny#1)" in result.out, result.out
    # Without policy files (the default directory, absent): policy off, allowed;
    # with --policy enforce, denied.  A directory named but missing: an error.
    ask = ("agent", "policy", "check", "--user", "root", "--app", "demo", "--env",
           "production", "--secrets", "DB_URL")
    result = demo.ov(*ask)
    assert result.returncode == 0 and result.out.startswith("ALLOW "), result.out
    result = demo.ov(*ask, "--policy", "enforce")
    assert result.returncode == DENIED_EXIT, (result.out, result.err)
    result = demo.ov(*ask, "--policy-dir", str(tmp_path / "none"))
    assert result.returncode == 2 and "no policy directory" in result.err, result.err
    # A unit of a user's own manager: only a rule naming that user counts.
    result = check("--unit", "user@0.service/x.service", "--secrets", "DB_URL")
    assert result.returncode == 0 and result.out.startswith("ALLOW "), result.out
    # An unknown user is a usage error, one line.
    result = check("--user", "no-such-user-here", "--secrets", "DB_URL")
    assert result.returncode == 2 and "Traceback" not in result.err, result.err


def test_policy_check_for_other_users_and_groups(demo, tmp_path):
    directory = write_policy(tmp_path / "policy.d", {"10-x.toml": """\
[[allow]]
unit    = "x.service"
app     = "demo"
secrets = ["DB_URL"]

[[allow]]
group   = "nogroup"
app     = "demo"
secrets = ["EMPTY"]
"""})

    def check(*options):
        return demo.ov("agent", "policy", "check", "--policy-dir", str(directory),
                       "--app", "demo", "--env", "production", *options)

    result = check("--user", "nobody", "--unit", "x.service", "--secrets", "DB_URL")
    assert result.returncode == 0, (result.out, result.err)
    assert "10-x.toml:allow#1" in result.out, result.out
    # Forged under its own user manager: the rule does not name the user.
    result = check("--user", "nobody", "--unit", "user@65534.service/x.service",
                   "--secrets", "DB_URL")
    assert result.returncode == DENIED_EXIT and result.out.startswith("DENY"), result.out
    # By group: nobody's own (from the group database), or a given list.
    result = check("--user", "nobody", "--secrets", "EMPTY")
    assert result.returncode == 0 and "10-x.toml:allow#2" in result.out, result.out
    result = check("--user", "65534", "--group", "65534", "--secrets", "EMPTY")
    assert result.returncode == 0 and "10-x.toml:allow#2" in result.out, result.out
    result = check("--user", "nobody", "--secrets", "DB_URL")
    assert result.returncode == DENIED_EXIT, result.out
    # Root is never allowed by its group alone.
    result = check("--user", "root", "--group", "nogroup", "--secrets", "EMPTY")
    assert result.returncode == DENIED_EXIT, result.out


def test_policy_check_agrees_with_the_agent(agents, demo, tmp_path):
    """What check says for root and no unit is what the agent does."""
    directory = write_policy(tmp_path / "policy.d", {"10-allow.toml": ALLOW_ROOT_ALL,
                                                     "20-deny.toml": DENY_DB_URL})
    agent = agents.start("--policy-dir", str(directory))
    marker = tmp_path / "ran"
    for name in DEMO_SECRETS:
        result = demo.ov("agent", "policy", "check", "--policy-dir", str(directory),
                         "--user", "root", "--app", "demo", "--env", "production",
                         "--secrets", name)
        if name == "DB_URL":
            assert result.returncode == DENIED_EXIT and result.out.startswith("DENY")
            refused(agent, marker, "--secrets", name)
        else:
            assert result.returncode == 0 and result.out.startswith("ALLOW"), result.out
            assert seen(agent, "--secrets", name) == {name: DIGESTS[name]}


def test_policy_show_lists_the_rules_and_each_files_digest(demo, tmp_path):
    files = {"10-x.toml": POLICY_FOR_CHECK, "20-root.toml": ALLOW_ROOT_DB_URL}
    directory = write_policy(tmp_path / "policy.d", files)
    result = demo.ov("agent", "policy", "show", "--policy-dir", str(directory))
    assert result.returncode == 0, (result.out, result.err)
    lines = result.out.splitlines()
    assert lines[0] == f"policy: enforcing, 3 rule(s) from 2 file(s) in {directory}"
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert any(line.startswith(f"{name}: ") and digest in line for line in lines), \
            (name, lines)
    for origin in ("10-x.toml:allow#1", "10-x.toml:deny#1", "20-root.toml:allow#1"):
        assert any(line.startswith(f"{origin}: ") for line in lines), (origin, lines)
    rule = next(line for line in lines if line.startswith("10-x.toml:deny#1: "))
    assert "deny" in rule and "API_TOKEN" in rule and "unit" in rule, rule
    # No files: policy off.
    empty = write_policy(tmp_path / "empty.d", {})
    result = demo.ov("agent", "policy", "show", "--policy-dir", str(empty))
    assert result.returncode == 0 and result.out.strip() == "policy: off", result.out


# -- units: clients put into cgroups named like units --------------------------------


def in_cgroup(group, agent, key, *command, options=(), prefix=(), cwd, env):
    """ov run --agent COMMAND, from a process moved into *group* first (then, with a
    setpriv *prefix*, turned into another uid)."""
    return subprocess.run(
        ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *prefix, OV,
         "run", "--agent", *options, "--socket", str(agent.socket), "--machine-key",
         str(key), "--", *command],
        check=False, capture_output=True, timeout=30, cwd=cwd, env=env)


UNIT_POLICY = """\
[[allow]]
unit    = "x.service"
user    = "root"
app     = "demo"
secrets = ["DB_URL"]

[[allow]]
unit    = "myapp@*.service"
user    = "root"
app     = "demo"
secrets = ["API_TOKEN"]

[[deny]]
unit    = "myapp@evil.service"
secrets = "*"
"""

DIGEST_OF = ("sh", "-c", 'printf %s "${DB_URL-unset}" | sha256sum; '
                         'printf %s "${API_TOKEN-unset}" | sha256sum')


def digests_seen(result):
    assert result.returncode == 0, (result.returncode, redact(result.stderr))
    db, token = (line.split()[0] for line in result.stdout.decode().splitlines())
    return db, token


def test_a_rule_naming_a_unit_allows_only_callers_in_that_unit(agents, demo, tmp_path,
                                                                unit_cgroup):
    directory = write_policy(tmp_path / "policy.d", {"10-units.toml": UNIT_POLICY})
    agent = agents.start("--policy-dir", str(directory))
    env, key = demo.ov.env, demo.key
    unset = sha256("unset")

    def run(unit, *command, options=()):
        return in_cgroup(unit_cgroup(unit), agent, key, *command, options=options,
                         cwd=tmp_path, env=env)

    assert digests_seen(run("x.service", *DIGEST_OF)) == (DIGESTS["DB_URL"], unset)
    released = wait_record(agent, "released", "peer_unit=x.service")
    assert "policy_rule=10-units.toml:allow#1" in released[0], released
    # A template's instance through the glob; no other unit's rule applies.
    assert digests_seen(run("myapp@blue.service", *DIGEST_OF)) == (
        unset, DIGESTS["API_TOKEN"])
    released = wait_record(agent, "released", "peer_unit=myapp@blue.service")
    assert "policy_rule=10-units.toml:allow#2" in released[0], released
    # Root in a unit of its own user manager: the rule names root, so it holds.
    assert digests_seen(run("user@0.service/app.slice/x.service", *DIGEST_OF)) == (
        DIGESTS["DB_URL"], unset)
    released = wait_record(agent, "released", "peer_user_manager=user@0.service")
    assert "peer_unit=x.service" in released[0], released

    marker = tmp_path / "ran"
    for unit, options, rule in (
            ("y.service", ["--secrets", "DB_URL"], "no rule for unit=y.service uid=0"),
            ("x.service", ["--secrets", "API_TOKEN"], "no rule for unit=x.service uid=0"),
            ("myapp@evil.service", [], "no rule for unit=myapp@evil.service uid=0"),
            ("myapp@evil.service", ["--secrets", "API_TOKEN"],
             "10-units.toml:deny#1")):
        result = run(unit, *MARKER, str(marker), options=options)
        assert result.returncode == DENIED_EXIT, (unit, options, redact(result.stderr))
        assert b"[policy-denied]" in result.stderr and not marker.exists()
        wait_record(agent, "denied", "code=policy-denied", f"peer_unit={unit}",
                    f"policy_rule={rule}")
    # Outside any unit: no rule.
    refused(agent, marker, "--secrets", "DB_URL")
    assert len(records(agent, "released")) == 3


NOBODY_UNIT_POLICY = """\
[[allow]]
unit    = "x.service"
app     = "demo"
secrets = ["API_TOKEN"]

[[allow]]
unit    = "z.service"
user    = "nobody"
app     = "demo"
secrets = ["API_TOKEN"]
"""


@needs_setpriv
def test_a_unit_of_a_users_own_manager_counts_only_where_the_rule_names_the_user(
        agents, demo, shared_place, tmp_path, unit_cgroup):
    """Any process of uid 65534 may create cgroups under user@65534.service and
    name them as it likes: there "x.service" does not match a rule that names only
    the unit; a rule that also names the user matches."""
    base, key = shared_place
    os.chown(key, 65534, 65534)
    directory = write_policy(tmp_path / "policy.d", {"10-units.toml": NOBODY_UNIT_POLICY})
    agent = agents.start_shared(base, "--policy-dir", str(directory))
    (base / "out").mkdir(mode=0o777)
    os.chmod(base / "out", 0o777)
    env = dict(demo.ov.env, HOME=str(base))
    nobody = (SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups")
    unset = sha256("unset")

    def run(unit, *command):
        return in_cgroup(unit_cgroup(unit), agent, key, *command, prefix=nobody,
                         cwd=base, env=env)

    # A system unit x.service: the rule naming only the unit holds.
    assert digests_seen(run("x.service", *DIGEST_OF)) == (unset, DIGESTS["API_TOKEN"])
    released = wait_record(agent, "released", "peer_uid=65534", "peer_unit=x.service")
    assert "policy_rule=10-units.toml:allow#1" in released[0], released
    # The same name under its own user manager: forged, refused.
    marker = base / "out" / "ran"
    result = run("user@65534.service/app.slice/x.service", *MARKER, str(marker))
    assert result.returncode == DENIED_EXIT, redact(result.stderr)
    assert b"[policy-denied]" in result.stderr and not marker.exists()
    denied = wait_record(agent, "denied", "code=policy-denied", "peer_uid=65534")
    assert "peer_user_manager=user@65534.service" in denied[0], denied
    assert "no rule for unit=user@65534.service/x.service uid=65534" in denied[0], denied
    # A rule that names the user too: its user manager's unit counts.
    assert digests_seen(run("user@65534.service/app.slice/z.service", *DIGEST_OF)) == (
        unset, DIGESTS["API_TOKEN"])
    released = wait_record(agent, "released", "peer_user_manager=user@65534.service")
    assert "policy_rule=10-units.toml:allow#2" in released[0], released
