"""The ``ov`` entry point.

``ov run --agent`` sits in front of every service start and CI job, so it is parsed
here by ovagent.client.options, from the same declarations the full command line
uses, and never imports argparse, argh, cryptography, the vault or even the regex
engine (argparse alone, with the gettext, locale and shutil it pulls in, costs a
fifth of the client's start-up).  Anything the fast parser does not take, ``--help``
included, goes to the full command line in ovagent.cli, which then prints argparse's
usage or error.
"""

import sys


def main(argv=None):
    from .client.options import parse_run_agent

    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = parse_run_agent(argv) if argv[:1] == ["run"] else None
    if parsed is None:
        from .cli import main as full_cli

        return full_cli(argv)
    _skip_openssl()
    from .client.execute import run_with_agent
    from .core.errors import report_errors

    command, args = parsed
    sys.exit(report_errors(run_with_agent, command, **args))


def _skip_openssl():
    """The client signs one small request with HMAC-SHA256: the interpreter's built-in
    SHA-256 does it in microseconds, while hashlib and hmac would first load OpenSSL
    (_hashlib), 3 to 4 ms of every start.  Marking _hashlib absent makes both use the
    built-in code, as on a Python built without OpenSSL.  Only when it is built in."""
    if {"_sha256", "_sha2"} & set(sys.builtin_module_names):
        sys.modules.setdefault("_hashlib", None)
