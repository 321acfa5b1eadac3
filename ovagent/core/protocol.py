"""The agent's wire protocol (specified in docs/protocol.rst).

Frames are ``b"OV" + version byte + 0x00 + 4-byte big-endian body length`` followed by
a UTF-8 JSON object.  The length is checked against MAX_FRAME before any body byte is
read, and each frame must arrive within a deadline.  JSON is parsed strictly: no
NaN/Infinity, no duplicate keys, no unknown fields, integers of bounded size.

A session: the agent sends ``hello`` with a fresh 256-bit challenge; the client sends
one ``request`` signed with HMAC-SHA256 under a subkey derived (HKDF) from its machine
key, over a canonical encoding of the challenge, a 128-bit nonce, a timestamp and every
field of the request.  ``release`` is answered with the secrets sealed to the request
(core/seal.py); ``spawn`` carries stdin/stdout/stderr as SCM_RIGHTS, and the agent
runs the command and reports its exit.

Stdlib only at import time: this module is on the client's hot path.
"""

import hashlib
import hmac
import os
import sys
import time

# C modules, not socket.py or json: socket.py's enums and selectors, and the regular
# expressions json's Python layer compiles at import, cost the client's start
# (client/talk.py); _json is the codec json.loads and json.dumps run on.
import _json
from _socket import CMSG_SPACE, MSG_CMSG_CLOEXEC, SCM_RIGHTS, SOL_SOCKET

from . import canonical

VERSION = 2
MAGIC = b"OV"
HEADER_LEN = 8
MAX_FRAME = 1 << 20          # 1 MiB: argv + environment comfortably fit
# A 'released' frame may be larger: sealed secrets in base64, up to what execve()
# takes as an environment (ARG_MAX, 2 MiB on Linux), plus a third for base64.
MAX_RELEASED = 3 << 20
MAX_COMMAND = 4096           # bytes of argv[0]: a path (PATH_MAX), also audited
FRAME_TIMEOUT = 10.0         # seconds for one whole frame to arrive
REQUEST_TIMEOUT = 2.0        # seconds from the agent's accept to a whole request
CLOCK_WINDOW = 30            # seconds a request's timestamp may differ from the agent's
NONCE_BYTES = 16
CHALLENGE_BYTES = 32
MAX_FDS = 3                  # stdin, stdout, stderr
FD_BYTES = 4                 # a C int in SCM_RIGHTS
MAX_INT_DIGITS = 20
HKDF_INFO = b"ov-agent/v2 request-mac"
MAC_DOMAIN = "ov-agent/v2/request"
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
E_SPAWN_REFUSED = "spawn-refused"   # the caller's world is not the agent's
E_POLICY = "policy-denied"         # the agent's policy refuses this caller
E_UNCONFIGURED = "unconfigured"
E_INTERNAL = "internal"


class ProtocolError(Exception):
    """A frame or request that must be refused; ``code`` is one of E_*, and
    ``exit_status`` what a client leaves with on exec-failed (126 or 127)."""

    def __init__(self, code, message, exit_status=None):
        super().__init__(message)
        self.code, self.exit_status = code, exit_status


# -- framing -----------------------------------------------------------------


def header(length):
    """The header of a frame whose body has *length* bytes."""
    return MAGIC + bytes((VERSION, 0)) + length.to_bytes(4, "big")


def encode_frame(obj, max_size=MAX_FRAME):
    body = "".join(_encode_json(obj, 0)).encode("ascii")
    if len(body) > max_size:
        raise ProtocolError(E_TOO_LARGE, f"frame of {len(body)} bytes exceeds {max_size}")
    return header(len(body)) + body


def send_frame(sock, obj, fds=()):
    data = encode_frame(obj)
    if fds:
        ancillary = [(SOL_SOCKET, SCM_RIGHTS, b"".join(
            fd.to_bytes(FD_BYTES, sys.byteorder, signed=True) for fd in fds))]
        sent = sock.sendmsg([data], ancillary)
        data = data[sent:]
    if data:
        sock.sendall(data)


