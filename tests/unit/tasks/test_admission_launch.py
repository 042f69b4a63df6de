"""Admission decisions and the ``RunRequest`` builder: pure, no queue, no processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.unit.tasks.records import make_record

from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
from vramancer.errors import Forbidden, InvalidInput
from vramancer.tasks.admission import Context, admit, needs_operator
from vramancer.tasks.errors import PayloadTooLarge
from vramancer.tasks.launch import argv, run_request
from vramancer.tasks.model import TaskRecord, TaskSpec, TaskState, TaskType
from vramancer.tasks.settings import TasksSettings

GIB = 1024**3
HOST = HostSnapshot(
    cpu_count=2,
    cpu_utilization_ratio=0.0,
    memory_total_bytes=8 * GIB,
    memory_available_bytes=4 * GIB,
    memory_used_bytes=4 * GIB,
    swap_total_bytes=0,
    swap_used_bytes=0,
)
GPU = GpuSnapshot(
    index=0,
    uuid="GPU-0",
    name="A",
    vendor=DeviceVendor.NVIDIA,
    memory_total_bytes=24 * GIB,
    memory_used_bytes=0,
    memory_free_bytes=24 * GIB,
    taken_at=100.0,
    cuda_index=0,
)
SNAPSHOT = SystemSnapshot(host=HOST, gpus=(GPU,))


def ctx(**settings: object) -> Context:
    return Context(
        settings=TasksSettings(**settings),  # type: ignore[arg-type]
        programs={"mytool": "/opt/bin/mytool"},
        snapshot=SNAPSHOT,
        budgets=lambda: {"gpu:0": 16 * GIB},
        model_names=lambda: ["clip"],
        estimate=lambda spec: 7.0,
        new_id=lambda: "fixed-id",
    )


def test_a_batch_becomes_the_rows_the_queue_stores() -> None:
    decision = admit([{"type": "cmd", "cmd": ["true"], "timeout": 5}], ctx(max_retries=4))
    (task,) = decision.tasks
    assert (task.task_id, task.estimate_s, task.estimate_key) == ("fixed-id", 7.0, "cmd:true")
    assert (task.max_retries, task.timeout_s, task.maintenance, task.owner) == (
        4,
        5.0,
        False,
        "local",
    )
    assert decision.max_open_maintenance is None


def test_a_viewer_gets_the_quota_and_the_payload_limit() -> None:
    decision = admit([{"type": "noop"}], ctx(viewer_max_queued=3), owner="token:x", viewer=True)
    assert decision.max_open_maintenance == 3 and decision.tasks[0].owner == "token:x"
    big = {"type": "warmup", "payload": {"pad": "x" * 100}}
    with pytest.raises(InvalidInput, match="viewer_max_payload_bytes"):
        admit([big], ctx(viewer_max_payload_bytes=64), viewer=True)


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ({"type": "cmd", "cmd": ["rm"]}, Forbidden, "command 'rm' not allowed"),
        ({"type": "shell", "shell": "true"}, Forbidden, "shell tasks"),
        ({"type": "cmd", "cmd": ["mytool"], "env": {"LD_PRELOAD": "x"}}, Forbidden, "LD_PRELOAD"),
        ({"type": "cmd", "cmd": ["other"]}, InvalidInput, "no such program"),
        ({"type": "cmd", "cmd": ["mytool"], "gpu": 3}, InvalidInput, "gpu 3 does not exist"),
        ({"type": "cmd", "cmd": ["mytool"], "vram": "20GiB"}, InvalidInput, "largest: 16"),
        ({"type": "cmd", "cmd": ["mytool"], "model": "nope"}, InvalidInput, "no managed model"),
    ],
)
def test_refusals(body: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        admit([body], ctx(allowed_commands=["mytool", "other"]))


def test_bounds_are_checked_before_the_items() -> None:
    with pytest.raises(InvalidInput, match=r"at most 2 \(\[tasks\] max_batch\)"):
        admit([object()] * 3, ctx(max_batch=2))
    with pytest.raises(PayloadTooLarge):
        admit([{"type": "shell", "shell": "x" * 5000}], ctx(max_payload_bytes=4096))
    with pytest.raises(InvalidInput, match=r"tasks\[1\]: a task body must be a JSON object"):
        admit([{"type": "noop"}, 7], ctx())


def test_which_tasks_need_the_operator_role() -> None:
    assert needs_operator([{"type": "noop"}, TaskSpec(type=TaskType.WARMUP)]) is None
    assert needs_operator([{"type": "noop"}, {"type": "python"}]) == (1, "python")
    assert needs_operator([{"type": "bogus"}]) is None  # validation says what is wrong


def _record(spec: TaskSpec) -> TaskRecord:
    return make_record(
        seq=1,
        type=spec.type,
        state=TaskState.SCHEDULED,
        priority=spec.priority,
        spec_json=spec.model_dump_json(exclude_none=True),
        attempts=2,
        max_retries=2,
        timeout_s=30.0,
        estimate_s=1.0,
        estimate_key="k",
        device="gpu:0",
        lease_token=1,
    )


def test_the_run_request_of_an_attempt() -> None:
    spec = TaskSpec(type=TaskType.CMD, cmd=["mytool", "-v"], env={"A": "1", "VRM_DEVICE": "x"})
    data = Path("/data")
    request = run_request(
        _record(spec),
        spec,
        device="gpu:0",
        cuda_index=3,
        model_env={"VRM_MODEL": "clip"},
        settings=TasksSettings(allowed_commands=["mytool"], kill_grace_s=1.5),
        data_dir=data,
        programs={"mytool": "/opt/bin/mytool"},
        environ={"PATH": "/bin", "VRM_API_TOKEN": "secret"},
    )
    scratch = data / "scratch" / "gpu0" / "t1"
    assert request.argv == ["/opt/bin/mytool", "-v"]
    assert request.cwd == scratch
    assert request.env == {
        "PATH": "/bin",
        "A": "1",
        "VRM_TASK_ID": "t1",
        "VRM_TASK_ATTEMPT": "2",
        "VRM_DEVICE": "gpu:0",
        "VRM_SCRATCH_DIR": str(scratch),
        "CUDA_VISIBLE_DEVICES": "3",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "VRM_MODEL": "clip",
    }
    assert (request.timeout_s, request.kill_grace_s) == (30.0, 1.5)
    assert request.stdout_path == data / "task-logs" / "t1" / "t1.2.stdout"


def test_the_host_sees_no_gpu_and_each_kind_has_its_argv() -> None:
    spec = TaskSpec(type=TaskType.SHELL, shell="echo hi", cwd="/tmp")
    request = run_request(
        _record(spec),
        spec,
        device="host",
        cuda_index=None,
        model_env={},
        settings=TasksSettings(),
        data_dir=Path("/d"),
        programs={},
        environ={},
    )
    assert request.env["CUDA_VISIBLE_DEVICES"] == "" and "CUDA_DEVICE_ORDER" not in request.env
    assert request.argv == ["/bin/sh", "-c", "echo hi"] and request.cwd == Path("/tmp")
    py = TaskSpec(type=TaskType.PYTHON, python="m:f", payload={"args": [1]})
    assert argv(py) == [sys.executable, "-m", "vramancer.tasks.pyrun", "m:f", '{"args":[1]}']
    with pytest.raises(InvalidInput):
        argv(TaskSpec(type=TaskType.NOOP))


class _Gpu:
    def __init__(self, node: str, index: int, gib: int) -> None:
        self.node, self.index, self.grantable_total_bytes = node, index, gib * GIB


class _Pool:
    """A pool of two live nodes and one that is down (the admission side of ``PoolPort``)."""

    node = "hub"

    def gpus(self) -> list[_Gpu]:
        return [_Gpu("box-3090", 0, 24), _Gpu("box-4090", 0, 24), _Gpu("box-4090", 1, 12)]

    def node_problem(self, node: str) -> str | None:
        if node == "hub":
            return None  # an orchestrator without GPUs of its own
        if node == "old":
            return "node 'old' is down (no heartbeat for 300 s)"
        if node in ("box-3090", "box-4090"):
            return None
        return f"no node {node!r} in the pool"


def pool_ctx() -> Context:
    return Context(
        settings=TasksSettings(),
        programs={},
        snapshot=SNAPSHOT,
        budgets=lambda: {},
        model_names=None,
        estimate=lambda spec: 1.0,
        node="hub",
        pool=_Pool(),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("body", "field", "match"),
    [
        ({"node": "nope"}, "node", "node: no node 'nope' in the pool"),
        ({"node": "old"}, "node", "node: node 'old' is down"),
        ({"vram": "30GiB"}, "vram", r"no GPU of the pool.s live nodes .*largest: 24.0 GiB"),
        ({"node": "box-4090", "gpu": 1, "vram": "20GiB"}, "vram", "largest: 12.0 GiB"),
        ({"node": "box-3090", "gpu": 1}, "gpu", "gpu 1 does not exist on node box-3090"),
        ({"node": "hub"}, "node", "node hub has no GPU: a pool runs tasks on its nodes' GPUs"),
    ],
)
def test_a_pool_refuses_what_no_live_node_can_run(
    body: dict[str, object], field: str, match: str
) -> None:
    with pytest.raises(InvalidInput, match=match) as info:
        admit([{"type": "cmd", "cmd": ["true"], **body}], pool_ctx())
    assert info.value.details["field"] == field


def test_a_pool_admits_a_task_that_fits_a_node() -> None:
    decision = admit([{"type": "cmd", "cmd": ["true"], "node": "box-4090", "gpu": 1}], pool_ctx())
    assert decision.tasks[0].spec.node == "box-4090"
    assert admit([{"type": "cmd", "cmd": ["true"], "vram": "24GiB"}], pool_ctx()).tasks


def test_without_a_pool_only_this_node_may_be_named() -> None:
    with pytest.raises(InvalidInput, match=r"node: no node 'other'.*not in a pool") as info:
        admit([{"type": "cmd", "cmd": ["mytool"], "node": "other"}], ctx())
    assert info.value.details["field"] == "node"
