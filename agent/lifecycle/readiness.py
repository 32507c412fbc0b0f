"""Whether every bank's transport certificate may be presented now: what the daemon's readiness adds.

A bank whose certificate is expired, not yet valid, or missing cannot be called (the TLS layer refuses to
present it); an agent in that state is not ready, and says for which bank and why. One certificate lookup per
bank on the token (or one file read for ``client_certificate``): cheap enough for the periodic health check.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from agent.errors import AgentError
from agent.lifecycle.validity import validity_problem
from agent.openfinance.banks import BankConfig
from agent.runtime import Runtime
from agent.transport.tls import client_chain
from pkcs11_backends.errors import Pkcs11Error


def transport_certificate_problems(runtime: Runtime, banks: Mapping[str, BankConfig],
                                   now: datetime.datetime | None = None) -> list[str]:
    """One line per bank whose transport certificate cannot be presented at ``now``; empty when all can."""
    problems = []
    for name, bank in sorted(banks.items()):
        try:
            certificate = client_chain(runtime, bank.tls)[0]
        except (AgentError, Pkcs11Error) as exc:
            problems.append(f"bank {name!r}: {exc}")
            continue
        problem = validity_problem(certificate, now)
        if problem is not None:
            problems.append(f"bank {name!r}: the transport certificate {certificate.subject.rfc4514_string()} is "
                            f"{problem}")
    return problems
