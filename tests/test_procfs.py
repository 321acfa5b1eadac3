"""ovagent.core.procfs: what the agent compares before it spawns a command for a caller
(``ov run --agent --spawn``).  In-process, on real /proc files."""

import os
import resource

import pytest

from ovagent.core import procfs


def test_a_process_has_no_difference_with_itself():
    mine = procfs.world_of(os.getpid())
    assert procfs.differences(mine, procfs.world_of(os.getpid())) == []
    assert mine["mount namespace"] is not None and mine["root directory"] is not None
    assert "limit 'Max open files'" in mine and "capability bounding set" in mine


def test_every_fact_that_differs_is_named():
    mine = procfs.world_of(os.getpid())
    for fact in ("network namespace", "uids", "NoNewPrivs", "capability bounding set",
                 "limit 'Max open files'", "security label", "root directory"):
        theirs = dict(mine, **{fact: "something else"})
        assert procfs.differences(mine, theirs) == [fact], fact


def test_only_the_hard_core_limit_counts():
    """The agent lowers its own soft core limit (no core dumps of the key) and gives
    a spawned command the caller's back; the hard limit must still match."""
    mine = procfs.world_of(os.getpid())
    core = f"limit '{procfs.CORE_LIMIT}'"
    soft, hard = mine[core]
    assert procfs.differences(mine, dict(mine, **{core: ("0", hard)})) == []
    assert procfs.differences(mine, dict(mine, **{core: (soft, "12345")})) == [core]
    assert procfs.core_soft_limit(dict(mine, **{core: ("unlimited", hard)})) == \
        resource.RLIM_INFINITY


def test_seccomp_filters_on_either_side_are_a_difference():
    """/proc tells that filters exist, not which: equal counts prove nothing."""
    mine = dict(procfs.world_of(os.getpid()), **{"seccomp mode": ["2"]})
    assert procfs.differences(mine, dict(mine)) == ["seccomp filters (they cannot be "
                                                  "compared)"]


def test_a_missing_namespace_kind_is_recorded_not_fatal(monkeypatch):
    monkeypatch.setitem(procfs.NAMESPACE_NAMES, "no_such_ns", "imaginary namespace")
    assert procfs.world_of(os.getpid())["imaginary namespace"] is None


@pytest.mark.parametrize("cgroup, owner", [
    ("/user.slice/user-1000.slice/session-3.scope", "user-1000.slice"),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/x.service",
     "user-1000.slice"),
    ("/system.slice/caller.service", "caller.service"),
    ("/system.slice/caller.service/delegated/sub", "caller.service"),
    ("/machine.slice/machine-web.scope/payload", "machine-web.scope"),
    ("/", "uid 5"),
    (None, "uid 5"),
])
def test_an_owner_is_a_users_slice_else_a_unit_else_a_uid(cgroup, owner):
    """What the agent's fair share and its counting of denials go by: a user's many
    uids (user namespaces) are one owner, and a unit cannot pass for another."""
    assert procfs.owner(cgroup, 5) == owner
