"""Who may be served: the keys a request may be signed with, the replay cache, and
the checks of docs/protocol.rst (schema, challenge, MAC, clock window, nonce, in
that order)."""

import collections
import hmac
import threading
import time

from ..core import protocol
from ..core.errors import NotFoundError, UsageError
from ..core.protocol import ProtocolError

NONCE_CAPACITY = 100_000
UNSIGNED_RELEASE = ("an unsigned request cannot have secrets released: they are sealed "
                    "to the machine key that signs the request (without a key, an agent "
                    "unlocked with the master password serves 'ov run --agent --spawn' "
                    "to its own uid)")


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
                 subkey=None):
        """subkey: the MAC subkey of the agent's own key (a view of the locked page)."""
        self.vault, self.keyring, self.mode, self.reason = vault, keyring, mode, reason
        self.scope = keyring.scope if keyring else None
        self._own_subkey = subkey
        self.lock = threading.Lock()   # the vault's SQLite connection is not shared-safe

    def verifying_subkey(self, req, app):
        """The MAC key that verifies *req* for *app*, or None: the agent's own key,
        else (when the agent holds the KEK) that app's key (a scoped machine key),
        unwrapped and derived only when the own key does not verify, and dropped with
        the request (no long-lived copy)."""
        own = self._own_subkey
        if own is not None and protocol.mac_matches(own, req):
            return own
        if self.keyring is None or self.keyring.kek is None:
            return None
        with self.lock:
            try:
                app_key = self.keyring.app_key(app)
            except (NotFoundError, UsageError):   # no such app, or not a valid name
                return None
        subkey = protocol.mac_key(app_key)
        return subkey if protocol.mac_matches(subkey, req) else None


def authenticate(state, obj, challenge, peer):
    """The verified request and the MAC subkey that verified it (None:
    unsigned), for *state* (an AgentState); ProtocolError otherwise."""
    req = protocol.validate_request(obj)
    if state.keys.vault is None:
        if req["op"] == "status":   # no key to sign with, nothing to protect
            return req, None
        raise ProtocolError(protocol.E_UNCONFIGURED, state.keys.reason)
    auth_failed = ProtocolError(protocol.E_AUTH, "request authentication failed")
    if not hmac.compare_digest(req["challenge"], challenge):
        raise auth_failed
    subkey = None
    if req["mac"] is None:
        if req["op"] == "release":
            raise ProtocolError(protocol.E_AUTH, UNSIGNED_RELEASE)
        if not (state.keys.mode == "interactive" and peer.uid == state.uid):
            raise auth_failed
    else:
        subkey = state.keys.verifying_subkey(req, req.get("app") or state.default_app)
        if subkey is None:
            raise auth_failed
    if abs(state.clock() - req["ts"]) > protocol.CLOCK_WINDOW:
        raise ProtocolError(protocol.E_STALE, "request timestamp outside the "
                            f"+-{protocol.CLOCK_WINDOW} s window (check the clock)")
    if not state.nonces.add(req["nonce"]):
        raise ProtocolError(protocol.E_REPLAY, "request was already used")
    return req, subkey

