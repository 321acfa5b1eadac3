"""Machine key files: raw 32 bytes, a regular file we own, no group/other bits.

Stdlib only: ``ov run --agent`` reads the key on its hot path.
"""

import os
import stat

from . import paths
from .errors import OvError, UsageError

KEY_LEN = 32
CREDENTIAL_NAME = "machine.kek"
# Units pair "LoadCredential=machine.kek:/etc/ov/machine.kek" with the fallback
# "SetCredential=machine.kek:none": systemd then starts the unit even when the key
# file does not exist yet (a missing LoadCredential= file alone fails the start), and
# the credential holds this placeholder, which means "no machine key".
NO_KEY_PLACEHOLDER = b"none"


def read_key(path, into=None):
    """Read and check a machine key file: its bytes, or (*into*: a bytearray of
    KEY_LEN + 1 bytes that the caller wipes) a view of them in *into*, so that the
    agent keeps no copy it cannot wipe.  Raise UsageError naming the problem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise UsageError(f"machine key {path} is a symlink; refusing it") from None
        raise UsageError(f"cannot read machine key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"machine key {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise UsageError(f"machine key {path} is owned by uid {st.st_uid}, "
                             f"not by the current user (uid {os.geteuid()})")
        if st.st_mode & 0o077:
            raise UsageError(f"machine key {path} has mode "
                             f"{stat.S_IMODE(st.st_mode):04o}; it must be 0600 or 0400 "
                             f"(chmod 600 {path})")
        buffer = bytearray(KEY_LEN + 1) if into is None else into
        size = os.readv(fd, [buffer])
    finally:
        os.close(fd)
    if size != KEY_LEN:
        raise UsageError(f"machine key {path} must be exactly {KEY_LEN} bytes, "
                         f"not {'more' if size > KEY_LEN else size}")
    return bytes(buffer[:KEY_LEN]) if into is None else memoryview(into)[:KEY_LEN]


def find(machine_key=None, *, default=False):
    """The machine key file to use: --machine-key, else the systemd credential
    machine.kek, else (with *default*) paths.key_path() when it exists; else None."""
    path = machine_key or credential_path()
    if path is None and default and os.path.exists(paths.key_path()):
        path = paths.key_path()
    return path


def credential_path():
    """$CREDENTIALS_DIRECTORY/machine.kek when systemd's LoadCredential= provides it.

    The placeholder credential (see NO_KEY_PLACEHOLDER) counts as no credential."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = os.path.join(directory, CREDENTIAL_NAME)
        if os.path.exists(path) and not _is_placeholder(path):
            return path
    return None


def _is_placeholder(path):
    try:
        if os.stat(path).st_size != len(NO_KEY_PLACEHOLDER):
            return False
        with open(path, "rb") as handle:
            return handle.read() == NO_KEY_PLACEHOLDER
    except OSError:
        return False  # let read_key() report what is wrong with it


def write_key(path, key, force=False):
    """Write atomically, created 0600; never overwrite unless *force*."""
    from . import files      # (contextlib: not on the client's path, which only reads)

    exists = UsageError(f"{path} already exists; pass --force to overwrite it")
    if not force and os.path.lexists(path):
        raise exists
    try:
        files.write(path, key, 0o600, replace=force)
    except FileExistsError:    # one raced in: link() refused to overwrite it
        raise exists from None
    except OSError as exc:
        raise OvError(f"cannot write machine key {path}: {exc.strerror}") from None
