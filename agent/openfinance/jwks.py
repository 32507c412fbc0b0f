"""A bank's JWK Set from its ``jwks_uri``: cached, refetched once on an unknown ``kid``, bounded.

    keys = BankJwks("mb", http, lambda: discovery.get().document["jwks_uri"])
    keys.signing_key(kid)     # jwcrypto JWK: use "sig", RSA (verifies PS256)
    keys.encryption_key()     # jwcrypto JWK: use "enc", RSA (encrypt RSA-OAEP-256 to it)

* Cached ``ttl`` seconds (default 300: the ecosystem's 5 minutes), in memory.
* A ``kid`` not in a cached set fetches the set again, once; if it is still absent, :class:`UnknownKidError`.
  Such refetches are at most one per ``refetch_interval`` (default 10 s): a stream of messages with made-up
  ``kid`` values costs the bank one GET per interval, not one per message.
* A key is used for what its ``use`` says and nothing else: ``sig`` keys only verify, ``enc`` keys only encrypt;
  a key without ``use``, of another type, with an ``alg`` other than PS256 / RSA-OAEP-256, or with private
  members is ignored. A set larger than ``max_bytes`` or with more than ``max_keys`` keys is refused whole.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from jwcrypto import jwk as jwcrypto_jwk

from agent import strict_json
from agent.jose.errors import JwksError, UnknownKidError
from agent.openfinance.client import BankHttp

DEFAULT_TTL = 300.0
DEFAULT_REFETCH_INTERVAL = 10.0
MAX_KEYS = 64
MAX_BYTES = 256 * 1024
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_ALGORITHMS = {"sig": "PS256", "enc": "RSA-OAEP-256"}


@dataclasses.dataclass(frozen=True)
class KeySet:
    """One fetched set: usable keys by use and kid, and when it was fetched (``clock`` seconds)."""

    keys: Mapping[str, Mapping[str, jwcrypto_jwk.JWK]]  # use → kid → key
    fetched_at: float

    @classmethod
    def parse(cls, body: bytes, fetched_at: float, where: str) -> KeySet:
        if len(body) > MAX_BYTES:
            raise JwksError(f"{where}: the JWKS is {len(body)} bytes; at most {MAX_BYTES} are accepted")
        try:
            document = strict_json.loads(body)
        except ValueError as exc:  # StrictJsonError too: a member named twice is read two ways
            raise JwksError(f"{where}: the JWKS is not strict JSON ({exc})") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise JwksError(f"{where}: the JWKS has no \"keys\" array")
        if len(entries) > MAX_KEYS:
            raise JwksError(f"{where}: the JWKS has {len(entries)} keys; at most {MAX_KEYS} are accepted")
        keys: dict[str, dict[str, jwcrypto_jwk.JWK]] = {"sig": {}, "enc": {}}
        for entry in entries:
            usable = _usable(entry)
            if usable is not None:
                use, kid, key = usable
                keys[use].setdefault(kid, key)
        return cls(keys, fetched_at)


def _usable(entry: Any) -> tuple[str, str, jwcrypto_jwk.JWK] | None:
    if not isinstance(entry, dict) or entry.get("kty") != "RSA" or _PRIVATE_MEMBERS & entry.keys():
        return None
    use, kid = entry.get("use"), entry.get("kid")
    if use not in _ALGORITHMS or not isinstance(kid, str) or not kid:
        return None
    if entry.get("alg", _ALGORITHMS[use]) != _ALGORITHMS[use]:
        return None
    public = {name: entry[name] for name in ("kty", "kid", "use", "n", "e", "alg") if name in entry}
    try:
        return use, kid, jwcrypto_jwk.JWK(**public)
    except (jwcrypto_jwk.InvalidJWKValue, ValueError, TypeError):
        return None


class BankJwks:
    """The JWKS of one bank; thread-safe; one fetch at a time."""

    def __init__(self, bank: str, http: BankHttp, url: Callable[[], str], *, ttl: float = DEFAULT_TTL,
                 refetch_interval: float = DEFAULT_REFETCH_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bank, self.http, self.url = bank, http, url
        self.ttl, self.refetch_interval, self.clock = ttl, refetch_interval, clock
        self.fetches = 0
        self._set: KeySet | None = None
        self._last_forced = -refetch_interval
        self._lock = threading.Lock()

    def signing_key(self, kid: str) -> jwcrypto_jwk.JWK:
        """The bank's ``use: sig`` key ``kid``: for :func:`agent.jose.verify.verify_jws`."""
        return self._key("sig", kid)

    def encryption_key(self, kid: str | None = None) -> jwcrypto_jwk.JWK:
        """The bank's ``use: enc`` key ``kid``, or its first one."""
        if kid is not None:
            return self._key("enc", kid)
        keys = self._current().keys["enc"]
        if not keys:
            raise UnknownKidError(f"bank {self.bank!r} publishes no RSA key with use \"enc\" in its JWKS",
                                  hint="the bank must publish an encryption key before data can be encrypted to it")
        return next(iter(keys.values()))

    def _key(self, use: str, kid: str) -> jwcrypto_jwk.JWK:
        # The lock is held across a fetch: the callers waiting need that set anyway, and get it from one GET.
        with self._lock:
            current, fetched = self._fresh()
            key = current.keys[use].get(kid)
            if key is None and not fetched and self.clock() - self._last_forced >= self.refetch_interval:
                self._last_forced = self.clock()
                key = self._fetch().keys[use].get(kid)
        if key is None:
            raise UnknownKidError(f"bank {self.bank!r}: no {use!r} key with kid {kid!r} in its JWKS")
        return key

    def _current(self) -> KeySet:
        with self._lock:
            return self._fresh()[0]

    def _fresh(self) -> tuple[KeySet, bool]:
        """The cached set if younger than ``ttl``, else a new one; and whether it was fetched now."""
        current = self._set
        if current is not None and self.clock() - current.fetched_at < self.ttl:
            return current, False
        return self._fetch(), True

    def _fetch(self) -> KeySet:
        """Fetch and parse the set (the lock is held); a failure keeps the previous set unchanged."""
        url = self.url()
        self.fetches += 1
        response = self.http.request("GET", url, headers={"Accept": "application/json"})
        where = f"bank {self.bank!r}: {url} (x-fapi-interaction-id {response.interaction_id})"
        if response.status != 200:
            raise JwksError(f"{where} answered HTTP {response.status}, not the JWKS")
        self._set = KeySet.parse(response.body, self.clock(), where)
        return self._set
