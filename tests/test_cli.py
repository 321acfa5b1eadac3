"""Every ``ov`` command through the real entry point, in subprocesses: what it prints,
what it stores, and how each kind of bad input fails (one ``ov:`` line, documented
exit code, no traceback, nothing written, no secret echoed)."""

import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import (DEMO_SECRETS, OV, PASSWORD, SENTINEL, SETPRIV, Ov, as_format_1,
                     needs_setpriv, ov_env, write_sql)

NEW_PASSWORD = "a brand new passphrase"


def keyed(path):
    return ["--machine-key", str(path)]


def names(listing):
    return [line.split("\t")[0] for line in listing.splitlines()]


def write_key(path, data, mode=0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def assert_demo_secrets(seen, digest, names_=DEMO_SECRETS):
    for name in names_:
        assert seen.get(name) == digest(DEMO_SECRETS[name]), name


@pytest.fixture(scope="module")
def other_template(template_vault, tmp_path_factory):
    """The demo template plus app 'other' (env staging, secret OTHER_ONLY) and its
    scoped key, built once per module through the CLI."""
    base = tmp_path_factory.mktemp("other")
    shutil.copytree(template_vault / "vault", base / "vault")
    (base / "home").mkdir()
    ov = Ov(ov_env(base / "home", base / "vault" / "vault.db"), base)
    key = keyed(template_vault / "machine.kek")
    ov("app", "create", "other", *key, check=0)
    ov("env", "create", "staging", "--app", "other", check=0)
    ov("secret", "set", "OTHER_ONLY", "--app", "other", "--env", "staging", *key,
       input="other-value", check=0)
    ov("auth", "derive-machine-key", "--out", str(base / "other.kek"), "--app", "other",
       *key, check=0)
    return base


@pytest.fixture
def other(demo, other_template, tmp_path):
    """Turn the demo vault into the one with app 'other'; return other's scoped key."""
    shutil.rmtree(demo.path.parent)
    shutil.copytree(other_template / "vault", demo.path.parent)
    shutil.copy2(other_template / "other.kek", tmp_path / "other.kek")
    return tmp_path / "other.kek"


# -- ov auth init ----------------------------------------------------------------


def test_init_creates_a_private_vault_even_with_umask_0(ov, tmp_path):
    result = ov("auth", "init", "--password-stdin", input=PASSWORD + "\n", check=0,
                preexec_fn=lambda: os.umask(0))
    vault = tmp_path / "vault" / "vault.db"
    assert result.out == f"Created vault {vault}\n"
    assert stat.S_IMODE(vault.stat().st_mode) == 0o600
    assert stat.S_IMODE(vault.parent.stat().st_mode) == 0o700
    assert {p.name for p in vault.parent.iterdir()} <= {
        "vault.db", "vault.db-wal", "vault.db-shm"}  # no temporary left behind
    ov("app", "create", "first", "--password-stdin", input=PASSWORD + "\n", check=0)
    assert names(ov("app", "list", check=0).out) == ["first"]


def test_init_honours_the_vault_flag(ov, tmp_path):
    path = tmp_path / "elsewhere" / "my.db"
    ov("auth", "init", "--vault", str(path), "--password-stdin", input=PASSWORD + "\n",
       check=0)
    assert path.is_file() and not (tmp_path / "vault").exists()
    assert ov("app", "list", "--vault", str(path), check=0).out == ""


def test_init_refuses_an_existing_vault(demo, vault_dump, expect_error):
    before = vault_dump(demo.path)
    expect_error(demo.ov("auth", "init", "--password-stdin", input=NEW_PASSWORD + "\n"),
                 2, "already exists")
    assert vault_dump(demo.path) == before


@pytest.mark.parametrize("stdin,fragment", [
    ("short\n", "at least 8 characters"), ("1234567\n", "at least 8 characters"),
    ("", "expected the new master password on stdin")])
def test_init_rejects_bad_passwords_and_creates_nothing(ov, tmp_path, expect_error,
                                                         stdin, fragment):
    expect_error(ov("auth", "init", "--password-stdin", input=stdin), 2, fragment)
    assert not (tmp_path / "vault").exists()


@pytest.mark.parametrize("args", [
    ["auth", "init"],
    ["auth", "change-password"],
    ["app", "create", "x"],
    ["secret", "set", "X", "--app", "demo"],
    ["run", "--app", "demo", "--", "true"],
])
def test_password_prompts_fail_without_a_terminal(demo, expect_error, args):
    """And say what works instead: only options the command has."""
    if args[:2] == ["auth", "init"]:
        args = args + ["--vault", str(demo.path.parent / "new.db")]
    line = expect_error(demo.ov(*args, input=PASSWORD + "\n"), 2, "no terminal")
    offered = re.findall(r"--[a-z-]+", line)
    known = demo.ov(*args[:1 if args[0] == "run" else 2], "--help").out
    assert offered and all(option in known for option in offered), (offered, line)


def test_a_script_sets_a_secret_with_neither_terminal_nor_key_file(demo, env_digests,
                                                                   digest, tmp_path):
    """The value on stdin, the master password on another descriptor."""
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    with open(password, "rb") as fd3:
        result = demo.ov("secret", "set", "NEW", "--app", "demo", "--password-fd",
                         str(fd3.fileno()), input="scripted", pass_fds=(fd3.fileno(),))
    assert result.returncode == 0, result.err
    seen = env_digests(demo.ov, "--machine-key", str(demo.key), "--app", "demo",
                       "--secrets", "NEW")
    assert seen["NEW"] == digest("scripted")


# -- ov auth change-password -----------------------------------------------------


def test_change_password_keeps_machine_keys_working(demo, env_digests, digest,
                                                     expect_error):
    result = demo.ov("auth", "change-password", "--password-stdin",
                     input=f"{PASSWORD}\n{NEW_PASSWORD}\n", check=0)
    assert result.out == "Master password changed\n"
    expect_error(demo.ov("app", "create", "x", "--password-stdin",
                         input=PASSWORD + "\n"), 4, "wrong master password")
    demo.ov("app", "create", "x", "--password-stdin", input=NEW_PASSWORD + "\n", check=0)
    for key in (demo.key, demo.scoped_key):
        assert_demo_secrets(env_digests(demo.ov, *keyed(key), "--app", "demo"), digest)


@pytest.mark.parametrize("stdin,code,fragment", [
    (f"wrong password\n{NEW_PASSWORD}\n", 4, "wrong master password"),
    (f"{PASSWORD}\nshort\n", 2, "at least 8 characters"),
    (f"{PASSWORD}\n", 2, "expected the new master password on stdin"),
    ("", 2, "expected the master password on stdin"),
])
def test_change_password_failures_change_nothing(demo, vault_dump, expect_error, stdin,
                                                 code, fragment):
    before = vault_dump(demo.path)
    expect_error(demo.ov("auth", "change-password", "--password-stdin", input=stdin),
                 code, fragment)
    assert vault_dump(demo.path) == before


# -- ov auth derive-machine-key --------------------------------------------------


def test_derive_unscoped_key_from_password(demo, tmp_path, digest, env_digests):
    out = tmp_path / "new.kek"
    result = demo.ov("auth", "derive-machine-key", "--out", str(out), "--password-stdin",
                     input=PASSWORD + "\n", check=0, preexec_fn=lambda: os.umask(0))
    assert result.out == ""
    assert "WARNING" in result.err and "every app" in result.err
    assert "Traceback" not in result.err
    data = out.read_bytes()
    assert len(data) == 32 and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert digest(data) == digest(demo.key.read_bytes())  # the unscoped key is the KEK
    assert_demo_secrets(env_digests(demo.ov, *keyed(out), "--app", "demo"), digest)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("unlock", ["machine-key", "scoped-key", "password"])
def test_derive_scoped_key(demo, tmp_path, digest, unlock):
    out = tmp_path / "scoped.kek"
    args = {"machine-key": keyed(demo.key), "scoped-key": keyed(demo.scoped_key),
            "password": ["--password-stdin"]}[unlock]
    result = demo.ov("auth", "derive-machine-key", "--out", str(out), "--app", "demo",
                     *args, input=PASSWORD + "\n", check=0)
    assert "app 'demo' only" in result.err and "WARNING" in result.err
    assert digest(out.read_bytes()) == digest(demo.scoped_key.read_bytes())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_derive_refuses_to_overwrite_without_force(demo, tmp_path, digest, expect_error):
    out = write_key(tmp_path / "existing.kek", b"not a key", 0o644)
    expect_error(demo.ov("auth", "derive-machine-key", "--out", str(out),
                         *keyed(demo.key)), 2, "already exists", "--force")
    assert out.read_bytes() == b"not a key"
    dangling = tmp_path / "dangling.kek"
    dangling.symlink_to(tmp_path / "nowhere")
    expect_error(demo.ov("auth", "derive-machine-key", "--out", str(dangling),
                         *keyed(demo.key)), 2, "already exists")
    assert not (tmp_path / "nowhere").exists()
    demo.ov("auth", "derive-machine-key", "--out", str(out), "--force", *keyed(demo.key),
            check=0)
    assert digest(out.read_bytes()) == digest(demo.key.read_bytes())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_derive_failures_write_no_file(demo, other, tmp_path, expect_error):
    out = tmp_path / "never.kek"
    derive = ("auth", "derive-machine-key", "--out", str(out))
    expect_error(demo.ov(*derive, *keyed(demo.scoped_key)), 4, "scoped to app 'demo'")
    expect_error(demo.ov(*derive, "--app", "other", *keyed(demo.scoped_key)), 4,
                 "for app 'other'")
    expect_error(demo.ov(*derive, "--password-stdin", input="wrong password\n"), 4,
                 "wrong master password")
    expect_error(demo.ov(*derive, "--app", "nope", *keyed(demo.key)), 3, "no app 'nope'")
    expect_error(demo.ov(*derive, "--app", "No_Pe", *keyed(demo.key)), 2, "invalid app")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["home", "vault", "machine.kek", "demo.kek", "other.kek"])


