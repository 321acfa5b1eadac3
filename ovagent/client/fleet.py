"""A fleet: many hosts, one vault, through a shared store (pgstore.py) that never
sees a key or a value (ov-store(1)).

Every host keeps its SQLite vault as a full replica, and everything that reads
secrets (``ov run``, the agent) reads only the replica: the database being down
stops no service.  What a host knows of the store is in its vault's metadata: the
connection string, and for each environment the counter of the last manifest it
applied.

* A write goes to the store first (write-through): the local transaction, whole,
  is pushed from its before_commit hook, inside one PostgreSQL transaction that
  locks the environment's manifest, and commits locally only once the store has
  committed.  Versions are append-only: a version the store already has (another
  host wrote it first), or a write on top of a version older than the store's
  newest, is a ConflictError naming the secret and both versions.
* A pull (``ov sync``) applies every manifest whose counter is above the one this
  host applied: the manifest, sealed under the app key, must open, say the counter
  the row says, and each of its entries must be matched by the rows it names (the
  newest one's digest, no version missing).  A lower counter than this host has
  seen is a rollback; a missing or altered row is a withheld one: both are
  IntegrityErrors (exit 5) and nothing of that pull is applied.
"""

import os
import time

from ..core.errors import (AuthError, ConflictError, IntegrityError, NotFoundError,
                           StoreError, UsageError)
from ..core.store import SqliteStore

STORE = "store"                      # local metadata: the store's connection string
SYNCED = "store_synced"              # local metadata: time of the last pull
POSITION = "store_seq"               # local metadata: the store's change number pulled
COUNTER = "manifest:{}/{}"           # local metadata: the manifest counter applied
ROWS = "rows:{}/{}"                  # local metadata: versions that manifest implies
FALLBACK = 300.0                     # seconds: follow() pulls at least this often
MAX_PAUSE = 60.0                     # seconds between tries while the store is down


def status(vault):
    """What `ov store status` says: {store, last pull, change number pulled, the
    store's (None: unreachable, with why), environments behind}."""
    meta = vault.store.get_meta()
    found = {"store": meta.get(STORE), "synced": meta.get(SYNCED),
             "position": meta.get(POSITION, 0), "latest": None, "behind": []}
    try:
        with _connect(found["store"]) as pg, pg.transaction():
            manifests = pg.manifests_since(0)
    except StoreError as exc:
        found["unreachable"] = str(exc)
        return found
    found["latest"] = max([seq for *_, seq in manifests], default=0)
    found["behind"] = [f"{app}/{env}" for app, env, counter, _, _ in manifests
                       if counter > meta.get(COUNTER.format(app, env), 0)]
    return found


def joined(vault):
    """The connection string of the store this vault replicates, or None."""
    return vault.store.get_meta().get(STORE)


# -- creating a fleet, joining one ---------------------------------------------


def _connect(dsn):
    """The store (psycopg is imported only by what talks to it)."""
    from .pgstore import PgStore

    return PgStore(dsn)


def init(vault, keyring, dsn):
    """Create the store's schema (or bring it up to date) and push this vault into
    it: the vault's metadata, every app, environment and secret version, and a
    manifest per environment.  The number of secret versions pushed."""
    if joined(vault):
        raise UsageError(f"this vault already replicates {joined(vault)}; 'ov sync' "
                         "brings it up to date")
    meta = vault.store.get_meta()
    with _connect(dsn) as pg, pg.transaction():
        pg.migrate()
        theirs = pg.get_meta()
        if theirs:
            raise UsageError("the store already holds a vault" + (
                " (this one: join it with 'ov store join')"
                if theirs.get("vault_id") == meta["vault_id"] else ", another one"))
        pg.put_meta({**meta, "kdf": meta["kdf"].encode()})
        with vault.store.snapshot():
            pushed, counters = _push_everything(vault, keyring, pg)
    vault.store.put_meta({STORE: dsn, SYNCED: time.time(), **counters})
    return pushed


