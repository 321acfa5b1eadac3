"""The ``ov`` entry point.

``ov run --agent`` sits in front of every service start and CI job, so it is parsed
here with getopt, from the same RUN_ARGUMENTS the full CLI declares ``ov run`` with,
and never imports argparse, argh, cryptography or the vault (argparse alone, with
the gettext, locale and shutil it pulls in, costs a fifth of the client's start-up).
Anything getopt refuses, ``--help`` included, goes to the full CLI in ovagent.cli,
which then prints argparse's usage or error.
"""

import sys

RUN_DOC = """Run CMD with secrets added to its environment.  Without --agent, ov decrypts
and replaces itself with CMD; with --agent, the agent spawns CMD and ov relays
signals and exits with CMD's status (128+N if killed by signal N)."""

APP_HELP = "app (default: .ov.yaml, user config, then 'default')"
ENV_HELP = "environment (default: .ov.yaml, user config, then 'production')"
VAULT_HELP = ("vault file (default: $OV_VAULT, /var/lib/ov/vault.db for root, "
              "else $XDG_DATA_HOME/ov/vault.db)")
SOCKET_HELP = ("agent socket (default: $OV_AGENT_SOCK, else "
               "$XDG_RUNTIME_DIR/ov-agent/ov-agent.sock when it exists, else "
               "/run/ov-agent/ov-agent.sock)")

RUN_ARGUMENTS = (
    (("command",), {"nargs": "+", "metavar": "CMD",
                    "help": "the command and its arguments"}),
    (("--agent",), {"action": "store_true", "default": False,
                    "help": "let the running agent decrypt and spawn CMD; plaintext "
                            "never leaves the agent"}),
    (("--socket",), {"metavar": "PATH", "help": SOCKET_HELP}),
    (("--machine-key",), {"metavar": "PATH",
                          "help": "machine key (default with --agent: "
                                  "$CREDENTIALS_DIRECTORY/machine.kek, else "
                                  "/etc/ov/machine.kek for root or "
                                  "$XDG_CONFIG_HOME/ov/machine.kek)"}),
    (("--app",), {"metavar": "SLUG", "help": APP_HELP}),
    (("--env",), {"metavar": "SLUG", "help": ENV_HELP}),
    (("--secrets",), {"metavar": "A,B", "help": "only these secrets (default: "
                                                ".ov.yaml's list, else all of app/env)"}),
    (("--vault",), {"metavar": "PATH", "help": VAULT_HELP}),
)


def report_errors(function, *args, **kwargs):
    """Run function; turn OvError into 'ov: message' and its exit code."""
    from .errors import EXIT_INTERRUPTED, OvError

    try:
        return function(*args, **kwargs)
    except OvError as exc:
        print(f"ov: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("ov: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def run_via_agent(command, *, socket=None, machine_key=None, app=None, env=None,
                  secrets=None, vault=None):
    """``ov run --agent``: returns the exit status to leave with."""
    from . import client, config
    from .errors import UsageError

    if vault:
        raise UsageError("--vault is the agent's business; it cannot go with --agent")
    target = config.resolve(app, env, secrets)
    return client.run(list(command), socket_path=socket or client.default_socket_path(),
                      key=client.find_key(machine_key), app=target.app, env=target.env,
                      secrets=target.secrets)


def _fast_run_options(argv):
    """Parse ``run --agent ...`` exactly as the full CLI would, or return None and let
    it decide: errors, --help, and anything starting with a dash that argparse might
    read differently (an option value, or a command argument with no ``--`` before
    it)."""
    import getopt

    flags = {flags[0]: kwargs for flags, kwargs in RUN_ARGUMENTS if flags[0] != "command"}
    long_options = [flag[2:] + ("" if kwargs.get("action") == "store_true" else "=")
                    for flag, kwargs in flags.items()]
    rest = argv[1:]
    try:
        options, command = getopt.getopt(rest, "", long_options)
    except getopt.GetoptError:
        return None
    separated = rest[len(rest) - len(command) - 1:][:1] == ["--"]
    if not command or ("--agent", "") not in options or (
            any(value.startswith("-") for _, value in options)) or (
            not separated and any(arg.startswith("-") for arg in command)):
        return None
    args = {flag[2:].replace("-", "_"): None for flag in flags if flag != "--agent"}
    args.update((name[2:].replace("-", "_"), value) for name, value in options
                if name != "--agent")
    return command, args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = _fast_run_options(argv) if argv[:1] == ["run"] else None
    if parsed is None:
        from .cli import main as full_cli

        return full_cli(argv)
    command, args = parsed
    _skip_openssl()
    sys.exit(report_errors(run_via_agent, command, **args))


def _skip_openssl():
    """The client signs one small request with HMAC-SHA256: the interpreter's built-in
    SHA-256 does it in microseconds, while hashlib and hmac would first load OpenSSL
    (_hashlib), 3 to 4 ms of every start.  Marking _hashlib absent makes both use the
    built-in code, as on a Python built without OpenSSL.  Only when it is built in."""
    if {"_sha256", "_sha2"} & set(sys.builtin_module_names):
        sys.modules.setdefault("_hashlib", None)
