"""The SQLite store: private files, one transaction per change, concurrent writers that
serialize instead of losing updates, and no damage from kill -9 at any moment."""

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from helpers import DEMO_SECRETS, OV, PASSWORD, SENTINEL
from ovagent.core.errors import (EXIT_FAILURE, EXIT_USAGE, IntegrityError, NotFoundError,
                            OvError, UsageError)
from ovagent.core.store import AppRecord, SecretRecord, SqliteStore


def keyed(path):
    return ["--machine-key", str(path)]


def spawn(demo, *args, input=b""):
    """Start ``ov ARGS`` without waiting; its stdin gets *input* and is closed."""
    proc = subprocess.Popen([OV, *args], env=demo.ov.env, cwd=demo.ov.cwd,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    proc.stdin.write(input.encode() if isinstance(input, str) else input)
    proc.stdin.close()
    return proc


def finish(proc, timeout=60):
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    proc.wait(timeout)
    proc.stdout.close()
    proc.stderr.close()
    return proc.returncode, out, err


def sql(path, query, *params):
    db = sqlite3.connect(path)
    try:
        return db.execute(query, params).fetchall()
    finally:
        db.close()


def versions(path, name):
    return [v for (v,) in sql(path, "SELECT version FROM secrets WHERE app = 'demo' AND "
                                    "env = 'production' AND name = ? ORDER BY version",
                              name)]


def assert_sound(path):
    assert sql(path, "PRAGMA integrity_check") == [("ok",)]
    assert sql(path, "PRAGMA foreign_key_check") == []


# -- files -----------------------------------------------------------------------


def test_vault_files_are_private(demo, digest):
    directory = demo.path.parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    holder = sqlite3.connect(demo.path)  # keeps -wal and -shm in place while ov writes
    try:
        holder.execute("SELECT COUNT(*) FROM meta").fetchall()
        demo.ov("secret", "set", "X", "--app", "demo", *keyed(demo.key),
                input=SENTINEL, check=0, preexec_fn=lambda: os.umask(0))
        for path in directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        assert {p.name for p in directory.iterdir()} == {
            "vault.db", "vault.db-wal", "vault.db-shm"}
        stored = b"".join(p.read_bytes() for p in directory.iterdir())
    finally:
        holder.close()
    leaked = [digest(value) for value in [SENTINEL, *DEMO_SECRETS.values()]
              if value and value.encode() in stored]
    assert leaked == []  # encrypted at rest


# -- transactions (in-process, on a store with dummy metadata) -------------------


@pytest.fixture
def store(tmp_path):
    store = SqliteStore.create(str(tmp_path / "v" / "store.db"), {"vault_id": b"x"})
    yield store
    store.close()


# Dummy blobs of the sizes the store checks on read (AES-256-GCM: wrapped keys are
# nonce + key + tag, key checks nonce + tag, ciphertexts at least that).
WRAPPED, CHECK, CIPHERTEXT = b"w" * 60, b"c" * 28, b"x" * 40


def app(name, generation=1):
    return AppRecord(name, WRAPPED, CHECK, generation, 1.0)


def secret(name, version=1, env="prod"):
    return SecretRecord("a", env, name, version, WRAPPED, CIPHERTEXT, 2.0)


def test_create_refuses_existing_and_leaves_nothing_behind(store, tmp_path):
    with pytest.raises(UsageError, match="already exists"):
        SqliteStore.create(store.path, {"vault_id": b"y"})
    leftovers = [p.name for p in (tmp_path / "v").iterdir()
                 if not p.name.startswith("store.db")]
    assert leftovers == []
    assert store.get_meta()["vault_id"] == b"x"
    with pytest.raises(NotFoundError, match="ov auth init"):
        SqliteStore(str(tmp_path / "missing.db"))


def test_a_failed_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.put_app(app("a"))
            store.create_env("a", "prod")
            store.put_secret(secret("S"))
            raise RuntimeError("midway")
    assert store.list_apps() == [] and store.list_envs("a") == []
    assert store.latest_secrets("a", "prod") == []


def test_updating_an_app_keeps_its_envs_and_secrets(store):
    """put_app on an existing app (key rotation) must update in place: a
    delete-and-insert would cascade to every environment and secret of the app."""
    with store.transaction():
        store.put_app(app("a"))
        store.create_env("a", "prod")
        store.put_secret(secret("S"))
    with store.transaction():
        store.put_app(app("a", generation=2))
    assert [r.generation for r in store.list_apps()] == [2]
    assert store.env_exists("a", "prod")
    assert [(r.name, r.version) for r in store.latest_secrets("a", "prod")] == [("S", 1)]


def test_delete_app_removes_everything_of_it(store):
    with store.transaction():
        for name in ("a", "b"):
            store.put_app(app(name))
        store.create_env("a", "prod")
        store.create_env("b", "prod")
        store.put_secret(secret("S"))
        store.put_secret(SecretRecord("b", "prod", "S", 1, WRAPPED, CIPHERTEXT, 1.0))
    with store.transaction():
        store.delete_app("a")
    assert [r.name for r in store.list_apps()] == ["b"]
    assert sql(store.path, "SELECT app, env, name FROM secrets") == [("b", "prod", "S")]


def test_writers_wait_for_each_other(store):
    """BEGIN IMMEDIATE + busy timeout: a second writer blocks, then proceeds."""
    with store.transaction():
        store.put_app(app("a"))
        store.create_env("a", "prod")
    started, done = threading.Event(), []

    def second_writer():
        other = SqliteStore(store.path)
        started.set()
        with other.transaction():
            done.append(other.next_version("a", "prod", "S"))
            other.put_secret(secret("S", done[-1]))
        other.close()

    with store.transaction():
        store.put_secret(secret("S", store.next_version("a", "prod", "S")))
        thread = threading.Thread(target=second_writer)
        thread.start()
        started.wait()
        time.sleep(0.3)
        assert done == []  # still waiting for our lock
    thread.join(10)
    assert done == [2]
    assert sql(store.path, "SELECT version FROM secrets ORDER BY version") == [(1,), (2,)]


def test_sqlite_failures_become_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x01" * 4096)
    with pytest.raises(IntegrityError, match="unreadable or corrupt"):
        SqliteStore(str(garbage)).get_meta()
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).close()
    with pytest.raises(IntegrityError, match="not an ov vault"):
        SqliteStore(str(foreign)).get_meta()
    directory = tmp_path / "dir.db"
    directory.mkdir()
    with pytest.raises(OvError) as caught:
        SqliteStore(str(directory))
    assert caught.value.exit_code in (EXIT_FAILURE, EXIT_USAGE)
    assert "\n" not in str(caught.value)


