"""NSS's software token (``libsoftokn3.so``, Debian's libnss3): a module that needs ``C_Initialize`` arguments.

    with nss_module(Path("/tmp/x"), "tpp-agent") as nss:
        nss.module        # libsoftokn3.so
        nss.init_args     # the configdir=... string for [pkcs11] init_args (its database, its token label)

NSS's softoken does not start without its parameter string in ``CK_C_INITIALIZE_ARGS.pReserved``; the key
database is made with ``certutil -N`` (libnss3-tools) and its password is the token's user PIN. The token's
label is set by ``dbTokenDescription``. It has no far end to restart and no free slot to make tokens in.

``python -m tests.modules.nss DIR`` makes one and prints the settings until interrupted.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from softhsm.make_token import write_secret
from tests.modules.common import first_existing, need, serve_until_interrupted

MODULE_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libsoftokn3.so", "/usr/lib/aarch64-linux-gnu/libsoftokn3.so",
                     "/usr/lib/x86_64-linux-gnu/nss/libsoftokn3.so", "/usr/lib/aarch64-linux-gnu/nss/libsoftokn3.so")

@dataclass
class Nss:
    module: str
    init_args: str
    user_pin_file: Path
    so_pin_file: Path
    database: Path

    def add_vendor_key(self) -> bytes:
        """An RSA-2048 key pair made by ``certutil -G``, as an NSS user makes one: no label, CKA_ID its
        public key's hash. Returns the CKA_ID."""
        noise = self.database / "noise"
        noise.write_bytes(os.urandom(64))
        before = self._key_ids()
        subprocess.run(["certutil", "-G", "-d", f"sql:{self.database}", "-k", "rsa", "-g", "2048",
                        "-f", str(self.user_pin_file), "-z", str(noise)], check=True, capture_output=True, timeout=120)
        noise.unlink()
        (made,) = self._key_ids() - before
        return bytes.fromhex(made)

    def _key_ids(self) -> set[str]:
        # It exits 255 when the database holds no key yet.
        listed = subprocess.run(["certutil", "-K", "-d", f"sql:{self.database}", "-f", str(self.user_pin_file)],
                                check=False, capture_output=True, text=True, timeout=60)
        return set(re.findall(r"\b[0-9a-f]{40}\b", listed.stdout))


@contextlib.contextmanager
def nss_module(home: Path, label: str) -> Iterator[Nss]:
    need("certutil")
    module = first_existing(MODULE_CANDIDATES, "NSS's softoken is not installed (libnss3)")
    database = home / "nssdb"
    database.mkdir(parents=True, exist_ok=True)
    user_pin = home / "user.pin"
    pin = write_secret(user_pin)  # the key database's password is the token's user PIN
    # certutil reads the new password from a file too: the same one (0600) serves.
    subprocess.run(["certutil", "-N", "-d", f"sql:{database}", "-f", str(user_pin)], check=True,
                   capture_output=True, timeout=60)
    so_pin = home / "so.pin"  # NSS has no SO PIN of its own: the database password is its one secret
    so_pin.write_bytes(pin + b"\n")
    so_pin.chmod(0o600)
    init_args = (f"configdir='sql:{database}' certPrefix='' keyPrefix='' secmod='secmod.db' flags= "
                 f"dbTokenDescription='{label}'")
    yield Nss(module, init_args, user_pin, so_pin, database)


def main(argv: list[str]) -> int:
    home = Path(argv[1]) if len(argv) > 1 else Path("/tmp/tpp-nss")
    return serve_until_interrupted(nss_module(home, "tpp-agent"),
                                   lambda nss: {"module": nss.module, "init_args": nss.init_args,
                                                "pin_file": str(nss.user_pin_file)})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
