"""Hostile inputs and faults not covered elsewhere (docs/security.rst has the whole
table, row by row, with the test that shows each): framing tricks, JSON and MAC
edge cases, replay after a restart, resource exhaustion, a full disk and an audit
sink that is gone.  Real agents, real sockets, real ``ov`` processes."""

import array
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (DEMO_SECRETS, OV, SETPRIV, Session, cgroup2_mount, descriptor_count,
                     frame_of, memory_copies, needs_setpriv, proc_stat, protocol,
                     read_line, redact, signed, wait_for)
from ovagent.agent.auth import NonceCache
from ovagent.core import procfs
from ovagent.core.audit import JOURNAL_SOCKET
from test_protocol import ask, outcome

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def agent_cpu_seconds(pid):
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def agent_rss_kib(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def held(agent, path):
    """How many of the agent's descriptors are open on *path*."""
    count = 0
    for fd in Path(f"/proc/{agent.pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == str(path)
        except FileNotFoundError:         # closed while we looked
            pass
    return count


# -- framing ------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [3, 8, 40], ids=["inside-header", "header-only",
                                                  "inside-body"])
def test_a_truncated_frame_is_a_bad_frame(agent, key, cut):
    def build(challenge):
        return protocol.encode_frame(signed(key, challenge))[:cut]
    assert ask(agent, build) == "error:bad-frame"


def test_pipelined_frames_serve_only_the_first(agent, key):
    """Two signed requests in one write: the first is answered, the second never."""
    with Session(agent.socket) as session:
        first = protocol.encode_frame(signed(key, session.challenge))
        second = protocol.encode_frame(signed(key, session.challenge))
        session.send(first + second)
        assert outcome(session.answer()) == "status"
        assert session.answer() == "closed"


def test_trailing_garbage_after_a_spawn_request_stops_the_command(agent, key, tmp_path):
    """Bytes after a spawn request are read as the next frame: not a frame, so the
    client counts as gone and its command is stopped, not left running unwatched."""
    with Session(agent.socket) as session, open(os.devnull, "r+b") as null:
        req = signed(key, session.challenge, "spawn", argv=["sleep", "30"])
        session.send(protocol.encode_frame(req) + b"\x00garbage\xff" * 4,
                     [null.fileno()] * 3)
        assert outcome(session.answer()) == "started"
        wait_for(lambda: "terminated after its client went away" in agent.log(),
                 "the command to be stopped", timeout=10)


# -- JSON and MAC edge cases -------------------------------------------------------------


def test_deeply_nested_json_is_a_bad_frame(agent):
    for body in (b"[" * 100_000, b'{"type":"request","x":' + b"[" * 50_000 + b"]" * 50_000
                 + b"}"):
        assert ask(agent, lambda c, body=body: frame_of(body)) == "error:bad-frame"
    assert agent.proc.poll() is None


@pytest.mark.parametrize("environ", [{"A\u0000B": "c"}, {"": "c"}, {"A": "b\u0000c"}],
                         ids=["nul-in-name", "empty-name", "nul-in-value"])
def test_nul_or_empty_environment_names_are_refused(agent, key, environ):
    assert ask(agent, lambda c: signed(key, c, "spawn", environ=environ)) == \
        "error:bad-request"


@pytest.mark.parametrize("mac", ["ab", "0" * 63, "0" * 65, "é" * 64, "", "0" * 10_000],
                         ids=["2-chars", "63-chars", "65-chars", "non-ascii", "empty",
                              "10k-chars"])
def test_macs_of_the_wrong_length_or_alphabet_are_auth_failures(agent, key, mac):
    assert ask(agent, lambda c: dict(signed(key, c), mac=mac)) == "error:auth-failed"


@pytest.mark.parametrize("field", ["app", "env", "cwd", "secrets", "argv", "environ",
                                   "argv0"])
