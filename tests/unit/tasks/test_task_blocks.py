"""A task that names blocks finds them as files under ``$VRM_BLOCKS_DIR`` before it starts;
a block that is nowhere fails the attempt with its name."""

from __future__ import annotations

import pytest
from tests.unit.tasks.conftest import MakeHarness

from vramancer.errors import InvalidInput
from vramancer.tasks.blocks import file_name
from vramancer.tasks.model import TaskState


async def test_named_blocks_are_files_in_the_task_s_blocks_dir(make_harness: MakeHarness) -> None:
    h = await make_harness(store=True)
    assert h.store is not None
    h.store.put("kv/page/1", b"first page")
    h.store.put("..", b"dots")
    sub = await h.svc.submit(
        {
            "type": "shell",
            "shell": 'cd "$VRM_BLOCKS_DIR" && ls && cat kv%2Fpage%2F1 && cat %2E%2E',
            "blocks": ["kv/page/1", ".."],
        }
    )
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE, record.stderr_tail
    assert record.stdout_tail == "%2E%2E\nkv%2Fpage%2F1\nfirst pagedots"


async def test_a_block_that_is_nowhere_fails_the_attempt_naming_it(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(store=True)
    sub = await h.svc.submit(
        {"type": "cmd", "cmd": ["true"], "blocks": ["weights/missing"], "max_retries": 0}
    )
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.FAILED
    assert record.error == "block 'weights/missing' is on no node"


@pytest.mark.parametrize(
    "body",
    [
        {"type": "cmd", "cmd": ["true"], "blocks": ["has space"]},
        {"type": "cmd", "cmd": ["true"], "blocks": []},
        {"type": "cmd", "cmd": ["true"], "blocks": [f"b{i}" for i in range(65)]},
        {"type": "noop", "blocks": ["a"]},
    ],
)
async def test_bad_block_lists_are_refused_at_submit(
    make_harness: MakeHarness, body: dict[str, object]
) -> None:
    h = await make_harness()
    with pytest.raises(InvalidInput, match="blocks"):
        await h.svc.submit(body)
    assert h.svc.counts().get("queued", 0) == 0


def test_file_names_never_leave_the_directory() -> None:
    assert file_name("kv/page/1") == "kv%2Fpage%2F1"
    assert file_name("..") == "%2E%2E"
    assert file_name(".") == "%2E"
    assert file_name("..a") == "..a"
