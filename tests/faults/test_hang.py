"""A PKCS#11 call that hangs: the caller's wait is bounded, others fail fast, service resumes by itself."""

from __future__ import annotations

import os
import time

import pytest

from agent.config import read_pin_file
from pkcs11_backends.errors import TokenTimeoutError
from pkcs11_backends.keys import KeySpec, KeyStore, SignatureScheme
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.sessions import PoolState, SessionPool
from tests.conftest import Token
from tests.faults.conftest import Shim


def test_hung_sign_is_bounded_and_the_pool_resumes_when_it_returns(token: Token, shim: Shim) -> None:
    os.environ.update(shim.environment())
    pool = SessionPool(Module.load(str(shim.path)), TokenSelector(label=token.label),
                       lambda: read_pin_file(token.user_pin_file), call_timeout=0.5)
    keys = KeyStore(pool)
    uri = keys.generate("hang", KeySpec.parse("ec:p256")).uri
    assert len(keys.sign(uri, b"before", SignatureScheme.ECDSA_SHA256)) == 64

    shim.set(hang_sign=1)
    with pytest.raises(TokenTimeoutError, match=r"did not answer within 0\.5s"):
        keys.sign(uri, b"hangs", SignatureScheme.ECDSA_SHA256)
    assert pool.health.state is PoolState.HUNG
    # While the HSM still hangs, a new call is refused at once instead of queueing behind it.
    with pytest.raises(TokenTimeoutError, match="not answering"):
        keys.sign(uri, b"refused", SignatureScheme.ECDSA_SHA256)
    assert shim.control.read_text() == "hang_sign=1\n"

    shim.set()
    deadline = time.monotonic() + 10
    while not pool.health.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.health.ready and pool.health.recoveries == 1
    assert len(keys.sign(uri, b"after", SignatureScheme.ECDSA_SHA256)) == 64
    pool.close()
