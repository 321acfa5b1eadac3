#!/usr/bin/env python3
"""Benchmark ``ov run --agent`` and ``ov agent``; print ONE table.

Both flows of protocol version 2 are measured: ``release`` (``ov run --agent``: the
agent answers with the secrets sealed to the signed request, the client execs the
command in place) and ``spawn`` (``ov run --agent --spawn``: the agent runs the
command with the client's fds and reports its exit status).

Usage (from the repository root; see bench/README.rst)::

    python3 bench/run.py                # full run, about 2-3 minutes
    python3 bench/run.py --quick        # tiny counts (smoke test), under 30 s
    python3 bench/run.py --profile      # py-spy profile of the agent under load
                                        # + python -X importtime of the clients
    python3 bench/run.py --sections 1,5 --json out.json

Everything lives in a temporary directory removed at exit: a throwaway NON-editable
venv of the project (the editable install's import hook costs ~10 ms per start and
would distort client numbers), a throwaway vault, agents on private sockets.  Nothing
is installed anywhere else (``--profile`` adds py-spy to the throwaway venv only).

Statistics: every figure is a median with its spread (IQR p25-p75, or min-max when
there are few samples).  Ratios are taken side by side in the same run: from one
hyperfine invocation holding every command, and (for the key ratios) from our own
alternating loop whose rounds run A and B back to back in alternating order; the
ratio reported is the median of the per-round ratios.
"""

import argparse
import atexit
import binascii
import itertools
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
PASSWORD = "correct horse battery staple"
APP, ENV = "demo", "production"
ONE = "SECRET_00007"          # present in every generated vault
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from issue #12 (on this 2-core machine); every other row is information.
# The client and N=32 targets are those of the release flow (``ov run --agent``).
TARGETS = {
    "ratio_agent_floor": (2.0, "le", "≤ 2.0x"),
    "client_agent_ms": (None, None, "≤ 2.0x floor (see ratio)"),
    "requests_per_s_n32": (1000.0, "ge", "≥ 1,000/s"),
    "p99_n32_ms": (50.0, "lt", "< 50 ms"),
    "cold_ms": (300.0, "lt", "< 300 ms"),
    "rss_idle_mib": (40.0, "lt", "< 40 MiB"),
    "rss_growth_mib": (2.0, "le", "≤ 2 MiB"),
    "scale_one_ratio": (1.2, "le", "≤ 1.2x"),
}


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- statistics --------------------------------------------------------------------


def pct(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values, spread="iqr"):
    """{'median', 'lo', 'hi', 'n', 'spread'}; spread 'iqr' (p25-p75) or 'range'."""
    if spread == "iqr" and len(values) < 8:
        spread = "range"
    lo, hi = ((pct(values, 25), pct(values, 75)) if spread == "iqr"
              else (min(values), max(values)))
    return {"median": statistics.median(values), "lo": lo, "hi": hi, "n": len(values),
            "spread": spread}


# -- the table ---------------------------------------------------------------------


class Table:
    HEAD = ("metric", "median", "spread", "n", "target", "met")

    def __init__(self):
        self.rows = []      # ("section", title) or ("row", cells...)
        self.data = {}      # for --json

    def section(self, title):
        self.rows.append(("section", title))

    def add(self, key, label, stats, unit, fmt="{:.1f}", scale=1.0, target=None,
            value=None, number=None):
        """stats: a summary() dict (scaled by *scale*), or None with *value* text
        (and *number*, compared with the target when given)."""
        if stats is not None:
            med = stats["median"] * scale
            text = fmt.format(med) + (f" {unit}" if unit else "")
            kind = "IQR" if stats["spread"] == "iqr" else "range"
            spread = (f"{kind} {fmt.format(stats['lo'] * scale)}–"
                      f"{fmt.format(stats['hi'] * scale)}")
            n = str(stats["n"])
            self.data[key] = {"median": med, "lo": stats["lo"] * scale,
                              "hi": stats["hi"] * scale, "n": stats["n"], "unit": unit,
                              "spread": stats["spread"]}
        else:
            med, text, spread, n = number, value, "", ""
            self.data[key] = {"value": value}
        target_text, met = "info", ""
        if target is not None:
            limit, how, target_text = TARGETS[target]
            if how and med is not None:
                ok = {"le": med <= limit, "lt": med < limit, "ge": med >= limit}[how]
                met = "yes" if ok else "NO"
                self.data[key]["met"] = ok
            self.data[key]["target"] = target_text
        self.rows.append(("row", label, text, spread, n, target_text, met))

    def annotate(self, suffix):
        """Append *suffix* to the value shown in the last row."""
        row = self.rows[-1]
        self.rows[-1] = row[:2] + (row[2] + suffix,) + row[3:]

    def render(self):
        cells = [self.HEAD] + [r[1:] for r in self.rows if r[0] == "row"]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.HEAD))]

        def line(c):
            return "  ".join([c[0].ljust(widths[0])] + [c[i].rjust(widths[i])
                              if i in (1, 3) else c[i].ljust(widths[i])
                              for i in range(1, len(c))]).rstrip()

        total = sum(widths) + 2 * (len(widths) - 1)
        out = [line(self.HEAD), "-" * total]
        for row in self.rows:
            out.append(f"{row[1]}" if row[0] == "section" else line(row[1:]))
        out.append("-" * total)
        return "\n".join(out)


