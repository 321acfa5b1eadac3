"""The ``ov`` entry point.

``ov run --agent`` sits in front of every service start and CI job, so it is parsed
here, from the same RUN_ARGUMENTS the full CLI declares ``ov run`` with, and never
imports argparse, argh, cryptography, the vault or even the regex engine (argparse
alone, with the gettext, locale and shutil it pulls in, costs a fifth of the client's
start-up).  Anything the fast parser does not take, ``--help`` included, goes to the
full CLI in ovagent.cli, which then prints argparse's usage or error.
"""

import sys

RUN_DOC = """Run CMD with secrets added to its environment.  ov replaces itself with CMD
(same pid, unit, sandbox and terminal): without --agent it decrypts the secrets
itself; with --agent the running agent releases them sealed to ov's signed
request.  With --agent --spawn the agent runs CMD (only where it runs in the
caller's own world) and ov relays signals and exits with CMD's status (128+N if
killed by signal N)."""

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
                    "help": "get the secrets from the running agent, sealed to this "
                            "request, instead of unlocking the vault"}),
    (("--spawn",), {"action": "store_true", "default": False,
                    "help": "with --agent: let the agent run CMD and relay its exit "
                            "status (refused unless the agent runs in this process's "
                            "world: same uid, namespaces, limits)"}),
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
                  secrets=None, vault=None, spawn=False):
    """``ov run --agent``: execs the command with the released secrets, or (with
    --spawn) returns the exit status to leave with."""
    from . import client, config
    from .errors import UsageError
    from .runner import exec_with_secrets

    if vault:
        raise UsageError("--vault is the agent's business; it cannot go with --agent")
    target = config.resolve(app, env, secrets)
    where = dict(socket_path=socket or client.default_socket_path(),
                 key=client.find_key(machine_key), app=target.app, env=target.env,
                 secrets=target.secrets)
    if spawn:
        return client.spawn(list(command), **where)
    exec_with_secrets(list(command), client.release(command[0], **where))


def _fast_run_options(argv):
    """Parse ``run --agent ...`` exactly as the full CLI would, or return None and let
    it decide: errors, --help, abbreviated options, and anything starting with a dash
    that argparse might read differently (an option value, or a command argument with
    no ``--`` before it).  Hand-written rather than getopt, whose gettext import pulls
    in the regex engine."""
    flags = {flags[0]: kwargs for flags, kwargs in RUN_ARGUMENTS if flags[0] != "command"}
    switches = {flag for flag, kwargs in flags.items() if kwargs.get("action") == "store_true"}
    args = {flag[2:].replace("-", "_"): False if flag in switches else None
            for flag in flags}
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--":
            command = list(rest)
            break
        if not arg.startswith("-"):
            command = [arg, *rest]
            if any(word.startswith("-") for word in command):
                return None
            break
        flag, assigned, value = arg.partition("=")
        if flag not in flags or (flag in switches and assigned):
            return None
        if flag not in switches and not assigned:
            value = next(rest, None)
        if value is None or value.startswith("-"):
            return None
        args[flag[2:].replace("-", "_")] = True if flag in switches else value
    else:
        return None
    if not command or not args.pop("agent"):
        return None
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