class FrameReader:
    """One frame, read as its bytes arrive: want() says how many more to read (never
    past the frame's end, so nothing after it is consumed), feed() takes them and
    checks the header as soon as it is whole.  Descriptors count only when they come
    with the header's bytes (recv() drops any sent with the body).  The caller keeps
    the deadline and closes the descriptors (take_fds, close_fds) on every path."""

    def __init__(self, max_size=MAX_FRAME):
        self.max_size = max_size
        self.data = bytearray()
        self.fds = []
        self.length = None          # the body's, once the header is whole

    def want(self):
        return HEADER_LEN + (self.length or 0) - len(self.data)

    def feed(self, data, fds=()):
        """Take bytes (and descriptors); True once the frame is whole."""
        self.fds += fds
        self.data += data
        if self.length is None and len(self.data) >= HEADER_LEN:
            self.length = _body_length(bytes(self.data[:HEADER_LEN]), self.max_size)
        if len(self.fds) > MAX_FDS:     # at once: a header in pieces could carry more
            raise ProtocolError(E_BAD_REQUEST, f"{len(self.fds)} file descriptors sent")
        return self.length is not None and len(self.data) == HEADER_LEN + self.length

    def read(self, sock, want_fds=False):
        """One read from *sock* of at most what the frame still lacks: True once the
        frame is whole, False if more is needed, None at the end of the stream."""
        if want_fds and self.length is None:
            data, ancdata, _, _ = sock.recvmsg(
                self.want(), CMSG_SPACE((MAX_FDS + 1) * FD_BYTES), MSG_CMSG_CLOEXEC)
            fds = _fds_from(ancdata)
        else:
            data, fds = sock.recv(self.want()), []
        return self.feed(data, fds) if data or fds else None

    def frame(self):
        return decode_body(bytes(self.data[HEADER_LEN:]))

    def take_fds(self):
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self):
        close_fds(self.take_fds())


def _body_length(header, max_size):
    if header[:2] != MAGIC or header[3] != 0:
        raise ProtocolError(E_BAD_FRAME, "not an ov-agent frame")
    if header[2] != VERSION:
        raise ProtocolError(E_BAD_FRAME, f"unsupported protocol version {header[2]}")
    length = int.from_bytes(header[4:], "big")
    if length > max_size:
        raise ProtocolError(E_TOO_LARGE, f"frame of {length} bytes exceeds {max_size}")
    return length


def _fds_from(ancdata):
    fds = []
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            fds += [int.from_bytes(data[at:at + FD_BYTES], sys.byteorder, signed=True)
                    for at in range(0, len(data) - FD_BYTES + 1, FD_BYTES)]
    return fds


