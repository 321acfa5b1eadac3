"""Plain helpers of the test suite, imported by name: the real ``ov`` of the current
venv and its environment, the demo vault's known secrets, waiting with deadlines,
speaking the protocol directly, and the harness that starts agents (its fixtures
are in agent_plugin.py).  Every wait has a deadline, so a hung agent fails a test
instead of hanging CI.  Secret values never appear in assertion messages: commands
print digests, and agent or client output goes through redact() first.
"""

import array
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import leaks
from ovagent.core import crypto, protocol


OV = str(Path(sys.executable).with_name("ov"))
PASSWORD = "correct horse battery"
SENTINEL = "SENTINEL-7f3c9a1e-do-not-leak"
DEMO_SECRETS = {"DB_URL": "postgres://u:" + SENTINEL + "@db/app", "API_TOKEN": "tok-123",
                "EMPTY": ""}


def ov_env(home, vault):
    """A clean environment for ov: private HOME/XDG dirs and OV_VAULT."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OV_", "XDG_", "LISTEN_", "NOTIFY_", "CREDENTIALS_"))}
    env.update(HOME=str(home), OV_VAULT=str(vault),
               XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               XDG_RUNTIME_DIR=str(home / "run"))
    return env


@dataclass
class Ov:
    """Runs ``ov ARGS`` with the fixture's environment; returns CompletedProcess."""

    env: dict
    cwd: Path

    def __call__(self, *args, input=None, check=None, timeout=60, env=None, **kwargs):
        if isinstance(input, str):
            input = input.encode()
        result = subprocess.run(
            [OV, *args], input=input, capture_output=True, timeout=timeout,
            env=dict(self.env, **(env or {})), cwd=kwargs.pop("cwd", self.cwd),
            start_new_session=True,  # no controlling tty: prompts fail instead of hanging
            **kwargs)
        where = f"the output of ov {' '.join(str(arg) for arg in args[:2])}"
        leaks.watch.saw(where, result.stderr)
        if args[:1] != ("run",):          # ov run's stdout is the command's
            leaks.watch.saw(where, result.stdout)
        result.out = result.stdout.decode(errors="replace")
        result.err = result.stderr.decode(errors="replace")
        if check is not None:
            assert result.returncode == check, (result.returncode, result.out, result.err)
        return result


@dataclass
class DemoVault:
    path: Path
    key: Path           # unscoped machine key (the KEK)
    scoped_key: Path    # key scoped to app "demo"
    ov: Ov
    password: str = PASSWORD
    app: str = "demo"
    env: str = "production"


SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"
SETPRIV = shutil.which("setpriv")
WAIT = 15.0            # the longest any single wait may take before a test fails
AGENT_GRACE = "1"      # --grace: SIGTERM -> SIGKILL delay for orphaned commands
AGENT_DRAIN = "2"      # --drain: keeps teardown short if a command still runs

needs_socket_activate = pytest.mark.skipif(
    not os.access(SOCKET_ACTIVATE, os.X_OK),
    reason=f"{SOCKET_ACTIVATE} missing (Debian package 'systemd')")
needs_setpriv = pytest.mark.skipif(
    SETPRIV is None or os.geteuid() != 0,
    reason="needs root and setpriv (util-linux) to run processes as other uids")

# A command that prints what it sees as JSON: sha256 digests of its environment
# (never the values), its cwd and its umask.
PROBE = ("import hashlib, json, os; u = os.umask(0); print(json.dumps({'env': "
         "{k.decode(errors='replace'): hashlib.sha256(v).hexdigest() for k, v in "
         "os.environb.items()}, 'cwd': os.getcwd(), 'umask': u}))")


def sha256(value):
    return hashlib.sha256(value if isinstance(value, bytes) else value.encode()).hexdigest()


