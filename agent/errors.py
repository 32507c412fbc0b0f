"""The agent's error hierarchy. Each error says what went wrong and, in ``hint``, what to do.

Every command's exit status comes from the error that ended it, by :data:`EXIT_STATUS` (sysexits(3) style;
the table users read is docs/cli.md, and a test keeps the two equal).
"""

from __future__ import annotations

import enum


class AgentError(Exception):
    hint: str = ""
    bank_interaction_id: str | None = None  # the bank answered with an id other than ours (agent/interaction.py)

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ExitStatus(enum.IntEnum):
    """The exit status of every ``tpp-agent`` command, by the kind of failure (sysexits.h numbers)."""

    description: str

    def __new__(cls, value: int, description: str) -> ExitStatus:
        member = int.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    OK = 0, "success"
    FAILURE = 1, "a failure no other status classifies"
    USAGE = 64, "EX_USAGE: the command line is wrong (unknown command or option, missing argument)"
    DATAERR = 65, "EX_DATAERR: a value given is malformed (subject, certificate, pkcs11: URI, JSON, claims)"
    NOINPUT = 66, "EX_NOINPUT: what was named does not exist (a key on the token)"
    UNAVAILABLE = 69, "EX_UNAVAILABLE: the HSM (module, token, session) or the running agent cannot be used"
    SOFTWARE = 70, "EX_SOFTWARE: the agent failed inside (a bug: please report it)"
    CANTCREAT = 73, "EX_CANTCREAT: the audit trail or the token cannot take what must be written"
    TEMPFAIL = 75, "EX_TEMPFAIL: the bank is unreachable or did not answer in time (the outcome may be unknown)"
    PROTOCOL = 76, "EX_PROTOCOL: the bank refused (4xx, our client certificate) or answered outside the protocol"
    NOPERM = 77, "EX_NOPERM: the agent's policy refused this caller"
    CONFIG = 78, "EX_CONFIG: the configuration is wrong, or the PIN it names (systemd does not restart on it)"
    INTERRUPTED = 130, "interrupted (SIGINT, 128 + 2)"
    BROKEN_PIPE = 141, "the reader of stdout went away (| head): 128 + SIGPIPE, as if killed by it"


# sysexits.h EX_CONFIG: the exit status of `tpp-agent serve` for a bad configuration or a refused PIN.
EX_CONFIG = ExitStatus.CONFIG