# -- ov app ----------------------------------------------------------------------


def test_app_create_list_delete(demo, expect_error):
    key = keyed(demo.key)
    assert demo.ov("app", "create", "api", *key, check=0).out == "Created app api\n"
    assert demo.ov("app", "list", check=0).out.splitlines() == [
        "api\tkey-generation=1\tenvs=-", "demo\tkey-generation=1\tenvs=production"]
    expect_error(demo.ov("app", "create", "api", *key), 2, "already exists")
    assert demo.ov("app", "delete", "api", check=0).out == "Deleted app api\n"
    expect_error(demo.ov("app", "delete", "api"), 3, "no app 'api'")
    assert names(demo.ov("app", "list", check=0).out) == ["demo"]


def test_app_create_with_password_and_refusals(demo, vault_dump, expect_error):
    demo.ov("app", "create", "pw", "--password-stdin", input=PASSWORD + "\n", check=0)
    before = vault_dump(demo.path)
    expect_error(demo.ov("app", "create", "x", "--password-stdin",
                         input="wrong password\n"), 4, "wrong master password")
    expect_error(demo.ov("app", "create", "x", *keyed(demo.scoped_key)), 4,
                 "scoped to app 'demo'")
    expect_error(demo.ov("app", "create", "x", *keyed(demo.key), "--password-stdin"), 2,
                 "not both")
    assert vault_dump(demo.path) == before


@pytest.mark.parametrize("slug", ["Demo", "-x", "a_b", "a" * 64, ""])
def test_invalid_app_slugs(demo, vault_dump, expect_error, slug):
    before = vault_dump(demo.path)
    expect_error(demo.ov("app", "create", *keyed(demo.key), "--", slug), 2, "invalid app")
    assert vault_dump(demo.path) == before


def test_invalid_slugs_in_flags(demo, expect_error):
    expect_error(demo.ov("secret", "list", "--app=-x"), 2, "invalid app '-x'")
    expect_error(demo.ov("secret", "list", "--app", "demo", "--env", "My_Env"), 2,
                 "invalid env 'My_Env'")


def test_app_delete_refuses_while_it_has_envs_unless_forced(demo, vault_dump,
                                                            expect_error):
    before = vault_dump(demo.path)
    expect_error(demo.ov("app", "delete", "demo"), 2, "still has environments", "--force")
    assert vault_dump(demo.path) == before
    demo.ov("app", "delete", "demo", "--force", check=0)
    expect_error(demo.ov("secret", "list", "--app", "demo"), 3, "no app 'demo'")
    db = sqlite3.connect(demo.path)
    assert db.execute("SELECT COUNT(*) FROM secrets").fetchone() == (0,)
    assert db.execute("SELECT COUNT(*) FROM envs").fetchone() == (0,)
    db.close()
    demo.ov("app", "create", "demo", *keyed(demo.key), check=0)
    demo.ov("env", "create", "production", "--app", "demo", check=0)
    assert demo.ov("secret", "list", "--app", "demo", check=0).out == ""


# -- ov app rotate-key -----------------------------------------------------------


def test_rotate_key_revokes_only_the_scoped_keys_of_that_app(demo, other, tmp_path,
                                                              env_digests, digest,
                                                              expect_error):
    key = keyed(demo.key)
    demo.ov("secret", "set", "API_TOKEN", "--app", "demo", *key, input="tok-2", check=0)
    result = demo.ov("app", "rotate-key", "demo", *key, check=0)
    assert result.out.startswith("Rotated key of app demo (generation 2)")
    # the old scoped key is revoked everywhere it could be used
    expect_error(demo.ov("run", *keyed(demo.scoped_key), "--app", "demo", "--", "true"),
                 4, "rotate-key")
    expect_error(demo.ov("secret", "set", "X", "--app", "demo", *keyed(demo.scoped_key),
                         input="x"), 4)
    expect_error(demo.ov("auth", "derive-machine-key", "--out", str(tmp_path / "k"),
                         "--app", "demo", *keyed(demo.scoped_key)), 4)
    # secrets (every version) survive, readable with the unscoped key and a new scoped one
    assert names(demo.ov("secret", "list", "--app", "demo", check=0).out) == sorted(
        DEMO_SECRETS)
    seen = env_digests(demo.ov, *key, "--app", "demo")
    assert_demo_secrets(seen, digest, ["DB_URL", "EMPTY"])
    assert seen["API_TOKEN"] == digest("tok-2")
    fresh = tmp_path / "demo-2.kek"
    demo.ov("auth", "derive-machine-key", "--out", str(fresh), "--app", "demo", *key,
            check=0)
    assert digest(fresh.read_bytes()) != digest(demo.scoped_key.read_bytes())
    assert env_digests(demo.ov, *keyed(fresh), "--app", "demo") == seen
    # another app's scoped key is untouched; rotating again still works
    seen_other = env_digests(demo.ov, *keyed(other), "--app", "other", "--env", "staging")
    assert seen_other["OTHER_ONLY"] == digest("other-value")
    demo.ov("app", "rotate-key", "demo", "--password-stdin", input=PASSWORD + "\n",
            check=0)
    assert "demo\tkey-generation=3\tenvs=production" in demo.ov("app", "list",
                                                                check=0).out


def test_rotate_key_refusals_change_nothing(demo, vault_dump, expect_error):
    before = vault_dump(demo.path)
    expect_error(demo.ov("app", "rotate-key", "demo", *keyed(demo.scoped_key)), 4,
                 "scoped to app 'demo'")
    expect_error(demo.ov("app", "rotate-key", "demo", "--password-stdin",
                         input="wrong password\n"), 4)
    expect_error(demo.ov("app", "rotate-key", "nope", *keyed(demo.key)), 3, "no app")
    assert vault_dump(demo.path) == before


# -- ov env ----------------------------------------------------------------------


def test_env_create_list_delete(demo, expect_error):
    assert demo.ov("env", "create", "staging", "--app", "demo",
                   check=0).out == "Created env demo/staging\n"
    listing = demo.ov("env", "list", "--app", "demo", check=0).out
    assert names(listing) == ["production", "staging"]
    assert all("\tcreated=" in line for line in listing.splitlines())
    expect_error(demo.ov("env", "create", "staging", "--app", "demo"), 2,
                 "already exists")
    demo.ov("secret", "set", "S", "--app", "demo", "--env", "staging", *keyed(demo.key),
            input="s", check=0)
    assert demo.ov("env", "delete", "staging", "--app", "demo",
                   check=0).out == "Deleted env demo/staging\n"
    expect_error(demo.ov("env", "delete", "staging", "--app", "demo"), 3, "no env")
    expect_error(demo.ov("secret", "list", "--app", "demo", "--env", "staging"), 3)
    demo.ov("env", "create", "staging", "--app", "demo", check=0)
    assert demo.ov("secret", "list", "--app", "demo", "--env", "staging",
                   check=0).out == ""  # its secrets went with it


