"""The rotation steps. Each reads the alias's shared state, checks that the step follows from it, acts, and saves
the new state as a compare-and-set (agent/state/rotation.py): of two hosts taking the same step at once one
wins and the other is told so, with nothing changed.

    start            successor key generated next to the current one (same type), its CSR (the current
                     certificate's subject); an encryption key's is decrypt-only and has none
    import           the successor's certificate on the token: the overlap starts, the JWKS carries both kids
                     (an encryption key's successor may be published without a certificate)
    request          the import, with the certificate the directory's API issues for the successor's CSR
    switch-signing   (jws) the successor signs; only once the banks' JWKS cache window has passed
    switch-transport (tls) one bank: the successor's certificate registered there, then the bank gets it (its
                     cached access tokens, bound to the old certificate, are dropped)
    retire           the old key is marked retired (kept on the token; out of the JWKS). For an encryption key
                     this is the switch: banks can only encrypt to the successor then; the retired key still
                     decrypts the events encrypted to it before
    remove-retired   the retired key's objects removed from this host's token: the one step that deletes (an
                     encryption key's only once [rotation] encryption_drain_window has passed since it retired)

After its save, a step is applied in this process at once (``core.rotation.adopt``); other processes and hosts
follow at their next read of the state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import re
from collections.abc import Iterable, Iterator
from typing import Any

from asn1crypto import x509 as asn1_x509

from agent.config import KeyConfig, KeyPurpose
from agent.directory.client import DirectoryError
from agent.errors import ConfigError
from agent.jose.keys import KID_CERT_THUMBPRINT, KID_JWK_THUMBPRINT, resolve, resolved
from agent.openfinance.banks import BankConfig
from agent.operations.core import Core
from agent.rotation.errors import RotationStepError, RotationWindowError
from agent.rotation.view import (
    bank_label,
    changed_marker,
    current_label,
    label_uri,
    signing_label,
    successor_label,
)
from agent.state import open_state
from agent.state.rotation import (
    CURRENT,
    RETIRED,
    SUCCESSOR,
    BankSwitch,
    RotationConflictError,
    RotationKey,
    RotationLog,
    RotationState,
    now,
)
from agent.transport.errors import TransportError
from agent.x509.certificates import CertificateMismatchError, import_certificate, key_certificates, read_certificates
from agent.x509.csr import build_csr
from agent.x509.signatures import CsrAlgorithm, same_public_key
from agent.x509.subject import parse_subject, rfc4514
from pkcs11_backends.decryption import generate_encryption_key
from pkcs11_backends.errors import DuplicateKeyError, KeyNotFoundError
from pkcs11_backends.keys import KeyInfo
from pkcs11_backends.uri import Pkcs11Uri

_SUFFIX = re.compile(r"^(?P<stem>.*?)(?:\.(?P<n>\d{1,6}))?$")
_MERGE_ATTEMPTS = 5  # a bank's switch re-read and saved again when another host saved another bank's meanwhile
_PUBLISHED = frozenset({KeyPurpose.JWS, KeyPurpose.ENCRYPTION})  # in the JWKS, each key under its own kid


def _log(core: Core) -> RotationLog:
    return RotationLog(open_state(core.config), changed=changed_marker(core.config))


def _when(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp)


def rotatable(core: Core, alias: str) -> KeyConfig:
    """The alias's key, if a rotation can name its keys (by label) and give each its own kid."""
    key = core.key(alias)
    if Pkcs11Uri.parse(key.uri).object is None:
        raise RotationStepError(f"[keys.{alias}] uri names its key by id only: a rotation names keys by label",
                                hint="add object=LABEL to the uri (`tpp-agent keys list` shows the label)")
    if key.purpose in _PUBLISHED and key.kid not in (None, KID_CERT_THUMBPRINT, KID_JWK_THUMBPRINT):
        raise RotationStepError(f"[keys.{alias}] kid = {key.kid!r} is a literal: the successor would publish the "
                                "same kid as the key it replaces", hint='set kid = "x5t#S256" (or "thumbprint"): '
                                                                        "then each key has its own")
    return key


