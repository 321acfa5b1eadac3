"""Persistence: a narrow interface over records of ciphertext, with SQLite as default.

The store knows apps, environments, secret versions and heads as opaque blobs; it
never sees a key or a plaintext.  Another backend (e.g. a networked one) only has to
provide the same methods, and build its records with ``checked()``.  Every mutating
call runs inside ``transaction()``, one SQLite ``BEGIN IMMEDIATE`` transaction in WAL
mode with synchronous=FULL: a crash at any moment loses nothing committed, and
concurrent writers serialize instead of losing updates.  Reads that must agree with
each other (a head and the records it lists) run inside ``snapshot()``.

Nothing read is trusted to have its column's type: whoever can write the file can
recreate a table without STRICT, or store a value of another type and then restore
the schema's text (STRICT is enforced when a value is written, not when it is read).
So every value is checked as its record is built, and a malformed one is an
IntegrityError naming the vault, table and column, never the value; and the schema
itself must be exactly ov's (``check_schema``).
"""

import contextlib
import functools
import os
import sqlite3
import stat
import time
import urllib.parse
from dataclasses import dataclass

from . import files
from .errors import IntegrityError, NotFoundError, OvError, UsageError
from .validate import is_name, is_slug

# Format 2 (SCHEMA_VERSION): format 1 plus each secret's head.  Format 1 vaults
# are upgraded by 'ov auth upgrade' (vault.py); the text of both must never change, as
# check_schema() compares a vault's schema with it.
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 15000

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value ANY NOT NULL) STRICT;
CREATE TABLE apps (
    name TEXT PRIMARY KEY,
    wrapped_key BLOB NOT NULL,
    key_check BLOB NOT NULL,
    generation INTEGER NOT NULL,
    created REAL NOT NULL
) STRICT;
CREATE TABLE envs (
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (app, name)
) STRICT;
CREATE TABLE secrets (
    app TEXT NOT NULL,
    env TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    wrapped_dek BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (app, env, name, version),
    FOREIGN KEY (app, env) REFERENCES envs(app, name) ON DELETE CASCADE
) STRICT;
"""
HEADS_SCHEMA = """
CREATE TABLE heads (
    app TEXT NOT NULL,
    env TEXT NOT NULL,
    name TEXT NOT NULL,
    head BLOB NOT NULL,
    PRIMARY KEY (app, env, name),
    FOREIGN KEY (app, env) REFERENCES envs(app, name) ON DELETE CASCADE
) STRICT;
"""
SCHEMAS = {1: SCHEMA, 2: SCHEMA + HEADS_SCHEMA}

# What each stored value must be.  Sizes are AES-256-GCM's (core/crypto.py): a wrapped
# key is nonce + key + tag, a key check the nonce and tag of an empty plaintext, and
# no ciphertext is shorter than that.
NONCE_LEN, KEY_LEN, TAG_LEN = 12, 32, 16
WRAPPED_KEY_LEN = NONCE_LEN + KEY_LEN + TAG_LEN
KEY_CHECK_LEN = NONCE_LEN + TAG_LEN
LATEST_TIME = 253402300799.0     # the last second of year 9999: what a listing shows
KINDS = {
    "slug": is_slug,
    "name": is_name,
    "number": lambda v: type(v) is int and 0 < v < 2 ** 63,
    "time": lambda v: type(v) is float and 0.0 <= v <= LATEST_TIME,
    "wrapped key": lambda v: type(v) is bytes and len(v) == WRAPPED_KEY_LEN,
    "key check": lambda v: type(v) is bytes and len(v) == KEY_CHECK_LEN,
    "ciphertext": lambda v: type(v) is bytes and len(v) >= KEY_CHECK_LEN,
}
COLUMNS = {
    "apps": {"name": "slug", "wrapped_key": "wrapped key", "key_check": "key check",
             "generation": "number", "created": "time"},
    "envs": {"app": "slug", "name": "slug", "created": "time"},
    "secrets": {"app": "slug", "env": "slug", "name": "name", "version": "number",
                "wrapped_dek": "wrapped key", "ciphertext": "ciphertext",
                "created": "time"},
    "heads": {"app": "slug", "env": "slug", "name": "name", "head": "ciphertext"},
}


def checked(vault, table, columns, row):
    """*row*, the values of *columns* of *table*, if each is of its column's kind;
    else an IntegrityError naming the vault, table and column (never the value)."""
    for column, value in zip(columns, row, strict=True):
        if not KINDS[COLUMNS[table][column]](value):
            raise IntegrityError(
                f"vault {vault}: a value in column {column} of table {table} has the "
                "wrong type or size: the vault file was tampered with")
    return row


@dataclass
class AppRecord:
    name: str
    wrapped_key: bytes
    key_check: bytes
    generation: int
    created: float


@dataclass
class SecretRecord:
    app: str
    env: str
    name: str
    version: int
    wrapped_dek: bytes
    ciphertext: bytes
    created: float


def _guarded(method):
    """Turn SQLite failures into one-line OvErrors naming the vault."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise _translate(self.path, exc) from None

    return wrapper


