"""Proof for the demo: no private key, in any common encoding, sits in a file.

A file counts as a key file when it holds a PEM private-key block that parses, or
when its whole content parses as a DER private key (PKCS#8 or traditional). The
SoftHSM2 token directory is the software HSM's own store: its objects are encrypted
under the token's keys and none of them parses as a key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----\r?\n([A-Za-z0-9+/=\r\n:,\-\s]+?)-----END \1-----")
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
_MAX_SIZE = 4 << 20


@dataclasses.dataclass(frozen=True)
class Scan:
    files: int
    key_files: list[Path]


def _files(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        for directory, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            for name in names:
                path = Path(directory) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def holds_private_key(data: bytes) -> bool:
    for match in _PEM_BLOCK.finditer(data):
        try:
            serialization.load_pem_private_key(match.group(0), password=None)
            return True
        except TypeError:
            return True  # an encrypted PEM key is still a key in a file
        except ValueError:
            continue
    try:
        serialization.load_der_private_key(data, password=None)
        return True
    except TypeError:
        return True
    except ValueError:
        return False


def scan(roots: Iterable[Path], skip: Iterable[Path] = ()) -> Scan:
    """``skip``: directories that are not the TPP's (the model bank's own keys)."""
    count, found = 0, []
    skipped = [directory.resolve() for directory in skip]
    for path in _files(roots):
        if any(path.resolve().is_relative_to(directory) for directory in skipped):
            continue
        try:
            if path.stat().st_size > _MAX_SIZE:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        count += 1
        if holds_private_key(data):
            found.append(path)
    return Scan(count, found)