def _under_way(log: RotationLog, alias: str) -> tuple[RotationState, str, str]:
    """The state of a rotation under way: it, its current and its successor label."""
    state = log.get(alias)
    successor = successor_label(state) if state is not None else None
    current = current_label(state) if state is not None else None
    if state is None or successor is None or current is None:
        raise RotationStepError(f"no rotation of key {alias!r} is under way",
                                hint=f"start one with `tpp-agent rotate start {alias}` (it makes the successor "
                                     "key and its CSR)")
    return state, current, successor


def _in_overlap(log: RotationLog, alias: str, *, encryption: bool = False) -> tuple[RotationState, str, str]:
    state, current, successor = _under_way(log, alias)
    if state.overlap_started_at is None and encryption:
        raise RotationStepError(f"{alias!r}'s successor {successor!r} is not published yet",
                                hint=f"publish it: `tpp-agent rotate import {alias}` (with CERT if it is certified)")
    if state.overlap_started_at is None:
        raise RotationStepError(f"the certificate of {alias!r}'s successor {successor!r} is not imported yet",
                                hint=f"import the one issued for its CSR: `tpp-agent rotate import {alias} CERT`")
    return state, current, successor


def _window(core: Core, since: str, what: str) -> None:
    window = core.sections.rotation.jwks_cache_window
    end = _when(since) + datetime.timedelta(seconds=window)
    left = (end - datetime.datetime.now(datetime.UTC)).total_seconds()
    if left > 0:
        raise RotationWindowError(
            f"too early: banks may still use a JWKS they read before {what}, until {end:%Y-%m-%d %H:%M:%S} UTC "
            f"({left:.0f} s from now; [rotation] jwks_cache_window = {window:g} s)", retry_after=left)


def _drained(core: Core, alias: str, retired: RotationKey) -> None:
    """A retired encryption key goes only once no event encrypted to it can still be accepted."""
    window = core.sections.rotation.encryption_drain_window
    end = _when(retired.since) + datetime.timedelta(seconds=window)
    left = (end - datetime.datetime.now(datetime.UTC)).total_seconds()
    if left > 0:
        raise RotationWindowError(
            f"too early: events encrypted to {alias!r}'s retired key {retired.label!r} may still arrive, until "
            f"{end:%Y-%m-%d %H:%M:%S} UTC ({left:.0f} s from now; [rotation] encryption_drain_window = "
            f"{window:g} s)", hint="run it again once the window has passed (nothing was removed)",
            retry_after=left)


def _free_label(core: Core, current: str) -> str:
    """``LABEL.N``: the next number after the current label's that no token object has."""
    found = _SUFFIX.match(current)
    assert found is not None  # the pattern matches any string
    number = int(found["n"] or 1)
    for candidate in range(number + 1, number + 100):
        label = f"{found['stem']}.{candidate}"
        try:
            core.keys.check_free(label)
        except DuplicateKeyError:
            continue
        return label
    raise RotationStepError(f"no free label after {current!r} on the token (tried {number + 1} to {number + 99})",
                            hint="remove retired keys (tpp-agent rotate remove-retired KEY)")


def _banks_of(core: Core, key: KeyConfig) -> list[BankConfig]:
    return [bank for bank in core.sections.banks.values()
            if (named := core.config.key_named(bank.tls.client_key)) is not None and named.alias == key.alias]


def _adopted(core: Core, state: RotationState) -> RotationState:
    core.rotation.adopt(state)
    return state


# -- the steps -------------------------------------------------------------------------------------

