"""The agent's wire protocol (specified in docs/protocol.rst).

Frames are ``b"OV" + version byte + 0x00 + 4-byte big-endian body length`` followed by
a UTF-8 JSON object.  The length is checked against MAX_FRAME before any body byte is
read, and each frame must arrive within a deadline.  JSON is parsed strictly: no
NaN/Infinity, no duplicate keys, no unknown fields, integers of bounded size.

A session: the agent sends ``hello`` with a fresh 256-bit challenge; the client sends
one ``request`` signed with HMAC-SHA256 under a subkey derived (HKDF) from its machine
key, over a canonical encoding of the challenge, a 128-bit nonce, a timestamp and every
field the agent acts on; stdin/stdout/stderr travel as SCM_RIGHTS with the request.

Stdlib only at import time: this module is on the client's hot path.
"""

import array
import hashlib
import hmac
import json
import os
import time

# The C module, not socket.py: its enums and selectors cost the client's start (client.py)
from _socket import CMSG_SPACE, MSG_CMSG_CLOEXEC, SCM_RIGHTS, SOL_SOCKET

from . import canonical

VERSION = 1
MAGIC = b"OV"
HEADER_LEN = 8
MAX_FRAME = 1 << 20          # 1 MiB: argv + environment comfortably fit
FRAME_TIMEOUT = 10.0         # seconds for one whole frame to arrive
CLOCK_WINDOW = 30            # seconds a request's timestamp may differ from the agent's
NONCE_BYTES = 16
CHALLENGE_BYTES = 32
MAC_BYTES = 32
MAX_FDS = 3                  # stdin, stdout, stderr
MAX_INT_DIGITS = 20
HKDF_INFO = b"ov-agent/v1 request-mac"
MAC_DOMAIN = "ov-agent/v1/request"
RELAYED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                   "SIGWINCH")

# Stable error codes carried by {"type": "error"} frames.
E_BAD_FRAME = "bad-frame"
E_TOO_LARGE = "too-large"
E_TIMEOUT = "timeout"
E_BAD_REQUEST = "bad-request"
E_AUTH = "auth-failed"       # every MAC/challenge failure, whatever the detail
E_STALE = "stale"
E_REPLAY = "replay"
E_PEER = "peer-refused"
E_BUSY = "busy"
E_NOT_FOUND = "not-found"
E_EXEC = "exec-failed"
E_UNCONFIGURED = "unconfigured"
E_INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame or request that must be refused; ``code`` is one of E_*."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# -- framing -----------------------------------------------------------------


def encode_frame(obj):
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
    if len(body) > MAX_FRAME:
        raise ProtocolError(E_TOO_LARGE, f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return MAGIC + bytes((VERSION, 0)) + len(body).to_bytes(4, "big") + body


def send_frame(sock, obj, fds=()):
    data = encode_frame(obj)
    if fds:
        ancillary = [(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds))]
        sent = sock.sendmsg([data], ancillary)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact(sock, count, deadline, want_fds=False):
    """Read exactly count bytes before deadline; collect SCM_RIGHTS fds if asked."""
    chunks, fds, have = [], [], 0
    while have < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(E_TIMEOUT, "timed out reading a frame")
        sock.settimeout(remaining)
        try:
            if want_fds:
                data, ancdata, _, _ = sock.recvmsg(
                    count - have, CMSG_SPACE(MAX_FDS * 4 + 4), MSG_CMSG_CLOEXEC)
                fds += _fds_from(ancdata)
            else:
                data = sock.recv(count - have)
        except TimeoutError:
            raise ProtocolError(E_TIMEOUT, "timed out reading a frame") from None
        if not data:
            _close_all(fds)
            if have == 0 and not chunks:
                raise EOFError("peer closed the connection")
            raise ProtocolError(E_BAD_FRAME, "connection closed inside a frame")
        chunks.append(data)
        have += len(data)
    return b"".join(chunks), fds


def _fds_from(ancdata):
    fds = []
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[:len(data) - len(data) % received.itemsize])
            fds += list(received)
    return fds


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_frame(sock, timeout=FRAME_TIMEOUT, want_fds=False, max_size=MAX_FRAME):
    """Read one frame; return (object, fds).  fds are always empty unless want_fds.

    Raises EOFError on a clean close before a frame, ProtocolError otherwise."""
    deadline = time.monotonic() + timeout
    header, fds = _recv_exact(sock, HEADER_LEN, deadline, want_fds)
    try:
        if header[:2] != MAGIC or header[3] != 0:
            raise ProtocolError(E_BAD_FRAME, "not an ov-agent frame")
        if header[2] != VERSION:
            raise ProtocolError(E_BAD_FRAME, f"unsupported protocol version {header[2]}")
        length = int.from_bytes(header[4:], "big")
        if length > max_size:
            raise ProtocolError(E_TOO_LARGE, f"frame of {length} bytes exceeds {max_size}")
        if len(fds) > MAX_FDS:
            raise ProtocolError(E_BAD_REQUEST, f"{len(fds)} file descriptors sent")
        body, _ = _recv_exact(sock, length, deadline)
        return decode_body(body), fds
    except EOFError:
        _close_all(fds)
        raise ProtocolError(E_BAD_FRAME, "connection closed inside a frame") from None
    except BaseException:
        _close_all(fds)
        raise


