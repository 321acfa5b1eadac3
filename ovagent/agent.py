"""What ``ov agent`` does with a request, once its event loop (ovagent/server.py) has
read it.

It verifies the request (docs/protocol.rst: schema, challenge, MAC, clock, nonce).
``status`` gets the counters.  ``release`` (``ov run --agent``) gets only the
requested secrets, sealed to that request; the client execs the command in its own
world.  ``spawn`` (``--spawn``), served in a thread of its own, first needs a caller
that lives in the agent's own world (ovagent/peer.py); the command then starts in a
new session with the client's fds, cwd, umask and environment plus the secrets (never
the agent's own environment), signals are relayed and the exit status reported, and
if the client vanishes the command's process group gets SIGTERM, then SIGKILL after
a grace period.
"""

import binascii
import collections
import hmac
import os
import resource
import select
import signal
import subprocess
import threading
import time

from . import __version__, peer as peers, protocol, seal
from .errors import NotFoundError, OvError, UsageError
from .protocol import ProtocolError
from .systemd_glue import Audit, process_cgroups

DEFAULT_GRACE = 5.0           # seconds between SIGTERM and SIGKILL of an orphan
NONCE_CAPACITY = 100_000
RELAYED = {int(getattr(signal, name)) for name in protocol.RELAYED_SIGNALS}
UNSIGNED_RELEASE = ("an unsigned request cannot have secrets released: they are sealed "
                    "to the machine key that signs the request (without a key, an agent "
                    "unlocked with the master password serves 'ov run --agent --spawn' "
                    "to its own uid)")
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")  # cgroup2: unified, hybrid


