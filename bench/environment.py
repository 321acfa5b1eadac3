"""The bench's throwaway world, all of it in one temporary directory removed at exit:
a NON-editable venv of a copy of the sources, vaults, agents on private sockets
(started directly or through systemd-socket-activate), and the processes to end."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"
SYSTEM_PYTHON = "/usr/bin/python3"
PASSWORD = "correct horse battery staple"
APP, ENV = "demo", "production"
ONE = "SECRET_00007"          # present in every generated vault
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def stop(proc, timeout):
    """SIGTERM, then SIGKILL after *timeout* seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Bench:
    """Paths, options and processes of one run; cleanup() removes all of it."""

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
        self.vaults, self.base_vault = {}, None
        self.codec = None       # load.Codec, once the venv and the key exist
        self.ran_load = False

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    stop(proc, 5)
                except OSError:
                    proc.kill()
                    proc.wait()
        if self.args.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def env(self, **extra):
        """A clean, service-like environment for ov (no PYTHON* variables)."""
        env = {"PATH": PATH, "HOME": str(self.home), "LANG": "C.UTF-8",
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
        for package in ("ovagent", "units"):    # units/ ships as ovagent.units
            shutil.copytree(REPO / package, self.src / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages",
                        str(self.venv)], check=True, timeout=120)
        self.pip("install", "-q", "--no-deps", "--no-build-isolation", str(self.src))
        return time.perf_counter() - t0

    def pip(self, *args):
        """The throwaway venv's pip (its output dropped)."""
        subprocess.run([str(self.venv / "bin" / "pip"), *args], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)

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
        self.ov_cmd("app", "create", APP, "--machine-key", str(self.key_path), env=env)
        self.ov_cmd("env", "create", ENV, "--app", APP, env=env)
        import_s = {size: self.vault_copy(base, size) for size in sizes}
        self.base_vault = base
        return time.perf_counter() - t0, import_s

    def vault_copy(self, base, size):
        """A copy of the base vault holding *size* generated secrets; seconds spent
        importing them."""
        path = self.tmp / "vaults" / f"vault-{size}.db"
        for suffix in ("", "-wal"):
            if os.path.exists(f"{base}{suffix}"):
                shutil.copy2(f"{base}{suffix}", f"{path}{suffix}")
        dotenv = self.tmp / f"secrets-{size}.env"
        dotenv.write_text("".join(f"SECRET_{i:05d}=value-{i:05d}-"
                                  "0123456789abcdef0123456789abcdef\n"
                                  for i in range(size)))
        t0 = time.perf_counter()
        self.ov_cmd("secret", "import", str(dotenv), "--app", APP, "--env", ENV,
                    "--machine-key", str(self.key_path), env=self.env(OV_VAULT=path))
        self.vaults[size] = path
        return time.perf_counter() - t0

    def background(self, argv, errlog, env):
        """Start a long-running process (its stderr to *errlog*), ended at cleanup."""
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(argv, env=env, cwd=self.home,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_agent(self, name, vault, extra=()):
        sock = self.run_dir / name / "agent.sock"
        errlog = self.tmp / f"agent-{name}.log"
        proc = self.background(
            [self.ov, "agent", "start", "--foreground", "--machine-key",
             str(self.key_path), "--app", APP, "--socket", str(sock),
             "--max-clients", "64", *extra], errlog, self.env(OV_VAULT=vault))
        wait_for_line(errlog, ": ready:", proc, timeout=30)
        return proc, str(sock)

    def activate(self, name, setenv=()):
        """systemd-socket-activate listening on a fresh socket, the agent not started
        yet.  Returns (process, socket path, log file)."""
        sock = self.run_dir / name / "agent.sock"
        sock.parent.mkdir(mode=0o700)
        errlog = self.tmp / f"{name}.log"
        env_args = [arg for value in (f"OV_VAULT={self.vaults[10]}", *setenv)
                    for arg in ("-E", value)]
        proc = self.background(
            ["systemd-socket-activate", "-l", str(sock), "--fdname=ov-agent", *env_args,
             self.ov, "agent", "start", "--machine-key", str(self.key_path), "--app",
             APP], errlog, self.env())
        wait_for_line(errlog, "Listening on", proc, timeout=10)
        return proc, str(sock), errlog

    def stop_agent(self, proc):
        stop(proc, 15)

    def program(self, name, *args, env=None, **kwargs):
        """Run bench/programs/NAME with the throwaway venv's python, by path: only the
        program's own directory goes first on sys.path, so ovagent is the venv's
        installed copy, never the repository's sources."""
        return subprocess.run([self.vpy, str(PROGRAMS / name), *map(str, args)],
                              env=env or self.env(), cwd=self.home, capture_output=True,
                              **kwargs)

    def client_env(self, sock, **extra):
        """The environment of ``ov run --agent`` talking to the agent at *sock*."""
        return self.env(OV_AGENT_SOCK=sock, CREDENTIALS_DIRECTORY=self.creds, **extra)
