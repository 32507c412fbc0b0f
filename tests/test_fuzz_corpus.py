"""The fuzz targets' corpora, replayed: every input a fuzzing run kept (and every seed) must still pass."""

from __future__ import annotations

from pathlib import Path

from fuzz.http_harness import one_input

CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "http"


def test_every_input_of_the_http_corpus_passes_the_target() -> None:
    inputs = sorted(CORPUS.iterdir())
    assert len(inputs) >= 10  # the seeds at least: an emptied corpus would replay nothing
    failures = []
    for path in inputs:
        try:
            one_input(path.read_bytes())
        except Exception as exc:  # each finding named, not only the first
            failures.append(f"{path.name}: {exc!r}")
    assert not failures, "\n".join(failures)
