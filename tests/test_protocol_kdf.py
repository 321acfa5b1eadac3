"""The stdlib HKDF in ovagent.core.protocol equals cryptography's HKDF (RFC 5869)."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from ovagent.core import protocol


def reference(key):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=protocol.HKDF_INFO).derive(key)


@given(st.binary(min_size=0, max_size=200))
def test_mac_key_matches_cryptography_hkdf(key):
    assert protocol.mac_key(key) == reference(key)

