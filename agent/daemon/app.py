"""The running agent's state: config, policy, token, audit; start-up checks, reload, health.

READY=1 waits for :meth:`Agent.preflight`: login, every configured key found, its
certificate (if any) matching the key, and a canary signature verified in software.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from agent import audit as audit_module
from agent import sections as sections_module
from agent.audit import AuditTrail
from agent.config import Config, KeyConfig, KeyPurpose, pin_reader
from agent.daemon.http import new_interaction_id
from agent.daemon.policy import Policy
from agent.daemon.settings import DaemonSettings
from agent.errors import AgentError
from agent.lifecycle.readiness import transport_certificate_problems
from agent.log import get_logger
from agent.operations.core import Core, Readiness
from agent.runtime import Runtime
from agent.sections import Sections
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import KeyKind, SignatureScheme
from pkcs11_backends.probe import count_private_keys

if TYPE_CHECKING:
    from agent.metrics.instruments import Metrics

log = get_logger("tpp-agent.daemon")
_DEFAULT_SCHEME = {KeyKind.RSA: SignatureScheme.RSA_PSS_SHA256, KeyKind.EC: SignatureScheme.ECDSA_SHA256}

__all__ = ["Agent", "Readiness", "StartupCheckError", "verify_in_software"]


class StartupCheckError(AgentError):
    hint = "fix the key or certificate on the token, or the [keys] section, then restart the agent"


class Agent:
    def __init__(self, sections: Sections, settings: DaemonSettings, runtime: Runtime, audit: AuditTrail,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.audit = audit
        self.metrics = metrics  # this process's, kept across reloads (each core counts into them)
        self.readiness = Readiness(False, "start-up checks not run yet")
        self._reload_lock = threading.Lock()
        self._use(sections)

    def _use(self, sections: Sections) -> None:
        """Serve ``sections``: its policy, and a core (banks with their token caches) built for it."""
        self.sections = sections
        self.runtime.keys.aliases = dict(sections.config.aliases)
        # Every signature in this process goes through the core's audited signer, the canary's included.
        self.core = Core(sections, self.runtime, lambda: self.audit, lambda: self.readiness, self.metrics)
        self.core.rotation.refresh()  # the keys a rotation switched to, as the shared state says

    @property
    def config(self) -> Config:
        return self.sections.config

    @property
    def policy(self) -> Policy:
        return self.sections.policy

    # -- start-up ------------------------------------------------------------
    def preflight(self) -> str:
        """Run the start-up checks; raise on the first failure; return a one-line status."""
        self.runtime.pool.start()
        store = self.runtime.keys
        seen: dict[str, str] = {}
        for alias, key in self.config.keys.items():
            info = store.info(alias)
            other = seen.setdefault(str(info.uri), alias)
            if other != alias:  # two URIs for one key object: each alias would lend it its purpose
                raise StartupCheckError(f"[keys.{alias}] and [keys.{other}] name the same key on the token "
                                        f"({info.uri})", hint="give each key one [keys.NAME] entry")
            spki = store.public_key_info(alias).dump()
            if info.certificate is not None:
                cert_spki = info.certificate.parsed["tbs_certificate"]["subject_public_key_info"].dump()
                if cert_spki != spki:
                    raise StartupCheckError(f"certificate {info.certificate.label!r} stored for key {alias!r} "
                                            "does not match the key's public key")
            with audit_module.on_behalf_of(os.getuid(), os.getpid(), "canary", new_interaction_id()):
                if key.purpose is KeyPurpose.ENCRYPTION:  # it cannot sign: it decrypts a canary instead
                    self._decryption_canary(alias, spki)
                    continue
                scheme = self.scheme_for(key, info.spec.kind)
                canary = b"tpp-agent canary " + os.urandom(16)
                signature = self.core.signer.sign(alias, canary, scheme)
            if not verify_in_software(spki, signature, canary, scheme):
                raise StartupCheckError(f"canary signature of key {alias!r} ({scheme.jose_name}) does not verify")
        status = f"token {self.config.pkcs11.token!r} logged in, {len(self.config.keys)} key(s) checked"
        self.readiness = self._certificate_readiness(status)
        return status

    def _decryption_canary(self, alias: str, spki: bytes) -> None:
        """An encryption key decrypts what was encrypted to its public half (and its module's route is probed)."""
        public = serialization.load_der_public_key(spki)
        if not isinstance(public, rsa.RSAPublicKey):
            raise StartupCheckError(f"encryption key {alias!r} is not RSA: JWE RSA-OAEP-256 needs an RSA key")
        canary = os.urandom(32)
        sealed = public.encrypt(canary, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        if self.core.signer.decrypt_oaep_sha256(alias, sealed) != canary:
            raise StartupCheckError(f"canary decryption of key {alias!r} (RSA-OAEP-256) gave other bytes back")

    @staticmethod
    def scheme_for(key: KeyConfig, kind: KeyKind) -> SignatureScheme:
        for name in key.algorithms:
            scheme = SignatureScheme.from_jose(name)
            if scheme.kind is kind:
                return scheme
        return _DEFAULT_SCHEME[kind]

    # -- SIGHUP --------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the whole config and the certificates; a config with any problem is refused, the old one kept.

        The token session (and login) stays as it is."""
        with self._reload_lock:
            old = self.sections
            try:
                sections = sections_module.load(str(old.path) if old.path else None)
                new_settings = DaemonSettings.parse(sections.config, str(self.settings.socket))
            except AgentError as exc:
                log.error("reload_failed", error=str(exc), hint=exc.hint)
                return
            config = sections.config
            if (config.pkcs11.module, config.pkcs11.token) != (old.config.pkcs11.module, old.config.pkcs11.token):
                log.warning("reload_needs_restart", reason="[pkcs11] module or token changed; kept the old ones")
            if new_settings != self.settings:
                log.warning("reload_needs_restart", reason="[daemon] settings change on restart only")
            old_core = self.core
            self._use(sections)
            old_core.close()
            self.runtime.pool.set_pin_source(pin_reader(config.pkcs11))
            try:
                status = self.preflight()
            except (AgentError, Pkcs11Error) as exc:
                log.error("reload_rejected", error=str(exc), hint=exc.hint)
                self.core.close()
                self._use(old)
                self.preflight()
                return
            log.info("reloaded", status=status)

    # -- health --------------------------------------------------------------
    def health_check(self) -> Readiness:
        """Ask the token something real; stale handles start the pool's recovery. Follow rotation steps that
        other processes and hosts took (agent/rotation/view.py)."""
        self.core.rotation.refresh()
        if self.audit.cut:  # no key use until an operator restarts the agent (agent/audit.py)
            self.readiness = Readiness(False, self.audit.cut)
            return self.readiness
        try:
            count = count_private_keys(self.runtime.pool, expect_some=bool(self.config.keys))
        except (Pkcs11Error, AgentError) as exc:
            self.readiness = Readiness(False, f"token check failed: {exc}")
            return self.readiness
        if self.runtime.pool.health.ready:
            readiness = self._certificate_readiness(f"token answers ({count} private keys)")
            if not (readiness.ready and self.readiness.ready):  # a ready agent keeps its start-up detail
                self.readiness = readiness
        return self.readiness

    def _certificate_readiness(self, ready_detail: str) -> Readiness:
        """Not ready while a bank's transport certificate cannot be presented (expired, not yet valid, missing).

        Asked at start-up, at a reload and at each health check; ``GET /v1/ready`` reads the answer kept here,
        so the token is asked once per health interval, however often readiness is polled."""
        problems = transport_certificate_problems(self.runtime, self.sections.banks)
        if problems:
            return Readiness(False, "; ".join(problems))
        return Readiness(True, ready_detail)


def verify_in_software(spki_der: bytes, signature: bytes, data: bytes, scheme: SignatureScheme) -> bool:
    public = serialization.load_der_public_key(spki_der)
    digest: hashes.HashAlgorithm = hashes.SHA384() if scheme.hash_name == "sha384" else hashes.SHA256()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            pad = (padding.PSS(padding.MGF1(hashes.SHA256()), 32) if scheme is SignatureScheme.RSA_PSS_SHA256
                   else padding.PKCS1v15())
            public.verify(signature, data, pad, digest)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            half = len(signature) // 2
            der = utils.encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                             int.from_bytes(signature[half:], "big"))
            public.verify(der, data, ec.ECDSA(digest))
        else:
            return False
    except InvalidSignature:
        return False
    return True
