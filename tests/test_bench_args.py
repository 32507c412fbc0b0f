"""`python -m bench` refuses bad settings at once, before any token or daemon is made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args,message", [
    (["--repeat", "0"], "--repeat must be at least 1 (runs per cell), not 0"),
    (["--seconds", "0"], "--seconds must be a positive number of seconds, not 0"),
    (["--seconds", "-2"], "--seconds must be a positive number of seconds, not -2"),
    (["--clients", "1,x"], "--clients must be positive numbers separated by commas (e.g. 1,2,8,32), not '1,x'"),
    (["--clients", "0,8"], "--clients must be positive numbers separated by commas"),
    (["--clients", ""], "--clients must be positive numbers separated by commas"),
    (["--hsm-clients", "8,many"], "--hsm-clients must be positive numbers separated by commas"),
    (["--hsm-delay-us", "-5"], "--hsm-delay-us must be from 0 to 1000000 µs, not -5"),
])
def test_bad_bench_settings_are_refused_at_once(args: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--out", str(tmp_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was run
