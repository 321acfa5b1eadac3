"""Policy evaluation in-process: ``policy_decide.py DIR COUNT`` writes 100 rules
into the policy directory DIR (created), loads them as the agent does, and times
COUNT decisions of each kind; prints JSON {"load": seconds, case: [seconds per
decision...]}.

Every decision starts from a fresh Caller, as each request does in the agent, so
the user and group name lookups that rules naming users and groups need are in
the figures.  Run by path with the bench's throwaway venv's python
(bench/sections.py), so that ovagent comes from that venv."""

import json
import os
import sys
import time

from ovagent.agent.policy import Caller
from ovagent.agent.policy_files import read_policy

RULES = 100
SECRETS = [f"SECRET_{n:03d}" for n in range(100)]


def write_policy(directory):
    """100 rules as a host with 45 services might have them: per service an allow
    of named secrets (by unit and user, by unit and group for some), a deny of the
    live keys for every unit, and the last service's rules at the very end (the
    worst case: every rule is looked at before they match)."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    rules = []
    for n in range(45):
        who = 'user = "root"' if n % 3 else 'group = "root"\nuser = 0'
        rules.append(f'[[allow]]\nunit = "svc{n:02d}.service"\n{who}\napp = "app{n % 9}"\n'
                     f'env = ["production", "staging"]\n'
                     f'secrets = {json.dumps(SECRETS[n:n + 5])}\n')
    for n in range(10):
        rules.append(f'[[deny]]\nunit = "*"\napp = "app{n}"\nsecrets = ["LIVE_*"]\n')
    for n in range(44):
        rules.append(f'[[allow]]\nunit = "worker@{n}-*.service"\nuser = "root"\n'
                     f'app = "app{n % 9}"\nsecrets = "SECRET_0*"\n')
    rules.append('[[allow]]\nunit = "last.service"\nuser = "root"\napp = "app0"\n'
                 'secrets = "*"\n')
    assert len(rules) == RULES
    path = os.path.join(directory, "50-bench.toml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(rules))
    os.chmod(path, 0o644)


def timed(count, decide):
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        decision = decide()
        times.append(time.perf_counter() - t0)
        assert decision.allowed
    return times


def main(directory, count):
    count = int(count)
    write_policy(directory)
    t0 = time.perf_counter()
    policy = read_policy(directory, {0, os.geteuid()})
    loaded = time.perf_counter() - t0
    assert len(policy.rules) == RULES
    gids = os.getgroups() or [0]
    cases = {
        "named_first": lambda: policy.decide(Caller(0, gids, "svc01.service"), "app1",
                                             "production", SECRETS[1:3]),
        "named_last": lambda: policy.decide(Caller(0, gids, "last.service"), "app0",
                                            "production", SECRETS[:2]),
        "all_of_100": lambda: policy.decide(Caller(0, gids, "last.service"), "app0",
                                            "production", None, SECRETS),
    }
    result = {"load": loaded}
    for case, decide in cases.items():
        result[case] = timed(count, decide)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
