"""The audit trail: one record per event, to journald with structured fields and a
fixed MESSAGE_ID each (units/ov-agent.catalog explains them), else one line on
stderr.  Callers pass only names and numbers: never a value, a key or a MAC.

Every text that reaches a record is escaped (control characters, line separators,
backslashes), so that a caller's argv[0] or a quoted piece of a bad request cannot
forge a line of a text log, nor of ``journalctl -x``'s catalog text.  Denials are
counted per uid and reason (Denials) so that no client can flood the journal.

The journal sender and the clock are parameters, so that tests capture records
without journald (as python-systemd's own tests do).
"""

import errno
import os
import sys
import threading
import time

from ..core import protocol

# One fixed MESSAGE_ID per audit event kind (see units/ov-agent.catalog).
MESSAGE_IDS = {
    "started": "70588917055e4a2dbf86c77d53d55cd3",
    "ready": "ea336cdaac054a37b2d05c67a7c84f1e",
    "released": "64a64b30fcc94232930a4740e847b570",
    "accepted": "f9136daab94d4ba3952e4e0cdf137d78",
    "denied": "9aa11e1145a34f9ca41aa79f0bd1be2a",
    "exited": "dcb7d95420d34b37b6fe98aee30ccad3",
    "stopping": "d6575c73dc01468e8059ecedd0b76f1d",
    "unconfigured": "a553112588694f158a83055a88dbd802",
    "policy-loaded": "deab4ccbbb1540e78550de8b645e0ae5",
    "policy-invalid": "d093f497cf6f4b8bb6f86dec7aec025e",
}
# warning, error; others are info (6)
PRIORITY = {"denied": 4, "unconfigured": 3, "policy-invalid": 3}
DENIAL_INTERVAL = 5.0     # seconds over which repeated denials make one record
# The refusals any client that may connect can provoke without a key.
COUNTED = frozenset({protocol.E_BAD_FRAME, protocol.E_TOO_LARGE, protocol.E_TIMEOUT,
                     protocol.E_BAD_REQUEST, protocol.E_AUTH, protocol.E_PEER,
                     protocol.E_BUSY, protocol.E_UNCONFIGURED})
# C0 and C1 controls, DEL, the Unicode line and paragraph separators, lone surrogates
# (from argv that was not UTF-8: journald could not take them), backslash.
_LOG_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}
_LOG_ESCAPES.update({code: f"\\u{code:04x}" for code in range(0xd800, 0xe000)})
_LOG_ESCAPES.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r",
                 0x2028: "\\u2028", 0x2029: "\\u2029", ord("\\"): "\\\\"})


JOURNAL_SOCKET = "/run/systemd/journal/socket"


class Audit:
    def __init__(self, send=None):
        """send(MESSAGE=..., **fields): the journal (journal_sender()); None: stderr
        only."""
        self._send = send

    def event(self, kind, message, **fields):
        """Record one event; False if no sink (journal, then stderr) took it."""
        message = escaped(message)
        fields = {key.upper(): escaped(_field(value)) for key, value in fields.items()
                  if value is not None}
        if self._send is not None:
            try:
                self._send(MESSAGE=message, MESSAGE_ID=MESSAGE_IDS[kind],
                           PRIORITY=str(PRIORITY.get(kind, 6)),
                           SYSLOG_IDENTIFIER="ov-agent", OV_EVENT=kind, **fields)
                return True
            except OSError:
                pass  # journald unreachable: never lose the record, use stderr
        details = " ".join(f"{key.lower()}={value}" for key, value in fields.items())
        try:
            print(f"ov-agent[{os.getpid()}]: {kind}: {message}" +
                  (f" ({details})" if details else ""), file=sys.stderr, flush=True)
            return True
        except (OSError, ValueError):
            return False


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


def escaped(text):
    """*text* on one line, unambiguous: control characters as backslash escapes."""
    return text.translate(_LOG_ESCAPES)


def _field(value):
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def journal_sender():
    """journald's sd_journal_send(), made to fail when journald's socket is missing:
    it would drop the record silently, and an unrecorded record must fall back to
    stderr (or refuse the request), never vanish."""
    from systemd import journal

    def send(MESSAGE, **fields):
        if not os.path.exists(JOURNAL_SOCKET):
            raise OSError(errno.ENOENT, "journald is not running")
        journal.send(MESSAGE, **fields)

    return send


def journal_available():
    """Whether our stderr is connected to the journal (systemd's JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        try:
            st = os.fstat(2)
            device, inode = stream.split(":")
            if (st.st_dev, st.st_ino) == (int(device), int(inode)):
                return True
        except (OSError, ValueError):
            pass
    return False
