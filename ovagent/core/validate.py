"""Validation of names and values shared by the CLI, the vault and the agent.

Stdlib only, and not even ``re``: the client validates on its hot path, and the regex
engine's import (re, enum, functools...) costs a third of a Python start.  The rules,
as regular expressions: slugs ``[a-z0-9][a-z0-9-]{0,61}[a-z0-9]|[a-z0-9]``, names
``[A-Za-z_][A-Za-z0-9_]{0,254}`` (tests/test_vault.py checks the two agree).
"""

from .errors import UsageError

SLUG_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
NAME_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
NAME_CHARACTERS = NAME_START | frozenset("0123456789")
MAX_SLUG_LEN = 63
MAX_NAME_LEN = 255
MAX_VALUE_BYTES = 64 * 1024
# The app and env of a command or request that names none (and of an agent without
# --app): the client's configuration and the agent fall back to the same slugs.
DEFAULT_APP = "default"
DEFAULT_ENV = "production"


def is_slug(value):
    return (isinstance(value, str) and 0 < len(value) <= MAX_SLUG_LEN
            and SLUG_CHARACTERS.issuperset(value) and value[0] != "-" and value[-1] != "-")


def is_name(name):
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN
            and name[0] in NAME_START and NAME_CHARACTERS.issuperset(name))


def check_slug(kind, value):
    if not is_slug(value):
        raise UsageError(
            f"invalid {kind} {value!r}: use 1-63 lowercase letters, digits and "
            "dashes, not starting or ending with a dash")
    return value


def check_name(name):
    if not is_name(name):
        raise UsageError(
            f"invalid secret name {name!r}: must be an environment variable name "
            "([A-Za-z_][A-Za-z0-9_]*, at most 255 characters)")
    return name


def check_value(name, value):
    """Values travel in an environment: no NUL byte, bounded size."""
    if b"\0" in value:
        raise UsageError(f"value of {name} contains a NUL byte")
    if len(value) > MAX_VALUE_BYTES:
        raise UsageError(
            f"value of {name} is {len(value)} bytes; the limit is {MAX_VALUE_BYTES}")
    return value


# Variables that make a dynamic loader, shell or runtime load code: a secret with such
# a name is injected only when the caller names it explicitly (--secrets), never as
# part of "all secrets of app/env" (docs/security.rst).
DANGEROUS_NAMES = frozenset({
    "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH", "GLOBIGNORE",
    "PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT",
    "PYTHONUSERBASE", "PERL5LIB", "PERL5OPT", "PERLLIB", "RUBYLIB", "RUBYOPT",
    "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
    "CLASSPATH", "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCPATH", "NLSPATH",
    "MALLOC_CHECK_", "TMPDIR", "GIT_EXEC_PATH", "GIT_SSH_COMMAND", "EDITOR", "PAGER",
})
DANGEROUS_PREFIXES = ("LD_", "DYLD_", "GLIBC_")


def is_dangerous_name(name):
    return name in DANGEROUS_NAMES or name.startswith(DANGEROUS_PREFIXES)