def _push_everything(vault, keyring, pg):
    pushed, counters = 0, {}
    for app in vault.store.list_apps():
        pg.put_app(app)
        app_key = keyring.app_key(app.name)
        for env, created in vault.store.list_envs(app.name):
            pg.put_env(app.name, env, created)
        for record in vault.store.app_secret_versions(app.name):
            pg.put_secret(record)
            pushed += 1
        for env, _ in vault.store.list_envs(app.name):
            heads = vault.heads.get(app_key, app.name, env)
            pg.put_manifest(app.name, env, 1, vault.keys.seal_manifest(
                app_key, app.name, env, 1, heads))
            counters[COUNTER.format(app.name, env)] = 1
            counters[ROWS.format(app.name, env)] = _rows(heads)
    return pushed, counters


def _rows(entries):
    """How many versions a manifest's *entries* imply the store holds (each secret's
    versions 1 to its newest)."""
    return sum(version for version, _ in entries.values())


def join(path, dsn, unlock):
    """Create a vault at *path* that replicates the store, and pull it (with the
    keyring *unlock*(vault) returns); a join that fails leaves no vault behind.
    What pull() returns."""
    with _connect(dsn) as pg, pg.transaction():
        pg.schema_version()
        meta = pg.get_meta()
    if not meta:
        raise NotFoundError("the store holds no vault yet: 'ov store init' one first")
    from ..core.vault import Vault

    SqliteStore.create(path, {**meta, "kdf": meta["kdf"].decode(), STORE: dsn})
    try:
        vault = Vault.open(path)
        return pull(vault, unlock(vault))
    except BaseException:
        for leftover in (path, f"{path}-wal", f"{path}-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


# -- pulling --------------------------------------------------------------------


def pull(vault, keyring):
    """Apply what changed in the store; [(app, env, names changed)]."""
    dsn = joined(vault)
    if not dsn:
        raise UsageError("this vault is not part of a fleet: 'ov store init' or "
                         "'ov store join' first")
    changed = []
    vault.store.before_commit = None          # what a pull applies is the store's
    with _connect(dsn) as pg, pg.transaction():
        pg.db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if pg.get_meta().get("vault_id") != vault.store.get_meta()["vault_id"]:
            raise IntegrityError("the store holds another vault than this one")
        with vault.store.transaction():
            seen = vault.store.get_meta()
            for app in pg.apps_since(0):
                _apply_app(vault, keyring, pg, app[0])
            for app, env in pg.envs():
                if vault.store.get_app(app) and not vault.store.env_exists(app, env):
                    vault.store.create_env(app, env)
            rows, position = pg.row_counts(), seen.get(POSITION, 0)
            for app, env, counter, blob, seq in pg.manifests_since(0):
                position = max(position, seq)
                key = COUNTER.format(app, env)
                if counter < seen.get(key, 0):
                    raise IntegrityError(
                        f"the store's manifest of {app}/{env} is number {counter}, older "
                        f"than number {seen[key]} this host applied: rolled back")
                if counter > seen.get(key, 0):
                    names, implied = _apply_env(vault, keyring, pg, app, env, counter,
                                                blob)
                    changed.append((app, env, names))
                    vault.store.put_meta({key: counter, ROWS.format(app, env): implied})
                elif rows.get((app, env), 0) != seen.get(ROWS.format(app, env)):
                    raise IntegrityError(
                        f"the store's rows of {app}/{env} changed without its manifest "
                        "(an older manifest put back, or rows added or deleted by hand)")
            vault.store.put_meta({SYNCED: time.time(), POSITION: position})
    if any(names for _, _, names in changed):
        _record(dsn, seen.get(POSITION, 0), position, changed)
    return changed


def _record(dsn, start, end, changed):
    """The 'synced' journal record (names, never values), where journald runs."""
    from ..core.audit import JOURNAL_SOCKET, Audit, journal_sender

    if os.path.exists(JOURNAL_SOCKET):
        names = [f"{app}/{env}:{name}" for app, env, names in changed for name in names]
        Audit(journal_sender()).event(
            "synced", f"pulled {len(names)} changed secret(s) from the shared store",
            store=dsn, from_seq=start, to_seq=end, changed=names)


def follow(vault, keyring, report, failed):
    """Pull now, then whenever the store announces a change (LISTEN, set up before
    each pull so that none slips between), and every FALLBACK seconds anyway.  An
    outage is *failed*(StoreError) and retried with a growing pause; anything else
    (tampering, exit 5) ends it."""
    pause = 1.0
    while True:
        try:
            with _connect(joined(vault)) as listener:
                listener.wait(0)
                while True:
                    report(pull(vault, keyring))
                    pause = 1.0
                    listener.wait(FALLBACK)
        except StoreError as exc:
            failed(exc)
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)


