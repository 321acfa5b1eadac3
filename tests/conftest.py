"""Shared fixtures: run the real ``ov`` entry point of the current venv in
subprocesses, against throwaway vaults under tmp_path.

Creating a vault costs one Argon2id run (t=3, 64 MiB), so a template vault with a
known password, app ``demo``, env ``production``, a few secrets and machine keys is
built once per session and copied per test.
"""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import leaks

OV = str(Path(sys.executable).with_name("ov"))
PASSWORD = "correct horse battery"
SENTINEL = "SENTINEL-7f3c9a1e-do-not-leak"
DEMO_SECRETS = {"DB_URL": "postgres://u:" + SENTINEL + "@db/app", "API_TOKEN": "tok-123",
                "EMPTY": ""}


leaks.watch.forbid("the master password", PASSWORD)
leaks.watch.forbid("the sentinel value", SENTINEL)
for _name, _value in DEMO_SECRETS.items():
    leaks.watch.forbid(f"the value of secret {_name}", _value)


def ov_env(home, vault):
    """A clean environment for ov: private HOME/XDG dirs and OV_VAULT."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OV_", "XDG_", "LISTEN_", "NOTIFY_", "CREDENTIALS_"))}
    env.update(HOME=str(home), OV_VAULT=str(vault),
               XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               XDG_RUNTIME_DIR=str(home / "run"))
    return env


@dataclass
class Ov:
    """Runs ``ov ARGS`` with the fixture's environment; returns CompletedProcess."""

    env: dict
    cwd: Path

    def __call__(self, *args, input=None, check=None, timeout=60, env=None, **kwargs):
        if isinstance(input, str):
            input = input.encode()
        result = subprocess.run(
            [OV, *args], input=input, capture_output=True, timeout=timeout,
            env=dict(self.env, **(env or {})), cwd=kwargs.pop("cwd", self.cwd),
            start_new_session=True,  # no controlling tty: prompts fail instead of hanging
            **kwargs)
        where = f"the output of ov {' '.join(str(arg) for arg in args[:2])}"
        leaks.watch.saw(where, result.stderr)
        if args[:1] != ("run",):          # ov run's stdout is the command's
            leaks.watch.saw(where, result.stdout)
        result.out = result.stdout.decode(errors="replace")
        result.err = result.stderr.decode(errors="replace")
        if check is not None:
            assert result.returncode == check, (result.returncode, result.out, result.err)
        return result


@dataclass
class DemoVault:
    path: Path
    key: Path           # unscoped machine key (the KEK)
    scoped_key: Path    # key scoped to app "demo"
    ov: Ov
    password: str = PASSWORD
    app: str = "demo"
    env: str = "production"


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

PROBE = ("import hashlib, json, os; print(json.dumps({k.decode(errors='replace'): "
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
    """Run ``ov run ARGS -- python PROBE``; return {variable: sha256 of its value} as
    seen by the command (values themselves never reach the test output)."""

    def run(ov, *args, **kwargs):
        result = ov("run", *args, "--", sys.executable, "-c", PROBE, check=0, **kwargs)
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
