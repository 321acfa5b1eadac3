"""A hypothesis state machine over sessions with one real agent: connect, send valid,
forged and garbage release and spawn requests, replay captured frames (same
connection, new connection, after a restart), step the client's clock.

Invariants after every step: the agent is alive; the commands that ran are exactly
the valid, fresh spawn requests the model sent (each command appends a line to a
marker file); secrets were released exactly to the valid, fresh release requests,
sealed so that they open with the request's key; no response and no line of the
agent's log holds a secret value, the key or a MAC the test sent.
"""

import base64
import os
import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from helpers import DEMO_SECRETS, SENTINEL, Session, protocol, redact, signed
from ovagent.core import seal

OPS = st.sampled_from(["spawn", "release"])
SERVED = {"spawn": "started", "release": "released"}

# The client reads its clock, the agent reads its own a little later: allow this much
# between the two before deciding that a timestamp must have been accepted or refused.
AGENT_DELAY = 1.0
SKEWS = st.one_of(st.sampled_from([0, -29, 29, -30, 30, -31, 31, -3600, 3600]),
                  st.integers(-120, 120))


def expected_freshness(sent_at, ts):
    """'fresh', 'stale', or None when the agent's own clock reading decides."""
    early, late = abs(sent_at - ts), abs(sent_at + AGENT_DELAY - ts)
    if max(early, late) <= protocol.CLOCK_WINDOW:
        return "fresh"
    if min(early, late) > protocol.CLOCK_WINDOW:   # (1 s cannot straddle a 60 s window)
        return "stale"
    return None


def kind(reply):
    if reply == "closed":
        return "closed"
    return f"error:{reply['code']}" if reply["type"] == "error" else reply["type"]


def test_sessions_keep_their_invariants(agents, demo, tmp_path):
    key = demo.key.read_bytes()
    marker = tmp_path / "spawned"
    marker.touch()
    state = {"agent": agents.start(), "spawns": 0, "releases": 0, "frames": [],
             "replies": [], "macs": []}
    null = os.open(os.devnull, os.O_RDWR)
    forbidden = [SENTINEL, key.hex(), protocol.mac_key(key).hex()] + \
        [value for value in DEMO_SECRETS.values() if len(value) >= 6]

    class Sessions(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.skew = 0

        def _request(self, session, op, signing_key=key):
            sent_at = time.time()
            if op == "spawn":
                req = signed(signing_key, session.challenge, op,
                             argv=["/bin/sh", "-c", f"echo x >> {marker}"],
                             environ={"PATH": "/usr/bin:/bin"}, cwd="/")
            else:
                req = signed(signing_key, session.challenge, op, argv0="/bin/sh")
            req["ts"] = int(sent_at) + self.skew
            if signing_key is not None:
                req["mac"] = protocol.sign(protocol.mac_key(signing_key), req)
                state["macs"].append(req["mac"])
            return req, sent_at

        def _finish(self, session, reply, req=None):
            """Record the reply; after 'started', wait for the exit and count a spawn;
            a 'released' reply must open with the key of *req* and count a release."""
            state["replies"].append(repr(reply))
            if kind(reply) == "released":
                sealed = base64.b64decode(reply["sealed"])
                values = seal.decode_secrets(seal.open_sealed(protocol.mac_key(key), req,
                                                              sealed))
                assert values == {n: v.encode() for n, v in DEMO_SECRETS.items()}
                state["releases"] += 1
            if kind(reply) != "started":
                return kind(reply)
            end = session.answer(timeout=10)
            state["replies"].append(repr(end))
            assert end == {"type": "exit", "code": 0, "signal": None}, redact(repr(end))
            state["spawns"] += 1
            return "started"

        @initialize()
        def one_valid_request_of_each_op(self):
            """Whatever else the machine draws, both flows are exercised."""
            for op in SERVED:
                self.valid_request(op, replay_here=False)

        @rule(op=OPS, replay_here=st.booleans())
        def valid_request(self, op, replay_here):
            fds = [null] * 3 if op == "spawn" else []
            with Session(state["agent"].socket) as session:
                req, sent_at = self._request(session, op)
                frame = protocol.encode_frame(req)
                session.send(frame, fds)
                got = self._finish(session, session.answer(timeout=10), req)
                freshness = expected_freshness(sent_at, req["ts"])
                if freshness == "fresh":
                    assert got == SERVED[op], (self.skew, got)
                elif freshness == "stale":
                    assert got == "error:stale", (self.skew, got)
                else:
                    assert got in (SERVED[op], "error:stale"), (self.skew, got)
                state["frames"].append((frame, fds))
                if replay_here and got == SERVED[op]:
                    session.send(frame, fds)             # same connection: not served
                    assert self._finish(session, session.answer()) == "closed"

        @rule(op=OPS, forgery=st.sampled_from(["wrong-key", "unsigned", "flipped-mac",
                                               "other-challenge"]))
        def forged_request(self, op, forgery):
            with Session(state["agent"].socket) as session:
                req, _ = self._request(
                    session, op, os.urandom(32) if forgery == "wrong-key" else
                    None if forgery == "unsigned" else key)
                if forgery == "flipped-mac":
                    req["mac"] = ("0" if req["mac"][0] != "0" else "1") + req["mac"][1:]
                if forgery == "other-challenge":
                    req["challenge"] = "f" * len(req["challenge"])
                session.send(protocol.encode_frame(req), [null] * 3 if op == "spawn" else [])
                assert self._finish(session, session.answer()) in (
                    "error:auth-failed", "error:stale"), forgery

        @rule(pick=st.integers(min_value=0, max_value=1 << 16))
        def replay_on_a_new_connection(self, pick):
            """Any frame sent so far, also by an earlier agent (a replay after restart).
            (An index, not sampled_from: the list grows outside hypothesis' view.)"""
            if not state["frames"]:
                return
            frame, fds = state["frames"][pick % len(state["frames"])]
            with Session(state["agent"].socket) as session:
                session.send(frame, fds)
                assert self._finish(session, session.answer()) in (
                    "error:auth-failed", "error:stale")

        @rule(garbage=st.binary(max_size=64))
        def garbage(self, garbage):
            with Session(state["agent"].socket) as session:
                session.send(garbage)
                session.sock.shutdown(2 if not garbage else 1)   # SHUT_RDWR / SHUT_WR
                if garbage:
                    assert self._finish(session, session.answer()) != "started"

        @rule(skew=SKEWS)
        def clock_step(self, skew):
            self.skew = skew

        @rule()
        def restart(self):
            old = state["agent"]
            assert old.terminate() == 0, redact(old.log())
            state["agent"] = agents.start(sock=old.socket)

        @invariant()
        def agent_alive_and_spawns_match(self):
            agent = state["agent"]
            assert agent.proc.poll() is None, redact(agent.log())
            assert len(marker.read_text().splitlines()) == state["spawns"]

        @invariant()
        def nothing_secret_in_replies_or_logs(self):
            texts = state["replies"] + [agent.log() for agent in agents.agents]
            for text in texts:
                for secret in forbidden + state["macs"]:
                    assert secret not in text, "a secret, key or MAC leaked"

    try:
        run_state_machine_as_test(Sessions, settings=settings(
            max_examples=25, stateful_step_count=15, deadline=None))
    finally:
        os.close(null)
    assert state["spawns"] > 0 and state["releases"] > 0, \
        "the machine never ran a valid spawn and release request"
    print(f"session machine: {state['spawns']} commands, {state['releases']} releases, "
          f"{len(state['replies'])} replies, {len(agents.agents)} agent starts")
