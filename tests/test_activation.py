"""The agent under systemd: real socket activation through systemd-socket-activate
(LISTEN_FDS, FileDescriptorName=), and sd_notify (READY=1, STOPPING=1, WATCHDOG=1)
seen by a fake NOTIFY_SOCKET."""

import itertools
import os
import signal
import socket
import time

import pytest

from helpers import (DEMO_SECRETS, NotifyListener, Session, as_format_1,
                     needs_socket_activate, probe, protocol, redact, sha256, signed)
from ovagent.core import paths


pytestmark = needs_socket_activate


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().split(b"\0")


def served_at_once(agent, key, timeout=1.0):
    """A fresh connection gets a signed status request answered within timeout."""
    started = time.monotonic()
    with Session(agent.socket, timeout=timeout) as session:
        reply = session.request(signed(key, session.challenge))
    assert isinstance(reply, dict) and reply["type"] == "status", reply
    assert time.monotonic() - started < timeout
    return reply


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_the_first_connection_starts_the_agent_and_succeeds(agents, demo):
    agent = agents.activated()
    inode = os.lstat(agent.socket).st_ino
    assert os.path.basename(cmdline(agent.pid)[0]) == b"systemd-socket-activate"
    assert "started:" not in agent.log()                    # nothing started yet
    seen = probe(agent)                                     # ov run --agent --socket S
    assert seen["env"].get("DB_URL") == sha256(DEMO_SECRETS["DB_URL"])
    for name in ("FOO_AGENT_ONLY", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                 "OV_AGENT_SOCK"):
        assert name not in seen["env"], name
    # The same process, now the agent, serving the socket systemd-socket-activate bound.
    assert b"agent" in cmdline(agent.pid) and cmdline(agent.pid)[1].endswith(b"/ov")
    assert os.lstat(agent.socket).st_ino == inode
    log = agent.log()
    assert "Communication attempt on fd 3" in log
    assert f"ov-agent[{agent.pid}]: started: ov-agent started on systemd socket" in log
    result = agent.run("sh", "-c", "exit 42")
    assert result.returncode == 42, redact(result.err)


def test_the_fd_named_ov_agent_is_served_and_others_closed(agents, tmp_path):
    other = tmp_path / "r" / "other.sock"
    agent = agents.activated(listen=[(other, "other")])
    assert agent.run("true").returncode == 0, redact(agent.log())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe_sock, \
            pytest.raises(ConnectionRefusedError):
        probe_sock.connect(str(other))           # the agent closed the fd it does not use


def test_status_and_stop_under_socket_activation(agents, demo):
    agent = agents.activated()
    result = agent.status()                  # the first connection: starts the agent
    assert result.returncode == 0, redact(result.err)
    assert f"(pid {agent.pid}) up " in result.out
    assert "mode: machine-key; key scope: all apps; default app: demo" in result.out
    assert "requests: accepted=0 busy=0 denied=0 released=0 running=0" in result.out
    assert agent.pid_file.read_text().strip() == str(agent.pid)
    stop = demo.ov("agent", "stop", "--pid-file", str(agent.pid_file))
    assert stop.returncode == 0, stop.err
    assert agent.proc.wait(10) == 0
    assert not agent.pid_file.exists()
    assert agent.socket.exists()             # systemd's socket is not the agent's to remove


def test_a_credentials_directory_provides_the_key(agents, demo, tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "machine.kek").write_bytes(demo.key.read_bytes())
    (credentials / "machine.kek").chmod(0o400)
    agent = agents.activated(key=False, setenv=[f"CREDENTIALS_DIRECTORY={credentials}"])
    assert agent.run("true").returncode == 0, redact(agent.log())
    assert "CREDENTIALS_DIRECTORY" not in probe(agent)["env"]


def test_without_a_key_it_starts_unconfigured_and_says_why(agents):
    agent = agents.activated(key=False)
    result = agent.run("true")
    assert result.returncode == 6, redact(result.err)
    assert "[unconfigured]" in result.err and "derive-machine-key" in result.err
    assert "unconfigured: ov-agent cannot serve" in agent.log()


