"""The options of ``ov run``, declared once for both parsers: the full command line's
(argh over argparse, ovagent/cli.py) and the hand-written one that serves
``ov run --agent`` without loading argparse (ovagent/entry.py; tests/test_entry.py
checks the two read every command line alike).  Stdlib only, not even the regex
engine: this is on the client's hot path."""

from ..core import paths
from ..core.keyfile import CREDENTIAL_NAME
from ..core.validate import DEFAULT_APP, DEFAULT_ENV

RUN_DOC = """Run CMD with secrets added to its environment.  ov replaces itself with CMD
(same pid, unit, sandbox and terminal): without --agent it decrypts the secrets
itself; with --agent the running agent releases them sealed to ov's signed
request.  With --agent --spawn the agent runs CMD (only where it runs in the
caller's own world) and ov relays signals and exits with CMD's status (128+N if
killed by signal N)."""

APP_HELP = f"app (default: .ov.yaml, user config, then '{DEFAULT_APP}')"
ENV_HELP = f"environment (default: .ov.yaml, user config, then '{DEFAULT_ENV}')"
VAULT_HELP = (f"vault file (default: $OV_VAULT, {paths.SYSTEM_VAULT} for root, "
              "else $XDG_DATA_HOME/ov/vault.db)")
SOCKET_HELP = ("agent socket (default: $OV_AGENT_SOCK, else "
               f"$XDG_RUNTIME_DIR/{paths.AGENT_DIR}/{paths.SOCKET_NAME} when it exists, "
               f"else {paths.SYSTEM_SOCKET})")

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
                                  f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}, else "
                                  f"{paths.SYSTEM_KEY} for root or "
                                  f"$XDG_CONFIG_HOME/ov/{CREDENTIAL_NAME})"}),
    (("--app",), {"metavar": "SLUG", "help": APP_HELP}),
    (("--env",), {"metavar": "SLUG", "help": ENV_HELP}),
    (("--secrets",), {"metavar": "A,B", "help": "only these secrets (default: "
                                                ".ov.yaml's list, else all of app/env)"}),
    (("--vault",), {"metavar": "PATH", "help": VAULT_HELP}),
)


def parse_run_agent(argv):
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
