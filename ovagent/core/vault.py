"""The vault: apps, environments and secrets, encrypted as a key hierarchy.

    password --Argon2id--> PWK --wraps--> KEK --wraps--> app key --wraps--> DEK --> value

The KEK is random and only wrapped by the password key, so changing the password
re-wraps one blob and every machine key keeps working.  An unscoped machine key *is*
the KEK; a scoped one *is* an app key, so it cannot decrypt another app's DEKs: scope is
enforced by cryptography, not by a policy check.  Rotating an app key re-wraps that
app's DEKs and revokes every scoped machine key issued for it.  What wraps what, bound
to what, is core/keys.py; this module keeps records and transactions around it.
"""

import json
import os
import time

from . import crypto
from .errors import AuthError, IntegrityError, NotFoundError, UsageError
from .keys import KeyHierarchy
from .store import SecretRecord, SqliteStore
from .validate import check_name, check_slug, check_value, is_dangerous_name

class Keyring:
    """Unlocked key material: the KEK, or a single app's key (scoped machine key)."""

    def __init__(self, vault, kek=None, scope=None, scoped_key=None):
        self._vault = vault
        self.kek = kek
        self.scope = scope
        self._scoped_key = scoped_key
        self._app_keys = {}   # app -> (its wrapped record, unwrapped key)

    def require_kek(self, action):
        if self.kek is None:
            raise AuthError(
                f"{action} needs the master password or an unscoped machine key "
                f"(this key is scoped to app {self.scope!r})")
        return self.kek

    def app_key(self, app):
        if self.kek is None:
            if app != self.scope:
                raise AuthError(
                    f"machine key is scoped to app {self.scope!r}, not {app!r}")
            return self._scoped_key
        record = self._vault.get_app(app)
        wrapped = (record.generation, record.wrapped_key, record.key_check)
        cached = self._app_keys.get(app)
        if cached is None or cached[0] != wrapped:
            # Memoised for the agent, which unwraps per request: it holds the KEK
            # anyway, and a rotated key changes the record, so it is unwrapped anew.
            cached = self._app_keys[app] = (wrapped, self._vault.keys.unwrap_app_key(
                self.kek, record))
        return cached[1]


class Vault:
    def __init__(self, store):
        self.store = store
        meta = store.get_meta()
        try:
            self.vault_id = meta["vault_id"]
            self.salt = meta["salt"]
            self.kdf = crypto.KdfParams(**json.loads(meta["kdf"]))
            self.wrapped_kek = meta["wrapped_kek"]
            self.kek_check = meta["kek_check"]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(
                f"vault {store.path} has missing or malformed metadata") from None
        # meta values are untyped: an edited salt or id would crash Argon2 or the AAD
        if not isinstance(self.vault_id, bytes) or not isinstance(self.salt, bytes) \
                or len(self.salt) != crypto.SALT_LEN:
            raise IntegrityError(f"vault {store.path} has a malformed salt or vault id: "
                                 "the vault file was tampered with")
        self.kdf.validate()
        self.keys = KeyHierarchy(self.vault_id)

    @classmethod
    def open(cls, path):
        return cls(SqliteStore(path))

    @classmethod
    def create(cls, path, password, kdf=crypto.DEFAULT_KDF):
        """Create a new vault file; return (vault, keyring)."""
        kdf.validate()
        vault_id, salt, kek = os.urandom(16), os.urandom(crypto.SALT_LEN), crypto.random_key()
        keys = KeyHierarchy(vault_id)
        store = SqliteStore.create(path, {
            "vault_id": vault_id,
            "salt": salt,
            "kdf": json.dumps(kdf.__dict__),
            "wrapped_kek": keys.wrap_kek(crypto.derive_kek(password, salt, kdf), kek),
            "kek_check": keys.kek_check(kek),
        })
        vault = cls(store)
        return vault, Keyring(vault, kek=kek)

    # -- unlocking -----------------------------------------------------------

    def unlock(self, password):
        pwk = crypto.derive_kek(password, self.salt, self.kdf)
        return Keyring(self, kek=self.keys.unwrap_kek(pwk, self.wrapped_kek))

    def unlock_key(self, key, app=None):
        """Identify a machine key: the KEK, or the key of *app* (or of any app)."""
        if self.keys.is_kek(key, self.kek_check):
            return Keyring(self, kek=key)
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
        """New app key; re-wrap every DEK of the app; old scoped keys stop working."""
        kek = keyring.require_kek("rotating an app key")
        with self.store.transaction():
            old = self.get_app(app)
            old_key = self.keys.unwrap_app_key(kek, old)
            record, new_key = self.keys.new_app(kek, app, old.generation + 1, old.created)
            for secret in self.store.app_secret_versions(app):
                self.store.rewrap_secret(secret,
                                         self.keys.rewrap_dek(old_key, new_key, secret))
            self.store.put_app(record)
        return record.generation

    def delete_app(self, app):
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
        with self.store.transaction():
            self.get_app(app)
            if self.store.env_exists(app, env):
                raise UsageError(f"env {env!r} already exists in app {app!r}")
            self.store.create_env(app, env)

    def delete_env(self, app, env):
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
        app_key = keyring.app_key(app)
        now = time.time()
        versions = {}
        with self.store.transaction():
            self.require_env(app, env)
            for name, value in values.items():
                record = SecretRecord(app, env, name,
                                      self.store.next_version(app, env, name),
                                      b"", b"", now)
                self.keys.seal_secret(app_key, record, value)
                self.store.put_secret(record)
                versions[name] = record.version
        return versions

    def delete_secret(self, app, env, name):
        with self.store.transaction():
            self.require_env(app, env)
            if not self.store.delete_secret(app, env, check_name(name)):
                raise NotFoundError(f"no secret {name} in {app}/{env}")

    def list_secrets(self, app, env):
        self.require_env(app, env)
        return self.store.latest_secrets(app, env)

    def reveal(self, keyring, app, env, names=None):
        """Decrypt the latest version of *names* (all when None) into a dict."""
        return {name: value for name, (_, value) in
                self.reveal_versions(keyring, app, env, names).items()}

    def reveal_versions(self, keyring, app, env, names=None):
        """As reveal(), with each secret's version: name -> (version, value)."""
        if names is not None:
            names = sorted({check_name(n) for n in names})
        app_key = keyring.app_key(app)
        self.require_env(app, env)
        records = self.store.latest_secrets(app, env, names)
        if names is not None and len(records) != len(names):
            missing = sorted(set(names) - {r.name for r in records})
            raise NotFoundError(f"no secret {', '.join(missing)} in {app}/{env}")
        if names is None:
            risky = [r.name for r in records if is_dangerous_name(r.name)]
            if risky:
                raise UsageError(
                    f"{app}/{env} holds {', '.join(risky)}, which would change how "
                    "programs load code; inject it only by naming it in --secrets")
        return {record.name: (record.version, self.keys.open_secret(app_key, record))
                for record in records}
