"""What /proc tells of a process and of the machine: CPU time, memory, load."""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """(self seconds, reaped-children seconds, self seconds in the kernel) of a
    process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        rest = handle.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, stime / CLK_TCK


def host_cpu():
    """(idle+iowait ticks, total ticks) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def proc_status(pid, field):
    """A kB field of /proc/PID/status (VmRSS, VmHWM, Threads...) as int."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_per_request(before, after, completed):
    """(agent CPU seconds per request, kernel share of that CPU) between two
    proc_cpu() readings."""
    return ((after[0] - before[0]) / max(completed, 1),
            (after[2] - before[2]) / max(after[0] - before[0], 1e-9))


def loadavg():
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])
