"""The ``ov`` command line (argh): presentation only.  Every command prints one-line
errors and exits with the documented code (ovagent.core.errors); argh < 0.29 would
exit 0 on its own CommandError, so we never rely on it.
"""

import argparse
import inspect
import os
import sys

import argh

from . import __version__
from .client import config, options, rollout
from .core import keyfile, paths, unlock
from .core.errors import (EXIT_AUTH, AgentError, NotFoundError, OvError, UsageError,
                          report_errors, warn)
from .core.validate import DEFAULT_APP, DEFAULT_ENV, check_name, check_slug

DESCRIPTION = ("ov: a local-first, zero-knowledge secrets vault, and an agent that "
               "releases its secrets to signed requests.  See ov(1).")
MIN_PASSWORD_LEN = 8
RUN_HELP = "run a command with secrets in its environment"

VAULT = argh.arg("--vault", metavar="PATH", help=options.VAULT_HELP)
APP = argh.arg("--app", metavar="SLUG", help=options.APP_HELP)
ENV = argh.arg("--env", metavar="SLUG", help=options.ENV_HELP)
MACHINE_KEY = argh.arg("--machine-key", metavar="PATH",
                       help="unlock with this machine key file instead of the password")
PASSWORD_STDIN = argh.arg("--password-stdin",
                          help="read the master password from the first line of stdin")
APP_NAME = argh.arg("app", help="the app's name (a slug)")
ENV_NAME = argh.arg("env", help="the environment's name (a slug)")
SECRET_NAME = argh.arg("name", help="the secret's name (an environment variable name)")
PASSWORD_FD = argh.arg("--password-fd", metavar="FD", type=int,
                       help="read the master password from the first line of this open "
                            "file descriptor (stdin carries the value)")


# -- helpers ---------------------------------------------------------------


def _open_vault(path):
    from .core.vault import Vault

    return Vault.open(path or paths.vault_path())


def _writable(vault, keyring=None):
    """*vault*, writing through to its fleet's shared store first if it has one."""
    from .client import fleet

    fleet.write_through(vault, keyring)
    return vault


def _declare(arguments):
    """Apply argparse declarations (flags, kwargs) as argh decorators."""
    def decorate(function):
        for flags, kwargs in reversed(arguments):
            function = argh.arg(*flags, **kwargs)(function)
        return function
    return decorate


def _new_password(password_stdin):
    if password_stdin:
        password = unlock.read_line("the new master password")
    else:
        password = unlock.prompt("New master password: ", "--password-stdin")
        if unlock.prompt("Repeat it: ", "--password-stdin") != password:
            raise UsageError("the passwords do not match")
    if len(password) < MIN_PASSWORD_LEN:
        raise UsageError(f"the master password needs at least {MIN_PASSWORD_LEN} "
                         "characters")
    return password


def _when(timestamp):
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


# -- ov auth ---------------------------------------------------------------


@VAULT
@PASSWORD_STDIN
def init(*, vault=None, password_stdin=False):
    """Create a new vault protected by a master password."""
    from .core.vault import Vault

    path = vault or paths.vault_path()
    if os.path.exists(path):
        raise UsageError(f"a vault already exists at {path}")
    created, _ = Vault.create(path, _new_password(password_stdin))
    print(f"Created vault {created.store.path}")


@VAULT
@PASSWORD_STDIN
def change_password(*, vault=None, password_stdin=False):
    """Change the master password (machine keys keep working).

    With --password-stdin, stdin holds the current password, then the new one."""
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, password_stdin=password_stdin,
                            instead="--password-stdin")
    _writable(opened, keyring).change_password(keyring, _new_password(password_stdin))
    print("Master password changed")


@argh.arg("--out", metavar="PATH", required=True, help="where to write the key")
@argh.arg("--app", metavar="SLUG",
          help="scope the key to one app (it cannot decrypt any other app)")