def start(core: Core, alias: str, subject: str | None = None, alg: str | None = None) -> dict[str, Any]:
    key = rotatable(core, alias)
    log = _log(core)
    state = log.get(alias)
    if state is not None and successor_label(state) is not None:
        raise RotationStepError(f"a rotation of key {alias!r} is under way: successor {successor_label(state)!r}, "
                                f"made by {state.updated_by}", hint=f"carry it on (`tpp-agent rotate status {alias}` "
                                                                    "says the next step) before starting another")
    label = (current_label(state) if state is not None else None) or Pkcs11Uri.parse(key.uri).object
    assert label is not None  # rotatable: the configured URI names a label
    current_uri = label_uri(core.config, alias, label)
    info = core.keys.info(current_uri)
    if key.purpose is KeyPurpose.ENCRYPTION:
        if subject is not None or alg is not None:
            raise RotationStepError(f"key {alias!r} is an encryption key: its decrypt-only successor cannot sign a "
                                    "CSR, so there is no subject or CSR algorithm to choose",
                                    hint="leave --subject and --alg out")
        return _start_encryption(core, key, log, state, info)
    name = _subject(core, key, current_uri, subject)
    algorithm = CsrAlgorithm.parse(alg) if alg else None
    made = core.keys.generate(_free_label(core, info.label), info.spec)
    with _destroyed_unless_saved(core, made):
        signed = build_csr(core.signer, str(made.uri), name, algorithm)
        saved = _save_successor(log, alias, state, info.label, made.label)
    _adopted(core, saved)
    return {"key": alias, "purpose": str(key.purpose), "current": info.label, "successor": made.label,
            "uri": str(made.uri), "type": str(info.spec), "subject": rfc4514(name), "alg": signed.scheme.jose_name,
            "csr": signed.pem}


def _subject(core: Core, key: KeyConfig, current_uri: str, subject: str | None) -> asn1_x509.Name:
    """The successor CSR's subject: the current certificate's, or (a jws key) the one given."""
    if subject is not None and key.purpose is KeyPurpose.TLS:
        raise RotationStepError("a transport key's successor is certified for the same application: its CSR repeats "
                                "the current certificate's subject", hint="leave the subject out")
    if subject is not None:
        return parse_subject(subject)
    certificate = key_certificates(core.keys, current_uri).current
    if certificate is None:
        raise RotationStepError(f"key {key.alias!r} has no certificate to take the successor's subject from",
                                hint="give the subject, e.g. --subject 'CN=client-id,OU=org-id,O=Name,C=AE'")
    subject_name: asn1_x509.Name = certificate.parsed.subject
    return subject_name


def _start_encryption(core: Core, key: KeyConfig, log: RotationLog, state: RotationState | None,
                      info: KeyInfo) -> dict[str, Any]:
    """An encryption key's successor: decrypt-only, like the key it replaces, so it cannot sign a CSR (a key
    that could would be used for two purposes). Its certificate, if the ecosystem wants one, is issued for its
    public key some other way and imported; else `rotate import KEY` publishes it under its JWK thumbprint."""
    made = generate_encryption_key(core.keys, _free_label(core, info.label), info.spec)
    with _destroyed_unless_saved(core, made):
        saved = _save_successor(log, key.alias, state, info.label, made.label)
    _adopted(core, saved)
    return {"key": key.alias, "purpose": str(key.purpose), "current": info.label, "successor": made.label,
            "uri": str(made.uri), "type": str(info.spec), "subject": None, "alg": None, "csr": None}


@contextlib.contextmanager
def _destroyed_unless_saved(core: Core, made: KeyInfo) -> Iterator[None]:
    """No successor the state does not know of stays on the token."""
    try:
        yield
    except BaseException:
        core.keys.destroy(made.label, made.id)
        raise


def _save_successor(log: RotationLog, alias: str, state: RotationState | None, current: str,
                    successor: str) -> RotationState:
    stamp = now()
    kept = [k for k in state.keys if k.role == RETIRED] if state is not None else []
    since = next((k.since for k in state.keys if k.role == CURRENT), stamp) if state is not None else stamp
    keys = (*kept, RotationKey(current, CURRENT, since), RotationKey(successor, SUCCESSOR, stamp))
    if state is None:
        return log.save(RotationState(alias, keys))
    return log.save(dataclasses.replace(state, keys=keys, overlap_started_at=None, signing_switched_at=None,
                                        banks={}))