def test_env_errors(demo, vault_dump, expect_error):
    before = vault_dump(demo.path)
    expect_error(demo.ov("env", "create", "x", "--app", "nope"), 3, "no app 'nope'")
    expect_error(demo.ov("env", "list", "--app", "nope"), 3, "no app 'nope'")
    expect_error(demo.ov("env", "create", "Bad_Env", "--app", "demo"), 2, "invalid env")
    expect_error(demo.ov("env", "delete", "nope", "--app", "demo"), 3, "no env 'nope'")
    expect_error(demo.ov("env", "create", "x"), 3, "no app 'default'")
    assert vault_dump(demo.path) == before


# -- ov secret set / list / delete -----------------------------------------------


def test_secret_set_reads_the_value_from_stdin(demo, env_digests, digest):
    key = keyed(demo.key)
    result = demo.ov("secret", "set", "NEW", "--app", "demo", *key,
                     input=SENTINEL + "\n", check=0)
    assert result.out == "Set NEW in demo/production (version 1)\n"
    assert SENTINEL not in result.out + result.err
    result = demo.ov("secret", "set", "NEW", "--app", "demo", *key,
                     input=SENTINEL + "-2\n\n", check=0)  # only one newline is removed
    assert result.out == "Set NEW in demo/production (version 2)\n"
    binary = bytes(range(1, 256)) * 3
    demo.ov("secret", "set", "BINARY", "--app", "demo", "--env", "production",
            *keyed(demo.scoped_key), input=binary, check=0)
    seen = env_digests(demo.ov, *key, "--app", "demo")
    assert seen["NEW"] == digest(SENTINEL + "-2\n")
    assert seen["BINARY"] == digest(binary)


def test_secret_value_is_never_taken_from_the_command_line(demo, vault_dump):
    before = vault_dump(demo.path)
    result = demo.ov("secret", "set", "NEW", "not-a-secret", "--app", "demo",
                     *keyed(demo.key), input="")
    assert result.returncode == 2 and "Traceback" not in result.err
    assert vault_dump(demo.path) == before


def test_secret_value_size_limit(demo, vault_dump, env_digests, digest, expect_error):
    key = keyed(demo.key)
    limit = 64 * 1024
    value = (SENTINEL * (limit // len(SENTINEL) + 1)).encode()[:limit]
    demo.ov("secret", "set", "BIG", "--app", "demo", *key, input=value + b"\n", check=0)
    assert env_digests(demo.ov, *key, "--app", "demo", "--secrets", "BIG")[
        "BIG"] == digest(value)
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "set", "BIG", "--app", "demo", *key,
                         input=value + b"x"), 2, "65537 bytes", "limit is 65536")
    assert vault_dump(demo.path) == before


def test_secret_value_with_nul_is_refused(demo, vault_dump, expect_error):
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "set", "X", "--app", "demo", *keyed(demo.key),
                         input=SENTINEL.encode() + b"\0tail"), 2, "NUL byte")
    assert vault_dump(demo.path) == before


@pytest.mark.parametrize("name", ["1A", "A-B", "Ä", "A" * 256, ""])
def test_invalid_secret_names(demo, vault_dump, expect_error, name):
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "set", name, "--app", "demo", *keyed(demo.key),
                         input=SENTINEL), 2, "invalid secret name")
    assert vault_dump(demo.path) == before


def test_longest_secret_name_is_accepted(demo, env_digests, digest):
    name = "N" * 255
    demo.ov("secret", "set", name, "--app", "demo", *keyed(demo.key), input="v", check=0)
    assert env_digests(demo.ov, *keyed(demo.key), "--app", "demo")[name] == digest("v")


def test_secret_set_to_unknown_places(demo, other, vault_dump, expect_error):
    before = vault_dump(demo.path)
    key = keyed(demo.key)
    expect_error(demo.ov("secret", "set", "X", "--app", "nope", *key, input="v"), 3,
                 "no app 'nope'")
    expect_error(demo.ov("secret", "set", "X", "--app", "demo", "--env", "nope", *key,
                         input="v"), 3, "no env 'nope'")
    expect_error(demo.ov("secret", "set", "X", "--app", "other", "--env", "staging",
                         *keyed(demo.scoped_key), input=SENTINEL), 4, "for app 'other'")
    assert vault_dump(demo.path) == before


def test_secret_list_shows_names_and_versions_never_values(demo):
    demo.ov("secret", "set", "API_TOKEN", "--app", "demo", *keyed(demo.key),
            input="tok-2", check=0)
    out = demo.ov("secret", "list", "--app", "demo", "--env", "production", check=0).out
    lines = out.splitlines()
    assert names(out) == sorted(DEMO_SECRETS)
    assert [line.split("\t")[1] for line in lines] == ["v2", "v1", "v1"]
    assert all(line.split("\t")[2].startswith("updated=") for line in lines)
    assert SENTINEL not in out and "tok-" not in out


def test_secret_list_errors(demo, expect_error):
    expect_error(demo.ov("secret", "list", "--app", "nope"), 3, "no app 'nope'")
    expect_error(demo.ov("secret", "list", "--app", "demo", "--env", "nope"), 3,
                 "no env 'nope'")
    expect_error(demo.ov("secret", "list", "--app", "demo", "--env=-x"), 2,
                 "invalid env")


def test_secret_delete_removes_every_version(demo, expect_error, env_digests):
    key = keyed(demo.key)
    demo.ov("secret", "set", "DB_URL", "--app", "demo", *key, input="v2", check=0)
    assert demo.ov("secret", "delete", "DB_URL", "--app", "demo", *key,
                   check=0).out == "Deleted DB_URL from demo/production\n"
    assert "DB_URL" not in names(demo.ov("secret", "list", "--app", "demo", check=0).out)
    assert "DB_URL" not in env_digests(demo.ov, *key, "--app", "demo")
    db = sqlite3.connect(demo.path)
    count = db.execute("SELECT COUNT(*) FROM secrets WHERE name = 'DB_URL'").fetchone()
    assert count == (0,)
    db.close()
    expect_error(demo.ov("secret", "delete", "DB_URL", "--app", "demo", *key), 3,
                 "no secret DB_URL")
    result = demo.ov("secret", "set", "DB_URL", "--app", "demo", *key, input="v", check=0)
    assert "(version 1)" in result.out


# -- ov secret import ------------------------------------------------------------

ENV_FILE = f"""# exported from elsewhere
export DB_URL="postgres://u:{SENTINEL}@db/app"
API_TOKEN='tok-456'
MULTI="line1
line2\\tend"

PLAIN=plain value # a comment
"""
IMPORTED = {"DB_URL": f"postgres://u:{SENTINEL}@db/app", "API_TOKEN": "tok-456",
            "MULTI": "line1\nline2\tend", "PLAIN": "plain value"}
IMPORT_LINES = ["DB_URL (line 2)", "API_TOKEN (line 3)", "MULTI (line 4)",
                "PLAIN (line 7)"]


def test_import_stores_every_entry(demo, tmp_path, env_digests, digest):
    path = tmp_path / "prod.env"
    path.write_text(ENV_FILE)
    result = demo.ov("secret", "import", str(path), "--app", "demo", *keyed(demo.key),
                     check=0)
    assert result.out.splitlines() == [f"imported {line}" for line in IMPORT_LINES] + [
        "Imported 4/4 secret(s) into demo/production"]
    assert SENTINEL not in result.out + result.err
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo")
    for name, value in IMPORTED.items():
        assert seen[name] == digest(value), name
    assert seen["EMPTY"] == digest("")
    listing = demo.ov("secret", "list", "--app", "demo", check=0).out.splitlines()
    versions = dict(line.split("\t")[:2] for line in listing)
    assert versions == {"API_TOKEN": "v2", "DB_URL": "v2", "EMPTY": "v1", "MULTI": "v1",
                        "PLAIN": "v1"}


def test_import_dry_run_stores_nothing(demo, tmp_path, vault_dump, expect_error):
    path = tmp_path / "prod.env"
    path.write_text(ENV_FILE)
    before = vault_dump(demo.path)
    result = demo.ov("secret", "import", str(path), "--dry-run", "--app", "demo", check=0)
    assert result.out.splitlines() == [
        *(f"would import {line}" for line in IMPORT_LINES),
        "Would import 4/4 secret(s) into demo/production"]
    assert vault_dump(demo.path) == before
    expect_error(demo.ov("secret", "import", str(path), "--dry-run", "--app", "demo",
                         "--env", "nope"), 3, "no env 'nope'")


