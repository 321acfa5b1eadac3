"""A throwaway PostgreSQL 15 cluster, run with Debian's postgresql-15 (its own initdb
and pg_ctl, never the system cluster) as an unprivileged user, in a temporary
directory that user owns, listening only on a Unix socket in that directory.  The
test fixtures (tests/pg.py) and the bench (bench/fleet.py) use it; no pytest here.
"""

import importlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"        # the unprivileged user the cluster runs as (tests run as root)
INSTALL_HINT = ("run tests/bootstrap.sh (as root) to install postgresql-15 and "
                "python3-psycopg, and psycopg into .venv-pypi")
TIMEOUT = 60


def missing(need_psycopg=True):
    """Why a cluster cannot run here (or psycopg, when *need_psycopg*, cannot be
    imported), or None."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not os.access(PG_BIN / tool, os.X_OK):
            return f"{PG_BIN / tool} not found (postgresql-15): {INSTALL_HINT}"
    try:
        if need_psycopg:
            importlib.import_module("psycopg")
    except ImportError as error:
        return f"psycopg cannot be imported ({error}): {INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"no user {PG_USER!r} to run the cluster as: {INSTALL_HINT}"
    return None


class PgError(RuntimeError):
    pass


class PgCluster:
    """One throwaway cluster under *base* (data/, sock/, log/pg.log).  Its name (the
    base directory's, e.g. ``ov-pg-k2x9q1``) is its cluster_name, so every one of its
    processes shows it in its title: processes() finds them with pgrep."""

    def __init__(self, base):
        self.base = Path(base)
        self.name = self.base.name
        self.data = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "log" / "pg.log"
        self.startup_seconds = None     # initdb + first start, in seconds
        self._counter = 0

    # -- running the server binaries as the unprivileged user -----------------------

    def run_tool(self, tool, *args, check=True):
        command = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", PG_USER, "--", *command]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", TZ="UTC")
        result = subprocess.run(command, cwd=self.base, env=env, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=TIMEOUT)
        if check and result.returncode != 0:
            raise PgError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                          f"{result.stdout}{result.stderr}{self.log_tail()}")
        return result

    def log_tail(self, lines=30):
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "--- server log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def init(self):
        """Create the directories (owned by the cluster's user) and the cluster."""
        for path in (self.sockdir, self.logfile.parent):
            path.mkdir(parents=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_USER)
            for path in (self.base, self.sockdir, self.logfile.parent):
                os.chown(path, user.pw_uid, user.pw_gid)
        # Other uids (unprivileged ov processes in tests) may reach the socket.
        for path in (self.base, self.sockdir):
            path.chmod(0o755)
        self.run_tool("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres",
                  "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
        settings = {
            "listen_addresses": "''",                   # no TCP: the Unix socket only
            "unix_socket_directories": f"'{self.sockdir}'",
            "cluster_name": f"'{self.name}'",
            "fsync": "off",                             # a throwaway cluster: speed
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "50",
            "log_min_messages": "warning",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/pg.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def start(self):
        self.run_tool("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w",
                  "-t", str(TIMEOUT), "start")

    def stop(self, mode="fast"):
        """Stop the server (pg_ctl -m MODE, waiting); the data stays for start()."""
        self.run_tool("pg_ctl", "-D", str(self.data), "-w", "-t", str(TIMEOUT),
                  "-m", mode, "stop")

    @property
    def running(self):
        if not self.data.is_dir():
            return False
        return self.run_tool("pg_ctl", "-D", str(self.data), "status",
                         check=False).returncode == 0

    def processes(self):
        """PIDs of this cluster's processes (postmaster and children), by pgrep."""
        result = subprocess.run(["pgrep", "-f", re.escape(self.name)],
                                capture_output=True, text=True, timeout=TIMEOUT)
        return [int(pid) for pid in result.stdout.split()]

    def destroy(self):
        """Stop (fast, else immediate, else SIGKILL) and remove the directory."""
        try:
            if self.running:
                try:
                    self.stop("fast")
                except (PgError, subprocess.TimeoutExpired):
                    self.run_tool("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop",
                              check=False)
        finally:
            deadline = time.monotonic() + 10
            while (pids := self.processes()) and time.monotonic() < deadline:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            shutil.rmtree(self.base, ignore_errors=True)

    # -- clients --------------------------------------------------------------------

    def dsn(self, dbname="postgres"):
        """A libpq URI for *dbname* over the cluster's Unix socket."""
        return (f"postgresql:///{quote(dbname, safe='')}"
                f"?host={quote(str(self.sockdir), safe='/')}&user=postgres")

    def connect(self, dbname="postgres", **kwargs):
        import psycopg
        return psycopg.connect(self.dsn(dbname), connect_timeout=10, **kwargs)

    def create_database(self, hint="db"):
        """CREATE DATABASE with a new unique name (from *hint*); returns the name."""
        from psycopg import sql
        self._counter += 1
        slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")[:40]
        name = f"t{self._counter}_{slug}"
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name):
        """DROP DATABASE, disconnecting whoever is still connected to it."""
        from psycopg import sql
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    def databases(self):
        with self.connect() as conn:
            return {row[0] for row in conn.execute(
                "SELECT datname FROM pg_database WHERE NOT datistemplate")}