def test_strings_no_encoding_can_carry_are_refused(agent, key, field):
    """A lone surrogate (valid JSON, not UTF-8) would break the MAC's encoding or
    exec(): refused as a bad request, never an internal error."""
    bad = "/\ud800" if field == "cwd" else "\ud800"
    value = {"secrets": [bad], "argv": [bad], "environ": {bad: "x"}}.get(field, bad)
    op = "release" if field == "argv0" else "spawn"

    def build(challenge):
        req = dict(signed(key, challenge, op), **{field: value})
        return frame_of(json.dumps(req).encode())
    assert ask(agent, build) == "error:bad-request"


HUGE = "x" * 900_000      # a frame still fits in MAX_FRAME; a refusal quoting it would not
# Two keys must fit in one frame: 4 bytes of UTF-8 each in, a 12-byte JSON escape out.
WIDE = "\U0001F600" * 120_000


@pytest.mark.parametrize("edit, code", [
    (lambda req: dict(req, op=HUGE), "bad-request"),
    (lambda req: dict(req, **{HUGE: 1}), "bad-request"),
    (lambda req: frame_of(json.dumps(req).encode()[:-1] + f',"{WIDE}":1,"{WIDE}":2}}'
                          .encode()), "bad-frame"),
], ids=["unknown-op", "unknown-field", "duplicate-key"])
def test_refusals_quote_huge_input_only_in_short_excerpts(agent, key, edit, code):
    """The refusal must still be sendable (and not flood the audit log); a refusal
    too large to send once killed its worker thread and hung the next client."""
    result, reply = ask(agent, lambda c: edit(signed(key, c)), reply=True)
    assert result == f"error:{code}", result
    assert len(reply["message"]) < 200, len(reply["message"])
    assert ask(agent, lambda c: signed(key, c)) == "status"


def test_a_request_without_a_mac_field_is_refused(agent, key):
    def build(challenge):
        req = signed(key, challenge)
        del req["mac"]
        return req
    assert ask(agent, build) == "error:bad-request"


@pytest.mark.parametrize("field, value", [("ts", "1700000000"), ("argv", "true"),
                                          ("environ", []), ("secrets", "A"),
                                          ("umask", 18.0), ("app", 7)])
def test_wrong_types_are_refused(agent, key, field, value):
    def build(challenge):
        req = signed(key, challenge)
        req[field] = value
        return req
    assert ask(agent, build) in ("error:bad-request", "error:bad-frame")


# -- freshness -----------------------------------------------------------------------


def test_a_frame_replayed_to_a_restarted_agent_is_refused(agents, key):
    agent = agents.start()
    with Session(agent.socket) as session:
        frame = protocol.encode_frame(signed(key, session.challenge))
        session.send(frame)
        assert outcome(session.answer()) == "status"
    assert agent.terminate() == 0
    again = agents.start(sock=agent.socket)
    assert ask(again, lambda challenge: frame) == "error:auth-failed"
    assert ask(again, lambda challenge: signed(key, challenge)) == "status"


# -- peers -------------------------------------------------------------------------------


def test_descriptors_sent_with_a_request_are_all_closed(agent, key, tmp_path):
    """Descriptors that come with a status or release request, or the wrong number
    with a spawn request, are refused and closed: the agent ends up holding none of
    them."""
    mine = tmp_path / "passed-descriptor"
    mine.touch()
    with open(mine, "r+b") as passed:
        for op, count in (("status", 5), ("release", 3), ("spawn", 2), ("spawn", 4)):
            assert ask(agent, lambda c, op=op: signed(key, c, op),
                       [passed.fileno()] * count) == "error:bad-request"
    wait_for(lambda: held(agent, mine) == 0,
             "the agent to close every descriptor we passed")


# -- resources --------------------------------------------------------------------------


