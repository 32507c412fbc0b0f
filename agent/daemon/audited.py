"""Key uses the daemon makes on a caller's behalf are attributed to the socket peer that asked.

The audited store and bank-call observer live in :mod:`agent.audit` (the CLI uses them too); an endpoint names
its caller with :func:`on_behalf_of`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from agent import audit
from agent.daemon.http import Request


def on_behalf_of(request: Request, operation: str) -> AbstractContextManager[None]:
    """Attribute the key uses made inside the block to ``request``'s peer, ``operation`` and interaction id."""
    return audit.on_behalf_of(request.peer.uid, request.peer.pid, operation, request.interaction_id)
