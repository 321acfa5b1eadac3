"""The six sections of the table: each measures, then adds its rows to the Table."""

import itertools
import json
import statistics
from collections import Counter, defaultdict

from .environment import APP, ONE, PASSWORD, SYSTEM_PYTHON, log
from .load import LoadGenerator
from .procfs import host_cpu, proc_cpu, proc_status
from .profiling import perf_stat
from .stats import pct, ratios, summary
from .timing import alternate, hyperfine, spawn_time

# -- 1. client latency ----------------------------------------------------------------

CLIENT_ROWS = (("ov run --agent", "ov run --agent -- /bin/true (release, exec)",
                "client_agent_ms"),
               ("ov run --agent --spawn", "ov run --agent --spawn -- /bin/true", None),
               ("python3 -I -c pass", "python3 -I -c pass (floor)", None),
               ("venv python -I -c pass", "venv python -I -c pass (venv floor)", None),
               ("ov run --machine-key", "ov run --machine-key K --app demo -- /bin/true",
                None),
               ("/bin/true", "/bin/true", None))


def client_commands(b):
    return {
        "ov run --agent": [b.ov, "run", "--agent", "--", "/bin/true"],
        "ov run --agent --spawn": [b.ov, "run", "--agent", "--spawn", "--", "/bin/true"],
        "python3 -I -c pass": [SYSTEM_PYTHON, "-I", "-c", "pass"],
        "venv python -I -c pass": [b.vpy, "-I", "-c", "pass"],
        "ov run --machine-key": [b.ov, "run", "--machine-key", str(b.key_path),
                                 "--app", APP, "--", "/bin/true"],
        "/bin/true": ["/bin/true"],
    }


def section_client(b, table, sock):
    q = b.quick
    env = b.client_env(sock, OV_VAULT=b.vaults[10])
    commands = client_commands(b)
    runs, warmup = (3, 1) if q else (40, 3)
    log(f"1. client latency: hyperfine -N, {len(commands)} commands x {runs} runs")
    hf = hyperfine(b, commands, runs, warmup, env)
    rounds = 6 if q else 100
    log(f"1. client latency: alternating loop agent/spawn/floor, {rounds} rounds")
    alt = alternate(b, {"agent": commands["ov run --agent"],
                        "spawn": commands["ov run --agent --spawn"],
                        "floor": commands["python3 -I -c pass"]}, rounds, env)
    table.section("1. Client latency (wall, spawn to exit; hyperfine -N unless noted)")
    for name, label, target in CLIENT_ROWS:
        table.add(f"client.{name}", "  " + label, summary(hf[name]), "ms", scale=1e3,
                  fmt="{:.2f}" if name == "/bin/true" else "{:.1f}", target=target)
    client_alternating_rows(table, alt)
    client_ratio_rows(table, hf)


def client_alternating_rows(table, alt):
    for name, label in (("agent", "ov run --agent"),
                        ("spawn", "ov run --agent --spawn"),
                        ("floor", "python3 -I -c pass")):
        table.add(f"client.alt.{name}", f"  {label} (alternating loop)",
                  summary(alt[name]), "ms", scale=1e3)
    table.add("client.alt.excess", "  agent - floor, alternating (per round)",
              summary([a - f for a, f in zip(alt["agent"], alt["floor"])]), "ms",
              scale=1e3)
    table.add("client.ratio.alt", "  agent/floor, alternating (median of rounds)",
              ratios(alt["agent"], alt["floor"]), "x", fmt="{:.2f}",
              target="ratio_agent_floor")
    table.add("client.ratio.spawn.alt", "  spawn/floor, alternating (median of rounds)",
              ratios(alt["spawn"], alt["floor"]), "x", fmt="{:.2f}")


