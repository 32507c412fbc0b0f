"""What one process makes of the shared rotation state: the token key each alias names, for signing and for
each bank's TLS.

The agent reads the state at start, after each rotation step it runs itself (at once: the step's answer comes
after the switch is in force here), at the next operation after a step another process of this host ran (the
step replaces ``STATE_DIR/rotation.changed``; :meth:`RotationView.follow` stats it), and every
``[daemon] health_interval`` for the steps other hosts ran. An alias then resolves to the label the state names
(``KeyStore.aliases``), and each bank's transport is built with the key that bank was switched to
(``transport_key``), so nothing restarts.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from agent import log
from agent.config import Config, KeyPurpose
from agent.openfinance.banks import BankConfig
from agent.state import SQLITE_NAME, StateError, database_url, open_state
from agent.state.rotation import CURRENT, RETIRED, SUCCESSOR, RotationState, all_states
from pkcs11_backends.keys import KeyStore
from pkcs11_backends.uri import ObjectType, Pkcs11Uri

_logger = log.get_logger("rotation")


def label_uri(config: Config, alias: str, label: str) -> str:
    """The URI of key ``label`` next to the configured key of ``alias`` (same token): the configured URI itself
    for the configured label."""
    configured = config.keys[alias].uri
    parsed = Pkcs11Uri.parse(configured)
    if parsed.object == label:
        return configured
    return str(dataclasses.replace(parsed, object=label, id=None, type=ObjectType.PRIVATE))


def current_label(state: RotationState) -> str | None:
    labels = state.labels(CURRENT)
    return labels[0] if labels else None


def successor_label(state: RotationState) -> str | None:
    labels = state.labels(SUCCESSOR)
    return labels[0] if labels else None


def signing_label(state: RotationState) -> str | None:
    """The key that signs for the alias: the successor once signing switched, else the current one."""
    successor = successor_label(state)
    return successor if successor and state.signing_switched_at else current_label(state)


def bank_label(state: RotationState, bank: str) -> str | None:
    """The key whose certificate ``bank`` gets: the one it was switched to, else the current one."""
    switch = state.banks.get(bank)
    return switch.key_label if switch is not None else current_label(state)


CHANGED_NAME = "rotation.changed"  # in STATE_DIR: replaced by every rotation step (agent.state.rotation.announce)


def changed_marker(config: Config) -> Path:
    return config.state_dir / CHANGED_NAME


class RotationView:
    """The rotation states of the configured keys as this process last read them; applied to ``keys``."""

    def __init__(self, config: Config, keys: KeyStore) -> None:
        self.config = config
        self.keys = keys
        self._states: Mapping[str, RotationState] = {}  # replaced whole: readers on other threads see one
        self._lock = threading.Lock()
        self._uris: dict[tuple[str, str], str] = {}
        self._marker = changed_marker(config)
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self._marker)
        except OSError:
            return None
        return found.st_ino, found.st_mtime_ns

    def follow(self) -> None:
        """Read the shared state again if a rotation step ran on this host since the last read (one ``stat``):
        each operation of each serving process sees a step another process ran as soon as its answer is out."""
        stamp = self._stamp()
        if stamp != self._seen:
            self._seen = stamp
            self.refresh()

    @property
    def states(self) -> Mapping[str, RotationState]:
        return self._states

    def refresh(self) -> None:
        """Read the shared state again; a store that is away keeps what was read before (and says so)."""
        if database_url(self.config) is None and not (self.config.state_dir / SQLITE_NAME).exists():
            return  # no state yet, and no reason to create the file: nothing was ever rotated here
        try:
            found = all_states(open_state(self.config))
        except StateError as exc:
            _logger.warning("rotation_state_unreadable", error=str(exc), hint="the keys in use stay as they were")
            return
        self.adopt(*found)

    def adopt(self, *states: RotationState) -> None:
        """Use these states (newer versions only) from now on: the aliases resolve to the keys they name."""
        with self._lock:
            merged = dict(self._states)
            for state in states:
                if state.key_alias not in self.config.keys:
                    continue  # another configuration's key, or one no longer configured here
                known = merged.get(state.key_alias)
                if known is None or state.version > known.version:
                    merged[state.key_alias] = state
            if merged == self._states:
                return
            # The first read (a CLI command, an agent starting) is no news; a switch while serving is.
            report = _logger.info if self._states else _logger.debug
            self._states = merged
            aliases = dict(self.config.aliases)
            for alias, state in merged.items():
                label = signing_label(state) if self._purpose(alias) is KeyPurpose.JWS else current_label(state)
                if label is not None:
                    aliases[alias] = label_uri(self.config, alias, label)
            if aliases != self.keys.aliases:
                report("rotation_keys", keys={a: u for a, u in aliases.items() if a in merged})
                self.keys.aliases = aliases

    def _purpose(self, alias: str) -> KeyPurpose | None:
        return self.config.keys[alias].purpose

    def transport_key(self, bank: BankConfig) -> str:
        """The key name ``bank``'s TLS is built with: its client_key, or the rotated key it was switched to."""
        name = bank.tls.client_key
        key = self.config.key_named(name)
        state = self._states.get(key.alias) if key is not None else None
        label = bank_label(state, bank.name) if state is not None else None
        if key is None or label is None:
            return name
        # Asked on every bank request: each (alias, label) is parsed into its URI once (a handful per rotation).
        uri = self._uris.get((key.alias, label))
        if uri is None:
            uri = self._uris[(key.alias, label)] = label_uri(self.config, key.alias, label)
        return uri

    def as_presented(self, bank: BankConfig) -> BankConfig:
        """``bank`` with the client_key it is presented with now (what `tpp-agent registrations` shows)."""
        key = self.transport_key(bank)
        if key == bank.tls.client_key:
            return bank
        return dataclasses.replace(bank, tls=dataclasses.replace(bank.tls, client_key=key))

    def published(self, alias: str) -> list[str]:
        """The keys of a jws or encryption alias a JWKS carries: the one signing (an encryption key's: the current
        one) first, and in an overlap the other too."""
        state = self._states.get(alias)
        successor = successor_label(state) if state is not None else None
        current = current_label(state) if state is not None else None
        if state is None or successor is None or current is None or state.overlap_started_at is None:
            return [alias]
        signing = signing_label(state) or current
        other = current if signing == successor else successor
        return [label_uri(self.config, alias, signing), label_uri(self.config, alias, other)]

    def decrypting(self, alias: str) -> list[str]:
        """The keys of an encryption alias that decrypt: the published ones (the current key first), then the
        retired ones, kept for the events encrypted to them that may still arrive until they are removed."""
        state = self._states.get(alias)
        if state is None:
            return [alias]
        return [*self.published(alias), *(label_uri(self.config, alias, label) for label in state.labels(RETIRED))]
