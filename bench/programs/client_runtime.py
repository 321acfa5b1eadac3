"""Runtime of the ``ov`` client once its modules are imported:
``client_runtime.py RUNS ARGS...`` runs ``entry.main(ARGS)`` in-process RUNS times
(after one warm-up), then RUNS more under cProfile, and prints the import time, the
median and min per run and the functions with the most own time.  The release
flow's exec is replaced by a no-op: what is left is what ov does before it.

Run by path with the bench's throwaway venv's python (bench/profiling.py), so that
ovagent comes from that venv, never from the repository."""

import cProfile
import importlib
import io
import pstats
import sys
import time

# what ``ov run --agent`` imports, beside ovagent.entry
CLIENT_MODULES = ("ovagent.client.options", "ovagent.client.talk", "ovagent.client.config",
                  "ovagent.client.execute", "ovagent.core.keyfile", "ovagent.core.protocol",
                  "ovagent.core.seal")


def import_client():
    """(seconds, ovagent.entry, ovagent.client.execute): the client's modules
    imported as ov imports them."""
    t0 = time.perf_counter()
    entry = importlib.import_module("ovagent.entry")
    getattr(entry, "_skip_openssl", lambda: None)()   # as the real client does, if it does
    for name in CLIENT_MODULES:
        importlib.import_module(name)
    return time.perf_counter() - t0, entry, sys.modules["ovagent.client.execute"]


def once(entry, argv):
    try:
        entry.main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


def report_times(entry, argv, runs, imported, execs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        once(entry, argv)
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"  ovagent.entry and the client's modules imported in "
          f"{imported * 1e3:.1f} ms (in this process, interpreter already up); then")
    print(f"  entry.main({' '.join(argv)}) in-process: median "
          f"{times[len(times) // 2] * 1e3:.2f} ms, min {times[0] * 1e3:.2f} ms "
          f"({len(times)} runs; includes the agent round trip"
          + (", not the exec)" if execs else ")"))


def report_profile(entry, argv, runs):
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(runs):
        once(entry, argv)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(14)
    text = out.getvalue()
    print("  cProfile, by own time:")
    print("\n".join("  " + line
                    for line in text[text.index("ncalls"):].splitlines()[:15]))


def main(runs, *args):
    imported, entry, execute = import_client()
    argv, execs = list(args), []
    # In-process, the release flow must not exec /bin/true: record the call instead.
    execute.exec_with_secrets = lambda command, secrets: execs.append(len(secrets))
    once(entry, argv)
    report_times(entry, argv, int(runs), imported, execs)
    report_profile(entry, argv, int(runs))


if __name__ == "__main__":
    main(*sys.argv[1:])
