"""The running agent's state: config, policy, token, audit; start-up checks, reload, health.

READY=1 waits for :meth:`Agent.preflight`: login, every configured key found, its
certificate (if any) matching the key, and a canary signature verified in software.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import TokenNotPresent

from agent import config as config_module
from agent.audit import AuditedBankCalls, AuditedKeyStore, AuditTrail, KeyUse
from agent.config import Config, KeyConfig, pin_reader
from agent.daemon.policy import Policy
from agent.daemon.settings import DaemonSettings
from agent.errors import AgentError
from agent.log import get_logger
from agent.openfinance.service import OpenFinance
from agent.runtime import Runtime
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import KeyKind, SignatureScheme
from pkcs11_backends.sessions import PooledSession

log = get_logger("tpp-agent.daemon")
_DEFAULT_SCHEME = {KeyKind.RSA: SignatureScheme.RSA_PSS_SHA256, KeyKind.EC: SignatureScheme.ECDSA_SHA256}


class StartupCheckError(AgentError):
    hint = "fix the key or certificate on the token, or the [keys] section, then restart the agent"


@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: str


class Agent:
    def __init__(self, config: Config, settings: DaemonSettings, runtime: Runtime, audit: AuditTrail) -> None:
        self.config = config
        self.settings = settings
        self.policy = Policy.parse(config.section("policy"))
        self.runtime = runtime
        self.audit = audit
        # The token's keys for flows that sign deep inside (JWS, assertions, CSRs, /sign): every signature audited.
        # One instance, so its parsed key names are cached across requests (reset when the aliases change).
        self.signer = AuditedKeyStore(runtime.keys, audit)
        self.openfinance = self._banks(config)
        self.readiness = Readiness(False, "start-up checks not run yet")
        self._reload_lock = threading.Lock()

    def _banks(self, config: Config) -> OpenFinance:
        """Banks (transports, token clients with their caches) for ``config``; JWTs signed through the audit."""
        return OpenFinance(self.runtime, config, keys=self.signer, observer=AuditedBankCalls(self.audit))

    def _use_aliases(self, config: Config) -> None:
        self.runtime.keys.aliases = dict(config.aliases)
        self.signer.aliases = dict(config.aliases)

    @property
    def keys(self) -> dict[str, KeyConfig]:
        return dict(self.config.keys)

    # -- start-up ------------------------------------------------------------
    def preflight(self) -> str:
        """Run the start-up checks; raise on the first failure; return a one-line status."""
        self.runtime.pool.start()
        store = self.runtime.keys
        for alias, key in self.config.keys.items():
            info = store.info(alias)
            spki = store.public_key_info(alias).dump()
            if info.certificate is not None:
                cert_spki = info.certificate.parsed["tbs_certificate"]["subject_public_key_info"].dump()
                if cert_spki != spki:
                    raise StartupCheckError(f"certificate {info.certificate.label!r} stored for key {alias!r} "
                                            "does not match the key's public key")
            scheme = self.scheme_for(key, info.spec.kind)
            canary = b"tpp-agent canary " + os.urandom(16)
            signature = store.sign(alias, canary, scheme)
            self.audit.record(KeyUse(os.getuid(), os.getpid(), key.uri, "canary", scheme.jose_name, canary, "ok",
                                     str(uuid.uuid4())))
            if not verify_in_software(spki, signature, canary, scheme):
                raise StartupCheckError(f"canary signature of key {alias!r} ({scheme.jose_name}) does not verify")
        status = f"token {self.config.pkcs11.token!r} logged in, {len(self.config.keys)} key(s) checked"
        self.readiness = Readiness(True, status)
        return status

    @staticmethod
    def scheme_for(key: KeyConfig, kind: KeyKind) -> SignatureScheme:
        for name in key.algorithms:
            scheme = SignatureScheme.from_jose(name)
            if scheme.kind is kind:
                return scheme
        return _DEFAULT_SCHEME[kind]

    # -- SIGHUP --------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the config and certificates; the token session (and login) stays as it is."""
        with self._reload_lock:
            old_config, old_policy = self.config, self.policy
            try:
                config = config_module.load(str(old_config.path) if old_config.path else None)
                new_settings = DaemonSettings.parse(config, str(self.settings.socket))
                policy = Policy.parse(config.section("policy"))
            except AgentError as exc:
                log.error("reload_failed", error=str(exc), hint=exc.hint)
                return
            if (config.pkcs11.module, config.pkcs11.token) != (old_config.pkcs11.module, old_config.pkcs11.token):
                log.warning("reload_needs_restart", reason="[pkcs11] module or token changed; kept the old ones")
            if new_settings != self.settings:
                log.warning("reload_needs_restart", reason="[daemon] settings change on restart only")
            self.config, self.policy = config, policy
            self._use_aliases(config)
            old_banks, self.openfinance = self.openfinance, self._banks(config)
            old_banks.close()
            self.runtime.pool.set_pin_source(pin_reader(config.pkcs11))
            try:
                status = self.preflight()
            except (AgentError, Pkcs11Error) as exc:
                log.error("reload_rejected", error=str(exc), hint=exc.hint)
                self.config, self.policy = old_config, old_policy
                self._use_aliases(old_config)
                self.openfinance = self._banks(old_config)
                self.preflight()
                return
            log.info("reloaded", status=status)

    # -- health --------------------------------------------------------------
    def health_check(self) -> Readiness:
        """Ask the token something real; stale handles start the pool's recovery."""
        def probe(pooled: PooledSession) -> int:
            count = len(list(pooled.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
            if count == 0 and self.config.keys:
                # SoftHSM2 lists nothing once its token directory is gone, where an HSM would say
                # TOKEN_NOT_PRESENT: treat it the same, so that the pool's recovery starts.
                raise TokenNotPresent("the token lists no private key, but keys are configured")
            return count

        if self.audit.cut:  # no key use until an operator restarts the agent (agent/audit.py)
            self.readiness = Readiness(False, self.audit.cut)
            return self.readiness
        try:
            count = self.runtime.pool.call(probe)
        except (Pkcs11Error, AgentError) as exc:
            self.readiness = Readiness(False, f"token check failed: {exc}")
        else:
            if not self.readiness.ready and self.runtime.pool.health.ready:
                self.readiness = Readiness(True, f"token answers ({count} private keys)")
        return self.readiness


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