# -- what is read back: every value checked, the schema exactly ov's ------------


@pytest.fixture
def filled(store):
    """The store with app a, env prod, secret S and its head."""
    with store.transaction():
        store.put_app(app("a"))
        store.create_env("a", "prod")
        store.put_secret(secret("S"))
        store.put_head("a", "prod", "S", CIPHERTEXT)
    return store


def write_loosely(path, table, column, value):
    """Store *value* in *table*.*column* whatever its type: drop STRICT from the
    schema's text (writable_schema), write, and put STRICT back, so that the table
    reads as STRICT again (PRAGMA table_list says so) while it holds the value."""
    for edit in ("replace(sql, ') STRICT', ')')", "sql || ' STRICT'"):
        db = sqlite3.connect(path)
        try:
            db.execute("PRAGMA writable_schema = ON")
            db.execute(f"UPDATE sqlite_master SET sql = {edit} WHERE name = ?", (table,))
            db.commit()
        finally:
            db.close()
        if edit.startswith("replace"):
            db = sqlite3.connect(path)
            try:
                db.execute(f"UPDATE {table} SET {column} = ?", (value,))
                db.commit()
            finally:
                db.close()


READS = {"apps": lambda s: s.list_apps(), "envs": lambda s: s.list_envs("a"),
         "secrets": lambda s: s.latest_secrets("a", "prod"),
         "heads": lambda s: s.get_heads("a", "prod")}
