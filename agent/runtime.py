"""The objects a running agent shares, built lazily from the configuration.

The CLI and the daemon both go through here, so a key is named, a PIN is read
and the module is loaded the same way everywhere.
"""

from __future__ import annotations

import functools
import os

from agent.config import Config, pin_reader
from agent.transport.places import BankPlaces
from pkcs11_backends.keys import KeyStore
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.sessions import SessionPool


class Runtime:
    def __init__(self, config: Config, interactive: bool = False, processes: int = 1,
                 places: BankPlaces | None = None, log_bank_successes: bool = True) -> None:
        self.config = config
        self.interactive = interactive
        self.processes = processes  # serving processes side by side, each with this runtime's sessions
        # False: a bank's answers below 400 get no log line ([daemon] request_log = "failures"); each call is a
        # use of the transport key, in the audit trail either way.
        self.log_bank_successes = log_bank_successes
        if places is not None:  # the supervisor's, shared with the other serving processes (it closes it)
            self.__dict__["places"] = places
            self._own_places = False
        else:
            self._own_places = True

    @functools.cached_property
    def places(self) -> BankPlaces:
        """Each bank's places for requests in flight, for every transport and core this process makes (a reload's
        new ones count the requests the old ones still have under way)."""
        return BankPlaces()

    @functools.cached_property
    def module(self) -> Module:
        # The module reads its own environment (SOFTHSM2_CONF…) when it initialises.
        for name, value in self.config.pkcs11.environment.items():
            os.environ[name] = value
        init_args = self.config.pkcs11.init_args
        return Module.load(self.config.pkcs11.module, init_args.encode("utf-8") if init_args is not None else None)

    @functools.cached_property
    def pool(self) -> SessionPool:
        cfg = self.config.pkcs11
        return SessionPool(self.module, TokenSelector.parse(cfg.token), pin_reader(cfg, self.interactive),
                           max_sessions=cfg.max_sessions, call_timeout=cfg.call_timeout, processes=self.processes)

    @functools.cached_property
    def keys(self) -> KeyStore:
        return KeyStore(self.pool, self.config.aliases)

    def close(self) -> None:
        if "pool" in self.__dict__:
            self.pool.close()
        if self._own_places and "places" in self.__dict__:
            self.places.close()
