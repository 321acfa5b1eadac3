"""The agent fixtures, a pytest plugin (conftest.py loads it): ``agents`` starts
real agents and client processes for one test and always stops them in teardown;
``agent`` is one started agent; ``key`` is the demo vault's machine key as bytes;
``shared_place`` a directory other uids can reach; ``unit_cgroup`` makes cgroups
named like units."""

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from helpers import AgentHarness, cgroup2_mount, wait_for


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


@pytest.fixture
def unit_cgroup():
    """make("a.slice/x.service"): a cgroup under a private slice of our own cgroup2
    group, where a process moved in counts as in that unit; make.remove(path) takes
    one away (the unit stopped).  The rest go in teardown."""
    root = cgroup2_mount()
    own = Path("/proc/self/cgroup").read_text().split("0::", 1)[-1].split("\n")[0]
    if os.geteuid() != 0 or root is None or not own:
        pytest.skip("needs root and a cgroup2 hierarchy")
    base = Path(root, own.strip("/"), f"ov-test-{uuid.uuid4().hex[:8]}.slice")
    try:
        base.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc.strerror}")
    created = [base]

    def make(relative):
        path = base
        for part in relative.split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                created.append(path)
        return path

    def remove(path):
        wait_for(lambda: not (path / "cgroup.procs").read_text().strip(),
                 f"cgroup {path} to empty")
        path.rmdir()

    make.remove = remove
    yield make
    for path in reversed(created):
        if path.exists():
            remove(path)
