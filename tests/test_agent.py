"""``ov agent`` in manual mode and ``ov run --agent`` end to end: real agents started
with the venv's ``ov`` on real sockets (agent_plugin.py, helpers.py).  Both flows:
the default one, where the client execs the command in place with the secrets the
agent released to it, and ``--spawn``, where the agent runs the command (only for a
caller that lives in the agent's own world)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from helpers import (DEMO_SECRETS, OV, SETPRIV, RecordingProxy, Session, group_gone,
                     needs_setpriv, pid_gone, pipe_text, probe, protocol, read_line,
                     redact, sha256, signed, socket_mode, wait_for, wrong_key)


GRACE = 1.0   # the fixture's --grace
SPAWN = ["--spawn"]
both_flows = pytest.mark.parametrize("flow", [[], SPAWN], ids=["in-place", "spawn"])


def processes_with(marker):
    """Live (non-zombie) pids whose command line holds marker."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read() and not pid_gone(int(entry)):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def secret_digests():
    return {name: sha256(value) for name, value in DEMO_SECRETS.items()}


# -- manual mode: socket, pid file, status, stop -----------------------------------


def test_socket_is_0600_in_a_0700_directory(agents, tmp_path):
    agent = agents.start(sock=tmp_path / "fresh" / "a.sock")
    assert socket_mode(agent.socket) == (True, 0o600)
    assert oct(os.stat(agent.socket.parent).st_mode & 0o7777) == oct(0o700)
    assert agent.pid_file.read_text().strip() == str(agent.pid)


def test_status_prints_version_uptime_mode_and_counters(agent):
    assert agent.run("true").returncode == 0
    result = agent.status()
    assert result.returncode == 0, redact(result.err)
    lines = result.out.splitlines()
    assert lines[0].startswith(f"ov-agent 0.1.0 (pid {agent.pid}) up "), lines
    assert lines[0].endswith(f"s on {agent.socket}"), lines
    assert lines[1] == "mode: machine-key; key scope: all apps; default app: demo"
    assert lines[2] == "requests: accepted=0 busy=0 denied=0 released=1 running=0"


def test_status_with_a_wrong_key_falls_back_to_the_pid_file(agent, tmp_path):
    bad = wrong_key(tmp_path / "wrong.kek")
    for options in (["--pid-file", str(agent.pid_file)], []):  # [] = default beside socket
        result = agent.status(bad, *options)
        assert result.returncode == 0, redact(result.err)
        assert (f"ov-agent is running (pid {agent.pid}, from pid file {agent.pid_file}); "
                "it did not answer") in result.out
        assert "[auth-failed]" in result.out


def test_status_without_an_agent_exits_3(demo, tmp_path):
    (tmp_path / "r").mkdir(mode=0o700)
    result = demo.ov("agent", "status", "--machine-key", str(demo.key), "--socket",
                     str(tmp_path / "r" / "none.sock"))
    assert result.returncode == 3, (result.out, result.err)
    assert "ov-agent is not running" in result.err


def test_stop_returns_at_once_and_the_agent_cleans_up(agent):
    started = time.monotonic()
    result = agent.harness.demo.ov("agent", "stop", "--pid-file", str(agent.pid_file))
    assert result.returncode == 0, result.err
    assert f"Sent SIGTERM to ov-agent (pid {agent.pid})" in result.out
    assert time.monotonic() - started < 3
    assert agent.proc.wait(10) == 0
    assert not agent.socket.exists() and not agent.pid_file.exists()
    again = agent.harness.demo.ov("agent", "stop", "--pid-file", str(agent.pid_file))
    assert again.returncode == 3 and "no running agent" in again.err


def test_a_second_agent_on_a_live_socket_is_refused(agent, agents):
    before = os.lstat(agent.socket)
    second = agents.start(sock=agent.socket, pid_file=agent.socket.with_name("b.pid"),
                          wait=False)
    assert second.proc.wait(15) == 2
    assert f"an agent is already listening on {agent.socket}" in second.log()
    after = os.lstat(agent.socket)           # the same file, untouched
    assert (after.st_ino, after.st_ctime_ns) == (before.st_ino, before.st_ctime_ns)
    assert agent.status().returncode == 0


