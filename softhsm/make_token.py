#!/usr/bin/env python3
"""Create an isolated SoftHSM2 token for the demo and the tests.

    softhsm/make_token.py --state-dir DIR [--label tpp-agent]

Everything lives under DIR/softhsm/: its own softhsm2.conf and token directory
(no system-wide token is touched), a random SO PIN and a random user PIN in
files of mode 0600. The token gets the key that signs the audit trail's
checkpoints (label ``audit``, P-256: the default ``[daemon] audit_checkpoint_key``).
Running it again with the same label changes nothing; a run that fails removes
what it wrote. Point SOFTHSM2_CONF at DIR/softhsm/softhsm2.conf (the agent's
defaults do).

Any python3 runs it: python-pkcs11 lives in the checkout's .venv (`make setup`),
so the distribution's python3 hands over to .venv/bin/python.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

AUDIT_KEY = "audit"
REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
MAX_LABEL_BYTES = 32  # CK_TOKEN_INFO.label


def _with_pkcs11() -> None:
    """Make pkcs11_backends importable, before anything is written: from the checkout, with python-pkcs11 from
    this interpreter or else from the checkout's .venv (this script runs again there)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
            # The same script and arguments, in the checkout's own interpreter.
            os.execv(VENV_PYTHON, [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])  # noqa: S606
        raise SystemExit(f"error: python-pkcs11 is not installed for {sys.executable}\n"
                         "hint: run `make setup` (it creates .venv), then run this again") from None


def _label(value: str) -> str:
    if not value or len(value.encode("utf-8")) > MAX_LABEL_BYTES:
        raise argparse.ArgumentTypeError(f"a token label is 1 to {MAX_LABEL_BYTES} bytes, not {value!r}")
    return value


def write_secret(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes().strip()
    value = secrets.token_hex(8).encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value + b"\n")
    return value


def make_token(state_dir: Path, label: str) -> Path:
    from pkcs11_backends.errors import TokenNotFoundError
    from pkcs11_backends.module import Module, TokenSelector
    from pkcs11_backends.provisioning import init_token

    module_path = next((p for p in SOFTHSM_MODULES if os.path.exists(p)), None)
    if module_path is None:
        raise SystemExit("error: SoftHSM2 is not installed\nhint: apt-get install softhsm2 (make setup does)")
    home = state_dir / "softhsm"
    tokens = home / "tokens"
    conf = home / "softhsm2.conf"
    # What this run creates, outermost first: removed again if the token cannot be made.
    created = [p for p in (state_dir, home, tokens, conf, home / "so.pin", home / "user.pin") if not p.exists()]
    try:
        tokens.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
                        "slots.removable = false\n")
        so_pin = write_secret(home / "so.pin")
        user_pin = write_secret(home / "user.pin")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        module = Module.load(module_path)
        try:
            module.find_token(TokenSelector(label=label))
            print(f"token {label!r} already exists in {tokens}")
        except TokenNotFoundError:
            init_token(module, label, so_pin, user_pin)
            print(f"created token {label!r} in {tokens}")
        _make_audit_key(state_dir, module_path, label, home / "user.pin", conf)
    except BaseException:
        for path in reversed(created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
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
    parser.add_argument("--label", default="tpp-agent", type=_label)
    args = parser.parse_args(argv)
    _with_pkcs11()
    from pkcs11_backends.errors import Pkcs11Error

    try:
        conf = make_token(args.state_dir.resolve(), args.label)
    except Pkcs11Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    print(f"SOFTHSM2_CONF={conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
