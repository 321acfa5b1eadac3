"""The agent fixtures, a pytest plugin (conftest.py loads it): ``agents`` starts
real agents and client processes for one test and always stops them in teardown;
``agent`` is one started agent; ``key`` is the demo vault's machine key as bytes;
``shared_place`` a directory other uids can reach."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import AgentHarness


@pytest.fixture
def agents(demo, tmp_path):
    harness = AgentHarness(demo, tmp_path)
    try:
        yield harness
    finally:
        harness.cleanup()


@pytest.fixture
def key(demo):
    """The demo vault's unscoped machine key, as bytes (to sign requests by hand)."""
    return demo.key.read_bytes()


@pytest.fixture
def shared_place(agents, demo):
    """An agent, socket and key in a directory other uids can reach (pytest's tmp_path
    is 0700), with the key readable by uid 65534 (a copy it owns)."""
    base = Path(tempfile.mkdtemp(prefix="ov-caller-", dir="/tmp"))
    os.chmod(base, 0o755)
    key = base / "caller.kek"
    key.write_bytes(demo.key.read_bytes())
    key.chmod(0o600)
    yield base, key
    agents.cleanup()                     # stop the agent before removing its home
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def agent(agents):
    """A foreground agent with the unscoped key, default app demo, --grace 1."""
    return agents.start()
