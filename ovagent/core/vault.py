"""The vault: apps, environments and secrets, encrypted as a key hierarchy.

    password --Argon2id--> PWK --wraps--> KEK --wraps--> app key --wraps--> DEK --> value

The KEK is random and only wrapped by the password key, so changing the password
re-wraps one blob and every machine key keeps working.  An unscoped machine key *is*
the KEK; a scoped one *is* an app key, so it cannot decrypt another app's DEKs: scope is
enforced by cryptography, not by a policy check.  Rotating an app key re-wraps that
app's DEKs and revokes every scoped machine key issued for it.  What wraps what, bound
to what, is core/keys.py; this module keeps records and transactions around it.

Each secret has a head, sealed under the app key and bound to its app, environment
and name: its current version, and a digest of that version's ciphertext.  Every
write of a secret rewrites its head in the same transaction, and every read checks
that the stored records are exactly the ones their heads name (a read of one secret
opens one head, however many the environment holds).  Someone who can write the
vault file but holds no key can then delete, roll back, inject or swap records only
to make reads fail (IntegrityError) or a secret vanish whole, never to have an older
value served; what remains is rolling secrets back with their heads to a state they
copied earlier (docs/security.rst).

A vault of format 1 has no heads: until 'ov auth upgrade' (upgrade()) it is refused
for anything but listing, with a message naming that command.
"""

import json
import os
import time

from . import crypto
from .errors import (AuthError, IntegrityError, NotFoundError, OutdatedVaultError,
                     OvError, UsageError)
from .keys import KeyHierarchy
from .store import (KEY_CHECK_LEN, SCHEMA_VERSION, WRAPPED_KEY_LEN, SecretRecord,
                    SqliteStore)
from .validate import check_name, check_slug, check_value, is_dangerous_name

VAULT_ID_LEN = 16


class Keyring:
    """Unlocked key material: the KEK, or a single app's key (scoped machine key)."""

    def __init__(self, vault, kek=None, scope=None, scoped_key=None):
        self._vault = vault
        self.kek = kek
        self.scope = scope
        self._scoped_key = scoped_key

    def require_kek(self, action):
        if self.kek is None:
            raise AuthError(
                f"{action} needs the master password or an unscoped machine key "
                f"(this key is scoped to app {self.scope!r})")
        return self.kek

    def app_key(self, app):
        """The key of *app* as the vault holds it now (a scoped key may have been
        revoked by a rotation since it unlocked: a long-running agent's).  Unwrapped
        for each call and not kept: the agent keeps no app key between requests
        (docs/security.rst, "Key material in memory")."""
        if self.kek is None:
            if app != self.scope:
                raise AuthError(
                    f"machine key is scoped to app {self.scope!r}, not {app!r}")
            if not self._vault.keys.is_app_key(self._scoped_key, self._vault.get_app(app)):
                raise AuthError(f"machine key no longer unlocks app {app!r} (revoked by "
                                "'ov app rotate-key')")
            return self._scoped_key
        return self._vault.keys.unwrap_app_key(self.kek, self._vault.get_app(app))


