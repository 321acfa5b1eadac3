"""Replacing ``ov`` with the user's command, secrets added to its environment
(``ov run``, with or without the agent).  Stdlib C modules only: the agent's client
execs through here on its hot path."""

import os

import _signal

from .errors import EXIT_CANNOT_EXECUTE, EXIT_COMMAND_NOT_FOUND, ExecError


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
    except FileNotFoundError:
        raise ExecError(f"{argv[0]}: command not found", EXIT_COMMAND_NOT_FOUND) from None
    except OSError as exc:
        raise ExecError(f"{argv[0]}: {exc.strerror}", EXIT_CANNOT_EXECUTE) from None
