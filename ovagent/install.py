"""``ov agent install``: systemd units for an ov that did not come with them (pip,
a virtualenv, a source checkout).  The Debian package ships its own units (units/);
the units written here carry the same directives (tests/test_install.py checks it),
with this installation's ``ov`` and the given key file.

As root: a system socket and service in /etc/systemd/system, plus the sysusers.d
entry for the ``ov-agent`` group and the tmpfiles.d entry for the socket's directory.
Otherwise (or with --user): user units in $XDG_CONFIG_HOME/systemd/user.

Every file written starts with MARKER; a file without it is never overwritten.
For tests, $OV_INSTALL_ROOT prefixes every path written, and $SYSTEMCTL,
$SYSTEMD_SYSUSERS and $SYSTEMD_TMPFILES name the programs --enable runs.
"""

import os
import re
import subprocess
import sys

from . import __version__, keyfile
from .errors import OvError, UsageError

MARKER = "# Written by 'ov agent install'"
GROUP = "ov-agent"
DEFAULT_NAME = "ov-agent"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Characters a path may not contain to go into a unit file verbatim.
UNSAFE_RE = re.compile(r"[\s\"'\\\x00-\x1f\x7f]")
AGENT_OPTIONS = "agent start --foreground{system} --drain 30 --grace 5"

# The system service's user and sandbox: the same as units/ov-agent.service (its
# comments and ov-agent(8) explain them, and the exposure score they yield).
AGENT_USER = "_ov-agent"
SYSTEM_IDENTITY = f"User={AGENT_USER}\nGroup={AGENT_USER}\n"
SYSTEM_STATE = "StateDirectory=ov\nStateDirectoryMode=0700\n"
SYSTEM_HARDENING = """\
AmbientCapabilities=
CapabilityBoundingSet=
DevicePolicy=closed
IPAddressDeny=any
LockPersonality=yes
MemoryDenyWriteExecute=yes
NoNewPrivileges=yes
PrivateDevices=yes
PrivateMounts=yes
PrivateNetwork=yes
PrivateTmp=yes
ProcSubset=pid
ProtectClock=yes
ProtectControlGroups=yes
ProtectHome=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectSystem=strict
RemoveIPC=yes
RestrictAddressFamilies=AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
SystemCallErrorNumber=EPERM
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
"""
# A user agent may spawn commands (--spawn from the user's own world): a restart
# must not kill them.
USER_KILL_MODE = "KillMode=process\n"

SOCKET_TEMPLATE = """\
{header}

[Unit]
Description={description} socket
Documentation=man:ov-agent(8) man:ov-run(1)

[Socket]
ListenStream={socket}
Accept=no
FileDescriptorName=ov-agent
{ownership}RemoveOnStop=yes
TriggerLimitIntervalSec=5s
TriggerLimitBurst=10

[Install]
WantedBy=sockets.target
"""

SERVICE_TEMPLATE = """\
{header}

[Unit]
Description={description}
Documentation=man:ov-agent(8) man:ov-run(1) man:ov(1)
Requires={name}.socket
After={name}.socket
StartLimitIntervalSec=10s
StartLimitBurst=5

[Service]
Type=notify
ExecStart={exec_start}
{identity}LoadCredential=machine.kek:{key}
SetCredential=machine.kek:none
{state}UMask=0077
Restart=on-failure
RestartSec=1s
WatchdogSec=30s
TimeoutStartSec=20s
TimeoutStopSec=45s
{extra}"""

SYSTEM_OWNERSHIP = f"""\
SocketUser=root
SocketGroup={GROUP}
SocketMode=0660
DirectoryMode=0750
"""
USER_OWNERSHIP = """\
SocketMode=0600
DirectoryMode=0700
"""


class Unit:
    """One file to write: where, and what."""

    def __init__(self, path, text):
        self.path, self.text = path, text


def _unit_text(value):
    """A path as a unit-file value: '%' escaped; refuse what would need quoting."""
    if UNSAFE_RE.search(value):
        raise UsageError(f"{value!r} contains blanks, quotes, backslashes or control "
                         "characters; use a path without them")
    return value.replace("%", "%%")


