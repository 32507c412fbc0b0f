"""The state store on each backend: a SQLite file in the test's dir, a new database on the session's server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import config as config_module
from agent.config import Config
from agent.state import StateStore, open_state
from tests.pg import PostgresServer


def state_config(state_dir: Path, database: str | None) -> Config:
    state: dict[str, Any] = {"dir": str(state_dir)}
    if database is not None:
        state["database"] = database
    return config_module.parse({"state": state}, state_dir / "config.toml")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """``[state] database`` for this run: None (SQLite in the state dir), or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def store(database: str | None, tmp_path: Path) -> StateStore:
    """Each transaction opens its own connection: nothing stays open to close."""
    return open_state(state_config(tmp_path / "state", database))
