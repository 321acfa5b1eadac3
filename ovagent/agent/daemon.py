"""The agent process's lifecycle: where the key comes from, the socket (inherited
from systemd or bound by hand), detaching, the pid file, and ``ov agent stop``.
"""

import os
import signal
import socket
import stat

from ..core import files, keyfile, paths, protocol, unlock
from ..core.errors import NotFoundError, OutdatedVaultError, OvError, UsageError, warn
from ..core.procfs import process_cgroups
from ..core.vault import Vault
from ..core.audit import JOURNAL_SOCKET, Audit, journal_available, journal_sender
from .auth import KeyState
from .consumers import FILE_NAME as CONSUMERS_FILE
from .consumers import Consumers
from .policy_files import PolicySource
from .secmem import LockedPage, harden_process, wipe
from .server import Server
from .spawn import Spawner
from .state import AgentState
from .systemd import inherited_listener, under_systemd


def no_key_help(system):
    """How to give this agent a key: the system key for the system agent (whatever
    its user), else its user's; then restart its own unit (one written by 'ov agent
    install --unit-name' has another name), or the system agent's."""
    own = process_cgroups(os.getpid())[0] if os.environ.get("INVOCATION_ID") else None
    unit = own if (own or "").endswith(".service") else paths.SYSTEM_UNIT
    if system:
        key_path, scope = paths.SYSTEM_KEY, ""
    else:
        key_path, scope = paths.key_path(), "" if os.geteuid() == 0 else " --user"
    return (f"create a machine key with 'ov auth derive-machine-key --out {key_path}' "
            f"(mode 0600), then 'systemctl{scope} restart {unit}'")


# -- the key -------------------------------------------------------------------


class Unconfigured(Exception):
    """Under systemd, with no key or no vault: serve, answering why not."""


def load_keys(machine_key, vault_path, app, systemd, system):
    """Check that the key unlocks the vault: (vault, mode, key material in a bytearray
    that start() copies to the locked page and wipes).  Under systemd with nothing to
    unlock with, raise Unconfigured (the reason)."""
    key_path = keyfile.find(machine_key)
    if key_path is None and (systemd or not os.isatty(0)):
        if systemd:
            raise Unconfigured(f"the agent has no machine key: {no_key_help(system)}")
        raise UsageError("no machine key: pass --machine-key PATH, provide the systemd "
                         "credential machine.kek, or start on a terminal to unlock with "
                         "the master password")
    material = bytearray(keyfile.KEY_LEN + 1)
    key = keyfile.read_key(key_path, into=material) if key_path else None
    try:
        vault = Vault.open(vault_path or paths.vault_path(system))
        vault.require_current()
    except (NotFoundError, OutdatedVaultError) as exc:
        if systemd:
            raise Unconfigured(str(exc)) from None
        raise
    if key is None:
        # The KEK unwrapped from the password is a bytes object: it cannot be wiped.
        material[:keyfile.KEY_LEN] = unlock.unlock(vault, instead="--machine-key PATH").kek
        return vault, "interactive", material
    # Checked here, on the terminal that started us; lock_keys() unlocks for good.
    unscoped = vault.unlock_key(key, app).kek is not None
    return vault, "machine-key" if unscoped else "scoped-key", material


def lock_keys(page, vault, material, app):
    """Move the key material to the locked page (and wipe it where it was): the
    keyring and the MAC subkey then work from views of the page."""
    key = page.hold(memoryview(material)[:keyfile.KEY_LEN])
    wipe(material)
    return vault.unlock_key(key, app), page.hold(protocol.mac_key(key))


# -- the socket ----------------------------------------------------------------


def bind_socket(path):
    """Bind path ourselves: 0700 directory and 0600 socket from the first instant,
    refusing unsafe directories and live agents, replacing a stale socket."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    old = os.umask(0o077)
    try:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise OvError(f"cannot create {directory}: {exc.strerror}") from None
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"socket directory {directory} is not a directory")
        if st.st_uid != os.geteuid():
            raise UsageError(f"socket directory {directory} is owned by uid {st.st_uid}, "
                             "not by us")
        if st.st_mode & 0o022:
            raise UsageError(f"socket directory {directory} is group- or world-writable")
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise OvError(f"cannot bind {path}: {exc.strerror}") from None
        sock.listen(128)
        return sock, os.lstat(path).st_ino
    finally:
        os.umask(old)


def _remove_stale(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a stale socket from a dead agent
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise UsageError(f"an agent is already listening on {path}")


def _remove_if_ours(path, inode):
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


# -- starting ------------------------------------------------------------------


def policy_owners(system):
    """Who may own the policy files: root, and for a user's agent that user."""
    return {0} if system else {0, os.geteuid()}