def import_successor(core: Core, alias: str, data: bytes | None, source: str) -> dict[str, Any]:
    """``data`` None: an encryption key's successor published without a certificate (under its JWK thumbprint)."""
    key = rotatable(core, alias)
    log = _log(core)
    state, current, successor = _under_way(log, alias)
    current_uri, successor_uri = label_uri(core.config, alias, current), label_uri(core.config, alias, successor)
    if key.purpose is KeyPurpose.ENCRYPTION:
        published = _publishable(core, log, state, successor_uri, data)
        if published is not None:
            return published
    if data is None:
        raise RotationStepError(f"the successor of {alias!r} needs its certificate to be published",
                                hint=f"import the one issued for its CSR: `tpp-agent rotate import {alias} CERT`")
    leaf = read_certificates(data, source)[0]
    if same_public_key(leaf.public_key, core.keys.public_key_info(current_uri)):
        raise CertificateMismatchError(f"the certificate in {source} is the current key's ({current!r}), not its "
                                       f"successor's ({successor!r})",
                                       hint="import the certificate the directory issued for the successor's CSR "
                                            f"(`tpp-agent rotate start {alias}` printed it)")
    if key.purpose is KeyPurpose.TLS:
        _same_application(core, current_uri, leaf.subject, source)
    imported = import_certificate(core.keys, successor_uri, data, source)
    saved = state
    if state.overlap_started_at is None:
        saved = log.save(dataclasses.replace(state, overlap_started_at=now()))
    _adopted(core, saved)
    cert = imported.certificate
    answer = {"key": alias, "successor": successor, "already_present": imported.already_present,
              "certificate": {"subject": cert.subject, "sha256": cert.sha256_fingerprint,
                              "not_after": cert.not_after.isoformat()},
              "overlap_started_at": saved.overlap_started_at,
              "signing_switch_after": _after(core, saved.overlap_started_at) if key.purpose is KeyPurpose.JWS
              else None}
    if key.purpose is KeyPurpose.ENCRYPTION:
        answer["retire_after"] = _after(core, saved.overlap_started_at)
    return answer


def _publishable(core: Core, log: RotationLog, state: RotationState, successor_uri: str,
                 data: bytes | None) -> dict[str, Any] | None:
    """An encryption successor: published at once without a certificate (the answer), or None when one is
    given and may be imported. A kid once published stays: no certificate comes after the overlap started
    without one (with the default kid, the certificate's thumbprint would replace the JWK thumbprint the banks
    were given)."""
    alias = state.key_alias
    has_certificate = key_certificates(core.keys, successor_uri).current is not None
    if data is not None:
        if state.overlap_started_at is not None and not has_certificate:
            raise RotationStepError(f"the successor of {alias!r} is published without a certificate since "
                                    f"{state.overlap_started_at}: a certificate now could change its kid",
                                    hint="retire the old key as planned; certify the key at the next rotation")
        return None
    resolve(core.keys, core.config, successor_uri, policy_of=alias)  # its kid: KidError for kid = "x5t#S256"
    saved = state
    if state.overlap_started_at is None:
        saved = log.save(dataclasses.replace(state, overlap_started_at=now()))
    _adopted(core, saved)
    return {"key": alias, "successor": successor_label(saved), "already_present": state.overlap_started_at is not None,
            "certificate": None, "overlap_started_at": saved.overlap_started_at, "signing_switch_after": None,
            "retire_after": _after(core, saved.overlap_started_at)}


