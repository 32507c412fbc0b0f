"""Health checks of an installation: what ``tpp-agent doctor`` runs, in dependency order.

Each check gives ``ok``, ``warn`` or ``FAIL`` with what was seen and what to do;
a check whose prerequisite failed is reported as ``skip``. The PIN is tried at
most once (the session pool never retries a refused PIN). A FAIL carries the exit status of
its kind of failure (agent/errors.py), so ``doctor`` exits as the failing command would.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Callable, Iterator

from agent.cli.context import CliContext
from agent.config import Config
from agent.errors import AgentError, ExitStatus, exit_status
from agent.lifecycle.readiness import transport_certificate_problems
from agent.x509.certificates import days_left
from agent.x509.signatures import same_public_key
from pkcs11_backends import openssl
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import KeyInfo, KeyStore
from pkcs11_backends.module import TokenSelector


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""
    exit_status: ExitStatus | None = None  # a FAIL's kind of failure: what doctor exits with

    def __post_init__(self) -> None:
        assert (self.status is Status.FAIL) == (self.exit_status is not None), "a FAIL says what kind it is"

    def as_dict(self) -> dict[str, object]:
        return {"check": self.name, "status": self.status.value, "detail": self.detail, "hint": self.hint,
                "exit_status": self.exit_status}


def failed(name: str, detail: str, hint: str, kind: ExitStatus) -> Check:
    return Check(name, Status.FAIL, detail, hint, kind)


def verdict(checks: list[Check]) -> ExitStatus:
    """The first FAIL's exit status (the checks run in dependency order: the first is the cause), else OK."""
    return next((c.exit_status for c in checks if c.exit_status is not None), ExitStatus.OK)


def _attempt(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, Status.OK, probe())
    except (AgentError, Pkcs11Error) as exc:
        return failed(name, str(exc), exc.hint, exit_status(exc))


def run(ctx: CliContext, now: datetime.datetime | None = None) -> list[Check]:
    return list(_checks(ctx, now or datetime.datetime.now(datetime.UTC)))


def _checks(ctx: CliContext, now: datetime.datetime) -> Iterator[Check]:
    config = _attempt("config", lambda: f"loaded {ctx.sections.path or 'built-in defaults'}, every section checked")
    yield config
    yield _attempt("pyopenssl", _linkage)
    yield _openssl_backend(ctx.config.pkcs11.openssl_backend if config.status is Status.OK else "auto")
    token_checks = ("module", "token", "pin", "keys")
    if config.status is not Status.OK:
        yield from (Check(name, Status.SKIP, "needs a valid config") for name in token_checks)
        return
    runtime = ctx.runtime
    steps: tuple[tuple[str, Callable[[], str]], ...] = (
        ("module", lambda: f"{runtime.module.path} ({runtime.module.description})"),
        ("token", lambda: _token(ctx)),
        ("pin", lambda: _login(ctx)),
    )
    for position, (name, probe) in enumerate(steps):
        check = _attempt(name, probe)
        yield check
        if check.status is Status.FAIL:
            yield from (Check(later, Status.SKIP, f"needs a working {name}") for later in token_checks[position + 1:])
            return
    yield _attempt("mechanisms", lambda: _mechanisms(runtime.keys))
    yield from _key_checks(runtime.keys, ctx.config, ctx.sections.certificates.expiry_warning_days, now)
    if ctx.sections.banks:
        yield _bank_certificates(ctx, now)


def _bank_certificates(ctx: CliContext, now: datetime.datetime) -> Check:
    """What keeps a running agent from being ready: a bank whose transport certificate cannot be presented."""
    problems = transport_certificate_problems(ctx.runtime, ctx.sections.banks, now)
    if problems:
        return failed("bank certificates", "; ".join(problems),
                      "import a valid certificate for the bank's client_key with `tpp-agent cert import` or "
                      "`tpp-agent directory certs import`; the agent is not ready until then", ExitStatus.CONFIG)
    return Check("bank certificates", Status.OK,
                 f"every bank's transport certificate can be presented ({len(ctx.sections.banks)} bank(s))")


def _mechanisms(store: KeyStore) -> str:
    """How each algorithm will be signed, as probed from the module (never assumed)."""
    return store.capabilities.summary()


