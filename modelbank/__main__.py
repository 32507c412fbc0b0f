"""``python -m modelbank serve|issue``: run the model bank, or let its CA issue a certificate.

    python -m modelbank serve --state-dir D [--fail MODE] [--directory JWKS_DIR]
    python -m modelbank issue --state-dir D --csr FILE [--out FILE] [--days N]

The state dir holds the model bank's own test CA and server keys; keep it apart from
the TPP's state dir (the TPP's keys live on its token).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

from modelbank.ca import CsrError, TestCA
from modelbank.server import FAILURE_MODES, Behaviour, ModelBank, Registration
from modelbank.token_endpoint import IssuedToken


def serve(args: argparse.Namespace) -> int:
    behaviour = Behaviour.failing(args.fail) if args.fail else Behaviour()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    def announce(reg: Registration) -> None:
        print(f"registered: subject={reg.subject} sha256={reg.sha256} x-fapi-interaction-id={reg.interaction_id}",
              flush=True)

    def announce_token(token: IssuedToken) -> None:
        print(f"issued token: client_id={token.client_id} scope={token.scope} cnf.x5t#S256={token.cnf_x5t_s256}",
              flush=True)

    with ModelBank(args.state_dir.resolve(), host=args.host, behaviour=behaviour, on_registration=announce) as bank:
        bank.tokens.directory = args.directory.resolve() if args.directory else None
        bank.tokens.on_token = announce_token
        print(f"url: {bank.url}")
        print(f"discovery_url: {bank.discovery_url}")
        print(f"issuer: {bank.issuer}")
        print(f"ca_bundle: {bank.ca_bundle}")
        print(f"behaviour: {args.fail or 'normal'}")
        print("ready", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
    return 0


def issue(args: argparse.Namespace) -> int:
    ca = TestCA(args.state_dir.resolve() / "ca")
    try:
        pem = ca.issue_from_csr(args.csr.read_bytes(), days=args.days)
    except (CsrError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_bytes(pem)
        print(f"certificate written to {args.out}")
    else:
        sys.stdout.write(pem.decode("ascii"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelbank", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve discovery and /tpp-registration on 127.0.0.1 (ephemeral port)")
    s.add_argument("--state-dir", type=Path, required=True, help="the model bank's own CA and server keys")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--fail", choices=FAILURE_MODES, help="play this failure")
    s.add_argument("--directory", type=Path,
                   help="folder of CLIENT_ID.json JWKS files: the clients' signing keys, as the directory serves them")
    s.set_defaults(handler=serve)
    i = sub.add_parser("issue", help="issue a client certificate from a CSR (stands in for the directory)")
    i.add_argument("--state-dir", type=Path, required=True)
    i.add_argument("--csr", type=Path, required=True)
    i.add_argument("--out", type=Path)
    i.add_argument("--days", type=float, default=395.0, help="validity (default 13 months)")
    i.set_defaults(handler=issue)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
