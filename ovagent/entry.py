"""The ``ov`` entry point.

``ov run --agent`` sits in front of every service start and CI job, so it is parsed
here with argparse alone and never imports argh, cryptography or the vault.  Every
other command goes to the full CLI in ovagent.cli, which declares ``ov run`` from the
same RUN_ARGUMENTS.
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


def _is_agent_run(argv):
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    return argv[:1] == ["run"] and "--agent" in options


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not _is_agent_run(argv):
        from .cli import main as full_cli

        return full_cli(argv)
    import argparse

    parser = argparse.ArgumentParser(prog="ov run", description=RUN_DOC)
    for flags, kwargs in RUN_ARGUMENTS:
        parser.add_argument(*flags, **kwargs)
    args = vars(parser.parse_args(argv[1:]))
    args.pop("agent")
    sys.exit(report_errors(run_via_agent, args.pop("command"), **args))