def client_ratio_rows(table, hf):
    """Ratios of hyperfine's medians: cross-checks only."""
    floor = statistics.median(hf["python3 -I -c pass"])
    for key, name, label in (("client.ratio.hyperfine", "ov run --agent", "agent"),
                             ("client.ratio.spawn.hyperfine", "ov run --agent --spawn",
                              "spawn")):
        ratio = statistics.median(hf[name]) / floor
        table.info(key, f"  {label}/floor, hyperfine (ratio of medians; cross-check)",
                   f"{ratio:.2f} x")
    mk_ratio = statistics.median(hf["ov run --machine-key"]) / statistics.median(
        hf["ov run --agent"])
    table.info("client.ratio.mk", "  machine-key/agent, hyperfine", f"{mk_ratio:.2f} x")


# -- 2. throughput ----------------------------------------------------------------------

# (op, N) of section 2: the release flow at every level, the spawn flow at the load
# of the N=32 target (information: it forks /bin/true per request).
THROUGHPUT_LEVELS = (("release", 1), ("release", 8), ("release", 32), ("spawn", 32))


def section_throughput(b, table, proc, sock):
    q = b.quick
    gens = {"release": LoadGenerator(b, sock, "release", expect=10),
            "spawn": LoadGenerator(b, sock, "spawn")}
    trials, duration = (1, 0.4) if q else (5, 1.5)
    log(f"2. throughput: warm-up, then {trials} trials x {duration}s for "
        f"{', '.join(f'{op} N={n}' for op, n in THROUGHPUT_LEVELS)} (round robin)")
    gens["release"].run(8, count=40 if q else 300)
    gens["spawn"].run(8, count=20 if q else 100)
    results = throughput_trials(gens, proc, trials, duration)
    perf = throughput_perf(b, gens, proc)
    counters = b.codec.status(sock)["counters"]
    table.section("2. Agent throughput/latency (load generator: 1 process, 1 thread, "
                  "selectors; release: all 10 secrets, seal opened; spawn: /bin/true)")
    for op, n in THROUGHPUT_LEVELS:
        throughput_rows(table, op, n, results[op, n], perf.get((op, n)))
    table.info("tput.counters", "  agent status counters: released/accepted/denied/busy",
               "/".join(str(counters.get(name, "?")) for name in
                        ("released", "accepted", "denied", "busy")))
    table.data["tput.counters"]["counters"] = counters


def throughput_trials(gens, proc, trials, duration):
    """{(op, N): [one run's result per trial]}, the levels round robin, each run with
    the agent's and the host's CPU over it."""
    results = defaultdict(list)
    for _ in range(trials):
        for op, n in THROUGHPUT_LEVELS:
            cpu0, host0 = proc_cpu(proc.pid), host_cpu()
            res = gens[op].run(n, duration=duration)
            cpu1, host1 = proc_cpu(proc.pid), host_cpu()
            res["host_idle"] = (host1[0] - host0[0]) / max(host1[1] - host0[1], 1)
            res["agent_cpu"] = cpu1[0] - cpu0[0]
            res["child_cpu"] = cpu1[1] - cpu0[1]
            res["agent_sys"] = cpu1[2] - cpu0[2]
            results[op, n].append(res)
    return results


def throughput_perf(b, gens, proc):
    """{(op, N): perf stat counts per request}, for the levels perf could count."""
    perf = {}
    for op, n in THROUGHPUT_LEVELS:
        res, counts = perf_stat(
            proc.pid, lambda op=op, n=n: gens[op].run(n, count=100 if b.quick else 1000),
            b.tmp / f"perf-{op}-{n}.csv")
        if counts:
            perf[op, n] = {k: v / max(res["completed"], 1) for k, v in counts.items()}
    return perf


def per_request(rs, field):
    """summary() (range) of a run's *field* per completed request, over the trials."""
    return summary([r[field] / max(r["completed"], 1) for r in rs], "range")


