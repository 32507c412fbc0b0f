"""The agent's error hierarchy. Each error says what went wrong and, in ``hint``, what to do."""

from __future__ import annotations


class AgentError(Exception):
    hint: str = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


# sysexits.h EX_CONFIG: the exit status of `tpp-agent serve` for a bad configuration or a refused PIN.
EX_CONFIG = 78


class ConfigError(AgentError):
    hint = "fix the configuration file (see config.example.toml)"


class PinSourceError(AgentError):
    hint = "set [pkcs11] pin_file to a file only the agent can read (mode 0600), or use a systemd credential"


class InputError(AgentError):
    """A user-supplied value (subject, certificate file, key name…) is malformed."""
