"""Best-effort protection of the agent's key material in memory.

The master copy of the machine key lives on a private anonymous page that is locked
(no swap), excluded from core dumps and wiped in forked children; the process is made
non-dumpable (no core files, no ptrace or /proc/PID/mem by same-uid processes).  Keys
derived from it inside OpenSSL/Python objects are ordinary heap memory: this narrows
exposure, it does not remove it (docs/security.rst).
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


class LockedKey:
    """A key kept on a locked, no-dump, wipe-on-fork page; wiped by close()."""

    def __init__(self, key):
        self.size = len(key)
        self._page = mmap.mmap(-1, mmap.PAGESIZE,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.protections = []
        for name, advice in MADV_ADVICE.items():
            try:
                self._page.madvise(advice)
                self.protections.append(name)
            except OSError:
                pass
        self._buffer = (ctypes.c_char * mmap.PAGESIZE).from_buffer(self._page)
        if _libc.mlock(ctypes.c_void_p(ctypes.addressof(self._buffer)),
                       ctypes.c_size_t(mmap.PAGESIZE)) == 0:
            self.protections.append("mlock")
        self._page[:self.size] = key

    def get(self):
        return bytes(self._page[:self.size])

    def close(self):
        if self._page is not None:
            self._page[:self.size] = bytes(self.size)
            del self._buffer
            self._page.close()
            self._page = None
