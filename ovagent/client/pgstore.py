"""The shared store of a fleet: PostgreSQL holding exactly what a vault file holds at
rest (ov-store(1)).  Names, versions and times are visible to the database; values
and keys never are: rows carry the same wrapped keys and ciphertexts, bound by the
same associated data, as the SQLite vault.

Each environment has a manifest: its secrets' (version, digest) entries with a
counter, sealed under the app key by the host that wrote it (push.py); a pull
fetches only the manifests whose counter rose (pull.py).  Each manifest written
takes the next number of one sequence (``seq``: the change number ``ov store
status`` and the ``synced`` record show), and statement triggers on apps,
environments and manifests NOTIFY ``ov_changes`` (``ov sync --follow``).
The schema is created by numbered migrations, each applied once, in a transaction
that holds an advisory lock (so two hosts running ``ov store init`` at once wait for
each other).

Connection settings are libpq's: a URI or key=value string, a service file,
PGPASSFILE, sslmode.  A password written in the URI is refused: it would end up in
the vault file and in process listings.
"""

import select

import psycopg
from psycopg import errors as pgerrors

from ..core.errors import IntegrityError, OvError, StoreError, UsageError
from ..core import store
from ..core.store import AppRecord, SecretRecord

CHANNEL = "ov_changes"
CONNECT_TIMEOUT = 10                 # seconds
# A database that goes silent, or a writer elsewhere that holds a lock, must not
# hang a write (which holds the vault's write lock) or ov sync --follow for ever.
SESSION = {"options": "-c statement_timeout=30000 -c lock_timeout=15000 "
                      "-c idle_in_transaction_session_timeout=60000",
           "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
           "keepalives_count": 3, "tcp_user_timeout": 60000}
MIGRATION_LOCK = 0x6f76_7374_6f72    # pg_advisory_xact_lock key: "ovstor"
MIGRATIONS = {1: """
CREATE SCHEMA IF NOT EXISTS ov;
CREATE SEQUENCE ov.changes;
CREATE TABLE ov.meta (key text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE ov.apps (
    name text PRIMARY KEY,
    wrapped_key bytea NOT NULL,
    key_check bytea NOT NULL,
    generation bigint NOT NULL,
    created double precision NOT NULL);
CREATE TABLE ov.envs (
    app text NOT NULL REFERENCES ov.apps (name) ON DELETE CASCADE,
    name text NOT NULL,
    created double precision NOT NULL,
    PRIMARY KEY (app, name));
CREATE TABLE ov.secrets (
    app text NOT NULL,
    env text NOT NULL,
    name text NOT NULL,
    version bigint NOT NULL,
    wrapped_dek bytea NOT NULL,
    ciphertext bytea NOT NULL,
    created double precision NOT NULL,
    PRIMARY KEY (app, env, name, version),
    FOREIGN KEY (app, env) REFERENCES ov.envs (app, name) ON DELETE CASCADE);
CREATE TABLE ov.manifests (
    app text NOT NULL,
    env text NOT NULL,
    counter bigint NOT NULL,
    manifest bytea NOT NULL,
    seq bigint NOT NULL DEFAULT nextval('ov.changes'),
    PRIMARY KEY (app, env),
    FOREIGN KEY (app, env) REFERENCES ov.envs (app, name) ON DELETE CASCADE);
CREATE FUNCTION ov.renumber() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN NEW.seq := nextval('ov.changes'); RETURN NEW; END $$;
CREATE TRIGGER renumber BEFORE UPDATE ON ov.manifests
    FOR EACH ROW EXECUTE FUNCTION ov.renumber();
CREATE FUNCTION ov.announce() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_notify('ov_changes', ''); RETURN NULL; END $$;
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON ov.manifests
    FOR EACH STATEMENT EXECUTE FUNCTION ov.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON ov.apps
    FOR EACH STATEMENT EXECUTE FUNCTION ov.announce();
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON ov.envs
    FOR EACH STATEMENT EXECUTE FUNCTION ov.announce();
"""}
SCHEMA_VERSION = max(MIGRATIONS)
# ov store init --print-sql: roles, for the database's owner to run once.
ROLES_SQL = """\
-- Roles of an ov fleet's shared store (ov-store(1)); run as the owner of the
-- database after 'ov store init'.  Servers log in as members of ov_reader (they
-- pull), admin hosts as members of ov_writer (they write through), e.g.:
--   CREATE ROLE web1 LOGIN IN ROLE ov_reader;  -- then a client certificate
CREATE ROLE ov_reader NOLOGIN;
CREATE ROLE ov_writer NOLOGIN IN ROLE ov_reader;
GRANT USAGE ON SCHEMA ov TO ov_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA ov TO ov_reader;
GRANT INSERT, UPDATE, DELETE ON ov.apps, ov.envs, ov.secrets, ov.manifests
    TO ov_writer;
GRANT USAGE ON SEQUENCE ov.changes TO ov_writer;

-- Optional: row-level security per app.  A reader then sees only the apps that
-- ov.readers names for one of its roles (a server cannot even read the
-- ciphertext of the others), e.g. INSERT INTO ov.readers VALUES ('web1', 'shop');
CREATE TABLE ov.readers (role name NOT NULL, app text NOT NULL,
                         PRIMARY KEY (role, app));
GRANT SELECT ON ov.readers TO ov_reader;
""" + "".join(f"""\
ALTER TABLE ov.{table} ENABLE ROW LEVEL SECURITY;
CREATE POLICY writers ON ov.{table} TO ov_writer USING (true) WITH CHECK (true);
CREATE POLICY readers ON ov.{table} FOR SELECT TO ov_reader USING ({column} IN
    (SELECT app FROM ov.readers WHERE pg_has_role(current_user, role, 'member')));
""" for table, column in (("apps", "name"), ("envs", "app"), ("secrets", "app"),
                          ("manifests", "app")))
