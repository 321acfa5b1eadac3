"""The agent fixtures, a pytest plugin (conftest.py loads it): ``agents`` starts
real agents and client processes for one test and always stops them in teardown;
``agent`` is one started agent; ``key`` is the demo vault's machine key as bytes."""

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
def agent(agents):
    """A foreground agent with the unscoped key, default app demo, --grace 1."""
    return agents.start()
