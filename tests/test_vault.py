"""The vault in-process: key hierarchy, scope, rotation, and tamper detection over
every stored ciphertext byte (Hypothesis), plus the pure helpers it is built on
(crypto encrypt/decrypt, canonical encoding, validation).

One real vault is created per module (Argon2id at the floor costs ~0.15 s); each
example works on a fresh copy of its bytes.  Password unlocks go through a cached
derive_kek so examples stay fast; the cache changes no result.
"""

import functools
import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import PASSWORD, SENTINEL, as_format_1, write_sql
from ovagent.core import canonical, crypto
from ovagent.core.errors import (AuthError, IntegrityError, NotFoundError,
                                 OutdatedVaultError, OvError, UsageError)
from ovagent.core.validate import (MAX_VALUE_BYTES, check_name, check_slug, check_value, is_name,
                              is_slug)
from ovagent.core.vault import Vault

APPS = ("demo", "other")
CONTENT = {
    ("demo", "production"): {"A": b"alpha", "B": b"", "C": bytes(range(1, 256))},
    ("demo", "staging"): {"A": SENTINEL.encode()},
    ("other", "production"): {"A": b"other-alpha", "D": b"d" * 1000},
}
WAYS = ("password", "kek", "scoped-demo", "scoped-other")
TAMPER = settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Built:
    data: bytes              # the pristine vault file
    kek: bytes
    scoped: dict             # app -> its key (a scoped machine key)
    work: Path               # scratch directory for per-example copies


@pytest.fixture(scope="module", autouse=True)
def cached_kdf():
    """Argon2id once per (password, salt, params): same results, no 0.15 s per unlock."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(crypto, "derive_kek", functools.lru_cache(None)(crypto.derive_kek))
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("vault")
    vault, keyring = Vault.create(str(base / "vault.db"), PASSWORD.encode())
    for app in APPS:
        vault.create_app(keyring, app)
    for (app, env), secrets in CONTENT.items():
        vault.create_env(app, env)
        vault.set_secrets(keyring, app, env, secrets)
    scoped = {app: keyring.app_key(app) for app in APPS}
    vault.store.close()  # checkpoints the WAL: the file alone is the whole vault
    assert not (base / "vault.db-wal").exists()
    (base / "work").mkdir()
    return Built((base / "vault.db").read_bytes(), keyring.kek, scoped, base / "work")


def fresh_copy(built, name="vault.db"):
    path = built.work / name
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if leftover.exists():
            leftover.unlink()
    path.write_bytes(built.data)
    return path


@pytest.fixture
def vault_path(built, tmp_path):
    path = tmp_path / "vault.db"
    path.write_bytes(built.data)
    return path


def digests(values):
    """Name -> sha256 of the value: failures show digests, never plaintexts."""
    return {name: hashlib.sha256(value).hexdigest() for name, value in values.items()}


def expected(way):
    apps = APPS if way in ("password", "kek") else (way.split("-", 1)[1],)
    return {key: digests(values) for key, values in CONTENT.items() if key[0] in apps}


def read_every_way(path, built):
    """For each way of unlocking, the digests of every secret it can read, or the
    error it raised.  Any exception other than IntegrityError/AuthError propagates
    and fails the test."""
    unlockers = {
        "password": lambda vault: vault.unlock(PASSWORD.encode()),
        "kek": lambda vault: vault.unlock_key(built.kek),
        "scoped-demo": lambda vault: vault.unlock_key(built.scoped["demo"], "demo"),
        "scoped-other": lambda vault: vault.unlock_key(built.scoped["other"], "other"),
    }
    results = {}
    for way, unlock in unlockers.items():
        try:
            vault = Vault.open(str(path))
        except (IntegrityError, AuthError) as exc:
            results[way] = exc
            continue
        try:
            keyring = unlock(vault)
            results[way] = {key: digests(vault.reveal(keyring, *key))
                            for key in expected(way)}
        except (IntegrityError, AuthError) as exc:
            results[way] = exc
        finally:
            vault.store.close()
    return results


def test_pristine_copy_reads_back_every_way(built):
    results = read_every_way(fresh_copy(built), built)
    assert results == {way: expected(way) for way in WAYS}


# -- tamper detection over every stored ciphertext byte --------------------------


@dataclass(frozen=True)
class Blob:
    table: str
    column: str
    rowid: int
    kind: str
    app: str | None
    size: int = 0

    def readers(self, resized=False):
        """The unlock ways that must read (and so must reject) this blob.  Resized,
        a blob of fixed size is refused as its row is read: one of the vault's
        metadata by every way (at Vault.open), an app's by every reader of the app."""
        if self.table == "meta" and resized:
            return set(WAYS)
        if self.kind == "wrapped_kek":
            return {"password"}
        if self.kind == "kek_check":
            return {"kek"}
        if self.kind == "wrapped_key" and not resized:
            return {"password", "kek"}
        return {"password", "kek", f"scoped-{self.app}"}


