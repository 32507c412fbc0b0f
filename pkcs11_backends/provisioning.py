"""Creating a token and its user PIN: what `softhsm/make-token` and the tests use.

PINs travel as bytes from the caller to ``C_InitToken``/``C_InitPIN``, never
through argv (``softhsm2-util --pin`` would show them to every local user).
"""

from __future__ import annotations

from pkcs11.constants import TokenFlag

from pkcs11_backends.errors import Pkcs11Error, TokenNotFoundError
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.returns import ReturnValue


def init_token(module: Module, label: str, so_pin: bytes, user_pin: bytes) -> None:
    """Initialise the first uninitialised token with ``label`` and set its user PIN."""
    slots = module.lib.get_slots(token_present=True)
    free = [s for s in slots if not s.get_token().flags & TokenFlag.TOKEN_INITIALIZED]
    if not free:
        raise TokenNotFoundError("no uninitialised token slot is free",
                                 hint="SoftHSM2 always offers one; check the module")
    rv = module.native.init_token(free[0].slot_id, so_pin, label)
    if rv != ReturnValue.OK:
        raise Pkcs11Error(f"C_InitToken failed: {ReturnValue.name_of(rv)}")
    token = module.find_token(TokenSelector(label=label))
    with token.open(rw=True, so_pin=so_pin.decode("utf-8")) as session:
        session.init_pin(user_pin.decode("utf-8"))
