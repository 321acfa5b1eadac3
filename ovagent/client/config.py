"""Which app, env and secrets a command means: flags, then the nearest ``.ov.yaml``,
then the user's config file (``$XDG_CONFIG_HOME/ov/config.yaml``), then the defaults.

A config file chooses which secrets a command gets, so it must not come from someone
else (a ``.ov.yaml`` planted in /tmp would make root's ``ov run`` in /tmp/build inject
another app's secrets).  The rules (ov(1), CONFIGURATION):

* A file counts only if it is a regular file owned by the invoking user (euid) or
  root and not writable by group or others, checked with fstat() on the descriptor
  it is then read from, never stat-then-open.  A ``.ov.yaml`` that is a symbolic link
  is not followed (O_NOFOLLOW); the user's config file is (its path is the user's own
  choice, and dotfile managers link it), and its target is what is checked.  A
  ``.ov.yaml`` in a directory owned by another user (not the invoking user or root),
  or writable by others without the sticky bit, is not trusted either: its owner, or
  anyone, could swap it.  (A group-writable directory is accepted:
  swapping in a file needs one owned by us or root that nobody else can write, and
  a user-private-group umask makes project directories group-writable everywhere.)
* The search for ``.ov.yaml`` walks up from the working directory, from directory
  descriptor to directory descriptor (no path is opened twice, so a directory
  swapped for a symbolic link meanwhile changes nothing), and stops at $HOME
  (inclusive), at a filesystem boundary (st_dev differs from the parent's: the
  mounted directory is searched, its parent is not; a btrfs subvolume counts as
  one) and before any directory above $HOME, whichever comes first.  Outside $HOME
  it therefore never reaches /.
* An untrusted file is ignored with one ``ov: ignoring PATH: why`` line on stderr, as
  if it were not there; the nearest one ends the search all the same (the files
  further up are not looked at).
* A file is read only if the flags (and nearer layers) leave something undecided, so
  a broken file cannot fail a command whose flags decide everything; a broken file
  that is needed is a one-line usage error.

Stdlib os/stat only: ``ov run --agent`` resolves its target through here.
"""

import os
import stat

from ..core import paths
from ..core.errors import UsageError, warn
from ..core.validate import DEFAULT_APP, DEFAULT_ENV, check_name, check_slug

PROJECT_FILE = ".ov.yaml"
_KEYS = {"app", "env", "secrets"}
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK  # no FIFO hang
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


class Target:
    """What to run with.  app None: nothing chose one (the agent applies its --app);
    secrets None: every secret of app/env.  (A plain class: dataclasses would pull
    inspect into the client's start-up.)"""

    def __init__(self, app, env, secrets):
        self.app, self.env, self.secrets = app, env, secrets


def distrust(st, dir_st=None):
    """Why a config file with fstat *st* (in a directory with fstat *dir_st*) must
    not be used, or None when it may."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}, not you or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group/others"
    if dir_st is None:
        return None
    if dir_st.st_uid not in (os.geteuid(), 0):
        return f"in a directory owned by uid {dir_st.st_uid}, not you or root"
    if dir_st.st_mode & stat.S_IWOTH and not dir_st.st_mode & stat.S_ISVTX:
        return "in a directory writable by others without the sticky bit"
    return None


def read_trusted(path, *, dir_fd=None, dir_st=None, follow=False):
    """The bytes of the config file *path* (opened as its last component relative to
    *dir_fd* when given); None when there is no such file; False when there is one
    that must not be used (said on stderr)."""
    name = os.path.basename(path) if dir_fd is not None else path
    try:
        fd = os.open(name, _FILE_FLAGS | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return _unopenable(path, name, dir_fd, dir_st, follow, exc)
    try:
        reason = distrust(os.fstat(fd), dir_st)
        if reason:
            warn(f"ignoring {path}: {reason}")
            return False
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _unopenable(path, name, dir_fd, dir_st, follow, exc):
    """open() failed with *exc* (not ENOENT): ignore what is not ours, fail on what
    is ours but unreadable."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow)
    except OSError:
        return False                    # a directory we cannot search: stop there
    if stat.S_ISLNK(st.st_mode):
        warn(f"ignoring {path}: a symbolic link (not followed)")
        return False
    reason = distrust(st, dir_st)
    if reason:
        warn(f"ignoring {path}: {reason}")
        return False
    raise UsageError(f"cannot read {path}: {exc.strerror}")


