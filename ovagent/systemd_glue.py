"""Everything the agent says to or takes from systemd: inherited sockets
(python-systemd), sd_notify (sdnotify), the journald audit trail, and the peer's unit.
"""

import os
import socket
import sys

FD_NAME = "ov-agent"
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                     "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY",
                     "INVOCATION_ID", "JOURNAL_STREAM")

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


def under_systemd():
    return bool(os.environ.get("LISTEN_FDS") or os.environ.get("NOTIFY_SOCKET"))


def inherited_listener():
    """The listening AF_UNIX stream socket systemd passed us, or None.

    Prefers the fd named ``ov-agent`` (FileDescriptorName=); refuses anything that
    is not a listening Unix stream socket.  Other passed fds are closed."""
    from systemd import daemon

    if not os.environ.get("LISTEN_FDS"):
        return None
    fds = daemon.listen_fds_with_names(unset_environment=True)
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # python-systemd only unsets the C environment
    if not fds:
        return None
    chosen = next((fd for fd, name in fds.items() if name == FD_NAME), min(fds))
    for fd in fds:
        if fd != chosen:
            os.close(fd)
    if not daemon.is_socket_unix(chosen, socket.SOCK_STREAM, 1):
        os.close(chosen)
        raise OSError(f"fd {chosen} from systemd is not a listening AF_UNIX stream socket")
    os.set_inheritable(chosen, False)
    return socket.socket(fileno=chosen)


class Notifier:
    """sd_notify messages; silent when there is no NOTIFY_SOCKET."""

    def __init__(self):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = None
        if self.enabled:
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", str(os.getpid()))
        self.watchdog_interval = (int(usec) / 2e6 if usec.isdigit() and int(usec) > 0
                                  and pid == str(os.getpid()) else None)

    def notify(self, *lines):
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status):
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status):
        self.notify(f"STATUS={status}")

    def stopping(self, status):
        self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self):
        self.notify("WATCHDOG=1")


JOURNAL_SOCKET = "/run/systemd/journal/socket"


class Audit:
    """The audit trail: journald with structured fields, else one line on stderr.

    Callers pass only names and numbers: never a value, a key or a MAC."""

    def __init__(self, use_journal=None):
        if use_journal is None:
            use_journal = journal_available()
        self._send = None
        if use_journal:
            from systemd import journal

            self._send = journal.send

    def event(self, kind, message, **fields):
        """Record one event; False if no sink (journal, then stderr) took it."""
        fields = {key.upper(): _field(value) for key, value in fields.items()
                  if value is not None}
        # sd_journal_send() silently drops a record when journald's socket is
        # missing: then the journal is as unreachable as when it refuses us.
        if self._send is not None and os.path.exists(JOURNAL_SOCKET):
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


def process_cgroups(pid):
    """(systemd unit, cgroup2 path) of a process from one read of /proc/PID/cgroup.

    The unit is the innermost service or scope (from the cgroup2 or name=systemd
    hierarchy); the path is None on pure cgroup v1.  (None, None) if unreadable."""
    try:
        # A cgroup's name is any bytes its creator chose: never fail on them.
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None, None
    fields = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    paths = [path for _, controllers, path in fields
             if controllers in ("", "name=systemd")]
    unit = next((part for path in paths for part in reversed(path.split("/"))
                 if part.endswith((".service", ".scope"))), None)
    cgroup2 = next((path.strip() for hierarchy, controllers, path in fields
                    if hierarchy == "0" and controllers == ""), None)
    return unit, cgroup2