def request(core: Core, alias: str, subject: str | None = None, alg: str | None = None) -> dict[str, Any]:
    """The successor's CSR to the directory (``[directory]``), and the certificate it issues imported as
    :func:`import_successor` imports a file: the overlap starts.

    A retry after a failure (a timeout, a 5xx after which the directory may have made it) takes the active
    certificate the directory holds for the successor's key instead of making a second one; nothing is stored
    on the token until the certificate is downloaded and checked.
    """
    key = rotatable(core, alias)
    if key.purpose is KeyPurpose.ENCRYPTION:
        raise RotationStepError(f"key {alias!r} is an encryption key: its decrypt-only successor cannot sign the CSR "
                                "a directory certifies", hint=f"publish it with `tpp-agent rotate import {alias}` "
                                "(or with a certificate issued for its public key)")
    log = _log(core)
    state, current, successor = _under_way(log, alias)
    if state.overlap_started_at is not None:
        raise RotationStepError(f"the certificate of {alias!r}'s successor {successor!r} is imported already: the "
                                f"overlap started at {state.overlap_started_at}",
                                hint=f"see the next step with `tpp-agent rotate status {alias}`")
    kind = "transport" if key.purpose is KeyPurpose.TLS else "signing"  # the directory's names (CERTIFICATE_KINDS)
    successor_uri = label_uri(core.config, alias, successor)
    name = _subject(core, key, label_uri(core.config, alias, current), subject)
    algorithm = CsrAlgorithm.parse(alg) if alg else None
    retry = (f"nothing is stored on the token and {successor!r} is kept: run `tpp-agent rotate request {alias}` "
             "again (it takes the certificate the directory made for that key, if it made one)")
    try:
        client = core.directory.client
        issued = client.issued_for(kind, core.keys.public_key_info(successor_uri).dump())
        csr = None
        if issued is None:
            csr = build_csr(core.signer, successor_uri, name, algorithm).pem
            issued = client.create_certificate(kind, csr)
        pem = client.download(issued, csr)
    except (DirectoryError, TransportError, ConfigError) as exc:
        exc.hint = f"{exc.hint}; {retry}" if exc.hint else retry
        raise
    imported = import_successor(core, alias, pem, f"directory certificate {issued.id}")
    return {**imported, "directory_certificate": issued.as_dict(), "reused": csr is None}


def _same_application(core: Core, current_uri: str, subject: Any, source: str) -> None:
    """A transport successor's certificate names the application the current one names: banks know it by that."""
    certificate = key_certificates(core.keys, current_uri).current
    if certificate is None:
        return
    def common_names(name: Any) -> list[str]:
        return [atv["value"].native for rdn in name.chosen for atv in rdn if atv["type"].native == "common_name"]
    before, after = common_names(certificate.parsed.subject), common_names(subject)
    if before != after:
        raise CertificateMismatchError(
            f"the certificate in {source} is for client {', '.join(after) or 'no CN'}; the current transport "
            f"certificate is for {', '.join(before) or 'no CN'}: banks would see another application",
            hint="import the certificate issued for this application's successor CSR")


def switch_signing(core: Core, alias: str) -> dict[str, Any]:
    key = rotatable(core, alias)
    if key.purpose is KeyPurpose.TLS:
        raise RotationStepError(f"key {alias!r} is a transport key: it switches bank by bank",
                                hint=f"`tpp-agent rotate switch-transport {alias}` registers its successor's "
                                     "certificate at each bank and switches it")
    if key.purpose is KeyPurpose.ENCRYPTION:
        raise _no_encryption_switch(alias)
    log = _log(core)
    state, _, successor = _in_overlap(log, alias)
    if state.signing_switched_at is not None:
        raise RotationStepError(f"signing with {alias!r} switched to {successor!r} already, at "
                                f"{state.signing_switched_at} (by {state.updated_by})",
                                hint=f"next: `tpp-agent rotate retire {alias}`, once the window has passed")
    assert state.overlap_started_at is not None  # _in_overlap
    _window(core, state.overlap_started_at, "the successor's kid was in it")
    saved = _adopted(core, log.save(dataclasses.replace(state, signing_switched_at=now())))
    return {"key": alias, "signing": successor, "kid": resolve(core.keys, core.config, alias).kid,
            "signing_switched_at": saved.signing_switched_at,
            "retire_after": _after(core, saved.signing_switched_at)}


