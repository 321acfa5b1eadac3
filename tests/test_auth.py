"""The agent's checks and its audit trail, in-process and in milliseconds: a fake
clock and a fake journal sender are injected (as python-systemd's own tests fake
theirs), so every branch of authenticate() and of Audit is reached without an agent,
a socket or journald.  The end-to-end versions are in test_protocol.py."""

import base64
import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import DEMO_SECRETS
from ovagent.core import audit as audit_module
from ovagent.agent.denials import Denials
from ovagent.core.audit import Audit, escaped, journal_sender
from ovagent.agent.auth import UNSIGNED_RELEASE, KeyState, authenticate
from ovagent.agent.release import release
from ovagent.agent.server import giving_way
from ovagent.agent.state import AgentState
from ovagent.core import keyfile, protocol, seal
from ovagent.core.vault import Vault

CHALLENGE = "c" * 2 * protocol.CHALLENGE_BYTES
NOW = 1_800_000_000


class Peer:
    def __init__(self, uid=os.geteuid(), unit="caller.service"):
        self.pid, self.uid, self.gid, self.unit = 4242, uid, 100, unit
        self.groups, self.manager_uid, self.located = (), None, True
        self.cgroup = None
        self.owner = f"uid {uid}"

    def fields(self):
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid,
                "peer_unit": self.unit or "none"}


class Journal:
    """A journal sender that keeps the records (or fails, as journald may)."""

    def __init__(self, fail=False):
        self.records, self.fail = [], fail

    def __call__(self, MESSAGE, **fields):
        if self.fail:
            raise OSError("journald is gone")
        self.records.append(dict(MESSAGE=MESSAGE, **fields))


def state_with(raw_key=b"k" * 32, mode="machine-key", vault=object(), keyring=None,
               clock=lambda: NOW, journal=None):
    keys = KeyState(vault, keyring, mode, None if vault else "no vault yet",
                    protocol.mac_key(raw_key) if raw_key else None)
    return AgentState(keys, default_app="demo", audit=Audit(journal or Journal()),
                      clock=clock)


def request(op="status", key=b"k" * 32, challenge=CHALLENGE, ts=NOW, **fields):
    req = protocol.new_request(op, challenge, **fields)
    req["ts"] = ts
    if key is not None:
        req["mac"] = protocol.sign(protocol.mac_key(key), req)
    return req


def refusal(state, req, peer=None, challenge=CHALLENGE):
    with pytest.raises(protocol.ProtocolError) as refused:
        authenticate(state, req, challenge, peer or Peer())
    return refused.value


def test_a_signed_request_is_verified_with_its_subkey():
    req, subkey = authenticate(state_with(), request(), CHALLENGE, Peer())
    assert subkey == protocol.mac_key(b"k" * 32) and req["op"] == "status"


@pytest.mark.parametrize("offset, code", [(-31, "stale"), (31, "stale"), (-30, None),
                                          (30, None)])
def test_the_clock_window_is_thirty_seconds_either_way(offset, code):
    req = request(ts=NOW + offset)
    if code is None:
        assert authenticate(state_with(), req, CHALLENGE, Peer())
    else:
        assert refusal(state_with(), req).code == code


def test_a_nonce_is_served_once():
    state, req = state_with(), request()
    authenticate(state, dict(req), CHALLENGE, Peer())
    assert refusal(state, dict(req)).code == protocol.E_REPLAY


@pytest.mark.parametrize("case", ["other challenge", "other key", "flipped mac",
                                  "unsigned"])
def test_every_authentication_failure_reads_the_same(case):
    req = {"other challenge": lambda: request(challenge="d" * 64),
           "other key": lambda: request(key=b"x" * 32),
           "flipped mac": lambda: dict(request(), mac="0" * 64),
           "unsigned": lambda: request(key=None)}[case]()
    error = refusal(state_with(), req)
    assert (error.code, str(error)) == (protocol.E_AUTH, "request authentication failed")


def test_an_unsigned_release_is_refused_saying_what_would_work():
    state = state_with(mode="interactive")
    error = refusal(state, request("release", key=None, argv0="app"))
    assert (error.code, str(error)) == (protocol.E_AUTH, UNSIGNED_RELEASE)


