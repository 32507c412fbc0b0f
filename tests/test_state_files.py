"""State files as root meets them in a directory another user owns, whatever the umask; no core dumps."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import files
from agent.errors import ExitStatus
from tests.conftest import Token

NOBODY = 65534
TPP_AGENT = str(Path(sys.executable).parent / "tpp-agent")
KEY = "pkcs11:object=transport"
SIGNER = f'[keys.signer]\nuri = "{KEY}"\n'  # JWS needs a configured key (with its purpose: jws by default)


@pytest.fixture
def signing_token(token: Token) -> Token:
    token.cli("keys", "generate", "--label", "transport", "--type", "ec:p256", check=True)
    return token


def _sign_direct(token: Token, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TPP_AGENT_CONFIG": str(token.config_path)}
    return subprocess.run([TPP_AGENT, "--direct", "sign-jws", "--key", KEY, "--payload", "-"], input="{}",
                          capture_output=True, text=True, env=env, timeout=120, check=False,
                          umask=-1 if umask is None else umask)


def test_root_does_not_follow_a_link_the_state_dirs_owner_planted_as_the_audit_trail(signing_token: Token,
                                                                                    tmp_path: Path) -> None:
    state = tmp_path / "agent-state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)  # the agent's user owns its state directory
    victim = tmp_path / "root-only"
    victim.write_text("root's file\n")
    os.symlink(victim, state / "audit.jsonl")  # what that user can plant for root's next CLI run
    signing_token.write_config(f'[daemon]\naudit_file = "{state / "audit.jsonl"}"\n{SIGNER}')

    refused = _sign_direct(signing_token)
    assert refused.returncode == ExitStatus.CANTCREAT and refused.stdout == ""
    assert f"cannot open the audit trail {state / 'audit.jsonl'}: audit.jsonl is a symbolic link" in refused.stderr
    assert victim.read_text() == "root's file\n"


def test_a_state_directory_that_is_a_link_is_refused(signing_token: Token, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").symlink_to(elsewhere)
    signing_token.write_config(f'[daemon]\naudit_file = "{tmp_path / "state" / "audit.jsonl"}"\n{SIGNER}')
    refused = _sign_direct(signing_token)
    assert refused.returncode == ExitStatus.CANTCREAT and "is a symbolic link, not a directory" in refused.stderr
    assert list(elsewhere.iterdir()) == []


def test_the_audit_trail_and_its_directory_are_private_whatever_the_umask(signing_token: Token,
                                                                          tmp_path: Path) -> None:
    trail = tmp_path / "new" / "state" / "audit.jsonl"
    signing_token.write_config(f'[daemon]\naudit_file = "{trail}"\n{SIGNER}')
    signed = _sign_direct(signing_token, umask=0)
    assert signed.returncode == 0, signed.stderr
    assert stat.S_IMODE(trail.stat().st_mode) == 0o600
    assert stat.S_IMODE(trail.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_files_helpers_refuse_links_hard_links_and_world_writable_directories(tmp_path: Path) -> None:
    os.umask(0o000)
    try:
        fd = files.open_in(tmp_path / "d" / "f", os.O_RDWR | os.O_CREAT)
    finally:
        os.umask(0o022)
    os.close(fd)
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o600
    os.link(tmp_path / "d" / "f", tmp_path / "d" / "second-name")
    with pytest.raises(files.UnsafePathError, match="single name"):
        files.open_in(tmp_path / "d" / "f", os.O_RDONLY)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    with pytest.raises(files.UnsafePathError, match="every user may write"):
        files.open_in(open_to_all / "f", os.O_RDWR | os.O_CREAT)
    open_to_all.chmod(0o1777)  # /tmp-like: the sticky bit keeps others from replacing our names
    os.close(files.open_in(open_to_all / "f", os.O_RDWR | os.O_CREAT))


def _others_may_run(path: Path) -> bool:
    """Whether a user with no claim on the checkout (nobody) can reach and run ``path``."""
    real = path.resolve()
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents) and bool(
        real.stat().st_mode & stat.S_IXOTH)


@pytest.mark.skipif(not _others_may_run(Path(TPP_AGENT)), reason="the checkout is private to its owner (under /root?): "
                                                                  "nobody cannot run its tpp-agent")
def test_no_tpp_agent_process_can_dump_core_or_be_read_by_its_user(tmp_path: Path) -> None:
    # A CLI waiting for its payload on stdin, run as an unprivileged user: the kernel makes a process that is
    # not dumpable root's in /proc, so its own user can neither ptrace it nor read its memory.
    proc = subprocess.Popen([TPP_AGENT, "sign-jws", "--key", KEY, "--payload", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=NOBODY, group=NOBODY,
                            cwd="/", env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    try:
        deadline = time.monotonic() + 60
        while os.stat(f"/proc/{proc.pid}/mem").st_uid != 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None
        assert os.stat(f"/proc/{proc.pid}/mem").st_uid == 0  # not dumpable
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert [line.split()[-3:] for line in limits.splitlines() if line.startswith("Max core file size")] == [
            ["0", "0", "bytes"]]
    finally:
        proc.kill()
        proc.wait()


def test_the_unit_file_allows_no_core() -> None:
    unit = (Path(__file__).resolve().parent.parent / "packaging" / "systemd" / "tpp-agent.service").read_text()
    assert "\nLimitCORE=0\n" in unit