def test_more_connections_than_descriptors_neither_spins_nor_loses_the_listener(agents):
    """RLIMIT_NOFILE 64 and 100 idle connections: accept() hits EMFILE; the agent
    pauses the listener instead of spinning, keeps it, and serves again once the
    connections are gone (the waiting ones from the backlog)."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is not installed")
    agent = agents.start(wrap=("prlimit", "--nofile=64:64", "--"))
    sessions = []
    try:
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(str(agent.socket))
            sessions.append(sock)
        time.sleep(0.5)
        before = agent_cpu_seconds(agent.pid)
        time.sleep(2.0)
        spent = agent_cpu_seconds(agent.pid) - before
        assert spent < 0.5, f"the agent used {spent:.2f} s of CPU in 2 s while out of fds"
        assert agent.proc.poll() is None
    finally:
        for sock in sessions:
            sock.close()
    wait_for(lambda: agent.status().returncode == 0, "the agent to serve again",
             timeout=protocol.FRAME_TIMEOUT + 5, interval=0.5)


def test_many_long_running_children_all_report_their_status(agent):
    clients = [agent.client("sh", "-c", f"sleep 6; exit {n % 7}", options=["--spawn"])
               for n in range(40)]
    wait_for(lambda: "running=40" in agent.status().out, "40 commands running at once",
             interval=0.2)
    for n, client in enumerate(clients):
        assert client.wait(30) == n % 7
    assert agent.proc.poll() is None


def test_a_child_writing_a_gigabyte_costs_the_agent_no_memory(agent):
    """The child writes straight into the client's stdout (passed as a descriptor):
    not a byte goes through the agent."""
    before = agent_rss_kib(agent.pid)
    client = agent.client("head", "-c", str(1 << 30), "/dev/zero", options=["--spawn"])
    total = 0
    while chunk := client.stdout.read(1 << 20):
        total += len(chunk)
    assert client.wait(60) == 0
    assert total == 1 << 30
    growth = agent_rss_kib(agent.pid) - before
    assert growth < 4096, f"agent RSS grew {growth} KiB while a child wrote 1 GiB"


# -- hardening ---------------------------------------------------------------------------


class Clock:
    """An injectable monotonic clock."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_full_nonce_cache_refuses_instead_of_forgetting_live_nonces():
    clock = Clock()
    cache = NonceCache(capacity=3, ttl=61, clock=clock)
    assert all(cache.add(nonce) for nonce in ("a", "b", "c"))
    with pytest.raises(protocol.ProtocolError) as refused:
        cache.add("d")
    assert refused.value.code == protocol.E_BUSY
    clock.now += 60.9         # still inside the window: nothing may go
    assert [cache.add(nonce) for nonce in ("a", "b", "c")] == [False] * 3
    with pytest.raises(protocol.ProtocolError):
        cache.add("d")
    clock.now += 1.1          # past the window (and its one-second slice): now they go
    assert cache.add("d") and cache.add("a")


@pytest.mark.parametrize("arrival", [0.0, 0.3, 0.999])
def test_a_nonce_is_remembered_for_the_whole_window_wherever_in_its_second(arrival):
    clock = Clock(1000.0 + arrival)
    cache = NonceCache(ttl=61, clock=clock)
    assert cache.add("n")
    clock.now += 61 - 0.001
    assert not cache.add("n"), "forgotten inside the window: a replay would pass"
    clock.now += 1.002
    assert cache.add("n")


@pytest.fixture
def preload_vault(demo):
    """The demo vault plus a secret named LD_PRELOAD (a library that does not exist:
    if it were ever loaded, the loader would say so on stderr)."""
    demo.ov("secret", "set", "LD_PRELOAD", "--app", "demo", "--machine-key",
            str(demo.key), input="/nonexistent/ov-hook.so", check=0)
    return demo


