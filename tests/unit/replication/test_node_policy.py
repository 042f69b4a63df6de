"""The pure parts of the HA node side: the start role, the order checks of a received delta,
the nonce window, the primary's address, payload packing, switch reports rebuilt."""

from __future__ import annotations

import pytest

from vramancer.models.types import PlanStep, StepAction, StepResult, StepStatus, SwitchReport
from vramancer.replication.apply import switch_report
from vramancer.replication.delta import Delta
from vramancer.replication.kinds import DeltaKind, pack, unpack
from vramancer.replication.receiver import NonceWindow, Reason, check
from vramancer.replication.roles import PeerStatus, primary_address, start_role
from vramancer.replication.settings import HaRole
from vramancer.replication.shipper import _within

P, S = HaRole.PRIMARY, HaRole.STANDBY


def peer(address: str, epoch: int, role: HaRole) -> PeerStatus:
    return PeerStatus(address, epoch, role, 0)


def test_a_primary_starts_as_standby_only_before_a_newer_epoch_or_a_rival_primary() -> None:
    assert start_role(P, 1, []).role is P
    assert start_role(P, 1, [peer("b:1", 1, S)]).role is P
    back = start_role(P, 1, [peer("b:1", 2, P)])
    assert (back.role, back.primary) == (S, "b:1")
    assert "epoch 2" in back.reason
    rival = start_role(P, 3, [peer("b:1", 3, P)])
    assert (rival.role, rival.primary) == (S, "b:1")
    assert start_role(P, 3, [peer("b:1", 2, P)]).role is P
    configured = start_role(S, 5, [peer("b:1", 4, P), peer("c:1", 4, S)])
    assert (configured.role, configured.primary) == (S, "b:1")


def delta(seq: int, epoch: int = 1, kind: str = DeltaKind.TASK) -> Delta:
    return Delta(seq, epoch, 0, b"n" * 16, kind, b"{}")


@pytest.mark.parametrize(
    ("d", "expected", "epoch", "seen", "reason"),
    [
        (delta(5), 5, 1, False, None),
        (delta(5, epoch=2), 5, 1, False, None),
        (delta(5), 5, 2, False, Reason.STALE_EPOCH),
        (delta(5), 5, 1, True, Reason.REPLAYED),
        (delta(4), 5, 1, False, Reason.REPLAYED),
        (delta(7), 5, 1, False, Reason.GAP),
        (delta(90, kind=DeltaKind.SNAPSHOT), 5, 1, False, None),
        (delta(4, epoch=2, kind=DeltaKind.SNAPSHOT), 5, 1, False, None),
        (delta(4, epoch=1, kind=DeltaKind.SNAPSHOT), 5, 1, False, Reason.REPLAYED),
        (delta(2, epoch=2, kind=DeltaKind.SNAPSHOT), 5, 1, False, Reason.REPLAYED),
        (delta(9, epoch=1, kind=DeltaKind.SNAPSHOT), 5, 2, False, Reason.STALE_EPOCH),
    ],
)
def test_order_checks(d: Delta, expected: int, epoch: int, seen: bool, reason: Reason) -> None:
    assert check(d, expected, epoch, seen) is reason


def test_nonce_window_forgets_only_what_is_two_hours_old() -> None:
    window = NonceWindow()
    for i in range(1100):
        window.add(i.to_bytes(16, "big"), 10 if i < 1000 else 12)
    window.prune(12)
    assert not window.seen((5).to_bytes(16, "big"))
    assert window.seen((1050).to_bytes(16, "big"))


def test_primary_address_prefers_the_peer_entry() -> None:
    assert primary_address("127.0.0.1:8470", ["127.0.0.1:8470"]) == "127.0.0.1:8470"
    assert primary_address("box:8470", ["10.0.0.2:8470"]) == "10.0.0.2:8470"
    assert primary_address("box:8470", ["a:8470", "b:8470"]) == "box:8470"


def test_pack_keeps_json_and_bytes_apart() -> None:
    data = b"\n\x00raw\nbytes"
    assert unpack(pack({"id": "a\nb"}, data)) == ({"id": "a\nb"}, data)
    assert unpack(pack({"id": "x"})) == ({"id": "x"}, None)
    assert unpack(pack({"id": "x"}, b"")) == ({"id": "x"}, b"")


def test_switch_report_is_rebuilt_from_its_dict() -> None:
    report = SwitchReport(
        profile="quiet",
        previous="idle",
        ok=False,
        steps=(
            StepResult(PlanStep(StepAction.UNLOAD, "clip", "gpu:0", "r"), StepStatus.DONE, 0.5),
            StepResult(
                PlanStep(StepAction.LOAD, "llm", "gpu:1"), StepStatus.FAILED, 1.0, "boom", "x"
            ),
        ),
        duration_s=1.5,
        failed_step=1,
        notes=("n",),
    )
    rebuilt = switch_report(report.as_dict())
    assert rebuilt is not None and rebuilt.as_dict() == report.as_dict()
    assert switch_report(None) is None


def test_batches_are_cut_by_bytes_but_never_empty() -> None:
    records = [b"a" * 10, b"b" * 10, b"c" * 10]
    assert _within(records, 25) == records[:2]
    assert _within(records, 5) == records[:1]
    assert _within(records, 100) == records
