"""Smoke test of the benchmark harness: ``bench/run.py --quick`` runs end to end and
prints its table.  No timing is asserted: the numbers of a quick run mean nothing.
Also, without hyperfine: the command line starts from the repository root, and the
pieces of bench/ that need no agent (the load generator's frame reading, the table)
do what the table relies on."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ovagent.core import protocol

ROOT = Path(__file__).resolve().parent.parent

needs_tools = pytest.mark.skipif(
    shutil.which("hyperfine") is None or shutil.which("systemd-socket-activate") is None
    or not Path("/usr/bin/python3").exists(),
    reason="needs hyperfine (tests/extra-apt-packages), systemd-socket-activate and "
           "/usr/bin/python3")

HEADERS = (
    "== ov bench (QUICK",
    "metric", "median", "spread", "target", "met",
    "1. Client latency",
    "2. Agent throughput/latency",
    "3. Cold start",
    "4. Agent memory",
    "5. Scale",
    "6. Argon2id unlock",
    "agent/floor, alternating",
    "total bench time",
)


def bench_module(name):
    """bench/NAME.py loaded by path (load and stats import nothing from bench/)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_tools
def test_bench_quick_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
                            capture_output=True, text=True, timeout=240, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for header in HEADERS:
        assert header in result.stdout, (header, result.stdout)
    assert "Traceback" not in result.stderr
    # it cleans up after itself: no temp dir, no process running from it
    tmp = re.search(r"building a non-editable venv in (\S+)", result.stderr)[1]
    assert not os.path.exists(tmp)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert tmp.encode() not in cmdline, (pid, cmdline)


def test_bench_command_line_starts_from_the_repository_root():
    result = subprocess.run([sys.executable, "bench/run.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--sections", "--profile", "--json", "--leak-requests"):
        assert option in result.stdout


def test_load_generator_reads_frames_as_they_arrive():
    """Frames split anywhere, several in one recv(), all read through FrameReader."""
    load = bench_module("load")
    frames = [{"type": "hello", "challenge": "ab" * 32}, {"type": "started"},
              {"type": "exit", "code": 0}]
    data = b"".join(protocol.encode_frame(frame) for frame in frames)
    for size in (1, 3, 8, 9, len(data)):
        conn = load.Connection(None, 0.0)
        got = []
        for at in range(0, len(data), size):
            got += conn.frames(data[at:at + size], protocol.FrameReader)
        assert got == frames, size
        assert conn.reader is None                  # no frame begun and left over


def test_load_generator_refuses_a_bad_header():
    load = bench_module("load")
    conn = load.Connection(None, 0.0)
    with pytest.raises(protocol.ProtocolError):
        conn.frames(b"XX" + protocol.encode_frame({"type": "hello"})[2:],
                    protocol.FrameReader)


def test_table_orders_sections_and_checks_targets():
    stats = bench_module("stats")
    table = stats.Table()
    table.section("3. Cold start")
    table.add("cold.first", "  first", stats.summary([0.2, 0.4]), "ms", scale=1e3,
              target="cold_ms")
    table.section("1. Client latency")
    table.add("client.ratio.alt", "  agent/floor", stats.ratios([3.0, 5.0], [1.0, 2.0]),
              "x", fmt="{:.2f}", target="ratio_agent_floor")
    table.info("client.ratio.mk", "  machine-key/agent", "4.00 x")
    table.sort_sections()
    text = table.render()
    assert text.index("1. Client latency") < text.index("3. Cold start")
    assert table.data["cold.first"]["met"] is False        # median 300 ms, < 300 ms
    assert table.data["client.ratio.alt"]["met"] is False  # median of 3.0 and 2.5
    assert re.search(r"agent/floor +2\.75 x +range 2\.50–3\.00 +2 +≤ 2\.0x +NO", text)
    assert stats.pct([1, 2, 3, 4], 50) == 2.5
    assert stats.summary(list(range(8)))["spread"] == "iqr"
    assert stats.summary(list(range(7)))["spread"] == "range"
