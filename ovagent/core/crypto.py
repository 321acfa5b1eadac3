"""Key derivation and authenticated encryption for the vault.

Master password -> Argon2id -> KEK; every key below it is random and wrapped with
AES-256-GCM.  Every ciphertext carries associated data naming what it is (vault id,
app, env, name, version), so a swapped, truncated or flipped blob fails to decrypt
instead of yielding someone else's plaintext.
"""

import os
from dataclasses import dataclass

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import canonical
from .errors import IntegrityError

KEY_LEN = 32
NONCE_LEN = 12
SALT_LEN = 16
AAD_DOMAIN = "ov/v1"


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters (memory in KiB), stored in the vault."""

    time_cost: int
    memory_kib: int
    parallelism: int

    def validate(self):
        """Refuse parameters below the floor (an edited vault cannot weaken the KDF)
        or absurdly high (an edited vault cannot make unlock exhaust the machine)."""
        for field, low, high in (("time_cost", FLOOR.time_cost, 64),
                                 ("memory_kib", FLOOR.memory_kib, 4 * 1024 * 1024),
                                 ("parallelism", FLOOR.parallelism, 64)):
            value = getattr(self, field)
            if type(value) is not int or not low <= value <= high:
                raise IntegrityError(
                    f"vault KDF parameter {field} is outside [{low}, {high}]: "
                    "the vault file was tampered with")
        return self


# RFC 9106 second recommended option: t=3, m=64 MiB, p=4.  Also the hard floor.
FLOOR = KdfParams(time_cost=3, memory_kib=64 * 1024, parallelism=4)
DEFAULT_KDF = FLOOR


def derive_kek(password, salt, params):
    """Stretch the master password into the 32-byte key-encryption key."""
    params.validate()
    return hash_secret_raw(password, salt, time_cost=params.time_cost,
                           memory_cost=params.memory_kib,
                           parallelism=params.parallelism, hash_len=KEY_LEN,
                           type=Type.ID)


def random_key():
    return os.urandom(KEY_LEN)


def aad(kind, *fields):
    """Associated data for a ciphertext of the given kind bound to fields."""
    return canonical.encode(AAD_DOMAIN, kind, *fields)


def encrypt(key, plaintext, associated):
    nonce = os.urandom(NONCE_LEN)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key, blob, associated, what):
    """Decrypt or raise IntegrityError naming *what* failed (never the data)."""
    if not isinstance(blob, bytes) or len(blob) < NONCE_LEN + 16:
        raise IntegrityError(f"{what}: ciphertext is truncated")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], associated)
    except InvalidTag:
        raise IntegrityError(
            f"{what}: decryption failed (wrong key, or the vault was tampered with)"
        ) from None