def blobs_of(data, work):
    path = work / "inventory.db"
    path.write_bytes(data)
    db = sqlite3.connect(path)
    try:
        found = [Blob("meta", "value", rowid, key, None) for rowid, key in db.execute(
            "SELECT rowid, key FROM meta WHERE key IN ('wrapped_kek', 'kek_check') "
            "ORDER BY key")]
        for rowid, app in db.execute("SELECT rowid, name FROM apps ORDER BY name"):
            found += [Blob("apps", column, rowid, column, app)
                      for column in ("wrapped_key", "key_check")]
        for rowid, app in db.execute("SELECT rowid, app FROM secrets ORDER BY rowid"):
            found += [Blob("secrets", column, rowid, column, app)
                      for column in ("wrapped_dek", "ciphertext")]
        for rowid, app in db.execute("SELECT rowid, app FROM heads ORDER BY rowid"):
            found.append(Blob("heads", "head", rowid, "head", app))
        found = [Blob(b.table, b.column, b.rowid, b.kind, b.app, len(get_blob(db, b)))
                 for b in found]
    finally:
        db.close()
    return found


@pytest.fixture(scope="module")
def blobs(built):
    found = blobs_of(built.data, built.work)
    assert {b.kind for b in found} == {"wrapped_kek", "kek_check", "wrapped_key",
                                      "key_check", "wrapped_dek", "ciphertext", "head"}
    assert len(found) == 2 + 2 * len(APPS) + 3 * sum(map(len, CONTENT.values()))
    return found


def get_blob(db, blob):
    (value,) = db.execute(f"SELECT {blob.column} FROM {blob.table} WHERE rowid = ?",
                          (blob.rowid,)).fetchone()
    assert isinstance(value, bytes)
    return value


def put_blob(db, blob, value):
    db.execute(f"UPDATE {blob.table} SET {blob.column} = ? WHERE rowid = ?",
               (value, blob.rowid))


def tamper(built, edits):
    """Copy the pristine vault and apply edits(db); return the copy's path."""
    path = fresh_copy(built)
    db = sqlite3.connect(path)
    try:
        edits(db)
        db.commit()
    finally:
        db.close()
    return path


def assert_detected(results, readers):
    """Every way that reads a tampered blob fails with IntegrityError or AuthError;
    every other way reads exactly the original plaintexts (never wrong ones)."""
    for way in WAYS:
        if way in readers:
            error = results[way]
            assert isinstance(error, (IntegrityError, AuthError)), (way, error)
            assert SENTINEL not in str(error)
        else:
            assert results[way] == expected(way), way


