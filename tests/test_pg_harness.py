"""The PostgreSQL harness itself (tests/pg.py), with psycopg: a Unix-socket-only
cluster, fresh isolated databases, LISTEN/NOTIFY, an outage (stop, start: the data
survives), no process left behind at session end even when tests fail, and the
psycopg each venv imports (Debian's 3.1 in .venv-debian, PyPI's in .venv-pypi)."""

import os
import pwd
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pgcluster import PG_USER

psycopg = pytest.importorskip(
    "psycopg", reason="psycopg not installed: run tests/bootstrap.sh")

TESTS = Path(__file__).resolve().parent


def test_connect_create_table_unix_socket_only(pg_db):
    assert pg_db.dsn == (f"postgresql:///{pg_db.name}?host={pg_db.cluster.sockdir}"
                         "&user=postgres")
    with psycopg.connect(pg_db.dsn) as conn:
        assert conn.info.server_version // 10000 == 15
        assert conn.execute("SELECT current_database(), current_user").fetchone() == (
            pg_db.name, "postgres")
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SELECT inet_server_addr()").fetchone() == (None,)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        conn.execute("CREATE TABLE secrets (name text PRIMARY KEY, version int NOT NULL)")
        conn.execute("INSERT INTO secrets VALUES ('A', 1), ('B', 2)")
    with pg_db.connect() as conn:
        assert conn.execute("SELECT name, version FROM secrets ORDER BY name").fetchall() \
            == [("A", 1), ("B", 2)]
    sock = pg_db.cluster.sockdir / ".s.PGSQL.5432"
    assert sock.is_socket()


def test_the_cluster_runs_unprivileged_in_its_own_directory(pg):
    pids = pg.processes()
    assert len(pids) >= 3, pids               # postmaster, checkpointer, writers, ...
    owner = pwd.getpwnam(PG_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
    assert {os.stat(f"/proc/{pid}").st_uid for pid in pids} == {owner}
    assert pg.base.stat().st_uid == owner
    assert pg.base.is_relative_to("/tmp") and pg.data.is_dir()
    assert oct(pg.data.stat().st_mode & 0o777) == oct(0o700)
    assert pg.startup_seconds is not None and pg.startup_seconds < 30


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_empty_database(pg_db, run):
    with pg_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)
        conn.execute("CREATE TABLE same_name (run int)")      # fails if it were left over
        conn.execute("INSERT INTO same_name VALUES (%s)", (run,))


def test_two_fresh_databases_are_isolated(pg_db, pg):
    other = pg.create_database("other")
    try:
        assert other != pg_db.name and {other, pg_db.name} <= pg.databases()
        with pg_db.connect() as conn:
            conn.execute("CREATE TABLE only_here (x int)")
        with pg.connect(other) as conn:
            assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
            conn.execute("CREATE TABLE only_there (x int)")
        with pg_db.connect() as conn:
            assert conn.execute("SELECT to_regclass('only_there')").fetchone() == (None,)
    finally:
        pg.drop_database(other)
    assert other not in pg.databases()


def test_listen_notify_round_trip(pg_db):
    received = []
    with pg_db.connect(autocommit=True) as listener, \
            pg_db.connect(autocommit=True) as notifier:
        listener.add_notify_handler(received.append)
        listener.execute("LISTEN ov_changes")
        notifier.execute("SELECT pg_notify('ov_changes', 'app/env/NAME 7')")
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            listener.execute("SELECT 1")       # delivers pending notifications
            time.sleep(0.02)
        assert [(n.channel, n.payload, n.pid) for n in received] == [
            ("ov_changes", "app/env/NAME 7", notifier.info.backend_pid)]


def test_outage_stop_then_start_keeps_the_data(pg_db, pg):
    with pg_db.connect() as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('before the outage')")
    survivor = pg_db.connect(autocommit=True)
    try:
        pg.stop()
        assert not pg.running
        assert pg.processes() == []
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg_db.dsn, connect_timeout=5)
        with pytest.raises(psycopg.OperationalError):
            survivor.execute("SELECT 1")
    finally:
        survivor.close()
        pg.start()
    assert pg.running
    assert pg_db.name in pg.databases()
    with psycopg.connect(pg_db.dsn) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("before the outage",)]


def test_session_end_leaves_no_process_and_no_directory(tmp_path):
    """A whole pytest session in a subprocess: one test stops the cluster and fails,
    the next still gets a running cluster; at the end, nothing is left."""
    record = tmp_path / "cluster"
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""
        from pathlib import Path

        def test_outage_then_failure(pg_db, pg):
            Path({str(record)!r}).write_text(str(pg.base) + "\\n" + pg.name)
            pg.stop()
            assert False, "fails with the cluster stopped"

        def test_cluster_is_back(pg_db):
            with pg_db.connect() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "pg", "-q",
         "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout, result.stdout
    base, name = record.read_text().splitlines()
    assert name.startswith("ov-pg-") and base.endswith(name)
    assert not Path(base).exists()
    assert subprocess.run(["pgrep", "-f", name], capture_output=True,
                          timeout=30).returncode == 1, "a postgres process was left"


def test_psycopg_comes_from_the_venvs_own_source():
    venv = Path(sys.prefix).name
    location = Path(psycopg.__file__).resolve()
    if venv == ".venv-debian":
        assert location.is_relative_to("/usr/lib/python3/dist-packages"), location
        assert psycopg.__version__.startswith("3.1."), psycopg.__version__
    elif venv == ".venv-pypi":
        assert location.is_relative_to(Path(sys.prefix).resolve()), location
        assert psycopg.__version__.split(".")[0] == "3", psycopg.__version__
    else:
        pytest.skip(f"not one of the project's venvs: {sys.prefix}")
    # The pure-python psycopg, on Debian's libpq5 (from postgresql-15).
    assert psycopg.pq.__impl__ == "python"
    assert psycopg.pq.version() // 10000 == 15