def throughput_rows(table, op, n, rs, perf):
    key = f"tput.{op}.{n}"
    who = f"  N={n:<2}" if op == "release" else f"  spawn N={n:<2}"
    what = "requests" if op == "release" else "runs"
    main = op == "release" and n == 32
    table.add(f"{key}.rate", f"{who} {what}/s (host CPU idle %)",
              summary([r["completed"] / r["elapsed"] for r in rs], "range"), "/s",
              fmt="{:.0f}", target="requests_per_s_n32" if main else None)
    idle = statistics.median(r["host_idle"] for r in rs) * 100
    table.annotate(f" ({idle:.0f}%)")
    table.data[f"{key}.rate"]["host_idle_pct"] = idle
    latency_rows(table, key, who, rs, main)
    cpu_rows(table, key, who, op, rs)
    label = f"{who} per req (perf stat): ctx-sw/futex/faults"
    if perf:
        table.info(f"{key}.perf", label,
                   f"{perf['context-switches']:.1f} / "
                   f"{perf['syscalls:sys_enter_futex']:.1f} / {perf['page-faults']:.0f}")
        table.data[f"{key}.perf"] = perf
    else:
        table.info(f"{key}.perf", label, "n/a (no perf)")
    ok = sum(r["completed"] for r in rs)
    errors = sum((r["errors"] for r in rs), Counter())
    table.data[f"{key}.errors"] = dict(errors)
    table.info(f"{key}.err", f"{who} requests ok / errors",
               f"{ok} / {sum(errors.values())}" + (f" {dict(errors)}" if errors else ""))


def latency_rows(table, key, who, rs, main):
    lat = [x for r in rs for x in r["latencies"]]
    table.add(f"{key}.p50", f"{who} latency p50", summary(lat), "ms",
              fmt="{:.2f}", scale=1e3)
    p99s = [pct(r["latencies"], 99) for r in rs]
    table.add(f"{key}.p99", f"{who} latency p99 (spread: per-trial p99)",
              {"median": pct(lat, 99), "lo": min(p99s), "hi": max(p99s), "n": len(lat),
               "spread": "range"}, "ms", fmt="{:.2f}", scale=1e3,
              target="p99_n32_ms" if main else None)


def cpu_rows(table, key, who, op, rs):
    """The agent's CPU per request, its children's (spawn) and the generator's."""
    table.add(f"{key}.cpu", f"{who} agent CPU/request (%busy of 1 core, %sys)",
              per_request(rs, "agent_cpu"), "ms", fmt="{:.3f}", scale=1e3)
    busy = statistics.median(r["agent_cpu"] / r["elapsed"] for r in rs) * 100
    kernel = 100 * sum(r["agent_sys"] for r in rs) / max(
        sum(r["agent_cpu"] for r in rs), 1e-9)
    table.annotate(f" ({busy:.0f}%, {kernel:.0f}%)")
    table.data[f"{key}.cpu"]["busy_pct"] = busy
    table.data[f"{key}.cpu"]["sys_pct"] = kernel
    if op == "spawn":
        table.add(f"{key}.child", f"{who} child /bin/true CPU/request",
                  per_request(rs, "child_cpu"), "ms", fmt="{:.3f}", scale=1e3)
    table.add(f"{key}.gen", f"{who} generator CPU/request (%busy)",
              per_request(rs, "gen_cpu"), "ms", fmt="{:.3f}", scale=1e3)
    busy = statistics.median(r["gen_cpu"] / r["elapsed"] for r in rs) * 100
    table.annotate(f" ({busy:.0f}%)")


# -- 3. cold start ------------------------------------------------------------------------


def section_cold(b, table):
    rounds = 1 if b.quick else 5
    log(f"3. cold start: {rounds} fresh socket activations")
    cold, warm = [], []
    for i in range(rounds):
        proc, sock, _ = b.activate(f"cold-{i}")
        env = b.client_env(sock)
        argv = [b.ov, "run", "--agent", "--", "/bin/true"]
        cold.append(spawn_time(b, argv, env))
        warm.append(spawn_time(b, argv, env))
        b.stop_agent(proc)
    table.section("3. Cold start (systemd-socket-activate; ov run --agent -- /bin/true, "
                  "spawn to exit)")
    table.add("cold.first", "  first request, agent not running", summary(cold, "range"),
              "ms", scale=1e3, target="cold_ms")
    table.add("cold.second", "  second request, same agent (warm)", summary(warm, "range"),
              "ms", scale=1e3)
    table.add("cold.delta", "  activation cost (first - second, per round)",
              summary([c - w for c, w in zip(cold, warm)], "range"), "ms", scale=1e3)