def test_interactive_mode_takes_unsigned_spawns_from_its_own_uid_only():
    state = state_with(mode="interactive")
    req = request("spawn", key=None, argv=["true"])
    assert authenticate(state, dict(req), CHALLENGE, Peer())[1] is None
    assert refusal(state, request("spawn", key=None, argv=["true"]),
                   Peer(uid=os.geteuid() + 1)).code == protocol.E_AUTH
    assert refusal(state_with(), request("spawn", key=None, argv=["true"])).code == \
        protocol.E_AUTH                      # a keyed agent never takes unsigned ones


def test_an_unconfigured_agent_answers_status_and_refuses_the_rest():
    state = state_with(raw_key=None, mode="unconfigured", vault=None)
    assert authenticate(state, request(key=None), CHALLENGE, Peer())[1] is None
    error = refusal(state, request("release", argv0="app"))
    assert (error.code, str(error)) == (protocol.E_UNCONFIGURED, "no vault yet")


# -- release, and its audit record ---------------------------------------------------


@pytest.fixture
def vault_state(demo):
    key = keyfile.read_key(demo.key)
    vault = Vault.open(demo.path)
    journal = Journal()
    return state_with(key, vault=vault, keyring=vault.unlock_key(key),
                      journal=journal), journal, key


def test_a_release_opens_for_its_signer_and_is_recorded_without_values(vault_state):
    state, journal, key = vault_state
    req, subkey = authenticate(state, request("release", key=key, argv0="/usr/bin/app",
                                              secrets=["DB_URL", "API_TOKEN"]),
                               CHALLENGE, Peer())
    frame = protocol.decode_body(release(state, Peer(), req, subkey, "r1")
                                 [protocol.HEADER_LEN:])
    opened = seal.decode_secrets(seal.open_sealed(
        protocol.mac_key(key), req, base64.b64decode(frame["sealed"])))
    assert opened == {name: DEMO_SECRETS[name].encode() for name in ("DB_URL", "API_TOKEN")}
    [record] = journal.records
    assert record["MESSAGE_ID"] == audit_module.MESSAGE_IDS["released"]
    assert (record["SECRETS"], record["VERSIONS"]) == ("API_TOKEN,DB_URL",
                                                       "API_TOKEN=1,DB_URL=1")
    assert (record["COMMAND"], record["PEER_UNIT"], record["REQUEST_ID"]) == \
        ("/usr/bin/app", "caller.service", "r1")
    assert not any(value in str(record) for value in DEMO_SECRETS.values() if value)
    assert state.counters["released"] == 1


def test_no_audit_sink_means_nothing_is_released(vault_state, monkeypatch):
    state, _, key = vault_state
    state.audit = Audit(Journal(fail=True))
    monkeypatch.setattr(audit_module.sys, "stderr", open(os.devnull, "w"))
    audit_module.sys.stderr.close()          # stderr gone too: no sink at all
    req, subkey = authenticate(state, request("release", key=key, argv0="app"),
                               CHALLENGE, Peer())
    with pytest.raises(protocol.ProtocolError) as refused:
        release(state, Peer(), req, subkey, "r2")
    assert "audit log unavailable" in str(refused.value)
    assert state.counters["released"] == 0


# -- the journal sender ------------------------------------------------------------------


def test_a_record_the_journal_refuses_goes_to_stderr(capsys):
    assert Audit(Journal(fail=True)).event("denied", "request denied: x", code="busy",
                                           peer_unit="none")
    assert "denied: request denied: x (code=busy peer_unit=none)" in capsys.readouterr().err


def test_the_journal_sender_fails_when_journald_is_not_there(tmp_path, monkeypatch):
    """sd_journal_send() would drop the record silently: the sender must fail, so
    that Audit falls back to stderr (and the request is refused if that fails too)."""
    pytest.importorskip("systemd.journal")
    monkeypatch.setattr(audit_module, "JOURNAL_SOCKET", str(tmp_path / "none"))
    with pytest.raises(OSError):
        journal_sender()(MESSAGE="x", MESSAGE_ID="0" * 32)


# -- audit text and the flood of denials -------------------------------------------------


