"""What discovery and registration need from the transport: one HTTP exchange with a bank.

The production implementation is the token-backed mTLS pool in ``agent.transport``;
failures below HTTP arrive as ``agent.transport.errors.TransportError`` subclasses,
which already name the bank, the URL and the interaction id.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from agent.transport.client import AnswerLimit


class BankResponse(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def body(self) -> bytes: ...

    @property
    def interaction_id(self) -> str: ...  # the one sent

    @property
    def bank_interaction_id(self) -> str | None: ...  # the bank's, when it is another


class BankHttp(Protocol):
    def request(self, method: str, url: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None,
                limit: AnswerLimit = "max_response_bytes") -> BankResponse:
        """``limit`` names the [banks.NAME] setting that bounds the answer's size."""


class LimitedBankHttp(BankHttp, Protocol):
    """A transport that also lends one of the bank's places for requests in flight (``max_in_flight``)."""

    def slot(self, what: str = "-", interaction_id: str = "-") -> AbstractContextManager[None]:
        """For a caller that must wait (for another's answer) before it sends: the wait counts as a request."""