@argh.arg("--force", help="overwrite an existing file")
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
def derive_machine_key(*, out=None, app=None, force=False, vault=None,
                       machine_key=None, password_stdin=False):
    """Write a machine key (raw 32 bytes, mode 0600) for ov run and ov agent."""
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key,
                            password_stdin=password_stdin, app=app)
    keyfile.write_key(out, opened.machine_key(keyring, app), force=force)
    scope = f"app {app!r} only" if app else "every app in the vault"
    print(f"Wrote machine key {out} (decrypts {scope}).", file=sys.stderr)
    print("WARNING: anyone who can read this file can decrypt those secrets. Keep it "
          "0600, off backups and out of version control; revoke a scoped key with "
          "'ov app rotate-key'.", file=sys.stderr)


@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
def upgrade(*, vault=None, machine_key=None, password_stdin=False):
    """Upgrade a vault of format 1 to format 2, which keeps each secret's head (its
    current version), once: what is stored now is taken as current."""
    from .core.vault import Vault

    opened = Vault.open(vault or paths.vault_path(), upgrading=True)
    pinned = None if opened.current else opened.upgrade(unlock.unlock(
        opened, machine_key=machine_key, password_stdin=password_stdin))
    if pinned is None:
        print(f"Vault {opened.store.path} is of format {opened.format} already")
        return
    for app, env, versions in pinned:
        print(f"pinned {app}/{env}: " + ", ".join(f"{name} v{version}" for name, version
                                                  in sorted(versions.items())))
    print(f"Upgraded vault {opened.store.path} to format {opened.format}: the versions "
          "above are now the current ones.  Run this once; if ov asks for it again, "
          "the vault file was rolled back (docs: ov-auth(1))")


# -- rolling a change out ----------------------------------------------------

APPLY = [(("--apply",), {"choices": rollout.ACTIONS,
                         "help": "then have systemd restart (try-restart) or reload "
                                 "(try-reload-or-restart) each running unit that holds "
                                 "an older version, as the agent knows them (none: "
                                 "only say which units, and the command; without it, "
                                 "ov secret set does what the policy's on_change says, "
                                 "else names them)"}),
         (("--splay",), {"type": float, "metavar": "SECONDS",
                         "help": "seconds between two units (default 0)"}),
         (("--keep-going",), {"help": "act on the other units after one failed"})]


def _check_splay(splay):
    """--splay, checked before anything is written."""
    if splay is not None and not 0 <= splay <= 86400:     # also refuses NaN
        raise UsageError(f"--splay {splay}: give 0 to 86400 seconds")


def _roll_out(app, env, versions, *, apply=None, splay=None, keep_going=False,
              machine_key=None):
    """After a change: the running units that hold an older version of *versions*
    (name -> current version; None: any secret of app/env), restarted or reloaded
    (*apply*), else named with the command that would.  Without --apply, an agent
    that cannot be asked is no error."""
    from .client import talk

    try:
        units = rollout.holders(app, env, versions, key=talk.find_key(machine_key))
    except OvError as exc:
        if apply is None:
            return
        raise AgentError(f"cannot ask the agent which units to {apply}: {exc}") from None
    actions = [apply] * len(units) if apply is not None else _on_change(units, versions)
    if not units:
        print("No running unit holds an older version")
    for verb in rollout.VERBS:
        chosen = [unit for unit, action in zip(units, actions) if action == verb]
        if chosen:
            rollout.apply(chosen, verb, splay=splay or 0.0, keep_going=keep_going,
                          record=(app, env, versions))
    for line in rollout.advice([unit for unit, action in zip(units, actions)
                                if action not in rollout.VERBS]):
        print(line)


def _on_change(units, versions):
    """The action the agent's policy gives each of *units* (on_change, in the allow
    rule that lets it have the changed secrets; None: none), when --apply says none."""
    from .agent import daemon, policy_files
    from .agent.policy import Caller

    system = paths.client_socket() == paths.SYSTEM_SOCKET
    try:
        policy = policy_files.read_policy(paths.policy_dir(system),
                                          daemon.policy_owners(system))
    except OvError as exc:
        warn(f"the policy's on_change is not used: {exc}")
        return [None] * len(units)
    if not policy.enforcing:
        return [None] * len(units)
    return [policy.on_change(Caller.of_uid(unit["uid"], unit["unit"], unit["user_manager"]),
                             unit["app"], unit["env"], list(versions)) for unit in units]


