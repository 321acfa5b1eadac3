"""The audit trail: one record per event, to journald with structured fields and a
fixed MESSAGE_ID each (units/ov-agent.catalog explains them), else one line on
stderr.  Callers pass only names and numbers: never a value, a key or a MAC.

The journal sender is a parameter, so that tests capture records without journald
(as python-systemd's own tests do).
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
}
PRIORITY = {"denied": 4, "unconfigured": 3}  # warning, error; others are info (6)


JOURNAL_SOCKET = "/run/systemd/journal/socket"


class Audit:
    def __init__(self, send=None):
        """send(MESSAGE=..., **fields): the journal (journal_sender()); None: stderr
        only."""
        self._send = send

    def event(self, kind, message, **fields):
        """Record one event; False if no sink (journal, then stderr) took it."""
        fields = {key.upper(): _field(value) for key, value in fields.items()
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
