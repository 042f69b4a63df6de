"""DeviceId: one device name in every request and answer."""

from __future__ import annotations

import pytest

from vramancer.devices.ids import CPU, DeviceId


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu:0", DeviceId(0)),
        ("cuda:3", DeviceId(3)),
        (" GPU:12 ", DeviceId(12)),
        ("cpu", CPU),
        ("CPU", CPU),
        ("box-1/gpu:2", DeviceId(2, "box-1")),
        ("gpu-box_lan/cuda:1", DeviceId(1, "gpu-box_lan")),
    ],
)
def test_parse_accepts_every_input_form(text: str, expected: DeviceId) -> None:
    assert DeviceId.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["", "gpu:", "cuda", "gpu:-1", "gpu:x", "0", "tpu:0", "node/cpu", "/gpu:0", "a b/gpu:0"]
)
def test_parse_refuses_other_forms_naming_the_accepted_ones(text: str) -> None:
    with pytest.raises(ValueError, match="'gpu:N', 'cuda:N', 'cpu' or 'NODE/gpu:N'"):
        DeviceId.parse(text)


def test_answer_form_is_gpu_n_and_torch_form_is_cuda_n() -> None:
    gpu = DeviceId.parse("cuda:1")
    assert str(gpu) == "gpu:1"
    assert gpu.torch == "cuda:1"
    assert str(CPU) == "cpu" and CPU.torch == "cpu"
    remote = DeviceId.gpu(0, "box")
    assert str(remote) == "box/gpu:0"
    assert remote.local() == DeviceId(0)
    with pytest.raises(ValueError, match="another node"):
        _ = remote.torch


def test_round_trip_and_kinds() -> None:
    for text in ("gpu:0", "cpu", "n1/gpu:7"):
        assert str(DeviceId.parse(text)) == text
    assert CPU.is_cpu and not CPU.is_gpu
    assert DeviceId(0).is_gpu and DeviceId(0).is_local
    assert not DeviceId(0, "n").is_local


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError):
        DeviceId(-1)
    with pytest.raises(ValueError):
        DeviceId(None, "node")
    with pytest.raises(ValueError):
        DeviceId(True)  # type: ignore[arg-type]


def test_parse_input_is_a_422_naming_the_field() -> None:
    from vramancer.errors import InvalidInput

    assert DeviceId.parse_input("cuda:2") == DeviceId(2)
    with pytest.raises(InvalidInput) as info:
        DeviceId.parse_input("tpu:0", field="target")
    assert info.value.details["field"] == "target"
