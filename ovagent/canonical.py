"""Canonical, unambiguous byte encoding of a tuple of fields.

Used for AES-GCM associated data and for the bytes a request MAC covers: each field is
a 4-byte big-endian length followed by its bytes, so no two different tuples encode the
same way (no delimiter games).  Stdlib only: the client imports it on its hot path.
"""


def encode(*fields):
    """Encode str/bytes/int fields (ints as decimal text) as length-prefixed bytes."""
    out = bytearray()
    for field in fields:
        if isinstance(field, str):
            data = field.encode("utf-8", "surrogateescape")
        elif isinstance(field, (bytes, bytearray)):
            data = bytes(field)
        elif isinstance(field, int) and not isinstance(field, bool):
            data = str(field).encode("ascii")
        else:
            raise TypeError(f"cannot encode {type(field).__name__}")
        out += len(data).to_bytes(4, "big")
        out += data
    return bytes(out)
