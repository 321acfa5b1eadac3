"""Unlocking a vault, for the command line and the agent alike: with a machine key
file (--machine-key, else the systemd credential ``machine.kek``), or with the master
password, read from a file descriptor, from stdin, or from the terminal.
"""

import getpass
import os
import sys

from . import keyfile
from .errors import UsageError


def prompt(text, instead, what="the master password"):
    """Read *what* with echo off from the controlling terminal.  Without one, the
    error names what works instead: *instead*, the options of the command at hand."""
    try:
        with open("/dev/tty", "rb"):
            pass
    except OSError:
        raise UsageError(f"no terminal to prompt for {what}; use {instead}") from None
    return getpass.getpass(text).encode()


def read_line(what, fd=None):
    """The first line of stdin (or of descriptor *fd*), without its line ending."""
    if fd is None:
        line = sys.stdin.buffer.readline()
    else:
        try:
            with os.fdopen(fd, "rb", closefd=False) as stream:
                line = stream.readline()
        except OSError as exc:
            raise UsageError(f"cannot read {what} from descriptor {fd}: "
                             f"{exc.strerror}") from None
    if not line:
        raise UsageError(f"expected {what} on "
                         f"{'stdin' if fd is None else f'descriptor {fd}'}")
    return line.rstrip(b"\n").rstrip(b"\r")


def unlock(vault, *, machine_key=None, password_stdin=False, password_fd=None, app=None,
           instead="--password-stdin or --machine-key"):
    """A keyring from a machine key file, the systemd credential, or the master
    password (from *password_fd*, stdin, else the terminal)."""
    by_password = password_stdin or password_fd is not None
    if machine_key and by_password:
        raise UsageError("use either --machine-key or a master password option, not both")
    path = None if by_password else keyfile.find(machine_key)
    if path:
        return vault.unlock_key(keyfile.read_key(path), app)
    if by_password:
        return vault.unlock(read_line("the master password", password_fd))
    return vault.unlock(prompt("Master password: ", instead))
