"""Why a rotation step was refused: it is not its turn, or its time has not come. Nothing was changed."""

from __future__ import annotations

from agent.errors import AgentError


class RotationStepError(AgentError):
    """The step does not follow from the rotation's state (not started, already done, wrong kind of key)."""

    hint = "see where the rotation stands with `tpp-agent rotate status`"


class RotationWindowError(AgentError):
    """Too early: banks may still cache a JWKS without the kid the switch would sign with."""

    hint = "run it again once the window has passed ([rotation] jwks_cache_window)"

    def __init__(self, message: str, hint: str | None = None, *, retry_after: float = 0.0) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after  # seconds: the socket's Retry-After
