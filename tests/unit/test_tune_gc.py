"""The young-generation threshold: high only where the reader runs alone."""

from __future__ import annotations

import gc

from pgsink.engine.worker import tune_gc


def test_reader_alone_gets_the_high_threshold_others_the_low() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(reader_only=True)
        assert gc.get_threshold()[0] == 100_000
        tune_gc(reader_only=False)  # delivery's cycles hold request bodies
        assert gc.get_threshold()[0] == 20_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