META_KEYS = ("vault_id", "salt", "kdf", "wrapped_kek", "kek_check")
SECRET_COLUMNS = ("app", "env", "name", "version", "wrapped_dek", "ciphertext",
                  "created")
APP_COLUMNS = ("name", "wrapped_key", "key_check", "generation", "created")
# What each value read from the store must be: a vault's columns (core/store.py),
# and the store's own.  Whoever runs the database can put anything in them.
KINDS = {**store.KINDS, "count": lambda v: type(v) is int and 0 <= v < 2 ** 63,
         "blob": lambda v: type(v) is bytes}
COLUMNS = {**store.COLUMNS,
           "manifests": {"app": "slug", "env": "slug", "counter": "count",
                         "manifest": "blob", "seq": "count"},
           "counts": {"app": "slug", "env": "slug", "count": "count"}}


def _checked(table, columns, row):
    """*row*, if each value is of its column's kind; else an IntegrityError naming
    the table and column (never the value)."""
    for column, value in zip(columns, row, strict=True):
        if not KINDS[COLUMNS[table][column]](value):
            raise IntegrityError(f"the shared store: a value in column {column} of table "
                                 f"ov.{table} has the wrong type or size: tampered with")
    return row


def check_dsn(dsn):
    """*dsn*, if libpq can parse it and it holds no password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise UsageError(f"invalid PostgreSQL connection string: {exc}") from None
    if "password" in params:
        raise UsageError("the connection string holds a password: put it in a "
                         "PGPASSFILE (or a systemd credential) instead")
    return dsn


def _unreachable(exc):
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"the shared store is unreachable: {first}")


class PgStore:
    """One connection to the shared store.  Use as a context manager: closed on
    exit.  Every method but wait() runs inside transaction()."""

    def __init__(self, dsn):
        self.dsn = check_dsn(dsn)
        try:
            self.db = psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT, **SESSION)
        except psycopg.Error as exc:
            raise _unreachable(exc) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.db.close()

    def transaction(self):
        return _Guarded(self.db)

    def wait(self, timeout):
        """LISTEN for the store's changes (once), then wait up to *timeout* seconds
        for one; True if one came."""
        if not getattr(self, "_listening", False):
            self.db.autocommit = True
            self.db.execute(f"LISTEN {CHANNEL}")
            self._listening, self._heard = True, []
            self.db.add_notify_handler(self._heard.append)
        try:
            if not self._heard and select.select([self.db.fileno()], [], [], timeout)[0]:
                self.db.execute("SELECT 1")          # takes in what arrived
        except psycopg.Error as exc:
            raise _refused(exc) from None
        heard = bool(self._heard)
        self._heard.clear()
        return heard

    def _rows(self, query, params=()):
        return self.db.execute(query, params).fetchall()

    # -- schema ------------------------------------------------------------------

    def migrate(self):
        """Create or bring up the schema; the version it is at."""
        self.db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        self.db.execute("CREATE SCHEMA IF NOT EXISTS ov")
        self.db.execute("CREATE TABLE IF NOT EXISTS ov.migrations (version int PRIMARY "
                        "KEY, applied timestamptz NOT NULL DEFAULT now())")
        done = {version for (version,) in self._rows("SELECT version FROM ov.migrations")}
        for version in sorted(set(MIGRATIONS) - done):
            self.db.execute(MIGRATIONS[version])
            self.db.execute("INSERT INTO ov.migrations (version) VALUES (%s)", (version,))
        return max(done | set(MIGRATIONS))

    def schema_version(self):
        try:
            (version,) = self._rows("SELECT max(version) FROM ov.migrations")[0]
        except pgerrors.UndefinedTable:
            raise UsageError("the database holds no ov store: create it with "
                             "'ov store init'") from None
        if version is None or version > SCHEMA_VERSION:
            raise OvError(f"the store's schema is version {version}; this ov knows "
                          f"version {SCHEMA_VERSION} at most")
        return version

    # -- the vault's metadata ----------------------------------------------------

    def get_meta(self):
        return {key: bytes(value) for key, value in
                self._rows("SELECT key, value FROM ov.meta")}

    def put_meta(self, meta):
        for key in META_KEYS:
            self.db.execute("INSERT INTO ov.meta (key, value) VALUES (%s, %s)",
                            (key, meta[key]))

    # -- apps, envs --------------------------------------------------------------

    def apps(self):
        """[AppRecord] of every app."""
        return [AppRecord(*_checked("apps", APP_COLUMNS, row))
                for row in self._rows(f"SELECT {', '.join(APP_COLUMNS)} FROM ov.apps "
                                      "ORDER BY name")]

    def create_app(self, record):
        """Insert a new app; False if another host created it first."""
        return self._insert(f"INSERT INTO ov.apps ({', '.join(APP_COLUMNS)}) VALUES "
                            "(%s, %s, %s, %s, %s)", (
                                record.name, record.wrapped_key, record.key_check,
                                record.generation, record.created))

    def rotate_app(self, record):
        """The app's record with its key one generation further (the caller locked
        the row and checked the generation it replaces)."""
        self.db.execute("UPDATE ov.apps SET wrapped_key = %s, key_check = %s, "
                        "generation = %s WHERE name = %s AND generation = %s",
                        (record.wrapped_key, record.key_check, record.generation,
                         record.name, record.generation - 1))

    def _insert(self, statement, params):
        """Run an INSERT in a savepoint; False if a row with its key exists."""
        try:
            with self.db.transaction():
                self.db.execute(statement, params)
        except pgerrors.UniqueViolation:
            return False
        return True

    def app_generation(self, app, lock=None):
        """The store's key generation of *app* (None: no such app); *lock*: "UPDATE"
        (a rotation) or "SHARE" (a write that depends on the key) until the
        transaction ends."""
        rows = self._rows("SELECT generation FROM ov.apps WHERE name = %s"
                          + (f" FOR {lock}" if lock else ""), (app,))
        return rows[0][0] if rows else None

    def envs(self):
        """[(app, env)] of every environment."""
        return [_checked("envs", ("app", "name"), row) for row in
                self._rows("SELECT app, name FROM ov.envs ORDER BY app, name")]

    def row_counts(self):
        """(app, env) -> how many secret versions the store holds there."""
        return {(app, env): count for app, env, count in (
            _checked("counts", ("app", "env", "count"), row) for row in self._rows(
                "SELECT app, env, count(*) FROM ov.secrets GROUP BY app, env"))}

    def put_env(self, app, env, created):
        """A new environment, with its manifest row at number 0 (so that the first
        writers of its secrets lock a row, and the second one waits)."""
        self.db.execute("INSERT INTO ov.envs (app, name, created) VALUES (%s, %s, %s) "
                        "ON CONFLICT DO NOTHING", (app, env, created))
        self.db.execute("INSERT INTO ov.manifests (app, env, counter, manifest) VALUES "
                        "(%s, %s, 0, '') ON CONFLICT DO NOTHING", (app, env))

    # -- manifests ---------------------------------------------------------------

    def manifest_counters(self):
        """[(app, env, counter, seq)] of every manifest (not the manifests: a pull
        fetches only those that changed)."""
        return [_checked("manifests", ("app", "env", "counter", "seq"), row)
                for row in self._rows("SELECT app, env, counter, seq FROM ov.manifests "
                                      "ORDER BY app, env")]

    def manifest(self, app, env, lock=False):
        """(counter, sealed manifest) of app/env, (0, b"") before its first secret;
        *lock*: until the transaction ends (a writer's)."""
        rows = self._rows("SELECT counter, manifest FROM ov.manifests WHERE app = %s "
                          "AND env = %s" + (" FOR UPDATE" if lock else ""), (app, env))
        if not rows:
            return 0, b""
        counter, blob = _checked("manifests", ("counter", "manifest"), rows[0])
        return counter, bytes(blob)

    def put_manifest(self, app, env, counter, blob):
        """Manifest number *counter*, replacing *counter* - 1 (the caller locked it)."""
        updated = self.db.execute(
            "UPDATE ov.manifests SET counter = %s, manifest = %s WHERE app = %s AND "
            "env = %s AND counter = %s", (counter, blob, app, env, counter - 1)).rowcount
        if updated != 1:
            raise IntegrityError(f"the manifest of {app}/{env} moved during the write")

    # -- secrets -----------------------------------------------------------------

    def secrets(self, app, env, name, after, upto):
        """The records of secret *name* of app/env with after < version <= upto."""
        rows = self._rows(
            f"SELECT {', '.join(SECRET_COLUMNS)} FROM ov.secrets WHERE app = %s AND "
            "env = %s AND name = %s AND version > %s AND version <= %s ORDER BY version",
            (app, env, name, after, upto))
        return [SecretRecord(*_checked("secrets", SECRET_COLUMNS, row))
                for row in rows]

    def put_secret(self, record):
        """Insert a secret version; False if the store has that version already
        (another host wrote it first: versions are append-only)."""
        return self._insert(
            f"INSERT INTO ov.secrets ({', '.join(SECRET_COLUMNS)}) VALUES "
            "(%s, %s, %s, %s, %s, %s, %s)",
            (record.app, record.env, record.name, record.version, record.wrapped_dek,
             record.ciphertext, record.created))

    def wrapped_deks(self, app):
        """(env, name, version) -> (wrapped DEK, ciphertext) of every version of every
        secret of *app* (a key rotation)."""
        columns = ("env", "name", "version", "wrapped_dek", "ciphertext")
        return {(env, name, version): (wrapped, ciphertext)
                for env, name, version, wrapped, ciphertext in (
                    _checked("secrets", columns, row) for row in self._rows(
                        f"SELECT {', '.join(columns)} FROM ov.secrets WHERE app = %s",
                        (app,)))}

    def rewrap_secret(self, record):
        """The record's new wrapped DEK (a key rotation); False if the store has no
        such record (with this very ciphertext)."""
        return self.db.execute(
            "UPDATE ov.secrets SET wrapped_dek = %s WHERE app = %s AND env = %s AND "
            "name = %s AND version = %s AND ciphertext = %s",
            (record.wrapped_dek, record.app, record.env, record.name, record.version,
             record.ciphertext)).rowcount == 1

    def delete_secret(self, app, env, name):
        self.db.execute("DELETE FROM ov.secrets WHERE app = %s AND env = %s AND name = %s",
                        (app, env, name))


class _Guarded:
    """A transaction whose connection failures are one-line StoreErrors."""

    def __init__(self, db):
        self.db = db
        self._inner = db.transaction()

    def __enter__(self):
        try:
            self._inner.__enter__()
        except psycopg.OperationalError as exc:
            raise _unreachable(exc) from None
        return self

    def __exit__(self, kind, exc, tb):
        try:
            self._inner.__exit__(kind, exc, tb)
        except psycopg.OperationalError as failure:
            if kind is None:          # lost while committing: it may have landed
                raise StoreError(f"{_unreachable(failure)} while committing: the "
                                 "write may have reached it; run 'ov sync' and look"
                                 ) from None
            raise _refused(failure) from None
        except psycopg.Error as failure:
            raise _refused(failure) from None
        if isinstance(exc, psycopg.Error):
            raise _refused(exc) from None
        return False


def _refused(exc):
    """A psycopg failure as one line: unreachable (exit 6), or refused (a role
    without the privilege, a schema not ov's: exit 1)."""
    if isinstance(exc, psycopg.OperationalError):
        return _unreachable(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OvError(f"the shared store refused: {first}")
