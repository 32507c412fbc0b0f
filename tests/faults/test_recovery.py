"""The token disappears (SoftHSM2's token directory moved away) and comes back while
requests flow: callers get a clear error meanwhile and service resumes without a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent


def test_token_removed_and_restored_recovers_in_place(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    tokens = tmp_path / "softhsm" / "tokens"
    worker = subprocess.Popen([sys.executable, str(HERE / "recovery_worker.py"), str(tmp_path), "6"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    tokens.rename(tokens.with_name("tokens.away"))
    time.sleep(2.0)
    tokens.with_name("tokens.away").rename(tokens)
    out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0
    report = json.loads(out.strip().splitlines()[-1])

    outcomes = report["outcomes"]
    assert set(outcomes) == {"ok", "unavailable"}, outcomes  # nothing but a clear, typed error
    assert outcomes["unavailable"] > 0 and outcomes["ok"] > 0
    assert any("unavailable" in m or "stopped answering" in m for m in report["messages"])
    assert {"ready", "unavailable"} <= set(report["states"])
    assert report["recoveries"] >= 1
    assert report["final_ok"] and report["final_state"] == "ready"