# -- ov app ----------------------------------------------------------------


@argh.named("create")
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
@APP_NAME
def app_create(app, *, vault=None, machine_key=None, password_stdin=False):
    """Create an app with its own random key."""
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key,
                            password_stdin=password_stdin)
    _writable(opened, keyring).create_app(keyring, app)
    print(f"Created app {app}")


@argh.named("list")
@VAULT
def app_list(*, vault=None):
    """List apps with their environments."""
    opened = _open_vault(vault)
    for record in opened.list_apps():
        envs = ",".join(name for name, _ in opened.list_envs(record.name)) or "-"
        print(f"{record.name}\tkey-generation={record.generation}\tenvs={envs}")


@argh.named("delete")
@argh.arg("--force", help="also delete its environments and secrets")
@VAULT
@APP_NAME
def app_delete(app, *, force=False, vault=None):
    """Delete an app (refuses while it has environments, unless --force)."""
    opened = _open_vault(vault)
    if opened.list_envs(app) and not force:
        raise UsageError(f"app {app!r} still has environments; pass --force to "
                         "delete them and their secrets too")
    _writable(opened).delete_app(app)
    print(f"Deleted app {app}")


@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
@APP_NAME
@_declare(APPLY)
def rotate_key(app, *, vault=None, machine_key=None, password_stdin=False, apply=None,
               splay=None, keep_going=False):
    """Give an app a new key; machine keys scoped to it stop working (with --apply,
    restart or reload every running unit of the app, to take up a new key)."""
    _check_splay(splay)
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key,
                            password_stdin=password_stdin)
    generation = _writable(opened, keyring).rotate_app_key(keyring, app)
    print(f"Rotated key of app {app} (generation {generation}); old scoped machine "
          "keys for it no longer work")
    if apply is not None:
        _roll_out(app, None, None, apply=apply, splay=splay, keep_going=keep_going,
                  machine_key=machine_key)


# -- ov env ----------------------------------------------------------------


@argh.named("create")
@APP
@VAULT
@ENV_NAME
def env_create(env, *, app=None, vault=None):
    """Create an environment in an app."""
    target = config.resolve(app, vault=True, takes=("app",))
    _writable(_open_vault(vault)).create_env(target.app, env)
    print(f"Created env {target.app}/{env}")


@argh.named("list")
@APP
@VAULT
def env_list(*, app=None, vault=None):
    """List the environments of an app."""
    target = config.resolve(app, vault=True, takes=("app",))
    for name, created in _open_vault(vault).list_envs(target.app):
        print(f"{name}\tcreated={_when(created)}")


@argh.named("delete")
@APP
@VAULT
@ENV_NAME
def env_delete(env, *, app=None, vault=None):
    """Delete an environment and all of its secrets."""
    target = config.resolve(app, vault=True, takes=("app",))
    _writable(_open_vault(vault)).delete_env(target.app, env)
    print(f"Deleted env {target.app}/{env}")


# -- ov secret -------------------------------------------------------------


@argh.named("set")
@SECRET_NAME
@APP
@ENV
@VAULT
@MACHINE_KEY
@PASSWORD_FD
@_declare(APPLY)
def secret_set(name, *, app=None, env=None, vault=None, machine_key=None,
               password_fd=None, apply=None, splay=None, keep_going=False):
    """Store a new version of a secret; the value is read from stdin (one trailing
    newline removed) or prompted for without echo, never taken from the command line."""
    check_name(name)
    _check_splay(splay)
    target = config.resolve(app, env, vault=True)
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key, password_fd=password_fd,
                            app=target.app, instead="--machine-key or --password-fd")
    if sys.stdin.isatty():
        value = unlock.prompt(f"Value of {name}: ", "stdin", what=f"the value of {name}")
    else:
        value = sys.stdin.buffer.read()
        value = value[:-1] if value.endswith(b"\n") else value
    version = _writable(opened, keyring).set_secrets(keyring, target.app, target.env,
                                                     {name: value})[name]
    print(f"Set {name} in {target.app}/{target.env} (version {version})")
    _roll_out(target.app, target.env, {name: version}, apply=apply, splay=splay,
              keep_going=keep_going, machine_key=machine_key)


