"""A real question to the token, for the agent's periodic health check: how many private keys it lists."""

from __future__ import annotations

from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import TokenNotPresent

from pkcs11_backends.sessions import PooledSession, SessionPool


def count_private_keys(pool: SessionPool, expect_some: bool) -> int:
    """The token's private keys; with ``expect_some``, none counts as the token being away.

    SoftHSM2 lists nothing once its token directory is gone, where an HSM would say TOKEN_NOT_PRESENT: treated
    the same, so that the pool's recovery starts.
    """
    def probe(pooled: PooledSession) -> int:
        count = len(list(pooled.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
        if count == 0 and expect_some:
            raise TokenNotPresent("the token lists no private key, but keys are configured")
        return count

    return pool.call(probe)
