"""The seed flow, run with the operator's real commands:

 1. an isolated SoftHSM2 token            softhsm/make_token.py
 2. the transport key, RSA 2048, on it     tpp-agent keys generate
 3. a CSR in the directory's profile       tpp-agent csr   (signed on the token)
 4. a certificate from the model bank's CA (standing in for the directory)
 5. the certificate onto the token         tpp-agent cert import
 6. the bank's discovery document          tpp-agent discover
 7. registration over mTLS                 tpp-agent register, tpp-agent registrations
 8. a separate signing key, its certificate and its JWKS published to the directory
 9. an access token: client_credentials with a client assertion signed on the token, bound to the
    transport certificate (cnf.x5t#S256)    tpp-agent token
10. a consent: PAR, the customer's approval at the bank, the callback (code exchange, id_token verified),
    a refresh                               tpp-agent par, tpp-agent consent callback|refresh
11. proof that no private key file exists

The TPP's state lives in ``--state-dir`` (default ``./.state/demo``, kept between runs:
running again reuses the token and the key). The model bank is a separate process with
its own CA, server keys and published JWKS in ``STATE_DIR/modelbank``, kept too:
``python -m demo --serve-bank`` (``make demo-bank``) starts it again for the demo's
configuration, so that every bank command can be tried on it afterwards.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from demo.proof import scan

REPO = Path(__file__).resolve().parent.parent
BANK = "modelbank"
KEY = "transport"
SIGNING_KEY = "signing"
SCOPE = "accounts"
TOKEN = "tpp-agent"
LEGAL_NAME = "Demo Payments Services L.L.C."
ORG_ID = "e7c5ad3a-3b3d-4d5c-9c42-1f2b6a0d9e11"
CLIENT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://tpp-agent.invalid/demo-client"))
REDIRECT_URI = "https://tpp.example/consents/callback"
CONSENT = [{"type": "urn:openfinanceuae:account-access-consent:v2.1",
            "consent": {"Permissions": ["ReadAccountsBasic"], "ExpirationDateTime": "2027-01-01T00:00:00Z"}}]


class DemoError(Exception):
    pass


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state = state_dir.resolve()
        self.config = self.state / "config.toml"
        # The model bank's own test CA, server keys and the directory's JWKS: the bank's, not the TPP's.
        self.bank_dir = self.state / "modelbank"
        self.step_no = 0
        self.env = {**os.environ, "TPP_AGENT_CONFIG": str(self.config),
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.env.pop("SOFTHSM2_CONF", None)  # the config names the demo's own token directory

    # -- output --------------------------------------------------------------
    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n[{self.step_no}] {title}", flush=True)

    @staticmethod
    def say(text: str) -> None:
        print(f"    {text}", flush=True)

    def run(self, *argv: str, shown: str | None = None, check: bool = True,
            out: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command the way an operator would, echo it and indent what it prints (stdout to ``out``)."""
        print(f"    $ {shown or shlex.join(argv)}" + (f" > {self.rel(out)}" if out else ""), flush=True)
        program = str(Path(sys.executable).parent / argv[0]) if argv[0] == "tpp-agent" else argv[0]
        result = subprocess.run([program, *argv[1:]], capture_output=True, text=True, env=self.env, cwd=REPO,
                                timeout=180, check=False)
        if out is not None and result.returncode == 0:
            out.write_text(result.stdout)
        for line in ((result.stdout if out is None else "") + result.stderr).splitlines():
            print(f"      {line}", flush=True)
        if check and result.returncode != 0:
            raise DemoError(f"`{shown or shlex.join(argv)}` failed with exit status {result.returncode}")
        return result

    def rel(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)

    # -- configuration ---------------------------------------------------------
    def write_config(self, bank_url: str | None = None, ca_bundle: Path | None = None) -> None:
        softhsm = self.state / "softhsm"
        text = (
            f'[state]\ndir = "{self.state}"\n\n'
            f'[pkcs11]\ntoken = "{TOKEN}"\npin_file = "{softhsm / "user.pin"}"\n\n'
            f'[pkcs11.environment]\nSOFTHSM2_CONF = "{softhsm / "softhsm2.conf"}"\n\n'
            f'[keys.{KEY}]\nuri = "pkcs11:token={TOKEN};object={KEY};type=private"\npurpose = "tls"\n\n'
            f'[keys.{SIGNING_KEY}]\nuri = "pkcs11:token={TOKEN};object={SIGNING_KEY};type=private"\n'
            'purpose = "jws"\nalgorithms = ["PS256"]\n\n'
            # The demo's own socket: a CLI finds no agent there and uses the demo's token, never a system agent.
            f'[daemon]\nsocket = "{self.state / "agent.sock"}"\n'
        )
        if bank_url is not None:
            text += (
                f'\n[banks.{BANK}]\ndiscovery_url = "{bank_url}/.well-known/openid-configuration"\n'
                f'issuer = "{bank_url}"\nca_bundle = "{ca_bundle}"\nclient_key = "{KEY}"\nuse_mtls_aliases = true\n'
                "read_timeout = 10\n"
            )
        self.config.write_text(text)

    # -- the flow --------------------------------------------------------------
    def main(self) -> None:
        print("tpp-agent demo: register a TPP application with a bank, the transport key never leaving the HSM")
        print(f"TPP state dir: {self.rel(self.state)}  (config: {self.rel(self.config)})")
        self.state.mkdir(parents=True, exist_ok=True)

        self.step("Create an isolated SoftHSM2 token (own token dir, random PINs in 0600 files)")
        self.run(sys.executable, "softhsm/make_token.py", "--state-dir", str(self.state), "--label", TOKEN,
                 shown=f"python softhsm/make_token.py --state-dir {self.rel(self.state)} --label {TOKEN}")
        self.write_config()
        self.say(f"export TPP_AGENT_CONFIG={self.rel(self.config)}   # every tpp-agent command below uses it")

        self.step("Generate the transport key (RSA 2048) on the token")
        self.ensure_key(KEY)

        self.step("Make the CSR in the directory's profile, signed on the token (C=AE, O, OU=org id, CN=client id)")
        csr = self.state / "transport.csr"
        self.run("tpp-agent", "csr", "--key", KEY, "--org-name", LEGAL_NAME, "--org-id", ORG_ID,
                 "--client-id", CLIENT_ID, "--out", str(csr), "--force",
                 shown=shlex.join(["tpp-agent", "csr", "--key", KEY, "--org-name", LEGAL_NAME, "--org-id", ORG_ID,
                                   "--client-id", CLIENT_ID, "--out", self.rel(csr), "--force"]))
        self.run("openssl", "req", "-in", str(csr), "-noout", "-verify", "-subject",
                 shown=f"openssl req -in {self.rel(csr)} -noout -verify -subject")

        bank_dir = self.bank_dir
        with self.model_bank(bank_dir) as (url, ca_bundle, bank_lines):
            self.with_bank(bank_dir, url, ca_bundle, csr, bank_lines)

        self.step("Proof: no private key file in the TPP's state dir or the repository")
        self.run("tpp-agent", "keys", "list")
        self.run(sys.executable, "-m", "demo.attributes", KEY, shown=f"python -m demo.attributes {KEY}")
        # The bank's keys are the bank's: this run's, and those another demo state in the checkout keeps for
        # `make demo-bank` (a `make demo` before `make test` left .state/demo/modelbank to be found here).
        result = scan([self.state, REPO], skip=[bank_dir, *REPO.glob(".state/*/modelbank")])
        for path in result.key_files:
            self.say(f"PRIVATE KEY FILE: {path}")
        if result.key_files:
            raise DemoError(f"{len(result.key_files)} file(s) hold a private key")
        self.say(f"scanned {result.files} files under {self.rel(self.state)} and {REPO}: "
                 "no PEM or DER private key in any of them")
        self.say("the token's own store (softhsm/tokens) holds the key encrypted by SoftHSM2, as a real HSM would")
        self.say(f"not scanned: the model bank's own test CA and server keys in {self.rel(bank_dir)} (the bank's, "
                 "kept for `make demo-bank`)")
        print("\ndemo complete: keys on the token, certificates issued and imported, bank discovered, "
              "application registered, certificate-bound access token issued, a consent completed and refreshed.")
        print("explore further: `make demo-bank` starts the model bank again for this configuration "
              "(README: After the demo)")

    def serve_bank(self) -> None:
        """The model bank again, for the demo's configuration (its URL rewritten), until SIGTERM or Ctrl-C."""
        if not self.config.exists() or not (self.bank_dir / "ca").is_dir():
            raise DemoError(f"no demo state in {self.rel(self.state)}: run `make demo` first")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with self.model_bank(self.bank_dir) as (url, ca_bundle, bank_lines):
            self.write_config(url, ca_bundle)
            directory = self.bank_dir / "directory"
            print(f"model bank for {self.rel(self.config)}: {url}  (its state: {self.rel(self.bank_dir)})")
            for line in (
                f"export TPP_AGENT_CONFIG={self.rel(self.config)}",
                f"tpp-agent discover {BANK} --refresh",
                f"tpp-agent register {BANK} --force    # the bank keeps registrations in memory: once per start",
                f"tpp-agent token {BANK} --scope {SCOPE}",
                f"python -m modelbank issue --state-dir {self.rel(self.bank_dir)} --csr FILE.csr --out FILE.pem"
                "   # the directory's CA",
                f"tpp-agent jwks --key {SIGNING_KEY} > {self.rel(directory / (CLIENT_ID + '.json'))}"
                "   # publish the JWKS",
            ):
                print(f"    $ {line}")
            print("ready (Ctrl-C stops the bank)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while not stop.is_set():
                    with contextlib.suppress(queue.Empty):
                        print(f"[model bank] {bank_lines.get(timeout=0.5)}", flush=True)

    def with_bank(self, bank_dir: Path, url: str, ca_bundle: Path, csr: Path, bank_lines: queue.Queue[str]) -> None:
        self.step("Get the certificate from the model bank's CA (standing in for the directory)")
        self.say(f"model bank: {url}  (its CA and server keys: test data in its own temp dir {bank_dir})")
        cert = self.state / "transport.pem"
        self.run(sys.executable, "-m", "modelbank", "issue", "--state-dir", str(bank_dir), "--csr", str(csr),
                 "--out", str(cert),
                 shown=f"python -m modelbank issue --state-dir {bank_dir} --csr {self.rel(csr)} --out {self.rel(cert)}")
        self.run("openssl", "x509", "-in", str(cert), "-noout", "-subject", "-issuer", "-enddate",
                 shown=f"openssl x509 -in {self.rel(cert)} -noout -subject -issuer -enddate")

        self.step("Import the certificate onto the token, next to its key")
        self.run("tpp-agent", "cert", "import", "--key", KEY, "--replace", str(cert),
                 shown=f"tpp-agent cert import --key {KEY} --replace {self.rel(cert)}")

        self.write_config(url, ca_bundle)
        self.step(f"Discover the bank (configured as [banks.{BANK}] with its issuer and CA bundle)")
        self.run("tpp-agent", "discover", BANK, "--refresh")

        self.step("Register the application: POST registration_endpoint {} over mTLS with the token key")
        self.run("tpp-agent", "register", BANK)
        with contextlib.suppress(queue.Empty):
            while True:
                self.say(f"[model bank] {bank_lines.get(timeout=2)}")
        self.run("tpp-agent", "register", BANK)  # shows that a success is not repeated
        self.run("tpp-agent", "registrations", "--bank", BANK)

        self.step("A separate signing key for JWTs (RSA 2048, PS256): certificate and JWKS from the directory")
        self.ensure_key(SIGNING_KEY)
        signing_csr, signing_cert = self.state / "signing.csr", self.state / "signing.pem"
        self.run("tpp-agent", "csr", "--key", SIGNING_KEY, "--org-name", LEGAL_NAME, "--org-id", ORG_ID,
                 "--client-id", CLIENT_ID, "--out", str(signing_csr), "--force",
                 shown=f"tpp-agent csr --key {SIGNING_KEY} ... --out {self.rel(signing_csr)} --force")
        self.run(sys.executable, "-m", "modelbank", "issue", "--state-dir", str(bank_dir), "--csr", str(signing_csr),
                 "--out", str(signing_cert),
                 shown=f"python -m modelbank issue ... --csr {self.rel(signing_csr)} --out {self.rel(signing_cert)}")
        self.run("tpp-agent", "cert", "import", "--key", SIGNING_KEY, "--replace", str(signing_cert),
                 shown=f"tpp-agent cert import --key {SIGNING_KEY} --replace {self.rel(signing_cert)}")
        published = bank_dir / "directory" / f"{CLIENT_ID}.json"
        self.run("tpp-agent", "jwks", "--key", SIGNING_KEY, out=published)
        [jwk] = json.loads(published.read_text())["keys"]
        self.say(f"the directory now serves the client's signing key: kid {jwk['kid']} alg {jwk['alg']} "
                 "(the bank checks client assertions against it)")

        self.step("Get an access token: client_credentials, client assertion signed on the token, over mTLS")
        self.run("tpp-agent", "token", BANK, "--scope", SCOPE)
        issued = ""
        with contextlib.suppress(queue.Empty):
            while True:
                line = bank_lines.get(timeout=2)
                self.say(f"[model bank] {line}")
                issued = line if line.startswith("issued token:") else issued
        bound = issued.rpartition("cnf.x5t#S256=")[2]
        transport = x5t_s256(self.state / "transport.pem")
        self.say(f"transport certificate x5t#S256: {transport}")
        if bound != transport:
            raise DemoError(f"the bank bound the token to {bound!r}, not to the transport certificate")
        self.say("the token is bound to the transport certificate (RFC 8705): "
                 "it works only over mTLS with the key on this token")
        self.consent(ca_bundle)

    def consent(self, ca_bundle: Path) -> None:
        """The authorization code flow of the UAE profile, the agent keeping PKCE, state and nonce."""
        self.step("Start a consent: PAR with a request object signed on the token (PKCE, state and nonce stay "
                  "in the agent)")
        started = json.loads(self.run("tpp-agent", "par", BANK, "--scope", "openid accounts", "--redirect-uri",
                                      REDIRECT_URI, "--authorization-details", json.dumps(CONSENT), "--json",
                                      shown=f"tpp-agent par {BANK} --scope 'openid accounts' --redirect-uri "
                                            f"{REDIRECT_URI} --authorization-details '...' --json").stdout)
        self.say(f"the customer is sent to: {started['authorization_url']}")

        self.step("The customer approves at the bank, which redirects the browser back with code, state and iss")
        redirect = self.browse(started["authorization_url"], ca_bundle)
        self.say(f"the browser comes back to: {redirect}")

        self.step("Finish the consent: state and iss checked, the code exchanged over mTLS, the id_token verified")
        kept = self.state / "consent.refresh"
        self.run("tpp-agent", "consent", "callback", BANK, "--url", redirect, "--refresh-token-file", str(kept),
                 shown=f"tpp-agent consent callback {BANK} --url '<the redirect>' --refresh-token-file "
                       f"{self.rel(kept)}")

        self.step("Refresh: a fresh client assertion; the bank rotates the refresh token, the file keeps the newest")
        self.run("tpp-agent", "consent", "refresh", BANK, "--refresh-token-file", str(kept),
                 shown=f"tpp-agent consent refresh {BANK} --refresh-token-file {self.rel(kept)}")

    def browse(self, url: str, ca_bundle: Path) -> str:
        """The redirect the customer's browser is sent back with (``demo.browser``, in its own process)."""
        done = self.run(sys.executable, "-m", "demo.browser", url, str(ca_bundle),
                        shown="python -m demo.browser '<the authorization URL>' <the bank's CA>")
        return done.stdout.strip().splitlines()[-1]

    def ensure_key(self, label: str) -> None:
        listed = json.loads(self.run("tpp-agent", "keys", "list", "--json").stdout)
        if any(key["label"] == label for key in listed):
            self.say(f"key {label!r} already exists (re-run): reused")
        else:
            self.run("tpp-agent", "keys", "generate", "--label", label, "--type", "rsa:2048")

    @contextlib.contextmanager
    def model_bank(self, bank_dir: Path) -> Iterator[tuple[str, Path, queue.Queue[str]]]:
        """``python -m modelbank serve`` in its own process; its ``registered:`` lines come through the queue."""
        (bank_dir / "directory").mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-m", "modelbank", "serve", "--state-dir", str(bank_dir),
                                    "--directory", str(bank_dir / "directory")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                   cwd=REPO)
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        info: dict[str, str] = {}
        try:
            for raw in process.stdout:
                line = raw.strip()
                if line == "ready":
                    break
                key, _, value = line.partition(": ")
                info[key] = value
            if "url" not in info or "ca_bundle" not in info:
                raise DemoError(f"the model bank did not start: {info}")
            stdout = process.stdout

            def forward() -> None:
                for raw in stdout:
                    lines.put(raw.strip())

            threading.Thread(target=forward, daemon=True).start()
            yield info["url"], Path(info["ca_bundle"]), lines
        finally:
            process.terminate()
            process.wait(timeout=10)


def x5t_s256(pem_file: Path) -> str:
    """RFC 8705's cnf.x5t#S256: base64url SHA-256 of the certificate's DER."""
    der = x509.load_pem_x509_certificate(pem_file.read_bytes()).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--state-dir", type=Path, default=Path(".state/demo"),
                        help="the TPP's state (token, config, registrations); default ./.state/demo")
    parser.add_argument("--serve-bank", action="store_true",
                        help="after a demo run: serve its model bank again, for its config (make demo-bank)")
    args = parser.parse_args(argv)
    try:
        demo = Demo(args.state_dir)
        if args.serve_bank:
            demo.serve_bank()
        else:
            demo.main()
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    return 0
