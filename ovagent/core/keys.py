"""The key hierarchy of one vault below the password: what wraps what, and what each
ciphertext is bound to (its associated data: vault id, kind, app, generation, env,
name, version), so that a blob moved to another place in the vault, or to another
vault, fails to open instead of decrypting as something else.

    PWK --wraps--> KEK --wraps--> app key --wraps--> DEK --encrypts--> value

Check blobs (an empty plaintext under a key) tell which key a machine key is.
"""

from . import crypto
from .errors import AuthError, IntegrityError
from .store import AppRecord


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
        record.key_check = crypto.encrypt(key, b"", self._aad("app-check", name,
                                                               generation))
        return record, key

    def is_app_key(self, key, record):
        return self._opens(key, record.key_check,
                           self._aad("app-check", record.name, record.generation))

    def unwrap_app_key(self, kek, record):
        key = crypto.decrypt(kek, record.wrapped_key,
                             self._aad("app-key", record.name, record.generation),
                             f"key of app {record.name!r}")
        if not self.is_app_key(key, record):
            raise IntegrityError(f"key check of app {record.name!r} failed: the vault "
                                 "was tampered with")
        return key

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