@pytest.mark.parametrize("via_agent", [False, True], ids=["machine-key", "agent"])
def test_loader_variables_are_injected_only_when_named(preload_vault, agents, tmp_path,
                                                       via_agent, expect_error, digest):
    demo, marker = preload_vault, tmp_path / "ran"
    if via_agent:
        agent = agents.start()
        run = agent.run
    else:
        def run(*command, options=()):
            return demo.ov("run", "--machine-key", str(demo.key), "--app", "demo",
                           *options, "--", *command)
    message = expect_error(run("touch", str(marker)), 2, "LD_PRELOAD", "--secrets")
    assert not marker.exists(), message
    result = run(sys.executable, "-c", "import os; print(os.environ['LD_PRELOAD'])",
                 options=("--secrets", "LD_PRELOAD"))
    assert result.returncode == 0, redact(result.err)
    assert digest(result.out.strip()) == digest("/nonexistent/ov-hook.so")


# -- store -------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_fails_one_write_cleanly_and_loses_nothing(
        demo, tmp_path, vault_dump, expect_error, env_digests, digest):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                   check=True)
    try:
        vault = mount / "vault.db"
        shutil.copy(demo.path, vault)
        env = {"OV_VAULT": str(vault)}
        before = vault_dump(vault)
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:       # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)
        value = os.urandom(24_000).hex()
        message = expect_error(
            demo.ov("secret", "set", "BIG", "--app", "demo", "--machine-key",
                    str(demo.key), input=value, env=env), 1)
        assert "full" in message or "space" in message, message
        assert value not in message
        filler.unlink()
        assert vault_dump(vault) == before
        seen = env_digests(demo.ov, "--machine-key", str(demo.key), "--app", "demo",
                           env=env)
        assert {name: seen[name] for name in DEMO_SECRETS} == {
            name: digest(value) for name, value in DEMO_SECRETS.items()}
        demo.ov("secret", "set", "BIG", "--app", "demo", "--machine-key", str(demo.key),
                input="now it fits", env=env, check=0)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -- audit -------------------------------------------------------------------------------

AUDIT_SCRIPT = """
import os, subprocess, sys
r, w = os.pipe()
st = os.fstat(w)
env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
agent = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                         env=env, start_new_session=True)
os.close(w)
seen = b""
while b"]: ready: " not in seen:
    chunk = os.read(r, 4096)
    if not chunk:
        sys.exit("agent exited before ready: " + seen.decode(errors="replace"))
    seen += chunk
os.close(r)           # from now on nothing can take an audit record
print(agent.pid, flush=True)
agent.wait()
"""


@pytest.mark.skipif(os.path.exists(JOURNAL_SOCKET),
                    reason="journald runs here: the journal sink would not fail")
def test_with_no_audit_sink_nothing_runs(agents, demo, tmp_path):
    """Fail-closed: the agent believes it logs to journald (JOURNAL_STREAM), journald
    is unreachable and stderr is a broken pipe.  The 'released' (or, with --spawn,
    'accepted') record goes nowhere, so nothing is released and the command never
    runs."""
    sock = tmp_path / "r" / "audit.sock"
    sock.parent.mkdir(mode=0o700)
    marker = tmp_path / "ran"
    wrapper = subprocess.Popen(
        [sys.executable, "-c", AUDIT_SCRIPT, OV, "agent", "start", "--foreground",
         "--machine-key", str(demo.key), "--socket", str(sock), "--app", "demo"],
        stdout=subprocess.PIPE, text=True, env=agents.env, cwd=tmp_path)
    try:
        ready, _, _ = select.select([wrapper.stdout], [], [], 20)
        assert ready, "the agent never said ready on stderr"
        pid = int(wrapper.stdout.readline())
        for flow in ([], ["--spawn"]):
            result = demo.ov("run", "--agent", *flow, "--socket", str(sock),
                             "--machine-key", str(demo.key), "--", "touch", str(marker))
            assert result.returncode == 6, redact(result.err)
            assert "audit log unavailable" in result.err and "[internal]" in result.err
            assert not marker.exists()
        os.kill(pid, 0)       # and the agent is still up
    finally:
        wrapper.kill()
        subprocess.run(["pkill", "-f", str(sock)], check=False)
        wrapper.wait(10)


