"""8. Fleets: a throwaway PostgreSQL 15 cluster (tests/pgcluster.py), then the three
figures of issue #16: the initial join of a 10,000-secret vault, an incremental sync
of one change in a 10,000- vs a 10-secret vault (alternating rounds), and the time
from a write on one host to another host's agent serving it with ``ov sync
--follow`` running."""

import hashlib
import shutil
import statistics
import subprocess
import tempfile
import time

from tests.pgcluster import PgCluster, missing

from .environment import APP, ENV, log
from .stats import ratios, summary

ONE = "SECRET_00000"


def section_fleet(b, table):
    reason = missing(need_psycopg=False)
    if reason:
        log(f"8. fleet: skipped: {reason}")
        return
    cluster = PgCluster(tempfile.mkdtemp(prefix="ov-bench-pg-", dir="/tmp"))
    try:
        cluster.init()
        cluster.start()
        big = max(b.vaults)                      # 10,000 (1,000 with --quick)
        hosts = {size: _fleet(b, cluster, size) for size in (10, big)}
        rounds = 2 if b.quick else 10
        log(f"8. fleet: incremental sync of 1 change, {rounds} alternating rounds")
        syncs = _incremental(b, hosts, rounds)
        log("8. fleet: change to served, with ov sync --follow")
        served = _propagation(b, hosts[10], 3 if b.quick else 15)
    finally:
        cluster.destroy()
    table.section("8. Fleet (a throwaway PostgreSQL 15 on a Unix socket; hosts are vault "
                  "files on this machine)")
    table.add("fleet_join_s", f"  ov store join, {big:,} secrets", summary(
        [hosts[big]["join"]], "range"), "s", fmt="{:.2f}", target="fleet_join_s")
    table.info("fleet.init", f"  ov store init (push), {big:,} secrets",
               f"{hosts[big]['init']:.2f} s")
    for size in (10, big):
        table.add(f"fleet.sync.{size}", f"  ov sync, 1 change in {size:,} secrets",
                  summary(syncs[size]), "ms", scale=1e3)
    table.add("fleet_sync_ratio", f"  ov sync {big:,}/10 (alternating rounds)",
              ratios(syncs[big], syncs[10]), "x", fmt="{:.2f}",
              target="fleet_sync_ratio")
    table.add("fleet_served_s", "  write on host A to host B's agent serving it",
              summary(served), "ms", scale=1e3, target="fleet_served_ms")


def _fleet(b, cluster, size):
    """Host A (a copy of the bench's vault of *size* secrets) pushed to a database of
    its own, then host B joined from it; their paths and the seconds each took."""
    database = f"fleet{size}"
    cluster.run_tool("createdb", "-h", str(cluster.sockdir), "-U", "postgres", database)
    dsn = cluster.dsn(database)
    host_a, host_b = b.tmp / f"fleet-a-{size}.db", b.tmp / f"fleet-b-{size}.db"
    shutil.copy2(b.vaults[size], host_a)
    key = ["--machine-key", str(b.key_path)]
    t0 = time.perf_counter()
    b.ov_cmd("store", "init", dsn, *key, env=b.env(OV_VAULT=host_a), timeout=600)
    t1 = time.perf_counter()
    b.ov_cmd("store", "join", dsn, *key, env=b.env(OV_VAULT=host_b), timeout=600)
    return {"a": host_a, "b": host_b, "init": t1 - t0,
            "join": time.perf_counter() - t1}


def _write(b, host, value):
    b.ov_cmd("secret", "set", ONE, "--app", APP, "--env", ENV, "--machine-key",
             str(b.key_path), input=value.encode(), env=b.env(OV_VAULT=host["a"]))


def _incremental(b, hosts, rounds):
    """Seconds of `ov sync` on host B after one write on host A, per size."""
    times = {size: [] for size in hosts}
    for number in range(rounds):
        for size in (sorted(hosts) if number % 2 else sorted(hosts, reverse=True)):
            _write(b, hosts[size], f"round-{number}")
            t0 = time.perf_counter()
            b.ov_cmd("sync", "--machine-key", str(b.key_path),
                     env=b.env(OV_VAULT=hosts[size]["b"]))
            times[size].append(time.perf_counter() - t0)
    return times


def _propagation(b, host, count):
    """Seconds from a write on host A returning to host B's agent releasing it."""
    proc, sock = b.start_agent("fleet-b", host["b"])
    follower = b.background([b.ov, "sync", "--follow", "--machine-key", str(b.key_path)],
                            b.tmp / "fleet-follow.log", b.env(OV_VAULT=host["b"]))
    env = b.client_env(sock)
    probe = [b.ov, "run", "--agent", "--socket", sock, "--secrets", ONE, "--", "sh", "-c",
             f'printf %s "${ONE}" | sha256sum']
    served = []
    try:
        time.sleep(1.0)                         # its first pull, and its LISTEN
        for number in range(count):
            value = f"served-{number}"
            wanted = hashlib.sha256(value.encode()).hexdigest()
            _write(b, host, value)
            t0 = time.perf_counter()
            while wanted not in subprocess.run(probe, env=env, capture_output=True,
                                               text=True, timeout=30).stdout:
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("host B's agent never served the change")
            served.append(time.perf_counter() - t0)
    finally:
        b.stop_agent(follower)
        b.stop_agent(proc)
    log(f"8. fleet: change to served, median {statistics.median(served) * 1e3:.0f} ms")
    return served
