"""Fuzzing in CI: the atheris target tests/fuzz_frames.py for a fixed time budget.

atheris is a test dependency of the .venv-pypi pass (``pip install '.[test,fuzz]'``);
Debian 12 does not package it, so the .venv-debian pass skips this with its reason.
Run it longer by hand: ``.venv-pypi/bin/python tests/fuzz_frames.py -max_total_time=600 DIR``.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BUDGET_S = 20
TARGET = Path(__file__).with_name("fuzz_frames.py")

try:
    import atheris  # noqa: F401
except ImportError:
    atheris = None


@pytest.mark.skipif(atheris is None, reason="atheris is not installed here: it runs in "
                    "the .venv-pypi pass (Debian 12 does not package it)")
def test_fuzz_frame_decoding_and_verification(tmp_path):
    corpus = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, str(TARGET), f"-max_total_time={BUDGET_S}", "-rss_limit_mb=1024",
         "-timeout=5", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=BUDGET_S + 60)
    done = re.search(r"Done (\d+) runs in (\d+) second", result.stderr)
    report = (f"fuzz_frames: {done.group(1) if done else '?'} executions in "
              f"{done.group(2) if done else '?'} s, corpus {len(list(corpus.iterdir()))}")
    print(report)
    assert result.returncode == 0, result.stderr[-3000:]
    assert done and int(done.group(1)) > 1000, report
    assert not list(tmp_path.glob("crash-*")), report
