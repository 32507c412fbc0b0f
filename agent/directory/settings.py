"""``[directory]``: where the directory's API is and who the application is in it.

    [directory]
    token_endpoint = "https://matls-auth.directory.example/token"       # tls_client_auth, client_credentials
    api_url = "https://matls-api.directory.example"                      # /organisations/… below it
    participants_url = "https://data.directory.example/participants"    # public, for `tpp-agent banks sync`
    organisation_id = "…"                                                # the TPP's organisation in the directory
    software_statement_id = "…"                                          # the application's software statement
    client_id = "…"                                                      # its client ID (CN of the transport cert)
    ca_bundle = "/etc/tpp-agent/directory-ca.pem"                        # transport settings, as for a bank:
    client_key = "transport"                                             # agent/transport/tls.py reads them
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import ConfigError
from agent.transport.tls import TlsSettings

_OWN = ("token_endpoint", "api_url", "participants_url", "organisation_id", "software_statement_id", "client_id")
_KNOWN = set(_OWN) | {f.name for f in dataclasses.fields(TlsSettings)} - {"bank"}


@dataclasses.dataclass(frozen=True)
class DirectorySettings:
    token_endpoint: str
    api_url: str
    participants_url: str | None
    organisation_id: str
    software_statement_id: str
    client_id: str
    tls: TlsSettings

    @classmethod
    def from_config(cls, config: Config) -> DirectorySettings:
        table = config.section("directory")
        where = f"[directory] of {config.path or 'the configuration'}"
        if not table:
            raise ConfigError(f"no [directory] section in {config.path or 'the configuration'}",
                              hint="add [directory] with token_endpoint, api_url, organisation_id, "
                                   "software_statement_id, client_id and ca_bundle (see config.example.toml)")
        return cls.from_table(table, config.path.parent if config.path else Path.cwd(), where)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], base: Path, where: str = "[directory]") -> DirectorySettings:
        unknown = sorted(set(table) - _KNOWN)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {where}",
                              hint=f"known settings: {', '.join(sorted(_KNOWN))}")

        def text(key: str) -> str:
            value = table.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {key} must be a non-empty string" +
                                  ("" if key in table else ", and is missing"))
            if key.endswith(("_endpoint", "_url")) and urllib.parse.urlsplit(value).scheme != "https":
                raise ConfigError(f"{where}: {key} must be an https:// URL, got {value!r}")
            return value

        return cls(token_endpoint=text("token_endpoint"), api_url=text("api_url").rstrip("/"),
                   participants_url=text("participants_url") if "participants_url" in table else None,
                   organisation_id=text("organisation_id"), software_statement_id=text("software_statement_id"),
                   client_id=text("client_id"), tls=TlsSettings.from_table("directory", table, base))