def _operations(store: KeyStore, key: KeyInfo, wanted: tuple[str, ...] = ()) -> Check | None:
    """A check naming what the module cannot do with this key, if anything (FAIL for a configured algorithm)."""
    missing = [scheme.jose_name for scheme in store.capabilities.missing(key.spec.kind, key.spec.bits)]
    if not missing:
        return None
    configured = [name for name in missing if name in wanted]
    status = Status.FAIL if configured else Status.WARN
    return Check(f"key {key.label} operations", status,
                 f"the module cannot make {', '.join(missing)} with this {key.spec} key",
                 "use an algorithm the module offers (see the mechanisms check) or a key type it supports",
                 ExitStatus.CONFIG if configured else None)  # the configuration asks for what cannot be made


def _linkage() -> str:
    link = openssl.check_linkage()
    return f"{link.version} from {link.libssl}"


def _login(ctx: CliContext) -> str:
    ctx.runtime.pool.start()
    return "user login succeeded"


def _openssl_backend(preference: str) -> Check:
    engine, provider = openssl.find_engine(), openssl.find_provider()
    found = ", ".join(f"{kind} {path}" for kind, path in (("engine", engine), ("provider", provider)) if path)
    wanted = {"engine": engine, "provider": provider}.get(preference, engine or provider)
    if wanted is None:
        missing = {"engine": "the PKCS#11 engine (libp11) is", "provider": "pkcs11-provider is"}.get(
            preference, "neither the PKCS#11 engine (libp11) nor pkcs11-provider is")
        return failed("openssl-pkcs11", f"{missing} installed (found: {found or 'nothing'})",
                      "apt-get install libengine-pkcs11-openssl (or pkcs11-provider on Debian 13), "
                      "or set [pkcs11] openssl_backend to what is installed", ExitStatus.UNAVAILABLE)
    return Check("openssl-pkcs11", Status.OK, found)


def _token(ctx: CliContext) -> str:
    token = ctx.runtime.module.find_token(TokenSelector.parse(ctx.config.pkcs11.token))
    serial = token.serial.decode("ascii", "replace").strip()
    return f"{token.label!r} serial {serial} ({token.manufacturer_id.strip()} {token.model.strip()})"


def _key_checks(store: KeyStore, config: Config, warn_days: int, now: datetime.datetime) -> Iterator[Check]:
    try:
        keys = store.list()
    except (AgentError, Pkcs11Error) as exc:
        yield failed("keys", str(exc), exc.hint, exit_status(exc))
        return
    if not keys:
        yield Check("keys", Status.WARN, "the token holds no key pair",
                    "create one with `tpp-agent keys generate --label transport --type rsa:2048`")
    for key in keys:
        yield _key_check(store, key, now, warn_days)
    for alias in sorted(config.aliases):
        try:
            info = store.info(alias)
            yield Check(f"alias {alias}", Status.OK, f"names key {info.label!r}")
        except (AgentError, Pkcs11Error) as exc:
            yield failed(f"alias {alias}", str(exc), f"fix [keys.{alias}] uri in the config", ExitStatus.CONFIG)
            continue
        unable = _operations(store, info, config.keys[alias].algorithms)
        if unable is not None and unable.status is Status.FAIL:  # a configured algorithm the module cannot make
            yield dataclasses.replace(unable, name=f"alias {alias} operations")
    for key in keys:
        unable = _operations(store, key)
        if unable is not None:
            yield unable


def _key_check(store: KeyStore, key: KeyInfo, now: datetime.datetime, warn_days: int) -> Check:
    name = f"key {key.label}"
    cert = key.certificate
    if cert is None:
        return Check(name, Status.WARN, f"{key.spec} key has no certificate",
                     f"make a CSR (`tpp-agent csr --key pkcs11:object={key.label} ...`), have the directory "
                     f"sign it, then `tpp-agent cert import --key pkcs11:object={key.label} FILE`")
    if not same_public_key(cert.parsed.public_key, store.public_key_info(str(key.uri))):
        return failed(name, f"certificate {cert.subject} stored with this key is for another key",
                      "import the right certificate with `tpp-agent cert import --replace`", ExitStatus.DATAERR)
    left = days_left(cert, now)
    until = f"{cert.not_after:%Y-%m-%d}"
    renew = "make a new CSR, have the directory issue a certificate, and import it"
    if left < 0:
        return failed(name, f"certificate expired on {until}", renew, ExitStatus.DATAERR)  # as a bank call would
    if now < cert.not_before:
        return Check(name, Status.WARN, f"certificate is not valid before {cert.not_before:%Y-%m-%d %H:%M} UTC",
                     "check the system clock")
    if left < warn_days:
        return Check(name, Status.WARN, f"certificate expires on {until} ({left:.0f} days left)", renew)
    return Check(name, Status.OK, f"{key.spec}, certificate valid until {until} ({left:.0f} days left)")
