"""Fleets (issue 16): several hosts sharing one vault through PostgreSQL.

Every test runs the real ``ov`` against a real throwaway PostgreSQL (tests/pg.py),
no mocks.  A "host" is a vault file: host A is the demo vault, which ``ov store
init`` pushes into a fresh database; hosts B and C are created by ``ov store join``
from that database.  Values never reach the test output: hosts are compared by the
sha256 digests of what ``ov run`` (or an agent) puts in a command's environment.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import leaks
from helpers import (DEMO_SECRETS, OV, PASSWORD, PROBE, SENTINEL, probe, sha256,
                     wrong_key)

pytest.importorskip("psycopg", reason="psycopg not installed: run tests/bootstrap.sh")

APP, ENV = "demo", "production"
PG_DUMP = "/usr/lib/postgresql/15/bin/pg_dump"
DEMO_DIGESTS = {name: sha256(value) for name, value in DEMO_SECRETS.items()}


# -- shared helpers ------------------------------------------------------------------


class Fleet:
    """The hosts of one test: name -> vault path, and ov run against each of them."""

    def __init__(self, demo, db, tmp_path):
        self.demo, self.db, self.tmp = demo, db, tmp_path
        self.key = str(demo.key)                  # the unscoped machine key
        self.hosts = {"A": demo.path}
        self._values = 0

    def ov(self, host, *args, **kwargs):
        return self.demo.ov(*args, env={"OV_VAULT": str(self.hosts[host])}, **kwargs)

    def init(self, host="A", check=0):
        return self.ov(host, "store", "init", self.db.dsn, "--machine-key", self.key,
                       check=check)

    def join(self, host, check=0, key=None):
        path = self.hosts.setdefault(host, self.tmp / f"host{host}" / "vault.db")
        return self.ov(host, "store", "join", self.db.dsn, "--vault", str(path),
                       "--machine-key", str(key or self.key), check=check)

    def sync(self, host, check=0):
        return self.ov(host, "sync", "--machine-key", self.key, check=check)

    def value(self, label="v"):
        """A new value, forbidden in every output of this test like the demo's."""
        self._values += 1
        value = f"fleet-{label}-{self._values}-{os.urandom(6).hex()}"
        leaks.watch.forbid(f"a value written by the test ({label})", value,
                           per_test=True)
        return value

    def set(self, host, name, value, check=0):
        return self.ov(host, "secret", "set", name, "--app", APP, "--env", ENV,
                       "--machine-key", self.key, input=value, check=check)

    def set_popen(self, host, name):
        """``ov secret set`` started but blocked reading its value from stdin: (the
        process, the write end of its stdin)."""
        env = dict(self.demo.ov.env, OV_VAULT=str(self.hosts[host]))
        read, write = os.pipe()
        try:
            proc = subprocess.Popen(
                [OV, "secret", "set", name, "--app", APP, "--env", ENV, "--machine-key",
                 self.key], stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, cwd=self.tmp, start_new_session=True)
        finally:
            os.close(read)
        return proc, write

    def versions(self, host):
        """name -> version, from ``ov secret list`` (names, versions, never values)."""
        out = self.ov(host, "secret", "list", "--app", APP, "--env", ENV, check=0).out
        return {line.split("\t")[0]: int(line.split("\t")[1][1:])
                for line in out.splitlines()}

    def listing(self, host):
        """``ov secret list`` without the times (what 'unchanged' compares)."""
        return sorted(self.versions(host).items())

    def digests(self, host):
        """secret name -> sha256 of the value ``ov run`` on *host* gives a command."""
        result = self.ov(host, "run", "--machine-key", self.key, "--app", APP, "--env",
                         ENV, "--", sys.executable, "-c", PROBE, check=0)
        return secrets_of(self.demo, json.loads(result.out)["env"])

    def agent(self, agents, host):
        """An agent serving *host*'s vault (its own socket)."""
        sock = agents.tmp / "r" / f"{host.lower()}.sock"
        return agents.start("--vault", str(self.hosts[host]), sock=sock)

    def agent_digests(self, agent):
        return secrets_of(self.demo, probe(agent, "--app", APP, "--env", ENV)["env"])


def secrets_of(demo, environment):
    """The variables of a probed environment that ov added (the secrets)."""
    return {name: digest for name, digest in environment.items()
            if name not in demo.ov.env}


