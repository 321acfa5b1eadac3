"""A fleet: many hosts, one vault, through a shared store (pgstore.py) that never
sees a key or a value (ov-store(1)): the commands ``ov store init``, ``join`` and
``status``, and ``ov sync [--follow]``.

Every host keeps its SQLite vault as a full replica, and everything that reads
secrets (``ov run``, the agent) reads only the replica: the database being down
stops no service.  Writes go to the store first (push.py); ``ov sync`` pulls what
changed, checked against the manifests the database cannot forge (pull.py); what
a host knows of the store is in its vault's metadata (replica.py).
"""

import os
import time

from ..core.errors import NotFoundError, StoreError, UsageError
from ..core.store import SqliteStore
from . import replica
from .pull import pull
from .push import write_through

__all__ = ["follow", "init", "join", "pull", "status", "write_through"]
FALLBACK = 300.0                     # seconds: follow() pulls at least this often
MIN_PERIOD = 0.2                     # seconds: follow() pulls at most this often
MAX_PAUSE = 60.0                     # seconds between tries while the store is down


def status(vault):
    """What `ov store status` says: {store, last pull, change number pulled, the
    store's (None: unreachable, with why), environments behind}."""
    meta = vault.store.get_meta()
    found = {"store": meta.get(replica.STORE), "synced": meta.get(replica.SYNCED),
             "position": meta.get(replica.POSITION, 0), "latest": None, "behind": [],
             "conflict": meta.get(replica.CONFLICT)}
    try:
        with replica.connect(found["store"]) as pg, pg.transaction():
            manifests = pg.manifest_counters()
    except StoreError as exc:
        found["unreachable"] = str(exc)
        return found
    found["latest"] = max([seq for *_, seq in manifests], default=0)
    found["behind"] = [f"{app}/{env}" for app, env, counter, _ in manifests
                       if counter > meta.get(replica.COUNTER.format(app, env), 0)]
    return found


# -- creating a fleet, joining one ---------------------------------------------


def init(vault, keyring, dsn):
    """Create the store's schema (or bring it up to date) and push this vault into
    it: the vault's metadata, every app, environment and secret version, and a
    manifest per environment.  The number of secret versions pushed."""
    if replica.joined(vault):
        raise UsageError(f"this vault already replicates {replica.joined(vault)}; "
                         "'ov sync' brings it up to date")
    meta = vault.store.get_meta()
    with replica.connect(dsn) as pg, pg.transaction():
        pg.migrate()
        theirs = pg.get_meta()
        if theirs:
            raise UsageError("the store already holds a vault" + (
                " (this one: join it with 'ov store join')"
                if theirs.get("vault_id") == meta["vault_id"] else ", another one"))
        pg.put_meta({**meta, "kdf": meta["kdf"].encode()})
        with vault.store.snapshot():
            pushed, counters = _push_everything(vault, keyring, pg)
    vault.store.put_meta({replica.STORE: dsn, replica.SYNCED: time.time(), **counters})
    return pushed


def _push_everything(vault, keyring, pg):
    pushed, counters = 0, {}
    for app in vault.store.list_apps():
        pg.create_app(app)
        app_key = keyring.app_key(app.name)
        for env, created in vault.store.list_envs(app.name):
            pg.put_env(app.name, env, created)
        for record in vault.store.app_secret_versions(app.name):
            pg.put_secret(record)
            pushed += 1
        for env, _ in vault.store.list_envs(app.name):
            heads = vault.heads.get(app_key, app.name, env)
            sealed = vault.keys.seal_manifest(app_key, app.name, env, 1, heads)
            pg.put_manifest(app.name, env, 1, sealed)
            counters.update(replica.applied(app.name, env, 1, heads, sealed))
    return pushed, counters


def join(path, dsn, unlock):
    """Create a vault at *path* that replicates the store, and pull it (with the
    keyring *unlock*(vault) returns); a join that fails leaves no vault behind.
    What pull() returns."""
    with replica.connect(dsn) as pg, pg.transaction():
        pg.schema_version()
        meta = pg.get_meta()
    if not meta:
        raise NotFoundError("the store holds no vault yet: 'ov store init' one first")
    from ..core.vault import Vault

    SqliteStore.create(path, {**meta, "kdf": meta["kdf"].decode(), replica.STORE: dsn})
    try:
        vault = Vault.open(path)
        return pull(vault, unlock(vault))
    except BaseException:
        for leftover in (path, f"{path}-wal", f"{path}-shm"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


def follow(vault, keyring, report, failed):
    """Pull now, then whenever the store announces a change (LISTEN, set up before
    each pull so that none slips between), and every FALLBACK seconds anyway.  An
    outage is *failed*(StoreError) and retried with a growing pause; anything else
    (tampering, exit 5) ends it."""
    pause = 1.0
    while True:
        try:
            with replica.connect(replica.joined(vault)) as listener:
                listener.wait(0)
                while True:
                    began = time.monotonic()
                    report(pull(vault, keyring))
                    pause = 1.0
                    listener.wait(FALLBACK)
                    # Anyone who may connect can NOTIFY: a flood costs 5 pulls a second.
                    time.sleep(max(0.0, began + MIN_PERIOD - time.monotonic()))
        except StoreError as exc:
            failed(exc)
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
