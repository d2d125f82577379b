"""A short atheris run over the decoders (tests/fuzz_targets.py) under a memory cap."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris has no build for this platform")

RUNS = int(os.environ.get("IMMUCORE_FUZZ_RUNS", "20000"))


def test_decoders_survive_coverage_guided_fuzzing(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(here))
    done = subprocess.run(
        [sys.executable, os.path.join(here, "fuzz_targets.py"), f"-runs={RUNS}",
         "-rss_limit_mb=1024", "-max_len=4096", "-seed=1", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done" in done.stderr
