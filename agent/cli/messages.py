"""``tpp-agent verify | signed-body | encrypt-personal-data | receive-event``: signed and encrypted messages with
a bank, the TPP's keys staying on the token.

Through a running agent when there is one (its JWKS cache, replay store, policy and audit trail), else in this
process. Inputs are read from a file or ``-`` (stdin); JSON objects may also be given inline.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.context import CliContext
from agent.cli.jose import parse_json_object, read_input
from agent.errors import InputError


def register(sub: Any) -> None:
    verify = sub.add_parser("verify", help="verify a JWS the bank signed (an answer or error of payments, refunds, "
                                           "Confirmation of Payee)")
    verify.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    verify.add_argument("--jws", required=True, metavar="FILE", help="the compact JWS as received, or - for stdin")
    verify.add_argument("--no-audience", action="store_true",
                        help="the API's answers carry no aud: do not require our client id in it")
    verify.add_argument("--json", action="store_true", help="print header and claims as JSON")
    verify.set_defaults(handler=verify_jws)

    body = sub.add_parser("signed-body", help="sign a request body as a JWT (application/jwt) for a bank's API")
    body.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    body.add_argument("--message", required=True, metavar="JSON|FILE",
                      help='the message, e.g. \'{"Data": {...}}\', a file holding it, or - for stdin')
    body.add_argument("--audience", choices=("array", "string"), default="array",
                      help="aud as a JSON array of the issuer (payments, the default) or a string (CoP)")
    body.add_argument("--lifetime", type=int, metavar="SECONDS", help="exp - iat (default and at most 300)")
    body.add_argument("--json", action="store_true", help="with kid and content type")
    body.set_defaults(handler=sign_body)

    personal = sub.add_parser("encrypt-personal-data",
                              help="sign personal data and encrypt it to the bank's encryption key (JWS in JWE)")
    personal.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    personal.add_argument("--data", required=True, metavar="JSON|FILE",
                          help="a JSON object whose members become the claims, a file holding it, or - for stdin")
    personal.add_argument("--lifetime", type=int, metavar="SECONDS", help="exp - iat (default and at most 300)")
    personal.add_argument("--json", action="store_true", help="with the kids used")
    personal.set_defaults(handler=encrypt_data)

    event = sub.add_parser("receive-event", help="decrypt and verify an event the bank POSTed (application/jwe)")
    event.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    event.add_argument("--jwe", required=True, metavar="FILE", help="the body as received, or - for stdin")
    event.add_argument("--json", action="store_true", help="print the whole event as JSON")
    event.set_defaults(handler=receive_event)


def verify_jws(args: argparse.Namespace, ctx: CliContext) -> int:
    token = _text(read_input(args.jws, "--jws"), "--jws")
    answer = ctx.backend.run("verify", {"jws": token, "audience": not args.no_audience}, bank=args.bank)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    claims = answer["claims"]
    print(f"verified: signed by bank {answer['bank']} with key {answer['kid']} (PS256); iss {claims.get('iss')}")
    print(json.dumps(claims.get("message", claims), indent=2))
    return 0


def sign_body(args: argparse.Namespace, ctx: CliContext) -> int:
    body = {"message": _object(args.message, "--message"), "audience": args.audience}
    return _made(args, ctx, "signed_body", body, "jwt")


def encrypt_data(args: argparse.Namespace, ctx: CliContext) -> int:
    return _made(args, ctx, "encrypt_personal_data", {"data": _object(args.data, "--data")}, "jwe")


def _made(args: argparse.Namespace, ctx: CliContext, operation: str, body: dict[str, Any], field: str) -> int:
    """Run a signing operation and print what it made (``--json``: the whole answer)."""
    if args.lifetime is not None:
        body["lifetime"] = args.lifetime
    answer = ctx.backend.run(operation, body, bank=args.bank)
    print(json.dumps(answer, indent=2) if args.json else answer[field])
    return 0


def receive_event(args: argparse.Namespace, ctx: CliContext) -> int:
    token = _text(read_input(args.jwe, "--jwe"), "--jwe")
    event = ctx.backend.run("receive_event", {"jwe": token}, bank=args.bank)
    if args.json:
        print(json.dumps(event, indent=2))
        return 0
    print(f"event {event['event_type']} from bank {event['bank']}: consent {event['consent_id']}, "
          f"resource {event['resource']}, at {event['event_time']} (jti {event['jti']})")
    print(json.dumps(event["message"].get("Data"), indent=2))
    return 0


def _object(given: str, option: str) -> dict[str, Any]:
    """Inline JSON when it looks like JSON, else a file (or - for stdin) holding it."""
    text = given if given.lstrip().startswith("{") else _text(read_input(given, option), option)
    return parse_json_object(text, option)


def _text(data: bytes, option: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{option}: the input is not UTF-8 text") from None
