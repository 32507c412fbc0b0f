"""``tpp-agent serve`` (the daemon) and ``tpp-agent audit verify`` (its audit trail).

``audit verify`` exits 0 when every trail is intact and anchored, 65 (EX_DATAERR) when a trail is damaged (each
problem printed), 66 (EX_NOINPUT) when the checkpoint key is not on the token (intact, but not provably so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli.context import CliContext
from agent.errors import ExitStatus


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the agent: HTTP/1.1 + JSON on a Unix socket (systemd Type=notify)")
    serve.add_argument("--socket", help="socket path (default: [daemon] socket, else $RUNTIME_DIRECTORY/agent.sock)")
    serve.set_defaults(handler=serve_command)

    audit = sub.add_parser("audit", help="the audit trail of key uses")
    actions = audit.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check the hash chain and its signed checkpoints; name every removed "
                                               "or edited line")
    verify.add_argument("--file", help="one audit trail file (default: [daemon] audit_file and the serving "
                                       "processes' own trails beside it, audit.N.jsonl)")
    verify.add_argument("--public-key", metavar="PEM",
                        help="the checkpoint key's public key or certificate (PEM), to verify without the token: "
                             "save it with `tpp-agent keys public audit` and keep it off this host")
    verify.set_defaults(handler=verify_command)


def serve_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from agent.daemon.main import run

    return run(ctx.config_path, args.socket)


def verify_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from agent import audit

    settings = ctx.sections.daemon
    # No file yet: verify() says where it looked.
    paths = [Path(args.file)] if args.file else audit.trail_files(settings.audit_file) or [settings.audit_file]
    spki = _checkpoint_key(args.public_key, ctx, settings.audit_checkpoint_key)
    if spki is None:
        reports = [audit.TrailReport(path, *audit.verify(path), []) for path in paths]
    else:
        reports = audit.verify_anchored(paths, spki)
    status = (ExitStatus.DATAERR if any(r.findings for r in reports)  # the trail is not what was written
              else ExitStatus.NOINPUT if spki is None else ExitStatus.OK)  # the key it names is not on the token
    if args.json:
        print(json.dumps({"ok": status is ExitStatus.OK, "exit_status": status, "anchored": spki is not None,
                          "checkpoint_key_sha256": hashlib.sha256(spki).hexdigest() if spki else None,
                          "trails": [{"path": str(r.path), "records": r.records, "intact": not r.findings,
                                      "findings": [{"line": f.line, "problem": f.problem} for f in r.findings],
                                      "notes": r.notes} for r in reports]}, indent=2))
        return status
    for report in reports:
        for finding in report.findings:
            print(f"{report.path}:{finding}")
        for note in report.notes:
            print(f"{report.path}: note: {note}")
        if report.findings:
            print(f"audit trail {report.path}: {len(report.findings)} problem(s) in {report.records} line(s)",
                  file=sys.stderr)
        elif spki is None:
            print(f"audit trail {report.path}: {report.records} record(s), chain intact but NOT anchored",
                  file=sys.stderr)
        else:
            print(f"audit trail {report.path}: {report.records} record(s), chain intact, checkpoints verified")
    if spki is None:
        print(f"error: no checkpoint key {settings.audit_checkpoint_key!r} on the token: a removed tail or a "
              "rewritten trail would not show", file=sys.stderr)
        print(f"hint: create it (tpp-agent keys generate --label {settings.audit_checkpoint_key} --type ec:p256) "
              "and restart the agent, or pass --public-key PEM", file=sys.stderr)
        return status
    if not args.public_key:
        print(f"checkpoint key SHA-256 {hashlib.sha256(spki).hexdigest()} (read from the token)")
    return status


def _checkpoint_key(pem_file: str | None, ctx: CliContext, name: str) -> bytes | None:
    """The checkpoint key's SubjectPublicKeyInfo (DER): from ``pem_file``, else from the token (None if the
    token has no such key)."""
    from asn1crypto import pem, x509

    from agent.audit import AuditError, checkpoint_key_uri
    from agent.errors import InputError
    from pkcs11_backends.errors import KeyNotFoundError, Pkcs11Error, UriError

    if pem_file is None:
        try:
            keys = ctx.runtime.keys
            return bytes(keys.public_key_info(checkpoint_key_uri(keys, name)).dump())
        except (KeyNotFoundError, UriError):
            return None
        except Pkcs11Error as exc:
            raise AuditError(f"cannot read the checkpoint key {name!r} from the token: {exc}",
                             hint="pass --public-key PEM (saved with `tpp-agent keys public audit`) to verify "
                                  "without the token") from None
    try:
        kind, _, der = pem.unarmor(Path(pem_file).read_bytes())
    except OSError as exc:
        raise InputError(f"cannot read --public-key {pem_file}: {exc.strerror}") from None
    except ValueError:
        raise InputError(f"--public-key {pem_file} is not PEM",
                         hint="save it with `tpp-agent keys public audit > audit-key.pem`") from None
    if kind == "CERTIFICATE":
        return bytes(x509.Certificate.load(der).public_key.dump())
    if kind == "PUBLIC KEY":
        return bytes(der)
    raise InputError(f"--public-key {pem_file} holds a {kind}, not a PUBLIC KEY or CERTIFICATE")