@argh.named("list")
@APP
@ENV
@VAULT
def secret_list(*, app=None, env=None, vault=None):
    """List secret names, versions and times (never values)."""
    target = config.resolve(app, env, vault=True)
    for record in _open_vault(vault).list_secrets(target.app, target.env):
        print(f"{record.name}\tv{record.version}\tupdated={_when(record.created)}")


@argh.named("delete")
@APP
@ENV
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
@SECRET_NAME
def secret_delete(name, *, app=None, env=None, vault=None, machine_key=None,
                  password_stdin=False):
    """Delete a secret with all its versions (unlocking: its head, sealed under the
    app's key, goes with it only after the store agrees with it)."""
    check_name(name)
    target = config.resolve(app, env, vault=True)
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key,
                            password_stdin=password_stdin, app=target.app)
    _writable(opened, keyring).delete_secret(keyring, target.app, target.env, name)
    print(f"Deleted {name} from {target.app}/{target.env}")


@argh.named("import")
@APP
@ENV
@argh.arg("--dry-run", help="parse and report, store nothing")
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
@argh.arg("file", help="the dotenv file to import (NAME=VALUE lines)")
def secret_import(file, *, app=None, env=None, dry_run=False, vault=None,
                  machine_key=None, password_stdin=False):
    """Import a dotenv file; all of it is stored in one transaction, or nothing."""
    from .client import dotenv
    from .core.errors import warn

    target = config.resolve(app, env, vault=True)
    entries = dotenv.load(file)
    values = {name: value for _, name, value in entries}
    opened = _open_vault(vault)
    if dry_run:
        opened.require_env(target.app, target.env)
    else:
        keyring = unlock.unlock(opened, machine_key=machine_key,
                                password_stdin=password_stdin, app=target.app)
        _writable(opened, keyring).set_secrets(keyring, target.app, target.env, values)
    for line, name, value in entries:  # never the value itself
        if b"${" in value:
            warn(f"{file}:{line}: {name} contains '${{': ov stores it literally, "
                 "other dotenv tools would expand it")
    verb = "would import" if dry_run else "imported"
    for line, name, _ in entries:
        print(f"{verb} {name} (line {line})")
    print(f"{'Would import' if dry_run else 'Imported'} {len(values)}/{len(entries)} "
          f"secret(s) into {target.app}/{target.env}")


# -- ov run ----------------------------------------------------------------

SOCKET = argh.arg("--socket", metavar="PATH", help=options.SOCKET_HELP)


@_declare(options.RUN_ARGUMENTS)
def run(*command, agent=False, spawn=False, socket=None, machine_key=None, app=None,
        env=None, secrets=None, vault=None):
    from .client.execute import run_with_agent, run_with_vault

    if agent:  # normally served by ovagent.entry without loading this module
        sys.exit(run_with_agent(command, socket=socket, machine_key=machine_key, app=app,
                                env=env, secrets=secrets, vault=vault, spawn=spawn))
    for flag, given in (("--socket", socket), ("--spawn", spawn)):
        if given:
            raise UsageError(f"{flag} needs --agent")
    run_with_vault(command, machine_key=machine_key, app=app, env=env, secrets=secrets,
                   vault=vault)


run.__doc__ = options.RUN_DOC


# -- ov agent --------------------------------------------------------------

PID_FILE = argh.arg("--pid-file", metavar="PATH",
                    help="pid file (default: ov-agent.pid beside the socket)")
POLICY_DIR = argh.arg("--policy-dir", metavar="PATH",
                      help="policy directory (default: /etc/ov/policy.d with --system, "
                           "else $XDG_CONFIG_HOME/ov/policy.d)")
POLICY_MODE = argh.arg("--policy", choices=("auto", "enforce"),
                       help="auto (the default): enforce the policy once a policy file "
                            "exists, else serve every request a key allows; enforce: "
                            "deny whatever no policy file allows, even with none")
POLICY_SYSTEM = argh.arg("--system", help="the system agent's policy (/etc/ov/policy.d) "
                                          "instead of your own agent's")


