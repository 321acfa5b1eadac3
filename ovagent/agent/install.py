"""``ov agent install``: systemd units for an ov that did not come with them (pip,
a virtualenv, a source checkout).  It renders the very files the Debian package
installs (units/, which also ships inside the Python package), changing only what an
installation needs: its own ``ov``, the key file, the units' name and the socket.

As root: a system socket and service in /etc/systemd/system, plus the sysusers.d
entries (the ``ov-agent`` group, the ``_ov-agent`` user) and the tmpfiles.d entry for
the socket's directory.  Otherwise (or with --user): user units in
$XDG_CONFIG_HOME/systemd/user.

Every file written starts with MARKER; a file without it is never overwritten.
For tests, $OV_INSTALL_ROOT prefixes every path written, and $SYSTEMCTL,
$SYSTEMD_SYSUSERS and $SYSTEMD_TMPFILES name the programs --enable runs.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from .. import __version__
from ..core import files, keyfile, paths
from ..core.errors import OvError, UsageError
from ..core.keyfile import CREDENTIAL_NAME

MARKER = "# Written by 'ov agent install'"
GROUP = "ov-agent"
DEFAULT_NAME = "ov-agent"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Characters a path may not contain to go into a unit file verbatim.
UNSAFE_RE = re.compile(r"[\s\"'\\\x00-\x1f\x7f]")
# What the packaged units say, and what an installation changes in them.
PACKAGED_OV = "ExecStart=/usr/bin/ov "
USER_SOCKET = f"%t/{paths.AGENT_DIR}/{paths.SOCKET_NAME}"    # paths.user_socket()
PACKAGED_KEY = {False: f"LoadCredential={CREDENTIAL_NAME}:{paths.SYSTEM_KEY}",
                True: f"LoadCredential={CREDENTIAL_NAME}:%E/ov/{CREDENTIAL_NAME}"}
PACKAGED_SOCKET = {False: f"ListenStream={paths.SYSTEM_SOCKET}",
                   True: f"ListenStream={USER_SOCKET}"}
PACKAGED_DESCRIPTION = "Description=ov-agent secrets agent"


def units_dir():
    """units/: inside the installed package, or beside it in a source tree."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "units", package.parent / "units"):
        if (candidate / "ov-agent.service").is_file():
            return candidate
    raise OvError("this installation of ov lacks its unit files (ovagent/units)")


def render(relative, changes, header):
    """A packaged file with *changes* (old, new) made, each of which must apply: a
    unit that no longer says what install expects fails here, not on a server."""
    text = (units_dir() / relative).read_text()
    for old, new in changes:
        if old not in text:
            raise OvError(f"units/{relative} no longer contains {old!r}")
        text = text.replace(old, new)
    return f"{header}\n{text}"


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
    user = user or os.geteuid() != 0
    listen = _user_socket(name, socket) if user else _system_socket(name, socket)
    units = _units(name, key, listen, user)
    scope = ["--user"] if user else []
    commands = [] if user else [
        [_program("SYSTEMD_SYSUSERS", "systemd-sysusers"), f"{name}.conf"],
        [_program("SYSTEMD_TMPFILES", "systemd-tmpfiles"), "--create", f"{name}.conf"]]
    systemctl = [_program("SYSTEMCTL", "systemctl"), *scope]
    commands += [[*systemctl, "daemon-reload"],
                 [*systemctl, "enable", "--now", f"{name}.socket"]]
    return units, commands, _notes(name, key, listen, user)


def _units(name, key, listen, user):
    header = (f"{MARKER} (ov {__version__}); running it again rewrites this file.\n"
              f"# Local changes: 'systemctl{' --user' if user else ''} edit "
              f"{name}.service' (drop-ins survive).  See ov-agent(8).")
    named = [] if name == DEFAULT_NAME else [
        (PACKAGED_DESCRIPTION, f"{PACKAGED_DESCRIPTION} ({name})")]
    socket_text = f"%t/{name}/{name}.sock" if listen is None else _unit_text(listen)
    where, unit_dir = (("user", os.path.join(paths.config_home(), "systemd", "user"))
                       if user else (".", "/etc/systemd/system"))
    units = [
        Unit(os.path.join(unit_dir, f"{name}.socket"), render(
            f"{where}/ov-agent.socket",
            [(PACKAGED_SOCKET[user], f"ListenStream={socket_text}"), *named], header)),
        Unit(os.path.join(unit_dir, f"{name}.service"), render(
            f"{where}/ov-agent.service",
            [(PACKAGED_OV, f"ExecStart={_ov_command()} "),
             (PACKAGED_KEY[user], f"LoadCredential={CREDENTIAL_NAME}:{_unit_text(key)}"),
             ("ov-agent.socket", f"{name}.socket"), *named], header))]
    if not user:
        units += [Unit(f"/etc/sysusers.d/{name}.conf",
                       render("sysusers.d/ov-agent.conf", [], header)),
                  Unit(f"/etc/tmpfiles.d/{name}.conf", render(
                      "tmpfiles.d/ov-agent.conf",
                      [(f"d {os.path.dirname(paths.SYSTEM_SOCKET)} ",
                        f"d {_unit_text(os.path.dirname(listen))} ")], header))]
    root = os.environ.get("OV_INSTALL_ROOT", "")
    for unit in units:
        unit.path = root + unit.path
    return units


def _notes(name, key, listen, user):
    notes = []
    if not os.path.exists(key):
        notes.append(f"{key} does not exist yet: until it does, the agent starts in "
                     "'unconfigured' mode and tells clients how to create it "
                     f"('ov auth derive-machine-key --out {key}', then "
                     f"'systemctl{' --user' if user else ''} restart {name}.service').")
    else:
        keyfile.read_key(key)  # refuse a key file with the wrong owner, mode or size
    shown = listen or f"$XDG_RUNTIME_DIR/{name}/{name}.sock"
    if (listen or f"%t/{name}/{name}.sock") not in (paths.SYSTEM_SOCKET, USER_SOCKET):
        notes.append(f"clients reach this agent with '--socket {shown}' or "
                     f"OV_AGENT_SOCK={shown}.")
    if not user:
        notes.append(f"services that use the agent need SupplementaryGroups={GROUP} and "
                     f"LoadCredential={CREDENTIAL_NAME}:{key} (see ov-agent(8)).")
    return notes


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
        try:
            os.makedirs(os.path.dirname(unit.path), mode=0o755, exist_ok=True)
            files.write(unit.path, unit.text.encode(), 0o644)
        except OSError as exc:
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