@TAMPER
@given(data=st.data())
def test_any_flipped_bit_is_detected(built, blobs, data):
    blob = data.draw(st.sampled_from(blobs), "blob")

    def flip(db):
        value = bytearray(get_blob(db, blob))
        bit = data.draw(st.integers(0, len(value) * 8 - 1), "bit")
        value[bit // 8] ^= 1 << (bit % 8)
        put_blob(db, blob, bytes(value))

    assert_detected(read_every_way(tamper(built, flip), built), blob.readers())


@TAMPER
@given(data=st.data())
def test_any_truncation_or_extension_is_detected(built, blobs, data):
    blob = data.draw(st.sampled_from(blobs), "blob")

    def resize(db):
        value = get_blob(db, blob)
        if data.draw(st.booleans(), "truncate"):
            value = value[:data.draw(st.integers(0, len(value) - 1), "length")]
        else:
            value += data.draw(st.binary(min_size=1, max_size=32), "extra")
        put_blob(db, blob, value)

    assert_detected(read_every_way(tamper(built, resize), built),
                    blob.readers(resized=True))


@TAMPER
@given(data=st.data())
def test_any_swap_of_two_blobs_is_detected(built, blobs, data):
    first, second = data.draw(st.lists(st.sampled_from(blobs), min_size=2, max_size=2,
                                       unique=True), "pair")

    def swap(db):
        a, b = get_blob(db, first), get_blob(db, second)
        put_blob(db, first, b)
        put_blob(db, second, a)

    resized = first.size != second.size
    assert_detected(read_every_way(tamper(built, swap), built),
                    first.readers(resized) | second.readers(resized))


@TAMPER
@given(data=st.data())
def test_swapping_whole_secret_records_is_detected(built, blobs, data):
    """Moving both blobs of one secret onto another (same key or not) must fail."""
    app_of = {b.rowid: b.app for b in blobs if b.table == "secrets"}
    first, second = data.draw(st.lists(st.sampled_from(sorted(app_of)), min_size=2,
                                       max_size=2, unique=True), "rows")

    def swap(db):
        get = "SELECT wrapped_dek, ciphertext FROM secrets WHERE rowid = ?"
        a, b = (db.execute(get, (row,)).fetchone() for row in (first, second))
        for row, (dek, ciphertext) in ((first, b), (second, a)):
            db.execute("UPDATE secrets SET wrapped_dek = ?, ciphertext = ? "
                       "WHERE rowid = ?", (dek, ciphertext, row))

    assert_detected(read_every_way(tamper(built, swap), built),
                    {"password", "kek", f"scoped-{app_of[first]}",
                     f"scoped-{app_of[second]}"})


MOVES = {
    "rename secret": "UPDATE secrets SET name = 'Z' WHERE app = 'demo' AND "
                     "env = 'production' AND name = 'A'",
    "bump version": "UPDATE secrets SET version = 2 WHERE app = 'demo' AND "
                    "env = 'production' AND name = 'A'",
    "move to other env": "UPDATE secrets SET env = 'production', name = 'S' WHERE "
                         "app = 'demo' AND env = 'staging'",
    "move to other app": "UPDATE secrets SET app = 'demo', name = 'E' WHERE "
                         "app = 'other' AND name = 'D'",
    "bump app generation": "UPDATE apps SET generation = 2 WHERE name = 'demo'",
}


@pytest.mark.parametrize("statement", MOVES.values(), ids=list(MOVES))
def test_ciphertexts_are_bound_to_their_place(built, statement):
    """Associated data names app, env, name, version and generation: moving a blob
    anywhere else makes it undecryptable rather than someone else's value."""
    path = tamper(built, lambda db: db.execute(statement))
    results = read_every_way(path, built)
    for way in ("password", "kek", "scoped-demo"):
        assert isinstance(results[way], (IntegrityError, AuthError)), (way, results[way])
    if statement == MOVES["move to other app"]:   # other lost D: its head tells
        assert isinstance(results["scoped-other"], IntegrityError)
    else:
        assert results["scoped-other"] == expected("scoped-other")


def test_swapping_app_names_is_detected(built):
    def swap(db):
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute("UPDATE apps SET name = 'tmp' WHERE name = 'demo'")
        db.execute("UPDATE apps SET name = 'demo' WHERE name = 'other'")
        db.execute("UPDATE apps SET name = 'other' WHERE name = 'tmp'")

    results = read_every_way(tamper(built, swap), built)
    assert all(isinstance(results[way], (IntegrityError, AuthError)) for way in WAYS)


# -- metadata edits --------------------------------------------------------------

FLOOR = {"time_cost": 3, "memory_kib": 65536, "parallelism": 4}
BAD_KDF = {
    "time_cost below floor": dict(FLOOR, time_cost=2),
    "time_cost zero": dict(FLOOR, time_cost=0),
    "memory below floor": dict(FLOOR, memory_kib=65535),
    "memory tiny": dict(FLOOR, memory_kib=8),
    "parallelism below floor": dict(FLOOR, parallelism=3),
    "negative": dict(FLOOR, time_cost=-3),
    "string": dict(FLOOR, time_cost="3"),
    "float": dict(FLOOR, memory_kib=65536.0),
    "bool": dict(FLOOR, parallelism=True),
    "absurd memory": dict(FLOOR, memory_kib=2 ** 40),
    "missing field": {"time_cost": 3, "memory_kib": 65536},
    "extra field": dict(FLOOR, salt_len=8),
    "a list": [3, 65536, 4],
    "null": None,
}


def set_meta(built, key, value):
    return tamper(built, lambda db: db.execute(
        "UPDATE meta SET value = ? WHERE key = ?", (value, key)))


@pytest.mark.parametrize("kdf", BAD_KDF.values(), ids=list(BAD_KDF))
def test_kdf_params_edited_below_floor_are_refused(built, kdf):
    path = set_meta(built, "kdf", json.dumps(kdf))
    with pytest.raises(IntegrityError):
        Vault.open(str(path))


@settings(max_examples=100, deadline=None)
@given(time_cost=st.integers(-5, 70), memory_kib=st.integers(0, 2 ** 23),
       parallelism=st.integers(-1, 70))
def test_kdf_params_outside_bounds_never_open(built, time_cost, memory_kib, parallelism):
    kdf = {"time_cost": time_cost, "memory_kib": memory_kib, "parallelism": parallelism}
    path = set_meta(built, "kdf", json.dumps(kdf))
    allowed = (3 <= time_cost <= 64 and 65536 <= memory_kib <= 4 * 1024 * 1024
               and 4 <= parallelism <= 64)
    if allowed:
        Vault.open(str(path)).store.close()
    else:
        with pytest.raises(IntegrityError):
            Vault.open(str(path))


@pytest.mark.parametrize("key,value", [
    ("kdf", "not json"), ("kdf", 7), ("salt", "text salt"), ("salt", b"short"),
    ("salt", 12), ("vault_id", 1.5), ("vault_id", "id"), ("vault_id", b"x" * 15),
    ("kek_check", b"x" * 27), ("kek_check", "x" * 28), ("wrapped_kek", b"x" * 61),
    ("wrapped_kek", 60), ("schema_version", "2"), ("schema_version", 0),
    ("schema_version", 2.0),
], ids=lambda v: repr(v)[:20])
def test_malformed_metadata_is_an_integrity_error(built, key, value):
    with pytest.raises(IntegrityError):
        Vault.open(str(set_meta(built, key, value)))


@pytest.mark.parametrize("key", ["vault_id", "salt", "kdf", "wrapped_kek", "kek_check",
                                 "schema_version"])
def test_missing_metadata_is_an_integrity_error(built, key):
    path = tamper(built, lambda db: db.execute("DELETE FROM meta WHERE key = ?", (key,)))
    with pytest.raises(IntegrityError):
        Vault.open(str(path))


def test_other_salt_means_wrong_password_not_wrong_key(built):
    path = set_meta(built, "salt", os.urandom(crypto.SALT_LEN))
    vault = Vault.open(str(path))
    with pytest.raises(AuthError):
        vault.unlock(PASSWORD.encode())
    vault.store.close()


def test_a_newer_format_is_refused_not_misread(built):
    with pytest.raises(OvError, match="is of format 3; this ov reads format 2 at most"):
        Vault.open(str(set_meta(built, "schema_version", 3)))


# -- heads: someone who can write the vault file (issue 14, item 7) ---------------


def reveal_every_env(path, built):
    """(app, env) -> digests of reveal() with the KEK, or the error it raised."""
    vault = Vault.open(str(path))
    try:
        keyring = vault.unlock_key(built.kek)
        found = {}
        for key in CONTENT:
            try:
                found[key] = digests(vault.reveal(keyring, *key))
            except (IntegrityError, NotFoundError) as exc:
                found[key] = exc
        return found
    finally:
        vault.store.close()


def test_a_deleted_newest_version_is_an_integrity_error_never_the_older_value(built):
    path = fresh_copy(built)
    vault = Vault.open(str(path))
    keyring = vault.unlock_key(built.kek)
    vault.set_secrets(keyring, "demo", "production", {"A": SENTINEL.encode() + b"-2"})
    vault.store.close()
    path = write_sql(path, "DELETE FROM secrets WHERE name = 'A' AND version = 2")
    vault = Vault.open(str(path))
    keyring = vault.unlock_key(built.kek)
    for names in (None, ["A"], ["A", "B"]):
        with pytest.raises(IntegrityError) as caught:
            vault.reveal(keyring, "demo", "production", names)
        assert str(caught.value) == (
            f"vault {path}: secret A of demo/production is at version 2, its newest "
            "record says 1: the vault file was tampered with")
    assert digests(vault.reveal(keyring, "demo", "production", ["B"])) == digests(
        {"B": CONTENT["demo", "production"]["B"]})       # what is intact still reads
    for write in (lambda: vault.set_secrets(keyring, "demo", "production", {"A": b"x"}),
                  lambda: vault.delete_secret(keyring, "demo", "production", "A")):
        with pytest.raises(IntegrityError, match="at version 2"):
            write()
    vault.store.close()


TAMPERINGS = {
    "injected version": (
        "INSERT INTO secrets SELECT app, env, name, 2, wrapped_dek, ciphertext, created "
        "FROM secrets WHERE app = 'demo' AND env = 'production' AND name = 'A'",
        "is at version 1, its newest record says 2"),
    "injected secret": (
        "INSERT INTO secrets SELECT app, env, 'Z', version, wrapped_dek, ciphertext, "
        "created FROM secrets WHERE app = 'demo' AND env = 'production' AND name = 'A'",
        "secret Z of demo/production has no head, yet a record of version 1"),
    "deleted secret": (
        "DELETE FROM secrets WHERE app = 'demo' AND env = 'production' AND name = 'B'",
        "secret B of demo/production is at version 1, but no record of it is stored"),
    "deleted head": (
        "DELETE FROM heads WHERE app = 'demo' AND env = 'production' AND name = 'B'",
        "secret B of demo/production has no head, yet a record of version 1"),
    "deleted heads": (
        "DELETE FROM heads WHERE app = 'demo' AND env = 'production'",
        "has no head, yet a record of version"),
    "head of another secret": (
        "UPDATE heads SET head = (SELECT head FROM heads WHERE app = 'demo' AND "
        "env = 'production' AND name = 'A') WHERE app = 'demo' AND env = 'production' "
        "AND name = 'B'",
        "head of secret B of demo/production: decryption failed"),
    "head of another env": (
        "UPDATE heads SET head = (SELECT head FROM heads WHERE env = 'staging') "
        "WHERE app = 'demo' AND env = 'production'",
        "of demo/production: decryption failed"),
    "head of another app": (
        "UPDATE heads SET head = (SELECT head FROM heads WHERE app = 'other') "
        "WHERE app = 'demo' AND env = 'production'",
        "of demo/production: decryption failed"),
}


@pytest.mark.parametrize("statement,message", TAMPERINGS.values(), ids=list(TAMPERINGS))
def test_records_that_disagree_with_the_head_are_integrity_errors(built, statement,
                                                                  message):
    found = reveal_every_env(tamper(built, lambda db: db.execute(statement)), built)
    error = found["demo", "production"]
    assert isinstance(error, IntegrityError) and message in str(error), error
    assert str(error).endswith(": the vault file was tampered with") or \
        "decryption failed" in str(error)
    assert SENTINEL not in str(error)
    for key in CONTENT:               # the other environments read as they were
        if key != ("demo", "production"):
            assert found[key] == digests(CONTENT[key]), key


def test_an_older_record_of_the_current_version_is_refused(built):
    """Versions start again at 1 after a delete: the head pins the very record (a
    digest of its ciphertext), so the deleted secret's old version 1, put back from
    an earlier copy, is not served in place of the new version 1."""
    path = fresh_copy(built)
    old = sqlite3.connect(path).execute(
        "SELECT wrapped_dek, ciphertext FROM secrets WHERE app = 'demo' AND "
        "env = 'staging' AND name = 'A'").fetchone()
    vault = Vault.open(str(path))
    keyring = vault.unlock_key(built.kek)
    vault.delete_secret(keyring, "demo", "staging", "A")
    assert vault.set_secrets(keyring, "demo", "staging", {"A": b"new"}) == {"A": 1}
    vault.store.close()
    write_sql(path, "UPDATE secrets SET wrapped_dek = X'%s', ciphertext = X'%s' WHERE "
                "app = 'demo' AND env = 'staging'" % (old[0].hex(), old[1].hex()))
    error = reveal_every_env(path, built)["demo", "staging"]
    assert isinstance(error, IntegrityError), error
    assert "secret A of demo/staging is at version 1, but its record of that version " \
        "is not the one written" in str(error)


def test_rotation_reseals_heads_and_refuses_an_env_without_one(built, vault_dump):
    path = fresh_copy(built)
    vault = Vault.open(str(path))
    vault.rotate_app_key(vault.unlock_key(built.kek), "demo")
    vault.store.close()
    assert reveal_every_env(path, built) == {k: digests(v) for k, v in CONTENT.items()}
    write_sql(path, "DELETE FROM heads WHERE env = 'staging'")
    before = vault_dump(path)
    vault = Vault.open(str(path))
    with pytest.raises(IntegrityError, match="of demo/staging has no head"):
        vault.rotate_app_key(vault.unlock_key(built.kek), "demo")
    vault.store.close()
    assert vault_dump(path) == before


def test_a_scoped_key_revoked_while_unlocked_is_an_auth_error(vault_path, built):
    """A long-running agent's scoped key: after a rotation, it reads nothing (an
    auth error, not a tampered vault) and writes nothing under the old key."""
    vault = Vault.open(str(vault_path))
    scoped = vault.unlock_key(built.scoped["demo"], "demo")
    other = Vault.open(str(vault_path))
    other.rotate_app_key(other.unlock_key(built.kek), "demo")
    other.store.close()
    for action in (lambda: vault.reveal(scoped, "demo", "production"),
                   lambda: vault.set_secrets(scoped, "demo", "production", {"A": b"x"})):
        with pytest.raises(AuthError, match="no longer unlocks app 'demo'"):
            action()
    vault.store.close()


VALUES = st.binary(max_size=12).map(lambda value: value.replace(b"\0", b"0"))
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["production", "staging"]),
              st.sampled_from("ABN"), VALUES),
    st.tuples(st.just("delete"), st.sampled_from(["production", "staging"]),
              st.sampled_from("ABN")),
    st.tuples(st.just("rotate"))), max_size=8)
