#!/usr/bin/env python3
"""Benchmark ``ov run --agent`` and ``ov agent``; print ONE table.

Both flows of protocol version 2 are measured: ``release`` (``ov run --agent``: the
agent answers with the secrets sealed to the signed request, the client execs the
command in place) and ``spawn`` (``ov run --agent --spawn``: the agent runs the
command with the client's fds and reports its exit status).

Usage (from the repository root; see bench/README.rst)::

    python3 bench/run.py                # full run, about 2-3 minutes
    python3 bench/run.py --quick        # tiny counts (smoke test), under 30 s
    python3 bench/run.py --profile      # py-spy profile of the agent under load
                                        # + python -X importtime of the clients
    python3 bench/run.py --sections 1,5 --json out.json

Everything lives in a temporary directory removed at exit: a throwaway NON-editable
venv of the project (the editable install's import hook costs ~10 ms per start and
would distort client numbers), a throwaway vault, agents on private sockets.  Nothing
is installed anywhere else (``--profile`` adds py-spy to the throwaway venv only).

Statistics: every figure is a median with its spread (IQR p25-p75, or min-max when
there are few samples).  Ratios are taken side by side in the same run: from one
hyperfine invocation holding every command, and (for the key ratios) from our own
alternating loop whose rounds run A and B back to back in alternating order; the
ratio reported is the median of the per-round ratios.
"""

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run by path (python3 bench/run.py): import the bench package from the
    # repository root instead of looking for its modules in bench/ itself.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import fleet, sections  # noqa: E402  (after the path fix above)
from bench.environment import REPO, SYSTEM_PYTHON, Bench, log  # noqa: E402
from bench.load import Codec  # noqa: E402
from bench.procfs import loadavg, proc_status  # noqa: E402
from bench.profiling import run_profiles  # noqa: E402
from bench.stats import Table  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts (smoke test); numbers are meaningless")
    parser.add_argument("--sections", default="1,2,3,4,5,6,7,8",
                        help="comma-separated sections to run (default all)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table: py-spy profile of the agent under "
                             "load and python -X importtime of the clients")
    parser.add_argument("--profile-out", metavar="DIR", type=os.path.abspath,
                        help="with --profile: keep the raw collapsed stacks here")
    parser.add_argument("--profile-clients", type=int, default=32, metavar="N",
                        help="with --profile: concurrent connections while the agent "
                             "is sampled (default 32, as the p99 target)")
    parser.add_argument("--profile-op", choices=("release", "spawn"), default="release",
                        help="with --profile: the flow the agent is sampled under "
                             "(default release, as the N=32 targets)")
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: py-spy --gil (only the thread holding the "
                             "GIL is sampled: where the agent's Python CPU goes, without "
                             "the threads that wait for the GIL)")
    parser.add_argument("--native", action="store_true",
                        help="with --profile: py-spy --native (C frames; pauses the "
                             "agent at each sample instead of --nonblocking)")
    parser.add_argument("--leak-requests", type=int, default=10000, metavar="N",
                        help="requests of the memory section's leak check (default "
                             "10000; multiples of 2000)")
    parser.add_argument("--json", metavar="FILE", type=os.path.abspath,
                        help="also write all figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (debug)")
    return parser.parse_args()


def check_tools():
    for tool in ("hyperfine", "systemd-socket-activate"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install "
                             f"{'hyperfine' if tool == 'hyperfine' else 'systemd'}; "
                             "tests/extra-apt-packages lists it)")


def header(args, setup_s, import_s, load_start):
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always",
                                 "--dirty"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
    except OSError:
        commit = "?"
    hf = subprocess.run(["hyperfine", "--version"], capture_output=True, text=True,
                        check=False).stdout.strip()
    imports = ", ".join(f"{n}: {s:.2f}s" for n, s in import_s.items())
    return "\n".join([
        f"== ov bench{' (QUICK: tiny counts, numbers meaningless)' if args.quick else ''} ==",
        (f"source {REPO} @ {commit}; {platform.platform()}; {os.cpu_count()} CPUs; "
         f"loadavg at start {load_start}, at end {loadavg()}"),
        f"python {platform.python_version()} (bench), {SYSTEM_PYTHON} for the venv; {hf}",
        f"setup {setup_s:.1f}s (non-editable venv + vaults; secret import {imports})",
        "spread: IQR = p25–p75, range = min–max; targets: issue #12 (bench/stats.py "
        "TARGETS)",
    ])


def setup(b, args, wanted):
    """The venv, the vaults and the codec; returns the seconds each vault's secret
    import took."""
    log(f"building a non-editable venv in {b.tmp}")
    b.build_venv()
    sizes = (10, 100, 1000) if args.quick else (10, 1000, 10000)
    if not (wanted & {5, 8} or args.profile):
        sizes = (10,)
    log(f"building vaults with {', '.join(map(str, sizes))} secrets")
    _, import_s = b.build_vaults(sizes)
    # The bench speaks the protocol with the project's own codec (its copy).
    b.codec = Codec(b.src, b.key_path)
    return import_s


def run_sections(b, wanted):
    """The table of the *wanted* sections, in numeric order."""
    table = Table()
    if wanted & {1, 2, 4}:
        proc, sock = b.start_agent("main", b.vaults[10])
        time.sleep(0.2)
        idle_rss = proc_status(proc.pid, "VmRSS")
        if 1 in wanted:
            sections.section_client(b, table, sock)
        if 2 in wanted:
            sections.section_throughput(b, table, proc, sock)
            b.ran_load = True
        if 4 in wanted:
            sections.section_memory(b, table, proc, sock, idle_rss)
        b.stop_agent(proc)
    if 3 in wanted:
        sections.section_cold(b, table)
    if 5 in wanted:
        sections.section_scale(b, table, sorted(b.vaults))
    if 6 in wanted:
        sections.section_argon2(b, table)
    if 7 in wanted:
        sections.section_policy(b, table)
    if 8 in wanted:
        fleet.section_fleet(b, table)
    table.sort_sections()
    return table


def main():
    args = parse_args()
    wanted = {int(s) for s in args.sections.split(",") if s.strip()}
    check_tools()
    os.umask(0o077)
    b = Bench(args)
    atexit.register(b.cleanup)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _: sys.exit(128 + n))
    t_start, load_start = time.perf_counter(), loadavg()
    import_s = setup(b, args, wanted)
    setup_s = time.perf_counter() - t_start
    os.chdir(b.home)
    if args.profile:
        print(header(args, setup_s, import_s, load_start))
        print(run_profiles(b))
        return
    table = run_sections(b, wanted)
    print(header(args, setup_s, import_s, load_start))
    print(table.render())
    print(f"total bench time {time.perf_counter() - t_start:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(table.data, indent=1, default=str))


if __name__ == "__main__":
    main()
