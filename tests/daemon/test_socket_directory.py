"""The socket's directory: a shared one (/tmp) gets the hint of a directory of the agent's own, never a chmod of
/tmp; the agent's own directory left group-writable gets the chmod."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.daemon.listener import SocketSetupError, bind_unix
from agent.errors import ExitStatus
from tests.conftest import Token


def test_a_socket_in_tmp_is_refused_with_a_directory_of_its_own_as_the_hint(token: Token) -> None:
    result = token.cli("serve", "--socket", "/tmp/tpp-agent-test.sock")
    assert result.returncode == ExitStatus.CONFIG, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    [hint] = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
    assert "socket directory /tmp" in error
    assert "chmod" not in hint and "/tmp/tpp-agent/tpp-agent-test.sock" in hint, hint
    assert not Path("/tmp/tpp-agent-test.sock").exists()


def refused_hint(directory: Path, mode: int) -> str:
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(SocketSetupError) as refused:
        bind_unix(directory / "agent.sock", None, 0o660)
    return refused.value.hint


def test_the_suggested_directory_works(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    hint = refused_hint(shared, 0o1777)
    suggested = shared / "tpp-agent" / "agent.sock"
    assert "chmod" not in hint and str(suggested) in hint
    bind_unix(suggested, None, 0o660).close()
    assert oct(suggested.parent.stat().st_mode & 0o777) == "0o750"


def test_the_agents_own_group_writable_directory_gets_the_chmod(tmp_path: Path) -> None:
    own = tmp_path / "run"
    assert refused_hint(own, 0o770) == f"chmod 0750 {own}"
    own.chmod(0o750)
    bind_unix(own / "agent.sock", None, 0o660).close()
    assert os.path.exists(own / "agent.sock")
