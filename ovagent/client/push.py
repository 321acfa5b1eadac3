"""Writing through (a write on a vault that is part of a fleet): the local
transaction, whole, is pushed to the shared store from its before_commit hook
(core/store.py), in one PostgreSQL transaction, and commits locally only once the
store has committed.

Locks, always in this order: the vault's write lock (the local transaction), the
app's row in the store (FOR UPDATE to rotate its key, FOR SHARE to write with it),
then the environment's manifest (FOR UPDATE).  Versions are append-only: a version
the store already has (another host wrote first), a write on top of a version
older than the store's newest, an app created twice or a key rotated from a
generation the store left behind is a ConflictError naming what and both sides.
"""

import time

from ..core.errors import ConflictError, UsageError
from . import replica

UNSUPPORTED = UsageError("deleting an app or environment, or changing the master "
                         "password, is not supported yet on a vault that is part of a "
                         "fleet")


def write_through(vault, keyring):
    """From now on, every write of this (joined) vault goes to the store first, and
    a conflict is remembered for `ov store status`."""
    dsn = replica.joined(vault)
    if dsn:
        vault.store.before_commit = lambda store: push(vault, keyring, dsn,
                                                       store.touched)
        vault.store.after_rollback = lambda exc: _remember(vault, exc)


def _remember(vault, exc):
    if isinstance(exc, ConflictError):
        vault.store.put_meta({replica.CONFLICT: f"{time.time():.0f} {exc}"})


def push(vault, keyring, dsn, touched):
    """Push what the local transaction *touched* to the store, or raise (and the
    local write is undone)."""
    if {kind for kind, *_ in touched} & {"app deleted", "env deleted", "meta"}:
        raise UNSUPPORTED
    secrets = {}
    for kind, *where in sorted(touched):
        if kind == "secret":
            secrets.setdefault(tuple(where[:2]), []).append(where[2])
    with replica.connect(dsn) as pg, pg.transaction():
        rotated = set()
        for kind, *where in sorted(touched):
            if kind == "app" and _push_app(pg, vault.store.get_app(where[0])):
                rotated.add(where[0])
            elif kind == "env":
                pg.put_env(where[0], where[1], time.time())
        for app in sorted(rotated):
            _push_rotation(vault, keyring, pg, app)
        for (app, env), names in sorted(secrets.items()):
            if app not in rotated:          # a rotation re-seals heads: no new version
                _push_env(vault, keyring, pg, app, env, names)


def _push_app(pg, record):
    """A new app, or a rotated one's record (True: then its rows and manifests
    follow)."""
    generation = pg.app_generation(record.name, lock="UPDATE")
    if generation is None:
        if not pg.create_app(record):
            raise ConflictError(f"conflict on app {record.name}: another host created "
                                "it first; run 'ov sync'")
        return False
    if record.generation == 1:
        raise ConflictError(f"conflict on app {record.name}: another host created it "
                            "first; run 'ov sync'")
    if generation != record.generation - 1:
        raise ConflictError(f"conflict on app {record.name}: this host rotated its key "
                            f"from generation {record.generation - 1}, the store has "
                            f"generation {generation}; run 'ov sync' and rotate again")
    pg.rotate_app(record)
    return True


def _push_rotation(vault, keyring, pg, app):
    """A rotated app key: every version's DEK wrapped anew (the store must hold
    exactly this host's rows), every manifest sealed anew under the new key."""
    records = vault.store.app_secret_versions(app)
    stale = ConflictError(f"conflict on app {app}: the store holds secret versions this "
                          "host has not seen; run 'ov sync' and rotate again")
    if len(pg.wrapped_deks(app)) != len(records):
        raise stale
    for record in records:
        if not pg.rewrap_secret(record):
            raise stale
    app_key, seen = keyring.app_key(app), vault.store.get_meta()
    for env, _ in vault.store.list_envs(app):
        counter, _ = pg.manifest(app, env, lock=True)
        if counter != seen.get(replica.COUNTER.format(app, env), 0):
            raise stale
        entries = vault.heads.get(app_key, app, env)
        _put_manifest(vault, pg, app_key, app, env, counter, entries, in_step=True)


def _push_env(vault, keyring, pg, app, env, names):
    """Push this host's change of *names* of app/env: their new records, and the
    manifest that lists them, on top of the store's."""
    app_key = keyring.app_key(app)
    generation = pg.app_generation(app, lock="SHARE")   # no rotation meanwhile
    if generation != vault.store.get_app(app).generation:
        raise ConflictError(f"conflict on app {app}: its key was rotated on another host "
                            f"(generation {generation}); run 'ov sync' and write again")
    counter, blob = pg.manifest(app, env, lock=True)
    entries = vault.keys.open_manifest(app_key, app, env, blob)[1] if counter else {}
    seen = vault.store.get_meta().get(replica.COUNTER.format(app, env), 0)
    heads = vault.heads.get(app_key, app, env, names)
    for name in names:
        mine, theirs = heads.get(name), entries.get(name)
        if mine:     # a new version: on top of the store's newest, and not there yet
            (record,) = vault.store.latest_secrets(app, env, [name])
            if (theirs[0] if theirs else 0) != mine[0] - 1 or not pg.put_secret(record):
                raise _conflict(app, env, name, mine, theirs)
            entries[name] = mine
        else:        # deleted: only if nobody wrote to app/env since this host looked
            if counter != seen:
                raise _conflict(app, env, name, mine, theirs)
            pg.delete_secret(app, env, name)
            entries.pop(name, None)
    _put_manifest(vault, pg, app_key, app, env, counter, entries, counter == seen)


def _put_manifest(vault, pg, app_key, app, env, counter, entries, in_step):
    """Seal and write manifest number *counter* + 1; this host wrote it (a store that
    later shows less rolled it back).  *in_step*: this host had applied number
    *counter*, so it now holds what the new one says; else a pull still has others'
    changes to bring, and must look at every head rather than at what it applied."""
    sealed = vault.keys.seal_manifest(app_key, app, env, counter + 1, entries)
    pg.put_manifest(app, env, counter + 1, sealed)
    meta = {replica.WRITTEN.format(app, env): counter + 1}
    if in_step:
        meta.update(replica.applied(app, env, counter + 1, entries, sealed))
    else:
        meta[replica.APPLIED.format(app, env)] = b""
    vault.store.put_meta(meta)


def _conflict(app, env, name, mine, theirs):
    ours = f"version {mine[0]}" if mine else "its deletion"
    store = f"version {theirs[0]}" if theirs else "no version"
    return ConflictError(f"conflict on secret {name} of {app}/{env}: this host wrote "
                         f"{ours}, the store has {store} from another host; run 'ov "
                         "sync', look, and write again")
