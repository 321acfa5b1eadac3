"""Who is on the other end of the agent's socket, from the kernel: the credentials
fixed at connect() (SO_PEERCRED), a pidfd that pins the process, its systemd unit,
and the world it lives in.

A pid alone can be reused by another process between connect() and a /proc lookup.
The agent therefore takes a pidfd right after accept (SO_PEERPIDFD where the kernel
has it, Linux 6.5+; else pidfd_open at once), and trusts what it read from
/proc/PID only if the pidfd's process is still running after the read: a process
that exited cannot lend its unit, or its world, to the next owner of its pid.
"""

import os
import resource
import select
import socket
import struct

from .systemd_glue import process_cgroups

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)

# What a command started by the agent inherits from the agent instead of its caller
# (a process inherits its parent's world); --spawn needs them all to be equal.
NAMESPACE_NAMES = {"cgroup": "cgroup namespace", "ipc": "IPC namespace",
                   "mnt": "mount namespace", "net": "network namespace",
                   "pid": "PID namespace",
                   "pid_for_children": "PID namespace of children",
                   "time": "time namespace",
                   "time_for_children": "time namespace of children",
                   "user": "user namespace", "uts": "UTS namespace"}
STATUS_FIELDS = {"Uid": "uids", "Gid": "gids", "Groups": "supplementary groups",
                 "NoNewPrivs": "NoNewPrivs", "Seccomp": "seccomp mode",
                 "CapInh": "inheritable capabilities", "CapPrm": "permitted capabilities",
                 "CapEff": "effective capabilities", "CapBnd": "capability bounding set",
                 "CapAmb": "ambient capabilities"}
SECCOMP_FILTERED = ["2"]            # /proc shows that filters exist, not which
CORE_LIMIT = "Max core file size"   # the agent lowers its own soft limit (secmem)


class Peer:
    """The process at the other end of one accepted connection.  close() it."""

    def __init__(self, conn):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.pidfd = _peer_pidfd(conn, self.pid)
        try:
            unit, cgroup = process_cgroups(self.pid)
            self.unit, self.cgroup = (unit, cgroup) if self.running() else (None, None)
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
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid,
                "peer_unit": self.unit}

    def world(self):
        """The peer's world (see world_of()), or None when it cannot be read or the
        process is gone."""
        try:
            facts = world_of(self.pid)
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


def world_of(pid):
    """What a command spawned by the agent would inherit from it instead of from
    process *pid*: namespaces, root, credentials, NoNewPrivs, seccomp, capabilities,
    resource limits and the LSM label.  Raises OSError when unreadable."""
    proc = f"/proc/{pid}"
    facts = {}
    # Named, not listed: a non-dumpable process (the agent) cannot list its own
    # /proc/self/ns, though it may stat each entry.
    for name, what in NAMESPACE_NAMES.items():
        try:
            st = os.stat(f"{proc}/ns/{name}")
            facts[what] = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            facts[what] = None     # a kernel without this kind of namespace
    st = os.stat(f"{proc}/root")
    facts["root directory"] = (st.st_dev, st.st_ino)
    with open(f"{proc}/status", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in STATUS_FIELDS:
                facts[STATUS_FIELDS[name]] = value.split()
    with open(f"{proc}/limits", encoding="ascii", errors="replace") as handle:
        for line in list(handle)[1:]:   # "%-25s %-20s %-20s %-10s" after a heading
            facts[f"limit '{line[:25].strip()}'"] = (line[26:46].strip(),
                                                    line[47:67].strip())
    try:
        with open(f"{proc}/attr/current", "rb") as handle:
            facts["security label"] = handle.read().rstrip(b"\0\n")
    except OSError:
        facts["security label"] = None   # no LSM that labels processes
    return facts


def differences(mine, theirs):
    """The names of the facts in which world *theirs* differs from *mine*.  The
    agent's soft core limit is its own (it lowers it); only the hard one counts.
    Seccomp filters cannot be compared (only their number shows): any filter, on
    either side, is a difference."""
    core = f"limit '{CORE_LIMIT}'"
    different = []
    for name in mine.keys() | theirs.keys():
        ours, other = mine.get(name), theirs.get(name)
        if name == core and ours and other:
            ours, other = ours[1], other[1]
        if ours != other:
            different.append(name)
    if SECCOMP_FILTERED in (mine.get("seccomp mode"), theirs.get("seccomp mode")):
        different.append("seccomp filters (they cannot be compared)")
    return sorted(set(different))


def core_soft_limit(facts):
    """The soft core limit of a world, as setrlimit() takes it."""
    soft = facts[f"limit '{CORE_LIMIT}'"][0]
    return resource.RLIM_INFINITY if soft == "unlimited" else int(soft)