def test_an_unconfigured_agent_still_answers_status(agents):
    """No key to sign with, nothing to protect: status says why it cannot serve."""
    agent = agents.activated(key=False)
    result = agent.status()
    assert result.returncode == 0, redact(result.err)
    assert f"(pid {agent.pid}) up " in result.out
    assert "mode: unconfigured" in result.out
    assert "unconfigured: the agent has no machine key: create a machine key" in result.out


def test_a_vault_of_format_1_leaves_the_agent_unconfigured_saying_how_to_upgrade(
        agents, demo):
    """Under systemd a vault of the format before heads neither serves nor makes the
    agent exit (a restart loop): it answers 'unconfigured' with the command to run."""
    as_format_1(demo.path, demo.key.read_bytes())
    agent = agents.activated()
    result = agent.run("true")
    assert result.returncode == 6, redact(result.err)
    assert "[unconfigured]" in result.err and "ov auth upgrade" in result.err
    assert agent.proc.poll() is None


def test_the_system_agent_names_the_system_key_whatever_its_user(agents):
    """--system (ov-agent.service runs it as _ov-agent): the how-to names the system
    key and unit, not those of the agent's own user."""
    agent = agents.activated("--system", key=False)
    result = agent.run("true")
    assert result.returncode == 6, redact(result.err)
    assert "--out /etc/ov/machine.kek" in result.err, result.err
    assert "'systemctl restart ov-agent.service'" in result.err, result.err


def test_the_system_agent_reads_the_system_vault_whatever_its_user(monkeypatch):
    monkeypatch.delenv("OV_VAULT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "/home/someone/.local/share")
    monkeypatch.setattr(os, "geteuid", lambda: 993)
    assert paths.vault_path() == "/home/someone/.local/share/ov/vault.db"
    assert paths.vault_path(system=True) == paths.SYSTEM_VAULT
    monkeypatch.setenv("OV_VAULT", "/srv/v.db")
    assert paths.vault_path(system=True) == "/srv/v.db"


# -- sd_notify ---------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["manual", "socket-activated"])
def test_ready_only_once_a_connection_is_served_and_stopping_on_sigterm(
        agents, demo, notify, activation):
    key = demo.key.read_bytes()
    if activation == "manual":
        agent = agents.start(env={"NOTIFY_SOCKET": notify.path}, wait=False)
    else:
        agent = agents.activated(setenv=[f"NOTIFY_SOCKET={notify.path}"])
        trigger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        trigger.connect(str(agent.socket))   # starts the agent; served once it is up
    ready = notify.wait_for("READY=1")
    reply = served_at_once(agent, key)       # right away: no retry, no sleep
    assert f"MAINPID={agent.pid}" in ready and reply["pid"] == agent.pid
    assert "STATUS=serving (machine-key)" in ready
    if activation != "manual":
        assert protocol.recv_frame(trigger, timeout=5)[0]["type"] == "hello"
        trigger.close()
    assert notify.seen("STOPPING=1") == []
    agent.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING=1", timeout=5)
    assert any(line.startswith("STATUS=stopping") for line in stopping)
    assert agent.proc.wait(10) == 0


def test_watchdog_pings_when_watchdog_usec_is_set(agents, notify):
    agent = agents.activated(setenv=[f"NOTIFY_SOCKET={notify.path}",
                                     "WATCHDOG_USEC=200000"])
    assert agent.run("true").returncode == 0
    notify.wait_for("READY=1")
    first = notify.wait_for("WATCHDOG=1", timeout=2)
    assert first == {"WATCHDOG=1"}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        notify.receive(max(0.01, deadline - time.monotonic()))
    pings = notify.seen("WATCHDOG=1")
    assert len(pings) >= 5, f"{len(pings)} WATCHDOG=1 in ~1 s for WATCHDOG_USEC=200000"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.2, gaps           # systemd's limit; the agent aims at USEC / 2


def test_no_watchdog_pings_for_another_pid(agents, notify):
    agent = agents.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000",
                              "WATCHDOG_PID": "1"}, wait=False)
    notify.wait_for("READY=1")
    assert agent.run("true").returncode == 0
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        notify.receive(max(0.01, deadline - time.monotonic()))
    assert notify.seen("WATCHDOG=1") == []