def test_a_stale_socket_is_replaced(agents, tmp_path):
    directory = tmp_path / "r"
    directory.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "a.sock"))
    stale.close()                                  # leaves the file, nobody listens
    os.chmod(directory / "a.sock", 0o666)          # (inode numbers get reused: mark it)
    agent = agents.start()
    assert socket_mode(agent.socket) == (True, 0o600)
    assert agent.run("true").returncode == 0


@pytest.mark.parametrize("mode, owner, message", [
    (0o770, 0, "is group- or world-writable"),
    (0o703, 0, "is group- or world-writable"),
    (0o700, 65534, "is owned by uid 65534, not by us"),
])
def test_an_unsafe_socket_directory_is_refused(agents, tmp_path, mode, owner, message):
    directory = tmp_path / "r"
    directory.mkdir()
    os.chmod(directory, mode)
    os.chown(directory, owner, owner)
    agent = agents.start(wait=False)
    assert agent.proc.wait(15) == 2, redact(agent.log())
    assert f"ov: socket directory {directory} {message}" in agent.log()
    assert not agent.socket.exists()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink-to-socket"])
def test_a_non_socket_at_the_socket_path_is_refused(agents, tmp_path, kind):
    directory = tmp_path / "r"
    directory.mkdir(mode=0o700)
    path = directory / "a.sock"
    if kind == "file":
        path.write_text("precious\n")
    elif kind == "directory":
        path.mkdir()
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as target:
            target.bind(str(tmp_path / "target.sock"))
        path.symlink_to(tmp_path / "target.sock")
    agent = agents.start(wait=False)
    assert agent.proc.wait(15) == 2, redact(agent.log())
    assert f"{path} exists and is not a socket; refusing to replace it" in agent.log()
    if kind == "file":
        assert path.read_text() == "precious\n"
    assert os.path.lexists(path)


def test_detached_start_returns_once_the_socket_accepts(agents, demo):
    agent = agents.start(foreground=False, wait=False)
    assert agent.proc.wait(20) == 0, redact(agent.log())
    pid = agents.detached_pid(agent.pid_file)
    assert pid != agent.proc.pid
    with Session(agent.socket, timeout=2) as session:   # no waiting, no retry
        reply = session.request(signed(demo.key.read_bytes(), session.challenge))
    assert reply["type"] == "status" and reply["pid"] == pid
    assert agent.run("true").returncode == 0
    assert demo.ov("agent", "stop", "--pid-file", str(agent.pid_file)).returncode == 0
    wait_for(lambda: pid_gone(pid, zombie_ok=True), "the detached agent to exit")
    wait_for(lambda: not agent.socket.exists(), "the socket to be removed")


# -- ov run --agent: data, exit status, signals -----------------------------------


@both_flows
@pytest.mark.parametrize("payload", [bytes(range(256)) * 4, os.urandom(1 << 20)],
                         ids=["all-bytes", "1MiB"])
def test_stdin_to_stdout_round_trip(agent, payload, flow):
    result = agent.run("cat", input=payload, options=flow)
    assert result.returncode == 0, redact(result.err)
    assert len(result.stdout) == len(payload)
    assert sha256(result.stdout) == sha256(payload)


@both_flows
def test_stderr_is_the_clients(agent, flow):
    result = agent.run("sh", "-c", "echo out; echo err >&2", options=flow)
    assert (result.returncode, result.out, result.err) == (0, "out\n", "err\n")


@both_flows
@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_status_is_the_commands(agent, code, flow):
    result = agent.run("sh", "-c", f"exit {code}", options=flow)
    assert result.returncode == code, redact(result.err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT],
                         ids=lambda s: s.name)
