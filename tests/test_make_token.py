"""softhsm/make_token.py: runs with the distribution's python3 (hands over to .venv), and a run that fails
leaves nothing it wrote behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "softhsm" / "make_token.py"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="no /usr/bin/python3")
@pytest.mark.parametrize("how", [["/usr/bin/python3", str(SCRIPT)], [str(SCRIPT)]])
def test_the_system_python3_and_the_shebang_make_a_token(tmp_path: Path, how: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"  # the distribution's python3, without python-pkcs11
    made = subprocess.run([*how, "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, env=env,
                          cwd="/", timeout=120, check=False)
    assert made.returncode == 0, made.stderr
    assert "created token 'tpp-agent'" in made.stdout and "Traceback" not in made.stderr
    home = tmp_path / "s" / "softhsm"
    assert oct((home / "user.pin").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([*how, "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, env=env,
                           cwd="/", timeout=120, check=True)
    assert "already exists" in again.stdout


def _make_token_in_process(state: Path, label: str) -> subprocess.CompletedProcess[str]:
    """make_token() itself, past the command line's own label check, in a process of its own."""
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(SCRIPT.parent)!r}]; from pathlib import Path; "
            f"import make_token; make_token.make_token(Path({str(state)!r}), {label!r})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_a_failed_run_removes_what_it_wrote(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    failed = _make_token_in_process(state, "x" * 40)  # C_InitToken takes at most 32 bytes
    assert failed.returncode != 0 and "at most 32 bytes" in failed.stderr
    assert not state.exists()


def test_a_failed_run_keeps_what_was_there(tmp_path: Path) -> None:
    state = tmp_path / "used"
    subprocess.run([sys.executable, str(SCRIPT), "--state-dir", str(state), "--label", "first"], check=True,
                   capture_output=True, timeout=120)
    before = tree(state)
    assert _make_token_in_process(state, "y" * 40).returncode != 0
    assert tree(state) == before


def test_a_label_too_long_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--state-dir", str(tmp_path / "s"), "--label", "z" * 33],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "a token label is 1 to 32 bytes" in result.stderr
    assert not (tmp_path / "s").exists()