BAD_VALUES = {
    ("apps", "name"): b"a", ("apps", "wrapped_key"): WRAPPED[:-1],
    ("apps", "key_check"): "a text check", ("apps", "generation"): 0,
    ("apps", "created"): "yesterday",
    ("envs", "name"): b"prod", ("envs", "created"): 1e300,
    ("secrets", "name"): "1NOT_A_NAME", ("secrets", "version"): "one",
    ("secrets", "wrapped_dek"): WRAPPED + b"!", ("secrets", "ciphertext"): b"c" * 27,
    ("secrets", "created"): -1.0,
    ("heads", "name"): "1NOT_A_NAME", ("heads", "head"): "a text head",
}


@pytest.mark.parametrize("where,value", BAD_VALUES.items(),
                         ids=[f"{t}.{c}" for t, c in BAD_VALUES])
def test_every_value_read_is_checked(filled, where, value):
    """A value of the wrong type or size, even in a table that reads as STRICT, is an
    IntegrityError naming vault, table and column, never the value."""
    table, column = where
    filled.close()
    write_loosely(filled.path, table, column, value)
    assert sql(filled.path, f"PRAGMA table_list({table})")[0][5] == 1   # STRICT again
    store = SqliteStore(filled.path)
    store.check_schema(2)                          # the schema is ov's, as text
    reads = [READS[table]] + ([lambda s: s.next_version("a", "prod", "S")]
                              if column == "version" else [])
    for read in reads:
        with pytest.raises(IntegrityError) as caught:
            read(store)
        assert str(caught.value) == (
            f"vault {store.path}: a value in column {column} of table {table} has the "
            "wrong type or size: the vault file was tampered with")
    store.close()


SCHEMA_EDITS = {
    "trigger": ("CREATE TRIGGER t AFTER INSERT ON heads BEGIN DELETE FROM secrets; END",
                "trigger 't' is not ov's"),
    "view": ("CREATE VIEW v AS SELECT * FROM secrets", "view 'v' is not ov's"),
    "index": ("CREATE INDEX i ON secrets (created)", "index 'i' is not ov's"),
    "table": ("CREATE TABLE extra (x)", "table 'extra' is not ov's"),
    "dropped table": ("DROP TABLE heads", "table heads is missing"),
    "recreated without STRICT": (
        "CREATE TABLE loose (app, env, name, head); INSERT INTO loose SELECT * FROM heads; "
        "DROP TABLE heads; ALTER TABLE loose RENAME TO heads", "table heads was altered"),
}


@pytest.mark.parametrize("script,fragment", SCHEMA_EDITS.values(), ids=list(SCHEMA_EDITS))
def test_the_schema_must_be_exactly_ovs(filled, script, fragment):
    filled.check_schema(2)
    db = sqlite3.connect(filled.path)
    try:
        db.executescript(script)
    finally:
        db.close()
    with pytest.raises(IntegrityError) as caught:
        filled.check_schema(2)
    assert str(caught.value) == (
        f"vault {filled.path}: its schema is not that of an ov vault of format 2 "
        f"({fragment}): the vault file was tampered with")


def test_statistics_and_vacuum_leave_the_schema_ovs(filled):
    db = sqlite3.connect(filled.path)
    try:
        db.executescript("ANALYZE; VACUUM; PRAGMA optimize;")
    finally:
        db.close()
    filled.check_schema(2)
    with pytest.raises(IntegrityError, match="format 1 \\(table 'heads' is not ov's\\)"):
        filled.check_schema(1)


def test_a_snapshot_reads_one_committed_state_and_holds_up_no_writer(filled):
    """The head and the records a read checks against it come from one state."""
    writer = SqliteStore(filled.path)
    try:
        with filled.snapshot():
            assert [r.version for r in filled.latest_secrets("a", "prod")] == [1]
            with writer.transaction():
                writer.put_secret(secret("S", 2))
                writer.put_head("a", "prod", "S", CIPHERTEXT + b"2")
            assert [r.version for r in filled.latest_secrets("a", "prod")] == [1]
            assert filled.get_heads("a", "prod") == {"S": CIPHERTEXT}
        assert [r.version for r in filled.latest_secrets("a", "prod")] == [2]
    finally:
        writer.close()


