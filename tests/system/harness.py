"""Boot a real systemd as PID 1 of private namespaces, on a throw-away overlay of the
host's root, and run commands inside it.

Layout (see ../shared/NOTES.md for the recipe this follows):

* a new PID, mount, UTS, IPC and cgroup namespace (``unshare``); the network and
  user namespaces are the host's, so apt can reach Debian's archive;
* inside the new mount namespace only: a tmpfs holding the overlay's upper and work
  directories, an overlay ``lowerdir=/`` as the new root, a fresh ``proc`` (with
  ``/proc/sys`` read-only), a read-only ``sysfs``, a private ``/dev`` (null, zero,
  full, random, urandom, tty, a new devpts instance), tmpfs ``/run`` and ``/tmp``;
* cgroup v2 (the unified hierarchy, as on a default Debian 12 server) rooted at a
  fresh child cgroup of the host's cgroup2 hierarchy (``ov-boot-<pid>-<rand>``), made
  the namespace's cgroup root, so systemd's slices live below it and nowhere else;
* units the host enabled (its ``/etc/systemd/system/*.wants``) are disabled in the
  overlay, and units that would touch host-global state (sysctl, kernel modules,
  clocks, debug file systems, gettys) are masked.

Nothing is mounted in the host's mount namespace: every mount dies with the
namespace.  Teardown is SIGKILL to the namespace's PID 1 (the kernel then kills every
process in it), removal of the cgroup directories and of the host temp directory.  It
runs from the pytest finalizer, from ``atexit``, and from SIGTERM/SIGHUP handlers; if
the test process is SIGKILLed, ``PR_SET_PDEATHSIG`` on ``unshare`` and ``unshare
--kill-child`` take the namespace down, and the next boot sweeps leftover directories.
"""

import atexit
import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
PREFIX = "ov-boot-"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INNER_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_PAGER": "",
             "PAGER": "cat", "SYSTEMD_COLORS": "0", "DEBIAN_FRONTEND": "noninteractive",
             "HOME": "/root"}

# Units that would act on host-global state, or are pointless in a test container.
MASKED = [
    "systemd-sysctl.service",          # /proc/sys is the host's (read-only here anyway)
    "systemd-modules-load.service",    # would load kernel modules
    "systemd-timesyncd.service",       # would set the host's clock
    "systemd-journald-audit.socket",   # would switch the kernel audit system on
    "systemd-pstore.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
    "console-getty.service", "getty@tty1.service", "serial-getty@.service",
    "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer",
]

BOOT_SCRIPT = r"""
set -eu
# PID 1 of fresh pid/mount/uts/ipc/cgroup namespaces; "unshare --propagation private"
# already made every mount private, so nothing below reaches the host.
D=$1
mount -t tmpfs -o mode=0700 ov-boot "$D"
mkdir "$D/upper" "$D/work" "$D/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$D/upper,workdir=$D/work" "$D/root"
R=$D/root
printf '%s\n' "$OV_BOOT_MACHINE_ID" > "$R/etc/machine-id"
printf '%s\n' "$OV_BOOT_HOSTNAME" > "$R/etc/hostname"
: > "$R/etc/fstab"
# A container image's "never start services" policy (exit 101) is not a server's.
rm -f "$R/usr/sbin/policy-rc.d"
# Disable whatever the host enabled (databases, timers, gettys ...); mask the rest.
find "$R/etc/systemd/system" -mindepth 2 -maxdepth 2 -path '*.wants/*' -type l -delete
find "$R/etc/systemd/system" -mindepth 2 -maxdepth 2 -path '*.requires/*' -type l -delete
ln -sfn /lib/systemd/system/multi-user.target "$R/etc/systemd/system/default.target"
for unit in $OV_BOOT_MASK; do ln -sfn /dev/null "$R/etc/systemd/system/$unit"; done
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid,size=16m ov-dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mkdir "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev ov-shm "$R/dev/shm"
touch "$R/dev/console"
mount --bind "$R/dev/null" "$R/dev/console"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=0755,nosuid,nodev ov-run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev ov-tmp "$R/tmp"
# Shared propagation below the new root: LoadCredential= builds the credentials
# directory in a child mount namespace and moves it into /run (NOTES.md).
mount --make-rshared "$R"
exec chroot "$R" /usr/bin/env -i container=other /lib/systemd/systemd
"""