# -- environment: venv, vault, agents ----------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="ov-bench-"))
        self.procs = []
        self.src = self.tmp / "src"
        self.venv = self.tmp / "venv"
        self.ov = str(self.venv / "bin" / "ov")
        self.vpy = str(self.venv / "bin" / "python")
        self.home = self.tmp / "home"
        self.creds = self.tmp / "creds"
        self.key_path = self.creds / "machine.kek"
        self.run_dir = self.tmp / "run"
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.client_err = self.tmp / "client-stderr.log"
        self.protocol = None
        self.seal = None
        self.subkey = None
        self.ran_load = False

    # cleanup
    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.terminate()
                    proc.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
        if self.args.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def env(self, **extra):
        """A clean, service-like environment for ov (no PYTHON* variables)."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": str(self.home), "LANG": "C.UTF-8",
               "XDG_DATA_HOME": str(self.home / "data"),
               "XDG_CONFIG_HOME": str(self.home / "config"),
               "XDG_RUNTIME_DIR": str(self.run_dir)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def ov_cmd(self, *args, input=None, env=None, timeout=120):
        result = subprocess.run([self.ov, *args], input=input, capture_output=True,
                                env=env or self.env(), cwd=self.home, timeout=timeout,
                                check=False)
        if result.returncode != 0:
            raise SystemExit(f"bench: ov {' '.join(args)} failed ({result.returncode}): "
                             f"{result.stderr.decode(errors='replace')}")
        return result

    def build_venv(self):
        t0 = time.perf_counter()
        # Copy the sources so that pip's in-tree build never writes into the repo.
        self.src.mkdir()
        for name in ("pyproject.toml", "README.rst"):
            shutil.copy2(REPO / name, self.src / name)
        shutil.copytree(REPO / "ovagent", self.src / "ovagent",
                        ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages",
                        str(self.venv)], check=True, timeout=120)
        subprocess.run([str(self.venv / "bin" / "pip"), "install", "-q", "--no-deps",
                        "--no-build-isolation", str(self.src)], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
        # The load generator speaks the protocol with the project's own codec.
        sys.path.insert(0, str(self.src))
        from ovagent import protocol, seal
        self.protocol, self.seal = protocol, seal
        return time.perf_counter() - t0

    def build_vaults(self, sizes):
        """A base vault (app demo, env production), then one copy per size with
        secrets imported from a generated dotenv in one transaction."""
        t0 = time.perf_counter()
        for path in (self.home, self.creds, self.run_dir):
            path.mkdir(mode=0o700)
        base = self.tmp / "vaults" / "base.db"
        env = self.env(OV_VAULT=base)
        self.ov_cmd("auth", "init", "--password-stdin", input=f"{PASSWORD}\n".encode(),
                    env=env)
        self.ov_cmd("auth", "derive-machine-key", "--out", str(self.key_path),
                    "--password-stdin", input=f"{PASSWORD}\n".encode(), env=env)
        key = ["--machine-key", str(self.key_path)]
        self.ov_cmd("app", "create", APP, *key, env=env)
        self.ov_cmd("env", "create", ENV, "--app", APP, env=env)
        self.vaults, import_s = {}, {}
        for size in sizes:
            path = self.tmp / "vaults" / f"vault-{size}.db"
            for suffix in ("", "-wal"):
                if os.path.exists(f"{base}{suffix}"):
                    shutil.copy2(f"{base}{suffix}", f"{path}{suffix}")
            dotenv = self.tmp / f"secrets-{size}.env"
            dotenv.write_text("".join(f"SECRET_{i:05d}=value-{i:05d}-"
                                      "0123456789abcdef0123456789abcdef\n"
                                      for i in range(size)))
            t1 = time.perf_counter()
            self.ov_cmd("secret", "import", str(dotenv), "--app", APP, "--env", ENV,
                        *key, env=self.env(OV_VAULT=path))
            import_s[size] = time.perf_counter() - t1
            self.vaults[size] = path
        self.base_vault = base
        self.subkey = self.protocol.mac_key(self.key_path.read_bytes())
        return time.perf_counter() - t0, import_s

    def start_agent(self, name, vault, extra=()):
        sock = self.run_dir / name / "agent.sock"
        errlog = self.tmp / f"agent-{name}.log"
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                [self.ov, "agent", "start", "--foreground", "--machine-key",
                 str(self.key_path), "--app", APP, "--socket", str(sock),
                 "--max-clients", "64", *extra],
                env=self.env(OV_VAULT=vault), cwd=self.home, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.procs.append(proc)
        wait_for_line(errlog, ": ready:", proc, timeout=30)
        return proc, str(sock)

    def stop_agent(self, proc):
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- timing primitives ------------------------------------------------------

    def spawn_time(self, argv, env):
        """Wall time of one process from posix_spawn to its reaping (seconds)."""
        with open(self.client_err, "ab") as err:
            actions = [(os.POSIX_SPAWN_DUP2, self.devnull, 0),
                       (os.POSIX_SPAWN_DUP2, self.devnull, 1),
                       (os.POSIX_SPAWN_DUP2, err.fileno(), 2)]
            t0 = time.perf_counter()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            _, status = os.waitpid(pid, 0)
            elapsed = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"bench: {' '.join(argv)} exited "
                             f"{os.waitstatus_to_exitcode(status)}: "
                             f"{self.client_err.read_text()[-2000:]}")
        return elapsed

    def alternate(self, commands, rounds, env):
        """Run each command once per round, the order rotating each round (AB, BA, ...).
        Returns {name: [seconds...]} (paired by round)."""
        names = list(commands)
        times = {name: [] for name in names}
        for i in range(rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                times[name].append(self.spawn_time(commands[name], env))
        return times

    def hyperfine(self, commands, runs, warmup, env):
        """One hyperfine -N invocation for all commands; {name: [seconds...]}."""
        out = self.tmp / "hyperfine.json"
        argv = ["hyperfine", "-N", "--style", "none", "--warmup", str(warmup),
                "--runs", str(runs), "--export-json", str(out)]
        for name, cmd in commands.items():
            argv += ["--command-name", name, " ".join(cmd)]
        result = subprocess.run(argv, env=env, cwd=self.home, capture_output=True,
                                timeout=600, check=False)
        if result.returncode != 0:
            raise SystemExit(f"bench: hyperfine failed: {result.stderr.decode()[-2000:]}")
        data = json.loads(out.read_text())
        return {r["command"]: r["times"] for r in data["results"]}

    def open_released(self, req, frame, expect=None):
        """The secrets (name -> bytes) of a 'released' frame answering *req*: the seal
        opened with the request's subkey (seal.open_sealed checks its tag first) and
        decoded.  Raises ValueError (or seal.SealError) when it does not open, or
        holds another number of secrets than *expect*."""
        if not isinstance(frame.get("request_id"), str):
            raise ValueError("released frame without a request_id")
        sealed = binascii.a2b_base64(frame["sealed"], strict_mode=True)
        values = self.seal.decode_secrets(self.seal.open_sealed(self.subkey, req, sealed))
        if expect is not None and len(values) != expect:
            raise ValueError(f"{len(values)} secrets released, expected {expect}")
        return values

    def signed_request(self, sock, op, **fields):
        """hello in, then a request of *op* signed for its challenge (not sent yet)."""
        p = self.protocol
        hello, _ = p.recv_frame(sock, timeout=60)
        if hello["type"] != "hello":
            raise SystemExit(f"bench: agent answered {hello}")
        req = p.new_request(op, hello["challenge"], **fields)
        req["mac"] = p.sign(self.subkey, req)
        return req

    def request(self, sock_path, secrets=None, expect=None):
        """One release spoken directly (connect .. 'released', seal opened and its
        secrets counted); returns seconds."""
        p = self.protocol
        t0 = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(sock_path)
            req = self.signed_request(sock, "release", secrets=secrets,
                                      argv0="/bin/true")
            p.send_frame(sock, req)
            frame, _ = p.recv_frame(sock, timeout=60)
            if frame["type"] != "released":
                raise SystemExit(f"bench: agent answered {frame}")
        try:
            self.open_released(req, frame, expect)
        except (ValueError, KeyError, TypeError, self.seal.SealError) as exc:
            raise SystemExit(f"bench: bad released frame: {exc}") from None
        return time.perf_counter() - t0

    def status(self, sock_path):
        """The agent's 'status' frame (a signed status request)."""
        p = self.protocol
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60)
            sock.connect(sock_path)
            p.send_frame(sock, self.signed_request(sock, "status"))
            frame, _ = p.recv_frame(sock, timeout=60)
        if frame["type"] != "status":
            raise SystemExit(f"bench: agent answered {frame}")
        return frame


def wait_for_line(path, needle, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in Path(path).read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"bench: process exited {proc.returncode}: "
                             f"{Path(path).read_text(errors='replace')[-2000:]}")
        time.sleep(0.005)
    raise SystemExit(f"bench: timed out waiting for {needle!r} in {path}")


# -- /proc ---------------------------------------------------------------------------