def _in_callers_place(cgroup_fd, core_limit):
    """preexec_fn of a spawned command, or None when there is nothing to do (then
    subprocess may vfork, much cheaper than fork).  Where the kernel lets it, it
    writes "0" (itself) to the caller's cgroup.procs before exec, so that neither the
    command nor anything it forks runs in the agent's cgroup: it belongs to its
    caller's unit (stopped and accounted with it, its output filed under it by
    journald); and it takes back the caller's soft core limit, which the agent
    lowers for itself.  Only system calls: safe in a threaded parent."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if cgroup_fd is None and core_limit == soft:
        return None

    def enter():
        if cgroup_fd is not None:
            try:
                os.write(cgroup_fd, b"0")
            except OSError:
                pass   # not allowed: the command stays in the agent's cgroup
        resource.setrlimit(resource.RLIMIT_CORE, (core_limit, hard))

    return enter


class NonceCache:
    """Nonces seen within the clock window, kept in one set per slice of time
    (``resolution`` seconds of arrival): a nonce is looked up in each set, and a
    slice is dropped whole once all of it is older than ``ttl``, so memory goes back
    as the window moves instead of one table growing to ``capacity``.

    When full it refuses new requests rather than forgetting a live entry (which
    would re-open a replay window)."""

    def __init__(self, capacity=NONCE_CAPACITY, ttl=2 * protocol.CLOCK_WINDOW + 1,
                 resolution=1.0, clock=time.monotonic):
        self.capacity, self.ttl, self.resolution = capacity, ttl, resolution
        self._clock = clock
        self._slices = collections.deque()   # (slice number, set of nonces), oldest first
        self._count = 0
        self._lock = threading.Lock()

    def add(self, nonce):
        """True if new; False if seen; raises ProtocolError(E_BUSY) when full."""
        now = self._clock()
        with self._lock:
            while self._slices and (self._slices[0][0] + 1) * self.resolution + self.ttl \
                    <= now:
                self._count -= len(self._slices.popleft()[1])
            if any(nonce in seen for _, seen in self._slices):
                return False
            if self._count >= self.capacity:
                raise ProtocolError(protocol.E_BUSY, "replay cache is full; retry")
            number = int(now // self.resolution)
            if not self._slices or self._slices[-1][0] != number:
                self._slices.append((number, set()))
            self._slices[-1][1].add(nonce)
            self._count += 1
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

    def verifying_subkey(self, req, app):
        """The MAC key that verifies *req* for *app*, or None: the agent's own key,
        else (when the agent holds the KEK) that app's key (a scoped machine key),
        looked up only when the own key does not verify."""
        if self._own_subkey and protocol.mac_matches(self._own_subkey, req):
            return self._own_subkey
        if self.keyring is None or self.keyring.kek is None:
            return None
        with self.lock:
            try:
                app_key = self.keyring.app_key(app)
            except (NotFoundError, UsageError):   # no such app, or not a valid name
                return None
            if self._app_subkeys.get(app, (None,))[0] != app_key:
                self._app_subkeys[app] = (app_key, protocol.mac_key(app_key))
            subkey = self._app_subkeys[app][1]
        return subkey if protocol.mac_matches(subkey, req) else None


class Agent:
    """The key, the counters and the audit trail, and what each request does."""

    def __init__(self, keys, *, default_app=None, grace=DEFAULT_GRACE, all_users=False,
                 audit=None):
        self.keys = keys
        self.default_app = default_app or keys.scope or "default"
        self.grace = grace
        self.all_users = all_users   # else only our own uid and root
        self.audit = audit or Audit()
        self.uid = os.geteuid()
        self._own_cgroup = process_cgroups(os.getpid())[1]
        self.started = time.monotonic()
        self.nonces = NonceCache()
        self.counters = {"released": 0, "accepted": 0, "denied": 0, "running": 0,
                         "busy": 0}
        self._lock = threading.Lock()
        self._detach_r, self._detach_w = os.pipe()

    def count(self, counter, delta=1):
        with self._lock:
            self.counters[counter] += delta

    def admits(self, peer):
        """None, or why this peer may not use the agent at all (before any byte)."""
        if self.all_users or peer.uid in (self.uid, 0):
            return None
        return f"uid {peer.uid} may not use this agent (it serves uid {self.uid})"

    def refused(self, peer, code, message, exit_status=None, **fields):
        """Record a denial; return the error frame that answers it."""
        self.count("denied")
        self.audit.event("denied", f"request denied: {message}", code=code, reason=message,
                         **peer.fields(), **fields)
        return protocol.error_frame(code, message, exit_status)

    def detach(self):
        """The agent stops: tell every spawned command's supervisor to let go."""
        os.write(self._detach_w, b"x")

    # -- every request ------------------------------------------------------------

    def authenticate(self, obj, challenge, peer):
        """Schema, challenge, MAC, clock window, nonce: in that order.  Returns the
        request and the MAC subkey that verified it (None: unsigned)."""
        req = protocol.validate_request(obj)
        if self.keys.vault is None:
            if req["op"] == "status":   # no key to sign with, nothing to protect
                return req, None
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
            subkey = self.keys.verifying_subkey(req, req.get("app") or self.default_app)
            if subkey is None:
                raise auth_failed
        if abs(time.time() - req["ts"]) > protocol.CLOCK_WINDOW:
            raise ProtocolError(protocol.E_STALE, "request timestamp outside the "
                                f"+-{protocol.CLOCK_WINDOW} s window (check the clock)")
        if not self.nonces.add(req["nonce"]):
            raise ProtocolError(protocol.E_REPLAY, "request was already used")
        return req, subkey

    def answer(self, peer, req, subkey, request_id):
        """The encoded answer to a verified status or release request."""
        if req["op"] == "status":
            return protocol.encode_frame(self.status())
        return self.release(peer, req, subkey, request_id)

    def status(self):
        with self._lock:
            counters = dict(self.counters)
        status = {"type": "status", "version": __version__, "pid": os.getpid(),
                  "uptime": int(time.monotonic() - self.started), "mode": self.keys.mode,
                  "scope": self.keys.scope or "all apps", "default_app": self.default_app,
                  "counters": counters}
        if self.keys.reason:
            status["reason"] = self.keys.reason
        return status

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

    # -- release --------------------------------------------------------------------

    def release(self, peer, req, subkey, request_id):
        """The requested secrets sealed to this request, as an encoded 'released'
        frame, recorded before it is returned: the client execs the command in its
        own world."""
        app, env, revealed = self._reveal(req)
        plaintext = seal.encode_secrets({name: value for name, (_, value)
                                         in revealed.items()})
        sealed = seal.seal(subkey, req, plaintext)
        try:
            frame = protocol.encode_frame({
                "type": "released", "request_id": request_id,
                "sealed": binascii.b2a_base64(sealed, newline=False).decode("ascii")},
                max_size=protocol.MAX_RELEASED)
        except ProtocolError:
            raise ProtocolError(protocol.E_TOO_LARGE, f"the {len(revealed)} secret(s) of "
                                f"{app}/{env} take {len(plaintext)} bytes, more than a "
                                "command's environment can hold; name fewer with "
                                "--secrets") from None
        names = sorted(revealed)
        self._record("released", f"released {len(names)} secret(s) of {app}/{env} to "
                     f"uid {peer.uid} for {req['argv0']}", request_id=request_id,
                     app=app, env=env, secrets=names,
                     versions=[f"{name}={revealed[name][0]}" for name in names],
                     command=req["argv0"], **peer.fields())
        revealed.clear()
        self.count("released")
        return frame

    # -- spawn (in a thread of its own) ----------------------------------------------

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
        different = peers.differences(peers.world_of(os.getpid()), theirs)
        if different:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, "--spawn: your process and "
                                f"the agent differ in: {', '.join(different)}{drop}")
        return theirs

    def spawn(self, sock, peer, req, fds, request_id):
        """Run the command of a verified spawn request and supervise it until it
        exits; *sock* is the client's (blocking) socket, *fds* its stdin, stdout and
        stderr (closed here once the command has them)."""
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
            protocol.close_fds(fds)
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        self.count("accepted")
        self.count("running")
        try:
            pidfd = self._watch(child)
            try:
                protocol.send_frame(sock, {"type": "started", "pid": child.pid,
                                           "request_id": request_id})
            except OSError:
                pass  # the client is gone: _supervise sees it and stops the command
            result = self._supervise(sock, child, pidfd)
        finally:
            self.count("running", -1)
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

    def _watch(self, child):
        """A pidfd for the command; without one (out of descriptors) it cannot be
        supervised, so it is killed and reaped at once."""
        try:
            return os.pidfd_open(child.pid)
        except OSError as exc:
            self._signal_group(child.pid, signal.SIGKILL)
            child.wait()
            raise ProtocolError(protocol.E_INTERNAL, "cannot watch the command "
                                f"({exc.strerror}); it was stopped") from None

    def _supervise(self, sock, child, pidfd):
        """Relay signals until the child exits; kill its group if the client leaves
        (even if the agent stops meanwhile).  Closes *pidfd*.  (select.poll rather
        than a selectors object: nothing to create, register and close on every
        request.)"""
        poller = select.poll()
        for fd in (pidfd, sock.fileno(), self._detach_r):
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
                            protocol.send_frame(sock, frame)
                        except OSError:
                            pass
                        return (f"exited with status {code}" if code >= 0
                                else f"killed by signal {-code}")
                    return f"terminated after its client went away (status {code})"
                if self._detach_r in ready:
                    if kill_at is not None:    # no client: finish stopping it first
                        poller.unregister(self._detach_r)
                        continue
                    try:
                        protocol.send_frame(sock, {"type": "detached", "pid": child.pid})
                    except OSError:
                        pass
                    return "left running: the agent stopped"
                if sock.fileno() in ready:
                    try:
                        frame, _ = protocol.recv_frame(sock)
                    except (EOFError, ProtocolError, OSError):
                        poller.unregister(sock)
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