def test_descriptors_on_a_header_sent_byte_by_byte_are_refused_at_once(agent, tmp_path):
    """The count is checked with every byte, not once the header is whole: a header
    in eight pieces cannot park 8 x 4 descriptors in the agent."""
    mine = tmp_path / "passed-descriptor"
    mine.touch()
    with open(mine, "r+b") as passed, Session(agent.socket) as session:
        header = frame_of(b"{}")[:protocol.HEADER_LEN]
        for byte in header[:4]:
            if not session.send(bytes([byte]), [passed.fileno()] * 4):
                break
        reply = session.answer()
    assert reply != "closed" and reply["code"] == protocol.E_BAD_REQUEST, reply
    assert "file descriptors sent" in reply["message"]
    wait_for(lambda: held(agent, mine) == 0,
             "the agent to close every descriptor we passed")


CGROUP_CLIENT = """
import os, socket, sys
with open(os.fsencode(sys.argv[1]), "w") as procs:
    procs.write(str(os.getpid()))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[2])
print(len(sock.recv(4096)) > 0)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a cgroup needs root")
def test_a_caller_in_a_cgroup_named_with_any_bytes_does_not_stop_the_agent(agent):
    """/proc/PID/cgroup holds whatever bytes a cgroup's creator chose; the agent read
    it as strict UTF-8 and a crafted name took it down."""
    root = cgroup2_mount()
    own = Path("/proc/self/cgroup").read_text().split("0::", 1)[-1].split("\n")[0]
    if root is None or not own:
        pytest.skip("no cgroup2 hierarchy here")
    group = os.fsencode(f"{root}/{own.strip('/')}/ov-test-") + b"\xff"
    try:
        os.mkdir(group)
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc.strerror}")
    try:
        result = subprocess.run(
            [sys.executable, "-c", CGROUP_CLIENT, group + b"/cgroup.procs",
             str(agent.socket)], capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "True", result.stderr
        assert agent.proc.poll() is None, redact(agent.log())
        assert agent.status().returncode == 0
    finally:
        wait_for(lambda: not read_bytes(group + b"/cgroup.procs").strip(),
                 "the cgroup to empty")
        os.rmdir(group)


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


# -- issue 14: clients without a key --------------------------------------------------


@pytest.fixture(autouse=True)
def descriptors_return_to_baseline(request):
    """After each test here that uses the ``agent`` fixture, the agent holds no more
    descriptors than it did once it had served a first request."""
    if "agent" not in request.fixturenames:
        yield
        return
    agent = request.getfixturevalue("agent")
    assert agent.status().returncode == 0    # what opens lazily is in the baseline
    baseline = descriptor_count(agent.pid)
    yield
    if agent.proc.poll() is None:
        wait_for(lambda: descriptor_count(agent.pid) <= baseline,
                 f"the agent's descriptors to return to {baseline}")


@pytest.mark.parametrize("end", ["reset", "silence", "eof"])
def test_descriptors_sent_with_a_piece_of_header_are_closed_however_it_ends(
        agent, tmp_path, end):
    """The attack of issue 14: connections that send one byte of a header with
    descriptors attached, then reset (close with the hello unread), fall silent
    until the deadline, or end the stream.  However they end, the agent closes what
    came: 40 of them leave it holding none."""
    mine = tmp_path / "passed-descriptor"
    mine.touch()
    sockets = []
    with open(mine, "r+b") as passed:
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(agent.socket))
            sock.sendmsg([b"O"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", [passed.fileno()] * 3))])
            sockets.append(sock)
    try:
        for sock in sockets:
            if end == "reset":
                sock.close()
            elif end == "eof":
                sock.shutdown(socket.SHUT_WR)
        if end == "silence":
            wait_for(lambda: held(agent, mine) > 0, "the agent to read a descriptor")
        wait_for(lambda: held(agent, mine) == 0,
                 "the agent to close every descriptor we passed")
    finally:
        for sock in sockets:
            sock.close()


ATTACKER = r"""
import socket, sys, threading, time
path, stalled, reopening = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = time.monotonic() + float(sys.argv[4])

