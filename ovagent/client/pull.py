"""A pull (``ov sync``): bring this host's replica to the shared store's state,
checking everything the database says against what it cannot forge.

The pull holds the vault's write lock first, then reads the store in one
REPEATABLE READ transaction (a writer takes the same two in the same order).  For
each environment whose manifest number rose, the manifest must open under the
app's key and say the number its row says, the store must hold exactly as many
versions as it implies, and every row copied must be the one it names (the
newest one's digest; each one's AEAD).  A number below what this host applied or
wrote is a rollback; a count that moved without its manifest is a row withheld,
deleted or added by hand.  Any of these is an IntegrityError and nothing of the
pull is applied.
"""

import os
import time

from ..core.errors import IntegrityError, UsageError
from . import replica


def pull(vault, keyring):
    """Apply what changed in the store; [(app, env, names changed)]."""
    dsn = replica.joined(vault)
    if not dsn:
        raise UsageError("this vault is not part of a fleet: 'ov store init' or "
                         "'ov store join' first")
    if keyring.kek is None:
        raise UsageError("keeping a replica needs the vault's KEK: sync with an "
                         "unscoped machine key or the master password (a key scoped to "
                         "one app can be served from the replica, not keep it)")
    vault.store.before_commit = None          # what a pull applies is the store's
    with vault.store.transaction():
        seen = vault.store.get_meta()
        with replica.connect(dsn) as pg, pg.transaction():
            pg.db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            pg.schema_version()
            if pg.get_meta().get("vault_id") != seen["vault_id"]:
                raise IntegrityError("the store holds another vault than this one")
            changed, position = _apply_store(vault, keyring, pg, seen)
        vault.store.put_meta({replica.SYNCED: time.time(), replica.POSITION: position})
    if any(names for _, _, names in changed):
        _record(dsn, seen.get(replica.POSITION, 0), position, changed)
    return changed


def _apply_store(vault, keyring, pg, seen):
    for record in pg.apps():
        _apply_app(vault, keyring, pg, record)
    for app, env in pg.envs():
        if vault.store.get_app(app) and not vault.store.env_exists(app, env):
            vault.store.create_env(app, env)
    rows, position, changed = pg.row_counts(), seen.get(replica.POSITION, 0), []
    for app, env, counter, seq in pg.manifest_counters():
        position = max(position, seq)
        stored = rows.get((app, env), 0)
        if counter < replica.floor(seen, app, env):
            raise IntegrityError(
                f"the store's manifest of {app}/{env} is number {counter}, older than "
                f"number {replica.floor(seen, app, env)} this host applied or wrote: "
                "rolled back")
        if counter > seen.get(replica.COUNTER.format(app, env), 0):
            changed.append((app, env, _apply_env(
                vault, keyring, pg, app, env, stored,
                seen.get(replica.APPLIED.format(app, env)))))
        elif stored != seen.get(replica.ROWS.format(app, env), 0):
            raise IntegrityError(
                f"the store's rows of {app}/{env} changed without its manifest (an "
                "older manifest put back, or rows added or deleted by hand)")
    return changed, position


def _record(dsn, start, end, changed):
    """The 'synced' journal record (names, never values), where journald runs."""
    from ..core.audit import JOURNAL_SOCKET, Audit, journal_sender

    if os.path.exists(JOURNAL_SOCKET):
        names = [f"{app}/{env}:{name}" for app, env, names in changed for name in names]
        Audit(journal_sender()).event(
            "synced", f"pulled {len(names)} changed secret(s) from the shared store",
            store=dsn, from_seq=start, to_seq=end, changed=names)


# -- apps and key rotations ----------------------------------------------------------


def _apply_app(vault, keyring, pg, record):
    """An app as the store has it: new here (its key must unwrap under the KEK), the
    same, or its key rotated."""
    local = vault.store.get_app(record.name)
    if local is None:
        vault.keys.unwrap_app_key(keyring.kek, record)
        vault.store.put_app(record)
    elif local.generation < record.generation:
        _apply_rotation(vault, keyring, pg, record)
    elif (local.generation, local.wrapped_key) != (record.generation, record.wrapped_key):
        raise IntegrityError(f"app {record.name!r} in the store is of key generation "
                             f"{record.generation}, older than this host's "
                             f"{local.generation}, or altered: rolled back or tampered with")