def proc_cpu(pid):
    """(self seconds, reaped-children seconds, self seconds in the kernel) of a
    process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        rest = handle.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK, stime / CLK_TCK


def host_cpu():
    """(idle+iowait ticks, total ticks) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def proc_status(pid, field):
    """A kB field of /proc/PID/status (VmRSS, VmHWM, Threads...) as int."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


PERF_EVENTS = ("task-clock", "context-switches", "cpu-migrations", "page-faults",
               "syscalls:sys_enter_futex")


def while_watched(argv, driver, settle):
    """driver()'s result, run while a profiler (argv: perf stat/record -p PID) watches;
    the profiler gets *settle* seconds to attach and SIGINT once driver() is done."""
    watcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(settle)
    try:
        return driver()
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(60)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()


def perf_stat(pid, driver, out):
    """Run driver() under ``perf stat -p pid`` (counting, cheap; follows new threads
    and children).  Returns (driver result, {event: count}) or (result, None) when
    perf is missing or refuses."""
    if shutil.which("perf") is None:
        return driver(), None
    result = while_watched(["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS),
                            "-p", str(pid), "-o", str(out)], driver, settle=0.3)
    counts = {}
    try:
        for line in out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2] in PERF_EVENTS:
                try:
                    counts[parts[2]] = float(parts[0])
                except ValueError:
                    pass
    finally:
        out.unlink(missing_ok=True)
    return result, (counts if len(counts) == len(PERF_EVENTS) else None)


# -- the load generator: one process, one thread, non-blocking sockets ------------------


def split_frames(protocol, buf):
    """The complete frames at the start of *buf* (a bytearray, consumed), each header
    checked as protocol.recv_frame checks it and each body parsed by
    protocol.decode_body.  Raises protocol.ProtocolError on a bad header."""
    frames = []
    head = protocol.HEADER_LEN
    while len(buf) >= head:
        if (buf[:2] != protocol.MAGIC or buf[2] != protocol.VERSION or buf[3] != 0):
            raise protocol.ProtocolError(protocol.E_BAD_FRAME, "bad frame header")
        length = int.from_bytes(buf[4:head], "big")
        if len(buf) < head + length:
            break
        frames.append(protocol.decode_body(bytes(buf[head:head + length])))
        del buf[:head + length]
    return frames


class LoadGenerator:
    """N concurrent connections, one request each, then a new connection.

    op "release" (``ov run --agent``): connect, 'hello', a signed release request
    (no fds), 'released'; the seal is opened with the request's subkey and its
    secrets counted (*expect*), so a reply that does not open is an error, not a
    request served.  op "spawn" (``ov run --agent --spawn``): connect, 'hello', a
    signed spawn request of /bin/true carrying 3 fds (/dev/null), 'started', 'exit'
    (status 0).  A selectors loop in one thread (no GIL contention); its own CPU per
    request is reported so a saturated generator shows.  Latency runs from connect()
    to the last frame's arrival (before the seal is opened)."""

    def __init__(self, bench, sock_path, op="release", secrets=None, expect=None):
        self.b, self.path, self.op, self.expect = bench, sock_path, op, expect
        if op == "release":
            self.fields = {"secrets": secrets, "argv0": "/bin/true"}
            self.fds, self.replies = (), ("released",)
        elif op == "spawn":
            self.fields = {"secrets": secrets, "argv": ["/bin/true"],
                           "environ": bench.env(), "cwd": str(bench.home),
                           "umask": 0o022}
            self.fds, self.replies = (bench.devnull,) * 3, ("started", "exit")
        else:
            raise ValueError(op)

    def check(self, req, frame):
        """None if the last frame is a success, else an error label."""
        if self.op == "spawn":
            return None if frame.get("code") == 0 else f"exit {frame.get('code')}"
        try:
            self.b.open_released(req, frame, self.expect)
        except self.b.seal.SealError:
            return "seal does not open"
        except (ValueError, KeyError, TypeError) as exc:
            return f"bad released frame: {exc}"
        return None

    def run(self, concurrency, duration=None, count=None):
        p = self.b.protocol
        subkey = self.b.subkey
        sel = selectors.DefaultSelector()
        lat, errors = [], Counter()
        launched = 0
        deadline = None if duration is None else time.perf_counter() + duration
        state = {}   # socket -> [buffer, next expected frame type, t0, request]
        last = self.replies[-1]
        after = {"hello": self.replies[0]}
        after.update(zip(self.replies, self.replies[1:]))

        def want_more():
            if count is not None:
                return launched < count
            return time.perf_counter() < deadline

        def launch():
            nonlocal launched
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            t0 = time.perf_counter()
            try:
                sock.connect(self.path)
            except BlockingIOError:
                errors["connect-eagain"] += 1
                sock.close()
                return False
            launched += 1
            state[sock] = [bytearray(), "hello", t0, None]
            sel.register(sock, selectors.EVENT_READ)
            return True

        def finish(sock, error=None):
            sel.unregister(sock)
            del state[sock]
            sock.close()
            if error:
                errors[error] += 1

        def on_frame(sock, st, frame):
            """Advance one connection; False once it is finished."""
            kind = frame["type"]
            if kind == "error":
                finish(sock, frame.get("code"))
                return False
            if kind != st[1]:
                finish(sock, f"unexpected {kind} in {st[1]}")
                return False
            if kind == "hello":
                req = p.new_request(self.op, frame["challenge"], **self.fields)
                req["mac"] = p.sign(subkey, req)
                st[3] = req
                sock.setblocking(True)    # one small frame: sendmsg takes it whole
                p.send_frame(sock, req, fds=self.fds)
                sock.setblocking(False)
            elif kind == last:
                elapsed = time.perf_counter() - st[2]
                error = self.check(st[3], frame)
                if error is None:
                    lat.append(elapsed)
                finish(sock, error)
                return False
            st[1] = after[kind]
            return True

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        while len(state) < concurrency and want_more():
            if not launch():
                time.sleep(0.001)
        while state:
            for key, _ in sel.select(60):
                sock = key.fileobj
                st = state[sock]
                try:
                    data = sock.recv(1 << 20)
                except OSError as exc:
                    finish(sock, f"recv: {exc.strerror}")
                    continue
                if not data:
                    finish(sock, f"eof in {st[1]}")
                else:
                    st[0] += data
                    try:
                        frames = split_frames(p, st[0])
                    except p.ProtocolError as exc:
                        finish(sock, f"bad frame: {exc}")
                        frames = ()
                    for frame in frames:
                        try:
                            if not on_frame(sock, st, frame):
                                break
                        except OSError as exc:
                            finish(sock, f"send: {exc.strerror}")
                            break
                while len(state) < concurrency and want_more():
                    if not launch():
                        break
            if not state and want_more():
                launch()
        elapsed = time.perf_counter() - start
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        sel.close()
        gen_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        return {"latencies": lat, "errors": errors, "elapsed": elapsed,
                "completed": len(lat), "gen_cpu": gen_cpu}


# -- sections -----------------------------------------------------------------------


