"""What /proc says about a process: its systemd unit and cgroup, and the world it
lives in (what a child it starts would inherit).  The agent reads its peers' and its
own; a pid can be another process's by the time it is read, so callers pin the
process with a pidfd first (ovagent/agent/peer.py)."""

import os
import resource

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
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")  # cgroup2: unified, hybrid


def process_cgroups(pid):
    """(systemd unit, cgroup2 path, user manager's uid) of a process from one read
    of /proc/PID/cgroup (unit_of() says which unit; the path is None on pure cgroup
    v1); None if unreadable."""
    try:
        # A cgroup's name is any bytes its creator chose: never fail on them.
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    fields = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    cgroup2 = next((path.strip() for hierarchy, controllers, path in fields
                    if hierarchy == "0" and controllers == ""), None)
    systemd = next((path.strip() for _, controllers, path in fields
                    if controllers == "name=systemd"), None)
    unit, manager_uid = unit_of(cgroup2 or systemd or "")
    return unit, cgroup2, manager_uid


def unit_of(path):
    """(unit, user manager's uid or None) of cgroup *path*: the outermost service or
    scope, the one the system's service manager made (a unit with Delegate= may make
    cgroups of any name below it); inside a user's own manager (user@UID.service),
    the outermost unit below that, whose name any process of that user can choose."""
    units = [part for part in path.split("/") if part.endswith((".service", ".scope"))]
    if not units:
        return None, None
    uid = units[0][len("user@"):-len(".service")]
    if units[0].startswith("user@") and units[0].endswith(".service") and uid.isdigit():
        return (units[1] if len(units) > 1 else None), int(uid)
    return units[0], None


def owner(cgroup, uid):
    """Whom a process counts as when the agent shares itself out: the user's slice
    (user-UID.slice, whatever uids its processes take in user namespaces), else the
    unit it runs in (a unit cannot leave its cgroup subtree), else, outside any
    cgroup a service manager made, its uid."""
    parts = (cgroup or "").strip("/").split("/")
    for part in parts:
        if part.startswith("user-") and part.endswith(".slice"):
            return part
    for part in parts:
        if part.endswith((".service", ".scope")):
            return part
    return f"uid {uid}"


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
