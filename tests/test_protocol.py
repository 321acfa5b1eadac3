"""Denials: the agent's side of the wire protocol (docs/protocol.rst), spoken directly
with ovagent.core.protocol against a real agent, plus what crosses the socket."""

import base64
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from helpers import (DEMO_SECRETS, OV, SENTINEL, SETPRIV, RecordingProxy, Session,
                     frame_of, needs_setpriv, protocol, redact, sha256, signed,
                     split_frames, wait_for, wrong_key)


def outcome(reply):
    """'status' / 'released' / 'started' (served), 'error:CODE', or 'closed'."""
    if reply == "closed":
        return "closed"
    if reply["type"] == "error":
        return f"error:{reply['code']}"
    return reply["type"]


def ask(agent, build, fds=(), reply=False):
    """One connection: send build(challenge) (a dict, or raw frame bytes) and
    half-close, so a frame claiming more bytes than were sent ends in EOF instead of
    waiting out the frame deadline.  Returns the outcome (with reply: the frame too)."""
    with Session(agent.socket) as session:
        data = build(session.challenge)
        if isinstance(data, dict):
            data = protocol.encode_frame(data)
        session.send(data, fds)
        try:
            session.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answer = session.answer()
        return (outcome(answer), answer) if reply else outcome(answer)


@pytest.fixture
def null_fds():
    with open(os.devnull, "r+b") as null:
        yield [null.fileno()] * 3


# -- keys and MACs ---------------------------------------------------------------


def test_a_wrong_key_is_refused_auth_failed(agent, tmp_path):
    bad = wrong_key(tmp_path / "wrong.kek")
    result = agent.run("true", key=bad)
    assert result.returncode == 4, redact(result.err)
    assert result.err == ("ov: agent refused the request: request authentication "
                          "failed [auth-failed]\n")
    assert ask(agent, lambda c: signed(bad.read_bytes(), c)) == "error:auth-failed"


def test_unsigned_and_wrongly_bound_requests_are_refused(agent, key):
    other = os.urandom(protocol.CHALLENGE_BYTES).hex()
    bad_mac = lambda c: dict(signed(key, c), mac="0" * 64)  # noqa: E731
    replies = [ask(agent, build, reply=True) for build in (
        lambda c: signed(None, c),           # unsigned
        lambda c: signed(key, other),        # signed for another challenge
        bad_mac)]
    assert [result for result, _ in replies] == ["error:auth-failed"] * 3
    # The same message whatever failed: nothing to learn from the refusal.
    assert len({frame["message"] for _, frame in replies}) == 1
    assert ask(agent, lambda c: signed(key, c)) == "status"


