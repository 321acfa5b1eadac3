"""What every request of ``ov agent`` shares: the keys, the policy, the audit trail,
the counters and the replay cache.  The event loop (server.py) reads a request, auth.py verifies
it, and release.py or spawn.py serve it with this state.
"""

import os
import threading
import time

from .. import __version__
from ..core import protocol
from ..core.errors import AuthError, NotFoundError, OvError, UsageError
from ..core.procfs import process_cgroups
from ..core.protocol import ProtocolError
from ..core.validate import DEFAULT_APP, DEFAULT_ENV
from ..core.audit import Audit
from .denials import Denials
from .auth import NonceCache
from .consumers import Consumers
from .policy import Caller, PolicyDenied
from .policy_files import PolicySource


class AgentState:
    def __init__(self, keys, *, default_app=None, all_users=False, audit=None,
                 policy=None, consumers=None, clock=time.time):
        """keys: a KeyState; all_users: serve every uid (the system agent), else only
        the agent's own uid and root; policy: a PolicySource (None: policy off);
        consumers: the registry (None: in memory only); clock: the wall clock
        requests are checked against (tests inject one)."""
        self.keys = keys
        self.policy = policy or PolicySource.off()
        self.consumers = consumers or Consumers(None)
        self.default_app = default_app or keys.scope or DEFAULT_APP
        self.all_users = all_users
        self.audit = audit or Audit()
        self.denials = Denials(self.audit)
        self.clock = clock
        self.uid = os.geteuid()
        self.own_cgroup = process_cgroups(os.getpid())[1]
        self.started = time.monotonic()
        self.nonces = NonceCache()
        self.counters = {"released": 0, "accepted": 0, "denied": 0, "running": 0,
                         "busy": 0}
        self._lock = threading.Lock()

    def count(self, counter, delta=1):
        with self._lock:
            self.counters[counter] += delta

    def admits(self, peer):
        """None, or why this peer may not use the agent at all (before any byte)."""
        if self.all_users or peer.uid in (self.uid, 0):
            return None
        return f"uid {peer.uid} may not use this agent (it serves uid {self.uid})"

    def list_consumers(self, peer, req):
        """The 'consumers' answer: which units hold which versions (filtered by the
        request's app, env and secrets), for root or the agent's own user only."""
        if peer.uid not in (0, self.uid):
            raise ProtocolError(protocol.E_PEER, "only root or the agent's own user may "
                                "list which units hold which secrets")
        answer = {"type": "consumers", "units": self.consumers.listing(
            req["app"], req["env"], req["secrets"])}
        try:
            protocol.encode_frame(answer)
        except ProtocolError:
            raise ProtocolError(protocol.E_TOO_LARGE, "the list of consumers does not "
                                "fit in one answer: name an app, env or secret") from None
        return answer

    def every_second(self):
        """The event loop's upkeep: sum up repeated denials, save the registry."""
        self.denials.flush()
        self.consumers.save()

    def finish(self):
        """The agent stops: every denial recorded, the registry saved."""
        self.denials.flush(everything=True)
        self.consumers.save()

    def reload_policy(self):
        """SIGHUP: read the policy again (the next request is decided by it, or by
        the previous one if it is invalid); what the agent is doing now."""
        self.policy.load()
        return f"serving ({self.keys.mode}); policy: {self.policy.current.summary()}"

    def refusal(self, peer, exc, **fields):
        """Record the exception that ends a request as a denial; return the error
        frame that answers it (an unexpected one as 'internal', by its type only)."""
        if isinstance(exc, ProtocolError):
            code, message, status = exc.code, str(exc), exc.exit_status
        elif isinstance(exc, OvError):
            code, message, status = protocol.E_INTERNAL, str(exc), None
        else:
            code, message, status = (protocol.E_INTERNAL,
                                     f"internal error ({type(exc).__name__})", None)
        self.count("denied")
        self.denials.record(f"request denied: {message}", code, message, peer.owner,
                            peer.fields(), **getattr(exc, "audit_fields", {}), **fields)
        return protocol.error_frame(code, message, status)

    def status(self):
        with self._lock:
            counters = dict(self.counters)
        status = {"type": "status", "version": __version__, "pid": os.getpid(),
                  "uptime": int(time.monotonic() - self.started), "mode": self.keys.mode,
                  "scope": self.keys.scope or "all apps", "default_app": self.default_app,
                  "counters": counters, "policy": self.policy.current.summary()}
        if self.keys.reason:
            status["reason"] = self.keys.reason
        return status

    def reveal(self, req, peer):
        """(app, env, name -> (version, value), the policy's Decision) of a release or
        spawn request from *peer*.  The policy decides before the vault is read (on
        a request that names no secrets: whether any rule allows this caller
        app/env), and on a request that names none again once the names of app/env
        are known; a denial is PolicyDenied."""
        app, env = req["app"] or self.default_app, req["env"] or DEFAULT_ENV
        policy, caller = self.policy.current, Caller.of(peer)
        decisions = []

        def allowed(names, available=()):
            decision = policy.decide(caller, app, env, names, available)
            if not decision.allowed:
                raise PolicyDenied(decision, caller, app, env, names)
            decisions.append(decision)
            return decision.names

        allowed(req["secrets"])      # a caller no rule speaks of learns nothing more
        choose = None if req["secrets"] is not None else \
            (lambda available: allowed(None, available))
        try:
            with self.keys.lock:
                revealed = self.keys.vault.reveal_versions(
                    self.keys.keyring, app, env, req["secrets"], choose)
            return app, env, revealed, decisions[-1]
        except NotFoundError as exc:
            raise ProtocolError(protocol.E_NOT_FOUND, str(exc)) from None
        except UsageError as exc:
            raise ProtocolError(protocol.E_BAD_REQUEST, str(exc)) from None
        except OvError as exc:
            raise ProtocolError(protocol.E_AUTH if isinstance(exc, AuthError) else
                                protocol.E_INTERNAL, str(exc)) from None

    def record(self, kind, message, **fields):
        """An audit record that must be written before anything is released or run."""
        if not self.audit.event(kind, message, **fields):
            raise ProtocolError(protocol.E_INTERNAL, "audit log unavailable; refusing "
                                "to release or run anything unaudited")


def refuse_and_close(state, sock, peer, exc, **fields):
    """Refuse on a blocking socket (a new connection, or a spawned command's): one
    small frame, sent with a short timeout, then close it and the peer's pidfd."""
    try:
        sock.settimeout(1.0)
        protocol.send_frame(sock, state.refusal(peer, exc, **fields))
    except (OSError, ProtocolError):   # gone, or a message too large to send
        pass
    finally:
        sock.close()
        peer.close()
