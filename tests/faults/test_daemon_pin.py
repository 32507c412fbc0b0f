"""PIN safety through ``tpp-agent serve``: one wrong try then exit 78 (no restart, no retry);
a token at its final PIN try or locked is refused before any login."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import Token
from tests.daemon.conftest import TPP_AGENT, keyed_token, public_dir  # noqa: F401 -- fixtures
from tests.faults.conftest import Shim
from tests.faults.test_daemon_faults import shim_daemon_config
from tests.faults.test_pin_safety import CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True, text=True,
                          timeout=60, check=False)


def test_wrong_pin_is_tried_once_then_the_daemon_exits_78(keyed_token: Token, public_dir: Path,  # noqa: F811
                                                          shim: Shim, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("999999\n")
    wrong.chmod(0o600)
    config = shim_daemon_config(keyed_token, public_dir, shim)
    text = config.read_text()
    config.write_text(text.replace(next(x for x in text.splitlines() if x.startswith("pin_file")),
                                   f'pin_file = "{wrong}"'))
    result = serve(config)
    assert result.returncode == 78 and "wrong user PIN" in result.stderr and "999999" not in result.stderr
    assert shim.counts()["logins"] == 1


@pytest.mark.parametrize("flag,words", [(CKF_USER_PIN_FINAL_TRY, "one user PIN try left"),
                                        (CKF_USER_PIN_LOCKED, "is locked")])
def test_final_try_or_locked_pin_is_refused_at_start_without_a_login(keyed_token: Token, public_dir: Path,  # noqa: F811
                                                                     shim: Shim, flag: int, words: str) -> None:
    shim.set(flags=flag)
    result = serve(shim_daemon_config(keyed_token, public_dir, shim))
    assert result.returncode == 78 and words in result.stderr
    assert shim.counts()["logins"] == 0