def test_import_counts_duplicates_once(demo, tmp_path, env_digests, digest):
    path = tmp_path / "dup.env"
    path.write_text("A=1\nB=2\nA=3\n")
    result = demo.ov("secret", "import", str(path), "--app", "demo",
                     "--password-stdin", input=PASSWORD + "\n", check=0)
    assert result.out.splitlines()[-1] == "Imported 2/3 secret(s) into demo/production"
    assert len(result.out.splitlines()) == 4
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo", "--secrets", "A,B")
    assert (seen["A"], seen["B"]) == (digest("3"), digest("2"))


LONG_NAME = "L" * 256
MALFORMED = {
    "not an assignment": ("OK=1\nthis is not dotenv\n", 2, "expected NAME=VALUE"),
    "bad name": ("OK=1\n1BAD=x\n", 2, "expected NAME=VALUE"),
    "unterminated": (f'OK=1\nA="{SENTINEL}\nmore\n', 2, "unterminated double quote"),
    "quote left open": (f'OK=1\nA="{SENTINEL}\nB=2\n', 2, "runs into line 3"),
    "control character": (f"OK=1\n\nA=ab\x1b{SENTINEL}\n", 3, "control character"),
    "lone CR line": (f"OK=1\rA={SENTINEL}\rnot dotenv\n", 3, "expected NAME=VALUE"),
    "bad escape": (f'OK=1\nA="\\q{SENTINEL}"\n', 2, "invalid escape"),
    "trailing text": (f"OK=1\nA='{SENTINEL}' more\n", 2, "unexpected text"),
    "nul": (f"OK=1\nA={SENTINEL}\0\n", 2, "NUL byte"),
    "oversized": (f"OK=1\nX=2\nBIG={SENTINEL * 3000}\n", 3, "limit is 65536"),
    "name too long": (f"OK=1\n{LONG_NAME}=x\n", 2, "invalid secret name"),
}


@pytest.mark.parametrize("content,line,fragment", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_import_names_file_and_line_and_stores_nothing(
        demo, tmp_path, vault_dump, expect_error, content, line, fragment):
    path = tmp_path / "bad.env"
    path.write_text(content)
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "import", str(path), "--app", "demo",
                         *keyed(demo.key)), 2, f"{path}:{line}: ", fragment)
    assert vault_dump(demo.path) == before


@pytest.mark.parametrize("case", ["not an assignment", "oversized", "name too long"])
def test_dry_run_refuses_what_import_refuses(demo, tmp_path, expect_error, case):
    content, line, fragment = MALFORMED[case]
    path = tmp_path / "bad.env"
    path.write_text(content)
    expect_error(demo.ov("secret", "import", str(path), "--dry-run", "--app", "demo"), 2,
                 f"{path}:{line}: ", fragment)


def test_import_reads_what_other_dotenv_tools_read(demo, tmp_path, env_digests, digest):
    """Issue 14: a byte-order mark, a comment right after '=', a comment after a tab,
    and lone carriage returns as line breaks."""
    path = tmp_path / "windows.env"
    path.write_bytes(b"\xef\xbb\xbfKEY= # comment\r\nRETRIES=3\t# seconds\r\n"
                     b"a=b\rc=d\rQUOTED='" + SENTINEL.encode() + b"\rline 2'\r")
    result = demo.ov("secret", "import", str(path), "--app", "demo", *keyed(demo.key),
                     check=0)
    assert result.out.splitlines() == [
        "imported KEY (line 1)", "imported RETRIES (line 2)", "imported a (line 3)",
        "imported c (line 4)", "imported QUOTED (line 5)",
        "Imported 5/5 secret(s) into demo/production"]
    assert result.err == ""
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo")
    expected = {"KEY": "", "RETRIES": "3", "a": "b", "c": "d",
                "QUOTED": SENTINEL + "\nline 2"}
    assert {name: seen.get(name) for name in expected} == {
        name: digest(value) for name, value in expected.items()}


def test_import_warns_about_values_other_tools_would_expand(demo, tmp_path, vault_dump,
                                                            env_digests, digest):
    path = tmp_path / "expand.env"
    path.write_text(f"PLAIN=${SENTINEL}\nURL=postgres://${{DB_USER}}:{SENTINEL}@db\n"
                    f'QUOTED="${{HOME}}/{SENTINEL}"\nSINGLE=\'{SENTINEL}${{X}}\'\n'
                    f'ESCAPED="\\${{Y}}"\n')
    warnings = [f"ov: {path}:{line}: {name} contains '${{': ov stores it literally, "
                "other dotenv tools would expand it"
                for line, name in [(2, "URL"), (3, "QUOTED"), (4, "SINGLE"), (5, "ESCAPED")]]
    before = vault_dump(demo.path)
    result = demo.ov("secret", "import", str(path), "--dry-run", "--app", "demo", check=0)
    assert result.err.splitlines() == warnings
    assert result.out.splitlines()[-1] == "Would import 5/5 secret(s) into demo/production"
    assert SENTINEL not in result.out + result.err
    assert vault_dump(demo.path) == before
    result = demo.ov("secret", "import", str(path), "--app", "demo", *keyed(demo.key),
                     check=0)
    assert result.err.splitlines() == warnings
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo")
    expected = {"PLAIN": "$" + SENTINEL, "URL": f"postgres://${{DB_USER}}:{SENTINEL}@db",
                "QUOTED": f"${{HOME}}/{SENTINEL}", "SINGLE": SENTINEL + "${X}",
                "ESCAPED": "${Y}"}
    assert {name: seen.get(name) for name in expected} == {
        name: digest(value) for name, value in expected.items()}


def test_import_unreadable_files(demo, tmp_path, vault_dump, expect_error):
    before = vault_dump(demo.path)
    binary = tmp_path / "latin1.env"
    binary.write_bytes(b"A=caf\xe9\n")
    expect_error(demo.ov("secret", "import", str(binary), "--app", "demo",
                         *keyed(demo.key)), 2, "not UTF-8")
    binary.write_bytes("\ufeffA=1\n".encode("utf-16"))
    expect_error(demo.ov("secret", "import", str(binary), "--app", "demo",
                         *keyed(demo.key)), 2, "is UTF-16 text; convert it to UTF-8")
    expect_error(demo.ov("secret", "import", str(tmp_path / "missing.env"), "--app",
                         "demo", *keyed(demo.key)), 2, "cannot read")
    expect_error(demo.ov("secret", "import", str(tmp_path), "--app", "demo",
                         *keyed(demo.key)), 2, "cannot read")
    assert vault_dump(demo.path) == before


def test_import_refusals_store_nothing(demo, other, tmp_path, vault_dump, expect_error):
    path = tmp_path / "prod.env"
    path.write_text(ENV_FILE)
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "import", str(path), "--app", "other", "--env",
                         "staging", *keyed(demo.scoped_key)), 4, "for app 'other'")
    expect_error(demo.ov("secret", "import", str(path), "--app", "demo",
                         "--password-stdin", input="wrong password\n"), 4)
    expect_error(demo.ov("secret", "import", str(path), "--app", "demo", "--env", "nope",
                         *keyed(demo.key)), 3, "no env 'nope'")
    assert vault_dump(demo.path) == before
    demo.ov("secret", "import", str(path), "--app", "demo", *keyed(demo.scoped_key),
            check=0)


# -- ov run ----------------------------------------------------------------------


def test_run_gives_all_secrets_on_top_of_the_callers_environment(demo, home,
                                                                  env_digests, digest):
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo",
                       env={"CALLER_MARK": "from-caller", "API_TOKEN": "overridden"})
    assert_demo_secrets(seen, digest)  # the secret wins over the caller's variable
    assert seen["CALLER_MARK"] == digest("from-caller")
    assert seen["HOME"] == digest(str(home))
    assert seen["PATH"] == digest(os.environ["PATH"])


def test_run_with_a_secret_list(demo, env_digests, digest):
    seen = env_digests(demo.ov, *keyed(demo.scoped_key), "--app", "demo", "--secrets",
                       " DB_URL , EMPTY")
    assert_demo_secrets(seen, digest, ["DB_URL", "EMPTY"])
    assert "API_TOKEN" not in seen


@pytest.mark.parametrize("secrets,code,fragment", [
    ("DB_URL,NOPE,ALSO_NOPE", 3, "no secret ALSO_NOPE, NOPE in demo/production"),
    ("DB_URL,1BAD", 2, "invalid secret name"),
    (",", 2, "--secrets needs at least one name"),
])
def test_run_secret_list_errors(demo, expect_error, secrets, code, fragment):
    expect_error(demo.ov("run", *keyed(demo.key), "--app", "demo", "--secrets", secrets,
                         "--", "sh", "-c", "echo RAN"), code, fragment)