@given(st.text(st.characters(blacklist_categories=())),
       st.text(st.characters(blacklist_categories=())))   # lone surrogates too
@example("\\n", "\n")
@example("\\x1b", "\x1b")
@example("\\\\", "\\")
def test_escaped_text_is_one_line_and_never_two_texts_alike(text, other):
    out = escaped(text)
    assert not any(ord(char) < 0x20 or 0x7f <= ord(char) < 0xa0 or char in "\u2028\u2029"
                   for char in out)
    assert (out == escaped(other)) == (text == other)


def test_every_field_of_a_record_is_escaped():
    journal = Journal()
    Audit(journal).event("released", "released to\nforged", command="a\nb\x1bc")
    record = journal.records[0]
    assert record["MESSAGE"] == "released to\\nforged"
    assert record["COMMAND"] == "a\\nb\\x1bc"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def denials_of(uid=7, interval=5.0):
    journal, clock = Journal(), Clock()
    return Denials(Audit(journal), interval=interval, clock=clock), journal, clock


def peer_fields(uid=7):
    return {"peer_pid": 42, "peer_uid": uid, "peer_gid": 7, "peer_unit": "none"}


def deny(denials, code="bad-frame", owner="user-7.slice", uid=7):
    denials.record("request denied: x", code, "x", owner, peer_fields(uid))


def test_repeated_denials_make_one_record_and_a_count():
    denials, journal, clock = denials_of()
    for uid in range(1000):           # any uids: an owner's user namespaces
        deny(denials, uid=100000 + uid)
    assert len(journal.records) == 1 and "REPEATED" not in journal.records[0]
    denials.flush()                              # the interval is not over yet
    assert len(journal.records) == 1
    clock.now += 5.0
    denials.flush()
    assert len(journal.records) == 2 and journal.records[1]["REPEATED"] == "999"
    assert journal.records[1]["OWNER"] == "user-7.slice"
    assert journal.records[1]["PEER_UID"] == "100999"      # the last one's fields


def test_another_owner_or_reason_is_recorded_at_once():
    denials, journal, _ = denials_of()
    deny(denials, owner="user-7.slice")
    deny(denials, owner="user-8.slice")
    deny(denials, code="auth-failed", owner="user-7.slice")
    assert [(r["OWNER"], r["CODE"]) for r in journal.records] == [
        ("user-7.slice", "bad-frame"), ("user-8.slice", "bad-frame"),
        ("user-7.slice", "auth-failed")]


def test_a_key_holders_denials_are_always_recorded_in_full():
    denials, journal, _ = denials_of()
    for code in ("replay", "stale", "spawn-refused", "not-found", "internal") * 3:
        deny(denials, code=code)
    assert len(journal.records) == 15
    assert not any("REPEATED" in record for record in journal.records)


def test_a_denial_after_the_interval_sums_up_the_last_one_first():
    denials, journal, clock = denials_of()
    for _ in range(3):
        deny(denials, code="busy")
    clock.now += 6.0
    deny(denials, code="busy")
    assert [r.get("REPEATED") for r in journal.records] == [None, "2", None]
    denials.flush(everything=True)              # the agent stops: nothing pending
    assert len(journal.records) == 3


# -- fair shares -------------------------------------------------------------------------


class Conn:
    def __init__(self, owner, deadline, answered=False):
        self.peer = Peer()
        self.peer.owner = owner
        self.deadline, self.answered = deadline, answered


def test_the_owner_holding_most_gives_way_with_its_oldest_request():
    hog = [Conn("user-9.slice", deadline) for deadline in (5, 3, 4)]
    other = [Conn("user-8.slice", 1)]
    assert giving_way(hog + other, "user-7.slice") is hog[1]


def test_nobody_gives_way_to_an_owner_holding_as_many():
    connections = [Conn("a", 1), Conn("a", 2), Conn("b", 3)]
    assert giving_way(connections, "b") is None       # 2 is not 1 + 2
    assert giving_way(connections, "a") is None       # the hog itself
    assert giving_way([], "b") is None


def test_answered_connections_do_not_count():
    connections = [Conn("a", 1, answered=True), Conn("a", 2, answered=True),
                   Conn("b", 3)]
    assert giving_way(connections, "c") is None
