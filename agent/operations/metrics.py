"""The agent's own metrics, in the Prometheus text format: a policy operation of its own (``metrics``).

Through the socket the scrape covers every serving process; in the CLI's own process (``--direct``) it shows what
that process sees: the token's certificates and session pool, no request counts.
"""

from __future__ import annotations

from typing import Any

from agent.metrics import sampler
from agent.operations.core import Context
from agent.operations.inputs import Nothing
from agent.operations.spec import Operation, Resource, Spec


def scrape(context: Context, _: Nothing) -> str:
    core = context.core
    # The daemon's sampler reads the certificates on the token; a scrape there never does (agent/metrics).
    return sampler.scrape(core, certificates=not core.metrics.sampled).decode("utf-8")


SPECS: tuple[Spec[Any], ...] = (
    Spec("metrics", Operation.METRICS, "the agent's metrics (Prometheus text format)", Resource.NONE, Nothing, scrape,
         result=str),
)