class SqliteFile:
    """One SQLite file, 0600, in a 0700 directory: its connection, transactions,
    snapshots, metadata and schema.  SqliteStore adds the records."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise NotFoundError(
                f"no vault at {self.path}; create one with 'ov auth init'")
        if not stat.S_ISREG(os.stat(self.path).st_mode):
            raise UsageError(f"vault {self.path} is not a regular file")
        self._db = self._connect()
        # What the open write transaction changed, and who must see it before it
        # commits (a fleet's shared store: client/fleet.py writes through first).
        self.touched = set()
        self.before_commit = None
        self.after_rollback = None

    @classmethod
    def create(cls, path, meta):
        """Build a complete new vault under a temporary name, then link it into
        place: a crash leaves either no vault or a whole one, never half of one."""
        path = os.path.abspath(path)
        directory = os.path.dirname(path)
        old = os.umask(0o077)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            with files.created(path, 0o600, replace=False,
                               leftovers=("-wal", "-shm")) as (fd, tmp):
                _owned_like_directory(fd, directory)
                store = cls(tmp)
                store.initialize(meta)
                store.close()
        except FileExistsError:
            raise UsageError(f"a vault already exists at {path}") from None
        except OSError as exc:
            raise OvError(f"cannot create vault {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        return cls(path)

    @_guarded
    def _connect(self):
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=rw"
        try:
            # check_same_thread=False: the agent shares one connection between its
            # event loop and the threads of spawned commands, under its own lock.
            db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                 timeout=BUSY_TIMEOUT_MS / 1000,
                                 check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise OvError(f"cannot open vault {self.path}: {exc}") from None
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        return db

    def close(self):
        self._db.close()

    def _begin(self, statement):
        try:
            self._db.execute(statement)
        except sqlite3.DatabaseError as exc:
            raise _translate(self.path, exc) from None

    @contextlib.contextmanager
    def transaction(self):
        """One atomic write transaction (taken eagerly to serialize writers).  The
        before_commit hook, if set, sees it whole before it commits, and may refuse
        it by raising; the after_rollback hook, if set, then sees why (outside any
        transaction)."""
        self._begin("BEGIN IMMEDIATE")
        self.touched = set()
        try:
            yield self
            if self.before_commit is not None and self.touched:
                self.before_commit(self)
        except BaseException as exc:
            self._rollback()
            if self.after_rollback is not None:
                self.after_rollback(exc)
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self._rollback()
            raise _translate(self.path, exc) from None

    @contextlib.contextmanager
    def snapshot(self):
        """Reads that all see one committed state (in WAL mode, a read transaction
        holds up no writer); inside a transaction, that transaction's state."""
        if self._db.in_transaction:
            yield self
            return
        self._begin("BEGIN")
        try:
            yield self
        finally:
            self._rollback()

    def _rollback(self):
        """Roll back unless SQLite already has: after some errors (a full disk at
        COMMIT, for one) it ends the transaction itself, and ROLLBACK would fail."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    # -- vault-wide metadata and the schema ----------------------------------

    @_guarded
    def initialize(self, meta):
        """Create the schema and the vault metadata in one transaction."""
        with self.transaction():
            _execute(self._db, SCHEMAS[SCHEMA_VERSION])
            self.put_meta(dict(meta, schema_version=SCHEMA_VERSION))

    @_guarded
    def get_meta(self):
        try:
            rows = self._db.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise IntegrityError(f"{self.path} is not an ov vault") from None
            raise
        return dict(rows)

    @_guarded
    def put_meta(self, meta):
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
        self.touched.add(("meta",))

    @_guarded
    def check_schema(self, version):
        """Refuse a vault whose schema is not exactly the one ov creates for format
        *version*: a table recreated without STRICT or without a constraint, an added
        trigger, view or index, or a heads table in a format-1 vault."""
        found, expected = _schema(self._db), _expected_schema(version)
        wrong = [f"{kind} {name} " + ("is missing" if name not in found else
                                      "was altered")
                 for name, (kind, _, _) in expected.items()
                 if found.get(name) != expected[name]]
        wrong += [f"{kind} {name!r} is not ov's" for name, (kind, _, _) in found.items()
                  if name not in expected]
        if wrong:
            raise IntegrityError(
                f"vault {self.path}: its schema is not that of an ov vault of format "
                f"{version} ({'; '.join(sorted(wrong))}): the vault file was tampered "
                "with")

    @_guarded
    def add_heads(self):
        """Format 1 -> 2: the heads table (inside the caller's transaction)."""
        _execute(self._db, HEADS_SCHEMA)


class SqliteStore(SqliteFile):
    """The embedded store: apps, environments, secret versions and heads."""

    # -- apps ----------------------------------------------------------------

    _APP_COLUMNS = ("name", "wrapped_key", "key_check", "generation", "created")

    def _apps(self, where="", params=()):
        rows = self._db.execute(f"SELECT {', '.join(self._APP_COLUMNS)} FROM apps "
                                f"{where} ORDER BY name", params).fetchall()
        return [AppRecord(*checked(self.path, "apps", self._APP_COLUMNS, row))
                for row in rows]

    @_guarded
    def list_apps(self):
        return self._apps()

    @_guarded
    def get_app(self, name):
        found = self._apps("WHERE name = ?", (name,))
        return found[0] if found else None

    @_guarded
    def put_app(self, record):
        """Insert or update in place: REPLACE would delete the row first and cascade
        to the app's environments and secrets."""
        self._db.execute(
            "INSERT INTO apps (name, wrapped_key, key_check, generation, created) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "wrapped_key = excluded.wrapped_key, key_check = excluded.key_check, "
            "generation = excluded.generation, created = excluded.created",
            (record.name, record.wrapped_key, record.key_check, record.generation,
             record.created))
        self.touched.add(("app", record.name))

    @_guarded
    def delete_app(self, name):
        for statement in ("DELETE FROM heads WHERE app = ?",
                          "DELETE FROM secrets WHERE app = ?",
                          "DELETE FROM envs WHERE app = ?",
                          "DELETE FROM apps WHERE name = ?"):
            self._db.execute(statement, (name,))
        self.touched.add(("app deleted", name))

    # -- environments --------------------------------------------------------

    @_guarded
    def list_envs(self, app):
        rows = self._db.execute(
            "SELECT name, created FROM envs WHERE app = ? ORDER BY name",
            (app,)).fetchall()
        return [checked(self.path, "envs", ("name", "created"), row) for row in rows]

    @_guarded
    def env_exists(self, app, env):
        return self._db.execute("SELECT 1 FROM envs WHERE app = ? AND name = ?",
                                (app, env)).fetchone() is not None

    @_guarded
    def create_env(self, app, env):
        self._db.execute("INSERT INTO envs (app, name, created) VALUES (?, ?, ?)",
                         (app, env, time.time()))
        self.touched.add(("env", app, env))

    @_guarded
    def delete_env(self, app, env):
        for statement in ("DELETE FROM heads WHERE app = ? AND env = ?",
                          "DELETE FROM secrets WHERE app = ? AND env = ?",
                          "DELETE FROM envs WHERE app = ? AND name = ?"):
            self._db.execute(statement, (app, env))
        self.touched.add(("env deleted", app, env))

    # -- heads: each secret's current version, sealed (core/keys.py) ---------

    @_guarded
    def get_heads(self, app, env, names=None):
        """name -> sealed head of the secrets of app/env (only *names* if given)."""
        query, params = "SELECT name, head FROM heads WHERE app = ? AND env = ?", [app, env]
        if names is not None:
            query += f" AND name IN ({','.join('?' * len(names))})"
            params += list(names)
        return dict(checked(self.path, "heads", ("name", "head"), row)
                    for row in self._db.execute(query, params).fetchall())

    @_guarded
    def put_head(self, app, env, name, head):
        self._db.execute(
            "INSERT INTO heads (app, env, name, head) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (app, env, name) DO UPDATE SET head = excluded.head",
            (app, env, name, head))
        self.touched.add(("secret", app, env, name))

    @_guarded
    def delete_head(self, app, env, name):
        self._db.execute("DELETE FROM heads WHERE app = ? AND env = ? AND name = ?",
                         (app, env, name))
        self.touched.add(("secret", app, env, name))

    # -- secrets -------------------------------------------------------------

    _SECRET_COLUMNS = ("app", "env", "name", "version", "wrapped_dek", "ciphertext",
                       "created")

    def _secrets(self, query, params):
        rows = self._db.execute(query.format(", ".join(self._SECRET_COLUMNS)),
                                params).fetchall()
        return [SecretRecord(*checked(self.path, "secrets", self._SECRET_COLUMNS, row))
                for row in rows]

    @_guarded
    def latest_secrets(self, app, env, names=None):
        """The newest version of each secret in app/env (only *names* if given)."""
        query = ("SELECT {} FROM secrets AS s WHERE app = ? AND env = ? AND version = "
                 "(SELECT MAX(version) FROM secrets WHERE app = s.app AND env = s.env "
                 "AND name = s.name)")
        params = [app, env]
        if names is not None:
            query += f" AND name IN ({','.join('?' * len(names))})"
            params += list(names)
        return self._secrets(query + " ORDER BY name", params)

    @_guarded
    def app_secret_versions(self, app):
        """Every stored version of every secret of an app (for key rotation)."""
        return self._secrets("SELECT {} FROM secrets WHERE app = ?", (app,))

    @_guarded
    def next_version(self, app, env, name):
        """One more than the newest stored version of the secret (1 if none is)."""
        (latest,) = self._db.execute(
            "SELECT MAX(version) FROM secrets WHERE app = ? AND env = ? AND name = ?",
            (app, env, name)).fetchone()
        if latest is None:
            return 1
        return checked(self.path, "secrets", ("version",), (latest,))[0] + 1

    @_guarded
    def put_secret(self, record):
        self._db.execute(
            f"INSERT INTO secrets ({', '.join(self._SECRET_COLUMNS)}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.app, record.env, record.name, record.version, record.wrapped_dek,
             record.ciphertext, record.created))

    @_guarded
    def rewrap_secret(self, record, wrapped_dek):
        self._db.execute(
            "UPDATE secrets SET wrapped_dek = ? WHERE app = ? AND env = ? AND name = ? "
            "AND version = ?",
            (wrapped_dek, record.app, record.env, record.name, record.version))
        self.touched.add(("app", record.app))

    @_guarded
    def delete_secret(self, app, env, name):
        """Delete every version; return how many were deleted."""
        return self._db.execute(
            "DELETE FROM secrets WHERE app = ? AND env = ? AND name = ?",
            (app, env, name)).rowcount


