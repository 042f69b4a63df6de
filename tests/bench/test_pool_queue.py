"""The pool queue benchmark (bench/pool_queue.py) runs end to end on a small queue and answers
the fields its report is read for."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.pool_queue import run

from tests.natsserver import nats_server_binary


async def test_the_benchmark_measures_both_queues(tmp_path: Path) -> None:
    if nats_server_binary() is None:
        pytest.skip("no nats-server binary")
    result = await run(queued=300, samples=5, workdir=tmp_path)
    assert result["queued"] == 300
    for side in ("jetstream", "sqlite"):
        for field in ("submit_us", "submit_empty_us", "lease_us", "lease_empty_us"):
            assert result[side][field] > 0, (side, field)
    # the big bucket read back whole: the tasks queued, and one per timed submission
    assert result["jetstream"]["loaded_tasks"] == 300 + 5
