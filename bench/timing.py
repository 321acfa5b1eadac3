"""Wall time of whole processes: one posix_spawn, alternating loops, hyperfine."""

import json
import os
import subprocess
import time


def spawn_time(b, argv, env):
    """Wall time of one process from posix_spawn to its reaping (seconds)."""
    with open(b.client_err, "ab") as err:
        actions = [(os.POSIX_SPAWN_DUP2, b.devnull, 0),
                   (os.POSIX_SPAWN_DUP2, b.devnull, 1),
                   (os.POSIX_SPAWN_DUP2, err.fileno(), 2)]
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {' '.join(argv)} exited "
                         f"{os.waitstatus_to_exitcode(status)}: "
                         f"{b.client_err.read_text()[-2000:]}")
    return elapsed


def alternate(b, commands, rounds, env):
    """Run each command once per round, the order rotating each round (AB, BA, ...).
    Returns {name: [seconds...]} (paired by round)."""
    names = list(commands)
    times = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            times[name].append(spawn_time(b, commands[name], env))
    return times


def hyperfine(b, commands, runs, warmup, env):
    """One hyperfine -N invocation for all commands; {name: [seconds...]}."""
    out = b.tmp / "hyperfine.json"
    argv = ["hyperfine", "-N", "--style", "none", "--warmup", str(warmup),
            "--runs", str(runs), "--export-json", str(out)]
    for name, cmd in commands.items():
        argv += ["--command-name", name, " ".join(cmd)]
    result = subprocess.run(argv, env=env, cwd=b.home, capture_output=True,
                            timeout=600, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bench: hyperfine failed: {result.stderr.decode()[-2000:]}")
    data = json.loads(out.read_text())
    return {r["command"]: r["times"] for r in data["results"]}