@pytest.mark.parametrize("script,status", [
    ("exit 0", 0), ("exit 1", 1), ("exit 42", 42), ("kill -TERM $$", -15),
    ("kill -KILL $$", -9), ("kill -PIPE $$", -13),
])
def test_run_exit_status_is_the_commands_own(demo, script, status):
    result = demo.ov("run", *keyed(demo.key), "--app", "demo", "--", "sh", "-c", script)
    assert result.returncode == status, (result.out, result.err)
    assert result.err == ""


def test_run_replaces_itself_with_the_command(demo):
    """exec, not spawn: the command's parent is ov's parent (this test)."""
    result = demo.ov("run", *keyed(demo.key), "--app", "demo", "--", "sh", "-c",
                     'echo "$PPID"', check=0)
    assert int(result.out) == os.getpid()


def test_run_command_inherits_no_ignored_signals_from_python(demo):
    """Python ignores SIGPIPE and SIGXFSZ; after exec the command must not."""
    probe = ["sh", "-c", "grep SigIgn /proc/self/status"]
    direct = subprocess.run(probe, capture_output=True, text=True,
                            start_new_session=True, env=demo.ov.env).stdout
    via_ov = demo.ov("run", *keyed(demo.key), "--app", "demo", "--", *probe, check=0).out
    assert via_ov == direct


def test_run_passes_stdin_and_stdout_through(demo):
    result = demo.ov("run", *keyed(demo.key), "--app", "demo", "--", "cat",
                     input=b"in\x00out\n", check=0)
    assert result.stdout == b"in\x00out\n"


def test_run_command_not_found_or_not_executable(demo, tmp_path, expect_error):
    key = keyed(demo.key)
    expect_error(demo.ov("run", *key, "--app", "demo", "--", "no-such-command-xyz"), 127,
                 "no-such-command-xyz: command not found")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    expect_error(demo.ov("run", *key, "--app", "demo", "--", str(script)), 126,
                 "Permission denied")


def test_scoped_key_cannot_decrypt_another_app(demo, other, expect_error, env_digests,
                                               digest):
    expect_error(demo.ov("run", *keyed(demo.scoped_key), "--app", "other", "--env",
                         "staging", "--", "sh", "-c", "echo RAN"), 4, "for app 'other'")
    expect_error(demo.ov("run", *keyed(other), "--app", "demo", "--", "sh", "-c",
                         "echo RAN"), 4, "for app 'demo'")
    seen = env_digests(demo.ov, *keyed(other), "--app", "other", "--env", "staging")
    assert seen["OTHER_ONLY"] == digest("other-value") and "DB_URL" not in seen


def test_run_unknown_places(demo, expect_error):
    key = keyed(demo.key)
    expect_error(demo.ov("run", *key, "--", "true"), 3, "no app 'default'")
    expect_error(demo.ov("run", *key, "--app", "nope", "--", "true"), 3, "no app 'nope'")
    expect_error(demo.ov("run", *key, "--app", "demo", "--env", "nope", "--", "true"), 3,
                 "no env 'nope'")
    expect_error(demo.ov("run", *keyed(demo.scoped_key), "--app", "nope", "--", "true"),
                 3, "no app 'nope'")


# -- machine key files -----------------------------------------------------------

KEY_PROBLEMS = {
    "short": (lambda p, key: write_key(p, key[:31]), "exactly 32 bytes, not 31"),
    "long": (lambda p, key: write_key(p, key + b"\n"), "exactly 32 bytes, not more"),
    "empty": (lambda p, key: write_key(p, b""), "exactly 32 bytes, not 0"),
    "0640": (lambda p, key: write_key(p, key, 0o640), "has mode 0640"),
    "0604": (lambda p, key: write_key(p, key, 0o604), "has mode 0604"),
    "0644": (lambda p, key: write_key(p, key, 0o644), "has mode 0644"),
    "0660": (lambda p, key: write_key(p, key, 0o660), "has mode 0660"),
    "symlink": (lambda p, key: p.symlink_to(write_key(p.with_name("real.kek"), key)),
                "is a symlink"),
    "directory": (lambda p, key: p.mkdir(), "is not a regular file"),
    "fifo": (lambda p, key: os.mkfifo(p, 0o600), "is not a regular file"),
    "missing": (lambda p, key: None, "cannot read machine key"),
}


@pytest.mark.parametrize("make,fragment", KEY_PROBLEMS.values(), ids=list(KEY_PROBLEMS))
def test_bad_machine_key_files_are_refused(demo, tmp_path, vault_dump, expect_error,
                                           make, fragment):
    path = tmp_path / "bad.kek"
    make(path, demo.key.read_bytes())
    message = expect_error(demo.ov("run", *keyed(path), "--app", "demo", "--", "sh", "-c",
                                   "echo RAN"), 2, fragment)
    assert str(path) in message


def test_bad_machine_key_writes_nothing(demo, tmp_path, vault_dump, expect_error):
    path = write_key(tmp_path / "bad.kek", demo.key.read_bytes(), 0o640)
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "set", "X", "--app", "demo", *keyed(path), input="v"),
                 2, "has mode 0640")
    expect_error(demo.ov("app", "rotate-key", "demo", *keyed(path)), 2, "has mode 0640")
    assert vault_dump(demo.path) == before


def test_read_only_key_file_is_accepted(demo, tmp_path, env_digests, digest):
    path = write_key(tmp_path / "ro.kek", demo.key.read_bytes(), 0o400)
    assert_demo_secrets(env_digests(demo.ov, *keyed(path), "--app", "demo"), digest)


def test_key_of_another_vault_is_an_auth_error(demo, tmp_path, expect_error):
    path = write_key(tmp_path / "foreign.kek", os.urandom(32))
    expect_error(demo.ov("run", *keyed(path), "--app", "demo", "--", "true"), 4,
                 "does not unlock this vault")


# -- which app, env and secrets: flags, .ov.yaml, user config, defaults -----------


@pytest.fixture
def project(demo, home):
    """home/proj/sub/deeper, the working directory for resolution tests."""
    deeper = home / "proj" / "sub" / "deeper"
    deeper.mkdir(parents=True)
    return deeper


def probe(demo, env_digests, cwd, *args):
    return env_digests(demo.ov, *keyed(demo.key), *args, cwd=cwd)


def test_project_file_chooses_app_env_and_secrets(demo, other, project, env_digests,
                                                  digest):
    (project.parent.parent / ".ov.yaml").write_text("app: other\nenv: staging\n")
    seen = probe(demo, env_digests, project)
    assert seen["OTHER_ONLY"] == digest("other-value") and "DB_URL" not in seen
    seen = probe(demo, env_digests, project, "--app", "demo", "--env", "production")
    assert_demo_secrets(seen, digest)
    assert "OTHER_ONLY" not in seen
    (project.parent.parent / ".ov.yaml").write_text(
        "app: demo\nenv: production\nsecrets: [API_TOKEN, EMPTY]\n")
    seen = probe(demo, env_digests, project)
    assert_demo_secrets(seen, digest, ["API_TOKEN", "EMPTY"])
    assert "DB_URL" not in seen
    seen = probe(demo, env_digests, project, "--secrets", "DB_URL")
    assert_demo_secrets(seen, digest, ["DB_URL"])
    assert "API_TOKEN" not in seen


def test_only_the_nearest_project_file_counts(demo, project, env_digests, digest):
    (project.parent.parent / ".ov.yaml").write_text("app: [broken\n")
    (project.parent / ".ov.yaml").write_text("app: demo\n")
    assert_demo_secrets(probe(demo, env_digests, project), digest)
    result = demo.ov("secret", "list", cwd=project.parent.parent)
    assert result.returncode == 2 and "invalid YAML" in result.err


def test_project_files_above_home_are_ignored(demo, project, home, expect_error):
    (home.parent / ".ov.yaml").write_text("app: demo\n")
    expect_error(demo.ov("secret", "list", cwd=project), 3, "no app 'default'")
    (home / ".ov.yaml").write_text("app: demo\n")
    assert names(demo.ov("secret", "list", cwd=project, check=0).out) == sorted(
        DEMO_SECRETS)


