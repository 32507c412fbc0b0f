"""Errors raised by the PKCS#11 layer.

Every error carries a ``hint``: what the operator should do about it. The CLI and the
daemon print ``str(error)`` and the hint; nothing else is needed to act on a failure.
"""

from __future__ import annotations


class Pkcs11Error(Exception):
    """Base of every error this package raises."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ModuleLoadError(Pkcs11Error):
    hint = "check [pkcs11] module in the config: it must be the path of a PKCS#11 shared library"


class TokenNotFoundError(Pkcs11Error):
    hint = "list the tokens with `pkcs11-tool --module MODULE -L` and set [pkcs11] token to a label or serial:NNN"


class TokenUnavailableError(Pkcs11Error):
    """The token or module stopped answering (removed, restarted, stale handles)."""

    hint = "check that the HSM is reachable; the agent reconnects by itself when it is back"


class TokenOperationError(Pkcs11Error):
    """The module answered a call with an error that does not mean the token went away (``rv``: its CK_RV)."""

    hint = "the PKCS#11 module refused or failed this operation; its own log may say why (the agent goes on)"

    def __init__(self, message: str, rv: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.rv = rv


class ModuleLimitError(Pkcs11Error):
    """The configuration needs more of the module than it allows (sessions)."""

    hint = "lower [pkcs11] max_sessions or [daemon] processes to what the module allows"


class TokenTimeoutError(TokenUnavailableError):
    """A PKCS#11 call did not return in time; the pool refuses new calls until it does."""

    hint = "the HSM is not answering; check it and its connection (calls resume by themselves when it does)"


class PinError(Pkcs11Error):
    """Base of the login failures; none of them is ever retried automatically."""


class PinIncorrectError(PinError):
    hint = "fix the PIN in the pin file or credential; the agent does not retry, to protect the token from lockout"


class PinLockedError(PinError):
    hint = "the user PIN is locked (or one try from it): the security officer must reset it before the agent logs in"


class UriError(Pkcs11Error):
    hint = "name keys as pkcs11:token=T;object=LABEL;type=private (RFC 7512) or by a configured alias"


class KeyNotFoundError(Pkcs11Error):
    hint = "run `tpp-agent keys list` to see the keys on the token"


class AmbiguousKeyError(Pkcs11Error):
    hint = "add id=%XX.. to the pkcs11: URI, or give each key a distinct label"


class DuplicateKeyError(Pkcs11Error):
    hint = "pick another --label (and --id), or use the existing key"


class KeySpecError(Pkcs11Error):
    hint = "use one of rsa:2048, rsa:3072, rsa:4096, ec:p256, ec:p384"


class KeyTemplateError(Pkcs11Error):
    hint = "the module refused the key's attributes: make the key with the module's own tool and name it by label"


class MechanismError(Pkcs11Error):
    hint = "the key type does not support this signature algorithm"


class CertificateStoreError(Pkcs11Error):
    hint = "check that the token is writable and has free space"
