"""Errors that carry their own exit status, so every failure maps to one documented code.

The CLI prints ``ov: <message>`` and exits with ``exit_code``; no traceback ever
reaches the user for these.  Messages must never contain a secret value or key.
"""

import sys

EXIT_FAILURE = 1        # generic failure (I/O, OS errors)
EXIT_USAGE = 2          # invalid input: bad flag, slug, name, value, dotenv, key file
EXIT_NOT_FOUND = 3      # no such vault, app, env or secret
EXIT_AUTH = 4           # wrong password, wrong or revoked machine key, request denied
EXIT_INTEGRITY = 5      # vault corrupt or tampered with
EXIT_AGENT = 6          # agent or shared store unreachable, busy, or protocol failure
EXIT_CONFLICT = 7       # another host wrote first (a fleet's shared store)
EXIT_CANNOT_EXECUTE = 126
EXIT_COMMAND_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


def warn(message):
    """The one way ov speaks to its user on stderr: 'ov: message', one line."""
    print(f"ov: {message}", file=sys.stderr)


def report_errors(function, *args, **kwargs):
    """Run function; turn OvError into 'ov: message' and its exit code, and ^C into
    'interrupted' (130): no traceback reaches the user."""
    try:
        return function(*args, **kwargs)
    except OvError as exc:
        warn(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        warn("interrupted")
        sys.exit(EXIT_INTERRUPTED)


class OvError(Exception):
    """Base class: a one-line, user-facing failure."""

    exit_code = EXIT_FAILURE


class UsageError(OvError):
    exit_code = EXIT_USAGE


class PolicyError(UsageError):
    """A policy file or directory that cannot be used (ovagent/agent/policy_files.py)."""


class NotFoundError(OvError):
    exit_code = EXIT_NOT_FOUND


class AuthError(OvError):
    exit_code = EXIT_AUTH


class IntegrityError(OvError):
    exit_code = EXIT_INTEGRITY


class AgentError(OvError):
    exit_code = EXIT_AGENT


class StoreError(OvError):
    """The shared store of a fleet cannot be reached (ovagent/client/pgstore.py)."""

    exit_code = EXIT_AGENT


class ConflictError(OvError):
    """Another host wrote to the shared store first: sync, look, write again."""

    exit_code = EXIT_CONFLICT


class OutdatedVaultError(OvError):
    """A vault of an older format, which 'ov auth upgrade' brings up to date."""


class ExecError(OvError):
    """The command could not be started (126) or was not found (127)."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def of(cls, argv0, exc):
        """The shell's convention for an exec that failed with OSError *exc*."""
        if isinstance(exc, FileNotFoundError):
            return cls(f"{argv0}: command not found", EXIT_COMMAND_NOT_FOUND)
        return cls(f"{argv0}: {exc.strerror}", EXIT_CANNOT_EXECUTE)