@argh.named("start")
@argh.arg("--machine-key", metavar="PATH",
          help="machine key (default: $CREDENTIALS_DIRECTORY/machine.kek, else the "
               "master password on a terminal)")
@argh.arg("--app", metavar="SLUG", help="default app of requests that name none")
@SOCKET
@PID_FILE
@argh.arg("--foreground", help="do not detach (implied under systemd)")
@argh.arg("--max-clients", type=int, metavar="N",
          help="concurrent requests before answering 'busy' (default 64)")
@argh.arg("--grace", type=float, metavar="SECONDS",
          help="SIGTERM to SIGKILL delay for commands whose client vanished (default 5)")
@argh.arg("--drain", type=float, metavar="SECONDS",
          help="how long a stopping agent waits for running commands (default 30)")
@argh.arg("--system", help="be the system agent (ov-agent.service): serve callers of "
                           "every uid (the socket's permissions decide who may "
                           "connect; else only the agent's own uid and root), and "
                           "use the system vault and key")
@VAULT
@POLICY_DIR
@POLICY_MODE
def agent_start(*, machine_key=None, app=None, socket=None, pid_file=None,
                foreground=False, max_clients=None, grace=None, drain=None,
                system=False, vault=None, policy_dir=None, policy="auto"):
    """Start the agent: hold the key in memory and serve 'ov run --agent'."""
    from .agent import daemon

    if app:
        check_slug("app", app)
    sys.exit(daemon.start(machine_key=machine_key, app=app, socket_path=socket,
                          pid_file=pid_file, foreground=foreground, vault=vault,
                          max_clients=max_clients, grace=grace, drain=drain,
                          system=system, policy_dir=policy_dir,
                          enforce_policy=policy == "enforce"))


@argh.named("stop")
@SOCKET
@PID_FILE
def agent_stop(*, socket=None, pid_file=None):
    """Send SIGTERM to the agent and return; running requests finish first."""
    from .agent import daemon

    pid = daemon.stop(pid_file or paths.pid_file(socket))
    print(f"Sent SIGTERM to ov-agent (pid {pid})")


@argh.named("status")
@SOCKET
@PID_FILE
@argh.arg("--machine-key", metavar="PATH", help="key to sign the status request with")
def agent_status(*, socket=None, pid_file=None, machine_key=None):
    """Ask the agent for its version, uptime, mode and counters (signed); fall back
    to the pid file when it cannot be asked."""
    from .agent import daemon
    from .client import talk

    path = socket or paths.client_socket()
    try:
        info = talk.status(path, talk.find_key(machine_key))
    except OvError as exc:
        pid_path = pid_file or paths.pid_file(path)
        pid = daemon.read_pid_file(pid_path)
        if pid is not None and daemon.agent_alive(pid):
            print(f"ov-agent is running (pid {pid}, from pid file {pid_path}); it did "
                  f"not answer: {exc}")
            return
        raise NotFoundError(f"ov-agent is not running: {exc}; no live agent in pid "
                            f"file {pid_path}") from None
    counters = " ".join(f"{k}={v}" for k, v in sorted(info["counters"].items()))
    print(f"ov-agent {info['version']} (pid {info['pid']}) up {info['uptime']}s on {path}")
    print(f"mode: {info['mode']}; key scope: {info['scope']}; default app: "
          f"{info['default_app']}")
    print(f"requests: {counters}")
    print(f"policy: {info.get('policy', 'not reported by this agent')}")
    if info.get("reason"):
        print(f"unconfigured: {info['reason']}")


@argh.named("consumers")
@SOCKET
@argh.arg("--machine-key", metavar="PATH", help="key to sign the request with")
@argh.arg("--app", metavar="SLUG", help="only this app")
@argh.arg("--env", metavar="SLUG", help="only this environment")
@argh.arg("--secret", metavar="NAME", help="only units that hold this secret")
def agent_consumers(*, socket=None, machine_key=None, app=None, env=None, secret=None):
    """List the running units the agent released secrets to, and the versions they
    hold (never values); root or the agent's own user only."""
    from .client import talk

    units = talk.consumers(socket or paths.client_socket(), talk.find_key(machine_key),
                           app, env, [check_name(secret)] if secret else None)
    for unit in units:
        print(rollout.describe(unit))


