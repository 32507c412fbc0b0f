"""``tpp-agent directory certs list|create|import|revoke``: the software statement's certificates in the trust
framework's directory, without its web pages (agent/operations/directory.py; admins, through a running agent or
on the token with --direct).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent.cli.cert import read_input
from agent.cli.context import CliContext
from agent.directory.client import CERTIFICATE_KINDS, REVOKE_REASONS
from agent.errors import InputError

_TYPES = ", ".join(CERTIFICATE_KINDS)


def register(sub: Any) -> None:
    directory = sub.add_parser("directory", help="the trust framework's directory: the application's certificates")
    groups = directory.add_subparsers(dest="group", metavar="GROUP", required=True)
    certs = groups.add_parser("certs", help="the software statement's certificates in the directory",
                              description="Over mTLS with the transport key: a directory:software token "
                                          "(client_credentials, tls_client_auth), then the directory's API "
                                          "([directory] in the configuration).")
    actions = certs.add_subparsers(dest="action", metavar="ACTION", required=True)

    lst = actions.add_parser("list", help="the certificates the directory holds for the software statement")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=list_certificates)

    create = actions.add_parser("create", help="upload a CSR: the directory makes a certificate",
                                description="CSR: a PEM file from `tpp-agent csr` ('-' for stdin). With --key, the "
                                            "CSR must be that key's (checked before anything is sent), and "
                                            "--import stores the issued certificate on the token with it.")
    create.add_argument("--type", required=True, help=f"{_TYPES} (or the directory's names: "
                                                      f"{', '.join(CERTIFICATE_KINDS.values())})")
    create.add_argument("--csr", required=True, metavar="FILE")
    create.add_argument("--key", help="the token key the CSR is for (alias or pkcs11: URI)")
    create.add_argument("--import", dest="import_", action="store_true",
                        help="import the issued certificate onto the token with --key")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=create_certificate)

    imp = actions.add_parser("import", help="download an issued certificate and store it on the token with its key",
                             description="Refused, with nothing stored, when the certificate is for another key "
                                         "than --key, or is revoked. The key's older certificates are kept (a "
                                         "rotation's overlap) unless --replace.")
    imp.add_argument("id", metavar="ID", help="the certificate's CertificateOrKeyId (see `list`)")
    imp.add_argument("--type", required=True, help=_TYPES)
    imp.add_argument("--key", required=True, help="the token key it is for (alias or pkcs11: URI)")
    imp.add_argument("--replace", action="store_true", help="remove the key's other certificates")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(handler=import_certificate)

    rev = actions.add_parser("revoke", help="revoke a certificate in the directory")
    rev.add_argument("id", metavar="ID")
    rev.add_argument("--type", required=True, help=_TYPES)
    rev.add_argument("--reason", required=True, choices=REVOKE_REASONS)
    rev.add_argument("--json", action="store_true")
    rev.set_defaults(handler=revoke_certificate)


def list_certificates(args: argparse.Namespace, ctx: CliContext) -> int:
    answer = ctx.backend.run("directory_certificates")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    found = answer["certificates"]
    if not found:
        print("the directory holds no certificate for this software statement")
        return 0
    print(f"{'ID':<36}  {'TYPE':<12}  {'STATUS':<8}  {'EXPIRES':<20}  SUBJECT")
    for cert in found:
        status = cert["status"] + (f" ({cert['revoke_reason']})" if cert["revoke_reason"] else "")
        print(f"{cert['id']:<36}  {cert['type']:<12}  {status:<8}  {(cert['expires'] or '-')[:19]:<20}  "
              f"{cert['subject'] or '-'}")
    return 0


def create_certificate(args: argparse.Namespace, ctx: CliContext) -> int:
    if args.import_ and not args.key:
        raise InputError("--import needs --key: the token key the certificate is stored with")
    try:
        csr = read_input(args.csr, "CSR").decode("ascii")
    except UnicodeDecodeError:
        raise InputError(f"{args.csr} is not a PEM CSR (not ASCII text)", hint="make one with `tpp-agent csr`") \
            from None
    created = ctx.backend.run("directory_create", {"type": args.type, "csr": csr,
                                                   **({"key": args.key} if args.key else {})})
    imported = ctx.backend.run("directory_import", {"id": created["id"], "type": created["type"], "key": args.key}) \
        if args.import_ else None
    if args.json:
        print(json.dumps({"created": created, "imported": imported}, indent=2))
        return 0
    print(f"created {created['type']} certificate {created['id']}: {created['subject'] or '-'}, "
          f"until {(created['expires'] or '-')[:19]}")
    if imported is not None:
        _print_imported(imported)
    else:
        print(f"import it with `tpp-agent directory certs import {created['id']} --type {args.type} --key KEY`")
    return 0


def import_certificate(args: argparse.Namespace, ctx: CliContext) -> int:
    imported = ctx.backend.run("directory_import", {"id": args.id, "type": args.type, "key": args.key,
                                                    "replace": args.replace})
    if args.json:
        print(json.dumps(imported, indent=2))
    else:
        _print_imported(imported)
    return 0


def _print_imported(imported: dict[str, Any]) -> None:
    verb = "already on the token" if imported["already_present"] else "imported"
    print(f"{verb}: {imported['subject']} for key {imported['key']!r}, valid until {imported['not_after'][:16]} UTC")
    print(f"sha256 {imported['sha256']}")
    if imported["replaced"]:
        print(f"removed {imported['replaced']} older certificate(s) of this key")


def revoke_certificate(args: argparse.Namespace, ctx: CliContext) -> int:
    answer = ctx.backend.run("directory_revoke", {"id": args.id, "type": args.type, "reason": args.reason})
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"revoked {answer['type']} certificate {answer['id']} ({answer['reason']})")
    return 0
