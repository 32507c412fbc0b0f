"""PIN safety: a wrong PIN is tried once; a token one try from lockout is never tried."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import read_pin_file
from pkcs11_backends.errors import PinIncorrectError, PinLockedError
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.sessions import PoolState, SessionPool
from tests.conftest import Token
from tests.faults.conftest import Shim

CKF_USER_PIN_FINAL_TRY = 1 << 17
CKF_USER_PIN_LOCKED = 1 << 18


def shim_pool(shim: Shim, token: Token, pin_file: Path) -> SessionPool:
    os.environ.update(shim.environment())
    return SessionPool(Module.load(str(shim.path)), TokenSelector(label=token.label), lambda: read_pin_file(pin_file))


def wrong_pin_file(tmp_path: Path) -> Path:
    path = tmp_path / "wrong.pin"
    path.write_text("00000000\n")
    path.chmod(0o600)
    return path


def test_wrong_pin_is_tried_once_and_never_again(token: Token, shim: Shim, tmp_path: Path) -> None:
    pool = shim_pool(shim, token, wrong_pin_file(tmp_path))
    with pytest.raises(PinIncorrectError, match="tried once"):
        pool.start()
    for _ in range(3):
        with pytest.raises(PinIncorrectError), pool.session():
            pass
    assert shim.counts()["logins"] == 1
    assert pool.health.state is PoolState.PIN_REFUSED

    # A new PIN source (what SIGHUP does after the operator fixes the file) lifts the refusal.
    pool.set_pin_source(lambda: read_pin_file(token.user_pin_file))
    with pool.session() as pooled:
        assert pooled.session is not None
    assert shim.counts()["logins"] == 2
    assert pool.health.ready
    pool.close()


@pytest.mark.parametrize("flag,message", [(CKF_USER_PIN_FINAL_TRY, "one user PIN try left"),
                                          (CKF_USER_PIN_LOCKED, "is locked")])
def test_final_try_or_locked_pin_is_not_spent(token: Token, shim: Shim, flag: int, message: str) -> None:
    shim.set(flags=flag)
    pool = shim_pool(shim, token, token.user_pin_file)
    with pytest.raises(PinLockedError, match=message):
        pool.start()
    with pytest.raises(PinLockedError), pool.session():
        pass
    assert shim.counts()["logins"] == 0
    assert pool.health.state is PoolState.PIN_REFUSED
