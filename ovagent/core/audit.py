"""The audit trail: one record per event, to journald with structured fields and a
fixed MESSAGE_ID each (units/ov-agent.catalog explains them), else one line on
stderr.  Callers pass only names and numbers: never a value, a key or a MAC.

Every text that reaches a record is escaped (control characters, line separators,
backslashes), so that a caller's argv[0] or a quoted piece of a bad request cannot
forge a line of a text log, nor of ``journalctl -x``'s catalog text.  The agent
writes most records; ``ov sync`` writes ``synced``.  (The agent counts repeated
denials before they reach here: ovagent/agent/denials.py.)

The journal sender and the clock are parameters, so that tests capture records
without journald (as python-systemd's own tests do).
"""

import errno
import os
import sys

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
    "synced": "30c1b78e410a4b26b8c1d089593bed9d",
    "rotated": "92166372691e4900ba795e2102ffb3f0",
}
# warning, error; others are info (6)
PRIORITY = {"denied": 4, "unconfigured": 3, "policy-invalid": 3}
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
