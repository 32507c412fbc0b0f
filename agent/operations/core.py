"""What every operation runs against, and the one preamble that runs it: :func:`execute`.

The socket's router checks the caller's grant first (:mod:`agent.daemon.routing`); the CLI's in-process path
calls :func:`execute` directly for the operator. Either way the input is parsed strictly, the key or bank must
be configured, the key's purpose must allow the operation, and key uses inside are audited for the caller.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from agent import audit, interaction
from agent.audit import AuditedBankCalls, AuditedKeyStore, AuditTrail
from agent.config import Config, KeyConfig
from agent.directory.service import Directory
from agent.errors import AgentError
from agent.openfinance.banks import BankConfig, find_bank
from agent.openfinance.service import BankCallObservers, OpenFinance
from agent.operations import inputs
from agent.operations.errors import KeyPurposeError, UnknownKeyError
from agent.operations.spec import Operation, Resource, Spec
from agent.rotation.view import RotationView
from agent.runtime import Runtime
from agent.sections import Sections
from pkcs11_backends.keys import KeyStore

if TYPE_CHECKING:
    from agent.metrics.instruments import Metrics

In = TypeVar("In")


@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str


class Caller(NamedTuple):
    """Who asked: the audit trail's uid, pid and interaction id."""

    uid: int
    pid: int
    interaction_id: str


class Grants(Protocol):
    """What the caller may do beyond the operation it asked for (typed JWS asks; listings filter by it)."""

    def allows(self, operation: Operation, key: str | None = None, bank: str | None = None) -> bool: ...

    def scopes(self, operation: Operation, bank: str) -> frozenset[str] | None: ...  # None: any scope

    def named(self) -> bool: ...  # a rule names the caller: it may learn more than yes or no


class Operator:
    """The operator running the CLI on the token itself: no socket policy applies, key purposes still do."""

    def allows(self, operation: Operation, key: str | None = None, bank: str | None = None) -> bool:
        return True

    def scopes(self, operation: Operation, bank: str) -> frozenset[str] | None:
        return None

    def named(self) -> bool:
        return True


class Core:
    """The typed configuration, the token's keys, the one audited signer and the banks, shared by operations.

    ``audit`` is called on first use of a key: reading public halves needs no audit trail (a CLI user who may
    not write it can still list keys). There is no other signer: every signature goes through :attr:`signer`.
    """

    def __init__(self, sections: Sections, runtime: Runtime, audit_trail: Callable[[], AuditTrail],
                 readiness: Callable[[], Readiness] | None = None, metrics: Metrics | None = None) -> None:
        self.sections = sections
        self.runtime = runtime
        self._audit = audit_trail
        self._readiness = readiness
        if metrics is not None:
            self.metrics = metrics

    @functools.cached_property
    def metrics(self) -> Metrics:
        """This process's metrics (the daemon passes its own; the CLI makes them when a command asks)."""
        from agent.metrics.instruments import Metrics  # prometheus_client costs ~40 ms to import: not for every command

        return Metrics()

    @property
    def config(self) -> Config:
        return self.sections.config

    @property
    def keys(self) -> KeyStore:
        """The token's keys, for public halves and certificates (their ``sign`` is the audited signer's job)."""
        return self.runtime.keys

    @functools.cached_property
    def signer(self) -> AuditedKeyStore:
        metrics = self._measured()
        return AuditedKeyStore(self.runtime.keys, self._audit(), timed=metrics.hsm_call if metrics else None)

    @functools.cached_property
    def banks(self) -> OpenFinance:
        signer = self.signer
        audited = AuditedBankCalls(signer.audit)
        metrics = self._measured()
        if metrics is None:
            return OpenFinance(self.runtime, self.sections, signer=signer, observer=audited,
                               transport_key=self.rotation.transport_key)
        return OpenFinance(self.runtime, self.sections, signer=signer, observer=BankCallObservers(audited, metrics),
                           token_lookups=metrics.token_lookup, transport_key=self.rotation.transport_key)

    def _measured(self) -> Metrics | None:
        """The metrics that count this core's events: the daemon's (a CLI command counts nothing)."""
        found: Metrics | None = self.__dict__.get("metrics")
        return found

    @functools.cached_property
    def rotation(self) -> RotationView:
        """Which token key each alias names now (agent/rotation): read by whoever builds this core."""
        return RotationView(self.config, self.runtime.keys)

    @functools.cached_property
    def directory(self) -> Directory:
        """The trust framework's directory ([directory]): its certificate API over mTLS, every request audited."""
        return Directory(self.runtime, self.config, AuditedBankCalls(self.signer.audit))

    def readiness(self) -> Readiness:
        if self._readiness is None:
            return Readiness(True, "in-process")
        return self._readiness()

    def key(self, alias: str) -> KeyConfig:
        found = self.config.keys.get(alias)
        if found is None:
            raise UnknownKeyError(f"no key {alias!r} is configured",
                                  hint=f"configured keys: {', '.join(sorted(self.config.keys)) or 'none'}")
        return found

    def bank(self, name: str) -> BankConfig:
        return find_bank(self.sections.banks, name)

    def close(self) -> None:
        if "banks" in self.__dict__:
            self.banks.close()
        if "directory" in self.__dict__:
            self.directory.close()