class Unavailable(Exception):
    """The system suite cannot run here; the message is the skip reason."""


class BootError(Exception):
    pass


def _cgroup2_root():
    """Mount point of the host's cgroup2 hierarchy (pure v2 or hybrid), or None."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    for fields in mounts:
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2" and fields[4] in ("/sys/fs/cgroup",
                                                          "/sys/fs/cgroup/unified"):
            return Path(fields[4])
    return None


def _own_cgroup2_path():
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def unavailable_reason():
    """None if a namespaced systemd can be booted here, else why not."""
    if os.environ.get("OV_SKIP_SYSTEM_SUITE"):
        return os.environ["OV_SKIP_SYSTEM_SUITE"]
    if os.geteuid() != 0:
        return "system suite needs root (it boots systemd in namespaces)"
    for tool in ("unshare", "nsenter", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"system suite needs {tool} (util-linux/coreutils)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"system suite needs a systemd binary at {SYSTEMD}"
    try:
        with open("/proc/filesystems", encoding="ascii") as handle:
            filesystems = handle.read()
    except OSError:
        filesystems = ""
    if "overlay" not in filesystems:
        return "system suite needs overlayfs in the kernel"
    if _cgroup2_root() is None:
        return "system suite needs a cgroup2 hierarchy (/sys/fs/cgroup or .../unified)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "true"],
        capture_output=True, timeout=30)
    if probe.returncode != 0:
        return ("system suite needs unshare --pid --mount --cgroup: "
                + probe.stderr.decode(errors="replace").strip().splitlines()[-1:][0]
                if probe.stderr.strip() else "unshare failed")
    return None


def _set_pdeathsig():
    """In the child before exec: die with the test process, whatever kills it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_cgroup_tree(path, timeout=10.0):
    """rmdir a cgroup subtree bottom-up, waiting for dying processes to leave."""
    deadline = time.monotonic() + timeout
    while True:
        dirs = sorted((Path(root) for root, _, _ in os.walk(path)),
                      key=lambda p: len(p.parts), reverse=True)
        try:
            for directory in dirs:
                directory.rmdir()
            return True
        except FileNotFoundError:
            continue
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def sweep_leftovers():
    """Remove what a killed earlier run may have left: empty ov-boot-* cgroups and
    temp directories of dead test processes."""
    root = _cgroup2_root()
    if root is not None:
        for entry in root.glob(PREFIX + "*"):
            owner = entry.name[len(PREFIX):].split("-")[0]
            if owner.isdigit() and not _pid_alive(int(owner)):
                _remove_cgroup_tree(entry, timeout=1.0)
    for entry in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        owner = entry.name[len(PREFIX):].split("-")[0]
        if owner.isdigit() and not _pid_alive(int(owner)) and entry.is_dir():
            ns = entry / "ns"
            if not ns.exists() or not os.path.ismount(ns):
                shutil.rmtree(entry, ignore_errors=True)


_LIVE = set()
_PREVIOUS_HANDLERS = {}


def _teardown_all():
    for system in list(_LIVE):
        system.teardown()


def _on_fatal_signal(signum, frame):
    _teardown_all()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_safety_nets():
    if _PREVIOUS_HANDLERS or threading.current_thread() is not threading.main_thread():
        return
    atexit.register(_teardown_all)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        _PREVIOUS_HANDLERS[signum] = signal.getsignal(signum)
        signal.signal(signum, _on_fatal_signal)


class Result(subprocess.CompletedProcess):
    @property
    def out(self):
        return self.stdout.decode(errors="replace")

    @property
    def err(self):
        return self.stderr.decode(errors="replace")