def test_heads_are_read_for_the_names_asked_or_all(filled):
    with filled.transaction():
        filled.put_head("a", "prod", "T", CIPHERTEXT + b"T")
    assert filled.get_heads("a", "prod", ["T"]) == {"T": CIPHERTEXT + b"T"}
    assert set(filled.get_heads("a", "prod")) == {"S", "T"}
    with filled.transaction():
        filled.delete_head("a", "prod", "S")
    assert set(filled.get_heads("a", "prod")) == {"T"}


def test_deleting_an_env_or_app_deletes_its_heads(filled):
    with filled.transaction():
        filled.create_env("a", "other")
        filled.put_head("a", "other", "S", CIPHERTEXT)
    with filled.transaction():
        filled.delete_env("a", "prod")
    assert sql(filled.path, "SELECT app, env FROM heads") == [("a", "other")]
    with filled.transaction():
        filled.delete_app("a")
    assert sql(filled.path, "SELECT COUNT(*) FROM heads") == [(0,)]


# -- concurrent ov processes -----------------------------------------------------


def test_concurrent_set_and_import_lose_nothing(demo, tmp_path, env_digests, digest):
    key = keyed(demo.key)
    writers, imports = 8, 2
    for j in range(imports):
        (tmp_path / f"import{j}.env").write_text(
            "".join(f"IMPORT_{j}_{k}=import-{j}-{k}\n" for k in range(5))
            + "SHARED=from-import\n")
    shared, others = [], []
    for i in range(writers):
        shared.append((f"shared-{i}", spawn(demo, "secret", "set", "SHARED", "--app",
                                            "demo", *key, input=f"shared-{i}")))
        others.append(spawn(demo, "secret", "set", f"OWN_{i}", "--app", "demo", *key,
                            input=f"own-{i}"))
        if i < imports:
            others.append(spawn(demo, "secret", "import",
                                str(tmp_path / f"import{i}.env"), "--app", "demo", *key))
    results = [(value, finish(proc)) for value, proc in shared]
    results += [(None, finish(proc)) for proc in others]
    assert [code for _, (code, _, _) in results] == [0] * len(results), results
    by_version = {int(out.split("(version ")[1].split(")")[0]): value
                  for value, (_, out, _) in results if value}
    # every writer got its own version; together they are 1..N with no gap or repeat
    assert len(by_version) == writers
    assert versions(demo.path, "SHARED") == list(range(1, writers + imports + 1))
    latest = writers + imports
    seen = env_digests(demo.ov, *key, "--app", "demo")
    assert seen["SHARED"] == digest(by_version.get(latest, "from-import"))
    for i in range(writers):
        assert seen[f"OWN_{i}"] == digest(f"own-{i}")
        assert versions(demo.path, f"OWN_{i}") == [1]
    for j in range(imports):
        for k in range(5):
            assert seen[f"IMPORT_{j}_{k}"] == digest(f"import-{j}-{k}")
    for name, value in DEMO_SECRETS.items():
        assert seen[name] == digest(value)
    assert_sound(demo.path)


