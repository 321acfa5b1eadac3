"""Profilers: ``perf stat`` counts for section 2, and ``--profile`` (instead of the
table): py-spy, perf record and strace of the agent under load, ``-X importtime``
and an in-process run (bench/programs/client_runtime.py) of the clients, and the
imports of a socket-activated agent."""

import re
import shutil
import signal
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

from .environment import APP, log
from .load import LoadGenerator
from .procfs import cpu_per_request, proc_cpu
from .stats import pct
from .timing import spawn_time

PERF_EVENTS = ("task-clock", "context-switches", "cpu-migrations", "page-faults",
               "syscalls:sys_enter_futex")

# frames of call wrappers hidden from the inclusive list (threading, argh, the CLI)
WRAPPERS = re.compile(r"\((threading\.py|argh/[^)]*|ovagent/(cli|entry|agent/daemon)\.py"
                      r"|ov)\)$|^<module>")


def while_watched(argv, driver, settle):
    """driver()'s result, run while a profiler (argv: perf stat/record -p PID) watches;
    the profiler gets *settle* seconds to attach and SIGINT once driver() is done."""
    watcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(settle)
    try:
        return driver()
    finally:
        watcher.send_signal(signal.SIGINT)
        try:
            watcher.wait(60)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()


def perf_stat(pid, driver, out):
    """Run driver() under ``perf stat -p pid`` (counting, cheap; follows new threads
    and children).  Returns (driver result, {event: count}) or (result, None) when
    perf is missing or refuses."""
    if shutil.which("perf") is None:
        return driver(), None
    result = while_watched(["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS),
                            "-p", str(pid), "-o", str(out)], driver, settle=0.3)
    counts = {}
    try:
        for line in out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2] in PERF_EVENTS:
                try:
                    counts[parts[2]] = float(parts[0])
                except ValueError:
                    pass
    finally:
        out.unlink(missing_ok=True)
    return result, (counts if len(counts) == len(PERF_EVENTS) else None)


# -- the agent under load -------------------------------------------------------------