def _apply_app(vault, keyring, pg, record):
    """An app as the store has it: new here, the same, or its key rotated."""
    local = vault.store.get_app(record.name)
    if local is None:
        if keyring.kek is not None:          # else: kept, opened by whoever can
            vault.keys.unwrap_app_key(keyring.kek, record)
        vault.store.put_app(record)
    elif local.generation < record.generation:
        _apply_rotation(vault, keyring, pg, local, record)
    elif (local.generation, local.wrapped_key) != (record.generation, record.wrapped_key):
        raise IntegrityError(f"app {record.name!r} in the store is of key generation "
                             f"{record.generation}, older than this host's "
                             f"{local.generation}, or altered: rolled back or tampered with")


def _apply_rotation(vault, keyring, pg, local, record):
    """Follow a key rotation made on another host: the new key (it must unwrap under
    the KEK), each version's new wrapped DEK (each must open its ciphertext), each
    head sealed anew."""
    app = record.name
    if keyring.kek is None:
        raise AuthError(f"the key of app {app!r} was rotated on another host: this "
                        "host's machine key is scoped to the old one; derive a new key")
    old_key = keyring.app_key(app)
    new_key = vault.keys.unwrap_app_key(keyring.kek, record)
    heads = {env: vault.heads.get(old_key, app, env)
             for env, _ in vault.store.list_envs(app)}
    theirs = pg.wrapped_deks(app)
    for secret in vault.store.app_secret_versions(app):
        wrapped, ciphertext = theirs.get((secret.env, secret.name, secret.version),
                                         (None, None))
        if ciphertext != secret.ciphertext:
            raise IntegrityError(f"the store withholds or altered version "
                                 f"{secret.version} of secret {secret.name} of "
                                 f"{app}/{secret.env}")
        secret.wrapped_dek = wrapped
        vault.keys.open_secret(new_key, secret)
        vault.store.rewrap_secret(secret, wrapped)
    vault.store.put_app(record)
    for env, entries in heads.items():
        for name, entry in entries.items():
            vault.heads.put(new_key, app, env, name, entry)


def _apply_env(vault, keyring, pg, app, env, counter, blob):
    """Bring app/env to the manifest *blob* (number *counter*); the names changed."""
    app_key = keyring.app_key(app)
    sealed_counter, entries = vault.keys.open_manifest(app_key, app, env, blob)
    if sealed_counter != counter:
        raise IntegrityError(f"the store's manifest of {app}/{env} says number "
                             f"{sealed_counter} in a row numbered {counter}: tampered with")
    if pg.newest(app, env) != entries:
        raise IntegrityError(f"the store's rows of {app}/{env} disagree with its "
                             "manifest: a row was withheld, deleted, altered or added "
                             "by hand")
    if not vault.store.env_exists(app, env):
        vault.store.create_env(app, env)
    heads = vault.heads.get(app_key, app, env)
    gone = sorted(set(heads) - set(entries))              # deleted on another host
    for name in gone:
        vault.store.delete_secret(app, env, name)
        vault.store.delete_head(app, env, name)
    new = [name for name, entry in sorted(entries.items()) if heads.get(name) != entry]
    for name in new:
        _fetch(vault, pg, app_key, app, env, name, heads.get(name), entries[name])
    return sorted(gone + new), _rows(entries)


def _fetch(vault, pg, app_key, app, env, name, mine, entry):
    """Copy the records of *name* up to the manifest's *entry* from the store, each
    version present, the newest the very one the manifest names."""
    version, _ = entry
    after = mine[0] if mine and mine[0] < version else 0
    if not after:
        vault.store.delete_secret(app, env, name)        # replaced from version 1 on
    rows = pg.secrets(app, env, name, after, version)
    withheld = IntegrityError(f"the store withholds or altered a row of secret {name} "
                              f"of {app}/{env} (its manifest names version {version})")
    if [row.version for row in rows] != list(range(after + 1, version + 1)):
        raise withheld
    if vault.keys.head_entry(rows[-1]) != entry:
        raise withheld
    for row in rows:
        vault.keys.open_secret(app_key, row)              # each bound where it belongs
        vault.store.put_secret(row)
    vault.heads.put(app_key, app, env, name, entry)


