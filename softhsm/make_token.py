"""Create an isolated SoftHSM2 token for the demo and the tests.

    python softhsm/make_token.py --state-dir DIR [--label tpp-agent]

Everything lives under DIR/softhsm/: its own softhsm2.conf and token directory
(no system-wide token is touched), a random SO PIN and a random user PIN in
files of mode 0600. The token gets the key that signs the audit trail's
checkpoints (label ``audit``, P-256: the default ``[daemon] audit_checkpoint_key``).
Running it again with the same label changes nothing.
Point SOFTHSM2_CONF at DIR/softhsm/softhsm2.conf (the agent's defaults do).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

AUDIT_KEY = "audit"
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)


def write_secret(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes().strip()
    value = secrets.token_hex(8).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value + b"\n")
    return value


def make_token(state_dir: Path, label: str) -> Path:
    home = state_dir / "softhsm"
    tokens = home / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    conf = home / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    so_pin = write_secret(home / "so.pin")
    user_pin = write_secret(home / "user.pin")
    os.environ["SOFTHSM2_CONF"] = str(conf)

    from pkcs11_backends.errors import TokenNotFoundError
    from pkcs11_backends.module import Module, TokenSelector
    from pkcs11_backends.provisioning import init_token

    module_path = next((p for p in SOFTHSM_MODULES if os.path.exists(p)), None)
    if module_path is None:
        raise SystemExit("error: SoftHSM2 is not installed (apt-get install softhsm2)")
    module = Module.load(module_path)
    try:
        module.find_token(TokenSelector(label=label))
        print(f"token {label!r} already exists in {tokens}")
    except TokenNotFoundError:
        init_token(module, label, so_pin, user_pin)
        print(f"created token {label!r} in {tokens}")
    _make_audit_key(state_dir, module_path, label, home / "user.pin", conf)
    return conf


def _make_audit_key(state_dir: Path, module_path: str, label: str, pin_file: Path, conf: Path) -> None:
    from agent import config
    from agent.runtime import Runtime
    from pkcs11_backends.errors import KeyNotFoundError
    from pkcs11_backends.keys import KeySpec

    runtime = Runtime(config.parse({"state": {"dir": str(state_dir)}, "pkcs11": {
        "module": module_path, "token": label, "pin_file": str(pin_file),
        "environment": {"SOFTHSM2_CONF": str(conf)}}}))
    try:
        try:
            runtime.keys.info(f"pkcs11:object={AUDIT_KEY}")
        except KeyNotFoundError:
            runtime.keys.generate(AUDIT_KEY, KeySpec.parse("ec:p256"))
            print(f"created the audit checkpoint key {AUDIT_KEY!r} (ec:p256)")
    finally:
        runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--label", default="tpp-agent")
    args = parser.parse_args(argv)
    conf = make_token(args.state_dir.resolve(), args.label)
    print(f"SOFTHSM2_CONF={conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