@dataclasses.dataclass
class Context:
    """One run of one operation: for whom, on what, and where its log fields go."""

    core: Core
    spec: Spec[Any]
    caller: Caller
    grants: Grants
    key: str | None = None
    bank: str | None = None
    visible: tuple[str, ...] = ()  # KEYS resources: the configured keys the caller may see, of fitting purpose
    log: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key_config(self) -> KeyConfig:
        assert self.key is not None, "a KEY operation always has its key"
        return self.core.config.keys[self.key]

    @property
    def bank_name(self) -> str:
        assert self.bank is not None, "a BANK operation always has its bank"
        return self.bank


def execute(core: Core, spec: Spec[In], caller: Caller, grants: Grants, body: Mapping[str, Any], *,
            key: str | None = None, bank: str | None = None, log: dict[str, Any] | None = None,
            from_query: bool = False) -> Any:
    """Parse ``body`` as the operation's input, check its key or bank, and run it with its key uses audited."""
    parsed = inputs.parse(spec.input, body, from_query=from_query)
    core.rotation.follow()  # a step another serving process of this host ran is in force here too
    context = Context(core, spec, caller, grants, key, bank, log=log if log is not None else {})
    if spec.resource is Resource.KEY:
        assert key is not None, f"{spec.name} acts on a key"
        check_purpose(spec, key, core.key(key))
    elif spec.resource is Resource.BANK:
        assert bank is not None, f"{spec.name} acts on a bank"
        core.bank(bank)
    elif spec.resource is Resource.KEYS:
        context.visible = tuple(visible_keys(core, spec, grants))
    with audit.on_behalf_of(caller.uid, caller.pid, spec.operation.value, caller.interaction_id), \
            interaction.serving(caller.interaction_id) as served:
        try:
            result = spec.run(context, parsed)
        except AgentError as exc:
            exc.bank_interaction_id = served.bank_id
            raise
    if spec.calls_bank and isinstance(result, dict):
        # One rule for every bank operation (agent/interaction.py): the answer names the id sent to the bank.
        result = {**result, "interaction_id": caller.interaction_id}
        if served.bank_id is not None:
            result["bank_interaction_id"] = served.bank_id
    return result


def check_purpose(spec: Spec[Any], alias: str, key: KeyConfig) -> None:
    reason = spec.refusal(key.purpose, key.raw_sign) if key.purpose is not None else None
    if reason is not None:
        raise KeyPurposeError(f"key {alias!r} may not be used for {spec.operation.value}: {reason}")


def visible_keys(core: Core, spec: Spec[Any], grants: Grants) -> Iterable[str]:
    for alias, key in core.config.keys.items():
        if grants.allows(spec.operation, key=alias) and (key.purpose is None
                                                          or spec.refusal(key.purpose, key.raw_sign) is None):
            yield alias
