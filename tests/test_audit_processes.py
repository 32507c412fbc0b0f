"""The audit trail shared by processes (the daemon and a CLI run): one chain, no seq twice, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.audit import verify

_WRITER = """
import sys
from pathlib import Path
from agent.audit import AuditTrail, KeyUse
trail = AuditTrail(Path(sys.argv[1]))
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()  # start together, so that the appends interleave
for n in range(int(sys.argv[2])):
    trail.record(KeyUse(0, 1, "pkcs11:object=k", "sign", "PS256", b"x", "ok", f"{sys.argv[3]}-{n}"))
trail.close()
"""


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "300", name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for name in ("a", "b")]
    for writer in writers:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.close()
    for writer in writers:
        assert writer.wait(timeout=120) == 0

    assert verify(path) == (600, [])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, 601))
    ids = [r["interaction_id"] for r in records]
    assert sorted(ids) == sorted(f"{name}-{n}" for name in ("a", "b") for n in range(300))
    # Each writer's own records stay in its order.
    assert [i for i in ids if i.startswith("a-")] == [f"a-{n}" for n in range(300)]
