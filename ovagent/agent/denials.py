"""Denials, recorded so that no client can flood the journal or drown other records
(docs/security.rst, A hostile client)."""

import threading
import time

from ..core import protocol

DENIAL_INTERVAL = 5.0     # seconds over which repeated denials make one record
# The refusals any client that may connect can provoke without a key.
COUNTED = frozenset({protocol.E_BAD_FRAME, protocol.E_TOO_LARGE, protocol.E_TIMEOUT,
                     protocol.E_BAD_REQUEST, protocol.E_AUTH, protocol.E_PEER,
                     protocol.E_BUSY, protocol.E_UNCONFIGURED})


class Denials:
    """Denials, recorded so that no client can flood the journal or drown other
    records.  Of the refusals any client can provoke without a key (COUNTED), the
    first one of an owner (Peer.owner) for one code is recorded in full, the next
    ones within *interval* seconds are only counted, and one record sums them up
    (REPEATED=N) once the interval is over (flush(), or the owner's next denial).
    A key holder's denials (replay, stale, spawn-refused...) are always recorded
    in full."""

    def __init__(self, audit, interval=DENIAL_INTERVAL, clock=time.monotonic):
        self.audit, self.interval, self._clock = audit, interval, clock
        self._windows = {}          # (owner, code) -> _Window
        self._lock = threading.Lock()

    def record(self, message, code, reason, owner, peer_fields, **fields):
        if code in COUNTED:
            key, now = (owner, code), self._clock()
            with self._lock:
                window = self._windows.get(key)
                if window is not None and now < window.end:
                    window.count(reason, peer_fields)
                    return
                self._windows[key] = _Window(now + self.interval)
            if window is not None:
                self._sum_up(key, window)
        self.audit.event("denied", message, code=code, reason=reason, owner=owner,
                         **peer_fields, **fields)

    def flush(self, everything=False):
        """Sum up every interval that is over (all of them when the agent stops)."""
        now = self._clock()
        with self._lock:
            ended = [(key, window) for key, window in self._windows.items()
                     if everything or now >= window.end]
            for key, _ in ended:
                del self._windows[key]
        for key, window in ended:
            self._sum_up(key, window)

    def _sum_up(self, key, window):
        owner, code = key
        if window.repeated:
            self.audit.event("denied", f"{window.repeated} more request(s) of {owner} "
                             f"denied ({code}) within {self.interval:g} s", code=code,
                             reason=window.reason, repeated=window.repeated,
                             owner=owner, **window.last_peer)


class _Window:
    """Denials counted for one owner and code until *end* (monotonic time)."""

    def __init__(self, end):
        self.end, self.repeated, self.reason, self.last_peer = end, 0, None, {}

    def count(self, reason, peer_fields):
        self.repeated += 1
        self.reason, self.last_peer = reason, peer_fields