def redact(text):
    """Agent or client output, safe to show in an assertion message."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    for value in DEMO_SECRETS.values():
        if value:
            text = text.replace(value, "<REDACTED>")
    return text.replace(SENTINEL, "<REDACTED>")


def wait_for(predicate, what, timeout=WAIT, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (state first), or None
    when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cgroup2_mount():
    """Where this host mounts cgroup2 (pure, or hybrid's unified), or None."""
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(f"{root}/cgroup.procs") and os.path.exists(
                f"{root}/cgroup.controllers"):
            return root
    return None


def descriptor_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def memory_mappings(pid):
    """(start, end, permissions, path, VmFlags) of each mapping of process *pid*."""
    mappings = []
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(part, 16) for part in head[0].split("-"))
                mappings.append([start, end, head[1], " ".join(head[5:]), []])
            elif line.startswith("VmFlags:"):
                mappings[-1][4] = line.split()[1:]
    return mappings


def memory_copies(pid, needle):
    """The VmFlags of the mapping of each copy of *needle* in process *pid*'s memory
    (root reads /proc/PID/mem even of a non-dumpable process)."""
    found = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, permissions, path, flags in memory_mappings(pid):
            if "r" not in permissions or path in ("[vvar]", "[vsyscall]"):
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            found += [flags] * data.count(needle)
    return found


def pid_gone(pid, zombie_ok=False):
    """True once pid no longer exists.  A zombie counts as present unless zombie_ok
    (an agent must reap its commands; a detached agent is reaped by init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    if zombie_ok:
        fields = proc_stat(pid)
        return fields is None or fields[0] == "Z"
    return False


def group_gone(pgid):
    """True once no live process is left in process group pgid.  Zombies do not
    count: orphans are reaped by init, which may take its time (seconds, here)."""
    for entry in os.listdir("/proc"):
        fields = proc_stat(entry) if entry.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            return False
    return True


def read_line(stream, timeout=WAIT):
    """One line from a pipe, or fail after timeout (never blocks CI)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return stream.readline().decode(errors="replace")


def pipe_text(stream, timeout=0.5):
    """What a client wrote to a pipe so far, without blocking: its command may still
    hold the write end, so read() could wait forever."""
    chunks = []
    while select.select([stream], [], [], timeout)[0]:
        data = os.read(stream.fileno(), 65536)
        if not data:
            break
        chunks.append(data)
    return redact(b"".join(chunks))


def wrong_key(path):
    """A well-formed machine key file that unlocks nothing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    return Path(path)


# -- speaking the protocol directly --------------------------------------------------


def frame_of(body):
    """A frame around raw body bytes (valid header, whatever the body)."""
    return protocol.header(len(body)) + body


def split_frames(stream):
    """The whole frames of a recorded byte stream, each in the FrameReader that read
    it (a truncated last one is left out)."""
    readers, offset = [], 0
    while offset < len(stream):
        reader = protocol.FrameReader()
        while True:
            chunk = stream[offset:offset + reader.want()]
            offset += len(chunk)
            if reader.feed(chunk):
                readers.append(reader)
                break
            if not chunk:
                return readers
    return readers


def signed(key, challenge, op="status", **fields):
    """A request for *challenge*, signed with machine key bytes *key* (None: unsigned)."""
    if op == "spawn":
        fields.setdefault("argv", ["true"])
    if op == "release":
        fields.setdefault("argv0", "true")
    req = protocol.new_request(op, challenge, **fields)
    if key is not None:
        req["mac"] = protocol.sign(protocol.mac_key(key), req)
        leaks.watch.forbid("a request's MAC", req["mac"], per_test=True)
    return req


def answer(sock, timeout=5.0):
    """The agent's next frame, or "closed" when the connection ended without one."""
    try:
        frame, _ = protocol.recv_frame(sock, timeout=timeout)
        leaks.watch.saw("a frame from the agent", json.dumps(frame))
        return frame
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return "closed"
    except protocol.ProtocolError as exc:
        if "closed inside a frame" in str(exc):
            return "closed"
        raise


