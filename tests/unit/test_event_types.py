"""The event kinds: one frozen class each, whose fields are the wire's ``data`` keys."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vramancer import event_types as ev
from vramancer.events import Event, EventBus


def test_every_kind_has_one_class_and_a_schema_of_exactly_its_keys() -> None:
    assert len(ev.BY_KIND) == len(ev.EVENT_TYPES)
    for cls in ev.EVENT_TYPES:
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        schema = ev.data_schema(cls)
        keys = [f.metadata.get("key", f.name) for f in dataclasses.fields(cls)]
        assert list(schema["properties"]) == keys == schema["required"], cls.kind
        assert schema["description"], cls.kind


def test_the_wire_keeps_its_keys_and_order() -> None:
    migrated = ev.ModelMigrated(
        model="m",
        from_="gpu:0",
        to="cpu",
        runs_on="cpu",
        simulated=True,
        duration_s=0.5,
        reason="x",
    )
    event = EventBus(clock=lambda: 12.5).publish(migrated)
    assert event.kind == "model_migrated"
    assert json.dumps(event.as_dict()) == json.dumps(
        {
            "kind": "model_migrated",
            "seq": 1,
            "timestamp": 12.5,
            "data": {
                "model": "m",
                "from": "gpu:0",
                "to": "cpu",
                "runs_on": "cpu",
                "simulated": True,
                "duration_s": 0.5,
                "reason": "x",
            },
        }
    )
    changed = ev.ResourceChanged(event_type="device_changed", details=migrated.as_data())
    assert changed.as_data()["details"]["from"] == "gpu:0"


def test_subscribers_filter_by_name_or_class_and_unknown_names_are_refused() -> None:
    bus = EventBus()
    by_name: list[Event] = []
    by_class: list[Event] = []
    bus.subscribe(by_name.append, "block_pinned")
    bus.subscribe(by_class.append, ev.BlockPinned)
    bus.publish(ev.BlockPinned(id="a"))
    bus.publish(ev.BlockUnpinned(id="a"))
    assert [e.data for e in by_name] == [e.data for e in by_class] == [{"id": "a"}]
    assert [e.kind for e in bus.recent(kind=ev.BlockUnpinned)] == ["block_unpinned"]
    with pytest.raises(ValueError, match="not an event kind"):
        bus.subscribe(by_name.append, "block_pined")
    with pytest.raises(ValueError, match="not an event kind"):
        bus.recent(kind="nothing")


def test_only_events_are_published() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="publish takes an event"):
        bus.publish("block_put")  # type: ignore[arg-type]
    assert bus.recent() == []
