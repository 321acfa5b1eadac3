"""The leak sentinel: every test's outputs are searched for secret material.

Forbidden: the demo vault's secret values, the master password, the machine keys (raw
and hex) and every MAC a test computes.  Searched: the stderr of every ``ov`` the
fixtures run (and its stdout, except for ``ov run``, whose stdout is the command's),
every agent's log (its audit trail when there is no journald) and every frame an agent
sends a test.  conftest.py checks after each test; a leak fails that test with where it
was found and what it was, never the material itself.
"""

from pathlib import Path


class LeakWatch:
    def __init__(self):
        self._forbidden = {}      # bytes -> label, for the whole session
        self._per_test = {}       # bytes -> label, forgotten after each test
        self._outputs = []        # (where, bytes or a Path read at check time)

    def forbid(self, label, value, per_test=False):
        """Never let *value* (str or bytes) appear; short values would match by chance."""
        data = value.encode() if isinstance(value, str) else bytes(value)
        if len(data) >= 6:
            (self._per_test if per_test else self._forbidden)[data] = label

    def forbid_key(self, label, key):
        self.forbid(label, key)
        self.forbid(label + " (hex)", key.hex())

    def saw(self, where, data):
        """Output a test received: str or bytes."""
        if data:
            self._outputs.append((where, data.encode(errors="surrogateescape")
                                  if isinstance(data, str) else bytes(data)))

    def watch_file(self, where, path):
        """A file (an agent log) that is read when the test ends."""
        self._outputs.append((where, Path(path)))

    def begin(self):
        self._per_test.clear()
        self._outputs.clear()

    def found(self):
        """'LABEL in WHERE' for each leak in what was seen since begin()."""
        forbidden = {**self._forbidden, **self._per_test}
        leaks = []
        for where, data in self._outputs:
            if isinstance(data, Path):
                data = data.read_bytes() if data.is_file() else b""
            leaks += [f"{label} in {where}" for value, label in forbidden.items()
                      if value in data]
        return sorted(set(leaks))


watch = LeakWatch()
