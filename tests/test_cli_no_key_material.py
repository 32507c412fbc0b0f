"""After a full CLI run, no file the agent could have written holds private key material.

Scanned: the state directory (SoftHSM2's token files, PIN files, config), the repository
checkout (without .venv), the temp directory the CLI ran with, and the directory where
CSRs and certificates were written. SoftHSM2's token files do hold the private keys,
encrypted under a key derived from the PIN: that is the HSM's own store, and the test
asserts that no plaintext PKCS#8/PKCS#1/SEC 1 structure or PEM private key is in them.

The temp directory is a private one handed to the CLI as ``$TMPDIR``: the machine's
shared /tmp also holds files of unrelated processes (TLS test servers' keys among them).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import REPO, Token
from tests.x509_helpers import CLIENT_ID, ORG_ID, TestCA, pem_of, private_key_material, scan_tree


def test_the_scanner_finds_every_private_key_encoding() -> None:
    """The keys here are made in memory for this check only and never written anywhere."""
    noise = os.urandom(500)
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()),
                ec.generate_private_key(ec.SECP384R1())):
        for encoding, fmt in ((serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
                              (serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL),
                              (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
                              (serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL)):
            blob = key.private_bytes(encoding, fmt, serialization.NoEncryption())
            assert private_key_material(noise + blob + noise), (type(key).__name__, encoding, fmt)
    public = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert private_key_material(public + TestCA().pem) == []


def test_no_private_key_material_after_a_full_cli_run(token: Token, tmp_path: Path) -> None:
    work, temp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    env = {"TMPDIR": str(temp)}

    def cli(*args: str) -> str:
        return token.cli(*args, env=env, check=True).stdout

    ca = TestCA()
    for spec in ("rsa:2048", "rsa:3072", "ec:p256", "ec:p384"):
        key = f"pkcs11:object={spec}"
        cli("keys", "generate", "--label", spec, "--type", spec)
        cli("csr", "--key", key, "--org-name", "Acme", "--org-id", ORG_ID, "--client-id", CLIENT_ID,
            "--out", str(work / f"{spec}.csr"))
        spki = serialization.load_pem_public_key(cli("keys", "public", key).encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        (work / f"{spec}.pem").write_bytes(pem_of(ca.issue(spki), ca.cert))
        cli("cert", "import", "--key", key, str(work / f"{spec}.pem"))
        cli("cert", "show", "--key", key, "--pem")
    cli("keys", "list", "--json")
    cli("doctor")

    token_files = list((token.state_dir / "softhsm" / "tokens").rglob("*.object"))
    assert len(token_files) >= 4 * 3  # public key, private key and certificate of each key
    hits = {}
    for root in (token.state_dir, REPO, temp, work):
        # .venv and node_modules (the interop tests' npm packages) hold third-party code; .hypothesis caches string
        # constants lifted from our scanner.
        hits.update(scan_tree(root, skip=(".venv", ".hypothesis", "node_modules")))
    # A `make demo` before this leaves the model bank's own CA and server keys in the checkout (kept for
    # `make demo-bank`): the bank's test data, not the TPP's.
    banks = tuple(f"{bank}{os.sep}" for bank in REPO.glob(".state/*/modelbank"))
    assert {path: found for path, found in hits.items() if not path.startswith(banks)} == {}
