"""Registration with every configured bank at once (``register --all``): admins only, one line of result per bank.

Each bank goes through the same registrar as ``register BANK``: a bank whose current transport certificate is
registered at its current registration endpoint is sent nothing; the others are registered. A failure at one
bank (an expired certificate, a refusal, a timeout) is that bank's line; the others go on.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, TypedDict

from agent.errors import AgentError, exit_status
from agent.operations.banks import BankAnswer, RegistrationAnswer
from agent.operations.core import Context
from agent.operations.spec import Access, Operation, Resource, Spec
from pkcs11_backends.errors import Pkcs11Error

REGISTERED, ALREADY, FAILED = "registered", "already registered", "failed"


class RegisteredBank(RegistrationAnswer):
    outcome: Annotated[Literal["registered", "already registered"], "already registered: nothing was sent"]


class FailedBank(TypedDict):
    """A bank where the registration failed: the others went on."""

    bank: str
    outcome: Literal["failed"]
    error: Annotated[str, "what went wrong, on one line"]
    hint: Annotated[str, "what to do about it (empty when there is nothing to add)"]
    exit_status: Annotated[int, "the CLI's exit status for this error (sysexits)"]


class RegisterAllAnswer(BankAnswer):
    banks: Annotated[list[RegisteredBank | FailedBank], "one per configured bank, by name"]
    failed: Annotated[int, "how many banks failed"]


@dataclasses.dataclass(frozen=True)
class RegisterAllInput:
    force: bool = False


def register_all(context: Context, given: RegisterAllInput) -> dict[str, Any]:
    banks = context.core.banks
    results: list[dict[str, Any]] = []
    for name in sorted(context.core.sections.banks):
        try:
            result = banks.registrar(name).register(force=given.force).as_dict()
        except (AgentError, Pkcs11Error) as exc:
            results.append({"bank": name, "outcome": FAILED, "error": str(exc), "hint": exc.hint or "",
                            "exit_status": int(exit_status(exc))})
            continue
        results.append({**result, "outcome": ALREADY if result["already_registered"] else REGISTERED})
    return {"banks": results, "failed": sum(1 for r in results if r["outcome"] == FAILED)}


SPECS: tuple[Spec[Any], ...] = (
    Spec("register_all", Operation.REGISTER_ALL, "register with every configured bank not registered yet (admins only)",
         Resource.NONE, RegisterAllInput, register_all, access=Access.ADMIN, calls_bank=True,
         result=RegisterAllAnswer),
)