class Session:
    """One connection to an agent, past the hello."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))   # blocking: waits for room in a full queue
        self.sock.settimeout(timeout)
        self.hello = answer(self.sock, timeout)
        assert isinstance(self.hello, dict) and self.hello["type"] == "hello", self.hello
        self.challenge = self.hello["challenge"]

    def send(self, data, fds=()):
        """Send raw bytes (a frame); False if the agent already hung up."""
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([data], ancillary)
                data = data[sent:]
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def request(self, obj, fds=()):
        self.send(protocol.encode_frame(obj), fds)
        return answer(self.sock)

    def answer(self, timeout=5.0):
        return answer(self.sock, timeout)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- agents --------------------------------------------------------------------


class Agent:
    """A started agent: its process, socket, pid file and log (its stderr)."""

    def __init__(self, harness, proc, sock, pid_file, log_path, key):
        self.harness, self.proc, self.socket = harness, proc, Path(sock)
        self.pid_file, self.log_path, self.key = pid_file, Path(log_path), Path(key)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _key_option(self, key):
        """--machine-key KEY (the agent's own by default); key=False: none."""
        return [] if key is False else ["--machine-key", str(key or self.key)]

    def run(self, *command, key=None, options=(), via=None, **kwargs):
        """``ov run --agent --socket S --machine-key K OPTIONS -- COMMAND``; via: another
        socket path to connect to (a proxy) instead of the agent's."""
        return self.harness.demo.ov(
            "run", "--agent", "--socket", str(via or self.socket),
            *self._key_option(key), *options, "--", *command, **kwargs)

    def client(self, *command, key=None, options=(), **kwargs):
        """The same as a running Popen (tracked: killed in teardown)."""
        args = [OV, "run", "--agent", "--socket", str(self.socket),
                *self._key_option(key), *options, "--", *command]
        return self.harness.popen(args, **kwargs)

    def status(self, key=None, *options, via=None):
        return self.harness.demo.ov("agent", "status", "--machine-key", str(key or self.key),
                                    "--socket", str(via or self.socket), *options,
                                    timeout=20)

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}: "
                                     f"{redact(self.log())}")
            return "]: ready: " in self.log()
        wait_for(ready, "the agent's 'ready' audit line")
        return self

    def terminate(self, timeout=10.0):
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class AgentHarness:
    """Starts agents and client processes for one test, and cleans up after it."""

    def __init__(self, demo, tmp_path):
        self.demo, self.tmp = demo, tmp_path
        self.agents, self.procs, self.pids = [], [], []
        self._count = 0
        # Every agent of a test keeps its registry of consumers in the test's own
        # state directory (a --system agent's default is the host's /var/lib/ov).
        self.state = tmp_path / "state"
        self.env = dict(demo.ov.env, FOO_AGENT_ONLY="1", STATE_DIRECTORY=str(self.state))

    def _paths(self, name):
        self._count += 1
        log = self.tmp / f"agent{self._count}.log"
        directory = self.tmp / "r"
        sock = directory / f"{name}.sock"
        assert len(str(sock)) < 100, f"socket path too long for AF_UNIX: {sock}"
        return directory, sock, log

    def start(self, *options, key=None, sock=None, pid_file=None, app="demo",
              foreground=True, wait=True, env=None, wrap=(), cwd=None):
        """``ov agent start [--foreground] --machine-key K --socket S --pid-file P
        --app demo --grace 1 --drain 2 OPTIONS``; waits for its 'ready' line.
        wrap: a command prefix (setpriv ...) to run the agent under."""
        _, default_sock, log = self._paths("a")
        sock = Path(sock or default_sock)
        pid_file = Path(pid_file or sock.with_name("ov-agent.pid"))
        key = key or self.demo.key
        args = [*wrap, OV, "agent", "start", *(["--foreground"] if foreground else []),
                "--machine-key", str(key), "--socket", str(sock), "--pid-file",
                str(pid_file), *(["--app", app] if app else []), "--grace", AGENT_GRACE,
                "--drain", AGENT_DRAIN, *options]
        with open(log, "wb") as handle:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=handle,
                                    stderr=handle, env=dict(self.env, **(env or {})),
                                    cwd=cwd or self.tmp, start_new_session=True)
        agent = Agent(self, proc, sock, pid_file, log, key)
        self.agents.append(agent)
        leaks.watch.watch_file(f"the log of agent {log.name}", log)
        if wait and foreground:
            agent.wait_ready()
        return agent

    def start_shared(self, base, *options, **kwargs):
        """A --system agent whose socket, in *base* (a shared_place), other uids
        can reach."""
        agent = self.start("--system", *options, sock=base / "r" / "a.sock", **kwargs)
        os.chmod(agent.socket.parent, 0o711)
        os.chmod(agent.socket, 0o666)
        return agent

    def start_interactive(self):
        """An agent unlocked with the master password typed on a terminal (a pty that
        becomes its controlling terminal): interactive mode, no machine key."""
        _, sock, log = self._paths("i")
        primary, secondary = os.openpty()
        args = [OV, "agent", "start", "--foreground", "--socket", str(sock), "--pid-file",
                str(sock.with_name("i.pid")), "--app", "demo", "--grace", AGENT_GRACE,
                "--drain", AGENT_DRAIN]
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                args, stdin=secondary, stdout=handle, stderr=handle, env=self.env,
                cwd=self.tmp, start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(secondary)
        agent = Agent(self, proc, sock, sock.with_name("i.pid"), log, self.demo.key)
        self.agents.append(agent)
        leaks.watch.watch_file(f"the log of agent {log.name}", log)
        try:
            prompt = b""
            while b"Master password:" not in prompt:
                assert select.select([primary], [], [], WAIT)[0], "no password prompt"
                prompt += os.read(primary, 1024)
            os.write(primary, PASSWORD.encode() + b"\n")
            return agent.wait_ready()
        finally:
            os.close(primary)

    def activated(self, *options, key=None, setenv=(), pid_file=True, name="act",
                  listen=()):
        """systemd-socket-activate -l SOCK --fdname=ov-agent -E ... ov agent start;
        returns once the socket listens (the agent starts on the first connection).
        key=False: no --machine-key.  listen: (path, fdname) pairs passed first."""
        directory, sock, log = self._paths(name)
        directory.mkdir(mode=0o700, exist_ok=True)
        key = self.demo.key if key is None else key
        pid_path = sock.with_name(f"{name}.pid") if pid_file else None
        env_flags = []
        for assignment in (f"OV_VAULT={self.demo.path}", "FOO_AGENT_ONLY=1",
                           f"STATE_DIRECTORY={self.state}", *setenv):
            env_flags += ["-E", assignment]
        sockets = [*listen, (sock, "ov-agent")]
        args = [SOCKET_ACTIVATE, *[arg for path, _ in sockets for arg in ("-l", str(path))],
                "--fdname=" + ":".join(fdname for _, fdname in sockets), *env_flags,
                OV, "agent", "start", *(["--machine-key", str(key)] if key else []),
                "--app", "demo",
                "--grace", AGENT_GRACE, "--drain", AGENT_DRAIN,
                *(["--pid-file", str(pid_path)] if pid_path else []), *options]
        with open(log, "wb") as handle:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=handle,
                                    stderr=handle, env=self.env, cwd=self.tmp,
                                    start_new_session=True)
        agent = Agent(self, proc, sock, pid_path, log, key or self.demo.key)
        self.agents.append(agent)
        leaks.watch.watch_file(f"the log of agent {log.name}", log)

        def listening():
            if proc.poll() is not None:
                raise AssertionError(f"systemd-socket-activate exited: {agent.log()}")
            return agent.log().count("Listening on") == len(sockets)
        wait_for(listening, "systemd-socket-activate to listen")
        return agent

    def popen(self, args, **kwargs):
        kwargs.setdefault("env", self.demo.ov.env)
        kwargs.setdefault("cwd", self.tmp)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("bufsize", 0)     # read_line() selects on the raw pipe
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def track(self, pid):
        """A pid (a command's process group) to kill in teardown if still there."""
        self.pids.append((pid, _start_time(pid)))

    def detached_pid(self, pid_file):
        """A detached agent found through its pid file, stopped in teardown."""
        pid = int(Path(pid_file).read_text().strip())
        self.track(pid)
        return pid

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for agent in self.agents:
            try:
                agent.terminate(10)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(5)
        for pid, started in self.pids:
            if started is None or _start_time(pid) != started:
                continue            # gone (the pid may since belong to someone else)
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def _start_time(pid):
    """A process's start time (clock ticks since boot): tells it from a reused pid."""
    fields = proc_stat(pid)
    return fields[19] if fields else None


