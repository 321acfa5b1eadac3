"""``ov run --agent`` and ``ov agent status``: talking to a running agent.

The client never starts an agent.  It checks who owns the socket and signs its
request with the machine key it finds.  By default it asks the agent to *release*
the secrets, sealed to that request (core/seal.py), opens the seal and execs the
command in place: same pid, unit, sandbox, limits and terminal.  With ``--spawn`` it
hands over stdin/stdout/stderr instead, the agent runs the command, and the client
relays signals and exits with the command's status (128+N for death by signal N).
Imports stay minimal: this runs in front of every service start.  Sockets and signals
come from the C modules _socket and _signal: socket.py and signal.py only add enums
(and selectors) on top, and their import costs more than the rest of a request
(bench/: ``python -X importtime``).
"""

import binascii   # built in, like _signal and _socket: nothing to load
import os
import stat

import time

import _signal
import _socket

from ..core import keyfile, paths, protocol, seal
from ..core.errors import (EXIT_AGENT, EXIT_AUTH, EXIT_CANNOT_EXECUTE,
                           EXIT_COMMAND_NOT_FOUND, EXIT_NOT_FOUND, EXIT_USAGE, AgentError,
                           AuthError, warn)

# A socket-activated agent may still be starting, or a restarting one still draining
# (the system unit drains up to 30 s): wait longer than both before giving up.
CONNECT_TIMEOUT = 60.0
CONNECT_RETRY = 0.005      # seconds between tries while the agent's queue is full
EXIT_FOR_CODE = {protocol.E_AUTH: EXIT_AUTH, protocol.E_STALE: EXIT_AUTH,
                 protocol.E_REPLAY: EXIT_AUTH, protocol.E_PEER: EXIT_AUTH,
                 protocol.E_SPAWN_REFUSED: EXIT_AUTH, protocol.E_POLICY: EXIT_AUTH,
                 protocol.E_NOT_FOUND: EXIT_NOT_FOUND,
                 protocol.E_BAD_REQUEST: EXIT_USAGE}


def find_key(machine_key=None):
    """The key to sign with (keyfile.find, with the default path); None when there is
    none (only an interactive agent accepts unsigned requests)."""
    path = keyfile.find(machine_key, default=True)
    return keyfile.read_key(path) if path else None


def connect(path):
    """Connect to the agent after checking the socket's owner (us or root)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise AgentError(_not_running(path, "no such socket")) from None
    except OSError as exc:
        raise AgentError(f"cannot use agent socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentError(f"{path} is not a socket")
    if st.st_uid not in (os.geteuid(), 0):
        raise AgentError(f"agent socket {path} is owned by uid {st.st_uid}, "
                         "neither you nor root; refusing to talk to it")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        _connect(sock, path)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        raise AgentError(_not_running(path, "connection refused")) from None
    except BlockingIOError:
        sock.close()
        raise AgentError(f"the agent at {path} accepted no connection for "
                         f"{CONNECT_TIMEOUT:g} s (its queue stayed full)") from None
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot connect to agent at {path}: {exc.strerror}") from None
    return sock


def _connect(sock, path):
    """connect(), waiting while the agent's listen queue is full (a busy or starting
    agent): a socket with a timeout does not wait then, it fails with EAGAIN."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(CONNECT_RETRY)


def _not_running(path, why):
    return (f"no agent is listening on {path} ({why}); start one with "
            "'ov agent start' or 'systemctl start ov-agent.socket'")


def _expect(sock, *types, timeout=CONNECT_TIMEOUT, max_size=protocol.MAX_FRAME):
    try:
        frame, _ = protocol.recv_frame(sock, timeout=timeout, max_size=max_size)
    except EOFError:
        raise AgentError("the agent closed the connection") from None
    except protocol.ProtocolError as exc:
        raise AgentError(f"bad answer from the agent: {exc}") from None
    except OSError as exc:
        raise AgentError(f"lost the agent: {exc.strerror or exc}") from None
    if frame["type"] == "error":
        raise _refused(frame)
    if frame["type"] not in types:
        raise AgentError(f"unexpected {frame['type']!r} frame from the agent")
    return frame


def _refused(frame):
    code, message = str(frame.get("code")), str(frame.get("message"))
    error = AgentError(f"agent refused the request: {message} [{code}]")
    error.exit_code = EXIT_FOR_CODE.get(code, EXIT_AGENT)
    if code == protocol.E_EXEC:
        status = frame.get("exit_status")
        error.exit_code = (status if status in (EXIT_CANNOT_EXECUTE, EXIT_COMMAND_NOT_FOUND)
                           else EXIT_CANNOT_EXECUTE)
    return error


def _signed(sock, op, key, **fields):
    """The request for this connection's challenge, and the MAC subkey it was signed
    with (None: unsigned)."""
    hello = _expect(sock, "hello")
    if not protocol.is_hex(hello.get("challenge"), protocol.CHALLENGE_BYTES):
        raise AgentError("the agent sent no valid challenge")
    req = protocol.new_request(op, hello["challenge"], **fields)
    subkey = None if key is None else protocol.mac_key(key)
    if subkey is not None:
        req["mac"] = protocol.sign(subkey, req)
    return req, subkey