def pyspy_profile(b, pid, seconds, driver, out):
    """py-spy record (raw collapsed stacks) of pid while driver() runs."""
    spy = subprocess.Popen([str(b.venv / "bin" / "py-spy"), "record", "-p", str(pid),
                            "-d", str(seconds), "-r", "250", "-f", "raw", "-o", str(out),
                            *(["--native"] if b.args.native else ["--nonblocking"]),
                            *(["--gil"] if b.args.gil else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    stats = driver()
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not out.exists():
        raise SystemExit(f"bench: py-spy failed: {err.decode(errors='replace')[-2000:]}")
    return stats


def perf_profile(b, pid, driver, per_request, top=25):
    """``perf record`` (999 Hz, no call graphs) of the agent while driver() runs: its
    CPU by shared object (the interpreter, the kernel, libcrypto, sqlite...) and by
    symbol, each share also in ms per request (share x *per_request*, the agent's CPU
    per request measured without perf, in seconds).  Returns (text, driver result,
    (agent CPU per request, kernel share) while perf recorded), text None without
    perf or when perf refuses."""
    data = b.tmp / "perf.data"

    def measured():
        before = proc_cpu(pid)
        outcome = driver()
        return before, outcome, proc_cpu(pid)

    cpu0, res, cpu1 = while_watched(["perf", "record", "-F", "999", "-p", str(pid), "-o",
                                     str(data)], measured, settle=0.5)
    under = cpu_per_request(cpu0, cpu1, res["completed"])
    out = []
    for sort, limit in (("dso", 10), ("dso,sym", top)):
        rows = perf_report(data, sort)
        if not rows:
            return None, res, under
        out.append(f"  by {'shared object' if sort == 'dso' else 'symbol'}:"
                   f"   %  ms/req")
        for line in rows[:limit]:
            share = float(line.split("%")[0])
            out.append(f"  {share:6.1f}  {share * per_request * 10:6.3f}  "
                       f"{' '.join(line.split()[1:])}")
    data.unlink(missing_ok=True)
    return "\n".join(out), res, under


def perf_report(data, sort):
    """The lines of ``perf report --sort SORT`` (shares of 0.5% and more), or None
    when perf report fails or finds nothing."""
    result = subprocess.run(["perf", "report", "-i", str(data), "--stdio",
                             "--no-children", "--sort", sort, "--percent-limit",
                             "0.5"], capture_output=True, text=True, timeout=300,
                            check=False)
    rows = [line for line in result.stdout.splitlines()
            if line.strip() and not line.startswith("#")]
    return rows if result.returncode == 0 and rows else None


def read_collapsed(path):
    """(inclusive, self, self per line, total) sample counts of py-spy's collapsed
    stacks; a frame is 'function (file)', its line number dropped but for the
    per-line counts."""
    inclusive, selfs, lines_self, total = Counter(), Counter(), Counter(), 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        raw = stack.split(";")
        frames = [re.sub(r":\d+\)$", ")", f) for f in raw]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        selfs[frames[-1]] += count
        lines_self[raw[-1]] += count
    return inclusive, selfs, lines_self, total


def summarize_collapsed(path, top=18, cpu_per_request=None, gil=False):
    """Inclusive and self shares per function from py-spy's collapsed stacks, and the
    lines with the most self samples; with cpu_per_request (s), also an estimate of
    each share in ms per request."""
    inclusive, selfs, lines_self, total = read_collapsed(path)
    per = (cpu_per_request or 0) * 1e3

    def row(frame):
        inc, own = inclusive[frame] / total, selfs[frame] / total
        est = f"{inc * per:8.3f}" if per else ""
        return f"  {100 * inc:9.1f}  {100 * own:5.1f}  {est}   {frame}"

    what = ("the thread holding the GIL (py-spy --gil" if gil
            else "busy threads (py-spy")
    lines = [f"  {total} samples of {what}, 250 Hz, idle excluded)"
             + ("; ms/req = inclusive share x agent CPU per request (estimate)"
                if per else ""),
             "  inclusive%  self%" + ("  ms/req" if per else "") + "   function (file)"
             "   [call wrappers of threading/argh/cli hidden]"]
    def hidden(frame):
        return (WRAPPERS.search(frame)
                and not frame.startswith(("Thread.start", "Condition")))

    shown = [frame for frame, count in inclusive.most_common()
             if count / total >= 0.01 and not hidden(frame)]
    lines += [row(frame) for frame in shown[:top]]
    lines.append("  -- top self --")
    lines += [row(frame) for frame, _ in selfs.most_common(top)]
    lines.append("  -- top self lines (a line that calls C code which drops the GIL, a "
                 "lock or a blocking call also holds threads waiting to take the GIL "
                 "back) --")
    for frame, count in lines_self.most_common(10):
        est = f"{count / total * per:8.3f}" if per else ""
        lines.append(f"  {'':9}  {100 * count / total:5.1f}  {est}   {frame}")
    return "\n".join(lines)


def strace_profile(b, op, requests=300):
    """Syscalls per request of the agent (strace -f -c; for spawn, -f also follows each
    vforked child through the exec of /bin/true, so its syscalls are in the counts)."""
    proc, sock = b.start_agent("strace", b.vaults[10])
    gen = LoadGenerator(b, sock, op, expect=10 if op == "release" else None)
    gen.run(4, count=100)
    out = b.tmp / "strace.txt"
    log(f"profile: strace -f -c of the agent over {requests} {op} requests (N=4)")
    res = while_watched(["strace", "-f", "-c", "-S", "calls", "-o", str(out), "-p",
                         str(proc.pid)], lambda: gen.run(4, count=requests), settle=1.0)
    b.stop_agent(proc)
    done = res["completed"]
    what = ("includes the vforked child and /bin/true itself" if op == "spawn"
            else "release: no child")
    lines = [(f"== agent syscalls per request: strace -f -c over {done} "
              f"{op} requests (N=4; {what}) =="),
             "  calls/req  errors/req  syscall"]
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            errors = int(parts[4]) if len(parts) == 6 else 0
            calls = int(parts[3])
            if calls / done >= 0.5:
                lines.append(f"  {calls / done:9.1f}  {errors / done:10.1f}"
                             f"  {parts[-1]}")
    return "\n".join(lines)


def profile_load(b, op, n, seconds):
    """py-spy (then perf record, when installed) of an agent under load; the text,
    and the collapsed stacks left in b.tmp."""
    proc, sock = b.start_agent("profile", b.vaults[10])
    gen = LoadGenerator(b, sock, op, expect=10 if op == "release" else None)
    stacks = b.tmp / f"agent-{op}-n{n}.txt"
    gen.run(n, count=200)
    cpu0 = proc_cpu(proc.pid)
    log(f"profile: agent under load, {op} N={n} for {seconds}s")
    res = pyspy_profile(b, proc.pid, seconds, lambda: gen.run(n, duration=seconds), stacks)
    per_req, kernel = cpu_per_request(cpu0, proc_cpu(proc.pid), res["completed"])
    lat = res["latencies"]
    out = [f"== agent under load: {op} N={n}, all 10 secrets"
           f"{', /bin/true' if op == 'spawn' else ''}: {res['completed']} requests "
           f"({res['completed'] / res['elapsed']:.0f}/s, p50 {pct(lat, 50) * 1e3:.1f} ms, "
           f"p99 {pct(lat, 99) * 1e3:.1f} ms, errors {sum(res['errors'].values())}; "
           f"generator {res['gen_cpu'] / max(res['completed'], 1) * 1e3:.3f} ms CPU/"
           f"request), {per_req * 1e3:.3f} ms agent CPU per request "
           f"({kernel * 100:.0f}% of it in the kernel; while sampled) ==",
           summarize_collapsed(stacks, cpu_per_request=per_req, gil=b.args.gil)]
    if shutil.which("perf"):
        log(f"profile: perf record of the agent, {op} N={n} for {seconds}s")
        text, _, (under, kernel_under) = perf_profile(
            b, proc.pid, lambda: gen.run(n, duration=seconds), per_req)
        out.append(f"\n== agent under load, {op} N={n}: perf record -F 999 (interpreter, "
                   "kernel, libraries); ms/req = share x the agent CPU per request "
                   f"without perf ({per_req * 1e3:.3f} ms, {kernel * 100:.0f}% kernel); "
                   f"while perf records: {under * 1e3:.3f} ms, {kernel_under * 100:.0f}% "
                   "kernel (perf switches its counters at each context switch, in "
                   "finish_task_switch, which adds to the kernel's samples) ==")
        out.append(text or "  perf record/report failed")
    b.stop_agent(proc)
    return "\n".join(out)


def profile_release_all(b, seconds):
    """py-spy of an agent releasing every secret of the biggest vault, N=1."""
    big = max(b.vaults)
    proc, sock = b.start_agent("profile-big", b.vaults[big])
    gen = LoadGenerator(b, sock, "release", expect=big)
    log(f"profile: agent releasing all {big} secrets, N=1 for {seconds}s")
    cpu0 = proc_cpu(proc.pid)
    res = pyspy_profile(b, proc.pid, seconds, lambda: gen.run(1, duration=seconds),
                        b.tmp / "agent-all.txt")
    per_req = (proc_cpu(proc.pid)[0] - cpu0[0]) / max(res["completed"], 1)
    b.stop_agent(proc)
    return "\n".join([f"\n== agent releasing ALL {big} secrets (N=1): {res['completed']} "
                      f"requests, {per_req * 1e3:.1f} ms agent CPU per request ==",
                      summarize_collapsed(b.tmp / "agent-all.txt",
                                          cpu_per_request=per_req, gil=b.args.gil)])


# -- imports and the clients ------------------------------------------------------------


def parse_importtime(text, selfs, cumuls, depth0):
    """Add one run's ``-X importtime`` lines to the per-module sample lists."""
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            selfs[m[4]].append(int(m[1]))
            cumuls[m[4]].append(int(m[2]))
            if not m[3]:
                depth0.add(m[4])


def format_importtime(selfs, cumuls, depth0, first_line, top=15):
    med_self = {k: statistics.median(v) for k, v in selfs.items()}
    med_cum = {k: statistics.median(v) for k, v in cumuls.items()}
    total = sum(med_self.values())
    lines = [(f"  {first_line}; sum of import self times {total / 1e3:.1f} ms, "
              f"{len(med_self)} modules"),
             "  top-level imports by cumulative ms:"]
    for name in sorted(depth0, key=lambda n: -med_cum[n])[:top]:
        lines.append(f"    {med_cum[name] / 1e3:7.2f}  {name}")
    lines.append("  modules by self ms:")
    for name, us in sorted(med_self.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {us / 1e3:7.2f}  {name}")
    return "\n".join(lines)


def importtime_profile(b, argv, env, runs=5):
    """Median self/cumulative import times (us) over runs of python -X importtime."""
    selfs, cumuls, walls, depth0 = defaultdict(list), defaultdict(list), [], set()
    for _ in range(runs):
        t0 = time.perf_counter()
        result = subprocess.run([b.vpy, "-X", "importtime", *argv], env=env, cwd=b.home,
                                capture_output=True, timeout=60, check=False)
        walls.append(time.perf_counter() - t0)
        if result.returncode != 0:
            raise SystemExit(f"bench: {argv} failed: {result.stderr.decode()[-1500:]}")
        parse_importtime(result.stderr.decode(errors="replace"), selfs, cumuls, depth0)
    return format_importtime(selfs, cumuls, depth0,
                             f"wall {statistics.median(walls) * 1e3:.1f} ms (median of "
                             f"{runs}, with -X importtime)")


def cold_importtime_profile(b, rounds=3):
    """Imports of a socket-activated agent (PYTHONPROFILEIMPORTTIME=1), per activation."""
    selfs, cumuls, depth0, walls = defaultdict(list), defaultdict(list), set(), []
    for i in range(rounds):
        proc, sock, errlog = b.activate(f"prof-cold-{i}", ("PYTHONPROFILEIMPORTTIME=1",))
        walls.append(spawn_time(b, [b.ov, "run", "--agent", "--", "/bin/true"],
                                b.client_env(sock)))
        b.stop_agent(proc)
        parse_importtime(errlog.read_text(errors="replace"), selfs, cumuls, depth0)
    return format_importtime(selfs, cumuls, depth0,
                             f"first request {statistics.median(walls) * 1e3:.1f} ms "
                             f"(median of {rounds}, with importtime on)")


def profile_clients(b):
    """-X importtime and the in-process runtime of ``ov run --agent [--spawn]``, and
    -X importtime of ``ov run --machine-key``."""
    proc, sock = b.start_agent("profile-client", b.vaults[10])
    env = b.client_env(sock)
    log("profile: python -X importtime of the clients")
    out = []
    for flags in ([], ["--spawn"]):
        argv = ["run", "--agent", *flags, "--", "/bin/true"]
        out.append(f"\n== client: python -X importtime ov {' '.join(argv)} ==")
        out.append(importtime_profile(b, [b.ov, *argv], env))
        out.append(f"\n== client: runtime of entry.main({' '.join(argv)}) with its "
                   "modules already imported ==")
        result = b.program("client_runtime.py", 10 if b.quick else 50, *argv, env=env,
                           text=True, timeout=120, check=False)
        out.append(result.stdout.rstrip() if result.returncode == 0 else
                   f"  failed: {result.stderr[-1500:]}")
    out.append("\n== client: python -X importtime ov run --machine-key K -- /bin/true ==")
    out.append(importtime_profile(b, [b.ov, "run", "--machine-key", str(b.key_path),
                                      "--app", APP, "--", "/bin/true"],
                                  dict(env, OV_VAULT=b.vaults[10])))
    b.stop_agent(proc)
    return "\n".join(out)


def run_profiles(b):
    log("profile: installing py-spy into the throwaway venv")
    b.pip("install", "-q", "py-spy")
    seconds = 3 if b.quick else 10
    op, n = b.args.profile_op, b.args.profile_clients
    out = [profile_load(b, op, n, seconds)]
    if max(b.vaults) > 10:
        out.append(profile_release_all(b, seconds))
    if shutil.which("strace"):
        out.append("")
        out.append(strace_profile(b, op))
    if b.args.profile_out:
        for name in (f"agent-{op}-n{n}.txt", "agent-all.txt"):
            if (b.tmp / name).exists():
                Path(b.args.profile_out).mkdir(parents=True, exist_ok=True)
                shutil.copy2(b.tmp / name, Path(b.args.profile_out) / name)
    out.append(profile_clients(b))
    log("profile: imports of a socket-activated agent")
    out.append("\n== cold start: imports of a socket-activated agent "
               "(PYTHONPROFILEIMPORTTIME=1) ==")
    out.append(cold_importtime_profile(b))
    return "\n".join(out)
