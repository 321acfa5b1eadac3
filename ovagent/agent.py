"""``ov agent``: the daemon that holds the machine key and serves requests for secrets.

One worker thread per connection (at most --max-clients; idle workers are reused);
the main thread accepts, checks SO_PEERCRED and takes a pidfd before reading a byte,
feeds the systemd watchdog and handles signals.  A connection carries exactly one
request: the agent sends a fresh challenge and verifies the signed request
(docs/protocol.rst).  For ``release`` (``ov run --agent``) it decrypts only the
requested secrets and answers with them sealed to that request; the client execs the
command in its own world.  For ``spawn`` (``--spawn``) it first checks that the
caller lives in the agent's own world (ovagent/peer.py), then starts the command in
a new session with the client's fds, cwd, umask and environment plus the secrets
(never the agent's own environment), relays signals and reports the exit status; if
the client vanishes, the command's process group gets SIGTERM, then SIGKILL after a
grace period.
"""

import binascii
import hmac
import os
import queue
import resource
import select
import selectors
import signal
import socket
import subprocess
import threading
import time

from . import __version__, peer as peers, protocol, seal
from .errors import NotFoundError, OvError, UsageError
from .protocol import ProtocolError
from .systemd_glue import Audit, Notifier, process_cgroups

DEFAULT_MAX_CLIENTS = 64
DEFAULT_GRACE = 5.0           # seconds between SIGTERM and SIGKILL of an orphan
DEFAULT_DRAIN = 30.0          # seconds SIGTERM waits for running requests
NONCE_CAPACITY = 100_000
ACCEPT_PAUSE = 0.1            # seconds the listener rests after EMFILE
RELAYED = {int(getattr(signal, name)) for name in protocol.RELAYED_SIGNALS}
UNSIGNED_RELEASE = ("an unsigned request cannot have secrets released: they are sealed "
                    "to the machine key that signs the request (an agent unlocked with "
                    "the master password serves only 'ov run --agent --spawn')")
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")  # cgroup2: unified, hybrid


def _in_callers_place(cgroup_fd, core_limit):
    """preexec_fn of a spawned command.  It writes "0" (itself) to the caller's
    cgroup.procs before exec, so neither the command nor anything it forks ever runs
    in the agent's cgroup when the kernel lets it move (a restart of the agent would
    kill it there, and journald would file its output under the agent's unit); and
    it takes back the caller's soft core limit, which the agent lowers for itself.
    Only system calls: safe in a threaded parent."""

    def enter():
        if cgroup_fd is not None:
            try:
                os.write(cgroup_fd, b"0")
            except OSError:
                pass   # not allowed: the command stays in the agent's cgroup
        resource.setrlimit(resource.RLIMIT_CORE,
                           (core_limit, resource.getrlimit(resource.RLIMIT_CORE)[1]))

    return enter


class NonceCache:
    """Nonces seen within the clock window, expiring on the monotonic clock.

    When full it refuses new requests rather than evicting a live entry (which
    would re-open a replay window)."""

    def __init__(self, capacity=NONCE_CAPACITY, ttl=2 * protocol.CLOCK_WINDOW + 1):
        self.capacity, self.ttl = capacity, ttl
        self._seen = {}
        self._lock = threading.Lock()

    def add(self, nonce):
        """True if new; False if seen; raises ProtocolError(E_BUSY) when full."""
        now = time.monotonic()
        with self._lock:
            if nonce in self._seen:
                return False
            if len(self._seen) >= self.capacity:
                self._seen = {n: t for n, t in self._seen.items() if t > now}
                if len(self._seen) >= self.capacity:
                    raise ProtocolError(protocol.E_BUSY, "replay cache is full; retry")
            self._seen[nonce] = now + self.ttl
            return True


class KeyState:
    """What the agent can decrypt with, and how it checks request MACs."""

    def __init__(self, vault=None, keyring=None, mode="unconfigured", reason=None,
                 key=None):
        self.vault, self.keyring, self.mode, self.reason = vault, keyring, mode, reason
        self.scope = keyring.scope if keyring else None
        self._own_subkey = protocol.mac_key(key.get()) if key else None
        self._app_subkeys = {}
        self.lock = threading.Lock()   # the vault's SQLite connection is not shared-safe

    def subkeys_for(self, app):
        """MAC keys a request for *app* may be signed with: the agent's own key,
        and (when the agent holds the KEK) that app's key (a scoped machine key)."""
        keys = [self._own_subkey] if self._own_subkey else []
        if self.keyring is not None and self.keyring.kek is not None:
            try:
                app_key = self.keyring.app_key(app)
            except (NotFoundError, UsageError):   # no such app, or not a valid name
                return keys
            if self._app_subkeys.get(app, (None,))[0] != app_key:
                self._app_subkeys[app] = (app_key, protocol.mac_key(app_key))
            keys.append(self._app_subkeys[app][1])
        return keys


