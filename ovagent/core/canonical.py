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


def decode(data, count=None):
    """The byte fields of encode()'s output; ValueError unless *data* is exactly a
    sequence of well-formed fields (and *count* of them, when given)."""
    fields, position = [], 0
    while position < len(data):
        if len(data) - position < 4:
            raise ValueError("truncated length prefix")
        size = int.from_bytes(data[position:position + 4], "big")
        position += 4
        if size > len(data) - position:
            raise ValueError("field runs past the end")
        fields.append(bytes(data[position:position + size]))
        position += size
    if count is not None and len(fields) != count:
        raise ValueError(f"{len(fields)} fields, expected {count}")
    return fields