class Vault:
    def __init__(self, store, upgrading=False):
        self.store = store
        (self.vault_id, self.salt, self.kdf, self.wrapped_kek, self.kek_check,
         self.format) = _metadata(store)
        store.check_schema(self.format)
        self.keys = KeyHierarchy(self.vault_id)
        self.heads = Heads(store, self.keys)
        self._upgrading = upgrading

    @classmethod
    def open(cls, path, upgrading=False):
        """Open a vault; *upgrading*: for upgrade(), unlocking a format-1 vault too."""
        return cls(SqliteStore(path), upgrading)

    @classmethod
    def create(cls, path, password, kdf=crypto.DEFAULT_KDF):
        """Create a new vault file; return (vault, keyring)."""
        kdf.validate()
        vault_id, salt, kek = (os.urandom(VAULT_ID_LEN), os.urandom(crypto.SALT_LEN),
                               crypto.random_key())
        keys = KeyHierarchy(vault_id)
        store = SqliteStore.create(path, {
            "vault_id": vault_id, "salt": salt, "kdf": json.dumps(kdf.__dict__),
            "wrapped_kek": keys.wrap_kek(crypto.derive_kek(password, salt, kdf), kek),
            "kek_check": keys.kek_check(kek)})
        vault = cls(store)
        return vault, Keyring(vault, kek=kek)

    @property
    def current(self):
        """Whether the vault has heads (else only listing and upgrade() work)."""
        return self.format == SCHEMA_VERSION

    def require_current(self):
        if not self.current and not self._upgrading:
            raise _outdated(self.store.path, self.format)

    # -- unlocking -----------------------------------------------------------

    def unlock(self, password):
        self.require_current()
        pwk = crypto.derive_kek(password, self.salt, self.kdf)
        return Keyring(self, kek=self.keys.unwrap_kek(pwk, self.wrapped_kek))

    def unlock_key(self, key, app=None):
        """Identify a machine key: the KEK, or the key of *app* (or of any app)."""
        self.require_current()
        if self.keys.is_kek(key, self.kek_check):
            return Keyring(self, kek=key)
        if not self.current:
            raise AuthError("upgrading the vault needs the master password or an "
                            "unscoped machine key")
        candidates = [self.get_app(app)] if app else self.store.list_apps()
        for record in candidates:
            if self.keys.is_app_key(key, record):
                return Keyring(self, scope=record.name, scoped_key=key)
        raise AuthError(
            "machine key does not unlock this vault" + (f" for app {app!r}" if app else "")
            + " (another vault's key, or revoked by 'ov app rotate-key')")

    def change_password(self, keyring, new_password):
        kek = keyring.require_kek("changing the password")
        salt = os.urandom(crypto.SALT_LEN)
        pwk = crypto.derive_kek(new_password, salt, self.kdf)
        with self.store.transaction():
            self.store.put_meta({"salt": salt, "wrapped_kek": self.keys.wrap_kek(pwk, kek)})

    def machine_key(self, keyring, app=None):
        """The raw bytes of a machine key: the KEK, or one app's key."""
        if app is None:
            return keyring.require_kek("deriving an unscoped machine key")
        return keyring.app_key(app)

    def upgrade(self, keyring):
        """Format 1 -> 2 (Heads.upgrade): what it pinned, [(app, env, name ->
        version)]; None if the vault is of format 2 already."""
        upgraded = self.heads.upgrade(keyring.require_kek("upgrading the vault"))
        self.format = SCHEMA_VERSION
        return upgraded

    # -- apps ----------------------------------------------------------------

    def get_app(self, app):
        record = self.store.get_app(check_slug("app", app))
        if record is None:
            raise NotFoundError(f"no app {app!r}; create it with 'ov app create {app}'")
        return record

    def create_app(self, keyring, app):
        kek = keyring.require_kek("creating an app")
        check_slug("app", app)
        with self.store.transaction():
            if self.store.get_app(app) is not None:
                raise UsageError(f"app {app!r} already exists")
            record, _ = self.keys.new_app(kek, app, 1, time.time())
            self.store.put_app(record)

    def rotate_app_key(self, keyring, app):
        """New app key; re-wrap every DEK and re-seal every head of the app; old
        scoped keys stop working."""
        kek = keyring.require_kek("rotating an app key")
        with self.store.transaction():
            old = self.get_app(app)
            old_key = self.keys.unwrap_app_key(kek, old)
            record, new_key = self.keys.new_app(kek, app, old.generation + 1, old.created)
            for secret in self.store.app_secret_versions(app):
                self.store.rewrap_secret(secret,
                                         self.keys.rewrap_dek(old_key, new_key, secret))
            for env, _ in self.store.list_envs(app):
                head = self.heads.get(old_key, app, env)   # and what it says is stored:
                self.heads.agree(head, self.store.latest_secrets(app, env), app, env, None)
                for name, entry in head.items():            # a rotation launders nothing
                    self.heads.put(new_key, app, env, name, entry)
            self.store.put_app(record)
        return record.generation

    def delete_app(self, app):
        self.require_current()
        with self.store.transaction():
            self.get_app(app)
            self.store.delete_app(app)

    def list_apps(self):
        return self.store.list_apps()

    # -- environments --------------------------------------------------------

    def require_env(self, app, env):
        self.get_app(app)
        if not self.store.env_exists(app, check_slug("env", env)):
            raise NotFoundError(
                f"no env {env!r} in app {app!r}; create it with "
                f"'ov env create {env} --app {app}'")

    def create_env(self, app, env):
        check_slug("env", env)
        self.require_current()
        with self.store.transaction():
            self.get_app(app)
            if self.store.env_exists(app, env):
                raise UsageError(f"env {env!r} already exists in app {app!r}")
            self.store.create_env(app, env)

    def delete_env(self, app, env):
        self.require_current()
        with self.store.transaction():
            self.require_env(app, env)
            self.store.delete_env(app, env)

    def list_envs(self, app):
        self.get_app(app)
        return self.store.list_envs(app)

    # -- secrets -------------------------------------------------------------

    def set_secrets(self, keyring, app, env, values):
        """Store a new version of each name -> value, all in one transaction."""
        for name, value in values.items():
            check_value(check_name(name), value)
        keyring.app_key(app)      # a key for this app? refused before taking the lock
        now = time.time()
        with self.store.transaction():
            self.require_env(app, env)
            app_key = keyring.app_key(app)       # as committed: not rotated meanwhile
            head = self.heads.get(app_key, app, env, sorted(values))
            versions = {}
            for name, value in values.items():
                record = SecretRecord(app, env, name,
                                      self.heads.checked_version(head, app, env, name) + 1,
                                      b"", b"", now)
                self.keys.seal_secret(app_key, record, value)
                self.store.put_secret(record)
                self.heads.put(app_key, app, env, name, self.keys.head_entry(record))
                versions[name] = record.version
        return versions

    def delete_secret(self, keyring, app, env, name):
        """Delete a secret with every version, and take it off its head."""
        check_name(name)
        keyring.app_key(app)      # a key for this app? refused before taking the lock
        with self.store.transaction():
            self.require_env(app, env)
            app_key = keyring.app_key(app)
            head = self.heads.get(app_key, app, env, [name])
            if not self.heads.checked_version(head, app, env, name):
                raise NotFoundError(f"no secret {name} in {app}/{env}")
            self.store.delete_secret(app, env, name)
            self.store.delete_head(app, env, name)

    def list_secrets(self, app, env):
        """What the store holds (no key: nothing is checked against the head)."""
        self.require_env(app, env)
        return self.store.latest_secrets(app, env)

    def reveal(self, keyring, app, env, names=None):
        """Decrypt the latest version of *names* (all when None) into a dict."""
        return {name: value for name, (_, value) in
                self.reveal_versions(keyring, app, env, names).items()}

    def reveal_versions(self, keyring, app, env, names=None, choose=None):
        """As reveal(), with each secret's version: name -> (version, value).
        choose: for a request that names none, picks which of the secrets of
        app/env to reveal (the agent's policy; it may raise)."""
        if names is not None:
            names = sorted({check_name(n) for n in names})
        with self.store.snapshot():          # the head and records of one state
            app_key = keyring.app_key(app)
            self.require_env(app, env)
            head = self.heads.get(app_key, app, env, names)
            records = self.store.latest_secrets(app, env, names)
        self.heads.agree(head, records, app, env, names)
        if names is not None and len(records) != len(names):
            missing = sorted(set(names) - {r.name for r in records})
            raise NotFoundError(f"no secret {', '.join(missing)} in {app}/{env}")
        if names is None:
            records = _chosen(records, choose, app, env)
        return self.heads.reveal(app_key, head, records, app, env)