def test_user_config_comes_after_the_project_file(demo, other, project, home,
                                                  env_digests, digest):
    config = home / "config" / "ov" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("app: other\nenv: staging\n")
    seen = probe(demo, env_digests, project)
    assert seen["OTHER_ONLY"] == digest("other-value")
    (project / ".ov.yaml").write_text("app: demo\n")  # env still from the user config
    result = demo.ov("secret", "list", cwd=project)
    assert result.returncode == 3 and "no env 'staging' in app 'demo'" in result.err
    (project / ".ov.yaml").write_text("env: production\n")
    result = demo.ov("secret", "list", cwd=project)
    assert result.returncode == 3 and "no env 'production' in app 'other'" in result.err


def test_defaults_are_app_default_env_production(demo, project):
    demo.ov("app", "create", "default", *keyed(demo.key), check=0)
    assert demo.ov("env", "create", "production", cwd=project,
                   check=0).out == "Created env default/production\n"
    result = demo.ov("secret", "set", "D", *keyed(demo.key), input="d", cwd=project,
                     check=0)
    assert result.out == "Set D in default/production (version 1)\n"


INVALID_CONFIGS = {
    "syntax": ("app: demo\nenv: [x\nsecrets: []\n", "invalid YAML"),
    "unknown key": ("app: demo\ncolour: blue\n", "expected a mapping with keys"),
    "not a mapping": ("- demo\n", "expected a mapping with keys"),
    "bad app": ("app: Demo\n", "invalid app 'Demo'"),
    "bad env": ("env: -prod\n", "invalid env '-prod'"),
    "secrets not a list": ("secrets: DB_URL\n", "secrets must be a list"),
    "bad secret name": ("secrets: [DB_URL, 1BAD]\n", "invalid secret name '1BAD'"),
    "not utf-8": (b"app: d\xe9mo\n", "cannot read"),
    "python tag": ("app: !!python/object/apply:os.system [true]\n", "invalid YAML"),
}