def section_client(b, table, sock):
    q = b.quick
    env = b.env(OV_AGENT_SOCK=sock, CREDENTIALS_DIRECTORY=b.creds, OV_VAULT=b.vaults[10])
    commands = {
        "ov run --agent": [b.ov, "run", "--agent", "--", "/bin/true"],
        "ov run --agent --spawn": [b.ov, "run", "--agent", "--spawn", "--", "/bin/true"],
        "python3 -I -c pass": [SYSTEM_PYTHON, "-I", "-c", "pass"],
        "venv python -I -c pass": [b.vpy, "-I", "-c", "pass"],
        "ov run --machine-key": [b.ov, "run", "--machine-key", str(b.key_path),
                                 "--app", APP, "--", "/bin/true"],
        "/bin/true": ["/bin/true"],
    }
    runs, warmup = (3, 1) if q else (40, 3)
    log(f"1. client latency: hyperfine -N, {len(commands)} commands x {runs} runs")
    hf = b.hyperfine(commands, runs, warmup, env)
    rounds = 6 if q else 100
    log(f"1. client latency: alternating loop agent/spawn/floor, {rounds} rounds")
    alt = b.alternate({"agent": commands["ov run --agent"],
                       "spawn": commands["ov run --agent --spawn"],
                       "floor": commands["python3 -I -c pass"]}, rounds, env)
    table.section("1. Client latency (wall, spawn to exit; hyperfine -N unless noted)")
    rows = (("ov run --agent", "ov run --agent -- /bin/true (release, exec)",
             "client_agent_ms"),
            ("ov run --agent --spawn", "ov run --agent --spawn -- /bin/true", None),
            ("python3 -I -c pass", "python3 -I -c pass (floor)", None),
            ("venv python -I -c pass", "venv python -I -c pass (venv floor)", None),
            ("ov run --machine-key", "ov run --machine-key K --app demo -- /bin/true", None),
            ("/bin/true", "/bin/true", None))
    for name, label, target in rows:
        table.add(f"client.{name}", "  " + label, summary(hf[name]), "ms", scale=1e3,
                  fmt="{:.2f}" if name == "/bin/true" else "{:.1f}", target=target)
    table.add("client.alt.agent", "  ov run --agent (alternating loop)",
              summary(alt["agent"]), "ms", scale=1e3)
    table.add("client.alt.spawn", "  ov run --agent --spawn (alternating loop)",
              summary(alt["spawn"]), "ms", scale=1e3)
    table.add("client.alt.floor", "  python3 -I -c pass (alternating loop)",
              summary(alt["floor"]), "ms", scale=1e3)
    table.add("client.alt.excess", "  agent - floor, alternating (per round)",
              summary([a - f for a, f in zip(alt["agent"], alt["floor"])]), "ms",
              scale=1e3)
    table.add("client.ratio.alt", "  agent/floor, alternating (median of rounds)",
              summary([a / f for a, f in zip(alt["agent"], alt["floor"])]), "x",
              fmt="{:.2f}", target="ratio_agent_floor")
    table.add("client.ratio.spawn.alt", "  spawn/floor, alternating (median of rounds)",
              summary([a / f for a, f in zip(alt["spawn"], alt["floor"])]), "x",
              fmt="{:.2f}")
    floor = statistics.median(hf["python3 -I -c pass"])
    for key, name, label in (("client.ratio.hyperfine", "ov run --agent", "agent"),
                             ("client.ratio.spawn.hyperfine", "ov run --agent --spawn",
                              "spawn")):
        ratio = statistics.median(hf[name]) / floor
        table.add(key, f"  {label}/floor, hyperfine (ratio of medians; cross-check)",
                  None, "", value=f"{ratio:.2f} x")
    mk_ratio = statistics.median(hf["ov run --machine-key"]) / statistics.median(
        hf["ov run --agent"])
    table.add("client.ratio.mk", "  machine-key/agent, hyperfine", None, "",
              value=f"{mk_ratio:.2f} x")


# (op, N) of section 2: the release flow at every level, the spawn flow at the load
# of the N=32 target (information: it forks /bin/true per request).
THROUGHPUT_LEVELS = (("release", 1), ("release", 8), ("release", 32), ("spawn", 32))


def section_throughput(b, table, proc, sock):
    q = b.quick
    gens = {"release": LoadGenerator(b, sock, "release", expect=10),
            "spawn": LoadGenerator(b, sock, "spawn")}
    trials, duration = (1, 0.4) if q else (5, 1.5)
    log(f"2. throughput: warm-up, then {trials} trials x {duration}s for "
        f"{', '.join(f'{op} N={n}' for op, n in THROUGHPUT_LEVELS)} (round robin)")
    gens["release"].run(8, count=40 if q else 300)
    gens["spawn"].run(8, count=20 if q else 100)
    results = defaultdict(list)
    for _ in range(trials):
        for op, n in THROUGHPUT_LEVELS:
            cpu0, host0 = proc_cpu(proc.pid), host_cpu()
            res = gens[op].run(n, duration=duration)
            cpu1, host1 = proc_cpu(proc.pid), host_cpu()
            res["host_idle"] = (host1[0] - host0[0]) / max(host1[1] - host0[1], 1)
            res["agent_cpu"] = cpu1[0] - cpu0[0]
            res["child_cpu"] = cpu1[1] - cpu0[1]
            res["agent_sys"] = cpu1[2] - cpu0[2]
            results[op, n].append(res)
    perf = {}
    for op, n in THROUGHPUT_LEVELS:
        res, counts = perf_stat(
            proc.pid, lambda op=op, n=n: gens[op].run(n, count=100 if q else 1000),
            b.tmp / f"perf-{op}-{n}.csv")
        if counts:
            perf[op, n] = {k: v / max(res["completed"], 1) for k, v in counts.items()}
    counters = b.status(sock)["counters"]
    table.section("2. Agent throughput/latency (load generator: 1 process, 1 thread, "
                  "selectors; release: all 10 secrets, seal opened; spawn: /bin/true)")
    for op, n in THROUGHPUT_LEVELS:
        rs = results[op, n]
        key = f"tput.{op}.{n}"
        who = f"  N={n:<2}" if op == "release" else f"  spawn N={n:<2}"
        what = "requests" if op == "release" else "runs"
        main = op == "release" and n == 32
        runs = [r["completed"] / r["elapsed"] for r in rs]
        lat = [x for r in rs for x in r["latencies"]]
        ok = sum(r["completed"] for r in rs)
        errors = sum((r["errors"] for r in rs), Counter())
        table.add(f"{key}.rate", f"{who} {what}/s (host CPU idle %)",
                  summary(runs, "range"), "/s", fmt="{:.0f}",
                  target="requests_per_s_n32" if main else None)
        idle = statistics.median(r["host_idle"] for r in rs) * 100
        table.annotate(f" ({idle:.0f}%)")
        table.data[f"{key}.rate"]["host_idle_pct"] = idle
        table.add(f"{key}.p50", f"{who} latency p50", summary(lat), "ms",
                  fmt="{:.2f}", scale=1e3)
        p99 = pct(lat, 99)
        p99s = [pct(r["latencies"], 99) for r in rs]
        table.add(f"{key}.p99", f"{who} latency p99 (spread: per-trial p99)",
                  {"median": p99, "lo": min(p99s), "hi": max(p99s), "n": len(lat),
                   "spread": "range"}, "ms", fmt="{:.2f}", scale=1e3,
                  target="p99_n32_ms" if main else None)
        table.add(f"{key}.cpu", f"{who} agent CPU/request (%busy of 1 core, %sys)",
                  summary([r["agent_cpu"] / max(r["completed"], 1) for r in rs], "range"),
                  "ms", fmt="{:.3f}", scale=1e3)
        busy = statistics.median(r["agent_cpu"] / r["elapsed"] for r in rs) * 100
        kernel = 100 * sum(r["agent_sys"] for r in rs) / max(
            sum(r["agent_cpu"] for r in rs), 1e-9)
        table.annotate(f" ({busy:.0f}%, {kernel:.0f}%)")
        table.data[f"{key}.cpu"]["busy_pct"] = busy
        table.data[f"{key}.cpu"]["sys_pct"] = kernel
        if op == "spawn":
            table.add(f"{key}.child", f"{who} child /bin/true CPU/request",
                      summary([r["child_cpu"] / max(r["completed"], 1) for r in rs],
                              "range"), "ms", fmt="{:.3f}", scale=1e3)
        table.add(f"{key}.gen", f"{who} generator CPU/request (%busy)",
                  summary([r["gen_cpu"] / max(r["completed"], 1) for r in rs], "range"),
                  "ms", fmt="{:.3f}", scale=1e3)
        busy = statistics.median(r["gen_cpu"] / r["elapsed"] for r in rs) * 100
        table.annotate(f" ({busy:.0f}%)")
        label = f"{who} per req (perf stat): ctx-sw/futex/faults"
        if (op, n) in perf:
            c = perf[op, n]
            table.add(f"{key}.perf", label, None, "",
                      value=f"{c['context-switches']:.1f} / "
                      f"{c['syscalls:sys_enter_futex']:.1f} / {c['page-faults']:.0f}")
            table.data[f"{key}.perf"] = c
        else:
            table.add(f"{key}.perf", label, None, "", value="n/a (no perf)")
        table.data[f"{key}.errors"] = dict(errors)
        table.add(f"{key}.err", f"{who} requests ok / errors", None, "",
                  value=f"{ok} / {sum(errors.values())}" +
                  (f" {dict(errors)}" if errors else ""))
    table.add("tput.counters", "  agent status counters: released/accepted/denied/busy",
              None, "", value="/".join(str(counters.get(name, "?")) for name in
                                       ("released", "accepted", "denied", "busy")))
    table.data["tput.counters"]["counters"] = counters