class Agent:
    def __init__(self, listener, keys, *, default_app=None, max_clients=DEFAULT_MAX_CLIENTS,
                 grace=DEFAULT_GRACE, drain=DEFAULT_DRAIN, all_users=False, audit=None,
                 notifier=None):
        self.listener = listener
        self.keys = keys
        self.default_app = default_app or keys.scope or "default"
        self.max_clients, self.grace, self.drain = max_clients, grace, drain
        self.all_users = all_users   # else only our own uid and root
        self.audit = audit or Audit()
        self.notifier = notifier or Notifier()
        self.uid = os.geteuid()
        self._own_cgroup = process_cgroups(os.getpid())[1]
        self.started = time.monotonic()
        self.nonces = NonceCache()
        self.counters = {"released": 0, "accepted": 0, "denied": 0, "running": 0,
                         "busy": 0}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # notified when a handler ends
        self._active = 0          # connections being handled (bounded by max_clients)
        self._idle_workers = 0
        self._connections = queue.SimpleQueue()
        self._detach_r, self._detach_w = os.pipe()
        self._stop = False

    # -- main loop -------------------------------------------------------------

    def serve(self):
        """Accept until SIGTERM/SIGINT, then drain.  Returns the exit status."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)
        self.listener.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, "accept")
        selector.register(wake_r, selectors.EVENT_READ, "signal")
        status = f"serving ({self.keys.mode})"
        self.notifier.ready(status)
        self.audit.event("ready", f"ov-agent ready, {status}", mode=self.keys.mode,
                         scope=self.keys.scope)
        next_watchdog = time.monotonic()
        paused_until = None
        try:
            while not self._stop:
                now = time.monotonic()
                if self.notifier.watchdog_interval and now >= next_watchdog:
                    self.notifier.watchdog()
                    next_watchdog = now + self.notifier.watchdog_interval
                if paused_until is not None and now >= paused_until:
                    selector.register(self.listener, selectors.EVENT_READ, "accept")
                    paused_until = None
                timeout = min(self.notifier.watchdog_interval or 1.0, ACCEPT_PAUSE
                              if paused_until is not None else 1.0)
                for key, _ in selector.select(timeout):
                    if key.data == "signal":
                        self._on_signals(wake_r)
                    elif not self._accept():
                        # Out of file descriptors: stop polling the listener for a
                        # moment instead of spinning; queued clients wait in the backlog.
                        selector.unregister(self.listener)
                        paused_until = time.monotonic() + ACCEPT_PAUSE
        finally:
            signal.set_wakeup_fd(previous)
            selector.close()
        self._drain()
        return 0

    def _on_signals(self, wake_r):
        try:
            data = wake_r.recv(64)
        except BlockingIOError:
            return
        if any(signum in (signal.SIGTERM, signal.SIGINT) for signum in data):
            self._stop = True
            self.notifier.stopping("stopping: waiting for running requests")
            self.audit.event("stopping", "ov-agent stopping", running=self.counters["running"])

    def _accept(self):
        """Accept one connection.  False when out of file descriptors."""
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            if exc.errno in (24, 23, 105, 12):  # EMFILE, ENFILE, ENOBUFS, ENOMEM
                return False
            raise
        conn.setblocking(True)
        try:
            peer = peers.Peer(conn)  # SO_PEERCRED and a pidfd before reading any byte
        except OSError:
            conn.close()
            return True
        if not self.all_users and peer.uid not in (self.uid, 0):
            self._refuse(conn, peer, protocol.E_PEER,
                         f"uid {peer.uid} may not use this agent (it serves uid {self.uid})")
            peer.close()
            return True
        with self._lock:
            busy = self._active >= self.max_clients
            if busy:
                self.counters["busy"] += 1
            else:
                self._active += 1
                reuse = self._idle_workers > 0
                if reuse:
                    self._idle_workers -= 1
        if busy:
            self._refuse(conn, peer, protocol.E_BUSY,
                         f"agent busy: {self.max_clients} requests already running")
            peer.close()
            return True
        if not reuse:
            try:
                threading.Thread(target=self._worker, daemon=True).start()
            except RuntimeError:
                self._handled()
                self._refuse(conn, peer, protocol.E_BUSY, "agent cannot start a thread")
                peer.close()
                return True
        self._connections.put((conn, peer))
        return True

    def _worker(self):
        """Handle connections one after another: a thread is started only when none
        is idle, and then kept (at most --max-clients of them), which spares each
        request a thread start and its hand-off with the accepting thread."""
        while True:
            conn, peer = self._connections.get()
            try:
                self._handle(conn, peer)
            except Exception:  # a dead worker, still counted idle, would hang clients
                conn.close()
            finally:
                peer.close()
                self._handled(idle_worker=True)

    def _handled(self, idle_worker=False):
        with self._lock:
            self._active -= 1
            if idle_worker:
                self._idle_workers += 1
            self._idle.notify_all()

    def _refuse(self, conn, peer, code, message, exit_status=None, **fields):
        """Answer with an error, record the denial, and close the connection (and, for
        a peer that never reached a worker, its pidfd)."""
        with self._lock:
            self.counters["denied"] += 1
        self.audit.event("denied", f"request denied: {message}", code=code, reason=message,
                         **peer.fields(), **fields)
        try:
            conn.settimeout(1.0)
            protocol.send_frame(conn, protocol.error_frame(code, message, exit_status))
        except (OSError, ProtocolError):   # gone, or a message too large to send
            pass
        finally:
            conn.close()

    def _drain(self):
        """Let running requests finish (up to --drain seconds), then detach the rest."""
        with self._lock:
            self._idle.wait_for(lambda: self._active == 0, timeout=self.drain)
            if self._active == 0:
                return
        os.write(self._detach_w, b"x")
        with self._lock:
            self._idle.wait_for(lambda: self._active == 0, timeout=5.0)

    # -- one connection ----------------------------------------------------------

    def _handle(self, conn, peer):
        request_id = os.urandom(8).hex()
        fds = []
        try:
            challenge = os.urandom(protocol.CHALLENGE_BYTES).hex()
            protocol.send_frame(conn, {"type": "hello", "version": protocol.VERSION,
                                       "agent": f"ov-agent {__version__}",
                                       "challenge": challenge})
            obj, fds = protocol.recv_frame(conn, want_fds=True)
            req, subkey = self._authenticate(obj, challenge, peer)
            if req["op"] == "spawn":
                self._spawn(conn, peer, req, fds, request_id)
                return
            if fds:
                raise ProtocolError(protocol.E_BAD_REQUEST,
                                    f"a {req['op']} request carries no descriptors")
            if req["op"] == "status":
                protocol.send_frame(conn, self.status())
            else:
                self._release(conn, peer, req, subkey, request_id)
        except ProtocolError as exc:
            self._refuse(conn, peer, exc.code, str(exc), exc.exit_status,
                         request_id=request_id)
        except EOFError:
            pass
        except OSError:
            pass  # the client went away mid-handshake
        except OvError as exc:
            self._refuse(conn, peer, protocol.E_INTERNAL, str(exc), request_id=request_id)
        except Exception as exc:  # never let one request take the agent down
            self._refuse(conn, peer, protocol.E_INTERNAL,
                         f"internal error ({type(exc).__name__})", request_id=request_id)
        finally:
            self._close_fds(fds)
            conn.close()

    @staticmethod
    def _close_fds(fds):
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()

    def _authenticate(self, obj, challenge, peer):
        """Schema, challenge, MAC, clock window, nonce: in that order.  Returns the
        request and the MAC subkey that verified it (None: unsigned)."""
        req = protocol.validate_request(obj)
        if self.keys.vault is None:
            raise ProtocolError(protocol.E_UNCONFIGURED, self.keys.reason)
        auth_failed = ProtocolError(protocol.E_AUTH, "request authentication failed")
        if not hmac.compare_digest(req["challenge"], challenge):
            raise auth_failed
        subkey = None
        if req["mac"] is None:
            if req["op"] == "release":
                raise ProtocolError(protocol.E_AUTH, UNSIGNED_RELEASE)
            if not (self.keys.mode == "interactive" and peer.uid == self.uid):
                raise auth_failed
        else:
            with self.keys.lock:
                subkeys = self.keys.subkeys_for(req.get("app") or self.default_app)
            subkey = next((k for k in subkeys if protocol.mac_matches(k, req)), None)
            if subkey is None:
                raise auth_failed
        if abs(time.time() - req["ts"]) > protocol.CLOCK_WINDOW:
            raise ProtocolError(protocol.E_STALE, "request timestamp outside the "
                                f"+-{protocol.CLOCK_WINDOW} s window (check the clock)")
        if not self.nonces.add(req["nonce"]):
            raise ProtocolError(protocol.E_REPLAY, "request was already used")
        return req, subkey

    def status(self):
        with self._lock:
            counters = dict(self.counters)
        return {"type": "status", "version": __version__, "pid": os.getpid(),
                "uptime": int(time.monotonic() - self.started), "mode": self.keys.mode,
                "scope": self.keys.scope or "all apps", "default_app": self.default_app,
                "counters": counters}

    def _reveal(self, req):
        """(app, env, name -> (version, value)) of a release or spawn request."""
        app, env = req["app"] or self.default_app, req["env"] or "production"
        try:
            with self.keys.lock:
                return app, env, self.keys.vault.reveal_versions(
                    self.keys.keyring, app, env, req["secrets"])
        except NotFoundError as exc:
            raise ProtocolError(protocol.E_NOT_FOUND, str(exc)) from None
        except UsageError as exc:
            raise ProtocolError(protocol.E_BAD_REQUEST, str(exc)) from None
        except OvError as exc:
            raise ProtocolError(protocol.E_AUTH if exc.exit_code == 4 else
                                protocol.E_INTERNAL, str(exc)) from None

    def _record(self, kind, message, **fields):
        """An audit record that must be written before anything is released or run."""
        if not self.audit.event(kind, message, **fields):
            raise ProtocolError(protocol.E_INTERNAL, "audit log unavailable; refusing "
                                "to release or run anything unaudited")

    def _release(self, conn, peer, req, subkey, request_id):
        """Answer with the requested secrets sealed to this request: the client execs
        the command in its own world."""
        app, env, revealed = self._reveal(req)
        plaintext = seal.encode_secrets({name: value for name, (_, value)
                                         in revealed.items()})
        sealed = seal.seal(subkey, req, plaintext)
        frame = protocol.encode_frame({
            "type": "released", "request_id": request_id,
            "sealed": binascii.b2a_base64(sealed, newline=False).decode("ascii")})
        names = sorted(revealed)
        self._record("released", f"released {len(names)} secret(s) of {app}/{env} to "
                     f"uid {peer.uid} for {req['argv0']}", request_id=request_id,
                     app=app, env=env, secrets=names,
                     versions=[f"{name}={revealed[name][0]}" for name in names],
                     command=req["argv0"], **peer.fields())
        revealed.clear()
        conn.sendall(frame)
        with self._lock:
            self.counters["released"] += 1

    def _check_world(self, peer):
        """--spawn only where the command runs as the caller's own process would: the
        same uid and the same world (namespaces, root, credentials, limits...)."""
        drop = "; drop --spawn to run the command in your own world"
        if peer.uid != self.uid:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, f"--spawn: you run as uid "
                                f"{peer.uid}, the agent as uid {self.uid}{drop}")
        theirs = peer.world()
        if theirs is None:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, "--spawn: the agent cannot "
                                f"inspect your process (pid {peer.pid}){drop}")
        different = peers.differences(peers.world(os.getpid()), theirs)
        if different:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, "--spawn: your process and "
                                f"the agent differ in: {', '.join(different)}{drop}")
        return theirs

    def _spawn(self, conn, peer, req, fds, request_id):
        world = self._check_world(peer)
        if len(fds) != 3:
            raise ProtocolError(protocol.E_BAD_REQUEST,
                                "a spawn request must carry stdin, stdout and stderr")
        app, env, revealed = self._reveal(req)
        fields = dict(request_id=request_id, op="spawn", app=app, env=env,
                      command=req["argv"][0], secrets=sorted(revealed), **peer.fields())
        self._record("accepted", f"running {req['argv'][0]} for uid {peer.uid}", **fields)
        environ = {os.fsencode(k): os.fsencode(v) for k, v in req["environ"].items()}
        environ.update({name.encode(): value for name, (_, value) in revealed.items()})
        revealed.clear()
        cgroup_fd = self._open_cgroup_procs(self._caller_cgroup_procs(peer))
        try:
            child = subprocess.Popen(
                [os.fsencode(arg) for arg in req["argv"]], stdin=fds[0], stdout=fds[1],
                stderr=fds[2], cwd=os.fsencode(req["cwd"]), env=environ,
                umask=req["umask"], start_new_session=True, close_fds=True,
                preexec_fn=_in_callers_place(cgroup_fd, peers.core_soft_limit(world)))
        except OSError as exc:
            status = 127 if isinstance(exc, FileNotFoundError) else 126
            raise ProtocolError(protocol.E_EXEC, f"{req['argv'][0]}: {exc.strerror}",
                                exit_status=status) from None
        finally:
            environ.clear()
            self._close_fds(fds)
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        with self._lock:
            self.counters["accepted"] += 1
            self.counters["running"] += 1
        try:
            try:
                protocol.send_frame(conn, {"type": "started", "pid": child.pid,
                                           "request_id": request_id})
            except OSError:
                pass  # the client is gone: _supervise sees it and stops the command
            result = self._supervise(conn, child)
        finally:
            with self._lock:
                self.counters["running"] -= 1
        self.audit.event("exited", f"{req['argv'][0]} (pid {child.pid}) {result}",
                         child_pid=child.pid, exit_status=child.returncode, outcome=result,
                         **fields)

    def _caller_cgroup_procs(self, peer):
        """The cgroup.procs files (one per candidate mount) of the caller's cgroup2
        group, when the command should move there; else []."""
        if not peer.cgroup or peer.cgroup == self._own_cgroup:
            return []
        return [os.path.join(root, peer.cgroup.lstrip("/"), "cgroup.procs")
                for root in CGROUP_ROOTS]

    @staticmethod
    def _open_cgroup_procs(candidates):
        """The first of the caller's cgroup.procs files that opens for writing, so the
        child enters it before exec (see _in_callers_place); None if none does."""
        for procs in candidates:
            try:
                return os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            except OSError:
                continue
        return None

    def _supervise(self, conn, child):
        """Relay signals until the child exits; kill its group if the client leaves.
        (select.poll rather than a selectors object: nothing to create, register
        and close on every request.)"""
        pidfd = os.pidfd_open(child.pid)
        poller = select.poll()
        for fd in (pidfd, conn.fileno(), self._detach_r):
            poller.register(fd, select.POLLIN)
        kill_at = None
        try:
            while True:
                # After the SIGKILL (kill_at = inf) wait for the child with no timeout.
                timeout = (None if kill_at is None or kill_at == float("inf")
                           else max(0, int((kill_at - time.monotonic()) * 1000) + 1))
                ready = [fd for fd, _ in poller.poll(timeout)]
                if kill_at is not None and time.monotonic() >= kill_at:
                    self._signal_group(child.pid, signal.SIGKILL)
                    kill_at = float("inf")
                if pidfd in ready:
                    code = child.wait()
                    frame = ({"type": "exit", "code": code, "signal": None} if code >= 0
                             else {"type": "exit", "code": None, "signal": -code})
                    if kill_at is None:
                        try:
                            protocol.send_frame(conn, frame)
                        except OSError:
                            pass
                        return (f"exited with status {code}" if code >= 0
                                else f"killed by signal {-code}")
                    return f"terminated after its client went away (status {code})"
                if self._detach_r in ready:
                    try:
                        protocol.send_frame(conn, {"type": "detached", "pid": child.pid})
                    except OSError:
                        pass
                    return "left running: the agent stopped"
                if conn.fileno() in ready:
                    try:
                        frame, _ = protocol.recv_frame(conn)
                    except (EOFError, ProtocolError, OSError):
                        poller.unregister(conn)
                        self._signal_group(child.pid, signal.SIGTERM)
                        kill_at = time.monotonic() + self.grace
                        continue
                    signum = frame.get("signal")
                    if frame.get("type") == "signal" and type(signum) is int \
                            and signum in RELAYED:
                        self._signal_group(child.pid, signum)
        finally:
            os.close(pidfd)

    @staticmethod
    def _signal_group(pgid, signum):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass
