"""Secrets sealed to the request that asked for them (ovagent/core/seal.py): the stdlib
HKDF against cryptography's, fixed test vectors (hard-coded, and recomputed here from
the primitives the specification names), round trips, every tampering a sealed reply
can suffer (refused before any byte of it is used), and the strict decoders of the
sealed plaintext and of the canonical encoding."""

import hashlib
import hmac
import re
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovagent.core import canonical, protocol, seal

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TAG_BYTES = 32

# The specification's constants, spelled out here rather than imported, so that a
# change to any of them in ovagent fails the vectors.
SPEC_REQUEST_DOMAIN = b"ov-agent/v2/request"
SPEC_SEAL_INFO = b"ov-agent/v2 seal"
SPEC_KEYSTREAM_DOMAIN = b"ov-agent/v2 keystream"
SPEC_TAG_DOMAIN = b"ov-agent/v2/sealed"
SPEC_SECRETS_DOMAIN = b"ov-agent/v2/secrets"

SUBKEY = bytes(range(32))
CHALLENGE = "5f0c1e2d3b4a69788796a5b4c3d2e1f00123456789abcdef0fedcba987654321"
NONCE = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
TS = 1700000000
RELEASE_FIELDS = {"app": "demo", "env": "production", "secrets": ["API_TOKEN", "DB_URL"],
                  "argv0": "/usr/bin/myapp"}
DEMO_VALUES = {"API_TOKEN": b"tok-123", "DB_URL": b"postgres://u:p@db/app"}


def release_request(subkey=SUBKEY, challenge=CHALLENGE, nonce=NONCE, ts=TS, **changes):
    """A signed release request with fixed challenge, nonce and timestamp."""
    req = protocol.new_request("release", challenge, **{**RELEASE_FIELDS, **changes})
    req["nonce"], req["ts"] = nonce, ts
    req["mac"] = protocol.sign(subkey, req)
    return req


# -- the specification, reimplemented from primitives -------------------------------


def spec_field(data):
    """One canonical field: 4-byte big-endian length, then the bytes."""
    return len(data).to_bytes(4, "big") + data


def spec_fields(*fields):
    return b"".join(spec_field(data) for data in fields)


def spec_signed_bytes(req):
    """What a release request's MAC covers (docs/protocol.rst), field by field."""
    app, env, secrets = req["app"], req["env"], req["secrets"]
    texts = [req["op"], req["challenge"], req["nonce"], str(req["ts"]),
             app or "", "0" if app is None else "1",
             env or "", "0" if env is None else "1",
             str(-1 if secrets is None else len(secrets)), *(secrets or ()),
             req["argv0"]]
    return spec_fields(SPEC_REQUEST_DOMAIN, *(text.encode() for text in texts))


def spec_secrets(values):
    """The sealed plaintext: domain, count, then name and value, names sorted."""
    pairs = [(name.encode(), values[name]) for name in sorted(values)]
    return spec_fields(SPEC_SECRETS_DOMAIN, str(len(pairs)).encode(),
                       *(data for pair in pairs for data in pair))


def spec_keys(subkey, req):
    """(enc, auth): HKDF-SHA256 from cryptography, 64 bytes, split in two."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64,
               salt=bytes.fromhex(req["challenge"]) + bytes.fromhex(req["nonce"]),
               info=SPEC_SEAL_INFO + hashlib.sha256(spec_signed_bytes(req)).digest(),
               ).derive(subkey)
    return okm[:32], okm[32:]


def spec_seal(subkey, req, plaintext):
    enc, auth = spec_keys(subkey, req)
    stream = hashlib.shake_256(SPEC_KEYSTREAM_DOMAIN + enc).digest(len(plaintext))
    ciphertext = bytes(p ^ s for p, s in zip(plaintext, stream))
    tag = hmac.new(auth, spec_fields(SPEC_TAG_DOMAIN, ciphertext), hashlib.sha256)
    return ciphertext + tag.digest()


# -- test vectors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Vector:
    """Inputs, intermediate values and the sealed reply (hex) of one test vector."""

    name: str
    subkey: bytes
    request: dict = field(repr=False)     # new_request fields and challenge/nonce/ts
    values: dict = field(repr=False)
    plaintext: str = field(repr=False)
    signed_sha256: str = field(repr=False)
    enc: str = field(repr=False)
    auth: str = field(repr=False)
    sealed: str = field(repr=False)

    def req(self):
        return release_request(self.subkey, **self.request)


VECTORS = [
    Vector(
        name="two-secrets",
        subkey=SUBKEY,
        request={},
        values=DEMO_VALUES,
        plaintext=("000000136f762d6167656e742f76322f73656372657473000000013200000009"
                   "4150495f544f4b454e00000007746f6b2d3132330000000644425f55524c0000"
                   "0015706f7374677265733a2f2f753a704064622f617070"),
        signed_sha256="464525e3a602f9a9a0d0c7edfb7c29c0c67b81277d66943952d1c4996ca5de66",
        enc="9c974ac6cedaa0c138ac2ad2ba019fa2f113068cd1148e3d6b531905aace79fd",
        auth="5e144146f1693a064f3aa4ac6144611a4fd8dcd08782687fc8689ac10de6987e",
        sealed=("d7129735052b8f0adb3408c1bf8b81cae2e1f9ca186263594aed04ff2dd531f0"
                "51e855f9f7008cc961918d7cf41f8a4b3189a2e1dde0d321fd4ea24ddbf253e5"
                "594eb39b2fca8b4e06b7d98084e1766ae941c10913b5db91bd0fa9ec7dbaef3b"
                "ddf6f0c750225b401421f6463f5b51f0ad1eb5a46459f4"),
    ),
    Vector(
        name="no-secrets",
        subkey=SUBKEY,
        request={"challenge": "0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2,
                 "nonce": "00112233445566778899aabbccddeeff", "ts": TS + 7,
                 "secrets": []},
        values={},
        plaintext="000000136f762d6167656e742f76322f736563726574730000000130",
        signed_sha256="381c164fd01479d642b4416c1314382f271c7ba3887786a6aa51884da82ab395",
        enc="2990f2d2016ad63e3fb3eaee99051c59b01214bc53b667196441b059e90c75a1",
        auth="a0d3c9b06be0ee297be21fa985bdf92d78e529c6e1eaf0b51f83eb9431bde634",
        sealed=("551df36aa1911fe8374e65570f9b32ad19b457477c74d3201ed5c9be0a518bea"
                "5baca53d369c84c2dad1b4d4d38959025c7559588f19aaba7ab98102"),
    ),
    Vector(
        name="defaults-and-empty-value",
        subkey=bytes(range(0xe0, 0x100)),
        request={"app": None, "env": None, "secrets": None, "argv0": "/bin/true"},
        values={"EMPTY": b""},
        plaintext=("000000136f762d6167656e742f76322f73656372657473000000013100000005"
                   "454d50545900000000"),
        signed_sha256="0fb0ef582aa34ad4625d25695212059652391e40a6e81efcd33918761be66a33",
        enc="21e8f327936fd608f21e0f7a69bb3d8e335279cbd0e3c73cadaf8017251941b2",
        auth="134a4ee9a3459f20977a0840c113e333e40b3c17fc72984a482cef5022494233",
        sealed=("908227a4fa26298b330ccfb0f3e1565ab61b608ddc3c242deb8ba727b553bd7c"
                "6834dc4a0a3860753172fc8940a97e7b85e36ca3dea61464c0e00f697e5b3dc3"
                "f30992c91f8d60bce0"),
    ),
]
vectors = pytest.mark.parametrize("vector", VECTORS, ids=lambda vector: vector.name)


@vectors
def test_vector_plaintext_is_the_spelled_out_encoding(vector):
    """encode_secrets is the canonical list the specification spells out."""
    plaintext = seal.encode_secrets(vector.values)
    assert plaintext.hex() == vector.plaintext
    assert plaintext == spec_secrets(vector.values)


@vectors
def test_vector_request_digest_and_keys_are_pinned(vector):
    """The digest of the signed request and both seal keys never drift."""
    req = vector.req()
    assert hashlib.sha256(protocol.signed_bytes(req)).hexdigest() == vector.signed_sha256
    assert hashlib.sha256(spec_signed_bytes(req)).hexdigest() == vector.signed_sha256
    enc, auth = seal.seal_keys(vector.subkey, req)
    assert (enc.hex(), auth.hex()) == (vector.enc, vector.auth)
    assert spec_keys(vector.subkey, req) == (enc, auth)


@vectors
def test_vector_sealed_reply_is_pinned(vector):
    """The sealed reply equals the hard-coded bytes: the construction cannot change
    without this test (and every deployed client) noticing."""
    sealed = seal.seal(vector.subkey, vector.req(), bytes.fromhex(vector.plaintext))
    assert sealed.hex() == vector.sealed


@vectors
def test_vector_recomputed_from_primitives(vector):
    """An independent implementation of the specification (cryptography's HKDF,
    hashlib's SHAKE-256, hmac) produces the same sealed reply."""
    plaintext = spec_secrets(vector.values)
    assert spec_seal(vector.subkey, vector.req(), plaintext).hex() == vector.sealed


@vectors
def test_vector_opens_to_its_secrets(vector):
    """The client's path: open the sealed reply, decode the secrets."""
    opened = seal.open_sealed(vector.subkey, vector.req(), bytes.fromhex(vector.sealed))
    assert seal.decode_secrets(opened) == vector.values


def test_the_mac_field_does_not_change_the_seal():
    """The seal binds what the MAC covers, not the MAC's transport field."""
    req = release_request()
    unsigned = {**req, "mac": None}
    plaintext = seal.encode_secrets(DEMO_VALUES)
    assert seal.seal(SUBKEY, req, plaintext) == seal.seal(SUBKEY, unsigned, plaintext)


# -- HKDF --------------------------------------------------------------------------------

RFC5869_IKM = bytes([0x0b] * 22)
RFC5869_CASES = [  # RFC 5869 appendix A.1 and A.3 (SHA-256)
    (bytes(range(0x0d)), bytes(range(0xf0, 0xfa)), 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
     "34007208d5b887185865"),
    (b"", b"", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
     "9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize("salt, info, length, okm", RFC5869_CASES, ids=["A.1", "A.3"])
def test_hkdf_matches_rfc5869_vectors(salt, info, length, okm):
    """The published vectors, with and without a salt."""
    assert protocol.hkdf_sha256(RFC5869_IKM, info, length, salt=salt).hex() == okm


@PROPERTY
@given(ikm=st.binary(max_size=100), salt=st.binary(max_size=100),
       info=st.binary(max_size=100), length=st.integers(1, 96))
def test_hkdf_matches_cryptography_for_any_salt_and_length(ikm, salt, info, length):
    """The stdlib HKDF equals cryptography's for any salt (empty: none) and for
    outputs shorter, equal to and longer than one SHA-256 block."""
    reference = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None,
                     info=info).derive(ikm)
    assert protocol.hkdf_sha256(ikm, info, length, salt=salt) == reference


# -- round trip ---------------------------------------------------------------------


@PROPERTY
@given(subkey=st.binary(min_size=32, max_size=32),
       nonce=st.binary(min_size=16, max_size=16), plaintext=st.binary(max_size=4096))
def test_open_sealed_returns_what_was_sealed(subkey, nonce, plaintext):
    """Any plaintext, under any subkey and nonce, opens to itself."""
    req = release_request(subkey, nonce=nonce.hex())
    sealed = seal.seal(subkey, req, plaintext)
    assert len(sealed) == len(plaintext) + TAG_BYTES
    assert seal.open_sealed(subkey, req, sealed) == plaintext


def test_ciphertext_differs_for_every_request():
    """Each request has its own keystream: the same plaintext sealed for two nonces
    shares no keystream (their XOR is not the zero string)."""
    plaintext = seal.encode_secrets(DEMO_VALUES)
    one = seal.seal(SUBKEY, release_request(), plaintext)[:-TAG_BYTES]
    two = seal.seal(SUBKEY, release_request(nonce="00" * 16), plaintext)[:-TAG_BYTES]
    assert one != two
    assert bytes(a ^ b for a, b in zip(one, two)).count(0) < len(one) // 4


# -- tampering: refused, before any byte is used -------------------------------------


def refused(subkey, req, sealed):
    """True when open_sealed raises SealError without ever running the keystream over
    the (unauthenticated) ciphertext."""
    calls = []

    def recording(key, data):
        calls.append(data)
        return b"\0" * len(data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seal, "_xor_keystream", recording)
        try:
            seal.open_sealed(subkey, req, sealed)
        except seal.SealError:
            return calls == []
    return False


def test_keystream_runs_only_after_the_tag_matched():
    """Control for refused(): a genuine reply does reach the keystream, once, with
    exactly its ciphertext."""
    req = release_request()
    sealed = seal.seal(SUBKEY, req, seal.encode_secrets(DEMO_VALUES))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seal, "_xor_keystream",
                      lambda key, data: calls.append(data) or bytes(len(data)))
        seal.open_sealed(SUBKEY, req, sealed)
    assert calls == [sealed[:-TAG_BYTES]]
    assert not refused(SUBKEY, req, sealed)


def flipped(data, bit):
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@vectors
def test_every_single_bit_flip_is_refused(vector):
    """Exhaustively: no bit of a sealed reply, ciphertext or tag, can be changed."""
    req, sealed = vector.req(), bytes.fromhex(vector.sealed)
    accepted = [bit for bit in range(8 * len(sealed))
                if not refused(vector.subkey, req, flipped(sealed, bit))]
    assert accepted == []


@PROPERTY
@given(plaintext=st.binary(min_size=1, max_size=2048), data=st.data())
def test_a_bit_flip_in_any_reply_is_refused(plaintext, data):
    """The same for arbitrary plaintexts, at a random bit."""
    req = release_request()
    sealed = seal.seal(SUBKEY, req, plaintext)
    bit = data.draw(st.integers(0, 8 * len(sealed) - 1), label="bit")
    assert refused(SUBKEY, req, flipped(sealed, bit))


@vectors
def test_every_truncation_is_refused(vector):
    """A reply cut anywhere, shorter than a tag included, is refused."""
    req, sealed = vector.req(), bytes.fromhex(vector.sealed)
    accepted = [size for size in range(len(sealed))
                if not refused(vector.subkey, req, sealed[:size])]
    assert accepted == []


@vectors
def test_dropping_leading_bytes_is_refused(vector):
    """A reply whose start is cut (the tag intact) is refused."""
    req, sealed = vector.req(), bytes.fromhex(vector.sealed)
    assert all(refused(vector.subkey, req, sealed[start:])
               for start in range(1, len(sealed) + 1))


@PROPERTY
@given(extra=st.binary(min_size=1, max_size=64))
def test_appended_bytes_are_refused(extra):
    """Nothing may follow the tag."""
    vector = VECTORS[0]
    assert refused(vector.subkey, vector.req(), bytes.fromhex(vector.sealed) + extra)


@PROPERTY
@given(subkey=st.binary(min_size=32, max_size=32).filter(lambda key: key != SUBKEY))
def test_another_subkey_cannot_open_a_reply(subkey):
    """Only the signer of the request (its machine key's subkey) can open the reply,
    even holding the request itself."""
    vector = VECTORS[0]
    assert refused(subkey, vector.req(), bytes.fromhex(vector.sealed))


OTHER_REQUESTS = {
    "another challenge (connection)": {"challenge": "ab" * 32},
    "another nonce": {"nonce": "cd" * 16},
    "another timestamp": {"ts": TS + 1},
    "fewer secrets": {"secrets": ["API_TOKEN"]},
    "secrets reordered": {"secrets": ["DB_URL", "API_TOKEN"]},
    "all secrets": {"secrets": None},
    "another app": {"app": "other"},
    "the default app": {"app": None},
    "an empty app name": {"app": ""},
    "another env": {"env": "staging"},
    "the default env": {"env": None},
    "another command": {"argv0": "/usr/bin/other"},
}


@pytest.mark.parametrize("changes", OTHER_REQUESTS.values(), ids=OTHER_REQUESTS.keys())
def test_a_reply_replayed_to_another_request_is_refused(changes):
    """A reply opens only for the request it answered: any difference in what the
    request signed gives other keys, both of them."""
    vector = VECTORS[0]
    other = release_request(**changes)
    assert refused(SUBKEY, other, bytes.fromhex(vector.sealed))
    enc, auth = seal.seal_keys(SUBKEY, other)
    assert enc.hex() != vector.enc and auth.hex() != vector.auth


def other_op(op):
    """A status or spawn request with the vector's challenge, nonce and timestamp."""
    fields = {} if op == "status" else {
        "app": "demo", "env": "production", "secrets": ["API_TOKEN", "DB_URL"],
        "argv": ["/usr/bin/myapp"]}
    req = protocol.new_request(op, CHALLENGE, **fields)
    req["nonce"], req["ts"] = NONCE, TS
    return req


@pytest.mark.parametrize("op", ["status", "spawn"])
def test_a_reply_for_another_op_is_refused(op):
    """A request of another op, otherwise alike, signs other bytes: no reply opens."""
    vector = VECTORS[0]
    assert refused(SUBKEY, other_op(op), bytes.fromhex(vector.sealed))


# -- decode_secrets ------------------------------------------------------------------

VALUE = st.binary(max_size=64).map(lambda value: value.replace(b"\0", b""))
SECRETS = st.dictionaries(st.from_regex(NAME, fullmatch=True), VALUE, max_size=8)


@PROPERTY
@given(values=SECRETS)
def test_decode_secrets_inverts_encode_secrets(values):
    """Any environment of valid names and NUL-free values survives the seal."""
    assert seal.decode_secrets(seal.encode_secrets(values)) == values


def check_decoded(data):
    """decode_secrets(data) either refuses with SealError or returns valid secrets."""
    try:
        values = seal.decode_secrets(data)
    except seal.SealError:
        return
    assert all(isinstance(name, str) and name and "=" not in name and "\0" not in name
               and isinstance(value, bytes) and b"\0" not in value
               for name, value in values.items())


@PROPERTY
@given(data=st.binary(max_size=512))
def test_decode_secrets_of_arbitrary_bytes_raises_only_seal_error(data):
    """Garbage is refused with SealError, never another exception."""
    check_decoded(data)


@PROPERTY
@given(fields=st.lists(st.binary(max_size=12), max_size=8),
       count=st.one_of(st.integers(-2, 6), st.binary(max_size=4)))
def test_decode_secrets_of_arbitrary_fields_raises_only_seal_error(fields, count):
    """Well-framed but arbitrary fields (after the right domain, so that the checks
    past it are reached) are refused with SealError too."""
    check_decoded(canonical.encode(SPEC_SECRETS_DOMAIN, count, *fields))


def secrets_bytes(*fields, domain=SPEC_SECRETS_DOMAIN):
    return canonical.encode(domain, *fields)


GOOD = secrets_bytes(1, "A", b"x")
INVALID_SECRETS = {
    "empty input": b"",
    "no count": secrets_bytes(),
    "value with NUL": secrets_bytes(1, "A", b"x\0y"),
    "name with '='": secrets_bytes(1, "A=B", b"x"),
    "empty name": secrets_bytes(1, "", b"x"),
    "name with NUL": secrets_bytes(1, "A\0", b"x"),
    "non-ASCII name": secrets_bytes(1, "CAF\u00c9", b"x"),
    "wrong domain": secrets_bytes(1, "A", b"x", domain=b"ov-agent/v1/secrets"),
    "count too high": secrets_bytes(2, "A", b"x"),
    "count too low": secrets_bytes(0, "A", b"x"),
    "negative count": secrets_bytes(-1),
    "count not a number": secrets_bytes("one", "A", b"x"),
    "name without value": secrets_bytes(1, "A"),
    "duplicate names": secrets_bytes(2, "A", b"x", "A", b"y"),
    "truncated": GOOD[:-1],
    "trailing byte": GOOD + b"\0",
}


def test_decode_secrets_control_is_accepted():
    """The well-formed control the invalid cases below are cut from."""
    assert seal.decode_secrets(GOOD) == {"A": b"x"}


@pytest.mark.parametrize("data", INVALID_SECRETS.values(), ids=INVALID_SECRETS.keys())
def test_decode_secrets_refuses_invalid_lists(data):
    """Authenticated or not, a list the client would exec with is checked."""
    with pytest.raises(seal.SealError):
        seal.decode_secrets(data)


# -- canonical.decode ---------------------------------------------------------------


@PROPERTY
@given(fields=st.lists(st.binary(max_size=64), max_size=10))
def test_canonical_decode_inverts_encode(fields):
    """Any tuple of byte fields comes back exactly, and with its count."""
    data = canonical.encode(*fields)
    assert canonical.decode(data) == fields
    assert canonical.decode(data, count=len(fields)) == fields


@PROPERTY
@given(data=st.binary(max_size=256))
def test_canonical_decode_of_arbitrary_bytes_is_a_list_or_value_error(data):
    """Garbage raises ValueError; whatever decodes is exactly the encoding of what
    it decodes to (no two encodings of one tuple)."""
    try:
        fields = canonical.decode(data)
    except ValueError:
        return
    assert canonical.encode(*fields) == data


@pytest.mark.parametrize("count", [0, 1, 3])
def test_canonical_decode_refuses_another_count(count):
    """decode(..., count=N) insists on exactly N fields."""
    with pytest.raises(ValueError):
        canonical.decode(canonical.encode(b"a", b"b"), count=count)


@pytest.mark.parametrize("data", [b"\0", b"\0\0\0", b"\0\0\0\1", b"\0\0\0\2a",
                                  canonical.encode(b"ab") + b"\0\0"],
                         ids=["1-byte prefix", "3-byte prefix", "field missing",
                              "field short", "trailing partial prefix"])
def test_canonical_decode_refuses_truncated_input(data):
    """A length prefix cut short, or a field running past the end, is refused."""
    with pytest.raises(ValueError):
        canonical.decode(data)