def start(*, machine_key=None, app=None, socket_path=None, pid_file=None,
          foreground=False, vault=None, max_clients=None, grace=None, drain=None,
          system=False, policy_dir=None, enforce_policy=False):
    """Run the agent until SIGTERM; returns its exit status."""
    hardening = harden_process()
    systemd = under_systemd()
    try:
        vault_obj, mode, material = load_keys(machine_key, vault, app, systemd, system)
        reason = None
    except Unconfigured as exc:
        vault_obj, mode, material, reason = None, "unconfigured", None, str(exc)
    # Absolute before _detach() changes directory to /.  A directory named with
    # --policy-dir must exist; the default one may not (policy off).
    policy_required = policy_dir is not None
    policy_dir = os.path.abspath(policy_dir or paths.policy_dir(system))
    listener = inherited_listener() if systemd else None
    created = None
    if listener is None:
        socket_path = socket_path or paths.agent_socket()
        listener, created = bind_socket(socket_path)
        pid_file = pid_file or paths.pid_file(socket_path)
    ready_w = None if foreground or systemd else _detach()
    # Locked after detaching: the page is wiped in forked children (secmem).
    page = LockedPage()
    keyring = subkey = None
    if material is not None:
        keyring, subkey = lock_keys(page, vault_obj, material, app)
    journal = journal_available() or (ready_w is not None and os.path.exists(JOURNAL_SOCKET))
    audit = Audit(journal_sender() if journal else None)
    try:
        if pid_file:
            _write_pid_file(pid_file, ready_w)
        policy = PolicySource(policy_dir, policy_owners(system), enforce_policy, audit,
                              required=policy_required)
        consumers = Consumers(os.path.join(paths.state_dir(system), CONSUMERS_FILE))
        state = AgentState(KeyState(vault_obj, keyring, mode, reason, subkey),
                           default_app=app, all_users=system, audit=audit, policy=policy,
                           consumers=consumers)
        server = Server(listener, state, Spawner(state, **_given(grace=grace)),
                        **_given(max_clients=max_clients, drain=drain))
        _announce(audit, state, socket_path, hardening + page.protections)
        _report(ready_w, "ok")
        return server.serve()
    finally:
        if created is not None:
            _remove_if_ours(socket_path, created)
        if pid_file:
            _remove_pid_file(pid_file)
        page.close()


def _given(**options):
    """The options that were given (None: the default of whoever takes them)."""
    return {name: value for name, value in options.items() if value is not None}


def _announce(audit, state, socket_path, protections):
    where = socket_path or "systemd socket"
    mode = state.keys.mode
    state.policy.load()
    policy = state.policy.current.summary()
    audit.event("started", f"ov-agent started on {where} ({mode}; policy: {policy})",
                mode=mode, scope=state.keys.scope, socket=where, hardening=protections,
                policy=policy)
    if mode == "interactive":
        audit.event("started", "interactive mode: unsigned requests are accepted only "
                    "from this uid, checked with SO_PEERCRED on every connection")
    if mode == "unconfigured":
        audit.event("unconfigured", f"ov-agent cannot serve: {state.keys.reason}")


def _report(ready_w, message):
    """Tell the waiting foreground parent 'ok' or why we failed."""
    if ready_w is not None:
        os.write(ready_w, message.encode()[:512])
        os.close(ready_w)


def _detach():
    """Fork into the background; the foreground parent exits once we say ready."""
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        message = os.read(ready_r, 512).decode(errors="replace")
        if message != "ok":
            warn(f"agent failed to start: {message or 'it died'}")
        os._exit(0 if message == "ok" else 1)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")
    return ready_w


def _write_pid_file(path, ready_w):
    try:
        files.write(path, f"{os.getpid()}\n".encode(), 0o644)
    except OSError as exc:
        _report(ready_w, f"cannot write pid file {path}: {exc.strerror}")
        raise OvError(f"cannot write pid file {path}: {exc.strerror}") from None


def _remove_pid_file(path):
    if read_pid_file(path) == os.getpid():
        os.unlink(path)


def read_pid_file(path):
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read(32).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def agent_alive(pid):
    """True if pid runs an ov agent (not merely some process that reused the pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return False
    return b"agent" in argv and any(arg.endswith((b"ov", b"ovagent")) for arg in argv)


def stop(pid_file):
    pid = read_pid_file(pid_file)
    if pid is None or not agent_alive(pid):
        raise NotFoundError(f"no running agent found via pid file {pid_file}")
    os.kill(pid, signal.SIGTERM)
    return pid