def close_fds(fds):
    """Close and forget each descriptor of the list: closing one twice could close a
    descriptor that has since been given to another connection."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def closed_inside_a_frame():
    return ProtocolError(E_BAD_FRAME, "connection closed inside a frame")


def timed_out():
    return ProtocolError(E_TIMEOUT, "timed out reading a frame")


def recv_frame(sock, timeout=FRAME_TIMEOUT, want_fds=False, max_size=MAX_FRAME):
    """Read one frame from a blocking socket; return (object, fds).  fds are always
    empty unless want_fds, and closed on any failure.

    Raises EOFError on a clean close before a frame, ProtocolError otherwise."""
    deadline = time.monotonic() + timeout
    reader = FrameReader(max_size)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise timed_out()
            sock.settimeout(remaining)
            try:
                done = reader.read(sock, want_fds)
            except TimeoutError:
                raise timed_out() from None
            if done is None:
                if reader.data:
                    raise closed_inside_a_frame()
                raise EOFError("peer closed the connection")
            if done:
                return reader.frame(), reader.take_fds()
    except BaseException:
        reader.close_fds()
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


class _StrictJson:
    """The settings _json's scanner reads (as json.JSONDecoder holds them): strict
    strings, no floats, no NaN or Infinity, bounded integers, no duplicate keys."""

    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_no_duplicates)
    parse_float = staticmethod(_reject_float)
    parse_int = staticmethod(_bounded_int)
    parse_constant = staticmethod(_reject_constant)


def _unencodable(value):
    raise TypeError(f"cannot send {type(value).__name__} in a frame")


_scan_json = _json.make_scanner(_StrictJson())
# json.dumps(obj, separators=(",", ":"), allow_nan=False), without its Python layer.
_encode_json = _json.make_encoder(None, _unencodable, _json.encode_basestring_ascii,
                                  None, ":", ",", False, False, False)
JSON_WHITESPACE = " \t\n\r"


def decode_body(body):
    """The JSON object of a frame body, parsed as strictly as json.loads with the
    hooks of _StrictJson (whitespace around the value allowed, nothing else)."""
    try:
        text = body.decode("utf-8").strip(JSON_WHITESPACE)
        obj, end = _scan_json(text, 0)
        if end != len(text):
            raise ValueError("extra data after the JSON value")
    # SystemError: Python 3.11's _json reports some syntax errors with an exception
    # class it looks up in sys.modules without importing it (json.decoder), and fails
    # with SystemError when nothing imported json (tests/fuzz_frames.py found it).
    except (UnicodeDecodeError, ValueError, RecursionError, StopIteration, SystemError):
        raise ProtocolError(E_BAD_FRAME, "frame body is not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError(E_BAD_FRAME, "frame body is not a typed JSON object")
    return obj


# -- requests ----------------------------------------------------------------

# The fields of a request: those every op carries, then each op's own.  A request
# carries exactly its op's fields, so an agent never receives (or acts on) what
# the op does not need: a release request has no cwd, environment or argv.
COMMON_FIELDS = {"type": str, "op": str, "challenge": str, "nonce": str, "ts": int,
                 "mac": (str, type(None))}
TARGET_FIELDS = {"app": (str, type(None)), "env": (str, type(None)),
                 "secrets": (list, type(None))}
OP_FIELDS = {
    "status": {},
    "release": {**TARGET_FIELDS, "argv0": str},
    "spawn": {**TARGET_FIELDS, "argv": list, "environ": dict, "cwd": str, "umask": int},
    "consumers": TARGET_FIELDS,          # which units hold what (filters; root only)
}


def is_hex(text, size):
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


def _check_schema(obj):
    """Exactly the fields of the request's op, each of its type."""
    op = obj.get("op")
    if not isinstance(op, str) or op not in OP_FIELDS:
        raise ProtocolError(E_BAD_REQUEST, f"unknown op {_excerpt(op)}")
    schema = {**COMMON_FIELDS, **OP_FIELDS[op]}
    if set(obj) != set(schema):
        extra, missing = set(obj) - set(schema), set(schema) - set(obj)
        raise ProtocolError(E_BAD_REQUEST,
                            f"unknown fields {_excerpt(sorted(extra))}" if extra
                            else f"missing fields {sorted(missing)}")
    for key, kinds in schema.items():
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ProtocolError(E_BAD_REQUEST, f"field {key!r} has the wrong type")


def validate_request(obj):
    """Check a request's schema strictly; return it unchanged when valid."""
    if obj.get("type") != "request":
        raise ProtocolError(E_BAD_REQUEST, "expected a request frame")
    _check_schema(obj)
    if not is_hex(obj["nonce"], NONCE_BYTES) or not is_hex(obj["challenge"],
                                                            CHALLENGE_BYTES):
        raise ProtocolError(E_BAD_REQUEST, "nonce or challenge malformed")
    if obj["mac"] is not None and not obj["mac"].isascii():
        raise ProtocolError(E_AUTH, "request authentication failed")
    for name in ("app", "env"):
        if obj.get(name) is not None:
            _check_text(name, obj[name])
    for name in obj.get("secrets") or ():
        _check_text("secret name", name)
    if obj["op"] == "release":
        _check_command(_check_text("argv0", obj["argv0"]))
    if obj["op"] == "spawn":
        _check_spawn(obj)
    return obj


