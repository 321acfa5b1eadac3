"""Secrets sealed to the request that asked for them (docs/protocol.rst, "Sealed
release").

The agent answers a ``release`` request with the secrets encrypted and authenticated
under two keys that only the request's signer can derive: HKDF-SHA256 of the MAC
subkey that verified the request, salted with this connection's challenge and the
request's nonce, and bound to the digest of everything the request signed.  A reply
is therefore useless on any other connection, for any other request, and to anyone
who holds the socket but not the machine key.

Encrypt-then-MAC from the standard library, because importing cryptography's AEAD
costs the client tens of milliseconds: a SHAKE-256 keystream under the encryption key,
and an HMAC-SHA256 tag over the ciphertext, checked in constant time before any byte
of it is used.  The keystream has no nonce because each key seals at most one reply:
the agent answers one request per connection, under a challenge it draws for that
connection, and never a nonce twice.  tests/test_seal.py holds the test vectors.
"""

import hashlib
import hmac

from . import canonical, protocol
from .validate import is_name

SEAL_INFO = b"ov-agent/v2 seal"
KEYSTREAM_DOMAIN = b"ov-agent/v2 keystream"
TAG_DOMAIN = b"ov-agent/v2/sealed"
SECRETS_DOMAIN = b"ov-agent/v2/secrets"
TAG_BYTES = 32


class SealError(Exception):
    """A sealed reply that does not open: forged, replayed, cut or for another key."""


def seal_keys(subkey, req):
    """(encryption key, authentication key) for the reply to *req*."""
    salt = bytes.fromhex(req["challenge"]) + bytes.fromhex(req["nonce"])
    info = SEAL_INFO + hashlib.sha256(protocol.signed_bytes(req)).digest()
    okm = protocol.hkdf_sha256(subkey, info, 64, salt=salt)
    return okm[:32], okm[32:]


def _xor_keystream(key, data):
    stream = hashlib.shake_256(KEYSTREAM_DOMAIN + key).digest(len(data))
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(
        len(data), "big")


def _tag(key, ciphertext):
    return hmac.new(key, canonical.encode(TAG_DOMAIN, ciphertext), hashlib.sha256).digest()


def seal(subkey, req, plaintext):
    """ciphertext || tag of *plaintext*, for the signer of *req* only."""
    encryption, authentication = seal_keys(subkey, req)
    ciphertext = _xor_keystream(encryption, plaintext)
    return ciphertext + _tag(authentication, ciphertext)


def open_sealed(subkey, req, sealed):
    """The plaintext of a sealed reply to *req*; SealError before any byte of it is
    used if the tag does not match."""
    if len(sealed) < TAG_BYTES:
        raise SealError("sealed reply is truncated")
    encryption, authentication = seal_keys(subkey, req)
    ciphertext, tag = sealed[:-TAG_BYTES], sealed[-TAG_BYTES:]
    if not hmac.compare_digest(_tag(authentication, ciphertext), tag):
        raise SealError("sealed reply failed authentication")
    return _xor_keystream(encryption, ciphertext)


def encode_secrets(values):
    """name -> bytes value, as the canonical encoding sealed in a reply."""
    fields = [SECRETS_DOMAIN, len(values)]
    for name in sorted(values):
        fields += [name, values[name]]
    return canonical.encode(*fields)


def decode_secrets(data):
    """The strict inverse of encode_secrets: of authenticated data, but still only
    what encode_secrets writes (valid names, no NUL in a value), or SealError."""
    try:
        fields = canonical.decode(data)
        if len(fields) < 2 or fields[0] != SECRETS_DOMAIN or not fields[1].isdigit() \
                or len(fields) != 2 + 2 * int(fields[1]):
            raise ValueError("not a secrets encoding")
        values = dict(zip((name.decode("ascii") for name in fields[2::2]), fields[3::2]))
    except (ValueError, UnicodeDecodeError):
        raise SealError("sealed reply holds no valid list of secrets") from None
    if not all(is_name(name) and b"\0" not in value for name, value in values.items()) \
            or encode_secrets(values) != data:
        raise SealError("sealed reply holds an invalid list of secrets")
    return values