def test_death_by_signal_is_the_commands_own_in_place(agent, signum):
    """The command replaced the client: its death by a signal is the process's."""
    result = agent.run("sh", "-c", f"kill -{signum.name[3:]} $$")
    assert result.returncode == -signum, redact(result.err)


@pytest.mark.parametrize("signame, expected", [("TERM", 143), ("KILL", 137), ("INT", 130)])
def test_death_by_signal_exits_128_plus_n_with_spawn(agent, signame, expected):
    result = agent.run("sh", "-c", f"kill -{signame} $$", options=SPAWN)
    assert result.returncode == expected, redact(result.err)


@both_flows
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT,
                                    signal.SIGHUP], ids=lambda s: s.name)
def test_signals_reach_the_command(agent, signum, flow):
    name = signum.name[3:]
    client = agent.client(
        "sh", "-c", f'trap "exit 7" {name}; echo running; while :; do sleep 0.05; done',
        options=flow)
    assert read_line(client.stdout) == "running\n"
    client.send_signal(signum)
    assert client.wait(10) == 7, pipe_text(client.stderr)


def test_the_command_replaces_the_client(agent):
    """In place: the command has the client's pid (a unit's main process stays its
    main process) and its parent, and no agent process is involved in running it."""
    client = agent.client("sh", "-c", 'echo "$$ $PPID"; exec sleep 30')
    pid, parent = map(int, read_line(client.stdout).split())
    assert (pid, parent) == (client.pid, os.getpid())
    assert agent.pid not in (pid, parent)
    client.kill()


def test_a_released_command_outlives_the_agent(agent, demo):
    client = agent.client("sh", "-c", "echo running; sleep 1; exit 5")
    assert read_line(client.stdout) == "running\n"
    agent.terminate()
    assert client.wait(10) == 5


def test_a_signal_before_started_reaches_the_command(agent, tmp_path):
    """The command can run before 'started' reaches the client; a signal in that
    window is relayed, not fatal to the client.  A proxy holds every agent -> client
    chunk back for 0.5 s to open the window wide."""
    proxy = RecordingProxy(tmp_path / "p.sock", agent.socket, delay=0.5)
    try:
        client = agent.harness.popen([
            OV, "run", "--agent", "--spawn", "--socket", str(tmp_path / "p.sock"),
            "--machine-key", str(agent.key), "--", "sh", "-c",
            'trap "exit 7" USR1; echo running; while :; do sleep 0.05; done'])
        assert read_line(client.stdout) == "running\n"
        client.send_signal(signal.SIGUSR1)          # 'started' is still held back
        assert client.wait(10) == 7, pipe_text(client.stderr)
    finally:
        proxy.close()


def test_a_client_gone_before_started_still_gets_its_command_stopped(agent, demo,
                                                                     tmp_path):
    """The client hangs up right after its request: the agent's 'started' finds
    nobody, and the command must still be stopped and reaped, not left running."""
    marker = f"ov-test-{uuid.uuid4().hex}"
    with Session(agent.socket) as session, open(os.devnull, "r+b") as null:
        req = signed(demo.key.read_bytes(), session.challenge, "spawn", cwd=str(tmp_path),
                     argv=["sh", "-c", "while :; do sleep 0.1; done", marker])
        session.send(protocol.encode_frame(req), fds=[null.fileno()] * 3)
    try:
        wait_for(lambda: "terminated after its client went away" in agent.log(),
                 "the command to be stopped ('exited' audit record)", timeout=GRACE + 2)
        assert processes_with(marker) == []
    finally:
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ignores_term", [False, True], ids=["honours-TERM",
                                                             "ignores-TERM"])
def test_a_vanished_client_takes_its_command_along(agent, ignores_term):
    trap = 'trap "" TERM; ' if ignores_term else ""
    client = agent.client("sh", "-c", trap + "echo $$; while :; do sleep 0.1; done",
                          options=SPAWN)
    pid = int(read_line(client.stdout))
    agent.harness.track(pid)
    client.kill()
    killed = time.monotonic()
    client.wait(5)
    if ignores_term:
        time.sleep(GRACE / 2)
        assert not pid_gone(pid), "SIGKILL came before the grace period ended"
    wait_for(lambda: pid_gone(pid), "the command to be killed and reaped",
             timeout=GRACE + 2 - (time.monotonic() - killed))
    wait_for(lambda: group_gone(pid), "its process group to be gone", timeout=1)
    assert "terminated after its client went away" in agent.log()