def test_writers_queue_behind_a_held_lock_instead_of_failing(demo, env_digests, digest):
    key = keyed(demo.key)
    holder = sqlite3.connect(demo.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        procs = [spawn(demo, "secret", "set", "QUEUED", "--app", "demo", *key,
                       input=f"queued-{i}") for i in range(4)]
        time.sleep(1.0)
        assert [proc.poll() for proc in procs] == [None] * 4  # waiting, not failed
    finally:
        holder.execute("COMMIT")
        holder.close()
    results = [finish(proc) for proc in procs]
    assert [code for code, _, _ in results] == [0] * 4, results
    assert versions(demo.path, "QUEUED") == [1, 2, 3, 4]
    by_version = {int(out.split("(version ")[1].split(")")[0]): f"queued-{i}"
                  for i, (_, out, _) in enumerate(results)}
    assert sorted(by_version) == [1, 2, 3, 4]
    final = env_digests(demo.ov, *key, "--app", "demo", "--secrets", "QUEUED")["QUEUED"]
    assert final == digest(by_version[4])


# -- kill -9 at random moments ---------------------------------------------------

WRITER = r"""
import sys
from ovagent.core import keyfile
from ovagent.core.vault import Vault

path, key_path, tag = sys.argv[1:4]
vault = Vault.open(path)
keyring = vault.unlock_key(keyfile.read_key(key_path))
i = 0
while True:
    i += 1
    vault.set_secrets(keyring, "demo", "production",
                      {f"G{j}": f"G{j}:{tag}:{i}".encode() for j in range(4)})
    print(i, flush=True)
    if i % 3 == 0:
        vault.set_secrets(keyring, "demo", "production", {"TEMP": b"temp"})
        vault.delete_secret(keyring, "demo", "production", "TEMP")
    if i % 5 == 0:
        vault.rotate_app_key(keyring, "demo")
"""

CLI_WRITER = r"""
i=0
while :; do
    i=$((i + 1))
    printf 'C0="C0:%s:%s"\nC1="C1:%s:%s"\nC2="C2:%s:%s"\n' \
        "$TAG" $i "$TAG" $i "$TAG" $i > "$FILE.$i"
    "$OV" secret import "$FILE.$i" --app demo --machine-key "$KEY" >/dev/null || exit 1
    echo $i
done
"""


def kill_at_random(proc, rng):
    """Let the writer commit at least once, then SIGKILL its whole process group."""
    first = proc.stdout.readline()
    assert first.strip().isdigit(), (first, proc.stderr.read())
    time.sleep(rng.uniform(0.02, 0.4))
    os.killpg(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return int((first + rest).split()[-1])


def check_after_crash(demo, env_digests, digest, prefix, count, tag, last):
    """The vault opens, every listed secret decrypts, the last group written is whole
    (all names from the same write, at least the last one reported), and SQLite agrees."""
    listing = demo.ov("secret", "list", "--app", "demo", check=0).out
    listed = [line.split("\t")[0] for line in listing.splitlines()]
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo")
    assert all(name in seen for name in listed)
    group = [f"{prefix}{j}" for j in range(count)]
    whole = [n for n in (last, last + 1)
             if all(seen[name] == digest(f"{name}:{tag}:{n}") for name in group)]
    assert whole, f"group {prefix}* is torn or lost after kill (last committed {last})"
    counts = {name: versions(demo.path, name) for name in group}
    assert len({tuple(v) for v in counts.values()}) == 1  # written together, always
    assert counts[group[0]] == list(range(1, len(counts[group[0]]) + 1))
    for name, value in DEMO_SECRETS.items():
        assert seen[name] == digest(value)
    if "TEMP" in seen:
        assert seen["TEMP"] == digest("temp")
    assert_sound(demo.path)


def test_kill_9_during_vault_writes_loses_nothing_committed(demo, env_digests, digest,
                                                            rng):
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(demo.path), str(demo.key), f"r{round_}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            text=True, env=demo.ov.env)
        last = kill_at_random(proc, rng)
        check_after_crash(demo, env_digests, digest, "G", 4, f"r{round_}", last)


def test_kill_9_during_ov_import_loop(demo, tmp_path, env_digests, digest, rng):
    for round_ in range(3):
        env = dict(demo.ov.env, TAG=f"c{round_}", FILE=str(tmp_path / f"c{round_}.env"),
                   OV=OV, KEY=str(demo.key))
        proc = subprocess.Popen(["sh", "-c", CLI_WRITER], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                text=True, env=env)
        last = kill_at_random(proc, rng)
        check_after_crash(demo, env_digests, digest, "C", 3, f"c{round_}", last)


def test_kill_9_during_init_leaves_no_vault_or_a_whole_one(ov, tmp_path, rng):
    vault = tmp_path / "vault" / "vault.db"
    for delay in sorted(rng.uniform(0.05, 0.6) for _ in range(3)):
        if vault.exists():
            break
        proc = subprocess.Popen([OV, "auth", "init", "--password-stdin"], env=ov.env,
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        proc.stdin.write((PASSWORD + "\n").encode())
        proc.stdin.close()
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    if not vault.exists():
        ov("auth", "init", "--password-stdin", input=PASSWORD + "\n", check=0)
    ov("app", "create", "whole", "--password-stdin", input=PASSWORD + "\n", check=0)
    assert_sound(vault)
