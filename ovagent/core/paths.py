"""Every default path of ov, in one place (ov(1), FILES).

The system's files serve root and the system agent (which runs as its own user, so it
asks for them with ``system=True``); everyone else gets the XDG base directories.
Environment variables ($OV_VAULT, $OV_AGENT_SOCK) override both.  Stdlib only: the
client reads these on its hot path.
"""

import os

SYSTEM_VAULT = "/var/lib/ov/vault.db"
SYSTEM_KEY = "/etc/ov/machine.kek"
SYSTEM_POLICY = "/etc/ov/policy.d"
SYSTEM_SOCKET = "/run/ov-agent/ov-agent.sock"
SYSTEM_UNIT = "ov-agent.service"
AGENT_DIR = "ov-agent"              # the socket's directory name, system and user
SOCKET_NAME = "ov-agent.sock"
PID_FILE_NAME = "ov-agent.pid"


def config_home():
    return os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")


def data_home():
    return os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")


def vault_path(system=False):
    """$OV_VAULT, else the system vault for root and the system agent, else the
    user's."""
    if os.environ.get("OV_VAULT"):
        return os.environ["OV_VAULT"]
    if system or os.geteuid() == 0:
        return SYSTEM_VAULT
    return os.path.join(data_home(), "ov", "vault.db")


def key_path():
    """Where ``ov run --agent`` looks for a machine key when given none."""
    if os.geteuid() == 0:
        return SYSTEM_KEY
    return os.path.join(config_home(), "ov", "machine.kek")


def policy_dir(system=False):
    """The agent's policy directory (ov-agent(8), POLICY): the system's for the system
    agent, else its user's."""
    return SYSTEM_POLICY if system else os.path.join(config_home(), "ov", "policy.d")


def state_dir(system=False):
    """Where an agent keeps what survives it (its registry of consumers): systemd's
    StateDirectory= ($STATE_DIRECTORY), else /var/lib/ov for the system agent, else
    $XDG_STATE_HOME/ov."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if system:
        return os.path.dirname(SYSTEM_VAULT)
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "ov")


def user_config():
    return os.path.join(config_home(), "ov", "config.yaml")


def user_socket():
    """The user agent's socket, $XDG_RUNTIME_DIR/ov-agent/ov-agent.sock; None without
    $XDG_RUNTIME_DIR."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, AGENT_DIR, SOCKET_NAME) if runtime else None


def client_socket():
    """Where a client connects: $OV_AGENT_SOCK, else the user's agent when it is
    there, else the system agent."""
    if os.environ.get("OV_AGENT_SOCK"):
        return os.environ["OV_AGENT_SOCK"]
    user = user_socket()
    return user if user and os.path.exists(user) else SYSTEM_SOCKET


def agent_socket():
    """Where an agent started by hand listens: $OV_AGENT_SOCK, else the user's socket
    for a user with a runtime directory, else the system one."""
    if os.environ.get("OV_AGENT_SOCK"):
        return os.environ["OV_AGENT_SOCK"]
    if os.geteuid() != 0 and user_socket():
        return user_socket()
    return SYSTEM_SOCKET


def pid_file(socket_path=None):
    """An agent's pid file: beside its socket."""
    return os.path.join(os.path.dirname(socket_path or agent_socket()), PID_FILE_NAME)
