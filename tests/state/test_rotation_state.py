"""Rotation state on both backends: saved and read back whole; a save based on a state another host changed
meanwhile is refused and writes nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.state import open_state
from agent.state.rotation import (
    CURRENT,
    RETIRED,
    SUCCESSOR,
    BankSwitch,
    RotationConflictError,
    RotationKey,
    RotationLog,
    RotationState,
)
from tests.state.conftest import state_config


def test_a_rotation_is_saved_and_read_back(database: str | None, tmp_path: Path) -> None:
    log = RotationLog(open_state(state_config(tmp_path / "state", database)))
    assert log.get("transport") is None
    started = log.save(RotationState("transport", keys=(RotationKey("transport-1", CURRENT, "2026-01-01"),
                                                        RotationKey("transport-2", SUCCESSOR, "2026-12-01"))))
    assert started.version == 1 and started.updated_by
    assert log.get("transport") == started and started.labels(SUCCESSOR) == ["transport-2"]

    switched = log.save(dataclasses.replace(
        started, overlap_started_at="2026-12-01T10:00:00", banks={"mb": BankSwitch("transport-2", "2026-12-02")}))
    done = log.save(dataclasses.replace(switched, keys=(RotationKey("transport-1", RETIRED, "2026-01-01"),
                                                        RotationKey("transport-2", CURRENT, "2026-12-01"))))
    assert log.get("transport") == done and done.version == 3
    assert done.labels(RETIRED) == ["transport-1"] and done.banks["mb"].key_label == "transport-2"


def test_a_stale_save_is_refused(database: str | None, tmp_path: Path) -> None:
    """Two hosts (two stores on one database; on SQLite, two processes' views of one file) read the same state."""
    config = state_config(tmp_path / "state", database)
    host_a, host_b = RotationLog(open_state(config)), RotationLog(open_state(config))
    first = host_a.save(RotationState("signing", keys=(RotationKey("signing-1", CURRENT, "t0"),)))
    seen_by_b = host_b.get("signing")
    assert seen_by_b == first
    host_a.save(dataclasses.replace(first, signing_switched_at="t1"))
    with pytest.raises(RotationConflictError, match=r"changed since it was read \(version 2, by ") as caught:
        host_b.save(dataclasses.replace(seen_by_b, keys=()))
    assert "read its state again" in caught.value.hint
    stored = host_a.get("signing")
    assert stored is not None and stored.version == 2 and stored.keys  # the refused save wrote nothing
    with pytest.raises(RotationConflictError, match="was started by another host"):
        host_b.save(RotationState("signing"))