def test_twenty_concurrent_clients(agent):
    token = sha256(DEMO_SECRETS["API_TOKEN"])
    results = {}

    def one(i):
        results[i] = agent.run("sh", "-c", 'printf "%s " "$1"; printf %s "$API_TOKEN" '
                               "| sha256sum", "sh", str(i), timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == list(range(20))
    for i, result in results.items():
        assert result.returncode == 0, (i, redact(result.err))
        assert result.out.split() == [str(i), token, "-"], i


def test_a_slow_client_does_not_block_a_fast_one(agent, demo):
    idle = Session(agent.socket)             # says nothing after the hello
    drip = Session(agent.socket)             # sends its frame one byte at a time
    frame = protocol.encode_frame(signed(demo.key.read_bytes(), drip.challenge))
    stop = threading.Event()

    def dribble():
        for byte in frame:
            if stop.wait(0.3) or not drip.send(bytes([byte])):
                return

    threading.Thread(target=dribble, daemon=True).start()
    time.sleep(0.5)
    started = time.monotonic()
    result = agent.run("true")
    assert result.returncode == 0, redact(result.err)
    assert time.monotonic() - started < 2
    # Neither slow client is ever served: each times out after the frame deadline.
    for session in (idle, drip):
        reply = session.answer(timeout=protocol.FRAME_TIMEOUT + 3)
        assert isinstance(reply, dict) and reply["code"] == protocol.E_TIMEOUT, reply
    stop.set()


def test_max_clients_answers_busy(agents):
    agent = agents.start("--max-clients", "2")
    running = [agent.client("sh", "-c", "echo running; exec sleep 30", options=SPAWN)
               for _ in range(2)]
    for client in running:
        assert read_line(client.stdout) == "running\n"
    result = agent.run("true")
    assert result.returncode == 6, redact(result.err)
    assert "agent busy: 2 requests already running [busy]" in result.err
    for client in running:
        client.kill()
        client.wait(5)
    wait_for(lambda: agent.run("true").returncode == 0, "the agent to accept again",
             timeout=GRACE + 5, interval=0.2)
    counters = dict(item.split("=") for item in agent.status().out.split()
                    if "=" in item)
    assert int(counters["busy"]) >= 1


# -- what the command sees ---------------------------------------------------------


@both_flows
def test_command_sees_secrets_cwd_umask_and_only_the_clients_environment(agent, tmp_path,
                                                                         flow):
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    seen = probe(agent, *flow, cwd=workdir, umask=0o027,
                 env={"CLIENT_ONLY": "from-client"})
    for name, value in secret_digests().items():
        assert seen["env"].get(name) == value, name
    assert seen["env"].get("CLIENT_ONLY") == sha256("from-client")
    assert "FOO_AGENT_ONLY" not in seen["env"]
    assert "OV_VAULT" in seen["env"]            # the client's own environment
    assert seen["cwd"] == str(workdir)
    assert seen["umask"] == 0o027


def test_secrets_option_gives_only_those_secrets(agent):
    seen = probe(agent, "--secrets", "API_TOKEN")
    assert seen["env"].get("API_TOKEN") == sha256(DEMO_SECRETS["API_TOKEN"])
    assert "DB_URL" not in seen["env"] and "EMPTY" not in seen["env"]


@pytest.mark.parametrize("options, fragment", [
    (["--secrets", "NOPE"], "no secret NOPE in demo/production"),
    (["--env", "staging"], "staging"),
    (["--app", "nope"], "nope"),
])
def test_unknown_secret_env_or_app_exits_3(agent, options, fragment):
    result = agent.run("true", options=options)
    assert result.returncode == 3, redact(result.err)
    assert fragment in result.err and "[not-found]" in result.err


@pytest.mark.parametrize("flow, says", [([], "command not found"),
                                        (SPAWN, "[exec-failed]")], ids=["in-place", "spawn"])
def test_command_not_found_exits_127_and_not_executable_126(agent, tmp_path, flow, says):
    result = agent.run("no-such-command-ov-test", options=flow)
    assert result.returncode == 127, redact(result.err)
    assert says in result.err
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = agent.run(str(script), options=flow)
    assert result.returncode == 126, redact(result.err)


@pytest.fixture
def other_app(demo):
    """A second app 'other' (with env production) the scoped key cannot open."""
    key = ["--machine-key", str(demo.key)]
    demo.ov("app", "create", "other", *key, check=0)
    demo.ov("env", "create", "production", "--app", "other", check=0)
    demo.ov("secret", "set", "OTHER", "--app", "other", "--env", "production", *key,
            input="other-value", check=0)
    return "other"


@pytest.mark.parametrize("agent_key", ["unscoped", "scoped"])
def test_a_scoped_key_works_for_its_app_only(agents, demo, other_app, agent_key):
    agent = agents.start(key=demo.key if agent_key == "unscoped" else demo.scoped_key)
    seen = probe(agent, "--app", "demo", key=demo.scoped_key)
    assert seen["env"].get("DB_URL") == sha256(DEMO_SECRETS["DB_URL"])
    result = agent.run("true", key=demo.scoped_key, options=["--app", other_app])
    assert result.returncode == 4, redact(result.err)
    assert "[auth-failed]" in result.err
    if agent_key == "unscoped":     # the agent's own key still opens the other app
        assert agent.run("true", options=["--app", other_app]).returncode == 0


def test_agent_stop_lets_a_spawned_command_finish(agent, demo):
    client = agent.client("sh", "-c", "echo running; sleep 0.5; exit 5", options=SPAWN)
    assert read_line(client.stdout) == "running\n"
    assert demo.ov("agent", "stop", "--pid-file", str(agent.pid_file)).returncode == 0
    assert client.wait(10) == 5
    assert agent.proc.wait(10) == 0


def test_agent_stop_after_drain_detaches_a_running_command(agents, demo):
    agent = agents.start("--drain", "0.3")
    client = agent.client("sh", "-c", "echo $$; sleep 1.5; exit 5", options=SPAWN)
    pid = int(read_line(client.stdout))
    agents.track(pid)
    agent.terminate()
    assert not pid_gone(pid), "a detached command must keep running"
    assert client.wait(10) == 6
    assert f"command (pid {pid}) keeps running" in pipe_text(client.stderr)
    assert pid_gone(pid, zombie_ok=True)




# -- whose world: in place anywhere, --spawn only in the agent's own ---------------

MARKER_COMMAND = ("sh", "-c", 'touch "$0"')


def outside_the_agents_world(kind):
    """A command prefix that runs the client outside the agent's world."""
    return {"other-uid": [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"],
            "no-new-privs": [SETPRIV, "--no-new-privs"],
            "mount-namespace": ["unshare", "--mount"],
            "resource-limit": ["prlimit", "--nofile=64:64"]}[kind]


def run_as(prefix, agent, key, *command, options=(), cwd, env):
    return subprocess.run(
        [*prefix, OV, "run", "--agent", *options, "--socket", str(agent.socket),
         "--machine-key", str(key), "--", *command],
        check=False, capture_output=True, timeout=30, cwd=cwd, env=env)


@needs_setpriv
@pytest.mark.parametrize("kind", ["other-uid", "no-new-privs", "mount-namespace",
                                  "resource-limit"])
def test_spawn_outside_the_agents_world_is_refused_and_runs_nothing(agents, demo,
                                                                     shared_place, kind):
    base, key = shared_place
    agent = agents.start_shared(base)
    if kind == "other-uid":
        os.chown(key, 65534, 65534)
    (base / "out").mkdir(mode=0o777)
    os.chmod(base / "out", 0o777)         # (the umask took some bits)
    marker = base / "out" / "ran"
    env = dict(demo.ov.env, HOME=str(base))
    prefix = outside_the_agents_world(kind)
    result = run_as(prefix, agent, key, *MARKER_COMMAND, str(marker), options=SPAWN,
                    cwd=base, env=env)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 4, redact(err)
    assert "[spawn-refused]" in err and "drop --spawn" in err, redact(err)
    assert {"other-uid": "uid 65534", "no-new-privs": "NoNewPrivs",
            "mount-namespace": "mount namespace",
            "resource-limit": "Max open files"}[kind] in err, redact(err)
    assert not marker.exists(), "a refused --spawn ran its command"
    # The same caller, in place: the command runs, in the caller's own world.
    result = run_as(prefix, agent, key, *MARKER_COMMAND, str(marker), cwd=base, env=env)
    assert result.returncode == 0, redact(result.stderr)
    assert marker.exists()


def test_a_spawned_command_gets_a_session_of_its_own(agent):
    """Never the agent's session (or terminal): a command that could reach the agent's
    terminal could push input into it (TIOCSTI) as the agent's user."""
    result = agent.run("sh", "-c", 'ps -o sid=,tty= -p $$; echo $$', options=SPAWN)
    assert result.returncode == 0, redact(result.err)
    (sid, tty), (pid,) = (line.split() for line in result.out.splitlines())
    assert sid == pid and tty == "?", result.out
    assert os.getsid(agent.pid) != int(sid)


def test_release_needs_nothing_of_the_callers_world_but_the_key(agent):
    """In place, the agent never looks at cwd, environment or argv beyond argv[0]: a
    request that carries them is refused, whatever they name."""
    with Session(agent.socket) as session:
        req = signed(None, session.challenge, "release")
        req.update(cwd="/root", mac=None)
        reply = session.request(req)
    assert reply["code"] == protocol.E_BAD_REQUEST and "cwd" in reply["message"], reply


# A client of another uid sending a signed spawn request with a cwd of its choice.
FORGED_SPAWN = """\
import json, socket, sys
from ovagent.core import protocol
path, key, cwd = sys.argv[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.connect(path)
    hello, _ = protocol.recv_frame(sock)
    req = protocol.new_request("spawn", hello["challenge"], argv=["true"], cwd=cwd)
    req["mac"] = protocol.sign(protocol.mac_key(bytes.fromhex(key)), req)
    protocol.send_frame(sock, req, fds=(0, 1, 2))
    print(json.dumps(protocol.recv_frame(sock)[0]))
"""


@needs_setpriv
@pytest.mark.parametrize("exists", [True, False], ids=["existing", "missing"])
def test_spawn_from_another_uid_never_touches_its_cwd(agents, demo, shared_place, key,
                                                      exists):
    """The attack of issue 12: a spawn request naming another user's private
    directory as its cwd.  It is refused before any path is resolved, with the same
    answer whether the directory exists or not."""
    base, _ = shared_place
    agent = agents.start_shared(base)
    private = base / "private" / ("home" if exists else "nothing-here")
    if exists:
        private.mkdir(parents=True, mode=0o700)
    result = subprocess.run(
        [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", FORGED_SPAWN, str(agent.socket), key.hex(), str(private)],
        capture_output=True, timeout=30, cwd=base, stdin=subprocess.DEVNULL)
    reply = json.loads(result.stdout)
    assert reply["code"] == protocol.E_SPAWN_REFUSED, reply
    assert str(private) not in reply["message"] and "private" not in reply["message"]
    assert "exec-failed" not in agent.log()


@needs_setpriv
def test_a_system_agent_releases_to_another_uid(agents, demo, shared_place):
    base, key = shared_place
    agent = agents.start_shared(base)
    os.chown(key, 65534, 65534)
    result = run_as(outside_the_agents_world("other-uid"), agent, key, "sh", "-c",
                    'id -u; printf %s "$API_TOKEN" | sha256sum', cwd=base,
                    env=dict(demo.ov.env, HOME=str(base)))
    assert result.returncode == 0, redact(result.stderr)
    uid, token = result.stdout.decode().splitlines()
    assert uid == "65534"
    assert token.split()[0] == sha256(DEMO_SECRETS["API_TOKEN"])


# -- an agent unlocked with the master password --------------------------------------


def test_without_a_key_an_interactive_agent_serves_only_spawn(agents, demo):
    """Without a key file there is nothing to seal with: an agent unlocked with the
    master password serves unsigned --spawn from its uid (SO_PEERCRED, as ssh-agent);
    in place is refused, saying to use --spawn.  A client holding the vault's key
    (the KEK the agent unlocked) still gets its secrets released, sealed."""
    agent = agents.start_interactive()
    result = agent.run("sh", "-c", 'printf %s "$API_TOKEN" | sha256sum', key=False,
                       options=SPAWN)
    assert result.returncode == 0, redact(result.err)
    assert result.out.split()[0] == sha256(DEMO_SECRETS["API_TOKEN"])
    result = agent.run("true", key=False)
    assert result.returncode == 4, redact(result.err)
    assert "serves 'ov run --agent --spawn'" in result.err
    with Session(agent.socket) as session:
        reply = session.request(signed(None, session.challenge, "release"))
    assert reply["code"] == protocol.E_AUTH, reply
    assert "serves 'ov run --agent --spawn'" in reply["message"]
    result = agent.run("sh", "-c", 'printf %s "$API_TOKEN" | sha256sum', key=demo.key)
    assert result.returncode == 0, redact(result.err)
    assert result.out.split()[0] == sha256(DEMO_SECRETS["API_TOKEN"])


# -- big releases, and stopping while a command is being stopped ---------------------


def big_env(demo, tmp_path, env, count, size=60_000):
    """An environment of the demo app holding *count* secrets of *size* bytes."""
    dotenv = tmp_path / f"{env}.env"
    dotenv.write_text("".join(f"BIG_{n:03d}={os.urandom(size // 2).hex()}\n"
                              for n in range(count)))
    demo.ov("env", "create", env, "--app", "demo", check=0)
    demo.ov("secret", "import", str(dotenv), "--app", "demo", "--env", env,
            "--machine-key", str(demo.key), check=0)
    return dotenv


def test_more_than_a_frame_of_secrets_is_released_up_to_what_exec_takes(agent, demo,
                                                                         tmp_path):
    """Sealed secrets may exceed the 1 MiB request frame (1.2 MB here, 1.6 MB in
    base64); beyond what an environment can hold (about 2 MiB) the agent says to
    name fewer, instead of a bare frame error."""
    dotenv = big_env(demo, tmp_path, "big", 20)
    first = dotenv.read_text().splitlines()[0].split("=", 1)[1]
    result = agent.run("sh", "-c", 'printf %s "$BIG_000" | sha256sum',
                       options=["--env", "big"])
    assert result.returncode == 0, redact(result.err)
    assert result.out.split()[0] == sha256(first)
    big_env(demo, tmp_path, "huge", 45)
    result = agent.run("true", options=["--env", "huge"])
    assert result.returncode == 6, redact(result.err)
    assert "name fewer with --secrets [too-large]" in result.err, result.err


def test_a_stopping_agent_still_kills_a_command_whose_client_is_gone(agents):
    """The client vanished, its command ignores SIGTERM; the agent stops before the
    grace period ends: detaching must not cancel the SIGKILL."""
    agent = agents.start("--drain", "0.2")
    client = agent.client("sh", "-c", "trap '' TERM; echo $$; while :; do sleep 0.1; done",
                          options=SPAWN)
    pid = int(read_line(client.stdout))
    agent.harness.track(pid)
    client.kill()
    client.wait(5)
    agent.terminate()
    wait_for(lambda: pid_gone(pid, zombie_ok=True), "the command to be killed",
             timeout=GRACE + 5)