def section_memory(b, table, proc, sock, idle_rss):
    q = b.quick
    gen = LoadGenerator(b, sock, "release", expect=10)
    warm, total, step = (100, 200, 100) if q else (1000, b.args.leak_requests, 2000)
    log(f"4. memory: {warm} warm-up releases, then {total} releases (N=8), "
        f"VmRSS every {step}")
    gen.run(8, count=warm)
    rss0 = proc_status(proc.pid, "VmRSS")
    samples, errors = [rss0], Counter()
    for _ in range(total // step):
        res = gen.run(8, count=step)
        errors += res["errors"]
        samples.append(proc_status(proc.pid, "VmRSS"))
    hwm = proc_status(proc.pid, "VmHWM")
    table.section("4. Agent memory (KiB from /proc/PID/status)")
    table.add("mem.idle", "  VmRSS idle (fresh agent, no request yet)",
              summary([idle_rss / 1024]), "MiB", target="rss_idle_mib")
    table.add("mem.warm", f"  VmRSS after {warm} warm-up releases (N=8)",
              summary([rss0 / 1024]), "MiB")
    table.add("mem.after", f"  VmRSS after {total} more releases",
              summary([samples[-1] / 1024]), "MiB")
    table.add("mem.growth", f"  growth over those {total} requests",
              summary([(samples[-1] - rss0) / 1024]), "MiB", fmt="{:.2f}",
              target="rss_growth_mib")
    steps = [later - earlier for earlier, later in itertools.pairwise(samples)]
    table.add("mem.slope", f"  growth per {step} requests (per-step median, range)",
              summary(steps, "range"), "KiB", fmt="{:.0f}")
    nonce = subprocess.run([b.vpy, "-c", NONCE_SCRIPT], capture_output=True, text=True,
                           env=b.env(), timeout=60, check=True)
    per_nonce = float(nonce.stdout)
    table.add("mem.nonce", f"  expected from NonceCache ({per_nonce:.0f} B/entry)",
              summary([per_nonce * total / 2**20]), "MiB", fmt="{:.2f}")
    table.add("mem.hwm", "  VmHWM (peak of the agent's life" + (", incl. N=32 of section 2)"
                                                              if b.ran_load else ")"),
              summary([hwm / 1024]), "MiB")
    table.add("mem.err", "  requests errors", None, "",
              value=str(sum(errors.values())) + (f" {dict(errors)}" if errors else ""))


def activate(b, name, setenv=()):
    """systemd-socket-activate listening on a fresh socket, the agent not started yet.
    Returns (process, socket path, log file)."""
    sock = b.run_dir / name / "agent.sock"
    sock.parent.mkdir(mode=0o700)
    errlog = b.tmp / f"{name}.log"
    env_args = [arg for value in (f"OV_VAULT={b.vaults[10]}", *setenv)
                for arg in ("-E", value)]
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(sock), "--fdname=ov-agent", *env_args,
             b.ov, "agent", "start", "--machine-key", str(b.key_path), "--app", APP],
            env=b.env(), cwd=b.home, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    b.procs.append(proc)
    wait_for_line(errlog, "Listening on", proc, timeout=10)
    return proc, str(sock), errlog


def section_cold(b, table):
    q = b.quick
    rounds = 1 if q else 5
    log(f"3. cold start: {rounds} fresh socket activations")
    cold, warm = [], []
    for i in range(rounds):
        proc, sock, _ = activate(b, f"cold-{i}")
        env = b.env(OV_AGENT_SOCK=sock, CREDENTIALS_DIRECTORY=b.creds)
        argv = [b.ov, "run", "--agent", "--", "/bin/true"]
        cold.append(b.spawn_time(argv, env))
        warm.append(b.spawn_time(argv, env))
        b.stop_agent(proc)
    table.section("3. Cold start (systemd-socket-activate; ov run --agent -- /bin/true, "
                  "spawn to exit)")
    table.add("cold.first", "  first request, agent not running", summary(cold, "range"),
              "ms", scale=1e3, target="cold_ms")
    table.add("cold.second", "  second request, same agent (warm)", summary(warm, "range"),
              "ms", scale=1e3)
    table.add("cold.delta", "  activation cost (first - second, per round)",
              summary([c - w for c, w in zip(cold, warm)], "range"), "ms", scale=1e3)


def section_scale(b, table, sizes):
    q = b.quick
    agents = {}
    for size in sizes:
        agents[size] = b.start_agent(f"scale-{size}", b.vaults[size])
    env = b.env(CREDENTIALS_DIRECTORY=b.creds)
    commands = {}
    for size in sizes:
        base = [b.ov, "run", "--agent", "--socket", agents[size][1]]
        commands[f"one-{size}"] = base + ["--secrets", ONE, "--", "/bin/true"]
        commands[f"all-{size}"] = base + ["--", "/bin/true"]
    runs, warmup = (2, 1) if q else (15, 2)
    log(f"5. scale: hyperfine -N, {len(commands)} commands x {runs} runs")
    hf = b.hyperfine(commands, runs, warmup, env)
    small, big = sizes[0], sizes[-1]
    rounds = 4 if q else 40
    log(f"5. scale: alternating loops, {rounds} rounds")
    alt = b.alternate({"small": commands[f"one-{small}"], "big": commands[f"one-{big}"]},
                      rounds, env)
    proto = defaultdict(list)
    for i in range(rounds):
        order = sizes if i % 2 == 0 else sizes[::-1]
        for size in order:
            proto[size].append(b.request(agents[size][1], secrets=[ONE], expect=1))
    proto_all = defaultdict(list)
    for i in range(2 if q else 5):
        order = sizes if i % 2 == 0 else sizes[::-1]
        for size in order:
            proto_all[size].append(b.request(agents[size][1], secrets=None,
                                             expect=size))
    for proc, _ in agents.values():
        b.stop_agent(proc)
    table.section(f"5. Scale: vaults of {', '.join(map(str, sizes))} secrets in one env "
                  "(each its own fresh agent)")
    for size in sizes:
        table.add(f"scale.one.{size}", f"  {size:>5}: ov run --agent --secrets ONE",
                  summary(hf[f"one-{size}"]), "ms", scale=1e3)
    for size in sizes:
        table.add(f"scale.all.{size}", f"  {size:>5}: ov run --agent (all secrets)",
                  summary(hf[f"all-{size}"]), "ms", scale=1e3)
    for size in sizes:
        table.add(f"scale.proto.one.{size}", f"  {size:>5}: release round trip, ONE "
                  "(in-process, seal opened)", summary(proto[size]), "ms", fmt="{:.2f}",
                  scale=1e3)
    for size in sizes:
        table.add(f"scale.proto.all.{size}", f"  {size:>5}: release round trip, all "
                  "(in-process, seal opened)", summary(proto_all[size], "range"), "ms",
                  scale=1e3)
    hf_ratio = statistics.median(hf[f"one-{big}"]) / statistics.median(hf[f"one-{small}"])
    table.add("scale.ratio.hyperfine", f"  ONE {big}/{small}, hyperfine (ratio of medians; "
              "cross-check)", None, "", value=f"{hf_ratio:.2f} x")
    table.add("scale.ratio.alt", f"  ONE {big}/{small}, ov run --agent alternating",
              summary([x / y for x, y in zip(alt["big"], alt["small"])]), "x",
              fmt="{:.2f}", target="scale_one_ratio")
    table.add("scale.ratio.proto", f"  ONE {big}/{small}, release round trip alternating",
              summary([x / y for x, y in zip(proto[big], proto[small])]), "x",
              fmt="{:.2f}", target="scale_one_ratio")