def _ov_command():
    """The command line that starts this installation's ov."""
    argv0 = sys.argv[0] if sys.argv else ""
    candidates = []
    if os.path.basename(argv0) == "ov":
        candidates.append(os.path.abspath(argv0))
    candidates.append(os.path.join(os.path.dirname(sys.executable), "ov"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return _unit_text(candidate)
    return f"{_unit_text(sys.executable)} -m ovagent"


def _check_name(name):
    if not NAME_RE.fullmatch(name) or name.endswith((".service", ".socket")):
        raise UsageError(f"invalid unit name {name!r}: use letters, digits, '-', '_' "
                         "and '.', without a .service or .socket suffix")
    return name


def _system_socket(name, socket):
    if socket is None:
        return f"/run/{name}/{name}.sock"
    path = os.path.normpath(socket)
    parent = os.path.dirname(path)
    if not os.path.isabs(path) or os.path.dirname(parent) != "/run":
        raise UsageError(f"--socket {socket}: a system agent's socket must be in a "
                         f"directory of its own under /run (e.g. /run/{name}/{name}.sock)")
    return path


def _user_socket(name, socket):
    if socket is None:
        return None  # %t/NAME/NAME.sock, written with its specifier
    if not os.path.isabs(socket):
        raise UsageError(f"--socket {socket}: use an absolute path")
    return os.path.normpath(socket)


def plan(*, machine_key, socket=None, unit_name=DEFAULT_NAME, user=False):
    """The files to write and the commands that enable them, as
    (units, commands, notes)."""
    name = _check_name(unit_name or DEFAULT_NAME)
    key = os.path.abspath(machine_key)
    root = os.environ.get("OV_INSTALL_ROOT", "")
    user = user or os.geteuid() != 0
    header = (f"{MARKER} (ov {__version__}); running it again rewrites this file.\n"
              f"# Local changes: 'systemctl{' --user' if user else ''} edit "
              f"{name}.service' (drop-ins survive).  See ov-agent(8).")
    description = "ov-agent secrets agent" + (f" ({name})" if name != DEFAULT_NAME else "")
    description += " (user)" if user else ""
    exec_start = f"{_ov_command()} " + AGENT_OPTIONS.format(
        system="" if user else " --system")
    notes = []
    if user:
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        unit_dir = os.path.join(config, "systemd", "user")
        listen = _user_socket(name, socket)
        socket_text = f"%t/{name}/{name}.sock" if listen is None else _unit_text(listen)
        ownership, systemctl = USER_OWNERSHIP, ["--user"]
        identity, state, extra = "", "", USER_KILL_MODE
        shown = listen or f"$XDG_RUNTIME_DIR/{name}/{name}.sock"
        default_socket = name == DEFAULT_NAME and listen is None
    else:
        unit_dir = "/etc/systemd/system"
        listen = _system_socket(name, socket)
        socket_text = _unit_text(listen)
        ownership, systemctl = SYSTEM_OWNERSHIP, []
        identity, state = SYSTEM_IDENTITY, SYSTEM_STATE
        extra = "\n" + SYSTEM_HARDENING
        shown = listen
        default_socket = listen == "/run/ov-agent/ov-agent.sock"
    units = [
        Unit(os.path.join(unit_dir, f"{name}.socket"), SOCKET_TEMPLATE.format(
            header=header, description=description, socket=socket_text,
            ownership=ownership)),
        Unit(os.path.join(unit_dir, f"{name}.service"), SERVICE_TEMPLATE.format(
            header=header, description=description, name=name, exec_start=exec_start,
            identity=identity, key=_unit_text(key), state=state, extra=extra)),
    ]
    commands = []
    if not user:
        units.append(Unit(f"/etc/sysusers.d/{name}.conf",
                          f"{MARKER} (ov {__version__}).\n"
                          f"# The group that may connect to {listen}.\n"
                          f"g {GROUP} - -\n"
                          "# The system agent's own user; it owns /var/lib/ov.\n"
                          f'u {AGENT_USER} - "ov-agent secrets agent" /var/lib/ov '
                          "/usr/sbin/nologin\n"))
        units.append(Unit(f"/etc/tmpfiles.d/{name}.conf",
                          f"{MARKER} (ov {__version__}).\n"
                          f"# The socket's directory: root and the {GROUP} group.\n"
                          f"d {_unit_text(os.path.dirname(listen))} 0750 root {GROUP} -\n"))
        commands += [[_program("SYSTEMD_SYSUSERS", "systemd-sysusers"), f"{name}.conf"],
                     [_program("SYSTEMD_TMPFILES", "systemd-tmpfiles"), "--create",
                      f"{name}.conf"]]
    systemctl = [_program("SYSTEMCTL", "systemctl"), *systemctl]
    commands += [[*systemctl, "daemon-reload"],
                 [*systemctl, "enable", "--now", f"{name}.socket"]]
    for unit in units:
        unit.path = root + unit.path if root else unit.path
    if not os.path.exists(key):
        notes.append(f"{key} does not exist yet: until it does, the agent starts in "
                     "'unconfigured' mode and tells clients how to create it "
                     f"('ov auth derive-machine-key --out {key}', then "
                     f"'systemctl{' --user' if user else ''} restart {name}.service').")
    else:
        keyfile.read_key(key)  # refuse a key file with the wrong owner, mode or size
    if not default_socket:
        notes.append(f"clients reach this agent with '--socket {shown}' or "
                     f"OV_AGENT_SOCK={shown}.")
    if not user:
        notes.append(f"services that use the agent need SupplementaryGroups={GROUP} and "
                     f"LoadCredential=machine.kek:{key} (see ov-agent(8)).")
    return units, commands, notes


def _program(variable, default):
    return os.environ.get(variable) or default


def _written_by_us(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OvError(f"cannot read {path}: {exc.strerror}") from None
    return any(line.startswith(MARKER) for line in head.splitlines()[:3])


def write(units):
    """Write every file, or none if any existing one is not ours."""
    for unit in units:
        if _written_by_us(unit.path) is False:
            raise UsageError(f"refusing to overwrite {unit.path}: it was not written by "
                             "'ov agent install' (move it away, or choose another "
                             "--unit-name)")
    for unit in units:
        directory = os.path.dirname(unit.path)
        tmp = os.path.join(directory, f".{os.path.basename(unit.path)}.{os.getpid()}.tmp")
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(unit.text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, unit.path)
        except OSError as exc:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise OvError(f"cannot write {unit.path}: {exc.strerror}") from None


def run(commands):
    for command in commands:
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL,
                                    capture_output=True, timeout=120)
        except OSError as exc:
            raise OvError(f"cannot run {command[0]}: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise OvError(f"'{' '.join(command)}' did not finish in 120 s") from None
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip().splitlines()
            raise OvError(f"'{' '.join(command)}' failed with status "
                          f"{result.returncode}" + (f": {detail[-1]}" if detail else ""))


def install(*, machine_key, socket=None, unit_name=DEFAULT_NAME, user=False,
            enable=False, out=sys.stdout):
    units, commands, notes = plan(machine_key=machine_key, socket=socket,
                                  unit_name=unit_name, user=user)
    replaced = any(os.path.exists(unit.path) for unit in units)
    write(units)
    for unit in units:
        print(f"Wrote {unit.path}", file=out)
    if enable:
        run(commands)
        for command in commands:
            print(f"Ran: {' '.join(command)}", file=out)
    else:
        print("Enable and start the socket with:", file=out)
        for command in commands:
            print(f"    {' '.join(command)}", file=out)
    if replaced:
        systemctl = " ".join(commands[-1][:-3])
        name = os.path.basename(units[0].path)[:-len(".socket")]
        notes.append(f"an agent already running keeps its old settings until "
                     f"'{systemctl} restart {name}.socket {name}.service'.")
    for note in notes:
        print(f"Note: {note}", file=out)