def _excerpt(value, limit=60):
    """repr(value), cut to limit characters: refusals quote the peer's input, and a
    whole quote could outgrow MAX_FRAME (then the refusal cannot be sent) and would
    flood the audit log."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ProtocolError(E_BAD_FRAME, f"duplicate key {_excerpt(key)}")
        obj[key] = value
    return obj


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError(E_BAD_FRAME, "integer too large")
    return int(text)


def _reject_constant(name):
    raise ProtocolError(E_BAD_FRAME, f"{name} is not allowed")


def _reject_float(text):
    raise ProtocolError(E_BAD_FRAME, "non-integer number")


def decode_body(body):
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_int=_bounded_int, parse_float=_reject_float,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(E_BAD_FRAME, "frame body is not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError(E_BAD_FRAME, "frame body is not a typed JSON object")
    return obj


# -- requests ----------------------------------------------------------------

REQUEST_FIELDS = {
    "type": str, "op": str, "challenge": str, "nonce": str, "ts": int,
    "app": (str, type(None)), "env": (str, type(None)),
    "secrets": (list, type(None)), "argv": list, "environ": dict, "cwd": str,
    "umask": int, "mac": (str, type(None)),
}
OPS = ("run", "status")


def _is_hex(text, size):
    return (isinstance(text, str) and len(text) == 2 * size
            and all(c in "0123456789abcdef" for c in text))


def _check_text(what, text):
    """A string without NUL whose lone surrogates, if any, are the escapes of non-UTF-8
    bytes: the MAC's encoding and os.fsencode cannot encode any other."""
    if not isinstance(text, str) or "\0" in text:
        raise ProtocolError(E_BAD_REQUEST, f"{what} must be a string without NUL")
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ProtocolError(E_BAD_REQUEST,
                            f"{what} has an unencodable surrogate") from None
    return text


def validate_request(obj):
    """Check a request's schema strictly; return it unchanged when valid."""
    if obj.get("type") != "request":
        raise ProtocolError(E_BAD_REQUEST, "expected a request frame")
    if set(obj) != set(REQUEST_FIELDS):
        extra, missing = set(obj) - set(REQUEST_FIELDS), set(REQUEST_FIELDS) - set(obj)
        raise ProtocolError(E_BAD_REQUEST,
                            f"unknown fields {_excerpt(sorted(extra))}" if extra
                            else f"missing fields {sorted(missing)}")
    for key, kinds in REQUEST_FIELDS.items():
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ProtocolError(E_BAD_REQUEST, f"field {key!r} has the wrong type")
    if obj["op"] not in OPS:
        raise ProtocolError(E_BAD_REQUEST, f"unknown op {_excerpt(obj['op'])}")
    if not _is_hex(obj["nonce"], NONCE_BYTES) or not _is_hex(obj["challenge"],
                                                              CHALLENGE_BYTES):
        raise ProtocolError(E_BAD_REQUEST, "nonce or challenge malformed")
    if obj["mac"] is not None and not (isinstance(obj["mac"], str)
                                       and obj["mac"].isascii()):
        raise ProtocolError(E_AUTH, "request authentication failed")
    for name in ("app", "env"):
        if obj[name] is not None:
            _check_text(name, obj[name])
    for name in obj["secrets"] or ():
        _check_text("secret name", name)
    if obj["op"] == "run" and not obj["argv"]:
        raise ProtocolError(E_BAD_REQUEST, "argv is empty")
    for arg in obj["argv"]:
        _check_text("argv element", arg)
    for name, value in obj["environ"].items():
        _check_text("environment value", value)
        if not name or "=" in _check_text("environment name", name):
            raise ProtocolError(E_BAD_REQUEST, "environment name is empty or has '='")
    if not _check_text("cwd", obj["cwd"]).startswith("/"):
        raise ProtocolError(E_BAD_REQUEST, "cwd must be an absolute path")
    if not 0 <= obj["umask"] <= 0o777:
        raise ProtocolError(E_BAD_REQUEST, "umask out of range")
    return obj


def signed_bytes(req):
    """The canonical encoding the MAC covers: every field the agent acts on."""
    secrets = req["secrets"]
    fields = [MAC_DOMAIN, req["op"], req["challenge"], req["nonce"], req["ts"],
              req["app"] or "", "1" if req["app"] is not None else "0",
              req["env"] or "", "1" if req["env"] is not None else "0",
              -1 if secrets is None else len(secrets), *(secrets or ()),
              len(req["argv"]), *req["argv"], len(req["environ"])]
    for name in sorted(req["environ"]):
        fields += [name, req["environ"][name]]
    fields += [req["cwd"], req["umask"]]
    return canonical.encode(*fields)


def mac_key(machine_key):
    """HKDF-SHA256 (RFC 5869) subkey for request MACs: the raw machine key is never
    a MAC key.

    Written with the stdlib's hmac instead of cryptography's HKDF because importing
    cryptography costs ~30 ms on every ``ov run --agent``; for one 32-byte output
    block HKDF is exactly these two HMACs, and tests/test_protocol_kdf.py checks the
    result against cryptography's HKDF for arbitrary keys."""
    prk = hmac.new(bytes(hashlib.sha256().digest_size), machine_key,
                   hashlib.sha256).digest()                       # extract, salt = zeros
    return hmac.new(prk, HKDF_INFO + b"\x01", hashlib.sha256).digest()  # expand, T(1)


def sign(subkey, req):
    return hmac.new(subkey, signed_bytes(req), hashlib.sha256).hexdigest()


def mac_matches(subkey, req):
    """Constant-time check of req["mac"] (an ASCII string, validated) against subkey."""
    return hmac.compare_digest(sign(subkey, req), req["mac"])


def new_request(op, challenge, *, app=None, env=None, secrets=None, argv=(),
                environ=None, cwd="/", umask=0o022):
    return {"type": "request", "op": op, "challenge": challenge,
            "nonce": os.urandom(NONCE_BYTES).hex(), "ts": int(time.time()),
            "app": app, "env": env, "secrets": secrets, "argv": list(argv),
            "environ": dict(environ or {}), "cwd": cwd, "umask": umask, "mac": None}


def error_frame(code, message):
    return {"type": "error", "code": code, "message": message}
