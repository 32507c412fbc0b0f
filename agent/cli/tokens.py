"""``tpp-agent client-assertion | token | par``: a bank's token and PAR endpoints, JWTs signed on the token.

Through a running agent when there is one (its token cache, policy and audit trail), else in this process.
Access tokens are secrets: ``token`` shows their type, lifetime and scope, and the token itself only with
``--show-token``. ``par`` starts a consent; ``tpp-agent consent callback`` (agent/cli/consent.py) completes it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.context import CliContext
from agent.cli.jose import parse_json_object, parse_json_value
from agent.errors import InputError


def register(sub: Any) -> None:
    assertion = sub.add_parser("client-assertion", help="print a fresh client assertion (private_key_jwt) for a bank")
    assertion.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    assertion.add_argument("--json", action="store_true", help="with client_id and client_assertion_type")
    assertion.set_defaults(handler=client_assertion)

    token = sub.add_parser("token", help="get an access token (client_credentials, private_key_jwt over mTLS)")
    token.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    token.add_argument("--scope", required=True, help="space-separated scopes, e.g. 'accounts'")
    token.add_argument("--no-cache", action="store_true",
                       help="ask the bank for a new client_credentials token even if a cached one is still valid "
                            "(a consent's refresh_token grant is `consent refresh`)")
    token.add_argument("--show-token", action="store_true", help="also print the access token (a secret)")
    token.add_argument("--json", action="store_true")
    token.set_defaults(handler=get_token)

    par = sub.add_parser("par", help="push an authorization request (signed request object, PKCE) to a bank")
    par.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    par.add_argument("--scope", required=True, help="space-separated scopes, e.g. 'openid accounts'")
    par.add_argument("--redirect-uri", required=True, help="an https redirect URI registered for the application")
    par.add_argument("--authorization-details", metavar="JSON", help="a JSON list of objects with a type (RAR)")
    par.add_argument("--resource", action="append", metavar="URI",
                     help="the API the tokens are for (RFC 8707; repeatable); a strict bank requires it")
    par.add_argument("--prompt", help="none, login, consent, select_account (space-separated)")
    par.add_argument("--max-age", type=int, metavar="SECONDS", help="the customer's authentication at most this old")
    par.add_argument("--acr-values", metavar="VALUES", help="space-separated authentication context classes")
    par.add_argument("--claims", metavar="JSON", help="an OpenID Connect claims request object")
    par.add_argument("--state", help="default: random (the agent keeps it with the PKCE verifier and nonce)")
    par.add_argument("--nonce", help="default: random")
    par.add_argument("--json", action="store_true")
    par.set_defaults(handler=push)


def client_assertion(args: argparse.Namespace, ctx: CliContext) -> int:
    answer = ctx.backend.run("client_assertion", bank=args.bank)
    print(json.dumps(answer, indent=2) if args.json else answer["client_assertion"])
    return 0


def get_token(args: argparse.Namespace, ctx: CliContext) -> int:
    answer = ctx.backend.run("token", {"scope": args.scope, "refresh": args.no_cache}, bank=args.bank)
    if not args.show_token:
        answer.pop("access_token")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"{answer['token_type']} token for {answer['bank']}: scope {answer['scope']!r}, "
          f"expires in {answer['expires_in']} s")
    print(f"  x-fapi-interaction-id: {answer['interaction_id']}")
    if args.show_token:
        print(f"  access_token: {answer['access_token']}")
    else:
        print("  (the token is a secret: --show-token prints it)")
    return 0


def push(args: argparse.Namespace, ctx: CliContext) -> int:
    details = None
    if args.authorization_details is not None:
        details = parse_json_value(args.authorization_details, "--authorization-details")
        if not isinstance(details, list) or not all(isinstance(d, dict) for d in details):
            raise InputError("--authorization-details must be a JSON list of objects",
                             hint='e.g. \'[{"type": "urn:openfinanceuae:account-access-consent:v1.2"}]\'')
    claims = parse_json_object(args.claims, "--claims") if args.claims is not None else None
    body = {"scope": args.scope, "redirect_uri": args.redirect_uri, "authorization_details": details,
            "state": args.state, "nonce": args.nonce, "resource": args.resource, "prompt": args.prompt,
            "max_age": args.max_age, "acr_values": args.acr_values, "claims": claims}
    answer = ctx.backend.run("par", {k: v for k, v in body.items() if v is not None}, bank=args.bank)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"send the customer to: {answer['authorization_url']}")
    print(f"  request_uri: {answer['request_uri']} (the bank keeps it {answer['expires_in']} s)")
    print(f"  state: {answer['state']}")
    print("  then: tpp-agent consent callback " + args.bank + " --url 'REDIRECT URL' --refresh-token-file FILE")
    print(f"  x-fapi-interaction-id: {answer['interaction_id']}")
    return 0