class Heads:
    """Each secret's head (vault.py's docstring): read and checked against the store,
    or sealed and written, inside the caller's transaction or snapshot."""

    def __init__(self, store, keys):
        self.store = store
        self.keys = keys

    def get(self, app_key, app, env, names=None):
        """name -> (version, digest) of the heads of app/env (of *names* only, when
        given: one secret costs one head, however many the environment holds)."""
        return {name: self.keys.open_head(app_key, app, env, name, blob)
                for name, blob in self.store.get_heads(app, env, names).items()}

    def put(self, app_key, app, env, name, entry):
        self.store.put_head(app, env, name,
                            self.keys.seal_head(app_key, app, env, name, entry))

    def upgrade(self, kek):
        """Format 1 -> 2 in one transaction: each app's key check says that it has
        heads (core/keys.py), and each secret gets the head of its newest record
        stored now, the one moment they are trusted as they are: each must decrypt,
        but a row deleted before cannot be told.  What it pinned, [(app, env, name ->
        version)]; None if another process did it."""
        pinned = []
        with self.store.transaction():
            if self.store.get_meta().get("schema_version") == SCHEMA_VERSION:
                return None
            self.store.add_heads()
            for old in self.store.list_apps():
                app_key, record = self.keys.upgrade_app(kek, old)
                for env, _ in self.store.list_envs(old.name):
                    records = self.store.latest_secrets(old.name, env)
                    for secret in records:
                        self.keys.open_secret(app_key, secret)
                        self.put(app_key, old.name, env, secret.name,
                                 self.keys.head_entry(secret))
                    if records:
                        pinned.append((old.name, env, {r.name: r.version
                                                       for r in records}))
                self.store.put_app(record)
            self.store.put_meta({"schema_version": SCHEMA_VERSION})
        return pinned

    def checked_version(self, head, app, env, name):
        """The version *head* gives *name* (0: none), once the store's newest record
        agrees (else the vault was tampered with)."""
        version = head[name][0] if name in head else 0
        stored = self.store.next_version(app, env, name) - 1
        if stored != version:
            raise self.tampered(_disagreement(name, app, env, version, stored))
        return version

    def agree(self, head, records, app, env, names):
        """Each record is of the version *head* gives its name, and each name it
        lists (of *names*, if given) has its record."""
        for record in records:
            version = head[record.name][0] if record.name in head else 0
            if version != record.version:
                raise self.tampered(_disagreement(record.name, app, env, version,
                                                  record.version))
        listed = head if names is None else [name for name in names if name in head]
        for name in sorted(set(listed) - {record.name for record in records}):
            raise self.tampered(_disagreement(name, app, env, head[name][0], 0))

    def reveal(self, app_key, head, records, app, env):
        """name -> (version, value) of *records* (which agree() with *head*), each
        the very record *head* names: the same version of an older record (versions
        start again at 1 after a delete) decrypts, but has another digest."""
        revealed = {}
        for record in records:
            value = self.keys.open_secret(app_key, record)
            if self.keys.head_entry(record) != head[record.name]:
                raise self.tampered(
                    f"secret {record.name} of {app}/{env} is at version "
                    f"{record.version}, but its record of that version is not the one "
                    "written")
            revealed[record.name] = (record.version, value)
        return revealed

    def tampered(self, what):
        return IntegrityError(f"vault {self.store.path}: {what}: the vault file was "
                              "tampered with")


