"""The key hierarchy of one vault below the password: what wraps what, and what each
ciphertext is bound to (its associated data: vault id, kind, app, generation, env,
name, version), so that a blob moved to another place in the vault, or to another
vault, fails to open instead of decrypting as something else.

    PWK --wraps--> KEK --wraps--> app key --wraps--> DEK --encrypts--> value
                                          --seals--> head of each secret
                                          --seals--> manifest of each environment

Check blobs (an empty plaintext under a key) tell which key a machine key is.  A head
holds the current version of one secret, with a digest of that version's
ciphertext, sealed under the app key and bound to the secret's app, environment and
name: a deleted, older, injected or swapped record then disagrees with it (vault.py
checks that every read agrees).  A manifest holds the head entries of all the
secrets of one environment with a counter: a fleet's shared store keeps one per
environment (client/fleet.py), so that a row withheld, altered or rolled back by
whoever runs the database is caught on the next pull.

The key check of an app also says that its vault keeps heads (format 2): its
associated data differs from format 1's, so a vault whose format is written back to
1 (to get rid of the heads) still shows that it was upgraded (upgrade_app refuses).
"""

import hashlib

from . import canonical, crypto
from .errors import AuthError, IntegrityError
from .store import AppRecord
from .validate import is_name

APP_CHECK = "app-check+heads"       # format 2
APP_CHECK_FORMAT_1 = "app-check"
DIGEST_LEN = 32