TABLES = ("secrets", "heads", "envs", "apps", "meta")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, data=st.data())
def test_writes_read_back_and_a_deleted_row_never_serves_a_stale_value(built, operations,
                                                                       data):
    """Any sequence of sets, deletes and rotations reads back exactly; then deleting
    any one row of the file leaves every environment reading exactly what was last
    written, or refusing (IntegrityError; NotFoundError when the row was the app or
    environment itself): never an older value."""
    path = fresh_copy(built)
    model = {key: dict(values) for key, values in CONTENT.items()}
    vault = Vault.open(str(path))
    try:
        keyring = vault.unlock_key(built.kek)
        for operation in operations:
            if operation[0] == "set":
                _, env, name, value = operation
                vault.set_secrets(keyring, "demo", env, {name: value})
                model["demo", env][name] = value
            elif operation[0] == "delete" and operation[2] in model["demo", operation[1]]:
                vault.delete_secret(keyring, "demo", *operation[1:])
                del model["demo", operation[1]][operation[2]]
            elif operation[0] == "delete":
                with pytest.raises(NotFoundError):
                    vault.delete_secret(keyring, "demo", *operation[1:])
            else:
                vault.rotate_app_key(keyring, "demo")
        for key, values in model.items():
            assert digests(vault.reveal(keyring, *key)) == digests(values), key
    finally:
        vault.store.close()
    db = sqlite3.connect(path)
    table = data.draw(st.sampled_from(TABLES), "table")
    rowids = [rowid for (rowid,) in db.execute(f"SELECT rowid FROM {table}")]
    rowid = data.draw(st.sampled_from(rowids), "row") if rowids else None
    db.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
    db.commit()
    db.close()
    try:
        found = reveal_every_env(path, built)
    except IntegrityError:
        assert table == "meta"
        event("a row of meta deleted: the vault does not open")
        return
    for key, values in model.items():
        if isinstance(found[key], NotFoundError):
            assert table in ("apps", "envs"), (table, found[key])
        elif not isinstance(found[key], IntegrityError):
            assert found[key] == digests(values), (key, table)
    event(f"a row of {table} deleted: "
          f"{sum(isinstance(r, IntegrityError) for r in found.values())} env(s) refused")