def _metadata(store):
    """(vault id, salt, KDF parameters, wrapped KEK, KEK check, format) from the
    vault's metadata, each checked: meta values are untyped, and an edited salt or id
    would crash Argon2 or the AAD, a truncated KEK check make the KEK look wrong."""
    meta = store.get_meta()
    try:
        fields = (meta["vault_id"], meta["salt"],
                  crypto.KdfParams(**json.loads(meta["kdf"])), meta["wrapped_kek"],
                  meta["kek_check"], meta["schema_version"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(
            f"vault {store.path} has missing or malformed metadata") from None
    vault_id, salt, kdf, wrapped_kek, kek_check, version = fields
    for what, value, size in (("salt", salt, crypto.SALT_LEN),
                              ("vault id", vault_id, VAULT_ID_LEN),
                              ("wrapped KEK", wrapped_kek, WRAPPED_KEY_LEN),
                              ("KEK check", kek_check, KEY_CHECK_LEN)):
        if type(value) is not bytes or len(value) != size:
            raise IntegrityError(f"vault {store.path} has a malformed {what}: the "
                                 "vault file was tampered with")
    if type(version) is not int or version < 1:
        raise IntegrityError(f"vault {store.path} has a malformed format number: the "
                             "vault file was tampered with")
    if version > SCHEMA_VERSION:
        raise OvError(f"vault {store.path} is of format {version}; this ov reads "
                      f"format {SCHEMA_VERSION} at most")
    kdf.validate()
    return fields


def _chosen(records, choose, app, env):
    """Of the *records* of app/env, those a request that names none gets: the ones
    *choose* picks (all, without it), none of them a loader or shell variable."""
    if choose is not None:
        chosen = set(choose([record.name for record in records]))
        records = [record for record in records if record.name in chosen]
    risky = [record.name for record in records if is_dangerous_name(record.name)]
    if risky:
        raise UsageError(f"{app}/{env} holds {', '.join(risky)}, which would change how "
                         "programs load code; inject it only by naming it in --secrets")
    return records


def _outdated(path, version):
    return OutdatedVaultError(
        f"vault {path} is of format {version}, which cannot tell a deleted or "
        "rolled-back secret version from the current one; upgrade it once with "
        f"'ov auth upgrade --vault {path}' (with the master password or an unscoped "
        "machine key), then restart any agent that serves it")


def _disagreement(name, app, env, version, stored):
    """What is wrong when the head gives *name* *version* and its newest stored
    record is *stored* (0: none)."""
    where = f"secret {name} of {app}/{env}"
    if not version:
        return f"{where} has no head, yet a record of version {stored} is stored"
    if not stored:
        return f"{where} is at version {version}, but no record of it is stored"
    return f"{where} is at version {version}, its newest record says {stored}"