def _apply_rotation(vault, keyring, pg, record):
    """Follow a key rotation made on another host: the new key (it must unwrap
    under the KEK), each version's new wrapped DEK (each must open its ciphertext),
    each head sealed anew.  A secret whose head the new manifest does not repeat
    (deleted, re-created or changed since) is dropped here, to be copied whole."""
    app = record.name
    old_key, new_key = keyring.app_key(app), vault.keys.unwrap_app_key(keyring.kek, record)
    theirs = pg.wrapped_deks(app)
    versions = {}
    for secret in vault.store.app_secret_versions(app):
        versions.setdefault((secret.env, secret.name), []).append(secret)
    for env, _ in vault.store.list_envs(app):
        counter, blob = pg.manifest(app, env)
        entries = vault.keys.open_manifest(new_key, app, env, blob)[1] if counter else {}
        for name, head in vault.heads.get(old_key, app, env).items():
            if entries.get(name) != head:
                vault.store.delete_secret(app, env, name)
                vault.store.delete_head(app, env, name)
                continue
            for secret in versions.get((env, name), []):
                _rewrap(vault, new_key, secret, theirs)
            vault.heads.put(new_key, app, env, name, head)
    vault.store.put_app(record)


def _rewrap(vault, new_key, secret, theirs):
    wrapped, ciphertext = theirs.get((secret.env, secret.name, secret.version),
                                     (None, None))
    if ciphertext != secret.ciphertext:
        raise IntegrityError(f"the store withholds or altered version {secret.version} "
                             f"of secret {secret.name} of {secret.app}/{secret.env}")
    secret.wrapped_dek = wrapped
    vault.keys.open_secret(new_key, secret)
    vault.store.rewrap_secret(secret, wrapped)


# -- environments ----------------------------------------------------------------


def _apply_env(vault, keyring, pg, app, env, stored, before):
    """Bring app/env to the store's manifest (whose rows number *stored*); *before*:
    the sealed manifest this host applied last, if it keeps one.  The names changed.
    Rows this host holds were checked when it copied them: what must still agree is
    the store's count."""
    if vault.store.get_app(app) is None:
        raise IntegrityError(f"the store has a manifest of app {app!r}, but no such app")
    app_key = keyring.app_key(app)
    counter, blob = pg.manifest(app, env)
    sealed_counter, entries = vault.keys.open_manifest(app_key, app, env, blob)
    if sealed_counter != counter:
        raise IntegrityError(f"the store's manifest of {app}/{env} says number "
                             f"{sealed_counter} in a row numbered {counter}: tampered with")
    applied = replica.applied(app, env, counter, entries, blob)
    if stored != applied[replica.ROWS.format(app, env)]:
        raise IntegrityError(f"the store's rows of {app}/{env} disagree with its "
                             "manifest: a row was withheld, deleted or added by hand")
    if not vault.store.env_exists(app, env):
        vault.store.create_env(app, env)
    heads = _heads_before(vault, app_key, app, env, before, entries)
    gone = sorted(set(heads) - set(entries))              # deleted on another host
    for name in gone:
        vault.store.delete_secret(app, env, name)
        vault.store.delete_head(app, env, name)
    new = [name for name, entry in sorted(entries.items()) if heads.get(name) != entry]
    for name in new:
        _fetch(vault, pg, app_key, app, env, name, heads.get(name), entries[name])
    vault.store.put_meta(applied)
    return sorted(gone + new)


def _heads_before(vault, app_key, app, env, before, entries):
    """This host's heads of app/env: those that may differ from *entries* read from
    the vault, the others from the manifest it applied last (one decryption); with
    none kept, or one sealed under a key rotated since, every head."""
    try:
        mine = vault.keys.open_manifest(app_key, app, env, before)[1] if before else None
    except IntegrityError:
        mine = None
    if mine is None:
        return vault.heads.get(app_key, app, env)
    differing = sorted(name for name in set(mine) | set(entries)
                       if mine.get(name) != entries.get(name))
    heads = {name: entry for name, entry in mine.items() if name not in differing}
    heads.update(vault.heads.get(app_key, app, env, differing))
    return heads


def _fetch(vault, pg, app_key, app, env, name, mine, entry):
    """Copy the records of *name* up to the manifest's *entry* from the store, each
    version present, each opening, the newest the very one the manifest names; from
    version 1 when the store's record of this host's version is another one (the
    secret was deleted and set again elsewhere)."""
    version, _ = entry
    after = mine[0] if mine and mine[0] < version else 0
    if after:
        same = pg.secrets(app, env, name, after - 1, after)
        if not same or vault.keys.head_entry(same[0]) != mine:
            after = 0
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
