"""The daemon's log lines: whole JSON lines on the descriptor, stamped in UTC; and the stamp itself."""

from __future__ import annotations

import datetime
import json
import os
import re
import threading

from agent import log
from agent.clock import utc_iso


def test_stamps_are_isoformat_utc_with_microseconds_and_now() -> None:
    before = datetime.datetime.now(datetime.UTC)
    stamp = utc_iso()
    after = datetime.datetime.now(datetime.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", stamp)
    assert before - datetime.timedelta(microseconds=1) <= datetime.datetime.fromisoformat(stamp) <= after
    assert utc_iso("Z").endswith("Z") and datetime.datetime.fromisoformat(utc_iso("Z")).tzinfo is not None


def test_lines_from_many_threads_reach_a_pipe_whole_and_stamped() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    log.configure("json", stream=stream)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()
    try:
        def write(n: int) -> None:
            logger = log.get_logger(f"t{n}")
            for i in range(200):
                logger.info("request", n=n, i=i, pin="123456", padding="x" * 300)

        writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    finally:
        log.configure("console")
        stream.close()
        reader.join(10)
        os.close(read_end)
    lines = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    assert sorted((line["n"], line["i"]) for line in lines) == [(n, i) for n in range(4) for i in range(200)]
    assert all(line["pin"] == log.REDACTED and line["timestamp"].endswith("Z") for line in lines)
    stamps = [datetime.datetime.fromisoformat(line["timestamp"]) for line in lines if line["n"] == 0]
    assert stamps == sorted(stamps)  # one thread's lines in the order it logged them