def attack(first_bytes):
    # Connect, send first_bytes (one byte of a header, or nothing), wait until the
    # agent hangs up, and at once again.
    while time.monotonic() < stop:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.05, stop - time.monotonic()))
            sock.connect(path)
            sock.sendall(first_bytes)
            while sock.recv(65536):
                pass
        except OSError:
            time.sleep(0.001)
        finally:
            sock.close()

threads = [threading.Thread(target=attack, args=(b"O",)) for _ in range(stalled)]
threads += [threading.Thread(target=attack, args=(b"",)) for _ in range(reopening)]
for thread in threads:
    thread.start()
print("attacking", flush=True)
for thread in threads:
    thread.join()
"""


@needs_setpriv
def test_one_uids_stalled_and_reopening_connections_do_not_starve_another(
        agents, shared_place):
    """Issue 14: 200 stalled connections (one byte, then nothing) and 70 that reopen
    as soon as the agent hangs up, all from uid 65534 and without a key, against
    the default 64 slots.  Every request of another uid is served meanwhile (the
    attacker's oldest connection gives way), and the attack's thousands of
    refusals make a handful of audit lines."""
    own = procfs.process_cgroups(os.getpid())[1]
    if procfs.owner(own, 65534) == procfs.owner(own, 0):
        pytest.skip(f"uid 65534 and root both count as {procfs.owner(own, 0)} here; "
                    "the system suite's s15 runs attacker and caller in units of "
                    "their own")
    base, _ = shared_place
    agent = agents.start_shared(base)
    attacker = subprocess.Popen(
        [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", ATTACKER, str(agent.socket), "200", "70", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert read_line(attacker.stdout).strip() == "attacking"
        wait_for(lambda: agent_counters(agent)["busy"] > 500,
                 "the attack to fill every slot", timeout=30)
        slowest = 0.0
        for _ in range(10):
            started = time.monotonic()
            result = agent.run("true")
            slowest = max(slowest, time.monotonic() - started)
            assert result.returncode == 0, redact(result.err)
        counters = agent_counters(agent)
    finally:
        attacker.kill()
        attacker.wait()
    # The time is the client's too, and here it shares two CPUs with 270 attacking
    # threads in one cgroup: reported, not asserted (the system suite's soak test
    # runs each side in its own unit).
    print(f"served 10 of 10 under attack, the slowest in {slowest:.3f} s; {counters}")
    denied_lines = [line for line in agent.log().splitlines() if ": denied: " in line]
    assert counters["denied"] > 10 * len(denied_lines), (counters, len(denied_lines))


def agent_counters(agent):
    """The agent's counters, from a signed status request."""
    with Session(agent.socket) as session:
        return session.request(signed(agent.key.read_bytes(), session.challenge))[
            "counters"]


def test_a_flood_of_denials_makes_a_few_records_that_count_every_one(agent):
    """300 bad frames in a row from one uid: the first denial is recorded in full,
    the rest are counted into one record per interval (REPEATED=N), written at the
    latest when the agent stops; none is lost from the count."""
    for _ in range(300):
        assert ask(agent, lambda challenge: frame_of(b"{")) == "error:bad-frame"
    assert agent.terminate() == 0
    records = [line for line in agent.log().splitlines() if ": denied: " in line]
    repeated = [int(match.group(1)) for line in records
                for match in [re.search(r" repeated=(\d+)", line)] if match]
    assert len(records) <= 4, records     # full + count, twice if 5 s went by
    assert len(records) - len(repeated) + sum(repeated) == 300, records


def test_control_characters_in_audited_text_cannot_forge_a_log_line(agent):
    """A key holder's argv[0] with a newline (and an escape sequence) reaches the audit
    record escaped: without journald the record is a line on stderr, and it stays
    one line."""
    forged = "true\nov-agent[1]: released: forged\x1b[2K"
    result = agent.run(forged)
    assert result.returncode == 127, redact(result.err)
    lines = agent.log().splitlines()
    assert not any(line.startswith("ov-agent[1]:") for line in lines), lines
    released = [line for line in lines if ": released: " in line]
    assert len(released) == 1 and "true\\nov-agent[1]: released: forged\\x1b[2K" in \
        released[0], released


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a non-dumpable agent's memory "
                                              "needs root")