@argh.named("install")
@argh.arg("--machine-key", metavar="PATH", required=True,
          help="key file systemd passes to the agent as its machine.kek credential "
               "(it may be created later)")
@argh.arg("--socket", metavar="PATH",
          help="socket path (default: /run/NAME/NAME.sock for system units, "
               "$XDG_RUNTIME_DIR/NAME/NAME.sock for user units)")
@argh.arg("--unit-name", metavar="NAME", help="name of the units (default: ov-agent)")
@argh.arg("--user", help="write user units (the default when not run as root)")
@argh.arg("--enable", help="run the commands that enable the units (as root "
                           "systemd-sysusers and systemd-tmpfiles, then systemctl "
                           "daemon-reload, systemctl enable --now NAME.socket)")
def agent_install(*, machine_key=None, socket=None, unit_name=None, user=False,
                  enable=False):
    """Write systemd units (NAME.socket, NAME.service) that run this ov's agent:
    system units in /etc/systemd/system as root, else user units in
    ~/.config/systemd/user; print or run the commands that enable them."""
    from .agent import install

    install.install(machine_key=machine_key, socket=socket, unit_name=unit_name,
                    user=user, enable=enable)


# -- ov store, ov sync -----------------------------------------------------

DSN_HELP = ("the PostgreSQL database, as libpq takes it: postgresql://HOST/DB"
            "?sslmode=verify-full, 'service=NAME', ... (no password in it: PGPASSFILE)")
DSN = argh.arg("dsn", metavar="CONNINFO", help=DSN_HELP)


@argh.named("init")
@argh.arg("dsn", metavar="CONNINFO", help=DSN_HELP)
@argh.arg("--print-sql", help="print the SQL that creates a read-only role for servers "
                              "and a writer role for admin hosts (and, optionally, "
                              "row-level security per app), then exit")
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
def store_init(*dsn, print_sql=False, vault=None, machine_key=None,
               password_stdin=False):
    """Create the shared store's schema and push this vault into it; this vault then
    writes through to it."""
    from .client import fleet

    if print_sql:
        from .client.pgstore import ROLES_SQL

        print(ROLES_SQL, end="")
        return
    if len(dsn) != 1:
        raise UsageError("name the store, once: ov store init CONNINFO")
    dsn, = dsn
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key, password_stdin=password_stdin)
    pushed = fleet.init(opened, keyring, dsn)
    print(f"Pushed {pushed} secret version(s) to the shared store")


@argh.named("join")
@DSN
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
def store_join(dsn, *, vault=None, machine_key=None, password_stdin=False):
    """Create this host's vault as a replica of the shared store, and pull it."""
    from .client import fleet

    path = vault or paths.vault_path()
    changed = fleet.join(path, dsn, lambda opened: unlock.unlock(
        opened, machine_key=machine_key, password_stdin=password_stdin))
    print(f"Joined: {path} replicates the store ({_changes(changed)})")


@argh.named("status")
@VAULT
def store_status(*, vault=None):
    """Say which store this vault replicates and when it last pulled from it."""
    from .client import fleet

    opened = _open_vault(vault)
    if not fleet.replica.joined(opened):
        raise NotFoundError("this vault is not part of a fleet")
    found = fleet.status(opened)
    print(f"store: {found['store']}")
    print(f"last pull: {_when(found['synced']) if found['synced'] else 'never'} "
          f"(change {found['position']})")
    if found["conflict"]:
        when, _, what = found["conflict"].partition(" ")
        print(f"last conflict: {_when(float(when))}: {what}")
    if found["latest"] is None:
        print(f"store now: {found['unreachable']}")
    else:
        behind = ", ".join(found["behind"]) or "none"
        print(f"store now: change {found['latest']}; environments behind: {behind}")


def _changes(changed):
    names = sum(len(names) for _, _, names in changed)
    envs = sum(1 for _, _, names in changed if names)
    return f"{names} secret(s) changed in {envs} environment(s)"