# -- format 1 (before heads) and its upgrade --------------------------------------


def test_a_format_1_vault_is_refused_until_upgraded_then_reads_every_way(built,
                                                                         vault_dump):
    path = as_format_1(fresh_copy(built), built.kek)
    before = vault_dump(path)
    vault = Vault.open(str(path))
    for action in (lambda: vault.unlock(PASSWORD.encode()),
                   lambda: vault.unlock_key(built.kek),
                   lambda: vault.unlock_key(built.scoped["demo"], "demo"),
                   lambda: vault.create_env("demo", "new"),
                   lambda: vault.delete_env("demo", "staging"),
                   lambda: vault.delete_app("other")):
        with pytest.raises(OutdatedVaultError) as caught:
            action()
        assert caught.value.exit_code == 1        # an old vault is not a corrupt one
        assert str(caught.value).endswith(
            f"upgrade it once with 'ov auth upgrade --vault {path}' (with the master "
            "password or an unscoped machine key), then restart any agent that serves "
            "it")
    assert [r.name for r in vault.list_apps()] == list(APPS)   # listing needs no key
    vault.store.close()
    assert vault_dump(path) == before
    upgrading = Vault.open(str(path), upgrading=True)
    with pytest.raises(AuthError, match="needs the master password or an unscoped"):
        upgrading.unlock_key(built.scoped["demo"], "demo")
    pinned = upgrading.upgrade(upgrading.unlock(PASSWORD.encode()))
    assert {(app, env) for app, env, _ in pinned} == {
        key for key, secrets in CONTENT.items() if secrets}
    assert upgrading.upgrade(upgrading.unlock_key(built.kek)) is None
    upgrading.store.close()
    # every way reads what it read before, scoped machine keys included
    assert read_every_way(path, built) == {way: expected(way) for way in WAYS}
    write_sql(path, "DELETE FROM secrets WHERE app = 'demo' AND name = 'C'")
    assert isinstance(reveal_every_env(path, built)["demo", "production"],
                      IntegrityError)


