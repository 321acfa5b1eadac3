"""Fuzzing in CI: the atheris target tests/fuzz_frames.py for a fixed time budget.

atheris comes with the .venv-pypi pass (``pip install '.[test,fuzz]'``); Debian 12
does not package it, so the .venv-debian pass skips this with its reason.  Run it
longer by hand: ``.venv-pypi/bin/python tests/fuzz_frames.py -max_total_time=600 DIR``.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BUDGET_S = 20
TARGET = Path(__file__).with_name("fuzz_frames.py")

try:
    import atheris
except ImportError:
    atheris = None


@pytest.mark.skipif(atheris is None, reason="atheris runs in the .venv-pypi pass (not "
                    "packaged in Debian 12)")
def test_fuzz_frame_decoding_and_verification(tmp_path):
    corpus = tmp_path / "corpus"
    # -timeout: one input may take 5 s before libFuzzer calls it a hang (a crash), so
    # the subprocess timeout only guards against libFuzzer itself hanging.
    result = subprocess.run(
        [sys.executable, str(TARGET), f"-max_total_time={BUDGET_S}", "-rss_limit_mb=1024",
         "-timeout=5", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=BUDGET_S + 15)
    done = re.search(r"^Done (\d+) runs in (\d+) second", result.stderr, re.MULTILINE)
    runs = int(done.group(1)) if done else 0
    report = (f"fuzz_frames: {runs} executions in {done.group(2) if done else '?'} s, "
              f"{len(list(corpus.iterdir()))} corpus files")
    print(report)
    assert result.returncode == 0, f"{report}\n{result.stderr[-3000:]}"
    assert runs > 0, f"{report}\n{result.stderr[-3000:]}"
