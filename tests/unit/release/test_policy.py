"""The release policy alone: frozen views in, plans out (no disk, no git)."""

from __future__ import annotations

from typing import Any

from vramancer.release.policy import (
    StepKind,
    plan_accept,
    plan_candidate,
    plan_prepare,
    plan_prune,
    plan_reject,
    plan_rollback,
)
from vramancer.release.records import DeployView, ReleaseInfo, ReleaseState

P, F = ReleaseState.PASSED, ReleaseState.FAILED


def rel(i: int, state: ReleaseState = P, **kw: Any) -> ReleaseInfo:
    return ReleaseInfo(f"2026010{i}T000000Z-abcdef{i}", state, **kw)


def view(
    *releases: ReleaseInfo, current: int | None = None, candidate: int | None = None
) -> DeployView:
    def name(i: int | None) -> str | None:
        return None if i is None else releases[i].name

    return DeployView(tuple(releases), name(current), name(candidate))


def test_accept_switches_current_then_drops_the_candidate_link() -> None:
    v = view(rel(1, accepted_at=1.0), rel(2), current=0, candidate=1)
    plan = plan_accept(v)
    assert [(s.kind, s.target, s.value) for s in plan.steps] == [
        (StepKind.LINK, "current", v.releases[1].name),
        (StepKind.UNLINK, "candidate", None),
    ]
    assert plan.describe()[0] == f"point current at {v.releases[1].name}"


def test_failed_unfinished_and_missing_releases_are_refused() -> None:
    failed = view(rel(1, F), candidate=0)
    assert "failed; --force" in str(plan_accept(failed).refused)
    assert plan_accept(failed, force=True).ok
    running = view(rel(1, ReleaseState.TESTING), candidate=0)
    assert "still testing" in str(plan_accept(running, force=True).refused)
    stale = view(rel(1, ReleaseState.TESTING, stale=True), candidate=0)
    assert "its agent stopped" in str(plan_accept(stale).refused)
    assert plan_candidate(view(rel(1, F)), rel(1).name).refused
    assert plan_candidate(view(), "nope").refused == "no release nope"
    assert plan_accept(view(rel(1))).refused == "there is no candidate (vramancer release prepare)"
    assert plan_reject(view(rel(1))).refused == "there is no candidate to reject"


def test_rollback_goes_to_the_release_current_before() -> None:
    v = view(
        rel(1, accepted_at=10.0), rel(2, accepted_at=20.0), rel(3, accepted_at=30.0), current=2
    )
    assert plan_rollback(v).steps[0].value == v.releases[1].name
    assert plan_rollback(v, v.releases[0].name).steps[0].value == v.releases[0].name
    assert "already current" in str(plan_rollback(v, v.releases[2].name).refused)
    assert plan_rollback(view(rel(1, accepted_at=1.0), current=0)).refused
    rejected = view(rel(1, ReleaseState.REJECTED), rel(2, accepted_at=1.0), current=1)
    assert "rejected" in str(plan_rollback(rejected, rejected.releases[0].name).refused)


def test_prune_keeps_the_newest_current_candidate_and_work_in_progress() -> None:
    v = view(
        rel(1, accepted_at=1.0),
        rel(2),
        rel(3, ReleaseState.BUILDING),
        rel(4, F),
        rel(5),
        rel(6),
        current=0,
        candidate=1,
    )
    removed = [s.target for s in plan_prune(v, keep=2).steps]
    assert removed == [v.releases[3].name]
    stale = view(rel(1, ReleaseState.BUILDING, stale=True), rel(2), rel(3))
    assert [s.target for s in plan_prune(stale, keep=1).steps] == [
        stale.releases[0].name,
        stale.releases[1].name,
    ]


def test_prepare_only_for_a_commit_not_released_yet() -> None:
    v = view(rel(1, commit="a" * 40), rel(2, F, commit="b" * 40))
    assert plan_prepare(v, "c" * 40).ok
    assert "already" in str(plan_prepare(v, "b" * 40).refused)
    assert not plan_prepare(v, "a" * 40).ok