CLIENT_SCRIPT = r"""
import cProfile, io, pstats, sys, time
t0 = time.perf_counter()
from ovagent import entry
getattr(entry, "_skip_openssl", lambda: None)()   # as the real client does, if it does
from ovagent import client, config, keyfile, protocol, runner, seal
t1 = time.perf_counter()
argv = sys.argv[2:]
execs = []
# In-process, the release flow must not exec /bin/true: record the call instead.
runner.exec_with_secrets = lambda command, secrets: execs.append(len(secrets))

def once():
    try:
        entry.main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code

once()
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    once()
    times.append(time.perf_counter() - t)
times.sort()
print(f"  ovagent.entry/client/config/protocol/seal imported in {(t1 - t0) * 1e3:.1f} ms "
      "(in this process, interpreter already up); then")
print(f"  entry.main({' '.join(argv)}) in-process: median "
      f"{times[len(times) // 2] * 1e3:.2f} ms, min {times[0] * 1e3:.2f} ms "
      f"({len(times)} runs; includes the agent round trip"
      + (", not the exec)" if execs else ")"))
profile = cProfile.Profile()
profile.enable()
for _ in range(int(sys.argv[1])):
    once()
profile.disable()
out = io.StringIO()
pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(14)
text = out.getvalue()
print("  cProfile, by own time:")
print("\n".join("  " + line for line in text[text.index("ncalls"):].splitlines()[:15]))
"""

NONCE_SCRIPT = """
import os, tracemalloc
from ovagent.agent import NonceCache
cache = NonceCache()
nonces = [os.urandom(16).hex() for _ in range(20000)]
tracemalloc.start()
before = tracemalloc.get_traced_memory()[0]
for nonce in nonces[:10000]:
    cache.add(nonce)
mid = tracemalloc.get_traced_memory()[0]
for nonce in nonces[10000:]:
    cache.add(nonce)
after = tracemalloc.get_traced_memory()[0]
# the nonce strings themselves arrive in each request and stay referenced by the cache
print((after - before) / 20000 + (len(nonces[0]) + 49))
"""

ARGON2_SCRIPT = """
import json, sys, time
from ovagent.vault import Vault
vault = Vault.open(sys.argv[1])
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    vault.unlock(sys.argv[3].encode())
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "kdf": vault.kdf.__dict__}))
"""


def section_argon2(b, table):
    count = 1 if b.quick else 5
    log(f"6. Argon2id: {count} unlocks in-process")
    result = subprocess.run([b.vpy, "-c", ARGON2_SCRIPT, str(b.base_vault), str(count),
                             PASSWORD], capture_output=True, env=b.env(), timeout=120,
                            check=True)
    data = json.loads(result.stdout)
    kdf = data["kdf"]
    table.section(f"6. Argon2id unlock (Vault.open(path).unlock(password), in-process; "
                  f"t={kdf['time_cost']}, m={kdf['memory_kib'] // 1024} MiB, "
                  f"p={kdf['parallelism']})")
    table.add("argon2.unlock", "  unlock time", summary(data["times"], "range"), "s",
              fmt="{:.3f}")


# -- profiles -------------------------------------------------------------------------