@argh.arg("--follow", help="keep pulling: on each change the store announces "
                           "(LISTEN), and every 5 minutes (ov-sync.service)")
@VAULT
@MACHINE_KEY
@PASSWORD_STDIN
@_declare(APPLY)
def sync(*, follow=False, vault=None, machine_key=None, password_stdin=False,
         apply=None, splay=None, keep_going=False):
    """Pull what changed in the shared store into this host's vault (writes go to
    the store as they are made); with --apply, roll each change out to the units of
    this host that hold an older version."""
    from .client import fleet

    _check_splay(splay)
    opened = _open_vault(vault)
    keyring = unlock.unlock(opened, machine_key=machine_key, password_stdin=password_stdin)

    def synced(changed, quiet=False):
        _report_sync(changed, quiet)
        for app, env, names in changed if apply else ():
            current = {record.name: record.version
                       for record in opened.list_secrets(app, env) if record.name in names}
            if not current:          # only deletions: nothing newer to roll out
                continue
            try:
                _roll_out(app, env, current, apply=apply, splay=splay,
                          keep_going=keep_going, machine_key=machine_key)
            except OvError as exc:
                if not follow:
                    raise
                warn(f"{exc}; the next change is rolled out all the same")

    if follow:
        fleet.follow(opened, keyring, lambda changed: synced(changed, quiet=True),
                     lambda exc: warn(f"{exc}; trying again"))
    synced(fleet.pull(opened, keyring))


def _report_sync(changed, quiet=False):
    if quiet and not any(names for _, _, names in changed):
        return
    print(f"Synced: {_changes(changed)}", flush=True)
    for app, env, names in changed:
        if names:
            print(f"  {app}/{env}: {', '.join(names)}", flush=True)


# -- ov agent policy -------------------------------------------------------


def _policy(policy_dir, system, policy):
    """The policy the agent would load now (as root, though: unsandboxed)."""
    from .agent import daemon, policy_files

    directory = os.path.abspath(policy_dir or paths.policy_dir(system))
    return policy_files.read_policy(directory, daemon.policy_owners(system),
                                    enforce=policy == "enforce",
                                    required=policy_dir is not None)


@argh.named("check")
@argh.arg("--unit", metavar="UNIT", help="the caller's unit (a system unit, such as "
                                         "myapp.service; default: none)")
@argh.arg("--user", metavar="USER", required=True, help="the caller's user: a name or uid")
@argh.arg("--group", metavar="GROUPS", help="the caller's groups, comma-separated names "
                                            "or gids, the primary first (default: "
                                            "USER's, from the group database)")
@argh.arg("--app", metavar="SLUG", help="the app asked for (default: default)")
@argh.arg("--env", metavar="SLUG", help="the environment asked for (default: production)")
@argh.arg("--secrets", metavar="NAMES", help="the secrets asked for, comma-separated "
                                             "(default: none named: which may it get?)")
@POLICY_SYSTEM
@POLICY_DIR
@POLICY_MODE
def policy_check(*, unit=None, user=None, group=None, app=None, env=None, secrets=None,
                 system=False, policy_dir=None, policy="auto"):
    """Say whether the agent's policy lets a caller receive secrets (ALLOW, exit 0;
    DENY, exit 4), and which rule decides; without the agent."""
    from .agent.policy import Caller

    caller = Caller.named(user, group.split(",") if group else None, unit)
    app, env = check_slug("app", app or DEFAULT_APP), check_slug("env", env or DEFAULT_ENV)
    policy = _policy(policy_dir, system, policy)
    if secrets:
        decision = policy.decide(caller, app, env, [check_name(name) for name in
                                                    secrets.split(",")])
        print(f"ALLOW {secrets} of {app}/{env} to {caller} ({decision.rule})"
              if decision.allowed else f"DENY: {decision.reason}")
        sys.exit(0 if decision.allowed else EXIT_AUTH)
    decision = policy.decide(caller, app, env)
    if not decision.allowed:
        print(f"DENY: {decision.reason}")
        sys.exit(EXIT_AUTH)
    allows, denies = policy.matching(caller, app, env)
    print(f"ALLOW {caller} secrets of {app}/{env}: " + ("every secret (policy off)"
          if not policy.enforcing else "; ".join(
              f"{', '.join(rule.secrets.items)} ({rule.origin})" for rule in allows)))
    for rule in denies:
        print(f"except {', '.join(rule.secrets.items)} ({rule.origin})")