# By class, named "module.Class" so that this module imports none of them (they all import it); the most
# specific class in an error's MRO wins. tests/test_exit_status.py checks every name exists and every error
# class of the code base falls under a row other than AgentError's.
EXIT_STATUS: dict[str, ExitStatus] = {
    "agent.errors.AgentError": ExitStatus.FAILURE,
    "agent.errors.ConfigError": ExitStatus.CONFIG,
    "agent.errors.PinSourceError": ExitStatus.CONFIG,
    "agent.errors.InputError": ExitStatus.DATAERR,
    "agent.client.AgentUnavailableError": ExitStatus.UNAVAILABLE,
    "agent.client.AgentRequestError": ExitStatus.FAILURE,  # by the answer's code: AGENT_CODES
    "agent.daemon.listener.SocketSetupError": ExitStatus.CONFIG,
    "agent.files.UnsafePathError": ExitStatus.CONFIG,
    "agent.daemon.policy.PolicyDenied": ExitStatus.NOPERM,
    "agent.operations.errors.PolicyDenied": ExitStatus.NOPERM,
    "agent.operations.errors.KeyPurposeError": ExitStatus.NOPERM,
    "agent.operations.errors.UnknownKeyError": ExitStatus.NOINPUT,
    "agent.operations.errors.NotReadyError": ExitStatus.UNAVAILABLE,
    "agent.daemon.app.StartupCheckError": ExitStatus.CONFIG,
    "agent.jose.errors.JoseError": ExitStatus.DATAERR,
    "agent.jose.errors.KidError": ExitStatus.CONFIG,
    "agent.jose.errors.JwksError": ExitStatus.PROTOCOL,  # the bank's JWKS is unfetchable, oversized or not JSON
    "agent.x509.csr.CsrSignatureError": ExitStatus.SOFTWARE,
    "agent.transport.errors.TlsSetupError": ExitStatus.CONFIG,
    "agent.transport.errors.TransportError": ExitStatus.TEMPFAIL,
    "agent.transport.errors.TlsError": ExitStatus.PROTOCOL,
    "agent.transport.errors.ResponseTooLargeError": ExitStatus.PROTOCOL,
    "agent.transport.errors.ServerUntrustedError": ExitStatus.CONFIG,
    "agent.transport.errors.HostnameMismatchError": ExitStatus.CONFIG,
    "agent.openfinance.registration.RegistrationError": ExitStatus.PROTOCOL,
    "agent.openfinance.registration.BankServerError": ExitStatus.TEMPFAIL,
    "agent.openfinance.registration.RegistrationOutcomeUnknownError": ExitStatus.TEMPFAIL,
    "agent.openfinance.discovery.DiscoveryError": ExitStatus.PROTOCOL,
    "agent.openfinance.tokens.TokenError": ExitStatus.PROTOCOL,
    "agent.openfinance.consent.ConsentFlowError": ExitStatus.DATAERR,  # the redirect given cannot complete a consent
    "agent.openfinance.consent.AuthorizationDeniedError": ExitStatus.PROTOCOL,  # the bank said no
    "agent.openfinance.consent.TokenAnswerError": ExitStatus.PROTOCOL,
    "agent.audit.AuditError": ExitStatus.CANTCREAT,
    "agent.directory.client.DirectoryError": ExitStatus.PROTOCOL,
    "agent.directory.client.DirectoryServerError": ExitStatus.TEMPFAIL,
    "agent.state.store.StateError": ExitStatus.CANTCREAT,
    "agent.state.store.SchemaTooNewError": ExitStatus.CONFIG,
    "agent.state.rotation.RotationConflictError": ExitStatus.TEMPFAIL,
    "agent.rotation.errors.RotationStepError": ExitStatus.FAILURE,  # not this step's turn: see rotate status
    "agent.rotation.errors.RotationWindowError": ExitStatus.TEMPFAIL,  # its time comes: a timer may retry
    "pkcs11_backends.errors.Pkcs11Error": ExitStatus.FAILURE,
    "pkcs11_backends.errors.ModuleLoadError": ExitStatus.CONFIG,
    "pkcs11_backends.errors.TokenNotFoundError": ExitStatus.UNAVAILABLE,
    "pkcs11_backends.errors.TokenUnavailableError": ExitStatus.UNAVAILABLE,
    "pkcs11_backends.errors.TokenOperationError": ExitStatus.UNAVAILABLE,
    "pkcs11_backends.errors.ModuleLimitError": ExitStatus.CONFIG,
    "pkcs11_backends.errors.KeyTemplateError": ExitStatus.DATAERR,
    "pkcs11_backends.errors.PinError": ExitStatus.CONFIG,
    "pkcs11_backends.errors.UriError": ExitStatus.DATAERR,
    "pkcs11_backends.errors.KeyNotFoundError": ExitStatus.NOINPUT,
    "pkcs11_backends.errors.AmbiguousKeyError": ExitStatus.DATAERR,
    "pkcs11_backends.errors.DuplicateKeyError": ExitStatus.DATAERR,
    "pkcs11_backends.errors.KeySpecError": ExitStatus.DATAERR,
    "pkcs11_backends.errors.MechanismError": ExitStatus.DATAERR,
    "pkcs11_backends.errors.CertificateStoreError": ExitStatus.CANTCREAT,
    "pkcs11_backends.decryption.DecryptionError": ExitStatus.DATAERR,
    "pkcs11_backends.openssl.OpenSSLLinkageError": ExitStatus.UNAVAILABLE,
    "pkcs11_backends.openssl.OpenSSLKeyError": ExitStatus.UNAVAILABLE,
    "pkcs11_backends.openssl.OpenSSLBackendError": ExitStatus.UNAVAILABLE,
}