def test_an_upgrade_takes_only_records_that_decrypt(built, vault_dump):
    def flip(db):
        (row,) = db.execute("SELECT MIN(rowid) FROM secrets WHERE app = 'other'").fetchone()
        blob = Blob("secrets", "ciphertext", row, "ciphertext", "other")
        value = get_blob(db, blob)
        put_blob(db, blob, value[:-1] + bytes([value[-1] ^ 1]))

    path = as_format_1(tamper(built, flip), built.kek)
    before = vault_dump(path)
    vault = Vault.open(str(path), upgrading=True)
    with pytest.raises(IntegrityError, match="decryption failed"):
        vault.upgrade(vault.unlock_key(built.kek))
    vault.store.close()
    assert vault_dump(path) == before


def test_writing_format_1_back_never_gets_rid_of_the_heads(built, vault_dump):
    """Fail closed: format 1 with a heads table is not ov's schema; without it, each
    app's key check says it was upgraded, so it is not upgraded again (which would
    take a row deleted meanwhile for the current version)."""
    path = set_meta(built, "schema_version", 1)
    with pytest.raises(IntegrityError, match=r"not that of an ov vault of format 1 "
                                             r"\(table 'heads' is not ov's"):
        Vault.open(str(path))
    write_sql(path, "DROP TABLE heads",
                "DELETE FROM secrets WHERE app = 'demo' AND env = 'production' AND "
                "name = 'A'")
    before = vault_dump(path)
    vault = Vault.open(str(path), upgrading=True)
    with pytest.raises(IntegrityError, match="app 'demo' already has heads, yet the "
                                             "vault says format 1"):
        vault.upgrade(vault.unlock_key(built.kek))
    vault.store.close()
    assert vault_dump(path) == before


# -- key hierarchy, scope and rotation --------------------------------------------


def test_wrong_password_and_foreign_keys_are_auth_errors(vault_path, built):
    vault = Vault.open(str(vault_path))
    with pytest.raises(AuthError, match="wrong master password"):
        vault.unlock(b"not the password")
    with pytest.raises(AuthError):
        vault.unlock_key(os.urandom(32))
    with pytest.raises(AuthError, match="for app 'other'"):
        vault.unlock_key(built.scoped["demo"], "other")
    with pytest.raises(NotFoundError):
        vault.unlock_key(built.scoped["demo"], "nope")


def test_scoped_keyring_reaches_only_its_app(vault_path, built):
    vault = Vault.open(str(vault_path))
    keyring = vault.unlock_key(built.scoped["demo"])  # found among all apps
    assert keyring.scope == "demo" and keyring.kek is None
    assert digests(vault.reveal(keyring, "demo", "production")) == digests(
        CONTENT["demo", "production"])
    with pytest.raises(AuthError, match="scoped to app 'demo'"):
        vault.reveal(keyring, "other", "production")
    for action in (lambda: vault.create_app(keyring, "new"),
                   lambda: vault.rotate_app_key(keyring, "demo"),
                   lambda: vault.change_password(keyring, b"new password"),
                   lambda: vault.machine_key(keyring)):
        with pytest.raises(AuthError):
            action()
    assert vault.machine_key(keyring, "demo") == built.scoped["demo"]


def test_a_keyring_keeps_no_app_key_it_unwrapped(vault_path, built):
    """The agent's keyring lives as long as the agent: an app key unwrapped for one
    request must not stay in it (docs/security.rst, "Key material in memory")."""
    vault = Vault.open(str(vault_path))
    keyring = vault.unlock_key(built.kek)
    app_key = built.scoped["demo"]
    assert keyring.app_key("demo") == app_key
    vault.reveal(keyring, "demo", "production")

    def holds(value):
        if isinstance(value, dict):
            return any(holds(part) for item in value.items() for part in item)
        if isinstance(value, (tuple, list, set)):
            return any(holds(part) for part in value)
        return isinstance(value, (bytes, bytearray, memoryview)) and value == app_key
    assert not any(holds(value) for value in vars(keyring).values())