def _where_keys_come_from():
    return (f"no machine key found: pass --machine-key, or provide "
            f"$CREDENTIALS_DIRECTORY/{keyfile.CREDENTIAL_NAME} or {paths.key_path()}")


def _explain_unsigned(error, key):
    """An unsigned request was refused: say where a key would have come from."""
    if key is None and error.exit_code == EXIT_AUTH:
        error.args = (f"{error} ({_where_keys_come_from()})",)
    return error


def status(socket_path, key):
    return _ask(socket_path, key, "status")


def consumers(socket_path, key, app=None, env=None, secrets=None):
    """The units the agent released secrets to, and the versions they hold."""
    return _ask(socket_path, key, "consumers", app=app, env=env,
                secrets=secrets)["units"]


def _ask(socket_path, key, op, **fields):
    """One signed request of *op* and the agent's answer of the same type."""
    sock = connect(socket_path)
    try:
        req, _ = _signed(sock, op, key, **fields)
        protocol.send_frame(sock, req)
        return _expect(sock, op)
    except OSError as exc:
        raise AgentError(f"lost the agent: {exc.strerror}") from None
    except AgentError as exc:
        raise _explain_unsigned(exc, key) from None
    finally:
        sock.close()


def release(argv0, *, socket_path, key, app, env, secrets):
    """Ask the agent for the secrets, sealed to this request; return name -> bytes."""
    if key is None:
        raise AuthError(f"{_where_keys_come_from()}.  The agent seals the secrets to a "
                        "request signed with it; without a key, an agent unlocked with "
                        "the master password serves 'ov run --agent --spawn'")
    sock = connect(socket_path)
    try:
        req, subkey = _signed(sock, "release", key, app=app, env=env, secrets=secrets,
                              argv0=argv0)
        protocol.send_frame(sock, req)
        frame = _expect(sock, "released", max_size=protocol.MAX_RELEASED)
        return seal.decode_secrets(seal.open_sealed(subkey, req, _sealed_bytes(frame)))
    except OSError as exc:
        raise AgentError(f"lost the agent: {exc.strerror}") from None
    except seal.SealError as exc:
        raise AgentError(f"refusing the agent's answer: {exc}") from None
    finally:
        sock.close()


def _sealed_bytes(frame):
    try:
        return binascii.a2b_base64(frame["sealed"], strict_mode=True)
    except (KeyError, TypeError, ValueError):
        raise AgentError("bad answer from the agent: no sealed secrets") from None


def spawn(argv, *, socket_path, key, app, env, secrets):
    """Let the agent run argv (only in the caller's own world); return the exit status
    to exit with."""
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise AgentError(f"cannot tell the agent the working directory: "
                         f"{exc.strerror}") from None
    sock = connect(socket_path)
    old_umask = os.umask(0)
    os.umask(old_umask)
    environ = {os.fsdecode(k): os.fsdecode(v) for k, v in os.environb.items()}
    try:
        req, _ = _signed(sock, "spawn", key, app=app, env=env, secrets=secrets,
                         argv=argv, environ=environ, cwd=cwd, umask=old_umask)
        relay = _catch_signals()
        protocol.send_frame(sock, req, fds=(0, 1, 2))
        _expect(sock, "started")
    except OSError as exc:
        raise AgentError(f"lost the agent: {exc.strerror}") from None
    except AgentError as exc:
        raise _explain_unsigned(exc, key) from None
    return _wait(sock, relay)


def _catch_signals():
    """Catch the relayed signals before the request goes out: the command may run
    before 'started' reaches us, and a signal then must be relayed to it, not kill
    us (which would only get the command a SIGTERM).  Returns the wake-up pair."""
    wake_r, wake_w = _socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    _signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for name in protocol.RELAYED_SIGNALS:
        _signal.signal(getattr(_signal, name), lambda *_: None)
    return wake_r, wake_w


def _wait(sock, relay):
    """Relay signals to the command until the agent reports its exit."""
    import select

    wake_r, _wake_w = relay   # (keep the write end open: it is the wake-up fd)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r.fileno():
                for signum in wake_r.recv(64):
                    try:
                        protocol.send_frame(sock, {"type": "signal", "signal": signum})
                    except OSError:
                        pass
                continue
            frame = _expect(sock, "exit", "detached", timeout=protocol.FRAME_TIMEOUT)
            if frame["type"] == "detached":
                return _wait_detached(frame.get("pid"))
            return _exit_status(frame)


def _exit_status(frame):
    """What to exit with for an 'exit' frame: the command's status, 128+N for
    death by signal N."""
    signum, code = frame.get("signal"), frame.get("code")
    if type(signum) is int and 0 < signum < 128:
        return 128 + signum
    if type(code) is int and 0 <= code < 256:
        return code
    raise AgentError("bad answer from the agent: an exit frame without a status")


def _wait_detached(pid):
    """The agent stopped while the command runs: it keeps running; wait for it."""
    warn(f"the agent stopped; command (pid {pid}) keeps running, its exit status will "
         "not be known")
    if type(pid) is not int or pid <= 0:
        return EXIT_AGENT
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return EXIT_AGENT
    select.select([pidfd], [], [])
    return EXIT_AGENT