class System:
    """One booted systemd.  ``run``/``sh`` execute inside it (all its namespaces,
    its root), as root, with a clean environment."""

    def __init__(self, log=None):
        self.log = log or (lambda message: None)
        self.pid1 = None
        self.proc = None
        self.tmp = None
        self.cgroup = None
        self.boot_seconds = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------

    def boot(self, timeout=90):
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        sweep_leftovers()
        _install_safety_nets()
        started = time.monotonic()
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{tag}-"))
        _LIVE.add(self)
        (self.tmp / "ns").mkdir()
        script = self.tmp / "boot.sh"
        script.write_text(BOOT_SCRIPT)
        self.cgroup = _cgroup2_root() / (_own_cgroup2_path() or "/").lstrip("/") / \
            f"{PREFIX}{tag}"
        self.cgroup.mkdir()
        env = {"PATH": PATH, "OV_BOOT_MACHINE_ID": secrets.token_hex(16),
               "OV_BOOT_HOSTNAME": "ov-boot", "OV_BOOT_MASK": " ".join(MASKED)}
        console = open(self.tmp / "console.log", "wb")
        try:
            # The wrapper moves itself into the new cgroup, then becomes unshare;
            # unshare's forked child becomes PID 1 (the boot script, then systemd).
            self.proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec unshare --pid --fork '
                 '--kill-child --mount --uts --ipc --cgroup --propagation private '
                 'sh "$2" "$3"', "ov-boot", str(self.cgroup), str(script),
                 str(self.tmp / "ns")],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=_set_pdeathsig)
        finally:
            console.close()
        try:
            self.pid1 = self._find_pid1(started + 15)
            self._wait_running(started + timeout)
        except BaseException:
            self.teardown()
            raise
        self.boot_seconds = time.monotonic() - started
        self.log(f"systemd booted in {self.boot_seconds:.1f}s (host pid {self.pid1})")
        return self

    def _console(self):
        try:
            return (self.tmp / "console.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _find_pid1(self, deadline):
        pid = self.proc.pid
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootError(f"namespace setup failed (status {self.proc.returncode}):"
                                f"\n{self._console()}")
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                if children:
                    child = int(children[0])
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return child
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise BootError(f"systemd did not start:\n{self._console()}")

    def _wait_running(self, deadline):
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootError(f"systemd died during boot:\n{self._console()}")
            result = self.run("systemctl", "is-system-running", check=False, timeout=10)
            state = result.out.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.run("systemctl", "--failed", "--no-legend", "--plain",
                                      check=False).out
                    self.log(f"system degraded after boot: {failed.strip()}")
                return state
            time.sleep(0.1)
        raise BootError(f"systemd did not reach running (last state {state!r})")

    def teardown(self):
        """SIGKILL PID 1 (the kernel kills the namespace), remove our directories.
        Idempotent; safe from signal handlers and atexit."""
        with self._lock:
            if self.proc is not None:
                # PID 1 first: unshare then reaps it and exits on its own.
                for pid in ([self.pid1] if self.pid1 else []) + [self.proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    try:
                        self.proc.wait(timeout=15)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                self.proc = None
            if self.cgroup is not None:
                if _remove_cgroup_tree(self.cgroup):
                    self.cgroup = None
            if self.tmp is not None:
                ns = self.tmp / "ns"
                if not os.path.ismount(ns):  # the mount lives only in the dead namespace
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    self.tmp = None
            _LIVE.discard(self)

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- running things inside ---------------------------------------------------

    def run(self, *argv, input=None, check=True, timeout=120, env=None):
        """Run argv inside, as root, with a clean environment; return a Result."""
        if not self.alive:
            raise BootError("the booted system is gone")
        inner = dict(INNER_ENV, **(env or {}))
        command = ["nsenter", "-t", str(self.pid1), "-a", "-r", "-w",
                   "env", "-i", *[f"{k}={v}" for k, v in inner.items()]]
        if isinstance(input, str):
            input = input.encode()
        stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        try:
            completed = subprocess.run(command + [str(a) for a in argv], **stdin,
                                       capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BootError(f"timed out after {timeout}s: {shlex.join(map(str, argv))}"
                            ) from exc
        result = Result(completed.args, completed.returncode, completed.stdout,
                        completed.stderr)
        if check and result.returncode != 0:
            raise BootError(f"{shlex.join(map(str, argv))} exited {result.returncode}:\n"
                            f"{result.out[-3000:]}\n{result.err[-3000:]}")
        return result

    def sh(self, script, **kwargs):
        return self.run("sh", "-ec", script, **kwargs)

    def systemctl(self, *args, **kwargs):
        return self.run("systemctl", "--no-pager", *args, **kwargs)

    def write(self, path, data, mode=0o644):
        """Create or replace a file inside (parent directories created)."""
        if isinstance(data, str):
            data = data.encode()
        self.run("sh", "-ec", 'mkdir -p "$(dirname "$1")"; cat > "$1.tmp"; '
                 'chmod "$2" "$1.tmp"; mv -f "$1.tmp" "$1"', "write",
                 str(path), f"{mode:o}", input=data)

    def read(self, path):
        return self.run("cat", str(path)).stdout

    def exists(self, path):
        return self.run("test", "-e", str(path), check=False).returncode == 0

    def show(self, unit, *properties):
        """``systemctl show`` as a dict."""
        args = ["show", unit] + [f"--property={p}" for p in properties]
        out = self.systemctl(*args).out
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, predicate, timeout=30, interval=0.1, what="condition"):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                             f"(last: {last!r})")

    def journal(self, *args):
        """journalctl -o json entries as dicts."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).out
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def pids_with_environ(self, needle):
        """Pids (namespace view) whose environment contains *needle* (bytes)."""
        script = ('import os,sys\nn=sys.stdin.buffer.read()\n'
                  'for p in os.listdir("/proc"):\n if p.isdigit():\n'
                  '  try: e=open(f"/proc/{p}/environ","rb").read()\n'
                  '  except OSError: continue\n  if n in e: print(p)')
        out = self.run("python3", "-c", script, input=needle).out
        return [int(p) for p in out.split()]


def build_deb(source, workdir, log=None):
    """Copy *source* (the repository) into *workdir* and build the binary package with
    ``dpkg-buildpackage -us -uc -b``; return the .deb's path."""
    log = log or (lambda message: None)
    tree = Path(workdir) / "src"
    ignore = shutil.ignore_patterns(".git", ".venv*", ".hypothesis", ".pytest_cache",
                                    ".ruff_cache", "__pycache__", "*.egg-info", "build",
                                    "dist", ".pybuild")
    shutil.copytree(source, tree, ignore=ignore, symlinks=True)
    started = time.monotonic()
    result = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree,
                            capture_output=True, timeout=600,
                            env={"PATH": PATH, "LANG": "C.UTF-8", "HOME": str(workdir),
                                 "DEB_BUILD_OPTIONS": "nocheck"})
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise BootError(f"dpkg-buildpackage failed ({result.returncode}):\n"
                        f"{output[-6000:]}")
    debs = sorted(Path(workdir).glob("ov-agent_*.deb"))
    if not debs:
        raise BootError(f"dpkg-buildpackage made no ov-agent_*.deb in {workdir}")
    log(f"built {debs[-1].name} in {time.monotonic() - started:.1f}s")
    return debs[-1]


def exposure_claim(unit_text):
    """The exposure score a unit file's comment claims, e.g. a line
    ``# systemd-analyze security: exposure 2.1 OK`` (any comment line that mentions
    'exposure' or 'systemd-analyze security' followed by a number).  None if absent."""
    for line in unit_text.splitlines():
        stripped = line.strip()
        if not stripped.startswith(("#", ";")):
            continue
        if re.search(r"exposure|systemd-analyze security", stripped, re.I):
            match = re.search(r"(?<![\d.])(\d{1,2}\.\d)(?![\d.])", stripped)
            if match:
                return float(match.group(1))
    return None


EXPOSURE_RE = re.compile(r"Overall exposure level for \S+:\s*(\d+(?:\.\d+)?)")


def parse_exposure(output):
    match = EXPOSURE_RE.search(output)
    return float(match.group(1)) if match else None
