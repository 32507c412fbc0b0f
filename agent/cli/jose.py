"""``tpp-agent jwks | sign-jws``: JOSE with keys on the token."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli.context import CliContext
from agent.errors import InputError


def register(sub: Any) -> None:
    keyset = sub.add_parser("jwks", help="print the JWK Set of token keys (default: every configured key)")
    keyset.add_argument("--key", action="append", default=[], metavar="KEY", help="alias or pkcs11: URI (repeatable)")
    keyset.set_defaults(handler=jwks)

    sign = sub.add_parser("sign-jws", help="sign a payload as a compact JWS with a token key")
    sign.add_argument("--key", required=True, metavar="KEY", help="alias or pkcs11: URI")
    sign.add_argument("--alg", help="PS256, ES256, ES384 or RS256 (default: the key's first allowed algorithm)")
    sign.add_argument("--payload", required=True, metavar="FILE", help="file with the payload bytes, or - for stdin")
    sign.add_argument("--header", metavar="JSON", help='extra protected header members, e.g. \'{"typ":"JOSE"}\'')
    sign.set_defaults(handler=sign_jws)


def jwks(args: argparse.Namespace, ctx: CliContext) -> int:
    """Every jws key's JWK (never a transport key's), or those of the keys named: JSON with or without --json."""
    if args.key:
        keyset = {"keys": [ctx.backend.run("public", {"format": "jwk"}, key=key) for key in args.key]}
    else:
        keyset = ctx.backend.run("jwks")
    print(json.dumps(keyset, indent=2))
    return 0


def sign_jws(args: argparse.Namespace, ctx: CliContext) -> int:
    body: dict[str, Any] = {"payload_b64": base64.b64encode(read_input(args.payload, "--payload")).decode("ascii")}
    if args.header:
        body["header"] = parse_json_object(args.header, "--header")
    if args.alg:
        body["alg"] = args.alg
    answer = ctx.backend.run("jws", body, key=args.key)
    print(json.dumps(answer, indent=2) if args.json else answer["jws"])
    return 0


def read_input(name: str, option: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"{option}: cannot read {name}: {exc.strerror}") from None


def parse_json_value(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{option} is not JSON: {exc}") from None


def parse_json_object(text: str, option: str) -> dict[str, Any]:
    value = parse_json_value(text, option)
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object")
    return value
