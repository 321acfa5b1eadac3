"""A hypothesis state machine over sessions with one real agent: connect, send valid,
forged and garbage requests, replay captured frames (same connection, new
connection, after a restart), step the client's clock.

Invariants after every step: the agent is alive; the commands that ran are exactly
the valid, fresh requests the model sent (each command appends a line to a marker
file); no response and no line of the agent's log holds a secret value, the key or
a MAC the test sent.
"""

import os
import time

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from agent_fixtures import *  # noqa: F403 (the fixtures agents, agent)
from agent_fixtures import DEMO_SECRETS, SENTINEL, Session, protocol, redact, signed

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
    state = {"agent": agents.start(), "spawns": 0, "frames": [], "replies": [], "macs": []}
    null = os.open(os.devnull, os.O_RDWR)
    forbidden = [SENTINEL, key.hex(), protocol.mac_key(key).hex()] + \
        [value for value in DEMO_SECRETS.values() if len(value) >= 6]

    class Sessions(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.skew = 0

        def _run_request(self, session, signing_key=key):
            sent_at = time.time()
            req = signed(signing_key, session.challenge, "run",
                         argv=["/bin/sh", "-c", f"echo x >> {marker}"],
                         environ={"PATH": "/usr/bin:/bin"}, cwd="/")
            req["ts"] = int(sent_at) + self.skew
            if signing_key is not None:
                req["mac"] = protocol.sign(protocol.mac_key(signing_key), req)
                state["macs"].append(req["mac"])
            return req, sent_at

        def _finish(self, session, reply):
            """Record the reply; after 'started', wait for the exit and count a spawn."""
            state["replies"].append(repr(reply))
            if kind(reply) != "started":
                return kind(reply)
            end = session.answer(timeout=10)
            state["replies"].append(repr(end))
            assert end == {"type": "exit", "code": 0, "signal": None}, redact(repr(end))
            state["spawns"] += 1
            return "started"

        @rule(replay_here=st.booleans())
        def valid_request(self, replay_here):
            with Session(state["agent"].socket) as session:
                req, sent_at = self._run_request(session)
                frame = protocol.encode_frame(req)
                session.send(frame, [null] * 3)
                got = self._finish(session, session.answer(timeout=10))
                freshness = expected_freshness(sent_at, req["ts"])
                if freshness == "fresh":
                    assert got == "started", (self.skew, got)
                elif freshness == "stale":
                    assert got == "error:stale", (self.skew, got)
                else:
                    assert got in ("started", "error:stale"), (self.skew, got)
                state["frames"].append(frame)
                if replay_here and got == "started":
                    session.send(frame, [null] * 3)      # same connection: not served
                    assert self._finish(session, session.answer()) == "closed"

        @rule(forgery=st.sampled_from(["wrong-key", "unsigned", "flipped-mac",
                                       "other-challenge"]))
        def forged_request(self, forgery):
            with Session(state["agent"].socket) as session:
                req, _ = self._run_request(
                    session, os.urandom(32) if forgery == "wrong-key" else
                    None if forgery == "unsigned" else key)
                if forgery == "flipped-mac":
                    req["mac"] = ("0" if req["mac"][0] != "0" else "1") + req["mac"][1:]
                if forgery == "other-challenge":
                    req["challenge"] = "f" * len(req["challenge"])
                session.send(protocol.encode_frame(req), [null] * 3)
                assert self._finish(session, session.answer()) in (
                    "error:auth-failed", "error:stale"), forgery

        @rule(pick=st.integers(min_value=0, max_value=1 << 16))
        def replay_on_a_new_connection(self, pick):
            """Any frame sent so far, also by an earlier agent (a replay after restart).
            (An index, not sampled_from: the list grows outside hypothesis' view.)"""
            if not state["frames"]:
                return
            frame = state["frames"][pick % len(state["frames"])]
            with Session(state["agent"].socket) as session:
                session.send(frame, [null] * 3)
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
    assert state["spawns"] > 0, "the machine never ran a valid request"
    print(f"session machine: {state['spawns']} commands, {len(state['replies'])} replies, "
          f"{len(agents.agents)} agent starts")