# -- 4. memory ----------------------------------------------------------------------------


def section_memory(b, table, proc, sock, idle_rss):
    gen = LoadGenerator(b, sock, "release", expect=10)
    warm, total, step = (100, 200, 100) if b.quick else (1000, b.args.leak_requests, 2000)
    log(f"4. memory: {warm} warm-up releases, then {total} releases (N=8), "
        f"VmRSS every {step}")
    gen.run(8, count=warm)
    rss0 = proc_status(proc.pid, "VmRSS")
    samples, errors = [rss0], Counter()
    for _ in range(total // step):
        res = gen.run(8, count=step)
        errors += res["errors"]
        samples.append(proc_status(proc.pid, "VmRSS"))
    hwm = proc_status(proc.pid, "VmHWM")
    table.section("4. Agent memory (KiB from /proc/PID/status)")
    table.add("mem.idle", "  VmRSS idle (fresh agent, no request yet)",
              summary([idle_rss / 1024]), "MiB", target="rss_idle_mib")
    table.add("mem.warm", f"  VmRSS after {warm} warm-up releases (N=8)",
              summary([rss0 / 1024]), "MiB")
    table.add("mem.after", f"  VmRSS after {total} more releases",
              summary([samples[-1] / 1024]), "MiB")
    table.add("mem.growth", f"  growth over those {total} requests",
              summary([(samples[-1] - rss0) / 1024]), "MiB", fmt="{:.2f}",
              target="rss_growth_mib")
    steps = [later - earlier for earlier, later in itertools.pairwise(samples)]
    table.add("mem.slope", f"  growth per {step} requests (per-step median, range)",
              summary(steps, "range"), "KiB", fmt="{:.0f}")
    per_nonce = float(b.program("nonce_memory.py", text=True, timeout=60,
                                check=True).stdout)
    table.add("mem.nonce", f"  expected from NonceCache ({per_nonce:.0f} B/entry)",
              summary([per_nonce * total / 2**20]), "MiB", fmt="{:.2f}")
    table.add("mem.hwm", "  VmHWM (peak of the agent's life" + (", incl. N=32 of section 2)"
                                                              if b.ran_load else ")"),
              summary([hwm / 1024]), "MiB")
    table.info("mem.err", "  requests errors",
               str(sum(errors.values())) + (f" {dict(errors)}" if errors else ""))


# -- 5. scale -----------------------------------------------------------------------------


def section_scale(b, table, sizes):
    agents = {size: b.start_agent(f"scale-{size}", b.vaults[size]) for size in sizes}
    env = b.env(CREDENTIALS_DIRECTORY=b.creds)
    commands = {}
    for size in sizes:
        base = [b.ov, "run", "--agent", "--socket", agents[size][1]]
        commands[f"one-{size}"] = base + ["--secrets", ONE, "--", "/bin/true"]
        commands[f"all-{size}"] = base + ["--", "/bin/true"]
    runs, warmup = (2, 1) if b.quick else (15, 2)
    log(f"5. scale: hyperfine -N, {len(commands)} commands x {runs} runs")
    hf = hyperfine(b, commands, runs, warmup, env)
    small, big = sizes[0], sizes[-1]
    rounds = 4 if b.quick else 40
    log(f"5. scale: alternating loops, {rounds} rounds")
    alt = alternate(b, {"small": commands[f"one-{small}"],
                        "big": commands[f"one-{big}"]}, rounds, env)
    socks = {size: sock for size, (_, sock) in agents.items()}
    proto = round_trips(b, socks, rounds, [ONE])
    proto_all = round_trips(b, socks, 2 if b.quick else 5)
    for proc, _ in agents.values():
        b.stop_agent(proc)
    table.section(f"5. Scale: vaults of {', '.join(map(str, sizes))} secrets in one env "
                  "(each its own fresh agent)")
    scale_rows(table, sizes, hf, proto, proto_all)
    hf_ratio = statistics.median(hf[f"one-{big}"]) / statistics.median(hf[f"one-{small}"])
    table.info("scale.ratio.hyperfine", f"  ONE {big}/{small}, hyperfine (ratio of "
               "medians; cross-check)", f"{hf_ratio:.2f} x")
    table.add("scale.ratio.alt", f"  ONE {big}/{small}, ov run --agent alternating",
              ratios(alt["big"], alt["small"]), "x", fmt="{:.2f}",
              target="scale_one_ratio")
    table.add("scale.ratio.proto", f"  ONE {big}/{small}, release round trip alternating",
              ratios(proto[big], proto[small]), "x", fmt="{:.2f}",
              target="scale_one_ratio")


def round_trips(b, socks, rounds, secrets=None):
    """{size: [seconds...]}: in-process releases of *secrets* (None: all of them)
    from each size's agent, the order of the sizes reversed every other round; each
    reply must hold as many secrets as were asked for."""
    sizes = list(socks)
    times = defaultdict(list)
    for i in range(rounds):
        for size in (sizes if i % 2 == 0 else sizes[::-1]):
            expect = size if secrets is None else len(secrets)
            times[size].append(b.codec.request(socks[size], secrets=secrets,
                                               expect=expect))
    return times


def scale_rows(table, sizes, hf, proto, proto_all):
    for size in sizes:
        table.add(f"scale.one.{size}", f"  {size:>5}: ov run --agent --secrets ONE",
                  summary(hf[f"one-{size}"]), "ms", scale=1e3)
    for size in sizes:
        table.add(f"scale.all.{size}", f"  {size:>5}: ov run --agent (all secrets)",
                  summary(hf[f"all-{size}"]), "ms", scale=1e3)
    for size in sizes:
        table.add(f"scale.proto.one.{size}", f"  {size:>5}: release round trip, ONE "
                  "(in-process, seal opened)", summary(proto[size]), "ms", fmt="{:.2f}",
                  scale=1e3)
    for size in sizes:
        table.add(f"scale.proto.all.{size}", f"  {size:>5}: release round trip, all "
                  "(in-process, seal opened)", summary(proto_all[size], "range"), "ms",
                  scale=1e3)


# -- 6. Argon2id --------------------------------------------------------------------------


def section_argon2(b, table):
    count = 1 if b.quick else 5
    log(f"6. Argon2id: {count} unlocks in-process")
    result = b.program("argon2_unlock.py", b.base_vault, count, PASSWORD, timeout=120,
                       check=True)
    data = json.loads(result.stdout)
    kdf = data["kdf"]
    table.section(f"6. Argon2id unlock (Vault.open(path).unlock(password), in-process; "
                  f"t={kdf['time_cost']}, m={kdf['memory_kib'] // 1024} MiB, "
                  f"p={kdf['parallelism']})")
    table.add("argon2.unlock", "  unlock time", summary(data["times"], "range"), "s",
              fmt="{:.3f}")


def section_policy(b, table):
    count = 50 if b.quick else 2000
    log(f"7. policy: {count} decisions of each kind in-process, 100 rules")
    result = b.program("policy_decide.py", b.tmp / "policy.d", count, timeout=120,
                       check=True)
    data = json.loads(result.stdout)
    table.section("7. Policy evaluation (in-process, 100 rules in one file, a fresh "
                  "Caller per decision as per request)")
    table.add("policy.named_first", "  2 named secrets, first rule allows",
              summary(data["named_first"]), "us", scale=1e6)
    table.add("policy_decide_us", "  2 named secrets, last rule allows",
              summary(data["named_last"]), "us", scale=1e6, target="policy_decide_us")
    table.add("policy.all_of_100", "  none named: 100 secrets of the env sorted",
              summary(data["all_of_100"]), "us", scale=1e6)
    table.info("policy.load", "  loading the policy (parse, checks, 100 rules)",
               f"{data['load'] * 1e3:.1f} ms")
