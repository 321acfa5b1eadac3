"""atheris (libFuzzer) target: frame decoding and request verification.

Every input is written to one end of a socketpair and read by the agent's own
``recv_frame``; a frame is then checked as the agent checks it (schema, challenge,
MAC).  Invariants, any breach is a crash that libFuzzer saves:

* the only failures are the protocol's refusals (ProtocolError with a known code,
  EOFError for an empty input), never another exception, a hang or a big allocation;
* a request whose MAC verifies says exactly what a seed request signed (the fuzzer
  does not know the key: anything else would be a forgery);
* no refusal message contains the key, the subkey or a MAC.

Run by hand for as long as you like (``tests/test_fuzz.py`` runs it for a fixed
budget in CI)::

    .venv-pypi/bin/python tests/fuzz_frames.py -max_total_time=600 CORPUS_DIR
"""

import os
import socket
import sys

import atheris

with atheris.instrument_imports():
    from ovagent import canonical, protocol  # noqa: F401  (canonical: instrumented)

KEY = bytes(range(32))                 # a fixed test machine key
SUBKEY = protocol.mac_key(KEY)
CHALLENGE = "c" * 2 * protocol.CHALLENGE_BYTES
# (no E_TIMEOUT: the writer shuts down, so a short frame must end in bad-frame at once)
REFUSALS = {protocol.E_BAD_FRAME, protocol.E_TOO_LARGE, protocol.E_BAD_REQUEST,
            protocol.E_AUTH}
MAX_LEN = 1 << 16


def seed_requests():
    """Valid signed requests, so mutations start past the header and the JSON."""
    status = protocol.new_request("status", CHALLENGE)
    run = protocol.new_request(
        "run", CHALLENGE, app="demo", env="production", secrets=["DB_URL", "API"],
        argv=["/bin/sh", "-c", "exit 3"], environ={"PATH": "/bin", "LANG": "C.UTF-8"},
        cwd="/tmp", umask=0o027)
    unsigned = protocol.new_request("run", CHALLENGE, argv=["/bin/true"])
    for req in (status, run):
        req["mac"] = protocol.sign(SUBKEY, req)
    return [status, run, unsigned]


SEEDS = seed_requests()
SIGNED = {protocol.signed_bytes(req) for req in SEEDS if req["mac"]}
SECRETS = [KEY.hex(), SUBKEY.hex()] + [req["mac"] for req in SEEDS if req["mac"]]


def check(data):
    """One input through the agent's reading and verification steps."""
    reader, writer = socket.socketpair()
    try:
        writer.sendall(data)
        writer.shutdown(socket.SHUT_WR)
        try:
            obj, _ = protocol.recv_frame(reader, timeout=1.0)
            req = protocol.validate_request(obj)
            if req["challenge"] != CHALLENGE or req["mac"] is None:
                return
            if protocol.mac_matches(SUBKEY, req):
                assert protocol.signed_bytes(req) in SIGNED, \
                    "a request the fuzzer built verified: MAC forgery"
        except EOFError:
            assert not data, "EOFError after bytes were sent"
        except protocol.ProtocolError as exc:
            assert exc.code in REFUSALS, f"unexpected refusal code {exc.code}"
            assert not any(secret in str(exc) for secret in SECRETS), \
                "a refusal message carries key material or a MAC"
    finally:
        reader.close()
        writer.close()


def write_seeds(corpus):
    """Seed files: the valid frames, plus header-only and oversize-length frames."""
    os.makedirs(corpus, exist_ok=True)
    frames = [protocol.encode_frame(req) for req in SEEDS]
    frames += [frames[0][:8], b"OV\x01\x00\xff\xff\xff\xff", frames[1] + b"garbage"]
    for index, frame in enumerate(frames):
        with open(os.path.join(corpus, f"seed-{index}"), "wb") as handle:
            handle.write(frame)


def main(argv):
    corpus = next((arg for arg in argv[1:] if not arg.startswith("-")), None)
    if corpus:
        write_seeds(corpus)
    if not any(arg.startswith("-max_len") for arg in argv):
        argv = argv + [f"-max_len={MAX_LEN}"]
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