@argh.named("show")
@POLICY_SYSTEM
@POLICY_DIR
@POLICY_MODE
def policy_show(*, system=False, policy_dir=None, policy="auto"):
    """Print the policy the agent would load now, file by file and rule by rule
    (exit 2 and why, if it would refuse it)."""
    policy = _policy(policy_dir, system, policy)
    print(f"policy: {policy.summary()}")
    for name, digest, count in policy.files:
        print(f"{name}: {count} rule(s), sha256 {digest}")
    for rule in policy.rules:
        print(rule.describe())


# -- assembly --------------------------------------------------------------

GROUPS = [
    ("auth", "master password, vault and machine keys",
     [init, change_password, derive_machine_key, upgrade]),
    ("app", "apps (each with its own key)", [app_create, app_list, app_delete, rotate_key]),
    ("env", "environments of an app", [env_create, env_list, env_delete]),
    ("secret", "secrets of an environment",
     [secret_set, secret_list, secret_delete, secret_import]),
    ("agent", "the agent daemon", [agent_start, agent_stop, agent_status,
                                   agent_consumers, agent_install]),
    ("store", "a fleet's shared store (PostgreSQL)", [store_init, store_join,
                                                       store_status]),
]
SUBGROUPS = [("agent", "policy", "the agent's per-caller policy",
              [policy_check, policy_show])]


def _add_group(parser, name, help_text, functions):
    """argh 0.26 calls groups namespaces; argh >= 0.30 calls them group_name."""
    if "group_name" in inspect.signature(argh.add_commands).parameters:
        argh.add_commands(parser, functions, group_name=name,
                          group_kwargs={"title": help_text})
    else:
        argh.add_commands(parser, functions, namespace=name,
                          namespace_kwargs={"help": help_text, "title": help_text})


def _subcommand(parser, name):
    """The parser of subcommand *name* (to give it subcommands of its own)."""
    action = next(action for action in parser._actions
                  if isinstance(action, argparse._SubParsersAction))
    return action.choices[name]


def _drop_short_options(parser):
    """argh >= 0.30 invents one-letter options (-a for --app) that argh 0.26 does not:
    drop them so the CLI, its --help and the man pages are the same everywhere."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _drop_short_options(subparser)
        short = [o for o in action.option_strings if len(o) == 2 and o != "-h"]
        for option in short:
            action.option_strings.remove(option)
            parser._option_string_actions.pop(option, None)


def _plain_help(parser):
    """argh's formatter appends '(default: ...)' to every help text, which already
    says what the default is: use argparse's plain one throughout."""
    parser.formatter_class = argparse.HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _plain_help(subparser)


# shtab.FILE (shtab only builds the completion scripts: debian/rules)
FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


def _complete_files(parser):
    """Options whose value is a path, and `secret import`'s FILE, complete file names
    in the shell completion shtab generates from this parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _complete_files(subparser)
        elif action.metavar == "PATH" or (not action.option_strings
                                          and action.dest == "file"):
            action.complete = FILE_COMPLETION


def build_parser():
    parser = argh.ArghParser(prog="ov", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ov {__version__}")
    for name, help_text, functions in GROUPS:
        _add_group(parser, name, help_text, functions)
    for group, name, help_text, functions in SUBGROUPS:
        _add_group(_subcommand(parser, group), name, help_text, functions)
    argh.add_commands(parser, [run], func_kwargs={"help": RUN_HELP})
    argh.add_commands(parser, [sync], func_kwargs={
        "help": "pull what changed in the shared store (a fleet)"})
    _drop_short_options(parser)
    _plain_help(parser)
    _complete_files(parser)
    return parser


def main(argv=None):
    report_errors(argh.dispatch, build_parser(), argv=argv, completion=False)
