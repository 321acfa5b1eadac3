"""Smoke test of the benchmark harness: ``bench/run.py --quick`` runs end to end and
prints its table.  No timing is asserted: the numbers of a quick run mean nothing."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
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