# A running agent's error answers (their stable ``code``), so that a command exits the same through the agent as
# with --direct.
AGENT_CODES: dict[str, ExitStatus] = {
    "forbidden": ExitStatus.NOPERM,
    "algorithm_not_allowed": ExitStatus.NOPERM,
    "key_purpose": ExitStatus.NOPERM,
    "bad_input": ExitStatus.DATAERR,
    "bad_field": ExitStatus.DATAERR,
    "bad_query": ExitStatus.DATAERR,
    "missing_field": ExitStatus.DATAERR,
    "unsupported_algorithm": ExitStatus.DATAERR,
    "claims_refused": ExitStatus.DATAERR,
    "jose_refused": ExitStatus.DATAERR,
    "key_not_found": ExitStatus.NOINPUT,
    "unknown_key": ExitStatus.NOINPUT,
    "token_unavailable": ExitStatus.UNAVAILABLE,
    "token_error": ExitStatus.UNAVAILABLE,
    "not_ready": ExitStatus.UNAVAILABLE,
    "token_login_refused": ExitStatus.CONFIG,
    "unknown_bank": ExitStatus.CONFIG,
    "config_error": ExitStatus.CONFIG,
    "audit_unavailable": ExitStatus.CANTCREAT,
    "bank_unreachable": ExitStatus.TEMPFAIL,
    "bank_timeout": ExitStatus.TEMPFAIL,
    "bank_busy": ExitStatus.TEMPFAIL,
    "bank_answer_too_large": ExitStatus.PROTOCOL,
    "registration_outcome_unknown": ExitStatus.TEMPFAIL,
    "discovery_failed": ExitStatus.PROTOCOL,
    "registration_failed": ExitStatus.PROTOCOL,
    "bank_refused": ExitStatus.PROTOCOL,
    "invalid_grant": ExitStatus.PROTOCOL,
    "id_token_refused": ExitStatus.PROTOCOL,
    "token_answer_invalid": ExitStatus.PROTOCOL,
    "authorization_denied": ExitStatus.PROTOCOL,
    "unknown_state": ExitStatus.DATAERR,
    "callback_expired": ExitStatus.DATAERR,
    "issuer_mismatch": ExitStatus.DATAERR,
    "bad_callback": ExitStatus.DATAERR,
    "state_in_use": ExitStatus.DATAERR,
    "consent_flow_refused": ExitStatus.DATAERR,
    "directory_refused": ExitStatus.PROTOCOL,
    "directory_failed": ExitStatus.TEMPFAIL,
    "internal_error": ExitStatus.SOFTWARE,
    "bad_idempotency_key": ExitStatus.DATAERR,
    "replayed": ExitStatus.DATAERR,
    "bad_signature": ExitStatus.DATAERR,
    "unknown_kid": ExitStatus.DATAERR,
    "expired": ExitStatus.DATAERR,
    "not_yet_valid": ExitStatus.DATAERR,
    "wrong_issuer": ExitStatus.DATAERR,
    "wrong_audience": ExitStatus.DATAERR,
    "claim_rejected": ExitStatus.DATAERR,
    "algorithm_refused": ExitStatus.DATAERR,
    "wrong_recipient": ExitStatus.DATAERR,
    "undecryptable": ExitStatus.DATAERR,
    "malformed": ExitStatus.DATAERR,
    "bank_jwks_unusable": ExitStatus.PROTOCOL,
    "rotation_step": ExitStatus.FAILURE,
    "rotation_window": ExitStatus.TEMPFAIL,
    "rotation_conflict": ExitStatus.TEMPFAIL,
    "state_unavailable": ExitStatus.CANTCREAT,
}


def exit_status(error: BaseException) -> ExitStatus:
    """The exit status for ``error``: its own ``code`` if a running agent sent it, else its class's row."""
    code = getattr(error, "code", None)
    if isinstance(code, str) and code in AGENT_CODES:
        return AGENT_CODES[code]
    for cls in type(error).__mro__:
        status = EXIT_STATUS.get(f"{cls.__module__}.{cls.__qualname__}")
        if status is not None:
            return status
    return ExitStatus.FAILURE


class ConfigError(AgentError):
    hint = "fix the configuration file (see config.example.toml)"


class PinSourceError(AgentError):
    hint = "set [pkcs11] pin_file to a file only the agent can read (mode 0600), or use a systemd credential"


class InputError(AgentError):
    """A user-supplied value (subject, certificate file, key name…) is malformed."""
