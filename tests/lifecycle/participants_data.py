"""Participants lists in the directory's shape, for the tests: extra fields as the real one has them."""

from __future__ import annotations

from typing import Any


def server(name: str, issuer: str, server_id: str, **extra: Any) -> dict[str, Any]:
    return {"AuthorisationServerId": server_id, "CustomerFriendlyName": name, "Issuer": issuer,
            "OpenIDDiscoveryDocument": f"{issuer}/.well-known/openid-configuration",
            "CustomerFriendlyLogoUri": "https://logo.example/x.svg", "DeveloperPortalUri": None,
            "ApiResources": [{"ApiResourceId": "r1", "ApiFamilyType": "accounts", "ApiVersion": "1.0",
                              "ApiDiscoveryEndpoints": [{"ApiDiscoveryId": "d1",
                                                         "ApiEndpoint": f"{issuer}/open-finance/accounts"}]}],
            **extra}


def organisation(org_id: str, name: str, servers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"OrganisationId": org_id, "OrganisationName": name, "Status": "Active", "LegalEntityName": name,
            "CountryOfRegistration": "AE", "RegistrationNumber": "123", "OrgDomainClaims": [],
            "AuthorisationServers": servers, **extra}