def test_the_machine_key_and_its_mac_subkey_live_only_on_the_locked_page(agent, demo):
    """After a run of releases the agent's memory holds the machine key and the MAC
    subkey once each, on the page that is locked and left out of core dumps (VmFlags
    lo, dd).  (docs/security.rst, "Key material in memory", lists the short-lived
    copies that remain, such as each request's app key in freed memory.)"""
    for _ in range(20):
        assert agent.run("true").returncode == 0
    key = demo.key.read_bytes()
    for name, material in (("machine key", key),
                           ("MAC subkey", protocol.mac_key(key))):
        copies = memory_copies(agent.pid, material)
        assert len(copies) == 1 and {"lo", "dd"} <= set(copies[0]), (name, copies)


def test_a_connection_without_a_request_is_dropped_after_a_short_deadline(agent):
    """Unauthenticated connections do not keep a slot for the whole frame deadline:
    the request must be whole protocol.REQUEST_TIMEOUT seconds after the accept."""
    assert protocol.REQUEST_TIMEOUT < protocol.FRAME_TIMEOUT / 2
    with Session(agent.socket) as session:
        session.send(b"O")
        reply = session.answer(timeout=protocol.REQUEST_TIMEOUT + 3)
    assert outcome(reply) == "error:timeout", reply


def test_a_client_waits_while_the_agents_queue_is_full(demo, tmp_path):
    """A busy agent's listen queue may be full: the client waits for room instead of
    failing at once with EAGAIN (which a socket with a timeout gets)."""
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    while True:                          # fill the queue
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)
    client = subprocess.Popen([OV, "run", "--agent", "--socket", path, "--machine-key",
                               str(demo.key), "--", "true"], env=demo.ov.env,
                              stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert client.poll() is None, client.stderr.read()     # waiting, not failed
        listener.settimeout(10)
        for _ in range(len(fillers) + 1):   # make room; the client's turn comes
            listener.accept()[0].close()
        assert client.wait(30) == 6
        error = client.stderr.read()
        assert "the agent closed the connection" in error, error
    finally:
        client.kill()
        for sock in (listener, *fillers):
            sock.close()


FD_SENDER = r"""
import array, os, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
fd = os.open(sys.argv[2], os.O_RDONLY)
sock.sendmsg([b"O"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 3))])
print("sent", flush=True)
time.sleep(float(sys.argv[3]))
"""


@needs_setpriv
def test_descriptors_from_a_uid_that_cannot_spawn_are_never_taken(agents, shared_place):
    """Only a caller with the agent's own uid may --spawn, so only its descriptors
    are received; the kernel drops anyone else's.  (The loop never closes them, and
    closing one can block: a FUSE file's flush waits for whoever serves it.)"""
    base, _ = shared_place
    agent = agents.start_shared(base)
    passed = base / "passed-descriptor"
    passed.write_bytes(b"")
    passed.chmod(0o644)
    sender = subprocess.Popen(
        [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
         "-c", FD_SENDER, str(agent.socket), str(passed), "1.5"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert read_line(sender.stdout).strip() == "sent"
        seen = [held(agent, passed) for _ in range(10) if not time.sleep(0.1)]
        assert seen == [0] * 10, seen
    finally:
        sender.kill()
        sender.wait()
