"""Best-effort protection of the agent's key material in memory.

The machine key and its MAC subkey live only on a private anonymous page that is
locked (no swap), excluded from core dumps and wiped in forked children; the process
is made non-dumpable (no core files, no ptrace or /proc/PID/mem by same-uid
processes).  What a request derives from them (app key, DEKs, seal keys) is ordinary,
short-lived heap memory: this narrows exposure, it does not remove it
(docs/security.rst, "Key material in memory", lists every copy).
"""

import ctypes
import ctypes.util
import mmap
import resource

PR_SET_DUMPABLE = 4
# madvise(2) advice values (Linux); Python 3.11's mmap lacks MADV_WIPEONFORK.
MADV_ADVICE = {"dontdump": getattr(mmap, "MADV_DONTDUMP", 16),
               "wipeonfork": getattr(mmap, "MADV_WIPEONFORK", 18)}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden_process():
    """No core dumps and no same-uid ptrace of the agent.  Returns what held."""
    held = []
    try:
        # Only the soft limit: a command spawned for a caller gets the caller's back
        # (core/procfs.core_soft_limit), which a lowered hard limit would forbid.
        resource.setrlimit(resource.RLIMIT_CORE,
                           (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        held.append("no-core")
    except (OSError, ValueError):
        pass
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
        held.append("not-dumpable")
    return held


class LockedPage:
    """Keys kept on one private anonymous page: locked (no swap), left out of core
    dumps, wiped in forked children, and wiped by close().  hold() copies key material
    in and returns a read-only view of it, which cryptography and hmac.digest() take
    as they take bytes: the agent's long-lived keys exist only here."""

    def __init__(self):
        self._page = mmap.mmap(-1, mmap.PAGESIZE,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._used = 0
        self.protections = []
        for name, advice in MADV_ADVICE.items():
            try:
                self._page.madvise(advice)
                self.protections.append(name)
            except OSError:
                pass
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        if _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(mmap.PAGESIZE)) == 0:
            self.protections.append("mlock")

    def hold(self, material):
        """A read-only view of a copy of *material* on the page."""
        start, end = self._used, self._used + len(material)
        if end > mmap.PAGESIZE:
            raise ValueError("the locked page is full")
        self._page[start:end] = material
        self._used = end
        return memoryview(self._page)[start:end].toreadonly()

    def close(self):
        """Wipe the page.  Views of it may still be referenced (keyring, cipher
        objects) while the agent exits: then the mapping goes with the process."""
        if self._page is not None:
            self._page[:] = bytes(mmap.PAGESIZE)
            try:
                self._page.close()
            except BufferError:
                pass
            self._page = None


def wipe(buffer):
    """Zero a bytearray that held key material (bytes objects cannot be wiped)."""
    buffer[:] = bytes(len(buffer))
