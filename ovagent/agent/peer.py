"""Who is on the other end of the agent's socket, from the kernel: the credentials
fixed at connect() (SO_PEERCRED), a pidfd that pins the process, its systemd unit,
and the world it lives in.

The supplementary groups come from SO_PEERGROUPS, also fixed at connect().  A pid
alone can be reused by another process between connect() and a /proc lookup.
The agent therefore takes a pidfd right after accept (SO_PEERPIDFD where the kernel
has it, Linux 6.5+; else pidfd_open at once), and trusts what it read from
/proc/PID only if the pidfd's process is still running after the read: a process
that exited cannot lend its unit, or its world, to the next owner of its pid.
"""

import errno
import os
import select
import socket
import struct

from ..core import procfs

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
NGROUPS_MAX = 65536

class Peer:
    """The process at the other end of one accepted connection.  close() it."""

    def __init__(self, conn):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.pidfd = _peer_pidfd(conn, self.pid)
        try:
            self.groups = _peer_groups(conn)
            found = procfs.process_cgroups(self.pid)
            # located: the cgroup was read while the process still ran (else its
            # unit is unknown, not "none": the policy refuses such a caller).
            self.located = found is not None and self.running()
            unit, cgroup, manager_uid = found if self.located else (None, None, None)
            self.unit, self.cgroup, self.manager_uid = unit, cgroup, manager_uid
            self.owner = procfs.owner(self.cgroup, self.uid)
        except BaseException:
            self.close()
            raise

    def running(self):
        """True while the pidfd's process runs (so /proc/PID still is that process)."""
        if self.pidfd is None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)   # a pidfd turns readable when its process exits

    def fields(self):
        """For audit records: the unit is always there ('none' outside any unit), so
        that the journal catalog's @PEER_UNIT@ is always filled in."""
        fields = {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid,
                  "peer_unit": self.unit or "none"}
        if self.manager_uid is not None:     # a unit of a user's own service manager
            fields["peer_user_manager"] = f"user@{self.manager_uid}.service"
        return fields

    def world(self):
        """The peer's world (procfs.world_of), or None when it cannot be read or the
        process is gone."""
        try:
            facts = procfs.world_of(self.pid)
        except OSError:
            return None
        return facts if self.running() else None

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _peer_pidfd(conn, pid):
    try:
        return struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:
        pass   # ENOPROTOOPT before Linux 6.5
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None   # gone already: nothing read from /proc/PID will be trusted


def _peer_groups(conn):
    """The peer's supplementary gids, as they were at connect()."""
    size = 64 * 4
    while True:
        try:
            data = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= NGROUPS_MAX * 4:
                raise
            size = NGROUPS_MAX * 4
            continue
        return struct.unpack(f"{len(data) // 4}I", data[:len(data) // 4 * 4])
