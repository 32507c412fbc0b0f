"""``tpp-agent csr``: a certificate signing request signed by a token key.

The PEM goes to stdout (or ``--out``); a one-line summary of what was signed, with the
subject in DER order, goes to stderr so that the operator sees the order the CA will.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.cli.context import CliContext
from agent.errors import InputError
from agent.x509.csr import build_csr
from agent.x509.signatures import CsrAlgorithm
from agent.x509.subject import directory_subject, parse_subject, rfc4514

_PROFILE = ("org_name", "org_id", "client_id")


def register(sub: Any) -> None:
    csr = sub.add_parser("csr", help="make a CSR signed by a token key (directory profile or any subject)",
                         description="Subject: the directory profile C=AE, O=<org name>, OU=<org id>, "
                                     "CN=<client id> (default), or --subject as RFC 4514, most specific first.")
    csr.add_argument("--key", required=True, help="pkcs11: URI or configured alias of the key")
    csr.add_argument("--org-name", help="legal name, as the directory shows it (O=)")
    csr.add_argument("--org-id", help="organisation id in the directory (OU=)")
    csr.add_argument("--client-id", help="the application's client id, a UUID (CN=)")
    csr.add_argument("--subject", help="RFC 4514 subject instead, e.g. 'CN=x,OU=y,O=Acme\\, Inc.,C=AE'")
    csr.add_argument("--alg", default=None, choices=[a.value for a in CsrAlgorithm],
                     help="signature algorithm (default: rsa-pkcs1 for RSA keys, ecdsa for EC keys)")
    csr.add_argument("--out", type=Path, help="write the PEM here instead of stdout")
    csr.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    csr.set_defaults(handler=make_csr)


def make_csr(args: argparse.Namespace, ctx: CliContext) -> int:
    # Everything the user typed is checked before the token is touched.
    given = [name for name in _PROFILE if getattr(args, name) is not None]
    if args.subject is not None:
        if given:
            raise InputError("give either --subject or --org-name/--org-id/--client-id, not both")
        subject = parse_subject(args.subject)
    elif len(given) != len(_PROFILE):
        missing = ", ".join("--" + name.replace("_", "-") for name in _PROFILE if name not in given)
        raise InputError(f"missing {missing}", hint="the directory profile needs --org-name, --org-id and "
                                                    "--client-id (or give --subject)")
    else:
        subject = directory_subject(args.org_name, args.org_id, args.client_id)
    algorithm = CsrAlgorithm.parse(args.alg) if args.alg else None
    if args.out is not None:
        check_writable(args.out, args.force)

    signed = build_csr(ctx.core.signer, args.key, subject, algorithm)
    if args.out is not None:
        write_new(args.out, signed.pem, args.force)
    if args.json:
        print(json.dumps({"key": args.key, "subject": rfc4514(subject), "alg": signed.scheme.jose_name,
                          "out": str(args.out) if args.out else None, "pem": signed.pem}, indent=2))
        return 0
    if args.out is None:
        sys.stdout.write(signed.pem)
    where = f" to {args.out}" if args.out else ""
    print(f"CSR for {rfc4514(subject)} signed on the token with {signed.scheme.jose_name}{where}", file=sys.stderr)
    return 0


def check_writable(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise InputError(f"{path} already exists", hint="pass --force to overwrite it, or choose another --out")
    if not path.parent.is_dir():
        raise InputError(f"directory {path.parent} does not exist", hint="create it or choose another --out")


def write_new(path: Path, text: str, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)  # a CSR is public
    except FileExistsError:
        raise InputError(f"{path} already exists", hint="pass --force to overwrite it") from None
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)
