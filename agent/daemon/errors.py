"""The one error the HTTP layers raise: answered as JSON ``{"code", "message", "hint", "interaction_id"}``."""

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
