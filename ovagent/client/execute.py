"""Replacing ``ov`` with the user's command, secrets added to its environment
(``ov run``, with or without the agent).  Stdlib C modules only at import: the
agent's client execs through here on its hot path (the vault is imported only
without --agent)."""

import os

import _signal

from ..core import paths
from ..core.errors import ExecError, UsageError
from . import config, talk


RUN_TAKES = ("app", "env", "secrets")


def run_with_agent(command, *, socket=None, machine_key=None, app=None, env=None,
                   secrets=None, vault=None, spawn=False):
    """``ov run --agent``: exec the command with the secrets the agent released, or
    (--spawn) return the exit status of the command the agent ran."""
    if vault:
        raise UsageError("--vault is the agent's business; it cannot go with --agent")
    target = config.resolve(app, env, secrets, takes=RUN_TAKES)
    where = dict(socket_path=socket or paths.client_socket(),
                 key=talk.find_key(machine_key), app=target.app, env=target.env,
                 secrets=target.secrets)
    if spawn:
        return talk.spawn(list(command), **where)
    exec_with_secrets(list(command), talk.release(command[0], **where))


def run_with_vault(command, *, machine_key=None, app=None, env=None, secrets=None,
                   vault=None):
    """``ov run`` without the agent: unlock the vault here, then exec the command
    with the secrets."""
    from ..core import unlock          # the vault's cryptography: not on the agent path
    from ..core.vault import Vault

    target = config.resolve(app, env, secrets, vault=True, takes=RUN_TAKES)
    opened = Vault.open(vault or paths.vault_path())
    keyring = unlock.unlock(opened, machine_key=machine_key, app=target.app,
                            instead="--machine-key")
    exec_with_secrets(list(command), opened.reveal(keyring, target.app, target.env,
                                                   target.secrets))


def child_environment(base, secrets):
    """*base* (a bytes->bytes mapping) plus the secrets (str -> bytes)."""
    env = dict(base)
    for name, value in secrets.items():
        env[name.encode()] = value
    return env


def exec_with_secrets(argv, secrets):
    """Replace this process with argv: its pid, exit status and signals become ours."""
    env = child_environment(os.environb, secrets)
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: restore
    # the defaults so CMD behaves (and dies) as it would without ov.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(_signal, name):
            _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        raise ExecError.of(argv[0], exc) from None
