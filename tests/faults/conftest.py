"""The fault-injection PKCS#11 module (pkcs11_shim.c), built once per test session."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import config as config_module

HERE = Path(__file__).resolve().parent


@dataclass
class Shim:
    path: Path
    control: Path
    stats: Path

    def set(self, **values: int) -> None:
        self.control.write_text("".join(f"{k}={v}\n" for k, v in values.items()))

    def counts(self) -> dict[str, int]:
        if not self.stats.exists():
            return {"logins": 0, "signs": 0}
        pairs = (line.split("=") for line in self.stats.read_text().split())
        return {k: int(v) for k, v in pairs}

    def environment(self) -> dict[str, str]:
        return {"TPP_SHIM_TARGET": config_module.default_module(), "TPP_SHIM_CONTROL": str(self.control),
                "TPP_SHIM_STATS": str(self.stats)}


@pytest.fixture(scope="session")
def shim_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shim") / "pkcs11_shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-I/usr/include/p11-kit-1",
                    "-o", str(out), str(HERE / "pkcs11_shim.c"), "-ldl"], check=True, timeout=120)
    return out


@pytest.fixture
def shim(shim_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shim:
    s = Shim(shim_library, tmp_path / "shim.control", tmp_path / "shim.stats")
    s.set()
    # Tests that load the shim in-process need its variables in os.environ: set here so that they go with
    # the test, or the processes later tests start (the benchmarks') read this test's control file (a locked PIN).
    for name, value in s.environment().items():
        monkeypatch.setenv(name, value)
    return s