def _no_encryption_switch(alias: str) -> RotationStepError:
    return RotationStepError(f"key {alias!r} is an encryption key: banks encrypt to the keys its JWKS carries, so "
                             "it switches when the old key is retired (out of the JWKS, still decrypting)",
                             hint=f"`tpp-agent rotate retire {alias}`, once the window after the import has passed")


def switch_transport(core: Core, alias: str, bank: str) -> dict[str, Any]:
    key = rotatable(core, alias)
    if key.purpose is KeyPurpose.ENCRYPTION:
        raise _no_encryption_switch(alias)
    if key.purpose is not KeyPurpose.TLS:
        raise RotationStepError(f"key {alias!r} is not a transport key: it switches for every bank at once",
                                hint=f"`tpp-agent rotate switch-signing {alias}`")
    found = core.bank(bank)
    if found.name not in {b.name for b in _banks_of(core, key)}:
        raise RotationStepError(f"bank {bank!r} does not use key {alias!r} (its client_key is "
                                f"{found.tls.client_key!r})")
    if found.tls.client_certificate is not None:
        raise RotationStepError(f"bank {bank!r} presents the file client_certificate = {found.tls.client_certificate}:"
                                " a rotation presents the certificates on the token",
                                hint=f"remove client_certificate from [banks.{bank}]")
    log = _log(core)
    state, _, successor = _in_overlap(log, alias)
    switched = state.banks.get(bank)
    if switched is not None and switched.key_label == successor:
        raise RotationStepError(f"bank {bank!r} gets the certificate of {successor!r} already, since "
                                f"{switched.switched_at}")
    # Registered first (once for the fleet: the claim is per certificate and endpoint), switched after: a bank
    # never gets a certificate it does not know.
    registration = core.banks.registrar_with(bank, label_uri(core.config, alias, successor)).register()
    saved = _record_switch(log, alias, successor, bank)
    _adopted(core, saved)
    left = [b.name for b in _banks_of(core, key) if bank_label(saved, b.name) != successor]
    return {"key": alias, "bank": bank, "successor": successor, "switched_at": saved.banks[bank].switched_at,
            "registration": registration.as_dict(), "banks_left": left}


def _record_switch(log: RotationLog, alias: str, successor: str, bank: str) -> RotationState:
    """``bank`` switched to ``successor``, merged with the banks other hosts switched meanwhile."""
    for _ in range(_MERGE_ATTEMPTS):
        latest, _, now_successor = _in_overlap(log, alias)
        if now_successor != successor:
            raise RotationStepError(f"the rotation of {alias!r} changed meanwhile: its successor is now "
                                    f"{now_successor!r}, not {successor!r}")
        switched = latest.banks.get(bank)
        if switched is not None and switched.key_label == successor:
            return latest  # another host switched it meanwhile: the same outcome
        try:
            return log.save(dataclasses.replace(latest, banks={**latest.banks, bank: BankSwitch(successor, now())}))
        except RotationConflictError:
            continue
    raise RotationConflictError(f"rotation of {alias!r} kept changing while bank {bank!r} was being switched")