def test_unscoped_machine_key_is_the_kek(vault_path, built):
    vault = Vault.open(str(vault_path))
    keyring = vault.unlock(PASSWORD.encode())
    assert vault.machine_key(keyring) == built.kek
    assert vault.machine_key(keyring, "other") == built.scoped["other"]


def test_rotation_revokes_scoped_key_and_rewraps_every_version(vault_path, built):
    vault = Vault.open(str(vault_path))
    keyring = vault.unlock_key(built.kek)
    vault.set_secrets(keyring, "demo", "production", {"A": b"alpha-2"})  # 2 versions
    assert vault.rotate_app_key(keyring, "demo") == 2
    assert vault.rotate_app_key(keyring, "demo") == 3  # old versions were rewrapped too
    with pytest.raises(AuthError):
        vault.unlock_key(built.scoped["demo"], "demo")
    new_key = vault.machine_key(keyring, "demo")
    assert new_key != built.scoped["demo"]
    scoped = vault.unlock_key(new_key, "demo")
    assert digests(vault.reveal(scoped, "demo", "production")) == digests(dict(
        CONTENT["demo", "production"], A=b"alpha-2"))
    assert vault.unlock_key(built.scoped["other"], "other").scope == "other"


def test_rotation_of_tampered_app_changes_nothing(built, vault_dump):
    def flip_last(db):
        (row,) = db.execute(
            "SELECT MAX(rowid) FROM secrets WHERE app = 'demo'").fetchone()
        blob = Blob("secrets", "wrapped_dek", row, "wrapped_dek", "demo")
        put_blob(db, blob, get_blob(db, blob)[:-1] + b"\0")

    path = tamper(built, flip_last)
    before = vault_dump(path)
    vault = Vault.open(str(path))
    with pytest.raises(IntegrityError):
        vault.rotate_app_key(vault.unlock_key(built.kek), "demo")
    vault.store.close()
    assert vault_dump(path) == before


def test_set_secrets_is_one_transaction(vault_path, built, vault_dump):
    before = vault_dump(vault_path)
    vault = Vault.open(str(vault_path))
    calls = []
    real = vault.store.put_secret

    def failing_put(record):
        calls.append(record.name)
        if len(calls) == 3:
            raise OSError("disk on fire")
        real(record)

    vault.store.put_secret = failing_put
    with pytest.raises(OSError):
        vault.set_secrets(vault.unlock_key(built.kek), "demo", "production",
                          {"X": b"1", "Y": b"2", "Z": b"3"})
    vault.store.close()
    assert calls == ["X", "Y", "Z"]
    assert vault_dump(vault_path) == before


def test_set_secrets_validates_everything_before_writing(vault_path, built, vault_dump):
    before = vault_dump(vault_path)
    vault = Vault.open(str(vault_path))
    keyring = vault.unlock_key(built.kek)
    for bad in ({"OK": b"1", "BAD": b"a\0b"}, {"OK": b"1", "1BAD": b"x"},
                {"OK": b"1", "BIG": b"x" * (MAX_VALUE_BYTES + 1)}):
        with pytest.raises(UsageError):
            vault.set_secrets(keyring, "demo", "production", bad)
    with pytest.raises(NotFoundError):
        vault.set_secrets(keyring, "demo", "nope", {"OK": b"1"})
    vault.store.close()
    assert vault_dump(vault_path) == before


def test_versions_increase_and_reveal_reads_latest(vault_path, built):
    vault = Vault.open(str(vault_path))
    keyring = vault.unlock_key(built.kek)
    assert vault.set_secrets(keyring, "demo", "production", {"A": b"v2", "N": b"n"}) == {
        "A": 2, "N": 1}
    assert vault.set_secrets(keyring, "demo", "production", {"A": b"v3"}) == {"A": 3}
    assert [(r.name, r.version) for r in vault.list_secrets("demo", "production")] == [
        ("A", 3), ("B", 1), ("C", 1), ("N", 1)]
    assert digests(vault.reveal(keyring, "demo", "production", ["A", "N"])) == digests(
        {"A": b"v3", "N": b"n"})
    with pytest.raises(NotFoundError, match="MISSING"):
        vault.reveal(keyring, "demo", "production", ["A", "MISSING"])


