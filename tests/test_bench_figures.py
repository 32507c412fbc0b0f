"""The figures of docs/performance.md: drawn from a small results JSON in the shape ``python -m bench`` writes,
shown on the page in front of the tables, and redrawn (or dropped) with the data."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from bench import figures
from bench.report import BEGIN, END, FIGURES_BEGIN, FIGURES_END, update_figures
from tests.conftest import REPO


def _profiles(rate: float) -> dict[str, Any]:
    return {"default": {"rate": rate, "p50_ms": 2.0, "p99_ms": 9.0},
            "throughput": {"rate": rate * 2, "p50_ms": 1.0, "p99_ms": 4.0}}


def _signing_only() -> dict[str, Any]:
    rows = [{"alg": alg, "clients": clients, "raw_rate": 100.0 * clients, **_profiles(80.0 * clients)}
            for alg in ("PS256", "ES256") for clients in (1, 8)]
    return {"machine": {}, "command": "python -m bench --only signing",
            "results": {"signing": {"checks": [], "data": {"signing": rows}}}}


def _everything() -> dict[str, Any]:
    results = _signing_only()
    results["results"].update({
        "network-hsm": {"checks": [], "data": {"network_hsm": [
            {"alg": "ES256", "clients": 8, "latency_ms": 2.0, "ideal": 4000.0, "raw_rate": 3000.0,
             **_profiles(1500.0)}]}},
        "forward": {"checks": [], "data": {"forward": [{"clients": 1, "urllib3_rate": 2000.0, **_profiles(300.0)}]}},
        "handshakes": {"checks": [], "data": {"handshakes": [{"backend": "engine", "token": 30.0, "memory": 40.0}]}}})
    return results


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_every_figure_is_drawn_from_its_data(tmp_path: Path) -> None:
    drawn = figures.draw(_everything(), tmp_path)
    assert [d.file for d in drawn] == [name for name, _, _ in figures.FIGURES]
    for d in drawn:
        width, height = _png_size(tmp_path / d.file)
        assert width >= 500 and height >= 300, (d.file, width, height)
    again = tmp_path / "again"
    figures.draw(_everything(), again)  # no date or version inside: the same data gives the same bytes
    assert all((again / d.file).read_bytes() == (tmp_path / d.file).read_bytes() for d in drawn)


def test_the_page_shows_the_figures_in_front_of_the_tables_and_only_those_of_the_run(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nProse.\n\n## Latest figures\n\n{BEGIN}\n| a table |\n{END}\n\nMore prose.\n")
    page.with_suffix(".json").write_text(json.dumps(_everything()))
    assert len(update_figures(page)) == len(figures.FIGURES)
    text = page.read_text()
    assert text.index(FIGURES_BEGIN) < text.index(FIGURES_END) < text.index(BEGIN)
    for name, caption, _ in figures.FIGURES:
        assert f"![{caption}](figures/{name})" in text and (tmp_path / "figures" / name).exists()
    assert text.startswith("# Performance\n\nProse.") and text.endswith(f"{END}\n\nMore prose.\n")

    page.with_suffix(".json").write_text(json.dumps(_signing_only()))  # a run of one benchmark
    drawn = update_figures(page)
    assert [d.file for d in drawn] == ["signing-rate.png", "signing-latency.png"]
    text = page.read_text()
    assert text.count(FIGURES_BEGIN) == 1 and "forward.png" not in text
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["signing-latency.png", "signing-rate.png"]


def test_the_published_figures_are_those_of_the_published_results(tmp_path: Path) -> None:
    """docs/figures/ holds what `python -m bench --figures-only` draws from docs/performance.json, and the page
    shows each of them. (Pixels are not compared: matplotlib 3.6 on Debian 12 and 3.8 on 13 draw text apart.)"""
    results = json.loads((REPO / "docs" / "performance.json").read_text())
    drawn = figures.draw(results, tmp_path)
    assert drawn, "docs/performance.json has data for no figure"
    published = REPO / "docs" / "figures"
    assert sorted(p.name for p in published.iterdir()) == sorted(d.file for d in drawn), (
        "docs/figures/ is stale: run .venv/bin/python -m bench --figures-only")
    page = (REPO / "docs" / "performance.md").read_text()
    for d in drawn:
        assert _png_size(published / d.file) == _png_size(tmp_path / d.file)
        assert f"![{d.caption}](figures/{d.file})" in page
