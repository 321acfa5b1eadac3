"""What the agent takes from and says to systemd: the inherited listening socket
(python-systemd) and sd_notify readiness, status and watchdog (sdnotify).
"""

import os
import socket

FD_NAME = "ov-agent"


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
        self._notifier = None
        if os.environ.get("NOTIFY_SOCKET"):
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

    def stopping(self, status):
        self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self):
        self.notify("WATCHDOG=1")