def _check_command(command):
    if len(command.encode("utf-8", "surrogateescape")) > MAX_COMMAND:
        raise ProtocolError(E_BAD_REQUEST, f"the command is longer than {MAX_COMMAND} "
                            "bytes")


def _check_spawn(obj):
    if not obj["argv"]:
        raise ProtocolError(E_BAD_REQUEST, "argv is empty")
    for arg in obj["argv"]:
        _check_text("argv element", arg)
    _check_command(obj["argv"][0])
    for name, value in obj["environ"].items():
        _check_text("environment value", value)
        if not name or "=" in _check_text("environment name", name):
            raise ProtocolError(E_BAD_REQUEST, "environment name is empty or has '='")
    if not _check_text("cwd", obj["cwd"]).startswith("/"):
        raise ProtocolError(E_BAD_REQUEST, "cwd must be an absolute path")
    if not 0 <= obj["umask"] <= 0o777:
        raise ProtocolError(E_BAD_REQUEST, "umask out of range")


def signed_bytes(req):
    """The canonical encoding the MAC covers: every field of the request but the MAC."""
    op = req["op"]
    fields = [MAC_DOMAIN, op, req["challenge"], req["nonce"], req["ts"]]
    if "app" in OP_FIELDS[op]:
        secrets = req["secrets"]
        fields += [req["app"] or "", "1" if req["app"] is not None else "0",
                   req["env"] or "", "1" if req["env"] is not None else "0",
                   -1 if secrets is None else len(secrets), *(secrets or ())]
    if op == "release":
        fields.append(req["argv0"])
    if op == "spawn":
        fields += [len(req["argv"]), *req["argv"], len(req["environ"])]
        for name in sorted(req["environ"]):
            fields += [name, req["environ"][name]]
        fields += [req["cwd"], req["umask"]]
    return canonical.encode(*fields)


def hkdf_sha256(ikm, info, length=32, salt=b""):
    """HKDF-SHA256 (RFC 5869), written with the stdlib's hmac: importing cryptography
    costs ~30 ms on every ``ov run --agent``.  tests/test_protocol_kdf.py checks it
    against cryptography's HKDF for arbitrary inputs."""
    prk = hmac.new(salt or bytes(hashlib.sha256().digest_size), ikm,
                   hashlib.sha256).digest()                       # extract
    okm, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):                # expand
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def mac_key(machine_key):
    """The subkey request MACs are made with: the raw machine key is never a MAC key."""
    return hkdf_sha256(machine_key, HKDF_INFO)


def sign(subkey, req):
    """hmac.digest(), unlike hmac.new(), takes the agent's key as a view of its locked
    page (through OpenSSL); a client without OpenSSL passes bytes."""
    return hmac.digest(subkey, signed_bytes(req), hashlib.sha256).hex()


def mac_matches(subkey, req):
    """Constant-time check of req["mac"] (an ASCII string, validated) against subkey."""
    return hmac.compare_digest(sign(subkey, req), req["mac"])


def new_request(op, challenge, **fields):
    """An unsigned request of *op*: the op's fields from *fields*, else defaults."""
    defaults = {"app": None, "env": None, "secrets": None, "argv0": "", "argv": [],
                "environ": {}, "cwd": "/", "umask": 0o022}
    req = {"type": "request", "op": op, "challenge": challenge,
           "nonce": os.urandom(NONCE_BYTES).hex(), "ts": int(time.time()), "mac": None}
    for name in OP_FIELDS[op]:
        req[name] = fields.pop(name, defaults[name])
    if fields:
        raise TypeError(f"{op} requests have no fields {sorted(fields)}")
    return req


def error_frame(code, message, exit_status=None):
    """A refusal; exec-failed carries the exit status the client leaves with."""
    frame = {"type": "error", "code": code, "message": message}
    if exit_status is not None:
        frame["exit_status"] = exit_status
    return frame
