"""``ov run --agent --spawn``: the agent runs the command and reports its exit, only
for a caller that lives in the agent's own world (a command inherits the world of the
process that starts it).  Each spawned command has a thread of its own that relays
signals until it exits; if the client vanishes, its process group gets SIGTERM, then
SIGKILL after a grace period, also when the agent stops meanwhile."""

import os
import resource
import select
import signal
import subprocess
import threading
import time

from ..core import procfs, protocol
from ..core.errors import ExecError
from ..core.protocol import ProtocolError
from .state import refuse_and_close

DEFAULT_GRACE = 5.0           # seconds between SIGTERM and SIGKILL of an orphan
DETACH_WAIT = 5.0             # seconds for supervisors to let go after detaching
RELAYED = {int(getattr(signal, name)) for name in protocol.RELAYED_SIGNALS}


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


class Spawner:
    """Runs and supervises spawned commands for an AgentState, one thread each."""

    def __init__(self, state, grace=DEFAULT_GRACE):
        self.state, self.grace = state, grace
        self._detach_r, self._detach_w = os.pipe()
        self._threads = 0
        self._threads_done = threading.Condition()

    def running(self):
        with self._threads_done:
            return self._threads

    def start(self, conn, req, fds):
        """Serve a verified spawn request in a thread of its own, which owns *conn*
        (its blocking socket, peer and request id) and *fds* from now on."""
        with self._threads_done:
            self._threads += 1
        try:
            threading.Thread(target=self._serve, args=(conn, req, fds), daemon=True).start()
        except RuntimeError:
            self._ended()
            protocol.close_fds(fds)
            refuse_and_close(self.state, conn.sock, conn.peer, ProtocolError(
                protocol.E_BUSY, "agent cannot start a thread"), request_id=conn.request_id)

    def _serve(self, conn, req, fds):
        try:
            self.spawn(conn.sock, conn.peer, req, fds, conn.request_id)
        except Exception as exc:   # refused, or failed: say so, keep serving
            refuse_and_close(self.state, conn.sock, conn.peer, exc,
                             request_id=conn.request_id)
        finally:
            protocol.close_fds(fds)
            conn.close()
            self._ended()

    def _ended(self):
        with self._threads_done:
            self._threads -= 1
            self._threads_done.notify_all()

    def finish(self, timeout):
        """The agent stops: let spawned commands end for up to *timeout* seconds,
        then tell every supervisor to let its command go (and give them a moment)."""
        with self._threads_done:
            if self._threads_done.wait_for(lambda: self._threads == 0, timeout=timeout):
                return
        os.write(self._detach_w, b"x")
        with self._threads_done:
            self._threads_done.wait_for(lambda: self._threads == 0, timeout=DETACH_WAIT)

    def check_world(self, peer):
        """--spawn only where the command runs as the caller's own process would: the
        same uid and the same world (namespaces, root, credentials, limits...)."""
        drop = "; drop --spawn to run the command in your own world"
        if peer.uid != self.state.uid:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, f"--spawn: you run as uid "
                                f"{peer.uid}, the agent as uid {self.state.uid}{drop}")
        theirs = peer.world()
        if theirs is None:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, "--spawn: the agent cannot "
                                f"inspect your process (pid {peer.pid}){drop}")
        different = procfs.differences(procfs.world_of(os.getpid()), theirs)
        if different:
            raise ProtocolError(protocol.E_SPAWN_REFUSED, "--spawn: your process and "
                                f"the agent differ in: {', '.join(different)}{drop}")
        return theirs

    def spawn(self, sock, peer, req, fds, request_id):
        """Run the command of a verified spawn request and supervise it until it
        exits; *sock* is the client's (blocking) socket, *fds* its stdin, stdout and
        stderr (closed here once the command has them)."""
        world = self.check_world(peer)
        if len(fds) != 3:
            raise ProtocolError(protocol.E_BAD_REQUEST,
                                "a spawn request must carry stdin, stdout and stderr")
        app, env, revealed, decision = self.state.reveal(req, peer)
        fields = dict(request_id=request_id, op="spawn", app=app, env=env,
                      command=req["argv"][0], secrets=sorted(revealed),
                      policy_rule=decision.rule, **peer.fields())
        self.state.record("accepted", f"running {req['argv'][0]} for uid {peer.uid}", **fields)
        self.state.consumers.record(peer, app, env, {name: version for name, (version, _)
                                                     in revealed.items()})
        environ = {os.fsencode(k): os.fsencode(v) for k, v in req["environ"].items()}
        environ.update({name.encode(): value for name, (_, value) in revealed.items()})
        revealed.clear()
        cgroup_fd = self._open_cgroup_procs(self._caller_cgroup_procs(peer))
        try:
            child = subprocess.Popen(
                [os.fsencode(arg) for arg in req["argv"]], stdin=fds[0], stdout=fds[1],
                stderr=fds[2], cwd=os.fsencode(req["cwd"]), env=environ,
                umask=req["umask"], start_new_session=True, close_fds=True,
                preexec_fn=_in_callers_place(cgroup_fd, procfs.core_soft_limit(world)))
        except OSError as exc:
            failed = ExecError.of(req["argv"][0], exc)
            raise ProtocolError(protocol.E_EXEC, str(failed),
                                exit_status=failed.exit_code) from None
        finally:
            environ.clear()
            protocol.close_fds(fds)
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        self.state.count("accepted")
        self.state.count("running")
        try:
            pidfd = self._watch(child)
            try:
                protocol.send_frame(sock, {"type": "started", "pid": child.pid,
                                           "request_id": request_id})
            except OSError:
                pass  # the client is gone: _supervise sees it and stops the command
            result = self._supervise(sock, child, pidfd)
        finally:
            self.state.count("running", -1)
        self.state.audit.event("exited", f"{req['argv'][0]} (pid {child.pid}) {result}",
                         child_pid=child.pid, exit_status=child.returncode, outcome=result,
                         **fields)

    def _caller_cgroup_procs(self, peer):
        """The cgroup.procs files (one per candidate mount) of the caller's cgroup2
        group, when the command should move there; else []."""
        if not peer.cgroup or peer.cgroup == self.state.own_cgroup:
            return []
        return [os.path.join(root, peer.cgroup.lstrip("/"), "cgroup.procs")
                for root in procfs.CGROUP_ROOTS]

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
