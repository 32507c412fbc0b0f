"""The one error the HTTP layers raise: answered as JSON ``{"code", "message", "hint", "interaction_id"}``
(and ``bank_interaction_id`` when a bank answered with an id other than ours: agent/interaction.py)."""

from __future__ import annotations


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str = "",
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.hint = hint
        self.headers = headers
        self.bank_interaction_id: str | None = None
