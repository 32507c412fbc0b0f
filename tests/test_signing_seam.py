"""One signing seam: no code in agent/ can get an unaudited signer (read from the source, as a reviewer would).

The token's keys (``KeyStore``) are built by the runtime only; the audited signer by the operations' core only;
every ``sign`` call in agent/ goes through that signer, or through a ``store`` a caller handed in (JOSE and
X.509 helpers), and no code hands them the runtime's unaudited keys.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

AGENT = REPO / "agent"
# Functions that sign with the store they are given (first argument).
SIGNING_HELPERS = {"sign_jws", "sign_claims", "client_assertion", "request_object", "build_csr", "TokenClient"}
SIGN_RECEIVERS = {"self.core.signer", "context.core.signer", "store", "super()"}
# The audit trail signs its own checkpoints (with the key of purpose audit): it is the seam, not a caller.
AUDIT_TRAIL_OWN = {(Path("agent/audit.py"), "anchor")}


def _calls() -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted(AGENT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                found.append((path.relative_to(REPO), node))
    return found


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def test_stores_and_signers_are_built_in_one_place_each() -> None:
    made = {(str(path), _name(call.func)) for path, call in _calls() if _name(call.func) in ("KeyStore",
                                                                                             "AuditedKeyStore")}
    assert made == {("agent/runtime.py", "KeyStore"), ("agent/operations/core.py", "AuditedKeyStore")}


def test_every_signature_goes_through_the_audited_signer() -> None:
    for path, call in _calls():
        if isinstance(call.func, ast.Attribute) and call.func.attr == "sign" and path != Path("agent/client.py"):
            receiver = ast.unparse(call.func.value)
            assert receiver in SIGN_RECEIVERS or (path, receiver) in AUDIT_TRAIL_OWN, \
                f"{path}:{call.lineno}: {ast.unparse(call)}"
        if _name(call.func) in SIGNING_HELPERS and call.args:
            given = ast.unparse(call.args[0])
            assert not given.endswith("keys"), f"{path}:{call.lineno}: {ast.unparse(call)} signs unaudited"


def test_open_finance_has_no_default_signer() -> None:
    import inspect

    from agent.openfinance.service import OpenFinance

    parameters = inspect.signature(OpenFinance).parameters
    assert parameters["signer"].default is inspect.Parameter.empty
    assert parameters["observer"].default is inspect.Parameter.empty


def test_python_pkcs11_sessions_stay_in_pkcs11_backends() -> None:
    importers = set()
    for path in sorted(AGENT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "pkcs11" or name.startswith("pkcs11.") for name in names):
                importers.add(str(path.relative_to(REPO)))
    assert importers == set()


def test_every_decryption_goes_through_the_audited_store() -> None:
    """The token decrypts for the agent (events' RSA-OAEP-256, raw RSA inside on modules without OAEP-SHA-256)
    through the audited store only: its decryptor is made there, and every call names the core's store."""
    made = {str(path) for path, call in _calls() if _name(call.func) == "TokenDecryptor"}
    assert made == {"agent/audit.py"}
    receivers = {ast.unparse(call.func.value) for path, call in _calls()
                 if isinstance(call.func, ast.Attribute) and call.func.attr == "decrypt_oaep_sha256"
                 and path != Path("agent/audit.py")}
    assert receivers and receivers <= SIGN_RECEIVERS - {"store"} | {"core.signer"}, receivers