# -- writing through -------------------------------------------------------------


def write_through(vault, keyring):
    """From now on, every write of this (joined) vault goes to the store first."""
    dsn = joined(vault)
    if dsn:
        vault.store.before_commit = lambda store: _push(vault, keyring, dsn,
                                                        store.touched)


UNSUPPORTED = UsageError("deleting an app or environment, or changing the master "
                         "password, is not supported yet on a vault that is part of a "
                         "fleet")


def _push(vault, keyring, dsn, touched):
    """The before_commit hook of a joined vault: push what the local transaction
    *touched* (store.py) to the store, or raise (and the local write is undone)."""
    if {kind for kind, *_ in touched} & {"app deleted", "env deleted", "meta"}:
        raise UNSUPPORTED
    secrets = {}
    for kind, *where in sorted(touched):
        if kind == "secret":
            secrets.setdefault(tuple(where[:2]), []).append(where[2])
    with _connect(dsn) as pg, pg.transaction():
        rotated = set()
        for kind, *where in sorted(touched):
            if kind == "app" and _push_app(vault, pg, vault.store.get_app(where[0])):
                rotated.add(where[0])
            elif kind == "env":
                pg.put_env(where[0], where[1], time.time())
        for app in sorted(rotated):
            _push_rotation(vault, keyring, pg, app)
        for (app, env), names in sorted(secrets.items()):
            if app not in rotated:          # a rotation re-seals heads: no new version
                _push_env(vault, keyring, pg, app, env, names)


def _push_app(vault, pg, record):
    """A new app, or a rotated one's record (True: then its rows and manifests
    follow)."""
    generation = pg.app_generation(record.name, lock="UPDATE")
    if generation is None:
        pg.put_app(record)
        return False
    if generation != record.generation - 1:
        raise ConflictError(f"conflict on app {record.name}: this host rotated its key "
                            f"from generation {record.generation - 1}, the store has "
                            f"generation {generation}; run 'ov sync' and rotate again")
    pg.put_app(record)
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
    app_key = keyring.app_key(app)
    for env, _ in vault.store.list_envs(app):
        counter, _ = pg.manifest(app, env, lock=True)
        if counter != vault.store.get_meta().get(COUNTER.format(app, env), 0):
            raise stale
        entries = vault.heads.get(app_key, app, env)
        pg.put_manifest(app, env, counter + 1, vault.keys.seal_manifest(
            app_key, app, env, counter + 1, entries))
        vault.store.put_meta({COUNTER.format(app, env): counter + 1})


def _push_env(vault, keyring, pg, app, env, names):
    """Push this host's change of *names* of app/env: their new records, and the
    manifest that lists them, on top of the store's."""
    app_key = keyring.app_key(app)
    generation = pg.app_generation(app, lock="SHARE")   # no rotation meanwhile
    if generation != vault.store.get_app(app).generation:
        raise ConflictError(f"conflict on app {app}: its key was rotated on another host "
                            f"(generation {generation}); run 'ov sync' and write again")
    counter, blob = pg.manifest(app, env, lock=True)
    entries = vault.keys.open_manifest(app_key, app, env, blob)[1] if blob else {}
    seen = vault.store.get_meta().get(COUNTER.format(app, env), 0)
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
    pg.put_manifest(app, env, counter + 1, vault.keys.seal_manifest(
        app_key, app, env, counter + 1, entries))
    if counter == seen:        # else a pull still has others' changes to bring
        vault.store.put_meta({COUNTER.format(app, env): counter + 1,
                              ROWS.format(app, env): _rows(entries)})


def _conflict(app, env, name, mine, theirs):
    ours = f"version {mine[0]}" if mine else "its deletion"
    store = f"version {theirs[0]}" if theirs else "no version"
    return ConflictError(f"conflict on secret {name} of {app}/{env}: this host wrote "
                         f"{ours}, the store has {store} from another host; run 'ov "
                         "sync', look, and write again")
