"""atheris (libFuzzer) target: frame decoding and request verification, as the agent
does them.

An input is a control byte and a byte stream.  The stream goes down a socketpair in
one or two writes, each of which may carry /dev/null descriptors as SCM_RIGHTS (see
deliver), and the agent's own ``recv_frame(want_fds=True)`` reads it; a frame is then
checked in Agent._authenticate's order (schema, challenge, MAC).  Invariants, any
breach is a crash that libFuzzer saves:

* the only failures are the protocol's refusals (ProtocolError with a framing or
  schema code, EOFError for an empty stream): no other exception, hang or big
  allocation;
* a refusal can be sent back (its error frame fits), quotes the input only in short
  excerpts (it also goes to the audit log) and never contains the key or the subkey;
* no descriptor leaks, and at most MAX_FDS come back;
* a request that passes the schema can be signed (its strings encode for the MAC as
  they do for os.fsencode, which the agent uses to run it);
* a request whose MAC verifies means exactly what a seed request meant: the fuzzer
  does not know the key, so anything else is a forgery;
* the stream, read as the sealed reply to the seed release request, opens only if it
  is exactly the seed's sealed reply (anything else that opened would be a forged
  seal), and otherwise fails only with SealError.

Run by hand for as long as you like (``tests/test_fuzz.py`` runs it for a fixed
budget in CI); libFuzzer's arguments pass through, and the first corpus directory
(a temporary one if none is given) gets the seed inputs::

    .venv-pypi/bin/python tests/fuzz_frames.py -max_total_time=600 CORPUS_DIR
    .venv-pypi/bin/python tests/fuzz_frames.py crash-FILE      # replay one input
"""

import array
import hmac
import os
import socket
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from ovagent.core import canonical, protocol, seal  # noqa: F401  (canonical: instrumented)

KEY = bytes(range(32))                 # a fixed test machine key
SUBKEY = protocol.mac_key(KEY)
CHALLENGE = "c" * 2 * protocol.CHALLENGE_BYTES
# No E_TIMEOUT: the writer shuts down first, so a short frame ends in bad-frame at once.
REFUSALS = {protocol.E_BAD_FRAME, protocol.E_TOO_LARGE, protocol.E_BAD_REQUEST,
            protocol.E_AUTH}
MAX_MESSAGE = 200          # refusals quote the input in excerpts (protocol._excerpt)
MAX_STREAM = 1 << 16       # fits the socket buffer: a bigger blocking write would hang
NULL_FD = os.open(os.devnull, os.O_RDONLY)


def seed_requests():
    """Valid requests, so mutations start past the header, the JSON and the MAC; with a
    fixed nonce and time, so that a corpus kept from an earlier run holds no valid MAC
    this run's SIGNED lacks."""
    status = protocol.new_request("status", CHALLENGE)
    release = protocol.new_request("release", CHALLENGE, app="demo", env="production",
                                   secrets=["DB_URL", "API"], argv0="/usr/bin/caf\udce9")
    spawn = protocol.new_request(
        "spawn", CHALLENGE, app="demo", env="production", secrets=["DB_URL", "API"],
        argv=["/bin/sh", "-c", "exit 3", "caf\udce9"],      # a non-UTF-8 byte, escaped
        environ={"PATH": ":".join(f"/opt/tool{n}/bin" for n in range(40)),
                 "LANG": "C.UTF-8", "NAME": "\udcff"}, cwd="/tmp",
        umask=0o027)
    unsigned = protocol.new_request("spawn", CHALLENGE, argv=["/bin/true"])
    for req in (status, release, spawn, unsigned):
        req.update(nonce="5eed" * (protocol.NONCE_BYTES // 2), ts=1_700_000_000)
    for req in (status, release, spawn):
        req["mac"] = protocol.sign(SUBKEY, req)
    return status, release, spawn, unsigned


def meaning(req):
    """What the agent acts on: everything but the MAC."""
    return {key: value for key, value in req.items() if key != "mac"}


SEEDS = seed_requests()
SIGNED = {protocol.signed_bytes(req): meaning(req) for req in SEEDS if req["mac"]}
SECRETS = (KEY.hex(), SUBKEY.hex())
RELEASE = SEEDS[1]
SEALED = seal.seal(SUBKEY, RELEASE, seal.encode_secrets({"DB_URL": b"postgres://x",
                                                         "API": b""}))


def deliver(writer, control, stream):
    """Write stream as the control byte says, then shut the writer down: bits 5-7 cut
    it after 2*n bytes (n = 0: one write), bits 0-2 count the descriptors sent with the
    first write and bits 3-4 those sent with the second."""
    cut = 2 * (control >> 5) or len(stream)
    for part, count in ((stream[:cut], control & 7), (stream[cut:], control >> 3 & 3)):
        if part and count:
            fds = array.array("i", [NULL_FD] * count)
            part = part[writer.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 fds)]):]
        writer.sendall(part)
    writer.shutdown(socket.SHUT_WR)