def write_config(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("content,fragment", INVALID_CONFIGS.values(),
                         ids=list(INVALID_CONFIGS))
def test_invalid_project_file_is_a_one_line_usage_error(demo, project, expect_error,
                                                        content, fragment):
    path = write_config(project.parent / ".ov.yaml", content)
    expect_error(demo.ov("secret", "list", cwd=project), 2, str(path), fragment)


@pytest.mark.parametrize("case", ["syntax", "bad app"])
def test_invalid_user_config_is_a_one_line_usage_error(demo, project, home, expect_error,
                                                       case):
    content, fragment = INVALID_CONFIGS[case]
    path = write_config(home / "config" / "ov" / "config.yaml", content)
    expect_error(demo.ov("secret", "list", cwd=project), 2, str(path), fragment)


def test_invalid_project_file_stops_every_command(demo, project, vault_dump,
                                                  expect_error):
    path = write_config(project / ".ov.yaml", "app: demo\nsecrets: nope\n")
    before = vault_dump(demo.path)
    for args in (["run", *keyed(demo.key), "--", "sh", "-c", "echo RAN"],
                 ["secret", "set", "X", *keyed(demo.key)], ["env", "create", "x"]):
        expect_error(demo.ov(*args, input="v", cwd=project), 2, str(path))
    assert vault_dump(demo.path) == before


# -- which config files count: owner, mode, where the search stops (issue 14) ------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files")
WHICH_APP = ["sh", "-c", 'echo "${OTHER_ONLY+other}${API_TOKEN+demo}"']


def user_config(home, content="app: demo\n"):
    return write_config(home / "config" / "ov" / "config.yaml", content)


@needs_root
def test_a_project_file_planted_by_another_user_is_ignored(demo, other, home, tmp_path):
    """The reproduced attack: a .ov.yaml planted above root's build directory outside
    $HOME chose another app.  It is ignored with one line, as if it were not there."""
    user_config(home)
    build = tmp_path / "x" / "build"
    planted = write_config(tmp_path / "x" / ".ov.yaml", "app: other\nenv: staging\n")
    build.mkdir()
    for path in (planted, planted.parent):
        os.chown(path, 1000, 1000)
    result = demo.ov("run", *keyed(demo.key), "--", *WHICH_APP, cwd=build)
    assert (result.returncode, result.out) == (0, "demo\n"), (result.out, result.err)
    assert result.err == f"ov: ignoring {planted}: owned by uid 1000, not you or root\n"


UNTRUSTED_PROJECT_FILES = {
    "group-writable": (lambda path: path.chmod(0o664), "writable by group/others"),
    "world-writable": (lambda path: path.chmod(0o646), "writable by group/others"),
    "in a world-writable directory": (
        lambda path: path.parent.chmod(0o777),
        "in a directory writable by others without the sticky bit"),
    "in another user's directory": (
        lambda path: os.chown(path.parent, 1000, 1000),
        "in a directory owned by uid 1000, not you or root"),
    "a symlink": (lambda path: (path.rename(path.with_name("real.yaml")),
                                path.symlink_to("real.yaml")),
                  "a symbolic link (not followed)"),
    "a fifo": (lambda path: (path.unlink(), os.mkfifo(path)), "not a regular file"),
}


@pytest.mark.parametrize("make,reason", UNTRUSTED_PROJECT_FILES.values(),
                         ids=list(UNTRUSTED_PROJECT_FILES))
def test_a_project_file_anyone_else_could_write_is_ignored(demo, other, project, home,
                                                           make, reason):
    """Even one's own: and the search stops there (the file further up is not used)."""
    user_config(home)
    write_config(project.parent.parent / ".ov.yaml", "app: other\n")
    path = write_config(project / ".ov.yaml", "app: other\nenv: staging\n")
    make(path)
    result = demo.ov("secret", "list", cwd=project)
    assert result.returncode == 0 and names(result.out) == sorted(DEMO_SECRETS), result
    assert result.err == f"ov: ignoring {path}: {reason}\n"


def test_a_project_file_in_a_sticky_world_writable_directory_counts(demo, other, project):
    write_config(project / ".ov.yaml", "app: other\nenv: staging\n")
    project.chmod(0o1777)
    result = demo.ov("secret", "list", cwd=project, check=0)
    assert names(result.out) == ["OTHER_ONLY"] and result.err == ""


def test_the_user_config_follows_the_same_rule_through_its_symlink(demo, project, home):
    """Its path is the user's own choice and dotfile managers link it: a symlink is
    followed, and its target is what must be trusted."""
    target = write_config(home / "dotfiles" / "ov.yaml", "app: demo\n")
    link = home / "config" / "ov" / "config.yaml"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    assert names(demo.ov("secret", "list", cwd=project, check=0).out) == sorted(
        DEMO_SECRETS)
    target.chmod(0o664)
    result = demo.ov("secret", "list", cwd=project)
    lines = result.err.splitlines()
    assert result.returncode == 3 and len(lines) == 2, result.err
    assert lines[0] == f"ov: ignoring {link}: writable by group/others"
    assert lines[1].startswith("ov: no app 'default'")


def test_project_files_above_home_are_never_read_from_outside_it(demo, tmp_path, home,
                                                                 expect_error):
    """From a working directory outside $HOME, the search stops below the first
    directory above $HOME (here tmp_path, holding home/), so it never reaches /."""
    work = tmp_path / "work" / "build"
    work.mkdir(parents=True)
    write_config(tmp_path / ".ov.yaml", "app: demo\n")
    expect_error(demo.ov("secret", "list", cwd=work), 3, "no app 'default'")
    write_config(tmp_path / "work" / ".ov.yaml", "app: demo\n")
    assert names(demo.ov("secret", "list", cwd=work, check=0).out) == sorted(DEMO_SECRETS)


UNSHARE = shutil.which("unshare")
IN_A_MOUNT = """set -e
if [ "$3" = mount ]; then mount -t tmpfs ov-test "$1"; fi
mkdir -p "$1/sub"; cd "$1/sub"; exec "$2" secret list"""


def test_the_search_stops_at_a_filesystem_boundary(demo, home):
    """home/mnt is a tmpfs mount (in a private mount namespace): from inside it, the
    search does not cross into home, whose .ov.yaml it would otherwise find."""
    if UNSHARE is None or subprocess.run([UNSHARE, "-m", "true"],
                                         capture_output=True).returncode != 0:
        pytest.skip("needs unshare(1) and the right to make a mount namespace")
    write_config(home / ".ov.yaml", "app: demo\n")
    (home / "mnt").mkdir()

    def secret_list(how):
        return subprocess.run(
            [UNSHARE, "-m", "sh", "-c", IN_A_MOUNT, "sh", str(home / "mnt"), OV, how],
            capture_output=True, text=True, env=demo.ov.env, timeout=60)

    result = secret_list("mount")
    assert result.returncode == 3 and result.stderr.startswith("ov: no app 'default'")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    result = secret_list("plain directory")
    assert result.returncode == 0 and names(result.stdout) == sorted(DEMO_SECRETS), result


def test_config_files_are_read_only_when_the_flags_leave_something_open(
        demo, project, home, env_digests, digest, expect_error):
    """A broken file cannot fail a command whose flags decide everything (app, env,
    and --secrets for the commands that have it); when the file is needed, its one-line
    error stands."""
    path = write_config(project / ".ov.yaml", "app: [broken\n")
    user_config(home, "env: [broken\n")
    seen = env_digests(demo.ov, *keyed(demo.key), "--app", "demo", "--env", "production",
                       "--secrets", "API_TOKEN", cwd=project)
    assert_demo_secrets(seen, digest, ["API_TOKEN"])
    result = demo.ov("secret", "list", "--app", "demo", "--env", "production", cwd=project)
    assert result.returncode == 0 and result.err == "", result.err
    assert names(result.out) == sorted(DEMO_SECRETS)
    result = demo.ov("env", "list", "--app", "demo", cwd=project)   # takes no env
    assert result.returncode == 0 and "production" in result.out, result.err
    for missing in (["--app", "demo", "--env", "production"],
                    ["--app", "demo", "--secrets", "API_TOKEN"],
                    ["--env", "production", "--secrets", "API_TOKEN"]):
        expect_error(demo.ov("run", *keyed(demo.key), *missing, "--", "true",
                             cwd=project), 2, str(path), "invalid YAML")
    expect_error(demo.ov("secret", "list", "--app", "demo", cwd=project), 2, str(path))
    path.write_text("app: demo\nenv: production\n")   # decides: the user config unread
    assert names(demo.ov("secret", "list", cwd=project, check=0).out) == sorted(
        DEMO_SECRETS)


RESOLVE_AS = """import sys
from ovagent.client import config
print(config.resolve(vault=True).app)
"""


@needs_setpriv
def test_a_user_trusts_only_their_own_and_roots_files():
    """As uid 65534: its own file and root's count, uid 1000's does not."""
    base = Path(tempfile.mkdtemp(prefix="ov-config-"))
    try:
        base.chmod(0o755)
        home = base / "home"
        work = home / "work"
        work.mkdir(parents=True)
        os.chown(home, 65534, 65534)
        path = write_config(work / ".ov.yaml", "app: mine\n")
        env = ov_env(home, base / "vault.db")
        for owner, app in ((65534, "mine"), (0, "mine"), (1000, "default")):
            os.chown(path, owner, owner)
            result = subprocess.run(
                [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-c", RESOLVE_AS], capture_output=True, text=True,
                cwd=work, env=env, timeout=60)
            assert result.returncode == 0 and result.stdout == f"{app}\n", result
            assert result.stderr == ("" if app == "mine" else
                                     f"ov: ignoring {path}: owned by uid 1000, not "
                                     "you or root\n")
    finally:
        shutil.rmtree(base)


# -- unreadable, corrupt or tampered vaults --------------------------------------


def corrupt_garbage(path):
    path.write_bytes(os.urandom(3) + b"\x00garbage" * 500)


def corrupt_empty(path):
    path.write_bytes(b"")


def corrupt_truncate(path):
    path.write_bytes(path.read_bytes()[:8192])


def corrupt_foreign_sqlite(path):
    path.unlink()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (body TEXT)")
    db.commit()
    db.close()


def corrupt_weak_kdf(path):
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'kdf'",
               ('{"time_cost": 1, "memory_kib": 8, "parallelism": 1}',))
    db.commit()
    db.close()


def corrupt_salt(path):
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 'salt as text' WHERE key = 'salt'")
    db.commit()
    db.close()


CORRUPTIONS = {
    "garbage": (corrupt_garbage, "{path} is unreadable or corrupt"),
    "empty": (corrupt_empty, "{path} is not an ov vault"),
    "truncated": (corrupt_truncate, "{path} is unreadable or corrupt"),
    "foreign sqlite": (corrupt_foreign_sqlite, "{path} is not an ov vault"),
    "weak kdf": (corrupt_weak_kdf, "KDF parameter time_cost"),
    "salt": (corrupt_salt, "{path} has a malformed salt"),
}
COMMANDS = {
    "secret list": lambda demo: ("secret", "list", "--app", "demo"),
    "run": lambda demo: ("run", *keyed(demo.key), "--app", "demo", "--", "sh", "-c",
                         "echo RAN"),
    "change-password": lambda demo: ("auth", "change-password", "--password-stdin"),
}


@pytest.mark.parametrize("corrupt,fragment", CORRUPTIONS.values(), ids=list(CORRUPTIONS))
def test_corrupt_vault_is_an_integrity_error(demo, expect_error, corrupt, fragment):
    for name in ("vault.db-wal", "vault.db-shm"):
        assert not (demo.path.parent / name).exists()
    corrupt(demo.path)
    commands = list(COMMANDS)
    if corrupt not in (corrupt_weak_kdf, corrupt_salt):
        commands.remove("change-password")  # the KDF path matters for metadata edits
    for command in commands:
        expect_error(demo.ov(*COMMANDS[command](demo),
                             input=f"{PASSWORD}\n{NEW_PASSWORD}\n"),
                     5, fragment.format(path=demo.path))


def flip_one_bit(path, column, name):
    db = sqlite3.connect(path)
    (blob,) = db.execute(f"SELECT {column} FROM secrets WHERE name = ?",
                         (name,)).fetchone()
    db.execute(f"UPDATE secrets SET {column} = ? WHERE name = ?",
               (blob[:20] + bytes([blob[20] ^ 1]) + blob[21:], name))
    db.commit()
    db.close()


@pytest.mark.parametrize("column", ["ciphertext", "wrapped_dek"])
def test_tampered_secret_fails_to_decrypt(demo, expect_error, column):
    flip_one_bit(demo.path, column, "DB_URL")
    for key in (demo.key, demo.scoped_key):
        expect_error(demo.ov("run", *keyed(key), "--app", "demo", "--", "sh", "-c",
                             "echo RAN"), 5, "secret DB_URL v1", "decryption failed")
    assert demo.ov("run", *keyed(demo.key), "--app", "demo", "--secrets", "API_TOKEN",
                   "--", "true").returncode == 0


def test_rotation_of_a_tampered_app_changes_nothing(demo, vault_dump, expect_error):
    flip_one_bit(demo.path, "wrapped_dek", "API_TOKEN")
    before = vault_dump(demo.path)
    expect_error(demo.ov("app", "rotate-key", "demo", *keyed(demo.key)), 5,
                 "key of secret API_TOKEN")
    assert vault_dump(demo.path) == before


# -- someone who can write the vault file: heads, types, format (issue 14, item 7) ---


def run_all(key):
    """`ov run` of every secret of demo/production: prints RAN if the command ran."""
    return ("run", *keyed(key), "--app", "demo", "--", "sh", "-c", "echo RAN")


def test_a_deleted_newest_version_is_never_served(demo, expect_error, vault_dump):
    """The newest version's row deleted with sqlite3: every read is an integrity
    error naming what is wrong (exit 5, one line, the command never runs), never the
    older value; writes to that secret refuse too; other secrets still read."""
    key = keyed(demo.key)
    demo.ov("secret", "set", "DB_URL", "--app", "demo", *key, input="newer", check=0)
    write_sql(demo.path, "DELETE FROM secrets WHERE name = 'DB_URL' AND version = 2")
    message = (f"vault {demo.path}: secret DB_URL of demo/production is at version 2, "
               "its newest record says 1: the vault file was tampered with")
    for args in (run_all(demo.key), run_all(demo.scoped_key),
                 ("run", *key, "--app", "demo", "--secrets", "DB_URL", "--", "true")):
        assert expect_error(demo.ov(*args), 5) == f"ov: {message}"
    before = vault_dump(demo.path)
    expect_error(demo.ov("secret", "set", "DB_URL", "--app", "demo", *key, input="x"), 5,
                 message)
    expect_error(demo.ov("secret", "delete", "DB_URL", "--app", "demo", *key), 5, message)
    assert vault_dump(demo.path) == before
    assert demo.ov("run", *key, "--app", "demo", "--secrets", "API_TOKEN", "--",
                   "true").returncode == 0


def test_an_injected_newer_version_is_an_integrity_error(demo, tmp_path, expect_error):
    """A genuine later record (it decrypts) injected into an earlier copy of the vault,
    whose head does not list it: refused, not served."""
    key = keyed(demo.key)
    earlier = tmp_path / "earlier.db"
    shutil.copy(demo.path, earlier)
    demo.ov("secret", "set", "API_TOKEN", "--app", "demo", *key, input="tok-later",
            check=0)
    write_sql(earlier, f"ATTACH DATABASE '{demo.path}' AS later",
        "INSERT INTO secrets SELECT * FROM later.secrets WHERE name = 'API_TOKEN' AND "
        "version = 2")
    shutil.copy(earlier, demo.path)
    for args in (run_all(demo.key), ("run", *key, "--app", "demo", "--secrets",
                                     "API_TOKEN", "--", "sh", "-c", "echo RAN")):
        expect_error(demo.ov(*args), 5, "secret API_TOKEN of demo/production is at "
                     "version 1, its newest record says 2: the vault file was tampered")


def test_a_head_swapped_from_another_env_is_an_integrity_error(demo, expect_error):
    key = keyed(demo.key)
    demo.ov("env", "create", "staging", "--app", "demo", check=0)
    demo.ov("secret", "set", "DB_URL", "--app", "demo", "--env", "staging", *key,
            input="staging-url", check=0)
    write_sql(demo.path, "UPDATE heads SET head = (SELECT head FROM heads WHERE "
              "env = 'staging') WHERE env = 'production' AND name = 'DB_URL'")
    for secret_key in (demo.key, demo.scoped_key):
        expect_error(demo.ov(*run_all(secret_key)), 5,
                     "head of secret DB_URL of demo/production: decryption failed")
    assert demo.ov("run", *key, "--app", "demo", "--env", "staging", "--",
                   "true").returncode == 0


def recreate_secrets_without_strict(path):
    """The secrets table recreated as a plain (not STRICT) table, then TEXT stored in
    a BLOB and a REAL column."""
    db = sqlite3.connect(path)
    try:
        db.executescript("""
            PRAGMA foreign_keys = OFF;
            BEGIN;
            CREATE TABLE loose (app, env, name, version, wrapped_dek BLOB,
                                ciphertext BLOB, created REAL);
            INSERT INTO loose SELECT * FROM secrets;
            DROP TABLE secrets;
            ALTER TABLE loose RENAME TO secrets;
            UPDATE secrets SET ciphertext = 'text', created = 'yesterday'
                WHERE name = 'API_TOKEN';
            COMMIT;
        """)
    finally:
        db.close()


def store_text_then_restore_strict(path):
    """The schema rewritten (writable_schema) to drop STRICT, TEXT stored in a BLOB
    and a REAL column, and the schema's text put back: the table reads as STRICT
    (PRAGMA table_list says so) but holds values of the wrong type."""
    for edit in ("replace(sql, ') STRICT', ')')", "sql || ' STRICT'"):
        db = sqlite3.connect(path)
        try:
            db.execute("PRAGMA writable_schema = ON")
            db.execute(f"UPDATE sqlite_master SET sql = {edit} WHERE name = 'secrets'")
            db.commit()
        finally:
            db.close()
        if edit.startswith("replace"):
            write_sql(path, "UPDATE secrets SET ciphertext = 'text', created = 'yesterday' "
                      "WHERE name = 'API_TOKEN'")


@pytest.mark.parametrize("edit,fragment", [
    (recreate_secrets_without_strict, "its schema is not that of an ov vault of "
                                      "format 2 (table secrets was altered)"),
    (store_text_then_restore_strict, "a value in column ciphertext of table secrets has "
                                     "the wrong type or size"),
], ids=["recreated without STRICT", "STRICT restored over wrong types"])
def test_values_of_the_wrong_type_are_one_line_integrity_errors(demo, expect_error,
                                                                 edit, fragment):
    edit(demo.path)
    key = keyed(demo.key)
    for args in (("secret", "list", "--app", "demo"), run_all(demo.key),
                 run_all(demo.scoped_key), ("app", "rotate-key", "demo", *key)):
        expect_error(demo.ov(*args), 5, f"vault {demo.path}", fragment,
                     "the vault file was tampered with")


@pytest.mark.parametrize("name,what", [("kek_check", "KEK check"),
                                       ("wrapped_kek", "wrapped KEK")])
def test_truncated_metadata_is_an_integrity_error(demo, expect_error, name, what):
    """A truncated KEK check made the KEK look like a wrong key (exit 4)."""
    write_sql(demo.path, f"UPDATE meta SET value = substr(value, 1, 20) WHERE key = '{name}'")
    for args in (run_all(demo.key), ("secret", "list", "--app", "demo"),
                 ("auth", "change-password", "--password-stdin")):
        expect_error(demo.ov(*args, input=f"{PASSWORD}\n{NEW_PASSWORD}\n"), 5,
                     f"vault {demo.path} has a malformed {what}: the vault file was "
                     "tampered with")


def test_writing_format_1_back_into_an_upgraded_vault_fails_closed(demo, expect_error,
                                                                   vault_dump):
    key = keyed(demo.key)
    demo.ov("secret", "set", "DB_URL", "--app", "demo", *key, input="newer", check=0)
    write_sql(demo.path, "UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    for args in (run_all(demo.key), ("secret", "list", "--app", "demo"),
                 ("auth", "upgrade", *key)):
        expect_error(demo.ov(*args), 5, "not that of an ov vault of format 1 (table "
                     "'heads' is not ov's)")
    # the heads dropped too, and the newest version of DB_URL with them
    write_sql(demo.path, "DROP TABLE heads",
        "DELETE FROM secrets WHERE name = 'DB_URL' AND version = 2")
    expect_error(demo.ov(*run_all(demo.key)), 1, f"ov auth upgrade --vault {demo.path}")
    before = vault_dump(demo.path)
    expect_error(demo.ov("auth", "upgrade", *key), 5,
                 "app 'demo' already has heads, yet the vault says format 1")
    assert vault_dump(demo.path) == before


def test_a_format_1_vault_is_refused_until_ov_auth_upgrade(demo, tmp_path, expect_error,
                                                          env_digests, digest,
                                                          vault_dump):
    as_format_1(demo.path, demo.key.read_bytes())
    before = vault_dump(demo.path)
    refusal = (f"vault {demo.path} is of format 1, which cannot tell a deleted or "
               "rolled-back secret version from the current one; upgrade it once with "
               f"'ov auth upgrade --vault {demo.path}' (with the master password or an "
               "unscoped machine key), then restart any agent that serves it")
    for args in (run_all(demo.key), run_all(demo.scoped_key),
                 ("secret", "set", "X", "--app", "demo", *keyed(demo.key)),
                 ("env", "create", "new", "--app", "demo"),
                 ("agent", "start", "--foreground", "--machine-key", str(demo.key),
                  "--socket", str(tmp_path / "agent" / "ov.sock"))):
        assert expect_error(demo.ov(*args, input="v"), 1) == f"ov: {refusal}"
    assert "DB_URL" in names(demo.ov("secret", "list", "--app", "demo", check=0).out)
    expect_error(demo.ov("auth", "upgrade", *keyed(demo.scoped_key)), 4,
                 "upgrading the vault needs the master password")
    assert vault_dump(demo.path) == before
    upgraded = demo.ov("auth", "upgrade", *keyed(demo.key), check=0).out.splitlines()
    assert upgraded[0] == "pinned demo/production: " + ", ".join(
        f"{name} v1" for name in sorted(DEMO_SECRETS)), upgraded
    assert upgraded[-1].startswith(f"Upgraded vault {demo.path} to format 2: "), upgraded
    assert demo.ov("auth", "upgrade", "--password-stdin", input=PASSWORD + "\n",
                   check=0).out == f"Vault {demo.path} is of format 2 already\n"
    for secret_key in (demo.key, demo.scoped_key):      # machine keys keep working
        assert_demo_secrets(env_digests(demo.ov, *keyed(secret_key), "--app", "demo"),
                            digest)


def test_missing_vault_is_not_found(ov, tmp_path, expect_error):
    for command in (("secret", "list", "--app", "demo"), ("app", "list"),
                    ("run", "--machine-key", "/dev/null", "--", "true")):
        expect_error(ov(*command), 3, "no vault at", "ov auth init")
    assert not (tmp_path / "vault").exists()


def test_vault_path_that_is_a_directory(ov, tmp_path):
    (tmp_path / "vault" / "vault.db").mkdir(parents=True)
    result = ov("secret", "list", "--app", "demo")
    assert result.returncode != 0 and "Traceback" not in result.err
    assert len(result.err.splitlines()) == 1 and result.err.startswith("ov: ")
