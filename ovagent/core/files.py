"""Files that appear whole or not at all: machine keys, vaults, pid files, units.

A file is built under a temporary name beside its final one (created exclusively,
with its exact mode), synced, then put in place by ``rename`` (replacing what is
there) or ``link`` (failing, with FileExistsError, rather than overwrite a file that
appeared meanwhile), and the directory is synced.  A crash leaves the old file or the
new one, never half of one; the temporary name never remains.
"""

import contextlib
import os


@contextlib.contextmanager
def created(path, mode=0o600, *, replace=True, leftovers=()):
    """Yield (fd, temporary path) to fill; then put the file at *path*.  *leftovers*:
    suffixes of companion files that must not remain either (SQLite's -wal, -shm)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        try:
            os.fchmod(fd, mode)          # exactly this mode, whatever the umask
            yield fd, tmp
            os.fsync(fd)
        finally:
            os.close(fd)
        (os.replace if replace else os.link)(tmp, path)
        sync_directory(directory)
    finally:
        for leftover in (tmp, *(tmp + suffix for suffix in leftovers)):
            if os.path.lexists(leftover):
                os.unlink(leftover)


def write(path, data, mode=0o600, *, replace=True):
    """Write bytes to *path* atomically (see created())."""
    with created(path, mode, replace=replace) as (fd, _):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def sync_directory(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
