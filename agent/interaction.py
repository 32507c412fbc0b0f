"""The interaction id of the operation being run: one id from the caller to the bank and back.

The rule (docs/api.md, "Interaction ids"): an operation runs under the caller's ``x-fapi-interaction-id`` when it
sent a UUID, else under a new one (the socket refuses one that is not a UUID); the CLI's in-process path makes one
per command. That id is sent as ``x-fapi-interaction-id`` on every request the operation makes to a bank (its
discovery fetch, registration, token, PAR or forwarded call alike), is the ``interaction_id`` of its answer and of
its error, and of every audit record it writes. FAPI asks a bank to echo it; a bank that answers with another id
has that one reported beside ours as ``bank_interaction_id`` (the last one, when the operation called the bank more
than once), never instead of it.

:func:`serving` opens the scope (``agent.operations.core.execute`` does, for every operation); the bank transport
(``agent.openfinance.service.ObservedTransport``) sends :func:`current`'s id and notes what the bank answered.
"""

from __future__ import annotations

import contextvars
import dataclasses


@dataclasses.dataclass
class Interaction:
    id: str
    bank_id: str | None = None  # the last id a bank answered with that was not ``id``

    def bank_answered(self, echoed: str | None) -> None:
        if echoed and echoed.lower() != self.id.lower():
            self.bank_id = echoed


# The operation being run in this thread (a context variable, as the audit trail's caller is): bank calls deep in
# discovery, tokens or registration see it without each signature passing it down.
_current: contextvars.ContextVar[Interaction | None] = contextvars.ContextVar("tpp_agent_interaction",
                                                                             default=None)


class serving:  # lower case: used as a function; a class rather than a generator, as every request enters one
    """``with serving(interaction_id) as served:`` runs the block as that interaction."""

    __slots__ = ("_reset", "_served")

    def __init__(self, interaction_id: str) -> None:
        self._served = Interaction(interaction_id)

    def __enter__(self) -> Interaction:
        self._reset = _current.set(self._served)
        return self._served

    def __exit__(self, *_: object) -> None:
        _current.reset(self._reset)


def current() -> Interaction | None:
    return _current.get()
