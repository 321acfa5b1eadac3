"""Persistence: a narrow interface over records of ciphertext, with SQLite as default.

The store knows apps, environments and secret versions as opaque blobs; it never sees
a key or a plaintext.  Another backend (e.g. a networked one) only has to provide the
same methods.  Every mutating call runs inside ``transaction()``, one SQLite
``BEGIN IMMEDIATE`` transaction in WAL mode with synchronous=FULL: a crash at any
moment loses nothing committed, and concurrent writers serialize instead of losing
updates.
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

SCHEMA_VERSION = 1
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


class SqliteStore:
    """The embedded store: one SQLite file, 0600, in a 0700 directory."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        if not os.path.exists(self.path):
            raise NotFoundError(
                f"no vault at {self.path}; create one with 'ov auth init'")
        if not stat.S_ISREG(os.stat(self.path).st_mode):
            raise UsageError(f"vault {self.path} is not a regular file")
        self._db = self._connect()

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

    @contextlib.contextmanager
    def transaction(self):
        """One atomic write transaction (taken eagerly to serialize writers)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise _translate(self.path, exc) from None
        try:
            yield self
        except BaseException:
            self._rollback()
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self._rollback()
            raise _translate(self.path, exc) from None

    def _rollback(self):
        """Roll back unless SQLite already has: after some errors (a full disk at
        COMMIT, for one) it ends the transaction itself, and ROLLBACK would fail."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    # -- vault-wide metadata -------------------------------------------------

    @_guarded
    def initialize(self, meta):
        """Create the schema and the vault metadata in one transaction."""
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
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

    # -- apps ----------------------------------------------------------------

    @_guarded
    def list_apps(self):
        rows = self._db.execute(
            "SELECT name, wrapped_key, key_check, generation, created FROM apps "
            "ORDER BY name").fetchall()
        return [AppRecord(*row) for row in rows]

    @_guarded
    def get_app(self, name):
        row = self._db.execute(
            "SELECT name, wrapped_key, key_check, generation, created FROM apps "
            "WHERE name = ?", (name,)).fetchone()
        return AppRecord(*row) if row else None

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

    @_guarded
    def delete_app(self, name):
        self._db.execute("DELETE FROM secrets WHERE app = ?", (name,))
        self._db.execute("DELETE FROM envs WHERE app = ?", (name,))
        self._db.execute("DELETE FROM apps WHERE name = ?", (name,))

    # -- environments --------------------------------------------------------

    @_guarded
    def list_envs(self, app):
        return self._db.execute(
            "SELECT name, created FROM envs WHERE app = ? ORDER BY name",
            (app,)).fetchall()

    @_guarded
    def env_exists(self, app, env):
        return self._db.execute("SELECT 1 FROM envs WHERE app = ? AND name = ?",
                                (app, env)).fetchone() is not None

    @_guarded
    def create_env(self, app, env):
        self._db.execute("INSERT INTO envs (app, name, created) VALUES (?, ?, ?)",
                         (app, env, time.time()))

    @_guarded
    def delete_env(self, app, env):
        self._db.execute("DELETE FROM secrets WHERE app = ? AND env = ?", (app, env))
        self._db.execute("DELETE FROM envs WHERE app = ? AND name = ?", (app, env))

    # -- secrets -------------------------------------------------------------

    _SECRET_COLUMNS = "app, env, name, version, wrapped_dek, ciphertext, created"

    @_guarded
    def latest_secrets(self, app, env, names=None):
        """The newest version of each secret in app/env (only *names* if given)."""
        query = (f"SELECT {self._SECRET_COLUMNS} FROM secrets AS s WHERE app = ? "
                 "AND env = ? AND version = (SELECT MAX(version) FROM secrets "
                 "WHERE app = s.app AND env = s.env AND name = s.name)")
        params = [app, env]
        if names is not None:
            query += f" AND name IN ({','.join('?' * len(names))})"
            params += list(names)
        rows = self._db.execute(query + " ORDER BY name", params).fetchall()
        return [SecretRecord(*row) for row in rows]

    @_guarded
    def app_secret_versions(self, app):
        """Every stored version of every secret of an app (for key rotation)."""
        rows = self._db.execute(
            f"SELECT {self._SECRET_COLUMNS} FROM secrets WHERE app = ?",
            (app,)).fetchall()
        return [SecretRecord(*row) for row in rows]

    @_guarded
    def next_version(self, app, env, name):
        (latest,) = self._db.execute(
            "SELECT MAX(version) FROM secrets WHERE app = ? AND env = ? AND name = ?",
            (app, env, name)).fetchone()
        return (latest or 0) + 1

    @_guarded
    def put_secret(self, record):
        self._db.execute(
            f"INSERT INTO secrets ({self._SECRET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.app, record.env, record.name, record.version, record.wrapped_dek,
             record.ciphertext, record.created))

    @_guarded
    def rewrap_secret(self, record, wrapped_dek):
        self._db.execute(
            "UPDATE secrets SET wrapped_dek = ? WHERE app = ? AND env = ? AND name = ? "
            "AND version = ?",
            (wrapped_dek, record.app, record.env, record.name, record.version))

    @_guarded
    def delete_secret(self, app, env, name):
        """Delete every version; return how many were deleted."""
        return self._db.execute(
            "DELETE FROM secrets WHERE app = ? AND env = ? AND name = ?",
            (app, env, name)).rowcount


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