def _execute(db, script):
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _schema(db):
    """name -> (type, table, SQL with blanks normalised) of every schema object but
    the indexes SQLite makes for a table's keys (which its SQL already says) and the
    planner's statistics (ANALYZE's sqlite_stat tables, which hold no data)."""
    rows = db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return {name: (kind, table, " ".join(sql.split()) if isinstance(sql, str) else sql)
            for kind, name, table, sql in rows
            if not (kind == "index" and sql is None)
            and not (kind == "table" and name.startswith("sqlite_stat"))}


@functools.lru_cache(maxsize=None)
def _expected_schema(version):
    db = sqlite3.connect(":memory:")
    try:
        _execute(db, SCHEMAS[version])
        return _schema(db)
    finally:
        db.close()


def _owned_like_directory(fd, directory):
    """A vault belongs to the owner of its directory.  Root's ov creating the system
    vault in /var/lib/ov (which the unprivileged system agent owns) gives the file to
    that owner, so the agent can read it; later writes by root keep it readable, as
    SQLite running as root gives the -wal and -shm files the database file's owner
    and mode."""
    st = os.stat(directory)
    if os.geteuid() == 0 and st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def _translate(path, exc):
    if isinstance(exc, sqlite3.OperationalError):
        return OvError(f"vault {path}: {exc}")
    return IntegrityError(f"vault {path} is unreadable or corrupt: {exc}")
