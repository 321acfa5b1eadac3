"""Validation of names and values shared by the CLI, the vault and the agent.

Stdlib only, so the client can validate without importing any crypto.
"""

import re

from .errors import UsageError

# Patterns, not compiled objects: re compiles (and caches) them on first use, so the
# client pays nothing for them unless it validates a name.
SLUG_PATTERN = r"[a-z0-9][a-z0-9-]{0,61}[a-z0-9]|[a-z0-9]"
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,254}"
MAX_VALUE_BYTES = 64 * 1024


def check_slug(kind, value):
    if not isinstance(value, str) or not re.fullmatch(SLUG_PATTERN, value):
        raise UsageError(
            f"invalid {kind} {value!r}: use 1-63 lowercase letters, digits and "
            "dashes, not starting or ending with a dash")
    return value


def check_name(name):
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
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