def control_byte(first_fds=0, second_fds=0, cut=0):
    """The control byte deliver reads (cut: an even count of bytes, below 16)."""
    return first_fds | second_fds << 3 | cut // 2 << 5


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def authenticate(obj):
    """Agent._authenticate's checks that need no agent state (not the vault, the
    clock window or the nonce cache)."""
    req = protocol.validate_request(obj)
    protocol.signed_bytes(req)          # what a client signs and the agent runs encodes
    if not hmac.compare_digest(req["challenge"], CHALLENGE) or req["mac"] is None:
        return
    if protocol.mac_matches(SUBKEY, req):
        assert SIGNED.get(protocol.signed_bytes(req)) == meaning(req), \
            "a request the fuzzer built verified: MAC forgery"


def check_refusal(exc):
    message = str(exc)
    assert exc.code in REFUSALS, f"unexpected refusal code {exc.code}"
    protocol.encode_frame(protocol.error_frame(exc.code, message))
    assert len(message) <= MAX_MESSAGE, \
        f"a refusal of {len(message)} characters: {message[:MAX_MESSAGE]}..."
    assert not any(secret in message for secret in SECRETS), \
        "a refusal message carries key material"


def check_seal(stream):
    """The stream as a sealed reply to the seed release request (the client's side)."""
    try:
        opened = seal.open_sealed(SUBKEY, RELEASE, stream)
    except seal.SealError:
        return
    assert stream == SEALED, "a sealed reply the fuzzer built opened: seal forgery"
    seal.decode_secrets(opened)


def check(data):
    """One input through the agent's reading and verification steps, and through the
    client's opening of a sealed reply."""
    control, stream = (data[0], data[1:MAX_STREAM + 1]) if data else (0, b"")
    before = open_fds() if control & 0x1f else None
    reader, writer = socket.socketpair()
    fds = []
    try:
        deliver(writer, control, stream)
        try:
            obj, fds = protocol.recv_frame(reader, timeout=1.0, want_fds=True)
            assert len(fds) <= protocol.MAX_FDS, f"{len(fds)} descriptors accepted"
            authenticate(obj)
        except EOFError:
            assert not stream, "EOFError after bytes were sent"
        except protocol.ProtocolError as exc:
            check_refusal(exc)
    finally:
        for fd in fds:
            os.close(fd)
        reader.close()
        writer.close()
    if before is not None:
        assert open_fds() == before, f"descriptors leaked: {open_fds() - before}"
    check_seal(stream)


def write_seeds(corpus):
    """Seed inputs (control byte + stream): the valid frames, with and without
    descriptors and cut inside and after the header, the hello, a truncated and an
    oversized frame, trailing garbage and too many descriptors."""
    status, release, run, unsigned = (protocol.encode_frame(req) for req in SEEDS)
    hello = protocol.encode_frame({"type": "hello", "version": protocol.VERSION,
                                   "agent": "ov-agent fuzz", "challenge": CHALLENGE})
    byte = control_byte
    inputs = [(byte(), status), (byte(3), run), (byte(3), unsigned), (byte(), hello),
              (byte(), release), (byte(), SEALED), (byte(), SEALED[:-1]),
              (byte(), status[:8]), (byte(), status[:4] + b"\xff\xff\xff\xff"),
              (byte(3), run + b"garbage"), (byte(5), status), (byte(3, cut=8), run),
              (byte(0, 3, cut=8), run), (byte(2, 1, cut=4), run), (byte(cut=14), status)]
    os.makedirs(corpus, exist_ok=True)
    for index, (control, stream) in enumerate(inputs):
        with open(os.path.join(corpus, f"seed-{index}"), "wb") as handle:
            handle.write(bytes((control,)) + stream)


def main(argv):
    paths = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not any(os.path.isfile(path) for path in paths):      # not replaying inputs
        if not paths:
            paths = [tempfile.mkdtemp(prefix="ov-fuzz-corpus-")]
            argv = argv + paths
            print(f"fuzz_frames: corpus in {paths[0]}", file=sys.stderr)
        write_seeds(paths[0])
    if not any(arg.startswith("-max_len=") for arg in argv):
        argv = argv + [f"-max_len={MAX_STREAM + 1}"]
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