def probe(agent, *options, **kwargs):
    """Run PROBE through the agent; return what the command saw."""
    result = agent.run(sys.executable, "-c", PROBE, options=options, **kwargs)
    assert result.returncode == 0, (result.returncode, redact(result.err))
    return json.loads(result.out)


# -- systemd's notification socket ---------------------------------------------


class NotifyListener:
    """A fake NOTIFY_SOCKET: a bound AF_UNIX datagram socket recording messages."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []      # (monotonic time, set of lines)

    def receive(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        lines = set(data.decode(errors="replace").splitlines())
        self.messages.append((time.monotonic(), lines))
        return lines

    def wait_for(self, line, timeout=WAIT):
        """Receive until a message holding *line* arrives; return that message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.receive(max(0.01, deadline - time.monotonic()))
            if lines and line in lines:
                return lines
        raise AssertionError(f"no {line} on NOTIFY_SOCKET within {timeout} s; got "
                             f"{[sorted(m) for _, m in self.messages]}")

    def seen(self, line):
        return [t for t, lines in self.messages if line in lines]

    def close(self):
        self.sock.close()


# -- a recording proxy ---------------------------------------------------------


class RecordingProxy:
    """Listens on *path* and joins each client to the agent at *target*, relaying
    both directions (SCM_RIGHTS descriptors included) and recording every byte."""

    def __init__(self, path, target, delay=0.0):
        self.target, self.delay = str(target), delay   # delay: agent -> client, each chunk
        self.to_agent, self.to_client = bytearray(), bytearray()
        self.fds_relayed = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self._lock = threading.Lock()
        self._threads, self._sockets = [], []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self._sockets += [client, upstream]
            for src, dst, record in ((client, upstream, self.to_agent),
                                     (upstream, client, self.to_client)):
                thread = threading.Thread(target=self._pump, args=(src, dst, record),
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src, dst, record):
        try:
            while True:
                data, ancdata, _, _ = src.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
                fds = protocol._fds_from(ancdata)
                try:
                    if not data:
                        break
                    with self._lock:
                        record += data
                        self.fds_relayed += len(fds)
                    if record is self.to_client and self.delay:
                        time.sleep(self.delay)
                    if fds:
                        sent = dst.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                     array.array("i", fds))])
                        data = data[sent:]
                    dst.sendall(data)
                finally:
                    for fd in fds:
                        os.close(fd)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def join(self, timeout=WAIT):
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "proxy still relaying"

    def close(self):
        """Stop listening and cut every relayed connection (shutdown wakes the pumps);
        the raw bytes of both directions go to the leak sentinel."""
        self.listener.close()
        with self._lock:
            leaks.watch.saw("raw frames to the agent (proxy)", bytes(self.to_agent))
            leaks.watch.saw("raw frames from the agent (proxy)", bytes(self.to_client))
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def socket_mode(path):
    st = os.lstat(path)
    return stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode)


# -- a vault file edited by hand (an attacker who can write it) -----------------------


def write_sql(path, *statements):
    """Run SQL statements on a vault file directly, as someone who can write it."""
    db = sqlite3.connect(path)
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()
    return path


def as_format_1(path, kek):
    """Make a vault what ov wrote before heads (format 1): no heads table, format 1
    in its metadata, and each app's key check under format 1's associated data."""
    db = sqlite3.connect(path)
    try:
        (vault_id,) = db.execute(
            "SELECT value FROM meta WHERE key = 'vault_id'").fetchone()
        for name, wrapped, generation in db.execute(
                "SELECT name, wrapped_key, generation FROM apps").fetchall():
            key = crypto.decrypt(kek, wrapped, crypto.aad("app-key", vault_id, name,
                                                          generation), "app key")
            check = crypto.encrypt(key, b"", crypto.aad("app-check", vault_id, name,
                                                        generation))
            db.execute("UPDATE apps SET key_check = ? WHERE name = ?", (check, name))
        db.execute("DROP TABLE heads")
        db.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
        db.commit()
    finally:
        db.close()
    return path