def test_create_refuses_an_existing_vault_and_a_weak_kdf(tmp_path, vault_path):
    with pytest.raises(UsageError):
        Vault.create(str(vault_path), PASSWORD.encode())
    with pytest.raises(IntegrityError):
        Vault.create(str(tmp_path / "weak.db"), PASSWORD.encode(),
                     crypto.KdfParams(time_cost=1, memory_kib=1024, parallelism=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vault.db"]


# -- crypto ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(plaintext=st.binary(max_size=300), associated=st.binary(max_size=64),
       data=st.data())
def test_seal_unseal_round_trip_and_any_flip_fails(plaintext, associated, data):
    key = crypto.random_key()
    blob = crypto.encrypt(key, plaintext, associated)
    assert len(blob) == crypto.NONCE_LEN + len(plaintext) + 16
    assert crypto.decrypt(key, blob, associated, "x") == plaintext
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    flipped = bytearray(blob)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        crypto.decrypt(key, bytes(flipped), associated, "x")
    with pytest.raises(IntegrityError):
        crypto.decrypt(key, blob, associated + b"!", "x")
    with pytest.raises(IntegrityError):
        crypto.decrypt(crypto.random_key(), blob, associated, "x")


def test_unseal_errors_name_what_never_the_data():
    key = crypto.random_key()
    blob = crypto.encrypt(key, SENTINEL.encode(), b"aad")
    for bad in (blob[:27], b"", "text", None, blob[:-1]):
        with pytest.raises(IntegrityError) as caught:
            crypto.decrypt(key, bad, b"aad", "secret X v1")
        assert str(caught.value).startswith("secret X v1: ")
        assert SENTINEL not in str(caught.value)


def test_seal_uses_a_fresh_nonce():
    key = crypto.random_key()
    assert crypto.encrypt(key, b"same", b"") != crypto.encrypt(key, b"same", b"")


def test_derive_kek_depends_on_password_and_salt_and_refuses_weak_params():
    salt = bytes(16)
    params = crypto.DEFAULT_KDF
    first = crypto.derive_kek(b"password one", salt, params)
    assert len(first) == crypto.KEY_LEN
    assert first == crypto.derive_kek(b"password one", salt, params)
    assert first != crypto.derive_kek(b"password two", salt, params)
    assert first != crypto.derive_kek(b"password one", bytes([1]) * 16, params)
    with pytest.raises(IntegrityError):
        crypto.derive_kek(b"x", salt, crypto.KdfParams(2, 65536, 4))


# -- canonical encoding ----------------------------------------------------------


def test_canonical_encoding_vector():
    assert canonical.encode("ab", b"\0", 12, "") == (
        b"\0\0\0\x02ab" b"\0\0\0\x01\0" b"\0\0\0\x0212" b"\0\0\0\0")
    assert canonical.encode() == b""


@pytest.mark.parametrize("field", [1.5, None, True, ["a"], {"a": 1}])
def test_canonical_encoding_rejects_other_types(field):
    with pytest.raises(TypeError):
        canonical.encode("ok", field)


fields = st.lists(st.one_of(st.text(max_size=8), st.binary(max_size=8),
                            st.integers(-10 ** 6, 10 ** 6)), max_size=5)


def as_bytes(field):
    if isinstance(field, str):
        return field.encode("utf-8", "surrogateescape")
    return str(field).encode() if isinstance(field, int) else field


@settings(max_examples=200, deadline=None)
@given(fields, fields)
def test_canonical_encoding_is_injective(a, b):
    """Equal encodings only for the same sequence of field bytes (no delimiter games:
    ("ab", "c") and ("a", "bc") differ)."""
    same = [as_bytes(x) for x in a] == [as_bytes(x) for x in b]
    assert (canonical.encode(*a) == canonical.encode(*b)) == same


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize("slug", ["a", "0", "demo", "my-app-2", "a" * 63, "a-b"])
def test_valid_slugs(slug):
    assert check_slug("app", slug) == slug


@pytest.mark.parametrize("slug", ["", "A", "Demo", "-a", "a-", "a_b", "a b", "a" * 64,
                                  "é", "a\n", "a/b", "..", None, 5])
def test_invalid_slugs(slug):
    with pytest.raises(UsageError, match="invalid env"):
        check_slug("env", slug)


@pytest.mark.parametrize("name", ["A", "_", "a", "DB_URL", "_9", "A" * 255])
def test_valid_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "A\n", "Ä", "A" * 256,
                                  None])
def test_invalid_names(name):
    with pytest.raises(UsageError, match="invalid secret name"):
        check_name(name)


def test_value_limits_never_echo_the_value():
    assert check_value("A", b"x" * MAX_VALUE_BYTES) == b"x" * MAX_VALUE_BYTES
    assert check_value("A", b"") == b""
    for value in (SENTINEL.encode() + b"\0", SENTINEL.encode() * 4000):
        with pytest.raises(UsageError) as caught:
            check_value("A", value)
        assert SENTINEL not in str(caught.value) and "A" in str(caught.value)


# -- names and slugs: validated without the regex engine (client start-up) ---------

SLUG_RE = r"[a-z0-9][a-z0-9-]{0,61}[a-z0-9]|[a-z0-9]"
NAME_RE = r"[A-Za-z_][A-Za-z0-9_]{0,254}"
CANDIDATES = st.one_of(
    st.text(alphabet="az09-_AZ\u00e9\u0660\n ", max_size=70),
    st.text(max_size=8),
    st.builds(lambda n, c: c * n, st.integers(0, 300), st.sampled_from("aZ_9-")))


@given(CANDIDATES)
@settings(max_examples=2000)
def test_slug_and_name_checks_agree_with_their_regular_expressions(text):
    assert is_slug(text) == bool(re.fullmatch(SLUG_RE, text))
    assert is_name(text) == bool(re.fullmatch(NAME_RE, text))