def retire(core: Core, alias: str) -> dict[str, Any]:
    key = rotatable(core, alias)
    log = _log(core)
    state, current, successor = _in_overlap(log, alias, encryption=key.purpose is KeyPurpose.ENCRYPTION)
    if key.purpose is KeyPurpose.TLS:
        left = [b.name for b in _banks_of(core, key) if bank_label(state, b.name) != successor]
        if left:
            raise RotationStepError(f"bank(s) {', '.join(left)} still get the certificate of {current!r}",
                                    hint=f"switch each first: `tpp-agent rotate switch-transport {alias} --bank "
                                         f"{left[0]}`")
    elif key.purpose is KeyPurpose.ENCRYPTION:
        assert state.overlap_started_at is not None  # _in_overlap
        _window(core, state.overlap_started_at, "the successor was in it (the old key leaves it now)")
    else:
        if state.signing_switched_at is None:
            raise RotationStepError(f"{alias!r} still signs with {current!r}",
                                    hint=f"switch signing first: `tpp-agent rotate switch-signing {alias}`")
        _window(core, state.signing_switched_at, "signing switched (a JWS signed before may still be verified)")
    stamp = now()
    kept = [k for k in state.keys if k.role == RETIRED]
    keys = (*kept, RotationKey(current, RETIRED, stamp), RotationKey(successor, CURRENT, stamp))
    saved = _adopted(core, log.save(dataclasses.replace(state, keys=keys, overlap_started_at=None,
                                                        signing_switched_at=None, banks={})))
    answer = {"key": alias, "current": successor, "retired": current, "retired_at": stamp, "version": saved.version,
              "config_hint": f"[keys.{alias}] uri may now name object={successor} (the state says so meanwhile)"}
    if key.purpose is KeyPurpose.ENCRYPTION:
        end = _when(stamp) + datetime.timedelta(seconds=core.sections.rotation.encryption_drain_window)
        answer["remove_after"] = end.isoformat(timespec="seconds")
    return answer


def remove_retired(core: Core, alias: str, label: str | None = None) -> dict[str, Any]:
    key = rotatable(core, alias)
    state = _log(core).get(alias)
    retired = [k for k in state.keys if k.role == RETIRED] if state is not None else []
    if not retired:
        raise RotationStepError(f"key {alias!r} has no retired key",
                                hint=f"a key is retired at the end of its rotation (`tpp-agent rotate retire {alias}`)")
    if label is not None and label not in {k.label for k in retired}:
        raise RotationStepError(f"{label!r} is not a retired key of {alias!r} "
                                f"(retired: {', '.join(k.label for k in retired)})")
    chosen = [k for k in retired if label is None or k.label == label]
    if key.purpose is KeyPurpose.ENCRYPTION:
        for one in chosen:  # all drained, or none removed
            _drained(core, alias, one)
    removed = []
    for name in (k.label for k in chosen):
        try:
            info = core.keys.info(label_uri(core.config, alias, name))
        except KeyNotFoundError:
            removed.append({"label": name, "objects": 0})  # removed before, or never on this host's token
            continue
        removed.append({"label": name, "objects": core.keys.destroy(info.label, info.id)})
    return {"key": alias, "removed": removed}


# -- the status ------------------------------------------------------------------------------------

def _after(core: Core, stamp: str | None) -> str | None:
    if stamp is None:
        return None
    end = _when(stamp) + datetime.timedelta(seconds=core.sections.rotation.jwks_cache_window)
    return end.isoformat(timespec="seconds")


def status(core: Core, aliases: Iterable[str]) -> dict[str, Any]:
    log = _log(core)
    return {"jwks_cache_window": core.sections.rotation.jwks_cache_window,
            "encryption_drain_window": core.sections.rotation.encryption_drain_window,
            "keys": [_key_status(core, alias, log.get(alias)) for alias in aliases]}


