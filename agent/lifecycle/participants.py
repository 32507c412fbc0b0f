"""The trust framework directory's participants list, and the banks it names.

The directory (Raidiam Connect) publishes every organisation as JSON: an array of organisations, each with its
``AuthorisationServers`` — a bank may run several, each with ``Issuer``, ``OpenIDDiscoveryDocument``,
``CustomerFriendlyName`` and ``ApiResources``. Extra fields are ignored (the directory adds fields over time);
a required one missing or of the wrong type is an error naming the entry. Only ``Active`` organisations and
servers count.

A bank is matched to a configured ``[banks.NAME]`` by its issuer, the identifier the directory and the
discovery document agree on: the same issuer with another discovery URL is a change, an issuer the directory
lacks is one it does not (or no longer) list.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from agent.errors import InputError
from agent.openfinance.banks import BankConfig

MAX_BYTES = 32 << 20  # the production list is a few MiB; a larger answer is not the participants list


class ParticipantsError(InputError):
    hint = "give the directory's participants JSON (an array of organisations with AuthorisationServers)"


@dataclasses.dataclass(frozen=True)
class ApiResource:
    family: str
    version: str
    endpoints: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AuthorisationServer:
    organisation_id: str
    organisation_name: str
    server_id: str
    name: str  # CustomerFriendlyName
    issuer: str
    discovery_url: str
    api_resources: tuple[ApiResource, ...]


def parse(data: bytes, source: str) -> list[AuthorisationServer]:
    """Every active authorisation server in a participants document, in its order."""
    if len(data) > MAX_BYTES:
        raise ParticipantsError(f"{source} is larger than {MAX_BYTES >> 20} MiB: not a participants list")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ParticipantsError(f"{source} is not JSON") from None
    if not isinstance(document, list):
        raise ParticipantsError(f"{source} is not the directory's participants list: it is a JSON "
                                f"{type(document).__name__}, not an array of organisations")
    servers = []
    for position, organisation in enumerate(document):
        where = f"{source}: organisation {position + 1}"
        org = _table(organisation, where)
        org_id, org_name = _text(org, "OrganisationId", where), _text(org, "OrganisationName", where)
        where = f"{source}: organisation {org_id} ({org_name})"
        if org.get("Status", "Active") != "Active":
            continue
        for number, entry in enumerate(_list(org, "AuthorisationServers", where)):
            at = f"{where}, authorisation server {number + 1}"
            server = _table(entry, at)
            if server.get("Status", "Active") != "Active":
                continue
            servers.append(AuthorisationServer(
                organisation_id=org_id, organisation_name=org_name,
                server_id=_text(server, "AuthorisationServerId", at),
                name=_text(server, "CustomerFriendlyName", at),
                issuer=_text(server, "Issuer", at),
                discovery_url=_https(server, "OpenIDDiscoveryDocument", at),
                api_resources=tuple(_resource(r, f"{at}, ApiResources") for r in
                                    _list(server, "ApiResources", at, required=False))))
    return servers


def _resource(value: object, where: str) -> ApiResource:
    table = _table(value, where)
    version = table.get("ApiVersion")
    if not isinstance(version, str | int | float) or isinstance(version, bool):
        raise ParticipantsError(f"{where}: ApiVersion must be a string or a number")
    endpoints = tuple(_text(_table(e, where), "ApiEndpoint", where)
                      for e in _list(table, "ApiDiscoveryEndpoints", where, required=False))
    return ApiResource(_text(table, "ApiFamilyType", where), str(version), endpoints)


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ParticipantsError(f"{where} is not a JSON object")
    return value


def _list(table: Mapping[str, Any], key: str, where: str, required: bool = True) -> Sequence[Any]:
    value = table.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list):
        raise ParticipantsError(f"{where}: {key} must be an array" + ("" if key in table else ", and is missing"))
    return value


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ParticipantsError(f"{where}: {key} must be a non-empty string" +
                                ("" if key in table else ", and is missing"))
    return value


def _https(table: Mapping[str, Any], key: str, where: str) -> str:
    value = _text(table, key, where)
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme != "https" or not parsed.hostname:
        raise ParticipantsError(f"{where}: {key} must be an https:// URL, got {value!r}")
    return value


# -- the difference to the configured banks --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Difference:
    added: tuple[AuthorisationServer, ...]  # in the directory, not configured
    changed: tuple[tuple[BankConfig, AuthorisationServer], ...]  # same issuer, another discovery URL
    unlisted: tuple[BankConfig, ...]  # configured, not (or no longer) in the directory
    unchanged: tuple[tuple[BankConfig, AuthorisationServer], ...]

    @property
    def in_sync(self) -> bool:
        return not (self.added or self.changed or self.unlisted)


def difference(servers: Sequence[AuthorisationServer], configured: Mapping[str, BankConfig]) -> Difference:
    by_issuer = {server.issuer: server for server in servers}
    known = {bank.issuer: bank for bank in configured.values()}
    changed: list[tuple[BankConfig, AuthorisationServer]] = []
    unchanged: list[tuple[BankConfig, AuthorisationServer]] = []
    for bank in configured.values():
        server = by_issuer.get(bank.issuer)
        if server is not None:
            (unchanged if server.discovery_url == bank.discovery_url else changed).append((bank, server))
    return Difference(
        added=tuple(s for s in servers if s.issuer not in known),
        changed=tuple(changed), unchanged=tuple(unchanged),
        unlisted=tuple(b for b in configured.values() if b.issuer not in by_issuer))


def bank_names(servers: Sequence[AuthorisationServer], taken: Sequence[str] = ()) -> dict[str, AuthorisationServer]:
    """A ``[banks.NAME]`` for each server: its friendly name as a slug, made unique with the server id."""
    names: dict[str, AuthorisationServer] = {}
    used = set(taken)
    for server in servers:
        slug = re.sub(r"[^a-z0-9]+", "-", server.name.lower()).strip("-") or "bank"
        name = slug if slug not in used else f"{slug}-{re.sub(r'[^a-z0-9]', '', server.server_id.lower())[:8]}"
        while name in used:
            name += "-x"
        used.add(name)
        names[name] = server
    return names


def banks_file(servers: Mapping[str, AuthorisationServer], ca_bundle: str, source: str) -> str:
    """A TOML banks file (``include``d by the configuration) with one table per server."""
    lines = [f"# Banks from the directory's participants list ({source}), written by `tpp-agent banks sync`.",
             "# Rewritten by the next sync: configure a bank by hand in the main configuration instead.", ""]
    for name, server in servers.items():
        families = ", ".join(sorted({f"{r.family} {r.version}" for r in server.api_resources})) or "none listed"
        lines += [_comment(f"{server.organisation_name} — organisation {server.organisation_id}, "
                           f"authorisation server {server.server_id}"), _comment(f"APIs: {families}"),
                  f"[banks.{json.dumps(name)}]", f"discovery_url = {json.dumps(server.discovery_url)}",
                  f"issuer = {json.dumps(server.issuer)}", f"ca_bundle = {json.dumps(ca_bundle)}", ""]
    return "\n".join(lines)


def _comment(text: str) -> str:
    return "# " + " ".join(text.split())  # a line break in a directory field would end the comment