def pyspy_profile(b, pid, seconds, driver, out):
    """py-spy record (raw collapsed stacks) of pid while driver() runs."""
    spy = subprocess.Popen([str(b.venv / "bin" / "py-spy"), "record", "-p", str(pid),
                            "-d", str(seconds), "-r", "250", "-f", "raw", "-o", str(out),
                            *(["--native"] if b.args.native else ["--nonblocking"]),
                            *(["--gil"] if b.args.gil else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    stats = driver()
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not out.exists():
        raise SystemExit(f"bench: py-spy failed: {err.decode(errors='replace')[-2000:]}")
    return stats


def perf_profile(b, pid, driver, per_request, top=25):
    """``perf record`` (999 Hz, no call graphs) of the agent while driver() runs: its
    CPU by shared object (the interpreter, the kernel, libcrypto, sqlite...) and by
    symbol, each share also in ms per request (share x *per_request*, the agent's CPU
    per request measured without perf, in seconds).  Returns (text, driver result,
    (agent CPU per request, kernel share) while perf recorded), text None without
    perf or when perf refuses."""
    data = b.tmp / "perf.data"
    def measured():
        before = proc_cpu(pid)
        outcome = driver()
        return before, outcome, proc_cpu(pid)

    cpu0, res, cpu1 = while_watched(["perf", "record", "-F", "999", "-p", str(pid), "-o",
                                     str(data)], measured, settle=0.5)
    under = ((cpu1[0] - cpu0[0]) / max(res["completed"], 1),
             (cpu1[2] - cpu0[2]) / max(cpu1[0] - cpu0[0], 1e-9))
    out = []
    for sort, limit in (("dso", 10), ("dso,sym", top)):
        result = subprocess.run(["perf", "report", "-i", str(data), "--stdio",
                                 "--no-children", "--sort", sort, "--percent-limit",
                                 "0.5"], capture_output=True, text=True, timeout=300,
                                check=False)
        rows = [line for line in result.stdout.splitlines()
                if line.strip() and not line.startswith("#")]
        if result.returncode != 0 or not rows:
            return None, res, under
        out.append(f"  by {'shared object' if sort == 'dso' else 'symbol'}:"
                   f"   %  ms/req")
        for line in rows[:limit]:
            share = float(line.split("%")[0])
            out.append(f"  {share:6.1f}  {share * per_request * 10:6.3f}  "
                       f"{' '.join(line.split()[1:])}")
    data.unlink(missing_ok=True)
    return "\n".join(out), res, under


def summarize_collapsed(path, top=18, cpu_per_request=None, gil=False):
    """Inclusive and self shares per function from py-spy's collapsed stacks, and the
    lines with the most self samples; with cpu_per_request (s), also an estimate of
    each share in ms per request."""
    inclusive, selfs, lines_self, total = Counter(), Counter(), Counter(), 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        raw = stack.split(";")
        frames = [re.sub(r":\d+\)$", ")", f) for f in raw]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        selfs[frames[-1]] += count
        lines_self[raw[-1]] += count
    per = (cpu_per_request or 0) * 1e3

    def row(frame):
        inc, own = inclusive[frame] / total, selfs[frame] / total
        est = f"{inc * per:8.3f}" if per else ""
        return f"  {100 * inc:9.1f}  {100 * own:5.1f}  {est}   {frame}"

    what = ("the thread holding the GIL (py-spy --gil" if gil
            else "busy threads (py-spy")
    lines = [f"  {total} samples of {what}, 250 Hz, idle excluded)"
             + ("; ms/req = inclusive share x agent CPU per request (estimate)"
                if per else ""),
             "  inclusive%  self%" + ("  ms/req" if per else "") + "   function (file)"
             "   [call wrappers of threading/argh/cli hidden]"]
    wrappers = re.compile(r"\((threading\.py|argh/[^)]*|ovagent/(cli|entry|daemon)\.py|ov)\)$|"
                          r"^<module>")
    shown = 0
    for frame, count in inclusive.most_common():
        if shown >= top or count / total < 0.01:
            break
        if wrappers.search(frame) and not frame.startswith(("Thread.start", "Condition")):
            continue
        lines.append(row(frame))
        shown += 1
    lines.append("  -- top self --")
    for frame, _ in selfs.most_common(top):
        lines.append(row(frame))
    lines.append("  -- top self lines (a line that calls C code which drops the GIL, a "
                 "lock or a blocking call also holds threads waiting to take the GIL "
                 "back) --")
    for frame, count in lines_self.most_common(10):
        est = f"{count / total * per:8.3f}" if per else ""
        lines.append(f"  {'':9}  {100 * count / total:5.1f}  {est}   {frame}")
    return "\n".join(lines)


def parse_importtime(text, selfs, cumuls, depth0):
    """Add one run's ``-X importtime`` lines to the per-module sample lists."""
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            selfs[m[4]].append(int(m[1]))
            cumuls[m[4]].append(int(m[2]))
            if not m[3]:
                depth0.add(m[4])


def format_importtime(selfs, cumuls, depth0, first_line, top=15):
    med_self = {k: statistics.median(v) for k, v in selfs.items()}
    med_cum = {k: statistics.median(v) for k, v in cumuls.items()}
    total = sum(med_self.values())
    lines = [(f"  {first_line}; sum of import self times {total / 1e3:.1f} ms, "
              f"{len(med_self)} modules"),
             "  top-level imports by cumulative ms:"]
    for name in sorted(depth0, key=lambda n: -med_cum[n])[:top]:
        lines.append(f"    {med_cum[name] / 1e3:7.2f}  {name}")
    lines.append("  modules by self ms:")
    for name, us in sorted(med_self.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {us / 1e3:7.2f}  {name}")
    return "\n".join(lines)


def importtime_profile(b, argv, env, runs=5):
    """Median self/cumulative import times (us) over runs of python -X importtime."""
    selfs, cumuls, walls, depth0 = defaultdict(list), defaultdict(list), [], set()
    for _ in range(runs):
        t0 = time.perf_counter()
        result = subprocess.run([b.vpy, "-X", "importtime", *argv], env=env, cwd=b.home,
                                capture_output=True, timeout=60, check=False)
        walls.append(time.perf_counter() - t0)
        if result.returncode != 0:
            raise SystemExit(f"bench: {argv} failed: {result.stderr.decode()[-1500:]}")
        parse_importtime(result.stderr.decode(errors="replace"), selfs, cumuls, depth0)
    return format_importtime(selfs, cumuls, depth0,
                             f"wall {statistics.median(walls) * 1e3:.1f} ms (median of "
                             f"{runs}, with -X importtime)")


def cold_importtime_profile(b, rounds=3):
    """Imports of a socket-activated agent (PYTHONPROFILEIMPORTTIME=1), per activation."""
    selfs, cumuls, depth0, walls = defaultdict(list), defaultdict(list), set(), []
    for i in range(rounds):
        proc, sock, errlog = activate(b, f"prof-cold-{i}", ("PYTHONPROFILEIMPORTTIME=1",))
        env = b.env(OV_AGENT_SOCK=sock, CREDENTIALS_DIRECTORY=b.creds)
        walls.append(b.spawn_time([b.ov, "run", "--agent", "--", "/bin/true"], env))
        b.stop_agent(proc)
        parse_importtime(errlog.read_text(errors="replace"), selfs, cumuls, depth0)
    return format_importtime(selfs, cumuls, depth0,
                             f"first request {statistics.median(walls) * 1e3:.1f} ms "
                             f"(median of {rounds}, with importtime on)")


def strace_profile(b, op, requests=300):
    """Syscalls per request of the agent (strace -f -c; for spawn, -f also follows each
    vforked child through the exec of /bin/true, so its syscalls are in the counts)."""
    proc, sock = b.start_agent("strace", b.vaults[10])
    gen = LoadGenerator(b, sock, op, expect=10 if op == "release" else None)
    gen.run(4, count=100)
    out = b.tmp / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-c", "-S", "calls", "-o", str(out), "-p",
                               str(proc.pid)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    log(f"profile: strace -f -c of the agent over {requests} {op} requests (N=4)")
    res = gen.run(4, count=requests)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(30)
    b.stop_agent(proc)
    what = ("includes the vforked child and /bin/true itself" if op == "spawn"
            else "release: no child")
    lines = [(f"== agent syscalls per request: strace -f -c over {res['completed']} "
              f"{op} requests (N=4; {what}) =="),
             "  calls/req  errors/req  syscall"]
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            errors = int(parts[4]) if len(parts) == 6 else 0
            calls = int(parts[3])
            if calls / res["completed"] >= 0.5:
                lines.append(f"  {calls / res['completed']:9.1f}  {errors / res['completed']:10.1f}"
                             f"  {parts[-1]}")
    return "\n".join(lines)


def run_profiles(b):
    log("profile: installing py-spy into the throwaway venv")
    subprocess.run([str(b.venv / "bin" / "pip"), "install", "-q", "py-spy"], check=True,
                   timeout=300, stdout=subprocess.DEVNULL)
    seconds = 3 if b.quick else 10
    op, n = b.args.profile_op, b.args.profile_clients
    out = []
    proc, sock = b.start_agent("profile", b.vaults[10])
    gen = LoadGenerator(b, sock, op, expect=10 if op == "release" else None)
    stacks = b.tmp / f"agent-{op}-n{n}.txt"
    gen.run(n, count=200)
    cpu0 = proc_cpu(proc.pid)
    log(f"profile: agent under load, {op} N={n} for {seconds}s")
    res = pyspy_profile(b, proc.pid, seconds, lambda: gen.run(n, duration=seconds), stacks)
    cpu1 = proc_cpu(proc.pid)
    per_request = (cpu1[0] - cpu0[0]) / max(res["completed"], 1)
    kernel = 100 * (cpu1[2] - cpu0[2]) / max(cpu1[0] - cpu0[0], 1e-9)
    rate = res["completed"] / res["elapsed"]
    lat = res["latencies"]
    out.append(f"== agent under load: {op} N={n}, all 10 secrets"
               f"{', /bin/true' if op == 'spawn' else ''}: {res['completed']} requests "
               f"({rate:.0f}/s, p50 {pct(lat, 50) * 1e3:.1f} ms, p99 "
               f"{pct(lat, 99) * 1e3:.1f} ms, errors {sum(res['errors'].values())}; "
               f"generator {res['gen_cpu'] / max(res['completed'], 1) * 1e3:.3f} ms CPU/"
               f"request), {per_request * 1e3:.3f} ms agent CPU per request ({kernel:.0f}% "
               "of it in the kernel; while sampled) ==")
    out.append(summarize_collapsed(stacks, cpu_per_request=per_request,
                                   gil=b.args.gil))
    if shutil.which("perf"):
        log(f"profile: perf record of the agent, {op} N={n} for {seconds}s")
        text, _, (under, kernel_under) = perf_profile(
            b, proc.pid, lambda: gen.run(n, duration=seconds), per_request)
        out.append(f"\n== agent under load, {op} N={n}: perf record -F 999 (interpreter, "
                   "kernel, libraries); ms/req = share x the agent CPU per request "
                   f"without perf ({per_request * 1e3:.3f} ms, {kernel:.0f}% kernel); "
                   f"while perf records: {under * 1e3:.3f} ms, {kernel_under * 100:.0f}% "
                   "kernel (perf switches its counters at each context switch, in "
                   "finish_task_switch, which adds to the kernel's samples) ==")
        out.append(text or "  perf record/report failed")
    b.stop_agent(proc)
    big = max(b.vaults)
    if big > 10:
        proc, sock = b.start_agent("profile-big", b.vaults[big])
        gen = LoadGenerator(b, sock, "release", expect=big)
        log(f"profile: agent releasing all {big} secrets, N=1 for {seconds}s")
        cpu0 = proc_cpu(proc.pid)
        res = pyspy_profile(b, proc.pid, seconds, lambda: gen.run(1, duration=seconds),
                            b.tmp / "agent-all.txt")
        per_request = (proc_cpu(proc.pid)[0] - cpu0[0]) / max(res["completed"], 1)
        out.append(f"\n== agent releasing ALL {big} secrets (N=1): {res['completed']} "
                   f"requests, {per_request * 1e3:.1f} ms agent CPU per request ==")
        out.append(summarize_collapsed(b.tmp / "agent-all.txt",
                                       cpu_per_request=per_request, gil=b.args.gil))
        b.stop_agent(proc)
    if shutil.which("strace"):
        out.append("")
        out.append(strace_profile(b, op))
    for d in (stacks.name, "agent-all.txt"):
        if b.args.profile_out and (b.tmp / d).exists():
            Path(b.args.profile_out).mkdir(parents=True, exist_ok=True)
            shutil.copy2(b.tmp / d, Path(b.args.profile_out) / d)
    proc, sock = b.start_agent("profile-client", b.vaults[10])
    env = b.env(OV_AGENT_SOCK=sock, CREDENTIALS_DIRECTORY=b.creds)
    log("profile: python -X importtime of the clients")
    for flags in ([], ["--spawn"]):
        argv = ["run", "--agent", *flags, "--", "/bin/true"]
        out.append(f"\n== client: python -X importtime ov {' '.join(argv)} ==")
        out.append(importtime_profile(b, [b.ov, *argv], env))
        out.append(f"\n== client: runtime of entry.main({' '.join(argv)}) with its "
                   "modules already imported ==")
        result = subprocess.run([b.vpy, "-c", CLIENT_SCRIPT, "10" if b.quick else "50",
                                 *argv], env=env, cwd=b.home, capture_output=True,
                                text=True, timeout=120, check=False)
        out.append(result.stdout.rstrip() if result.returncode == 0 else
                   f"  failed: {result.stderr[-1500:]}")
    out.append("\n== client: python -X importtime ov run --machine-key K -- /bin/true ==")
    out.append(importtime_profile(b, [b.ov, "run", "--machine-key", str(b.key_path),
                                      "--app", APP, "--", "/bin/true"],
                                  dict(env, OV_VAULT=b.vaults[10])))
    b.stop_agent(proc)
    log("profile: imports of a socket-activated agent")
    out.append("\n== cold start: imports of a socket-activated agent "
               "(PYTHONPROFILEIMPORTTIME=1) ==")
    out.append(cold_importtime_profile(b))
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------


def loadavg():
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def header(args, setup_s, import_s, load_start):
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always",
                                 "--dirty"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
    except OSError:
        commit = "?"
    hf = subprocess.run(["hyperfine", "--version"], capture_output=True, text=True,
                        check=False).stdout.strip()
    imports = ", ".join(f"{n}: {s:.2f}s" for n, s in import_s.items())
    return "\n".join([
        f"== ov bench{' (QUICK: tiny counts, numbers meaningless)' if args.quick else ''} ==",
        (f"source {REPO} @ {commit}; {platform.platform()}; {os.cpu_count()} CPUs; "
         f"loadavg at start {load_start}, at end {loadavg()}"),
        f"python {platform.python_version()} (bench), {SYSTEM_PYTHON} for the venv; {hf}",
        f"setup {setup_s:.1f}s (non-editable venv + vaults; secret import {imports})",
        "spread: IQR = p25–p75, range = min–max; targets: issue #12 (bench/run.py TARGETS)",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts (smoke test); numbers are meaningless")
    parser.add_argument("--sections", default="1,2,3,4,5,6",
                        help="comma-separated sections to run (default all)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table: py-spy profile of the agent under "
                             "load and python -X importtime of the clients")
    parser.add_argument("--profile-out", metavar="DIR",
                        help="with --profile: keep the raw collapsed stacks here")
    parser.add_argument("--profile-clients", type=int, default=32, metavar="N",
                        help="with --profile: concurrent connections while the agent "
                             "is sampled (default 32, as the p99 target)")
    parser.add_argument("--profile-op", choices=("release", "spawn"), default="release",
                        help="with --profile: the flow the agent is sampled under "
                             "(default release, as the N=32 targets)")
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: py-spy --gil (only the thread holding the "
                             "GIL is sampled: where the agent's Python CPU goes, without "
                             "the threads that wait for the GIL)")
    parser.add_argument("--native", action="store_true",
                        help="with --profile: py-spy --native (C frames; pauses the "
                             "agent at each sample instead of --nonblocking)")
    parser.add_argument("--leak-requests", type=int, default=10000, metavar="N",
                        help="requests of the memory section's leak check (default "
                             "10000; multiples of 2000)")
    parser.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (debug)")
    args = parser.parse_args()
    sections = {int(s) for s in args.sections.split(",") if s.strip()}
    for tool in ("hyperfine", "systemd-socket-activate"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install "
                             f"{'hyperfine' if tool == 'hyperfine' else 'systemd'}; "
                             "tests/extra-apt-packages lists it)")
    os.umask(0o077)
    b = Bench(args)
    atexit.register(b.cleanup)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _: sys.exit(128 + n))
    t_start, load_start = time.perf_counter(), loadavg()
    log(f"building a non-editable venv in {b.tmp}")
    b.build_venv()
    if args.quick:
        sizes = (10, 100, 1000)
    else:
        sizes = (10, 1000, 10000)
    if not (5 in sections or args.profile):
        sizes = (10,)
    log(f"building vaults with {', '.join(map(str, sizes))} secrets")
    _, import_s = b.build_vaults(sizes)
    setup_s = time.perf_counter() - t_start
    os.chdir(b.home)
    if args.profile:
        print(header(args, setup_s, import_s, load_start))
        print(run_profiles(b))
        return
    table = Table()
    if sections & {1, 2, 4}:
        proc, sock = b.start_agent("main", b.vaults[10])
        time.sleep(0.2)
        idle_rss = proc_status(proc.pid, "VmRSS")
        if 1 in sections:
            section_client(b, table, sock)
        if 2 in sections:
            section_throughput(b, table, proc, sock)
            b.ran_load = True
        if 4 in sections:
            section_memory(b, table, proc, sock, idle_rss)
        b.stop_agent(proc)
    if 3 in sections:
        section_cold(b, table)
    if 5 in sections:
        section_scale(b, table, sizes)
    if 6 in sections:
        section_argon2(b, table)
    # sections in numeric order in the printed table
    blocks, current = [], None
    for row in table.rows:
        if row[0] == "section":
            current = [row]
            blocks.append(current)
        else:
            current.append(row)
    blocks.sort(key=lambda blk: int(blk[0][1].split(".")[0]))
    table.rows = [row for blk in blocks for row in blk]
    print(header(args, setup_s, import_s, load_start))
    print(table.render())
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(table.data, indent=1, default=str))


if __name__ == "__main__":
    main()