def _key_status(core: Core, alias: str, state: RotationState | None) -> dict[str, Any]:
    key = core.key(alias)
    configured = Pkcs11Uri.parse(key.uri).object or alias
    roles = state.keys if state is not None else (RotationKey(configured, CURRENT, ""),)
    entry: dict[str, Any] = {
        "key": alias, "purpose": str(key.purpose), "version": state.version if state is not None else 0,
        "updated_at": state.updated_at if state is not None else None,
        "updated_by": state.updated_by if state is not None else None,
        "keys": [_one_key(core, alias, k) for k in roles],
        "overlap_started_at": state.overlap_started_at if state is not None else None,
        "signing_switched_at": state.signing_switched_at if state is not None else None}
    successor = successor_label(state) if state is not None else None
    if key.purpose is KeyPurpose.TLS:
        entry["banks"] = [{"bank": b.name, "key": (bank_label(state, b.name) if state is not None else None)
                                                  or configured,
                           "switched_at": state.banks[b.name].switched_at
                           if state is not None and b.name in state.banks else None}
                          for b in _banks_of(core, key)]
    elif key.purpose is KeyPurpose.ENCRYPTION:
        entry["retire_after"] = _after(core, state.overlap_started_at) if state is not None else None
    else:
        entry["signing"] = (signing_label(state) if state is not None else None) or configured
        entry["signing_switch_after"] = _after(core, state.overlap_started_at) if state is not None else None
        entry["retire_after"] = _after(core, state.signing_switched_at) if state is not None else None
    directory = bool(core.config.section("directory"))
    entry["phase"], entry["next"] = _phase(alias, key, state, successor, entry, directory=directory)
    return entry


def _one_key(core: Core, alias: str, key: RotationKey) -> dict[str, Any]:
    uri = label_uri(core.config, alias, key.label)
    found: dict[str, Any] = {"label": key.label, "role": key.role, "since": key.since or None, "on_token": True,
                             "certificate": None}
    try:
        cert = key_certificates(core.keys, uri).current
    except KeyNotFoundError:
        found["on_token"] = False
        return found
    if cert is not None:
        found["certificate"] = {"subject": cert.subject, "sha256": cert.sha256_fingerprint,
                                "not_after": cert.not_after.isoformat()}
    purpose = core.key(alias).purpose
    # A retired encryption key still decrypts (under its kid) until it is removed; a retired signing key is done.
    if purpose is KeyPurpose.ENCRYPTION or (purpose is KeyPurpose.JWS and key.role != RETIRED):
        jose_key = resolved(core.keys, core.config, uri, policy_of=alias)  # None: no kid yet (no certificate)
        found["kid"] = jose_key.kid if jose_key is not None else None
    if purpose is KeyPurpose.ENCRYPTION and key.role == RETIRED:
        end = _when(key.since) + datetime.timedelta(seconds=core.sections.rotation.encryption_drain_window)
        found["remove_after"] = end.isoformat(timespec="seconds")
    return found


def _phase(alias: str, key: KeyConfig, state: RotationState | None, successor: str | None,
           entry: dict[str, Any], *, directory: bool) -> tuple[str, str]:
    if state is None or successor is None:
        return "no rotation under way", f"tpp-agent rotate start {alias}" + (" --directory" if directory else "")
    if state.overlap_started_at is None:
        if key.purpose is KeyPurpose.ENCRYPTION:
            return ("successor made, not published yet",
                    f"tpp-agent rotate import {alias} [CERT] (without CERT: under its JWK thumbprint)")
        return ("successor made, its certificate not imported",
                f"tpp-agent rotate request {alias}" if directory else f"tpp-agent rotate import {alias} CERT")
    if key.purpose is KeyPurpose.TLS:
        left = [b["bank"] for b in entry["banks"] if b["key"] != successor]
        done = len(entry["banks"]) - len(left)
        if left:
            return (f"overlap: {done} of {len(entry['banks'])} bank(s) switched",
                    f"tpp-agent rotate switch-transport {alias} --bank {left[0]}")
        return "every bank switched", f"tpp-agent rotate retire {alias}"
    if key.purpose is KeyPurpose.ENCRYPTION:
        return ("overlap: the JWKS carries both encryption keys, both decrypt",
                f"tpp-agent rotate retire {alias} (after {entry['retire_after']})")
    if state.signing_switched_at is None:
        return ("overlap: the JWKS carries both kids",
                f"tpp-agent rotate switch-signing {alias} (after {entry['signing_switch_after']})")
    return "signing switched", f"tpp-agent rotate retire {alias} (after {entry['retire_after']})"
