"""Every operation of the agent, in one list: read this to know what the agent can do.

Adding an operation is declaring one :class:`~agent.operations.spec.Spec` in its group's module and listing the
module here; the socket gets it through a route (agent/daemon/routing.py), the CLI through its command.
"""

from __future__ import annotations

from typing import Any

from agent.operations import banks, consents, csr, directory, jws, keys, lifecycle, messages, metrics, rotation
from agent.operations.spec import Spec

SPECS: tuple[Spec[Any], ...] = (*keys.SPECS, *jws.SPECS, *csr.SPECS, *banks.SPECS, *consents.SPECS, *messages.SPECS,
                                *metrics.SPECS, *rotation.SPECS, *lifecycle.SPECS, *directory.SPECS)
BY_NAME: dict[str, Spec[Any]] = {spec.name: spec for spec in SPECS}
assert len(BY_NAME) == len(SPECS), "operation names are unique"