def _identity(st):
    return st.st_dev, st.st_ino


def _home_and_above():
    """(identity of $HOME, identities of the directories above it)."""
    home = os.path.realpath(os.path.expanduser("~"))
    above, directory = set(), os.path.dirname(home)
    while True:
        try:
            above.add(_identity(os.stat(directory)))
        except OSError:
            pass
        if directory == os.path.dirname(directory):
            break
        directory = os.path.dirname(directory)
    try:
        return _identity(os.stat(home)), above
    except OSError:
        return None, above


def project_file(start=None):
    """The nearest .ov.yaml from *start* (default: the working directory) upwards, as
    (path, its bytes), or None: see the module's docstring for where the search stops
    and which files count.  The walk goes from descriptor to descriptor ("..") and
    judges what it opened, never a path opened again."""
    home, above_home = _home_and_above()
    try:
        directory = os.path.realpath(start or os.getcwd())   # for messages only
        dir_fd = os.open(start or ".", _DIR_FLAGS)
    except OSError:                     # the working directory was removed
        return None
    device = None
    try:
        while True:
            dir_st = os.fstat(dir_fd)
            if _identity(dir_st) in above_home:
                return None             # never above $HOME
            if device is not None and dir_st.st_dev != device:
                return None             # a filesystem boundary: not searched past
            device = dir_st.st_dev
            path = os.path.join(directory, PROJECT_FILE)
            data = read_trusted(path, dir_fd=dir_fd, dir_st=dir_st)
            if data is not None:
                return (path, data) if data is not False else None
            parent_fd = os.open("..", _DIR_FLAGS, dir_fd=dir_fd)
            if _identity(dir_st) == home or \
                    _identity(os.fstat(parent_fd)) == _identity(dir_st):   # / itself
                os.close(parent_fd)
                return None
            os.close(dir_fd)
            dir_fd, directory = parent_fd, os.path.dirname(directory)
    except OSError:
        return None
    finally:
        os.close(dir_fd)


def user_config_file():
    """The user's config file as (path, its bytes), or None."""
    path = paths.user_config()
    data = read_trusted(path, follow=True)
    return (path, data) if isinstance(data, bytes) else None


def load(path, data):
    """Parse one config file's bytes into a dict with only app/env/secrets,
    validated."""
    import yaml  # only when a file is needed: keeps `ov run` start-up lean

    try:
        data = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not set(data) <= _KEYS:
        raise UsageError(f"{path}: expected a mapping with keys app, env, secrets")
    try:
        for key in ("app", "env"):
            if key in data:
                check_slug(key, data[key])
        if "secrets" in data:
            if not isinstance(data["secrets"], list):
                raise UsageError("secrets must be a list of names")
            data["secrets"] = [check_name(name) for name in data["secrets"]]
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return data


def parse_secret_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--secrets needs at least one name")
    return [check_name(name) for name in names]


def resolve(app=None, env=None, secrets=None, *, vault=False, takes=("app", "env")):
    """Combine flags with config files.  When nothing chose an app, it stays None for
    the agent (which applies its --app), or is the default app for the *vault*.
    *takes*: what the command uses of app, env and secrets; a config file is read
    only while one of them is still undecided."""
    layers = [{"app": app, "env": env,
               "secrets": parse_secret_list(secrets) if secrets else None}]

    def pick(key):
        return next((layer[key] for layer in layers if layer.get(key)), None)

    for find in (project_file, user_config_file):
        if all(pick(key) for key in takes):
            break                       # decided: no file is read, none can fail it
        found = find()
        if found:
            layers.append(load(*found))

    chosen_app = pick("app") or (DEFAULT_APP if vault else None)
    chosen_env = pick("env") or DEFAULT_ENV
    if chosen_app:
        check_slug("app", chosen_app)
    check_slug("env", chosen_env)
    return Target(chosen_app, chosen_env, pick("secrets"))
