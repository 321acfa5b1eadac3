"""Shared fixtures: run the real ``ov`` entry point of the current venv in
subprocesses, against throwaway vaults under tmp_path.  Plain helpers live in
helpers.py (tests import them by name); the agent fixtures are the plugin
agent_plugin.py, the throwaway PostgreSQL fixtures the plugin pg.py; the leak sentinel
is leaks.py.

Creating a vault costs one Argon2id run (t=3, 64 MiB), so a template vault with a
known password, app ``demo``, env ``production``, a few secrets and machine keys is
built once per session and copied per test.
"""

import hashlib
import json
import os
import random
import shutil
import sqlite3
import sys

import pytest

import leaks
from helpers import DEMO_SECRETS, PASSWORD, SENTINEL, DemoVault, Ov, ov_env

pytest_plugins = ["agent_plugin", "pg"]



leaks.watch.forbid("the master password", PASSWORD)
leaks.watch.forbid("the sentinel value", SENTINEL)
for _name, _value in DEMO_SECRETS.items():
    leaks.watch.forbid(f"the value of secret {_name}", _value)


@pytest.fixture(scope="session")
def template_vault(tmp_path_factory):
    base = tmp_path_factory.mktemp("template")
    home = base / "home"
    home.mkdir()
    vault = base / "vault" / "vault.db"
    ov = Ov(ov_env(home, vault), base)
    ov("auth", "init", "--password-stdin", input=PASSWORD + "\n", check=0)
    ov("auth", "derive-machine-key", "--out", str(base / "machine.kek"),
       "--password-stdin", input=PASSWORD + "\n", check=0)
    key = ["--machine-key", str(base / "machine.kek")]
    ov("app", "create", "demo", *key, check=0)
    ov("env", "create", "production", "--app", "demo", check=0)
    for name, value in DEMO_SECRETS.items():
        ov("secret", "set", name, "--app", "demo", "--env", "production", *key,
           input=value, check=0)
    ov("auth", "derive-machine-key", "--out", str(base / "demo.kek"), "--app", "demo",
       *key, check=0)
    for name in ("machine.kek", "demo.kek"):
        leaks.watch.forbid_key(f"machine key {name}", (base / name).read_bytes())
    return base


@pytest.fixture(autouse=True)
def no_leaks():
    """The whole-suite sentinel (tests/leaks.py): after every test, no secret value,
    password, machine key or MAC in any output the test saw."""
    leaks.watch.begin()
    yield
    found = leaks.watch.found()
    assert not found, "secret material leaked: " + "; ".join(found)


@pytest.fixture
def rng():
    """Randomness a failure can be replayed with: the seed is printed (pytest shows
    it with the failure); OV_TEST_SEED=N replays it."""
    seed = int(os.environ.get("OV_TEST_SEED") or random.SystemRandom().getrandbits(32))
    print(f"random seed {seed} (replay with OV_TEST_SEED={seed})")
    return random.Random(seed)


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def ov(home, tmp_path):
    """An ov runner with a private HOME and no vault yet (OV_VAULT under tmp_path)."""
    return Ov(ov_env(home, tmp_path / "vault" / "vault.db"), tmp_path)


@pytest.fixture
def demo(template_vault, tmp_path, home):
    """A fresh copy of the template vault with its keys, and a runner bound to it."""
    shutil.copytree(template_vault / "vault", tmp_path / "vault")
    keys = {}
    for name in ("machine.kek", "demo.kek"):
        shutil.copy2(template_vault / name, tmp_path / name)
        keys[name] = tmp_path / name
    runner = Ov(ov_env(home, tmp_path / "vault" / "vault.db"), tmp_path)
    return DemoVault(tmp_path / "vault" / "vault.db", keys["machine.kek"],
                     keys["demo.kek"], runner)


# -- helpers for the vault and CLI suites (fixtures returning callables) -------------

ENV_PROBE = ("import hashlib, json, os; print(json.dumps({k.decode(errors='replace'): "
         "hashlib.sha256(v).hexdigest() for k, v in os.environb.items()}))")


def _digest(value):
    return hashlib.sha256(
        value if isinstance(value, bytes) else value.encode()).hexdigest()


@pytest.fixture
def digest():
    """sha256 hex of a str or bytes value: tests compare digests, never print values."""
    return _digest


@pytest.fixture
def env_digests():
    """Run ``ov run ARGS -- python ENV_PROBE``; return {variable: sha256 of its value} as
    seen by the command (values themselves never reach the test output)."""

    def run(ov, *args, **kwargs):
        result = ov("run", *args, "--", sys.executable, "-c", ENV_PROBE, check=0, **kwargs)
        return json.loads(result.out)

    return run


@pytest.fixture
def expect_error():
    """Check a failed ov command: the exit code, exactly one ``ov: `` line on stderr
    containing *fragments*, nothing on stdout, no traceback, no SENTINEL anywhere."""

    def check(result, code, *fragments):
        assert result.returncode == code, (result.returncode, result.out, result.err)
        assert "Traceback" not in result.err
        assert SENTINEL not in result.out and SENTINEL not in result.err
        lines = result.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ov: "), result.err
        assert result.out == "", result.out
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
        return lines[0]

    return check


@pytest.fixture
def vault_dump():
    """Every row of a vault as SQL text: equal dumps mean nothing was written."""

    def dump(path):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return list(db.iterdump())
        finally:
            db.close()

    return dump