def flip(frame, bit):
    data = bytearray(frame)
    data[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(data)


def bit_flip_outcomes(agent, build, fds=()):
    """Flip every bit of the frame (header and body), one per connection; the golden
    frame is signed anew for each connection's challenge, then a bit is flipped in
    its serialized bytes.  No sampling: ~2,700-2,900 connections take 2-4 s."""
    size = len(protocol.encode_frame(build(os.urandom(protocol.CHALLENGE_BYTES).hex())))
    outcomes = collections.Counter()
    for bit in range(8 * size):
        def tampered(challenge, bit=bit):
            frame = protocol.encode_frame(build(challenge))
            assert len(frame) == size
            return flip(frame, bit)
        result = ask(agent, tampered, fds)
        outcomes[result] += 1
        assert result.startswith("error:") or result == "closed", (bit, result)
    return size, outcomes


def test_every_bit_flip_of_a_signed_status_request_is_refused(agent, key):
    def build(challenge):
        return signed(key, challenge, "status")

    assert ask(agent, build) == "status"                    # the golden frame works
    size, outcomes = bit_flip_outcomes(agent, build)
    assert sum(outcomes.values()) == 8 * size
    assert {"error:auth-failed", "error:bad-frame", "error:bad-request"} <= set(outcomes)
    assert ask(agent, build) == "status"                    # and still does


def test_every_bit_flip_of_a_signed_release_request_is_refused(agent, key):
    """A release request with every MAC-covered field set, so a flip that got past
    authentication would show as 'released'."""
    def build(challenge):
        return signed(key, challenge, "release", app="demo", env="production",
                      secrets=["API_TOKEN"], argv0="/usr/bin/app")

    assert ask(agent, build) == "released"
    size, outcomes = bit_flip_outcomes(agent, build)
    assert sum(outcomes.values()) == 8 * size
    assert ask(agent, build) == "released"


def test_every_bit_flip_of_a_signed_spawn_request_is_refused(agent, key, null_fds):
    """A spawn request with every MAC-covered field set and descriptors attached, so
    a flip that got past authentication would show as 'started'."""
    def build(challenge):
        return signed(key, challenge, "spawn", app="demo", env="production",
                      secrets=["API_TOKEN"], argv=["true", "x"], environ={"A": "b"},
                      cwd="/", umask=0o22)

    assert ask(agent, build, null_fds) == "started"
    size, outcomes = bit_flip_outcomes(agent, build, null_fds)
    assert sum(outcomes.values()) == 8 * size
    assert ask(agent, build, null_fds) == "started"


# -- time, replay, one request per connection -----------------------------------------


def start_of_a_second():
    """Wait until early in a second, so int(time.time()) +- N is N +- a few ms off."""
    fraction = time.time() % 1
    if fraction > 0.3:
        time.sleep(1 - fraction + 0.01)


@pytest.mark.parametrize("offset, expected", [
    (-31, "error:stale"), (31, "error:stale"), (-29, "status"), (29, "status"),
])
def test_timestamps_outside_30_seconds_are_stale(agent, key, offset, expected):
    def build(challenge):
        req = protocol.new_request("status", challenge)
        req["ts"] = int(time.time()) + offset
        req["mac"] = protocol.sign(protocol.mac_key(key), req)
        return req

    start_of_a_second()
    assert ask(agent, build) == expected


def test_a_replayed_frame_is_refused_on_a_new_connection(agent, key):
    with Session(agent.socket) as first:
        frame = protocol.encode_frame(signed(key, first.challenge))
        first.send(frame)
        assert outcome(first.answer()) == "status"
    assert ask(agent, lambda challenge: frame) == "error:auth-failed"


def test_a_second_request_on_one_connection_is_not_served(agent, key):
    with Session(agent.socket) as session:
        session.send(protocol.encode_frame(signed(key, session.challenge)))
        assert outcome(session.answer()) == "status"
        session.send(protocol.encode_frame(signed(key, session.challenge)))
        assert session.answer() == "closed"


def test_a_request_sent_while_a_command_runs_is_not_served(agent, key, null_fds):
    with Session(agent.socket) as session:
        session.send(protocol.encode_frame(signed(
            key, session.challenge, "spawn", argv=["sleep", "0.5"])), null_fds)
        assert outcome(session.answer()) == "started"
        session.send(protocol.encode_frame(signed(key, session.challenge)))
        assert session.answer() == {"type": "exit", "code": 0, "signal": None}
        assert session.answer() == "closed"


# -- framing and schema ---------------------------------------------------------------


def test_an_oversize_frame_is_refused_before_its_body(agent):
    for length in (2**32 - 1, protocol.MAX_FRAME + 1):
        with Session(agent.socket) as session:
            started = time.monotonic()
            session.send(protocol.header(length))  # no body follows
            reply = session.answer(timeout=protocol.FRAME_TIMEOUT / 2)
            assert isinstance(reply, dict) and reply["code"] == "too-large", reply
            assert str(length) in reply["message"]
            assert session.answer(timeout=2) == "closed"
            # Answered at once: it never waited for (or read) the promised body.
            assert time.monotonic() - started < 2


def raw(body):
    return lambda challenge: frame_of(body.replace(b"CHALLENGE", challenge.encode()))


@pytest.mark.parametrize("body, code", [
    (b"", "bad-frame"),
    (b"{", "bad-frame"),
    (b'{"type": "request"', "bad-frame"),
    (b"[]", "bad-frame"),
    (b'"request"', "bad-frame"),
    (b"{}", "bad-frame"),
    (b'{"type": 1}', "bad-frame"),
    (b'{"type": "request", "x": "\xff\xfe"}', "bad-frame"),
    (b'{"type": "request", "ts": NaN}', "bad-frame"),
    (b'{"type": "request", "ts": Infinity}', "bad-frame"),
    (b'{"type": "request", "ts": -Infinity}', "bad-frame"),
    (b'{"type": "request", "ts": 1.5}', "bad-frame"),
    (b'{"type": "request", "ts": 1e3}', "bad-frame"),
    (b'{"type": "request", "ts": 123456789012345678901}', "bad-frame"),
    (b'{"type": "request", "type": "request"}', "bad-frame"),
    (b'{"type": "hello", "challenge": "CHALLENGE"}', "bad-request"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_bodies_are_refused(agent, body, code):
    assert ask(agent, raw(body)) == f"error:{code}"


V = protocol.VERSION


@pytest.mark.parametrize("header", [b"XV" + bytes((V, 0)), b"OV" + bytes((V - 1, 0)),
                                    b"OV" + bytes((V + 1, 0)), b"OV" + bytes((V, 1)),
                                    b"ov" + bytes((V, 0))])
def test_bad_magic_version_or_reserved_byte_is_a_bad_frame(agent, key, header):
    def build(challenge):
        return header + protocol.encode_frame(signed(key, challenge))[4:]
    assert ask(agent, build) == "error:bad-frame"


def signed_text(key, challenge, replace=None, append="", sub=None, op="spawn"):
    """A validly signed request (spawn: it has every field) as JSON text, then edited
    textually."""
    text = protocol.encode_frame(signed(key, challenge, op))[protocol.HEADER_LEN:].decode()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    if sub:
        text, count = re.subn(*sub, text)
        assert count == 1
    if append:
        text = text[:-1] + append + "}"
    return frame_of(text.encode())


@pytest.mark.parametrize("edit, code", [
    ({"append": ',"extra":1'}, "bad-request"),                        # unknown field
    ({"append": ',"op":"status"'}, "bad-frame"),                      # duplicate key
    ({"append": ',"mac":null'}, "bad-frame"),                         # duplicate mac
    ({"replace": ('"cwd":"/",', '')}, "bad-request"),                 # missing field
    ({"replace": ('"umask":18', '"umask":true')}, "bad-request"),     # bool for int
    ({"replace": ('"umask":18', '"umask":4096')}, "bad-request"),     # out of range
    ({"replace": ('"cwd":"/"', '"cwd":"tmp"')}, "bad-request"),       # relative cwd
    ({"replace": ('"op":"spawn"', '"op":"shell"')}, "bad-request"),   # unknown op
    ({"replace": ('"op":"spawn"', '"op":"release"')}, "bad-request"),  # spawn's fields
    ({"op": "status", "append": ',"app":null'}, "bad-request"),       # release's field
    ({"op": "release", "append": ',"cwd":"/"'}, "bad-request"),       # spawn's field
    ({"op": "release", "replace": ('"argv0":"true"', '"argv0":["true"]')},
     "bad-request"),                                                  # list for str
    ({"op": "release", "replace": ('"argv0":"true"', '"argv0":"' + "x" * 4097 + '"')},
     "bad-request"),                                                  # not a path
    ({"replace": ('"argv":["true"]', '"argv":["' + "x" * 4097 + '"]')},
     "bad-request"),                                                  # not a path
    ({"replace": ('"environ":{}', '"environ":{"A=B":"c"}')}, "bad-request"),
    ({"replace": ('"argv":["true"]', '"argv":["a\\u0000b"]')}, "bad-request"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_schema_violations_are_refused(agent, key, edit, code):
    assert ask(agent, lambda c: signed_text(key, c, **edit)) == f"error:{code}"


def test_a_nan_timestamp_in_a_signed_request_is_refused(agent, key):
    nan = (r'"ts":\d+', '"ts":NaN')
    assert ask(agent, lambda c: signed_text(key, c, sub=nan)) == "error:bad-frame"


@pytest.mark.parametrize("count", [0, 1, 4])
def test_a_spawn_request_needs_exactly_three_descriptors(agent, key, count):
    with open(os.devnull, "r+b") as null:
        result = ask(agent, lambda c: signed(key, c, "spawn"), [null.fileno()] * count)
    assert result == "error:bad-request"


@pytest.mark.parametrize("op", ["release", "status"])
def test_release_and_status_requests_carry_no_descriptors(agent, key, op):
    with open(os.devnull, "r+b") as null:
        result = ask(agent, lambda c: signed(key, c, op), [null.fileno()])
    assert result == "error:bad-request"


def test_denials_are_counted(agent, key):
    for _ in range(3):
        assert ask(agent, lambda c: signed(None, c)) == "error:auth-failed"
    with Session(agent.socket) as session:
        reply = session.request(signed(key, session.challenge))
    assert reply["counters"]["denied"] == 3 and reply["counters"]["accepted"] == 0


# -- another uid ------------------------------------------------------------------------

PEER_SCRIPT = """
import json, socket, sys
from ovagent.core import protocol
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
sock.connect(sys.argv[1])
frame, _ = protocol.recv_frame(sock, timeout=5)
print(json.dumps(frame))
"""


@needs_setpriv
def test_a_foreign_uid_is_refused_by_a_non_root_agent(agents, demo):
    """A non-root agent (uid 65534) serves only its uid (and root): uid 65533 gets
    peer-refused before the agent reads a byte, even with the socket opened up."""
    base = Path(tempfile.mkdtemp(prefix="ov-uid-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)          # pytest's tmp_path is 0700: other uids need a way in
        for sub in ("home", "run", "vault"):
            (base / sub).mkdir(mode=0o700)
        (base / "vault" / "vault.db").write_bytes(demo.path.read_bytes())
        key = base / "agent.kek"
        key.write_bytes(demo.key.read_bytes())
        key.chmod(0o600)
        for path in (base / "home", base / "run", base / "vault", base / "vault" / "vault.db",
                     key):
            os.chown(path, 65534, 65534)
        sock = base / "run" / "a.sock"
        env = {"OV_VAULT": str(base / "vault" / "vault.db"), "HOME": str(base / "home")}
        agent = agents.start(key=key, sock=sock, env=env, cwd=base, wrap=[
            SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"])
        assert os.stat(sock).st_uid == 65534
        os.chmod(base / "run", 0o777)
        os.chmod(sock, 0o777)

        def first_frame(uid):
            result = subprocess.run(
                [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 sys.executable, "-c", PEER_SCRIPT, str(sock)],
                check=False, capture_output=True, timeout=30, cwd=base)
            assert result.returncode == 0, result.stderr.decode()
            return json.loads(result.stdout)

        refused = first_frame(65533)
        assert refused["type"] == "error" and refused["code"] == "peer-refused", refused
        assert "uid 65533 may not use this agent (it serves uid 65534)" in refused["message"]
        assert first_frame(65534)["type"] == "hello"       # its own uid is served
        assert first_frame(0)["type"] == "hello"           # and so is root
        assert "peer_uid=65533" in agent.log() and "code=peer-refused" in agent.log()
        # The real client refuses a socket owned by someone else before connecting.
        theirs = base / "65533.kek"
        theirs.write_bytes(demo.key.read_bytes())
        theirs.chmod(0o600)
        os.chown(theirs, 65533, 65533)
        result = subprocess.run(
            [SETPRIV, "--reuid=65533", "--regid=65533", "--clear-groups", OV, "run",
             "--agent", "--socket", str(sock), "--machine-key", str(theirs), "--", "true"],
            check=False, capture_output=True, timeout=30, cwd=base)
        assert result.returncode == 6
        assert b"is owned by uid 65534, neither you nor root" in result.stderr
    finally:
        agents.cleanup()                      # stop the agent before removing its home
        shutil.rmtree(base, ignore_errors=True)


# -- nothing secret crosses the socket -----------------------------------------------


def test_no_secret_key_or_mac_crosses_the_socket_or_reaches_the_log(agent, demo, tmp_path,
                                                                    key):
    """Everything between client and agent goes through a recording proxy (passing
    the SCM_RIGHTS descriptors on): runs in place and with --spawn that use every
    secret, a status request, refusals.  Neither direction may carry a secret value
    or the machine key (released secrets travel sealed); no answer and no log line
    may carry a MAC or the MAC subkey."""
    proxy = RecordingProxy(tmp_path / "p.sock", agent.socket)
    via = tmp_path / "p.sock"
    try:
        result = agent.run("sh", "-c", 'printf %s "$DB_URL" | sha256sum; '
                           'printf %s "$API_TOKEN" | sha256sum >&2; exit 3', via=via)
        assert result.returncode == 3
        assert result.out.split()[0] == sha256(DEMO_SECRETS["DB_URL"])
        assert result.err.split()[0] == sha256(DEMO_SECRETS["API_TOKEN"])
        spawned = agent.run("sh", "-c", 'printf %s "$DB_URL" | sha256sum', via=via,
                            options=["--spawn"])
        assert spawned.out.split()[0] == sha256(DEMO_SECRETS["DB_URL"])
        assert agent.run("true", options=["--secrets", "DB_URL"], via=via).returncode == 0
        assert agent.run("true", options=["--secrets", "NOPE"], via=via).returncode == 3
        assert agent.run("no-such-command-ov", via=via).returncode == 127
        assert agent.run("true", key=wrong_key(tmp_path / "w.kek"), via=via).returncode == 4
        assert agent.status(via=via).returncode == 0
        wait_for(lambda: agent.log().count("released:") >= 3 and
                 agent.log().count("exited:") >= 1, "the runs' audit records")
        proxy.join()                          # every relayed connection has ended
    finally:
        proxy.close()
    assert proxy.fds_relayed == 3
    assert bytes(proxy.to_client).count(b'"type":"released"') >= 3
    to_agent, to_client = bytes(proxy.to_agent), bytes(proxy.to_client)
    log = agent.log_path.read_bytes()
    subkey = protocol.mac_key(key)
    macs = [mac.encode() for mac in _macs(to_agent)]
    assert len(macs) >= 6
    needles = [(f"the value of {n}", v.encode()) for n, v in DEMO_SECRETS.items() if v]
    needles += [("the sentinel", SENTINEL.encode()), ("the machine key", key),
                ("the machine key in hex", key.hex().encode()), ("the MAC subkey", subkey),
                ("the MAC subkey in hex", subkey.hex().encode())]
    macs = [(f"request MAC #{i}", mac) for i, mac in enumerate(macs)]
    for name, data, forbidden in (("client -> agent", to_agent, needles),
                                  ("agent -> client", to_client, needles + macs),
                                  ("the agent's log", log, needles + macs)):
        # Only labels reach the assertion message, never the bytes themselves.
        found = [label for label, needle in forbidden if data.find(needle) != -1]
        assert found == [], f"found in {name}"


def _macs(stream):
    """The mac field of every request in a recorded client -> agent byte stream."""
    frames = [reader.frame() for reader in split_frames(stream)]
    return [frame["mac"] for frame in frames
            if frame.get("type") == "request" and frame.get("mac")]


# -- the sealed reply, from the client's side -----------------------------------------


def frames_of(stream):
    """The frames of a recorded byte stream, as raw bytes each."""
    return [bytes(reader.data) for reader in split_frames(stream)]


class FakeAgent:
    """A socket that answers each connection like an agent, with frames of the test's
    choosing: *hello* (raw frame bytes), then reply(request) (raw bytes)."""

    def __init__(self, path, hello, reply):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.hello, self.reply = hello, reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.hello)
                try:
                    request, fds = protocol.recv_frame(conn, want_fds=True)
                except (EOFError, protocol.ProtocolError, OSError):
                    continue
                for fd in fds:
                    os.close(fd)
                conn.sendall(self.reply(request))

    def close(self):
        self.listener.close()


def captured_release(agent, tmp_path):
    """The agent's (hello, released) frames of one real in-place run, recorded."""
    proxy = RecordingProxy(tmp_path / "rec.sock", agent.socket)
    try:
        result = agent.run("true", via=tmp_path / "rec.sock")
        assert result.returncode == 0, redact(result.err)
        proxy.join()
    finally:
        proxy.close()
    hello, released = frames_of(bytes(proxy.to_client))
    assert b'"type":"released"' in released
    return hello, released


def fresh_hello():
    return protocol.encode_frame({"type": "hello", "version": protocol.VERSION,
                                  "agent": "fake", "challenge": os.urandom(32).hex()})


def flip_sealed(released, bit):
    frame = protocol.decode_body(released[protocol.HEADER_LEN:])
    sealed = bytearray(base64.b64decode(frame["sealed"]))
    sealed[bit // 8 % len(sealed)] ^= 1 << (bit % 8)
    return protocol.encode_frame(dict(frame, sealed=base64.b64encode(sealed).decode()))


def cut_sealed(released, keep):
    frame = protocol.decode_body(released[protocol.HEADER_LEN:])
    sealed = base64.b64decode(frame["sealed"])[:keep]
    return protocol.encode_frame(dict(frame, sealed=base64.b64encode(sealed).decode()))


TAMPERINGS = {
    # The whole recorded answer replayed to a new connection: the old challenge, so
    # the client's request differs (its nonce) and the seal is for another request.
    "replayed-whole": lambda hello, released: (hello, lambda req: released),
    # A fresh challenge, then the recorded seal.
    "replayed-seal": lambda hello, released: (fresh_hello(), lambda req: released),
    "bit-flipped": lambda hello, released: (hello, lambda req: flip_sealed(released, 77)),
    "truncated": lambda hello, released: (hello, lambda req: cut_sealed(released, 20)),
    "without-tag": lambda hello, released: (hello, lambda req: cut_sealed(released, -32)),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_forged_or_replayed_sealed_reply_runs_nothing(agent, tmp_path, tampering):
    """Whoever answers on the socket, only a reply sealed to this very request opens:
    a replayed, cut or flipped one is refused before any byte of it is used, and the
    command never runs."""
    hello, released = captured_release(agent, tmp_path)
    fake = FakeAgent(tmp_path / "fake.sock", *TAMPERINGS[tampering](hello, released))
    marker = tmp_path / "ran"
    try:
        result = agent.run("touch", str(marker), via=tmp_path / "fake.sock")
    finally:
        fake.close()
    assert result.returncode == 6, redact(result.err)
    assert "refusing the agent's answer" in result.err, redact(result.err)
    assert "Traceback" not in result.err
    assert not marker.exists()


def test_a_reply_sealed_for_another_key_runs_nothing(agent, demo, tmp_path):
    """The agent holds the unscoped key; a client signing with the key scoped to the
    app gets a reply only that scoped key opens.  Opening it with another key (the
    reply replayed to a holder of a different key) fails."""
    hello, released = captured_release(agent, tmp_path)
    fake = FakeAgent(tmp_path / "fake.sock", hello, lambda req: released)
    try:
        result = agent.run("touch", str(tmp_path / "ran"), key=demo.scoped_key,
                           via=tmp_path / "fake.sock")
    finally:
        fake.close()
    assert result.returncode == 6 and "refusing the agent's answer" in result.err
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("exit_frame", [{"type": "exit", "code": "0", "signal": None},
                                        {"type": "exit", "code": None, "signal": None},
                                        {"type": "exit", "code": 300, "signal": 0}],
                         ids=["string", "nothing", "out-of-range"])
def test_a_malformed_exit_frame_is_a_one_line_error(agent, tmp_path, exit_frame):
    """--spawn: whatever answers on the socket, a bad exit frame gives exit 6 and
    one line, never a traceback or a made-up status."""
    def reply(request):
        return (protocol.encode_frame({"type": "started", "pid": 1, "request_id": "x"})
                + protocol.encode_frame(exit_frame))
    fake = FakeAgent(tmp_path / "fake.sock", fresh_hello(), reply)
    try:
        result = agent.run("true", options=["--spawn"], via=tmp_path / "fake.sock")
    finally:
        fake.close()
    assert result.returncode == 6, redact(result.err)
    assert result.err == "ov: bad answer from the agent: an exit frame without a status\n"


BROKEN_JSON = """
from ovagent.core import protocol
try:
    protocol.decode_body(b'{"type"z"request"}')
except protocol.ProtocolError as exc:
    print(exc.code)
"""


def test_broken_json_is_a_bad_frame_where_json_was_never_imported():
    """Python 3.11's _json reports some syntax errors through json.decoder, which it
    looks up without importing: the client, which never imports json, got a
    SystemError (found by tests/fuzz_frames.py)."""
    result = subprocess.run([sys.executable, "-S", "-c", BROKEN_JSON], capture_output=True,
                            text=True, timeout=30, env=dict(
                                os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert (result.returncode, result.stdout.strip()) == (0, "bad-frame"), result.stderr
