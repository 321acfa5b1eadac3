"""The leak sentinel (tests/leaks.py) catches what it must: a leak planted in each
place it watches is found and named, and the report never repeats the material."""

import socket
import sys

from helpers import answer, frame_of, signed
from helpers import DEMO_SECRETS, PASSWORD, SENTINEL
import leaks


def found_and_forgotten():
    """What the sentinel found so far; then forget it, so this test does not fail."""
    found = leaks.watch.found()
    leaks.watch.begin()
    return found


def test_a_value_on_an_ov_commands_stderr_is_found(demo):
    demo.ov("run", "--machine-key", str(demo.key), "--app", "demo", "--", "sh", "-c",
            'printf %s "$DB_URL" >&2', check=0)
    found = found_and_forgotten()
    assert "the value of secret DB_URL in the output of ov run --machine-key" in found
    assert not any(SENTINEL in line for line in found)


def test_ov_runs_stdout_is_the_commands_but_other_stdout_is_watched(demo):
    demo.ov("run", "--machine-key", str(demo.key), "--app", "demo", "--", "sh", "-c",
            'printf %s "$API_TOKEN"', check=0)
    assert found_and_forgotten() == []
    leaks.watch.saw("the output of ov secret list", "API_TOKEN " + DEMO_SECRETS["API_TOKEN"])
    assert found_and_forgotten() == ["the value of secret API_TOKEN in the output of ov "
                                     "secret list"]


def test_a_key_in_an_agent_log_is_found(agents, demo):
    agent = agents.start()
    agent.terminate()         # (its log has no O_APPEND: it would write over ours)
    with open(agent.log_path, "a") as log:
        log.write(f"oops {demo.key.read_bytes().hex()}\n")
    assert found_and_forgotten() == [
        f"machine key machine.kek (hex) in the log of agent {agent.log_path.name}"]


def test_a_mac_or_the_password_in_a_frame_from_the_agent_is_found(demo):
    mac = signed(demo.key.read_bytes(), "00" * 32)["mac"]
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(frame_of(f'{{"type": "error", "message": "{mac} {PASSWORD}"}}'
                                .encode()))
        assert isinstance(answer(ours), dict)
    assert found_and_forgotten() == ["a request's MAC in a frame from the agent",
                                     "the master password in a frame from the agent"]


def test_clean_output_passes(demo):
    demo.ov("secret", "list", "--app", "demo", check=0)
    demo.ov("run", "--machine-key", str(demo.key), "--app", "demo", "--",
            sys.executable, "-c", "pass", check=0)
    assert found_and_forgotten() == []