def one_line(result, code, *fragments):
    """A failed ov: exit *code*, exactly one 'ov: ' line naming *fragments*, no
    traceback, no value; the line."""
    assert result.returncode == code, (result.returncode, result.out, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ov: "), result.err
    assert "Traceback" not in result.err and SENTINEL not in result.err + result.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def query(db, statement, params=()):
    """Run one statement in the test database (the operator's / attacker's hand)."""
    with db.connect() as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else cursor.rowcount


def newest_version(db, name):
    return query(db, "SELECT max(version) FROM ov.secrets WHERE app = %s AND env = %s "
                 "AND name = %s", (APP, ENV, name))[0][0]


@pytest.fixture
def fleet(demo, pg_db, tmp_path):
    return Fleet(demo, pg_db, tmp_path)


@pytest.fixture
def joined(fleet):
    """Host A initialised the store, host B joined it."""
    fleet.init()
    fleet.join("B")
    return fleet


# -- 1. init, join ---------------------------------------------------------------


def test_init_then_join_replicates_every_secret(fleet, vault_dump):
    out = fleet.init().out
    assert out.startswith("Pushed "), out
    assert fleet.digests("A") == DEMO_DIGESTS
    joined = fleet.join("B")
    assert "Joined" in joined.out, joined.out
    assert fleet.hosts["B"].is_file()
    assert fleet.digests("B") == DEMO_DIGESTS
    assert fleet.listing("B") == fleet.listing("A")

    # Joining onto a vault that exists already: refused, that vault untouched.
    before = vault_dump(fleet.hosts["B"])
    fleet.hosts["X"] = fleet.hosts["B"]
    one_line(fleet.join("X", check=None), 2, "already exists")
    fleet.hosts["Y"] = fleet.hosts["A"]
    one_line(fleet.join("Y", check=None), 2, "already exists")
    assert vault_dump(fleet.hosts["B"]) == before
    assert fleet.digests("B") == DEMO_DIGESTS


def test_failed_join_leaves_nothing_behind(joined, tmp_path):
    """A join refused for a wrong machine key leaves no half-made vault, so the same
    join with the right key then works."""
    bad = wrong_key(tmp_path / "wrong.kek")
    one_line(joined.join("C", check=None, key=bad), 4)
    assert not joined.hosts["C"].exists(), "a failed join left a vault behind"
    joined.join("C")
    assert joined.digests("C") == DEMO_DIGESTS


# -- 2. propagation to running agents ---------------------------------------------


def test_a_new_version_reaches_agents_after_sync(joined, agents):
    fleet = joined
    fleet.join("C")
    agent_b, agent_c = fleet.agent(agents, "B"), fleet.agent(agents, "C")
    assert fleet.agent_digests(agent_b) == DEMO_DIGESTS
    assert fleet.agent_digests(agent_c) == DEMO_DIGESTS

    value = fleet.value()
    assert "(version 2)" in fleet.set("A", "API_TOKEN", value).out
    new = dict(DEMO_DIGESTS, API_TOKEN=sha256(value))
    assert fleet.digests("A") == new
    assert newest_version(fleet.db, "API_TOKEN") == 2
    # Not pulled yet: both agents still serve the old value.
    assert fleet.agent_digests(agent_b) == DEMO_DIGESTS
    assert fleet.agent_digests(agent_c) == DEMO_DIGESTS

    synced = fleet.sync("B").out
    assert "API_TOKEN" in synced, synced
    assert fleet.agent_digests(agent_b) == new            # the same agent, no restart
    assert fleet.agent_digests(agent_c) == DEMO_DIGESTS
    fleet.sync("C")
    assert fleet.agent_digests(agent_c) == new
    assert fleet.versions("B")["API_TOKEN"] == fleet.versions("C")["API_TOKEN"] == 2

    # And the other way round: C writes, A and B follow.
    later = fleet.value()
    fleet.set("C", "DB_URL", later)
    newer = dict(new, DB_URL=sha256(later))
    fleet.sync("A")
    fleet.sync("B")
    assert fleet.digests("A") == newer
    assert fleet.agent_digests(agent_b) == newer
    assert fleet.agent_digests(agent_c) == newer
    assert agent_b.proc.poll() is None and agent_c.proc.poll() is None

    # A sync with nothing new changes nothing.
    assert fleet.sync("B").out.startswith("Synced: 0 secret(s)")


# -- 3. a conflict ----------------------------------------------------------------


def test_a_stale_write_is_a_conflict(joined, vault_dump):
    fleet = joined
    base = fleet.versions("A")["API_TOKEN"]
    assert fleet.versions("B")["API_TOKEN"] == base
    first = fleet.value("B")
    fleet.set("B", "API_TOKEN", first)                      # N + 1 from B

    before, listing = vault_dump(fleet.hosts["A"]), fleet.listing("A")
    line = one_line(fleet.set("A", "API_TOKEN", fleet.value("A"), check=None), 7,
                    "API_TOKEN")
    versions = re.findall(r"version (\d+)", line)
    assert len(versions) == 2 and str(base + 1) in versions, line
    assert set(versions) <= {str(base), str(base + 1)}, line
    # Nothing written but the conflict itself, for `ov store status`.
    assert [line for line in vault_dump(fleet.hosts["A"])
            if "'store_conflict'" not in line] == before
    assert fleet.listing("A") == listing
    assert fleet.versions("A")["API_TOKEN"] == base
    assert fleet.digests("A") == DEMO_DIGESTS
    assert newest_version(fleet.db, "API_TOKEN") == base + 1

    # After a sync A sees B's value, and writes N + 2.
    fleet.sync("A")
    assert fleet.digests("A")["API_TOKEN"] == sha256(first)
    last = fleet.value("A")
    assert f"(version {base + 2})" in fleet.set("A", "API_TOKEN", last).out
    fleet.sync("B")
    assert fleet.digests("B")["API_TOKEN"] == sha256(last)
    assert fleet.versions("B")["API_TOKEN"] == base + 2


def test_a_write_two_versions_behind_is_a_conflict(joined):
    """B wrote N+1 and N+2; A, still at N, cannot write on top of either."""
    fleet = joined
    fleet.set("B", "DB_URL", fleet.value())
    fleet.set("B", "DB_URL", fleet.value())
    line = one_line(fleet.set("A", "DB_URL", fleet.value(), check=None), 7, "DB_URL")
    assert "version 3" in line, line
    assert fleet.versions("A")["DB_URL"] == 1


# -- 4. simultaneous writes ---------------------------------------------------------


ROUNDS = 10


def test_simultaneous_writes_have_exactly_one_winner(joined):
    fleet = joined
    winners = {}
    for round_ in range(ROUNDS):
        values = {host: fleet.value(f"{host}{round_}") for host in "AB"}
        started = {host: fleet.set_popen(host, "API_TOKEN") for host in "AB"}
        for host, (_, stdin) in started.items():   # both blocked on stdin: go
            os.write(stdin, values[host].encode())
        for _, stdin in started.values():
            os.close(stdin)
        codes = {}
        for host, (proc, _) in started.items():
            out, err = proc.communicate(timeout=60)
            leaks.watch.saw(f"ov secret set on {host}", out + err)
            codes[host] = proc.returncode
            if proc.returncode != 0:
                assert len(err.splitlines()) == 1 and err.startswith(b"ov: "), err
                assert b"API_TOKEN" in err, err
        assert sorted(codes.values()) == [0, 7], (round_, codes)
        (winner,) = [host for host, code in codes.items() if code == 0]
        (loser,) = [host for host, code in codes.items() if code == 7]
        winners[round_] = (winner, sha256(values[winner]))
        assert newest_version(fleet.db, "API_TOKEN") == round_ + 2
        fleet.sync(loser)
        assert fleet.versions(loser)["API_TOKEN"] == round_ + 2

    fleet.join("C")                 # the store's manifest is consistent with its rows
    final = winners[ROUNDS - 1][1]
    assert fleet.versions("C")["API_TOKEN"] == ROUNDS + 1
    for host in "ABC":
        assert fleet.digests(host)["API_TOKEN"] == final, host
    assert fleet.listing("A") == fleet.listing("B") == fleet.listing("C")


# -- 5. tampering in the database ----------------------------------------------------


def _tampered_pull_is_refused(fleet, host, vault_dump):
    before, listing = vault_dump(fleet.hosts[host]), fleet.listing(host)
    line = one_line(fleet.sync(host, check=None), 5)
    assert vault_dump(fleet.hosts[host]) == before
    assert fleet.listing(host) == listing
    return line


def test_a_deleted_newest_row_is_detected(joined, vault_dump):
    fleet = joined
    fleet.set("A", "API_TOKEN", fleet.value())
    fleet.set("A", "EMPTY", fleet.value())        # another change in the same pull
    assert query(fleet.db, "DELETE FROM ov.secrets WHERE app = %s AND env = %s AND "
                 "name = 'API_TOKEN' AND version = 2", (APP, ENV)) == 1
    _tampered_pull_is_refused(fleet, "B", vault_dump)
    assert fleet.digests("B") == DEMO_DIGESTS
    one_line(fleet.join("C", check=None), 5)


def test_a_changed_ciphertext_byte_is_detected(joined, vault_dump):
    fleet = joined
    fleet.set("A", "DB_URL", fleet.value())
    assert query(fleet.db, "UPDATE ov.secrets SET ciphertext = set_byte(ciphertext, 20, "
                 "(get_byte(ciphertext, 20) + 1) %% 256) WHERE app = %s AND env = %s AND "
                 "name = 'DB_URL' AND version = 2", (APP, ENV)) == 1
    _tampered_pull_is_refused(fleet, "B", vault_dump)
    assert fleet.digests("B") == DEMO_DIGESTS


def test_a_restored_older_manifest_is_detected(joined, vault_dump):
    """The manifest row rolled back to what it was before a write that B has seen."""
    fleet = joined
    ((counter, blob),) = query(fleet.db, "SELECT counter, manifest FROM ov.manifests "
                               "WHERE app = %s AND env = %s", (APP, ENV))
    value = fleet.value()
    fleet.set("A", "API_TOKEN", value)
    fleet.sync("B")
    assert query(fleet.db, "UPDATE ov.manifests SET counter = %s, manifest = %s WHERE "
                 "app = %s AND env = %s", (counter, blob, APP, ENV)) == 1
    line = _tampered_pull_is_refused(fleet, "B", vault_dump)
    assert "rolled back" in line or "older" in line, line
    assert fleet.digests("B")["API_TOKEN"] == sha256(value)


def test_an_older_manifest_hiding_a_newer_row_is_detected(joined, vault_dump):
    """The manifest row rolled back to before a write that B has not pulled yet: the
    store's rows (version 2) then disagree with its manifest (version 1)."""
    fleet = joined
    ((counter, blob),) = query(fleet.db, "SELECT counter, manifest FROM ov.manifests "
                               "WHERE app = %s AND env = %s", (APP, ENV))
    fleet.set("A", "API_TOKEN", fleet.value())
    assert query(fleet.db, "UPDATE ov.manifests SET counter = %s, manifest = %s WHERE "
                 "app = %s AND env = %s", (counter, blob, APP, ENV)) == 1
    one_line(fleet.join("C", check=None), 5)          # a new host: refused
    _tampered_pull_is_refused(fleet, "B", vault_dump)  # a host that has seen counter 1


# -- 6. the database never holds a value or key --------------------------------------


def test_pg_dump_holds_no_value_and_no_key(joined):
    fleet = joined
    written = fleet.value("dumped")
    fleet.set("B", "WRITTEN_ON_B", written)
    result = subprocess.run(
        ["runuser", "-u", "postgres", "--", PG_DUMP, "--no-password", fleet.db.dsn]
        if os.geteuid() == 0 else [PG_DUMP, "--no-password", fleet.db.dsn],
        capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    dump = result.stdout
    assert b"CREATE TABLE ov.secrets" in dump and b"WRITTEN_ON_B" in dump
    forbidden = {f"value of {name}": value for name, value in DEMO_SECRETS.items()
                 if value}
    forbidden.update({"the sentinel": SENTINEL, "the value written on B": written,
                      "the master password": PASSWORD})
    for label, value in list(forbidden.items()):
        forbidden[label + " (hex)"] = value.encode().hex()
    for label, path in (("machine key", fleet.demo.key),
                        ("scoped key", fleet.demo.scoped_key)):
        key = path.read_bytes()
        forbidden[label] = key
        forbidden[label + " (hex)"] = key.hex()
    for label, value in forbidden.items():
        data = value.encode() if isinstance(value, str) else value
        assert data.lower() not in dump.lower(), f"{label} is in the database dump"


# -- 7. an outage ------------------------------------------------------------------


def test_outage_agents_serve_writes_fail_then_catch_up(joined, agents, pg, vault_dump):
    fleet = joined
    agent_b = fleet.agent(agents, "B")
    assert fleet.agent_digests(agent_b) == DEMO_DIGESTS
    pg.stop()
    try:
        assert fleet.agent_digests(agent_b) == DEMO_DIGESTS
        assert fleet.digests("B") == DEMO_DIGESTS          # ov run reads the replica
        one_line(fleet.sync("B", check=None), 6)
        before, listing = vault_dump(fleet.hosts["A"]), fleet.listing("A")
        one_line(fleet.set("A", "API_TOKEN", fleet.value(), check=None), 6)
        assert vault_dump(fleet.hosts["A"]) == before
        assert fleet.listing("A") == listing
        assert fleet.digests("A") == DEMO_DIGESTS
    finally:
        pg.start()
    value = fleet.value()
    assert "(version 2)" in fleet.set("A", "API_TOKEN", value).out
    assert fleet.agent_digests(agent_b) == DEMO_DIGESTS
    fleet.sync("B")
    assert fleet.agent_digests(agent_b) == dict(DEMO_DIGESTS, API_TOKEN=sha256(value))


# -- 8. init twice, migrations --------------------------------------------------------


def test_init_twice_is_refused(fleet, demo, tmp_path, vault_dump):
    copy = tmp_path / "copy" / "vault.db"          # the same vault, not joined
    copy.parent.mkdir()
    shutil.copy2(demo.path, copy)
    fleet.hosts["copy"] = copy
    fleet.init()
    changes = query(fleet.db, "SELECT last_value FROM ov.changes")
    one_line(fleet.init(check=None), 2)               # A: it replicates the store
    before = vault_dump(copy)
    one_line(fleet.init("copy", check=None), 2, "already holds a vault")
    fleet.join("B")
    one_line(fleet.init("B", check=None), 2)
    assert vault_dump(copy) == before
    assert query(fleet.db, "SELECT last_value FROM ov.changes") == changes
    assert fleet.digests("B") == DEMO_DIGESTS


def test_migrations_are_idempotent(fleet, pg):
    from ovagent.client.pgstore import SCHEMA_VERSION, PgStore

    fleet.init()
    other = pg.create_database("migrations")
    try:
        for dsn in (fleet.db.dsn, pg.dsn(other)):
            with PgStore(dsn) as store:
                versions = []
                for _ in range(2):
                    with store.transaction():
                        versions.append(store.migrate())
                with store.transaction():
                    versions.append(store.schema_version())
            assert versions == [SCHEMA_VERSION] * 3, (dsn, versions)
            with pg.connect(dsn.split("?")[0].rsplit("/", 1)[1]) as conn:
                rows = conn.execute("SELECT version, count(*) FROM ov.migrations "
                                    "GROUP BY version ORDER BY version").fetchall()
            assert rows == [(version, 1) for version in range(1, SCHEMA_VERSION + 1)]
    finally:
        pg.drop_database(other)
    fleet.join("B")                          # the store still works after it
    assert fleet.digests("B") == DEMO_DIGESTS


# -- 9. deletes, imports, apps and environments write through ------------------------


def test_import_and_delete_write_through(joined, tmp_path):
    fleet = joined
    one, two = fleet.value("one"), fleet.value("two")
    dotenv = tmp_path / "new.env"
    dotenv.write_text(f"IMPORTED_ONE={one}\nIMPORTED_TWO={two}\n")
    fleet.ov("A", "secret", "import", str(dotenv), "--app", APP, "--env", ENV,
             "--machine-key", fleet.key, check=0)
    fleet.ov("A", "secret", "delete", "DB_URL", "--app", APP, "--env", ENV,
             "--machine-key", fleet.key, check=0)
    expected = {name: digest for name, digest in DEMO_DIGESTS.items()
                if name != "DB_URL"}
    expected.update(IMPORTED_ONE=sha256(one), IMPORTED_TWO=sha256(two))
    assert fleet.digests("A") == expected
    assert query(fleet.db, "SELECT count(*) FROM ov.secrets WHERE name = 'DB_URL'") \
        == [(0,)]
    assert "DB_URL" in fleet.versions("B")
    fleet.sync("B")
    assert "DB_URL" not in fleet.versions("B")
    assert fleet.digests("B") == expected
    fleet.join("C")
    assert fleet.digests("C") == expected


def test_app_and_env_created_on_a_appear_on_b(joined):
    fleet = joined
    fleet.ov("A", "app", "create", "other", "--machine-key", fleet.key, check=0)
    fleet.ov("A", "env", "create", "staging", "--app", APP, check=0)
    fleet.sync("B")
    assert "other" in fleet.ov("B", "app", "list", check=0).out.split()
    envs = fleet.ov("B", "env", "list", "--app", APP, check=0).out.split()
    assert "staging" in envs and "production" in envs, envs


# -- 10. ov store status ---------------------------------------------------------------


def test_store_status(fleet, demo, tmp_path):
    copy = tmp_path / "copy" / "vault.db"
    copy.parent.mkdir()
    shutil.copy2(demo.path, copy)
    fleet.hosts["copy"] = copy
    one_line(fleet.ov("copy", "store", "status", check=None), 3)
    fleet.init()
    fleet.join("B")
    for host in "AB":
        lines = fleet.ov(host, "store", "status", check=0).out.splitlines()
        assert lines[0] == f"store: {fleet.db.dsn}", lines
        assert lines[1].startswith("last pull: ") and "never" not in lines[1], lines


# -- key rotation, roles, following the store, status ------------------------------


def test_a_key_rotation_reaches_every_host(joined, agents):
    """A rotates the app key: B follows on sync (the new key unwraps under the KEK,
    every version's new wrapped key opens its ciphertext), its agent keeps serving
    the same values, and a write on B after that is sealed under the new key."""
    fleet = joined
    agent = fleet.agent(agents, "B")
    before = fleet.agent_digests(agent)
    fleet.ov("A", "app", "rotate-key", APP, "--machine-key", fleet.key, check=0)
    fleet.sync("B")
    assert fleet.ov("B", "app", "list", check=0).out.split("\t")[1] == "key-generation=2"
    assert fleet.agent_digests(agent) == before
    value = fleet.value("after-rotation")
    fleet.set("B", "DB_URL", value)
    fleet.sync("A")
    assert fleet.digests("A")["DB_URL"] == sha256(value)
    # A rotation from a host that missed the other's write is a conflict.
    fleet.set("A", "API_TOKEN", fleet.value())
    one_line(fleet.ov("B", "app", "rotate-key", APP, "--machine-key", fleet.key), 7,
             "rotate")


def test_a_reader_role_pulls_and_cannot_write_row_level_security_hides_other_apps(
        joined, tmp_path):
    """The roles of `ov store init --print-sql`: a server logging in as a member of
    ov_reader joins and pulls, its writes are refused in one line; with row-level
    security it sees only the apps ov.readers grants it."""
    fleet = joined
    fleet.ov("A", "app", "create", "other", "--machine-key", fleet.key, check=0)
    fleet.ov("A", "env", "create", ENV, "--app", "other", check=0)
    fleet.ov("A", "secret", "set", "X", "--app", "other", "--env", ENV,
             "--machine-key", fleet.key, input=fleet.value("other-app"), check=0)
    sql = fleet.ov("A", "store", "init", "--print-sql", check=0).out
    with fleet.db.connect() as conn:
        conn.execute(sql)
        conn.execute("CREATE ROLE ov_test_web LOGIN IN ROLE ov_reader")
        conn.execute("INSERT INTO ov.readers VALUES ('ov_test_web', %s)", (APP,))
    path = tmp_path / "hostR" / "vault.db"
    dsn = fleet.db.dsn.replace("user=postgres", "user=ov_test_web")
    fleet.hosts["R"] = path
    fleet.ov("R", "store", "join", dsn, "--vault", str(path), "--machine-key", fleet.key,
             check=0)
    assert [line.split("\t")[0] for line in fleet.ov("R", "app", "list",
                                                     check=0).out.splitlines()] == [APP]
    assert fleet.digests("R") == fleet.digests("A")
    one_line(fleet.set("R", "DB_URL", fleet.value(), check=None), 1, "permission denied")
    with fleet.db.connect() as conn:
        conn.execute("DROP OWNED BY ov_test_web")
        conn.execute("DROP ROLE ov_test_web")


def test_with_ov_sync_following_a_write_is_served_elsewhere_within_2_s(joined, agents):
    fleet = joined
    agent = fleet.agent(agents, "B")
    with following(fleet, agents, "B") as follower:
        for _ in range(3):
            value = fleet.value("followed")
            fleet.set("A", "DB_URL", value)
            written = time.monotonic()
            while fleet.agent_digests(agent).get("DB_URL") != sha256(value):
                assert time.monotonic() - written < 2.0, "not served within 2 s"
            assert follower.poll() is None, "ov sync --follow stopped"


@contextlib.contextmanager
def following(fleet, agents, host):
    """`ov sync --follow` on *host*, past its first pull and its LISTEN."""
    env = dict(fleet.demo.ov.env, OV_VAULT=str(fleet.hosts[host]))
    follower = agents.popen([OV, "sync", "--follow", "--machine-key", fleet.key],
                            env=env)
    try:
        time.sleep(1.0)
        yield follower
    finally:
        follower.terminate()
        follower.wait(10)


def test_status_says_how_far_behind_the_store_a_host_is_and_its_last_conflict(joined):
    fleet = joined
    fleet.set("A", "DB_URL", fleet.value())
    out = fleet.ov("B", "store", "status", check=0).out
    assert f"environments behind: {APP}/{ENV}" in out and "conflict" not in out, out
    one_line(fleet.set("B", "DB_URL", fleet.value(), check=None), 7, "DB_URL")
    fleet.sync("B")
    out = fleet.ov("B", "store", "status", check=0).out
    assert "environments behind: none" in out, out
    assert re.search(r"^last conflict: .*: conflict on secret DB_URL of demo/production",
                     out, re.M), out


# -- what a review of the first version found (each failed on it) --------------------


def blocked(fleet, host, *args, value=None):
    """`ov ARGS` on *host*, started now (its value on stdin, if any)."""
    env = dict(fleet.demo.ov.env, OV_VAULT=str(fleet.hosts[host]))
    proc = subprocess.Popen([OV, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=fleet.tmp,
                            start_new_session=True)
    if value is not None:
        proc.stdin.write(value.encode())
    proc.stdin.close()
    proc.stdin = None
    return proc


def outcomes(*procs):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        leaks.watch.saw("the output of a concurrent ov", out + err)
        results.append((proc.returncode, err.decode(errors="replace")))
    return results


def test_the_store_cannot_roll_back_a_hosts_own_write(joined):
    """B writes while behind (its manifest number is ahead of what it applied); the
    database then puts back the previous manifest and deletes B's row: B's next
    pull is exit 5, and B still serves its own newest value."""
    fleet = joined
    names = sorted(fleet.versions("A"))
    fleet.set("A", names[0], fleet.value())
    saved = query(fleet.db, "SELECT counter, manifest FROM ov.manifests WHERE app = %s "
                  "AND env = %s", (APP, ENV))[0]
    mine = fleet.value("b-own")
    fleet.set("B", names[1], mine)
    newest = newest_version(fleet.db, names[1])
    query(fleet.db, "DELETE FROM ov.secrets WHERE name = %s AND version = %s",
          (names[1], newest))
    query(fleet.db, "UPDATE ov.manifests SET counter = %s, manifest = %s WHERE app = %s "
          "AND env = %s", (*saved, APP, ENV))
    one_line(fleet.sync("B", check=None), 5, "rolled back")
    assert fleet.digests("B")[names[1]] == sha256(mine)


def test_a_pull_waits_for_a_write_on_the_same_host(joined):
    """A write of A waits on the store's manifest lock while A pulls: the pull waits
    for the write (one lock order) instead of taking the write for a rollback."""
    fleet = joined
    with fleet.db.connect() as conn:
        conn.execute("SELECT 1 FROM ov.manifests WHERE app = %s AND env = %s FOR UPDATE",
                     (APP, ENV))
        write = blocked(fleet, "A", "secret", "set", "DB_URL", "--app", APP, "--env", ENV,
                        "--machine-key", fleet.key, value=fleet.value())
        time.sleep(1.0)
        pull = blocked(fleet, "A", "sync", "--machine-key", fleet.key)
        time.sleep(1.0)
        conn.rollback()
    assert [code for code, _ in outcomes(write, pull)] == [0, 0]
    fleet.sync("A")


def test_two_hosts_creating_one_app_conflict_first_writers_of_an_env_merge(joined):
    """One app created on two hosts at once: one conflict (exit 7), not two apps
    with two keys.  The first secrets of a new environment from two hosts at once:
    the second waits for the first's manifest and lands on top of it."""
    fleet = joined
    with fleet.db.connect() as conn:
        conn.execute("LOCK TABLE ov.apps IN SHARE ROW EXCLUSIVE MODE")
        procs = [blocked(fleet, host, "app", "create", "shop", "--machine-key", fleet.key)
                 for host in "AB"]
        time.sleep(1.0)
        conn.rollback()
    results = outcomes(*procs)
    assert sorted(code for code, _ in results) == [0, 7], results
    fleet.ov("A", "env", "create", "staging", "--app", APP, check=0)
    fleet.sync("A")
    fleet.sync("B")
    with fleet.db.connect() as conn:
        conn.execute("LOCK TABLE ov.manifests IN EXCLUSIVE MODE")
        procs = [blocked(fleet, host, "secret", "set", f"FIRST_{host}", "--app", APP,
                         "--env", "staging", "--machine-key", fleet.key,
                         value=fleet.value()) for host in "AB"]
        time.sleep(1.0)
        conn.rollback()
    results = outcomes(*procs)      # two names: both land, one after the other
    assert [code for code, _ in results] == [0, 0], results
    for host in "AB":
        fleet.sync(host)
    for host in "AB":
        listing = fleet.ov(host, "secret", "list", "--app", APP, "--env", "staging",
                           check=0).out
        assert "FIRST_A\tv1" in listing and "FIRST_B\tv1" in listing, listing


def test_rotations_follow_deletes_and_re_creations(joined):
    """A deletes a secret, sets another anew from version 1, and rotates the key; B
    follows all of it; B then rotates in turn and A follows."""
    fleet = joined
    gone, again = sorted(fleet.versions("A"))[:2]
    fleet.ov("A", "env", "create", "staging", "--app", APP, check=0)   # no manifest yet
    for name in (gone, again):
        fleet.ov("A", "secret", "delete", name, "--app", APP, "--env", ENV,
                 "--machine-key", fleet.key, check=0)
    fleet.set("A", again, fleet.value())
    fleet.set("A", again, fleet.value())
    fleet.ov("A", "app", "rotate-key", APP, "--machine-key", fleet.key, check=0)
    fleet.sync("A")
    fleet.sync("B")
    assert fleet.digests("B") == fleet.digests("A") and gone not in fleet.digests("B")
    fleet.ov("B", "app", "rotate-key", APP, "--machine-key", fleet.key, check=0)
    fleet.sync("A")
    assert fleet.digests("A") == fleet.digests("B")


def test_malformed_store_values_are_integrity_errors(joined):
    fleet = joined
    fleet.set("A", "DB_URL", fleet.value())
    query(fleet.db, "INSERT INTO ov.envs (app, name, created) VALUES (%s, 'Bad Env', 0)",
          (APP,))
    one_line(fleet.sync("B", check=None), 5, "ov.envs")
    query(fleet.db, "DELETE FROM ov.envs WHERE name = 'Bad Env'")
    query(fleet.db, "ALTER TABLE ov.manifests ALTER COLUMN manifest DROP NOT NULL")
    query(fleet.db, "UPDATE ov.manifests SET manifest = NULL")
    one_line(fleet.sync("B", check=None), 5, "ov.manifests")


def test_a_manifest_of_an_app_that_is_not_there_is_an_integrity_error(joined):
    fleet = joined
    query(fleet.db, "ALTER TABLE ov.manifests DROP CONSTRAINT manifests_app_env_fkey")
    query(fleet.db, "INSERT INTO ov.manifests (app, env, counter, manifest) VALUES "
          "('ghost', 'production', 1, '\\x00')")
    one_line(fleet.sync("B", check=None), 5, "ghost")


def test_a_scoped_key_cannot_keep_a_replica(joined):
    fleet = joined
    scoped = fleet.demo.scoped_key
    one_line(fleet.ov("B", "sync", "--machine-key", str(scoped), check=None), 2,
             "unscoped machine key")
    one_line(fleet.join("S", check=None, key=scoped), 4)
    assert not fleet.hosts["S"].exists(), "a failed join left a vault"


def test_a_notify_flood_does_not_stop_a_follower(joined, agents):
    """NOTIFY needs no privilege: a flood from any role that may connect still lets
    ov sync --follow serve a real change promptly (it pulls at most 5 times a
    second)."""
    fleet = joined
    agent = fleet.agent(agents, "B")
    with following(fleet, agents, "B") as follower, \
            fleet.db.connect(autocommit=True) as conn:
        flood_until = time.monotonic() + 2.0
        value = fleet.value("during-flood")
        fleet.set("A", "DB_URL", value)
        while time.monotonic() < flood_until:
            conn.execute("NOTIFY ov_changes")
        assert fleet.agent_digests(agent)["DB_URL"] == sha256(value)
        assert follower.poll() is None, "ov sync --follow stopped"


def test_sync_apply_restarts_this_hosts_units_holding_an_older_version(joined, agents,
                                                                        unit_cgroup,
                                                                        tmp_path):
    """A sets DB_URL; B's `ov sync --apply restart` pulls it and has systemctl
    restart the unit of host B that holds the old version (as B's agent knows it),
    and no other."""
    from test_agent_consumers import FAKE_SYSTEMCTL, released_in

    fleet = joined
    agent = fleet.agent(agents, "B")
    released_in(unit_cgroup("shop.service"), agent, "DB_URL")
    released_in(unit_cgroup("cart.service"), agent, "API_TOKEN")
    fleet.set("A", "DB_URL", fleet.value())
    script, log = tmp_path / "fake-systemctl", tmp_path / "systemctl.log"
    script.write_text(FAKE_SYSTEMCTL)
    script.chmod(0o755)
    result = fleet.demo.ov("sync", "--machine-key", fleet.key, "--apply", "restart",
                           env={"OV_VAULT": str(fleet.hosts["B"]),
                                "OV_AGENT_SOCK": str(agent.socket),
                                "SYSTEMCTL": str(script), "FAKE_SYSTEMCTL_LOG": str(log),
                                "FAKE_SYSTEMCTL_FAIL": ""}, check=0)
    assert "restart shop.service" in result.out, result.out
    assert [line.split()[-2:] for line in log.read_text().splitlines()] == [
        ["try-restart", "shop.service"]]
