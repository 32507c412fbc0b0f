"""``tpp-agent certs needs-renewal``: exit 0 when due, 1 when not, 2 when it cannot tell — as step's command,
so that a timer renews only when due and never on an error; the threshold is [certificates] expiry_warning_days
unless --days says otherwise."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from agent.runtime import Runtime
from agent.x509.certificates import import_certificate
from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from modelbank.ca import TestCA
from pkcs11_backends.keys import KeySpec
from tests.conftest import Token


def _key_with_certificate(runtime: Runtime, tmp_path: Path, label: str, days: float) -> str:
    info = runtime.keys.generate(label, KeySpec.parse("ec:p256"))
    csr = build_csr(runtime.keys, str(info.uri), directory_subject("Test TPP L.L.C.", "org-1", str(uuid.uuid4())))
    pem = TestCA(tmp_path / "ca").issue_from_csr(csr.pem.encode(), days=days)
    import_certificate(runtime.keys, str(info.uri), pem, "test")
    return str(info.uri)


def test_exit_status_follows_the_threshold(token: Token, runtime: Runtime, tmp_path: Path) -> None:
    soon = _key_with_certificate(runtime, tmp_path, "transport", days=20)
    due = token.cli("certs", "needs-renewal", "--key", soon)
    assert due.returncode == 0 and due.stdout.startswith("renew  key 'transport'") and "threshold 30" in due.stdout
    assert token.cli("certs", "needs-renewal", "--key", soon, "--days", "10").returncode == 1

    token.write_config("[certificates]\nexpiry_warning_days = 15\n")
    not_due = token.cli("certs", "needs-renewal", "--key", soon, "--json")
    assert not_due.returncode == 1, not_due.stderr
    answer = json.loads(not_due.stdout)
    assert answer["renew"] is False and answer["certificates"][0]["threshold_days"] == 15
    assert 19 < answer["certificates"][0]["days_left"] <= 20


def test_without_key_every_certified_key_counts(token: Token, runtime: Runtime, tmp_path: Path) -> None:
    _key_with_certificate(runtime, tmp_path, "transport", days=395)
    runtime.keys.generate("no-certificate-yet", KeySpec.parse("ec:p256"))
    assert token.cli("certs", "needs-renewal").returncode == 1
    _key_with_certificate(runtime, tmp_path, "signing", days=5)
    result = token.cli("certs", "needs-renewal")
    assert result.returncode == 0 and "ok     key 'transport'" in result.stdout
    assert "renew  key 'signing'" in result.stdout and "no-certificate-yet" not in result.stdout


def test_errors_exit_2_never_1(token: Token, runtime: Runtime) -> None:
    bare = str(runtime.keys.generate("bare", KeySpec.parse("ec:p256")).uri)
    for args, message in ((["--key", bare], "error: key 'bare' has no certificate: nothing to renew"),
                          (["--key", "nosuchalias"], "error: 'nosuchalias' is not a pkcs11: URI, a key alias"),
                          (["--days", "-1"], "error: --days must be from 0 to 3650, got -1")):
        result = token.cli("certs", "needs-renewal", *args)
        assert result.returncode == 2 and result.stderr.startswith(message), (args, result.stderr)
        assert "Traceback" not in result.stderr
    empty = token.cli("certs", "needs-renewal")
    assert empty.returncode == 2 and "no key on the token has a certificate" in empty.stderr
    token.write_config("[certificates]\nexpiry_warning_days = \"soon\"\n")
    bad = token.cli("certs", "needs-renewal", "--key", bare)
    assert bad.returncode == 2 and "expiry_warning_days must be a non-negative integer" in bad.stderr