class KeyHierarchy:
    def __init__(self, vault_id):
        self.vault_id = vault_id

    def _aad(self, kind, *fields):
        return crypto.aad(kind, self.vault_id, *fields)

    @staticmethod
    def _opens(key, blob, associated):
        try:
            crypto.decrypt(key, blob, associated, "key check")
            return True
        except IntegrityError:
            return False

    # -- the KEK -------------------------------------------------------------

    def wrap_kek(self, pwk, kek):
        return crypto.encrypt(pwk, kek, self._aad("kek"))

    def unwrap_kek(self, pwk, wrapped):
        try:
            return crypto.decrypt(pwk, wrapped, self._aad("kek"), "master key")
        except IntegrityError:
            raise AuthError("wrong master password") from None

    def kek_check(self, kek):
        return crypto.encrypt(kek, b"", self._aad("kek-check"))

    def is_kek(self, key, check):
        return self._opens(key, check, self._aad("kek-check"))

    # -- app keys ------------------------------------------------------------

    def new_app(self, kek, name, generation, created):
        """A fresh app key, and its record (wrapped under the KEK, with its check)."""
        key = crypto.random_key()
        record = AppRecord(name, b"", b"", generation, created)
        record.wrapped_key = crypto.encrypt(kek, key, self._aad("app-key", name,
                                                                 generation))
        record.key_check = crypto.encrypt(key, b"", self._aad(APP_CHECK, name,
                                                               generation))
        return record, key

    def is_app_key(self, key, record, kind=APP_CHECK):
        return self._opens(key, record.key_check,
                           self._aad(kind, record.name, record.generation))

    def unwrap_app_key(self, kek, record):
        key = crypto.decrypt(kek, record.wrapped_key,
                             self._aad("app-key", record.name, record.generation),
                             f"key of app {record.name!r}")
        if not self.is_app_key(key, record):
            raise IntegrityError(f"key check of app {record.name!r} failed: the vault "
                                 "was tampered with")
        return key

    def upgrade_app(self, kek, record):
        """The key of a format-1 app, and its record with a format-2 key check.  An
        app whose check is format 2 already was upgraded: its vault's format was
        written back to 1, which only someone who edited the file does."""
        key = crypto.decrypt(kek, record.wrapped_key,
                             self._aad("app-key", record.name, record.generation),
                             f"key of app {record.name!r}")
        if self.is_app_key(key, record):
            raise IntegrityError(
                f"app {record.name!r} already has heads, yet the vault says format 1: "
                "its format was written back and its heads removed; the vault file was "
                "tampered with")
        if not self.is_app_key(key, record, APP_CHECK_FORMAT_1):
            raise IntegrityError(f"key check of app {record.name!r} failed: the vault "
                                 "was tampered with")
        check = crypto.encrypt(key, b"", self._aad(APP_CHECK, record.name,
                                                    record.generation))
        return key, AppRecord(record.name, record.wrapped_key, check, record.generation,
                              record.created)

    # -- secrets -------------------------------------------------------------

    def _secret_aad(self, kind, s):
        return self._aad(kind, s.app, s.env, s.name, s.version)

    def seal_secret(self, app_key, record, value):
        """Fill in *record*'s wrapped DEK and ciphertext for *value*, under a fresh
        DEK."""
        dek = crypto.random_key()
        record.wrapped_dek = crypto.encrypt(app_key, dek, self._secret_aad("dek", record))
        record.ciphertext = crypto.encrypt(dek, value, self._secret_aad("value", record))

    def open_secret(self, app_key, record):
        what = f"secret {record.name} v{record.version}"
        dek = crypto.decrypt(app_key, record.wrapped_dek, self._secret_aad("dek", record),
                             what)
        return crypto.decrypt(dek, record.ciphertext, self._secret_aad("value", record),
                              what)

    def rewrap_dek(self, old_key, new_key, record):
        """The record's DEK wrapped under *new_key* instead (an app key rotation)."""
        associated = self._secret_aad("dek", record)
        dek = crypto.decrypt(old_key, record.wrapped_dek, associated,
                             f"key of secret {record.name}")
        return crypto.encrypt(new_key, dek, associated)

    # -- heads ---------------------------------------------------------------

    @staticmethod
    def head_entry(record):
        """What a head holds of a secret: (version, sha256 of its ciphertext).  The
        digest pins the very record: versions start again at 1 after a delete."""
        return record.version, hashlib.sha256(record.ciphertext).digest()

    def seal_head(self, app_key, app, env, name, entry):
        """Seal the head entry (head_entry()) of secret *name* of app/env under the
        app key, bound to where it belongs."""
        version, digest = entry
        return crypto.encrypt(app_key, canonical.encode(version, digest),
                              self._aad("head", app, env, name))

    def open_head(self, app_key, app, env, name, blob):
        """The head entry (version, digest) sealed in *blob* for that secret."""
        plain = crypto.decrypt(app_key, blob, self._aad("head", app, env, name),
                               f"head of secret {name} of {app}/{env}")
        try:
            version, digest = canonical.decode(plain)
            if (int(version) < 1 or str(int(version)).encode() != version
                    or len(digest) != DIGEST_LEN):
                raise ValueError("malformed head")
        except ValueError:   # also a wrong number of fields, or not digits
            raise IntegrityError(f"head of secret {name} of {app}/{env} is malformed") \
                from None
        return int(version), digest

    # -- manifests -----------------------------------------------------------

    def seal_manifest(self, app_key, app, env, counter, entries):
        """Seal the manifest of app/env: its *counter* and the head entry of each of
        its secrets (name -> (version, digest)), bound to where it belongs."""
        fields = [counter]
        for name in sorted(entries):
            version, digest = entries[name]
            fields += [name, version, digest]
        return crypto.encrypt(app_key, canonical.encode(*fields),
                              self._aad("manifest", app, env))

    def open_manifest(self, app_key, app, env, blob):
        """(counter, name -> (version, digest)) of the manifest sealed in *blob*."""
        what = f"manifest of {app}/{env}"
        plain = crypto.decrypt(app_key, blob, self._aad("manifest", app, env), what)
        try:
            counter, *rest = canonical.decode(plain)
            if len(rest) % 3:
                raise ValueError("not a whole number of entries")
            entries = {}
            for at in range(0, len(rest), 3):
                name, version, digest = rest[at:at + 3]
                if not is_name(name.decode("ascii")) or len(digest) != DIGEST_LEN:
                    raise ValueError("malformed entry")
                entries[name.decode("ascii")] = (_count(version), digest)
            return _count(counter), entries
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{what} is malformed") from None


def _count(field):
    """A positive decimal number as canonical.encode() writes one; else ValueError."""
    if not field.isdigit() or str(int(field)).encode() != field or int(field) < 1:
        raise ValueError("not a count")
    return int(field)
