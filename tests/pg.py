"""The PostgreSQL fixtures, a pytest plugin (conftest.py loads it): a throwaway
PostgreSQL 15 cluster per session, run with Debian's postgresql-15 (its own initdb and
pg_ctl, never the system cluster) as an unprivileged user, in a temporary directory
that user owns, listening only on a Unix socket in that directory.

``pg_cluster`` is the session's cluster (started on first use, always stopped and
removed at session end, also when tests fail); ``pg`` is the same cluster for one
test, running when the test starts and started again after it if the test stopped it
(an outage: ``pg.stop()``, check, ``pg.start()``; the databases survive);
``pg_db`` is a fresh empty database for one test, dropped after it.  Without
postgresql-15 or psycopg they skip, naming tests/bootstrap.sh, which installs both.
"""

import tempfile
import time

import pytest

from pgcluster import PgCluster, missing


class PgDatabase:
    """A test's fresh database: its name, DSN and cluster."""

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name
        self.dsn = cluster.dsn(name)

    def connect(self, **kwargs):
        return self.cluster.connect(self.name, **kwargs)

    def __repr__(self):
        return f"PgDatabase({self.dsn!r})"


@pytest.fixture(scope="session")
def pg_cluster():
    reason = missing()
    if reason:
        pytest.skip(reason)
    # In /tmp (not pytest's 0700 tmp_path, which the cluster's user cannot enter),
    # and short: a socket path has at most 107 bytes.
    cluster = PgCluster(tempfile.mkdtemp(prefix="ov-pg-", dir="/tmp"))
    try:
        began = time.monotonic()
        cluster.init()
        cluster.start()
        cluster.startup_seconds = time.monotonic() - began
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg(pg_cluster):
    """The session's cluster, running; started again after the test if it stopped it."""
    if not pg_cluster.running:
        pg_cluster.start()
    yield pg_cluster
    if not pg_cluster.running:
        pg_cluster.start()


@pytest.fixture
def pg_db(pg, request):
    """A fresh, empty database for this test (a unique name), dropped after it."""
    name = pg.create_database(request.node.name)
    yield PgDatabase(pg, name)
    if not pg.running:
        pg.start()
    pg.drop_database(name)
