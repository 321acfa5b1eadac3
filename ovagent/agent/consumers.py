"""Which units hold which secret versions: the agent's registry of consumers, so that
a changed secret can be rolled out to the services that use it (ov-agent(8),
CONSUMERS; the CLI acts on it: ovagent/client/rollout.py).

Every release (and spawn) to a caller in a unit records the unit, app and env, and
each secret's version.  The registry is kept in the agent's state directory
(written whole, at most once a second, and when the agent stops), so it survives
restarts; it is bounded (the least recently seen entries go first), and forgets a
unit once its cgroup is gone (the unit stopped).  It holds names and versions,
never values.
"""

import json
import os
import threading
import time

from ..core import files, procfs

FILE_NAME = "consumers.json"
MAX_ENTRIES = 1024           # a listing of all of them fits in one answer frame
MAX_PER_USER_MANAGER = 64    # a user who makes cgroups at will cannot push others out
MAX_UNIT_NAME = 255
UNIT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                            "0123456789:-_.\\@")
FORMAT = 1


class Consumers:
    def __init__(self, path, clock=time.time):
        """path: the registry's file (None: kept in memory only)."""
        self.path, self._clock = path, clock
        self._entries = {}           # (unit, manager uid, app, env) -> entry, oldest first
        self._dirty = False
        self._lock = threading.Lock()
        self._load()

    def record(self, peer, app, env, versions):
        """*peer* (its unit and cgroup) received *versions* (name -> version) of
        app/env.  Not recorded: a caller outside any service (a scope, such as a
        login session, cannot be restarted), nor a unit name systemctl would not
        take as one (a user names cgroups in their own manager at will)."""
        if not restartable(peer.unit):
            return
        key = (peer.unit, peer.manager_uid, app, env)
        with self._lock:
            entry = self._entries.pop(key, {"versions": {}})
            entry["versions"].update(versions)
            entry.update(cgroup=peer.cgroup, uid=peer.uid, seen=int(self._clock()))
            self._entries[key] = entry
            if peer.manager_uid is not None:
                self._bound([old for old in self._entries if old[1] == peer.manager_uid],
                            MAX_PER_USER_MANAGER)
            self._bound(list(self._entries), MAX_ENTRIES)
            self._dirty = True

    def _bound(self, keys, limit):
        """Drop the least recently seen of *keys* (oldest first) beyond *limit*."""
        for old in keys[:max(0, len(keys) - limit)]:
            del self._entries[old]

    def listing(self, app=None, env=None, secrets=None):
        """The entries of units still running, filtered: [{unit, user_manager, uid,
        app, env, versions, seen}]."""
        self.forget_stopped()
        with self._lock:
            found = []
            for (unit, manager_uid, entry_app, entry_env), entry in self._entries.items():
                versions = {name: version for name, version in entry["versions"].items()
                            if secrets is None or name in secrets}
                if (app in (None, entry_app) and env in (None, entry_env) and versions):
                    found.append({"unit": unit, "user_manager": manager_uid,
                                  "uid": entry["uid"], "app": entry_app, "env": entry_env,
                                  "versions": versions, "seen": entry["seen"]})
        return found

    def forget_stopped(self):
        """Drop the units whose cgroup is gone (a stopped unit's is removed)."""
        with self._lock:
            gone = [key for key, entry in self._entries.items()
                    if entry.get("cgroup") and not _cgroup_exists(entry["cgroup"])]
            for key in gone:
                del self._entries[key]
            self._dirty = self._dirty or bool(gone)

    def save(self):
        """Write the registry if it changed (the loop calls this every second)."""
        with self._lock:
            if not self._dirty or self.path is None:
                return
            data = json.dumps({"format": FORMAT, "entries": [
                [*key, entry] for key, entry in self._entries.items()]}).encode()
            self._dirty = False
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            files.write(self.path, data, 0o600)
        except OSError:
            self._dirty = True       # kept in memory; tried again a second later

    def _load(self):
        """The registry a previous agent saved; a missing or unreadable one is empty
        (it is only a record of what was released, rebuilt as callers come)."""
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as handle:
                saved = json.loads(handle.read(64 * 1024 * 1024))
            if saved["format"] != FORMAT:
                return
            for unit, manager_uid, app, env, entry in saved["entries"][-MAX_ENTRIES:]:
                if _well_formed(unit, manager_uid, app, env, entry):
                    self._entries[(unit, manager_uid, app, env)] = entry
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._entries = {}


def restartable(unit):
    """A service name, as systemctl takes one (and no option: no leading '-')."""
    return (isinstance(unit, str) and unit.endswith(".service")
            and 0 < len(unit) <= MAX_UNIT_NAME and not unit.startswith("-")
            and UNIT_CHARACTERS.issuperset(unit))


def _well_formed(unit, manager_uid, app, env, entry):
    """An entry as record() makes them (a file edited by hand may hold anything)."""
    def number(value):
        return type(value) is int and value >= 0
    return (restartable(unit) and all(isinstance(text, str) for text in (app, env))
            and (manager_uid is None or number(manager_uid))
            and isinstance(entry, dict) and number(entry.get("uid"))
            and number(entry.get("seen"))
            and isinstance(entry.get("cgroup"), (str, type(None)))
            and isinstance(entry.get("versions"), dict)
            and all(isinstance(name, str) and number(version)
                    for name, version in entry["versions"].items()))


def _cgroup_exists(path):
    return any(os.path.isdir(os.path.join(root, path.lstrip("/")))
               for root in procfs.CGROUP_ROOTS)
